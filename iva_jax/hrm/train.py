"""HRM training pieces: the train state, the jitted train/eval steps, evaluation and checkpoints.

One train step is the reference's `train_batch`: the carry from the previous step is reset where it
halted (those slots take the batch's rows), one segment runs with the one-step gradient, the ACT
loss (divided by the batch size) is differentiated w.r.t. the parameters (AdamATan2) and the puzzle
rows of the batch (sparse sign-SGD), and the new carry is kept for the next step.  Both learning
rates follow the reference's cosine-with-warmup schedule evaluated at the 1-based step.  The whole
state (carry and RNG included) is one pytree, so a checkpoint resumes bit-exactly.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization, struct

from iva_jax.hrm.config import HRMConfig, HRMTrainConfig
from iva_jax.hrm.losses import act_loss, eval_metrics, reduce_metrics
from iva_jax.hrm.model import HRMACT, HRMCarry
from iva_jax.hrm.sparse_embedding import signsgd_update
from iva_jax.train.adam_atan2 import adam_atan2

Array = jax.Array


@struct.dataclass
class HRMTrainState:
    step: Array  # int32 []: optimizer steps taken
    params: Any
    buffers: Any  # H_init / L_init, never updated
    opt_state: Any
    puzzle_table: Array
    carry: HRMCarry
    rng: Array  # uint32 [2]


def cosine_lr(step: Array, base_lr: float, warmup_steps: int, total_steps: int, min_ratio: float) -> Array:
    """The reference's cosine_schedule_with_warmup_lr_lambda at a 1-based step (one half cosine)."""
    s = jnp.asarray(step, jnp.float32)
    warm = base_lr * s / max(1, warmup_steps)
    progress = (s - warmup_steps) / max(1, total_steps - warmup_steps)
    cos = base_lr * (min_ratio + jnp.maximum(0.0, (1 - min_ratio) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))))
    return jnp.where(s < warmup_steps, warm, cos)


def make_optimizer(tc: HRMTrainConfig) -> optax.GradientTransformation:
    """AdamATan2 on the parameters with the schedule at step count + 1 (as the reference)."""
    sched = lambda count: cosine_lr(count + 1, tc.lr, tc.lr_warmup_steps, tc.total_steps, tc.lr_min_ratio)  # noqa: E731
    return adam_atan2(sched, b1=tc.beta1, b2=tc.beta2, weight_decay=tc.weight_decay, a=tc.atan2_a, b=tc.atan2_b)


def dummy_batch(config: HRMConfig, batch_size: Optional[int] = None) -> Dict[str, Array]:
    B = batch_size or config.batch_size
    return {"inputs": jnp.zeros((B, config.seq_len), jnp.int32), "labels": jnp.zeros((B, config.seq_len), jnp.int32),
            "puzzle_identifiers": jnp.zeros((B,), jnp.int32)}


def init_train_state(model: HRMACT, tc: HRMTrainConfig, rng: Array) -> HRMTrainState:
    """Fresh parameters, optimizer state, zero puzzle table and an all-halted carry."""
    k_init, k_run = jax.random.split(rng)
    variables, table = model.init(k_init)
    tx = make_optimizer(tc)
    return HRMTrainState(step=jnp.zeros((), jnp.int32), params=variables["params"], buffers=variables["buffers"],
                         opt_state=tx.init(variables["params"]), puzzle_table=table,
                         carry=model.initial_carry(dummy_batch(model.config)), rng=k_run)


