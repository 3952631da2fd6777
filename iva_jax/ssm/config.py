"""SSMConfig: one frozen config for every sequence mixer in iva_jax.ssm (the decoder passes hidden_size)."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from iva_jax.config import ConfigBase, check, check_choice, check_positive

MIXER_TYPES = ("mamba", "mamba2", "retnet", "rwkv", "hyena", "topk_attention")
SCAN_IMPLS = ("auto", "sequential", "associative", "chunked", "pallas")
RETENTION_FORMS = ("parallel", "chunkwise", "recurrent")


@dataclasses.dataclass(frozen=True)
class SSMConfig(ConfigBase):
    """Sequence-mixer hyper-parameters; field names follow mamba_ssm / HF MambaConfig where they exist."""

    type: str = "mamba"
    # Mamba / Mamba-2
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: Optional[int] = None  # Mamba: None -> ceil(hidden_size / 16) ("auto")
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init: str = "random"  # "random" | "constant" (dt_proj weight init, Mamba)
    dt_scale: float = 1.0
    dt_init_floor: float = 1e-4
    dt_limit_min: float = 0.0  # Mamba-2 clamps softplus(dt + dt_bias) to [min, max]
    dt_limit_max: Optional[float] = None  # None: no upper clamp
    A_init_min: float = 1.0  # Mamba-2: A = -uniform(A_init_min, A_init_max) per head
    A_init_max: float = 16.0
    conv_bias: bool = True
    proj_bias: bool = False  # in_proj / out_proj bias (HF use_bias)
    headdim: int = 64  # Mamba-2 head dim (P)
    ngroups: int = 1  # Mamba-2 B/C groups (Mamba: 1)
    chunk_size: int = 64  # Mamba-2 SSD chunk, RetNet chunkwise chunk, chunked scan chunk
    scan_impl: str = "auto"  # Mamba selective scan: auto | sequential | associative | chunked | pallas
    norm_eps: float = 1e-5
    # RetNet / top-k attention
    num_heads: int = 4
    value_factor: int = 2  # RetNet value dim = value_factor * hidden_size
    retention_form: str = "chunkwise"  # the form __call__ uses
    rope_theta: float = 10000.0
    k_top: int = 32
    # Hyena
    hyena_order: int = 2
    hyena_filter_dim: int = 64  # positional-feature / MLP width of the implicit filter
    hyena_short_conv: int = 3

    def validate(self) -> None:
        check_choice(self, "type", MIXER_TYPES)
        check_choice(self, "scan_impl", SCAN_IMPLS)
        check_choice(self, "retention_form", RETENTION_FORMS)
        check_choice(self, "dt_init", ("random", "constant"))
        ints = ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size", "num_heads", "value_factor",
                "k_top", "hyena_order", "hyena_filter_dim", "hyena_short_conv")
        for f in ints:
            v = getattr(self, f)
            check(isinstance(v, int) and not isinstance(v, bool) and v > 0, f, v, "must be a positive integer")
        check_positive(self, "dt_min", "dt_max", "dt_scale", "dt_init_floor", "norm_eps", "rope_theta",
                       "A_init_min", "A_init_max")
        check(self.dt_min <= self.dt_max, "dt_min", self.dt_min, f"must be <= dt_max={self.dt_max}")
        check(self.A_init_min <= self.A_init_max, "A_init_min", self.A_init_min,
              f"must be <= A_init_max={self.A_init_max}")
        check(self.dt_limit_min >= 0, "dt_limit_min", self.dt_limit_min, "must be >= 0")
        if self.dt_limit_max is not None:
            check(self.dt_limit_max > self.dt_limit_min, "dt_limit_max", self.dt_limit_max,
                  f"must exceed dt_limit_min={self.dt_limit_min}")
        if self.dt_rank is not None:
            check(isinstance(self.dt_rank, int) and self.dt_rank > 0, "dt_rank", self.dt_rank,
                  "must be a positive integer or None (auto)")
        check(self.hyena_short_conv >= 1, "hyena_short_conv", self.hyena_short_conv, "must be >= 1")

    # ---- derived sizes (the decoder's hidden_size is the only outside input) -------------------
    def d_inner(self, hidden_size: int) -> int:
        return self.expand * hidden_size

    def resolved_dt_rank(self, hidden_size: int) -> int:
        return self.dt_rank if self.dt_rank is not None else math.ceil(hidden_size / 16)

    def mamba2_heads(self, hidden_size: int) -> int:
        di = self.d_inner(hidden_size)
        if di % self.headdim:
            raise ValueError(f"mamba2: d_inner={di} (expand*hidden_size) is not divisible by headdim={self.headdim}")
        nh = di // self.headdim
        if nh % self.ngroups:
            raise ValueError(f"mamba2: {nh} heads are not divisible by ngroups={self.ngroups}")
        return nh

    def head_dim(self, hidden_size: int) -> int:
        """RetNet / top-k attention per-head key dim."""
        if hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={self.num_heads}")
        return hidden_size // self.num_heads
