"""RL configuration: the algorithm and loss knobs (`RLConfig`) and the built-in task (`TaskConfig`).

Field names follow the references where they exist (verl: clip_ratio_low/high/c, loss_agg_mode,
kl estimator names; TRL: scale_rewards, label_smoothing).  Trainer fields: the model, prompts per
step, minibatches, eval cadence, optional LoRA, and `train` (an iva_jax.train TrainConfig that
supplies the optimizer and schedule; its `steps` is the number of RL steps, its `seed`, batch and
data fields are unused: RLConfig.seed seeds everything).  A partial `train` mapping in a dict / YAML
fills the rest from `default_rl_train_config()`, not from TrainConfig's pretraining defaults.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from iva_jax.config import ConfigBase, check, check_choice, check_positive
from iva_jax.hrm.controller import ControllerConfig
from iva_jax.rl.advantages import GRPO_REWARD_SCALES
from iva_jax.rl.kl import KL_ESTIMATORS
from iva_jax.rl.masking import LOSS_AGG_MODES
from iva_jax.rl.preference import DPO_LOSS_TYPES
from iva_jax.train.config import TrainConfig
from iva_jax.train.lora import LoRAConfig

ALGORITHMS = ("ppo", "grpo", "dpo", "hrm_rpo")
KL_MODES = ("loss", "reward", "none")
CONTROLLER_READS = ("all", "prompt", "response")  # iva_jax.hrm.controller_rpo.READS (not imported: it imports rl)


@dataclasses.dataclass(frozen=True)
class TaskConfig(ConfigBase):
    """The built-in addition task (iva_jax.rl.tasks.AdditionTask)."""

    name: str = "addition"
    n_train: int = 2000
    n_eval: int = 200
    min_digits: int = 1
    max_digits: int = 3
    seed: int = 0
    format_weight: float = 0.0  # reward += format_weight * [completion is just the number]

    def validate(self) -> None:
        check_choice(self, "name", ("addition",))
        check_positive(self, "n_train", "n_eval", "min_digits", "max_digits")
        check(self.max_digits >= self.min_digits, "max_digits", self.max_digits,
              f"must be >= min_digits={self.min_digits}")
        check(self.format_weight >= 0, "format_weight", self.format_weight, "must be >= 0")


def default_rl_train_config() -> TrainConfig:
    """RL fine-tuning defaults: constant LR 1e-6, no weight decay, clip 1.0, float32 compute."""
    return TrainConfig(steps=100, lr=1e-6, b1=0.9, b2=0.99, weight_decay=0.0, schedule="constant",
                       grad_clip_norm=1.0, compute_dtype="float32")


@dataclasses.dataclass(frozen=True)
class RLConfig(ConfigBase):
    """Algorithm and loss settings for PPO, GRPO (incl. Dr. GRPO / DAPO settings), DPO, HRM-RPO."""

    algorithm: str = "grpo"
    # sampling
    group_size: int = 8  # completions per prompt (GRPO); 1 for PPO
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 16
    # policy loss (verl compute_policy_loss)
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2  # DAPO clip-higher: 0.28
    clip_ratio_c: Optional[float] = None  # dual-clip constant (verl default 3.0); None = off
    loss_agg_mode: str = "seq-mean-token-mean"
    norm_len: Optional[int] = None  # seq-mean-token-sum-norm divisor; None = max_new_tokens
    ppo_epochs: int = 1  # policy updates per rollout batch (mu in the GRPO paper)
    entropy_coef: float = 0.0
    # advantages
    scale_rewards: str = "group"  # GRPO: "group" | "batch" | "none" (Dr. GRPO)
    adv_eps: float = 1e-6
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True  # PPO
    # value head (PPO)
    vf_coef: float = 0.1
    clip_range_value: Optional[float] = 0.2
    # KL to the frozen reference
    kl_mode: str = "loss"  # "loss" (GRPO) | "reward" (PPO) | "none"
    kl_estimator: str = "low_var_kl"
    kl_coef: float = 0.04
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: float = 10000.0
    # DPO
    dpo_beta: float = 0.1
    dpo_loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    # HRM-RPO shaping R' = R + b_halt r_halt + b_entropy r_entropy + b_mem r_mem
    b_halt: float = 0.0
    b_entropy: float = 0.0
    b_mem: float = 0.0
    mem_temperature: float = 0.1
    # HRM-RPO's controller (iva_jax.hrm.controller_rpo.RPOController), which supplies r_halt and r_mem:
    # its shape / halting rule / ponder weight, and its own Adam step per RL step (lr, what it reads,
    # controller_mem_coef * NT-Xent(z_H(i), z_H(j)) added to its loss).  None = ControllerConfig().
    controller: Optional[ControllerConfig] = None
    controller_lr: float = 1e-3
    controller_read: str = "all"  # "all" | "prompt" | "response": the positions it pools
    controller_mem_coef: float = 0.0
    seed: int = 0
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    # trainer
    model: str = "smollm2-135m"  # HF directory, .gguf file, or the embedded "smollm2-135m"
    prompts_per_step: int = 16  # rollout batch = prompts_per_step * group_size sequences
    mini_batches: int = 1  # optimizer updates per epoch over one rollout batch
    eval_every: int = 0  # held-out evaluation every this many steps (0 = before and after only)
    lora: Optional[LoRAConfig] = None  # None = full fine-tuning
    train: TrainConfig = dataclasses.field(default_factory=default_rl_train_config)

    def validate(self) -> None:
        check_choice(self, "algorithm", ALGORITHMS)
        check_positive(self, "group_size", "temperature", "max_new_tokens", "ppo_epochs", "adv_eps",
                       "kl_target", "kl_horizon", "dpo_beta", "mem_temperature")
        if self.algorithm in ("grpo", "hrm_rpo"):
            check(self.group_size >= 2, "group_size", self.group_size,
                  f"{self.algorithm} needs >= 2 samples per prompt")
        check(0.0 < self.top_p <= 1.0, "top_p", self.top_p, "must be in (0, 1]")
        check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", self.top_k, "must be an integer >= 0")
        check(0.0 < self.clip_ratio_low < 1.0, "clip_ratio_low", self.clip_ratio_low, "must be in (0, 1)")
        check_positive(self, "clip_ratio_high")
        if self.clip_ratio_c is not None:
            check(self.clip_ratio_c > 1.0, "clip_ratio_c", self.clip_ratio_c, "dual-clip constant must be > 1")
        check_choice(self, "loss_agg_mode", LOSS_AGG_MODES)
        if self.norm_len is not None:
            check(self.norm_len > 0, "norm_len", self.norm_len, "must be > 0")
        check_choice(self, "scale_rewards", GRPO_REWARD_SCALES)
        check(0.0 <= self.gamma <= 1.0, "gamma", self.gamma, "must be in [0, 1]")
        check(0.0 <= self.lam <= 1.0, "lam", self.lam, "must be in [0, 1]")
        check(self.entropy_coef >= 0, "entropy_coef", self.entropy_coef, "must be >= 0")
        check(self.vf_coef >= 0, "vf_coef", self.vf_coef, "must be >= 0")
        if self.clip_range_value is not None:
            check(self.clip_range_value > 0, "clip_range_value", self.clip_range_value, "must be > 0 or None")
        check_choice(self, "kl_mode", KL_MODES)
        est = self.kl_estimator[:-1] if self.kl_estimator.endswith("+") else self.kl_estimator
        check(est in KL_ESTIMATORS, "kl_estimator", self.kl_estimator,
              f"must be one of {list(KL_ESTIMATORS)}, optionally with '+'")
        check(self.kl_coef >= 0, "kl_coef", self.kl_coef, "must be >= 0")
        check_choice(self, "dpo_loss_type", DPO_LOSS_TYPES)
        check(0.0 <= self.label_smoothing < 0.5, "label_smoothing", self.label_smoothing, "must be in [0, 0.5)")
        for f in ("b_halt", "b_entropy", "b_mem"):
            check(getattr(self, f) >= 0, f, getattr(self, f), "must be >= 0")
        check(self.controller is None or isinstance(self.controller, ControllerConfig), "controller",
              self.controller, "must be a ControllerConfig or None")
        check_positive(self, "controller_lr")
        check_choice(self, "controller_read", CONTROLLER_READS)
        check(self.controller_mem_coef >= 0, "controller_mem_coef", self.controller_mem_coef, "must be >= 0")
        check_positive(self, "prompts_per_step", "mini_batches")
        check(self.prompts_per_step * self.group_size % self.mini_batches == 0, "mini_batches", self.mini_batches,
              f"must divide the rollout batch prompts_per_step * group_size = {self.rollout_batch}")
        check(isinstance(self.eval_every, int) and self.eval_every >= 0, "eval_every", self.eval_every,
              "must be an integer >= 0")
        check(isinstance(self.train, TrainConfig), "train", self.train, "must be a TrainConfig")
        check(self.lora is None or isinstance(self.lora, LoRAConfig), "lora", self.lora, "must be a LoRAConfig or None")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RLConfig":
        """As ConfigBase.from_dict; a partial `train` mapping is completed from the RL defaults."""
        if isinstance(d, Mapping) and isinstance(d.get("train"), Mapping):
            d = dict(d, train={**default_rl_train_config().to_dict(), **d["train"]})
        return super().from_dict(d)

    @property
    def rollout_batch(self) -> int:
        """Sequences per rollout: prompts_per_step * group_size."""
        return self.prompts_per_step * self.group_size

    @property
    def resolved_norm_len(self) -> int:
        return self.max_new_tokens if self.norm_len is None else self.norm_len
