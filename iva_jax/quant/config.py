"""QuantConfig: weight precision, KV precision and paged-cache settings for inference (configs/quant_infer.yaml)."""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from iva_jax.config import ConfigBase, check, check_choice

PRECISIONS = ("bf16", "int8", "int4", "fp8")
KV_PRECISIONS = ("auto", "bfloat16", "float32", "float16", "fp8")
GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class QuantConfig(ConfigBase):
    """precision "bf16" leaves the weights alone (the model's own dtype); int8 / int4 are weight-only
    with group-wise scales; fp8 is e4m3 weights and inputs with delayed per-tensor scaling."""

    precision: str = "bf16"
    group_size: int = 128
    symmetric: Optional[bool] = None  # None: int8 symmetric, int4 asymmetric (min offset)
    modules: Tuple[str, ...] = DEFAULT_MODULES  # Linear names whose `kernel` is quantized
    scale_dtype: str = "float16"
    fp8_amax_history: int = 16
    allow_fp8_emulation: bool = False  # CPU tests only: fp8 numerics emulated by XLA
    kernel_impl: str = "auto"  # quant-matmul / decode-attention kernel choice
    # KV cache
    kv_precision: str = "auto"  # "auto" = the model's compute dtype
    paged_kv_cache: bool = True
    page_size: int = 16
    num_pages: Optional[int] = None  # None: enough for max_batch sequences of max_seq_len
    max_batch: int = 8
    max_seq_len: int = 2048
    n_sink: int = 0
    kv_window: Optional[int] = None  # set: bounded sink + sliding-window ring of n_sink + kv_window slots

    def validate(self) -> None:
        check_choice(self, "precision", PRECISIONS)
        check_choice(self, "group_size", GROUP_SIZES)
        check_choice(self, "scale_dtype", ("float16", "float32"))
        check_choice(self, "kv_precision", KV_PRECISIONS)
        check_choice(self, "kernel_impl", ("auto", "xla", "pallas", "triton"))
        mods = self.modules
        check(isinstance(mods, tuple) and len(mods) > 0 and all(isinstance(m, str) for m in mods), "modules", self.modules, "must be a non-empty list of Linear module names")
        for f in ("fp8_amax_history", "page_size", "max_batch", "max_seq_len"):
            v = getattr(self, f)
            check(isinstance(v, int) and not isinstance(v, bool) and v > 0, f, v, "must be a positive integer")
        check(self.num_pages is None or (isinstance(self.num_pages, int) and self.num_pages > 0), "num_pages",
              self.num_pages, "must be a positive integer or null")
        check(isinstance(self.n_sink, int) and self.n_sink >= 0, "n_sink", self.n_sink, "must be >= 0")
        check(self.kv_window is None or (isinstance(self.kv_window, int) and self.kv_window > 0), "kv_window",
              self.kv_window, "must be a positive integer or null")
        check(self.n_sink == 0 or self.kv_window is not None, "n_sink", self.n_sink, "sink tokens need a kv_window")
        check(self.kv_window is None or self.paged_kv_cache, "kv_window", self.kv_window,
              "the sink/window ring lives in the paged cache (paged_kv_cache: true)")
        check(self.kv_precision != "fp8" or self.paged_kv_cache, "kv_precision", self.kv_precision,
              "fp8 KV lives in the paged cache (paged_kv_cache: true)")

    @property
    def bits(self) -> Optional[int]:
        return {"int8": 8, "int4": 4}.get(self.precision)
