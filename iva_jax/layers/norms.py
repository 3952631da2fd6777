"""RMSNorm (HF LlamaRMSNorm semantics) through the kernels dispatcher."""

from __future__ import annotations

from typing import Any, Tuple

import flax.linen as nn
import jax.numpy as jnp

import kernels
from iva_jax.parallel.kernel_sharding import per_shard


def _rows(x) -> tuple:
    """Logical axes of an activation whose rows are independent: the leading dim is the batch (1-D: none)."""
    return ("batch",) + (None,) * (x.ndim - 1) if x.ndim >= 2 else (None,) * x.ndim


class RMSNorm(nn.Module):
    """weight * normalize(x) with f32 statistics; parameter `scale` (HF `weight`)."""

    dim: int
    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    impl: str = "auto"
    axis_name: str = "norm"

    def setup(self) -> None:
        self.scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                                (self.dim,), self.param_dtype)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        rows = _rows(x)
        return per_shard(lambda x, w: kernels.rms_norm(x, w, eps=self.eps, impl=self.impl),
                         (x.astype(self.dtype), self.scale.astype(self.dtype)), (rows, None), rows)

    def residual(self, x: jnp.ndarray, residual: jnp.ndarray) -> Tuple[jnp.ndarray, jnp.ndarray]:
        """(norm(x + residual), x + residual), fused where the kernel allows."""
        rows = _rows(x)
        return per_shard(lambda x, r, w: kernels.rms_norm_residual(x, r, w, eps=self.eps, impl=self.impl),
                         (x.astype(self.dtype), residual.astype(self.dtype), self.scale.astype(self.dtype)),
                         (rows, rows, None), [rows, rows])
