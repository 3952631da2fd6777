"""`TrainConfig`: one frozen, validated dataclass for a training run (YAML: configs/train_sft.yaml)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Type, TypeVar

import yaml

from iva_jax.config import ConfigBase, check, check_choice, check_positive, parse_overrides
from iva_jax.layers.remat import REMAT_POLICIES
from iva_jax.parallel.mesh import MeshConfig

OPTIMIZERS = ("adamw", "adam_atan2", "lion")
SCHEDULES = ("cosine", "constant", "linear")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class DataConfig(ConfigBase):
    """Where packed training/eval batches come from (`iva_jax.train.data.PackedBatches`).

    Empty `paths` means the embedded corpus (`iva_jax/data/corpus.txt`).  JSONL records use
    `text_key`, or `prompt_key` + `completion_key` (loss on the completion only when
    `completion_only_loss`).  `eval_fraction` holds out that share of documents of `paths`
    when `eval_paths` is empty.
    """

    paths: Tuple[str, ...] = ()
    eval_paths: Tuple[str, ...] = ()
    eval_fraction: float = 0.05
    text_key: str = "text"
    prompt_key: str = "prompt"
    completion_key: str = "completion"
    completion_only_loss: bool = True
    add_bos: bool = False
    add_eos: bool = True
    shuffle_files: bool = True

    def validate(self) -> None:
        check(0.0 <= self.eval_fraction < 1.0, "data.eval_fraction", self.eval_fraction, "must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class TrainConfig(ConfigBase):
    """Optimizer, schedule, loss, precision, checkpoint, eval and telemetry settings of a run."""

    # run shape
    seed: int = 0
    steps: int = 1000
    batch_size: int = 8  # global sequences per optimizer step
    seq_len: int = 512
    microbatches: int = 1  # gradient accumulation: batch_size is split into this many scanned chunks
    log_every: int = 10
    # optimizer
    optimizer: str = "adamw"  # adamw | adam_atan2 | lion
    lr: float = 3e-4
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    no_decay_regex: Optional[str] = "bias|norm|scale"  # params whose path matches get no weight decay
    grad_clip_norm: Optional[float] = 1.0  # None disables clipping
    # schedule: linear warmup from 0, then cosine (with restarts) / constant / linear to min_lr_ratio * lr
    schedule: str = "cosine"
    warmup_steps: Optional[int] = None
    warmup_pct: Optional[float] = None  # fraction of `steps`; give at most one of the two
    min_lr_ratio: float = 0.1
    cosine_cycles: int = 1  # > 1: cosine with warm restarts, equal cycles after warmup
    restart_decay: float = 1.0  # peak multiplier applied at each restart
    # gradient health and adaptive LR (optax pieces in optim.py)
    health_ema: float = 0.98  # EMA decay of grad norm and loss
    spike_threshold: float = 4.0  # grad-norm ratio to its EMA / loss z-score that counts as a spike
    spike_warmup: int = 20  # updates before spikes are reported
    plateau_factor: float = 1.0  # < 1 enables reduce-on-plateau: LR *= factor after `plateau_patience`
    plateau_patience: int = 10  # (in accumulated windows of `plateau_accumulation` steps)
    plateau_accumulation: int = 10
    plateau_rtol: float = 1e-4
    plateau_cooldown: int = 0
    # loss
    z_loss_coef: float = 0.0
    label_smoothing: float = 0.0
    aux_loss_coef: float = 1.0  # multiplies everything the model sows into the "losses" collection
    mtp_heads: int = 0  # extra multi-token-prediction heads the model returns (0 = none)
    mtp_loss_coef: float = 0.3
    # precision and memory
    compute_dtype: str = "bfloat16"  # params are cast to this for the forward pass
    param_dtype: str = "float32"  # master weights and optimizer state
    remat: Optional[str] = None  # iva_jax.layers.remat.REMAT_POLICIES; overrides the model config's when set
    # checkpoints
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 1000
    keep: int = 3  # latest checkpoints kept
    keep_best: int = 0  # additionally keep this many best by `best_metric` (0 = off)
    best_metric: str = "eval_loss"
    best_mode: str = "min"
    async_checkpoint: bool = True
    # evaluation
    eval_every: int = 0  # 0 = only at the end; -1 = never
    eval_batches: int = 8
    gen_samples: int = 4  # prompts generated for distinct-2 / repetition rate
    gen_max_new_tokens: int = 64
    # telemetry
    telemetry_path: Optional[str] = None  # JSONL; None = no file
    tensorboard_dir: Optional[str] = None  # written only if tensorboard(X) is installed
    # placement and data
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)

    def validate(self) -> None:
        check_positive(self, "steps", "batch_size", "seq_len", "microbatches", "log_every", "lr", "eps",
                       "checkpoint_every", "keep", "eval_batches", "plateau_patience", "plateau_accumulation")
        for f in ("seed", "steps", "batch_size", "seq_len", "microbatches", "cosine_cycles", "mtp_heads",
                  "keep", "keep_best", "eval_every", "spike_warmup"):
            v = getattr(self, f)
            check(isinstance(v, int) and not isinstance(v, bool), f, v, "must be an integer")
        check(self.batch_size % self.microbatches == 0, "microbatches", self.microbatches,
              f"must divide batch_size={self.batch_size}")
        check_choice(self, "optimizer", OPTIMIZERS)
        check_choice(self, "schedule", SCHEDULES)
        check(0.0 <= self.b1 < 1.0, "b1", self.b1, "must be in [0, 1)")
        check(0.0 <= self.b2 < 1.0, "b2", self.b2, "must be in [0, 1)")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        if self.grad_clip_norm is not None:
            check(self.grad_clip_norm > 0, "grad_clip_norm", self.grad_clip_norm, "must be > 0 or None")
        check(self.warmup_steps is None or self.warmup_pct is None, "warmup_pct", self.warmup_pct,
              f"give warmup_steps ({self.warmup_steps}) or warmup_pct, not both")
        if self.warmup_steps is not None:
            check(isinstance(self.warmup_steps, int) and 0 <= self.warmup_steps < self.steps, "warmup_steps",
                  self.warmup_steps, f"must be an integer in [0, steps={self.steps})")
        if self.warmup_pct is not None:
            check(0.0 <= self.warmup_pct < 1.0, "warmup_pct", self.warmup_pct, "must be in [0, 1)")
        check(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        check(self.cosine_cycles >= 1, "cosine_cycles", self.cosine_cycles, "must be >= 1")
        check(0.0 < self.restart_decay <= 1.0, "restart_decay", self.restart_decay, "must be in (0, 1]")
        check(0.0 < self.health_ema < 1.0, "health_ema", self.health_ema, "must be in (0, 1)")
        check(self.spike_threshold > 1.0, "spike_threshold", self.spike_threshold, "must be > 1")
        check(0.0 < self.plateau_factor <= 1.0, "plateau_factor", self.plateau_factor, "must be in (0, 1]")
        check(self.z_loss_coef >= 0, "z_loss_coef", self.z_loss_coef, "must be >= 0")
        check(0.0 <= self.label_smoothing < 1.0, "label_smoothing", self.label_smoothing, "must be in [0, 1)")
        check(self.mtp_heads >= 0, "mtp_heads", self.mtp_heads, "must be >= 0")
        check_choice(self, "compute_dtype", DTYPES)
        check_choice(self, "param_dtype", ("float32", "bfloat16"))
        if self.remat is not None:
            check_choice(self, "remat", REMAT_POLICIES)
        check_choice(self, "best_mode", ("min", "max"))
        check(isinstance(self.mesh, MeshConfig), "mesh", self.mesh, "must be a MeshConfig (from_dict builds it from a dict)")
        check(isinstance(self.data, DataConfig), "data", self.data, "must be a DataConfig (from_dict builds it from a dict)")
        check(self.keep_best >= 0, "keep_best", self.keep_best, "must be >= 0")
        check(self.eval_every >= -1, "eval_every", self.eval_every, "must be >= 0, or -1 for no evaluation")

    @property
    def resolved_warmup_steps(self) -> int:
        """Warmup length in optimizer steps (from warmup_steps, or round(warmup_pct * steps), else 0)."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        if self.warmup_pct is not None:
            return int(round(self.warmup_pct * self.steps))
        return 0

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