def make_train_step(model: HRMACT, tc: HRMTrainConfig) -> Callable:
    """train_step(state, batch) -> (state, metric sums incl. `loss`, `lr`); pure, jit/vmap it."""
    c = model.config
    tx = make_optimizer(tc)

    def train_step(state: HRMTrainState, batch: Dict[str, Array]):
        rng, k_halt = jax.random.split(state.rng)
        carry = model.reset({"params": state.params, "buffers": state.buffers}, state.carry, batch)
        ids = carry.current_data["puzzle_identifiers"]
        rows = state.puzzle_table[ids]
        B = batch["inputs"].shape[0]

        def loss_fn(params, rows):
            new_carry, out = model.segment({"params": params, "buffers": state.buffers}, carry, rows,
                                           rng=k_halt, training=True)
            loss, sums = act_loss(out, new_carry.current_data["labels"], new_carry.halted, new_carry.steps,
                                  c.loss_type)
            return loss / B, (new_carry, sums)

        (loss, (new_carry, sums)), (g_params, g_rows) = jax.value_and_grad(
            loss_fn, argnums=(0, 1), has_aux=True)(state.params, rows)
        updates, opt_state = tx.update(g_params, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        step = state.step + 1
        emb_lr = cosine_lr(step, tc.puzzle_emb_lr, tc.lr_warmup_steps, tc.total_steps, tc.lr_min_ratio)
        table = signsgd_update(state.puzzle_table, ids, g_rows, emb_lr, tc.puzzle_emb_weight_decay)
        sums = dict(sums, loss=loss * B,
                    lr=cosine_lr(step, tc.lr, tc.lr_warmup_steps, tc.total_steps, tc.lr_min_ratio))
        new_state = state.replace(step=step, params=params, opt_state=opt_state, puzzle_table=table,
                                  carry=new_carry, rng=rng)
        return new_state, sums

    return train_step


def make_eval_step(model: HRMACT, eval_mode: Optional[str] = None) -> Callable:
    """eval_step(state, batch) -> metric sums (primary rule, and `adaptive_*` in max_steps mode)."""
    c = model.config
    mode = eval_mode or c.eval_mode

    def eval_step(state: HRMTrainState, batch: Dict[str, Array]):
        out = model.evaluate({"params": state.params, "buffers": state.buffers}, state.puzzle_table, batch, mode)
        sums = eval_metrics(out["preds"], batch["labels"], out["steps"], out["q_halt_logits"], c.halt_max_steps)
        if "preds_adaptive" in out:
            extra = eval_metrics(out["preds_adaptive"], batch["labels"], out["steps_adaptive"],
                                 out["q_halt_logits_adaptive"], c.halt_max_steps)
            sums.update({f"adaptive_{k}": v for k, v in extra.items()})
        return sums

    return eval_step


def finalize_eval(sums: Dict[str, float]) -> Dict[str, float]:
    """Eval sums -> accuracy, exact_accuracy, q_halt_accuracy, avg_steps, halt_rate (+ adaptive_*)."""
    out = {}
    for prefix in ("", "adaptive_"):
        if f"{prefix}count" not in sums:
            continue
        n = max(float(sums[f"{prefix}count"]), 1.0)
        for k in ("accuracy", "exact_accuracy", "q_halt_accuracy"):
            out[f"{prefix}{k}"] = float(sums[f"{prefix}{k}"]) / n
        out[f"{prefix}avg_steps"] = float(sums[f"{prefix}steps"]) / n
        out[f"{prefix}halt_rate"] = float(sums[f"{prefix}halted_early"]) / n
        out[f"{prefix}count"] = float(sums[f"{prefix}count"])
    return out


def evaluate(eval_step: Callable, state: HRMTrainState, batches: Iterable[Dict[str, np.ndarray]]) -> Dict[str, float]:
    """Sum a (jitted) eval_step over batches and normalise (single, un-vmapped state)."""
    total: Dict[str, float] = {}
    for b in batches:
        sums = jax.device_get(eval_step(state, b))
        for k, v in sums.items():
            total[k] = total.get(k, 0.0) + float(v)
    return finalize_eval(total)


def train_metrics(sums: Dict[str, Any], batch_size: int) -> Dict[str, float]:
    """Train metric sums of one step -> normalised metrics (loss per sample, halt_rate, avg steps...)."""
    sums = {k: float(v) for k, v in sums.items()}
    lr, loss = sums.pop("lr"), sums.pop("loss")
    out = reduce_metrics(sums, batch_size)
    out["loss"] = loss / batch_size
    out["lr"] = lr
    return out


# ---- checkpoints (iva_jax.train.checkpoint: orbax, atomic, latest-N) ----------------------------

def _generic(state: HRMTrainState):
    """The HRM state in the shape of iva_jax.train's TrainState (extra pieces ride in `params`)."""
    from iva_jax.train.step import TrainState

    extra = {"params": state.params, "buffers": state.buffers, "puzzle_table": state.puzzle_table,
             "carry": serialization.to_state_dict(state.carry)}
    return TrainState(step=state.step, params=extra, opt_state=state.opt_state, rng=state.rng)


def checkpoint_manager(directory: str | Path, max_to_keep: int = 1, train_config: Any = None):
    """A `Checkpointer` keeping the latest `max_to_keep` steps (orbax writes tmp-dir-then-rename)."""
    from iva_jax.train.checkpoint import Checkpointer

    return Checkpointer(directory, keep=max_to_keep, train_config=train_config)


def save_checkpoint(manager, state: HRMTrainState, step: int, extra: Optional[Dict[str, Any]] = None) -> None:
    """Save a train state (any leading seed axis included) at `step`; `extra` is stored as JSON. Waits."""
    manager.save(step, _generic(state), data_state=extra or {}, force=True)
    manager.wait()


def restore_checkpoint(manager, template: HRMTrainState,
                       step: Optional[int] = None) -> Tuple[HRMTrainState, Dict[str, Any], int]:
    """(state shaped like `template`, extra dict, step) from the latest (or given) checkpoint."""
    r = manager.restore(_generic(template), step)
    p = r.state.params
    state = HRMTrainState(step=r.state.step, params=p["params"], buffers=p["buffers"], opt_state=r.state.opt_state,
                          puzzle_table=p["puzzle_table"], carry=serialization.from_state_dict(template.carry, p["carry"]),
                          rng=r.state.rng)
    return state, dict(r.data_state or {}), r.step


def param_count(params: Any) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))
