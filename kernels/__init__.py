"""Pallas GPU kernels with pure-XLA references and one dispatcher.  Imports nothing of iva_jax."""

from kernels.flash_attention import flash_attention, flash_attention_with_lse  # noqa: F401
from kernels.rms_norm import rms_norm, rms_norm_residual  # noqa: F401
from kernels.swiglu import swiglu  # noqa: F401