C = TypeVar("C", bound=ConfigBase)


def merge_nested(base: Dict[str, Any], changes: Dict[str, Any]) -> Dict[str, Any]:
    """`base` updated by `changes`, recursing into nested dicts (a None or absent section becomes the dict)."""
    out = dict(base)
    for k, v in changes.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_nested(out[k], v)
        else:
            out[k] = v
    return out


def load_config(cls: Type[C], path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> C:
    """`cls` from a YAML file (or defaults when `path` is None) plus `key=value` CLI overrides.

    Dotted keys edit nested sections (`mesh.fsdp=2`, `lora.rank=16`; a `null` section is created);
    unknown keys raise ValueError listing the valid ones.
    """
    raw: Dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"config file not found: {p}")
        raw = yaml.safe_load(p.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{p}: expected a mapping at the top level, got {type(raw).__name__}")
    return cls.from_dict(merge_nested(raw, _numbers(parse_overrides(list(overrides)))))


_SCI = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _numbers(tree: Any) -> Any:
    """YAML 1.1 reads `1e-3` (no dot) as a string; on the command line it means the float."""
    if isinstance(tree, dict):
        return {k: _numbers(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_numbers(v) for v in tree]
    return float(tree) if isinstance(tree, str) and _SCI.match(tree) else tree
