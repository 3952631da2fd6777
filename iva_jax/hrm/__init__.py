"""Hierarchical Reasoning Model (sapientinc/HRM HRM-ACT-v1) in JAX: model, losses, tasks, training.

  config.py            HRMConfig (model), HRMTrainConfig (run)
  model.py             HRMInner (one segment), HRMACT (ACT wrapper: reset / segment / evaluate)
  losses.py            stablemax cross-entropy, the ACT loss head, metrics
  sparse_embedding.py  the puzzle-embedding table and its sign-SGD update
  tasks.py             Sudoku (4x4, 6x6, 9x9) and maze generators, .npz storage
  data.py              deterministic train / eval batches
  train.py             train state, train / eval steps, evaluation, orbax checkpoints
  controller.py        the HRM controller that ponders over a language model (ACT halting, sink
                       strength, MoE router temperature); controller_train.py, controller_task.py,
                       controller_rpo.py: its trainer, the seed's halting check, HRM-RPO shaping
"""

from iva_jax.hrm.config import MODEL_VARIANTS, HRMConfig, HRMTrainConfig  # noqa: F401
from iva_jax.hrm.losses import IGNORE_LABEL_ID, act_loss, stablemax_cross_entropy  # noqa: F401
from iva_jax.hrm.model import HRMACT, HRMCarry, HRMInner, InnerCarry  # noqa: F401
from iva_jax.hrm.controller import (  # noqa: F401,E402
    ControllerConfig, HRMController, PonderOutput, init_controller, make_controller, ponder_forward)
