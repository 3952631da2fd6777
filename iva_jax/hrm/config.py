"""HRM configuration: the model (`HRMConfig`) and its training run (`HRMTrainConfig`).

Field names follow sapientinc/HRM (`HierarchicalReasoningModel_ACTV1Config`, `cfg_pretrain.yaml`)
so a reference config reads across one to one.  Additions: `eval_mode` (adaptive halting at
evaluation), `arch` (the plain-transformer baseline), `mlp_multiple_of` (the reference rounds the
SwiGLU width up to a multiple of 256; tiny test models use less), `attn_impl`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence

import yaml

from iva_jax.config import ConfigBase, check, check_choice, check_positive, parse_overrides

_DTYPES = ("float32", "bfloat16", "float16")
MODEL_VARIANTS = ("hrm", "hrm_1cycle", "transformer")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class HRMConfig(ConfigBase):
    """HRM-ACT-v1 (sapientinc/HRM `hrm_act_v1.py`) plus the plain-transformer baseline (`arch`)."""

    batch_size: int = 32
    seq_len: int = 81
    vocab_size: int = 11
    num_puzzle_identifiers: int = 1
    puzzle_emb_ndim: int = 0  # 0 disables the puzzle embedding; the reference uses hidden_size

    H_cycles: int = 2
    L_cycles: int = 2
    H_layers: int = 4
    L_layers: int = 4

    hidden_size: int = 512
    expansion: float = 4.0
    num_heads: int = 8
    pos_encodings: str = "rope"  # "rope" | "learned"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    mlp_multiple_of: int = 256  # SwiGLU width = roundup(round(expansion * hidden * 2/3), this)

    halt_max_steps: int = 16
    halt_exploration_prob: float = 0.1
    eval_mode: str = "max_steps"  # "max_steps" (reference) | "adaptive" (halt on q_halt > q_continue)

    forward_dtype: str = "bfloat16"  # activations and carry; parameters stay float32
    loss_type: str = "stablemax"  # "stablemax" | "softmax"
    arch: str = "hrm"  # "hrm" | "transformer" (H_layers + L_layers blocks applied once, no recurrence)
    attn_impl: str = "xla"  # "xla" (plain jnp here) | "auto" | "triton" | "mosaic" (kernels.flash_attention)

    def validate(self) -> None:
        ints = ("batch_size", "seq_len", "vocab_size", "num_puzzle_identifiers", "H_cycles", "L_cycles",
                "H_layers", "L_layers", "hidden_size", "num_heads", "halt_max_steps", "mlp_multiple_of")
        for f in ints:
            check(_is_int(getattr(self, f)), f, getattr(self, f), "must be an integer")
        check_positive(self, *ints, "expansion", "rms_norm_eps", "rope_theta")
        check(_is_int(self.puzzle_emb_ndim) and self.puzzle_emb_ndim >= 0, "puzzle_emb_ndim",
              self.puzzle_emb_ndim, "must be a non-negative integer")
        check(self.hidden_size % self.num_heads == 0, "hidden_size", self.hidden_size,
              f"must be divisible by num_heads={self.num_heads}")
        check((self.hidden_size // self.num_heads) % 2 == 0, "num_heads", self.num_heads,
              f"gives an odd head_dim {self.hidden_size / self.num_heads} (RoPE needs it even)")
        check(0.0 <= self.halt_exploration_prob <= 1.0, "halt_exploration_prob",
              self.halt_exploration_prob, "must be in [0, 1]")
        check_choice(self, "pos_encodings", ("rope", "learned"))
        check_choice(self, "eval_mode", ("max_steps", "adaptive"))
        check_choice(self, "forward_dtype", _DTYPES)
        check_choice(self, "loss_type", ("stablemax", "softmax"))
        check_choice(self, "arch", ("hrm", "transformer"))
        check_choice(self, "attn_impl", ("xla", "auto", "triton", "mosaic"))
        check(self.arch != "transformer" or self.halt_max_steps == 1, "halt_max_steps", self.halt_max_steps,
              "must be 1 for arch='transformer' (it has no carry to ponder over)")

    def variant(self, name: str) -> "HRMConfig":
        """The study's models: "hrm" (self), "hrm_1cycle" (H_cycles = L_cycles = halt_max_steps = 1),
        "transformer" (the same H_layers + L_layers blocks applied once: same parameters, no recurrence)."""
        if name == "hrm":
            return self
        if name == "hrm_1cycle":
            return self.replace(H_cycles=1, L_cycles=1, halt_max_steps=1)
        if name == "transformer":
            return self.replace(arch="transformer", H_cycles=1, L_cycles=1, halt_max_steps=1)
        raise ValueError(f"model variant {name!r} must be one of {list(MODEL_VARIANTS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def puzzle_emb_len(self) -> int:
        """Positions the puzzle embedding occupies in front of the tokens (ceil(ndim / hidden))."""
        return -(-self.puzzle_emb_ndim // self.hidden_size)

    @property
    def total_len(self) -> int:
        return self.seq_len + self.puzzle_emb_len

    @property
    def intermediate_size(self) -> int:
        m = self.mlp_multiple_of
        return -(-round(self.expansion * self.hidden_size * 2 / 3) // m) * m

    def num_params(self) -> int:
        """Trainable parameter count (the sparse puzzle table and the fixed H_init/L_init excluded)."""
        d, f = self.hidden_size, self.intermediate_size
        block = 4 * d * d + 3 * d * f
        pos = self.total_len * d if self.pos_encodings == "learned" else 0
        return (self.H_layers + self.L_layers) * block + 2 * self.vocab_size * d + (2 * d + 2) + pos


@dataclasses.dataclass(frozen=True)
class HRMTrainConfig(ConfigBase):
    """A training run (sapientinc/HRM `cfg_pretrain.yaml` semantics; epochs -> steps, time budget)."""

    model: HRMConfig = dataclasses.field(default_factory=HRMConfig)
    data_path: str = "runs/data/sudoku6"  # directory holding train.npz / test.npz (see iva_jax.hrm.tasks)
    task: str = "sudoku"  # used when the data is generated on the fly: "sudoku" | "maze"
    task_size: int = 6  # sudoku side (4, 6, 9) or maze side
    num_train: int = 1000  # puzzles (solution grids) generated for training
    num_test: int = 200
    num_aug: int = 8  # augmented copies per training puzzle (the reference uses 1000 for 1k sudoku)
    min_givens: int = 0  # sudoku difficulty: stop removing clues at this many givens (0: minimal)
    data_seed: int = 0

    seed: int = 0
    total_steps: int = 1000
    time_budget_s: Optional[float] = None  # stop training after this many seconds (then evaluate)
    eval_interval: int = 250
    eval_batches: Optional[int] = None  # None: the whole test set
    log_interval: int = 25

    lr: float = 1e-4
    lr_min_ratio: float = 1.0
    lr_warmup_steps: int = 100
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    atan2_a: float = 1.0  # sapientinc adam-atan2 kernel: a = b = 1 (the paper's a is 1.27)
    atan2_b: float = 1.0
    puzzle_emb_lr: float = 1e-2
    puzzle_emb_weight_decay: float = 0.1
    stablemax_x64: bool = True  # enable jax x64 so stablemax runs in float64 like the reference

    checkpoint_dir: Optional[str] = None
    checkpoint_interval: int = 0  # steps between checkpoints (0: only at the end)

    def validate(self) -> None:
        for f in ("total_steps", "eval_interval", "log_interval", "num_train", "num_test", "task_size"):
            check(_is_int(getattr(self, f)) and getattr(self, f) > 0, f, getattr(self, f), "must be a positive integer")
        for f in ("num_aug", "min_givens", "lr_warmup_steps", "checkpoint_interval"):
            check(_is_int(getattr(self, f)) and getattr(self, f) >= 0, f, getattr(self, f), "must be >= 0")
        check_positive(self, "lr")
        check(0.0 <= self.lr_min_ratio <= 1.0, "lr_min_ratio", self.lr_min_ratio, "must be in [0, 1]")
        for f in ("beta1", "beta2"):
            check(0.0 <= getattr(self, f) < 1.0, f, getattr(self, f), "must be in [0, 1)")
        for f in ("weight_decay", "puzzle_emb_lr", "puzzle_emb_weight_decay"):
            check(getattr(self, f) >= 0, f, getattr(self, f), "must be >= 0")
        check_positive(self, "atan2_a", "atan2_b")
        check_choice(self, "task", ("sudoku", "maze"))
        if self.time_budget_s is not None:
            check(self.time_budget_s > 0, "time_budget_s", self.time_budget_s, "must be > 0 or None")
        if self.eval_batches is not None:
            check(_is_int(self.eval_batches) and self.eval_batches > 0, "eval_batches", self.eval_batches,
                  "must be a positive integer or None")


def load_train_config(path: str | Path, overrides: Sequence[str] = ()) -> HRMTrainConfig:
    """HRMTrainConfig from a YAML file (its phase-2 `controller` section ignored) plus `key=value`
    overrides (`model.hidden_size=128` edits the nested model config)."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    raw.pop("controller", None)
    for k, v in parse_overrides(list(overrides)).items():
        if isinstance(v, dict):
            raw.setdefault(k, {}).update(v)
        else:
            raw[k] = v
    return HRMTrainConfig.from_dict(raw)
