"""Pallas GPU kernels with pure-XLA references and one dispatcher.  Imports nothing of iva_jax.

The public ops are re-exported here as functions (`from kernels import rms_norm` is the function).  A function
named like its module shadows the module attribute, so reach a module with
`importlib.import_module("kernels.<op>")` (or `from kernels.<op> import name`).
"""

from kernels.flash_attention import flash_attention, flash_attention_with_lse  # noqa: F401
from kernels.grouped_matmul import grouped_matmul  # noqa: F401
from kernels.rms_norm import rms_norm, rms_norm_residual  # noqa: F401
from kernels.selective_scan import selective_scan  # noqa: F401
from kernels.swiglu import swiglu  # noqa: F401
