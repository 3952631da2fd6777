"""RMSNorm (HF LlamaRMSNorm semantics) through the kernels dispatcher."""

from __future__ import annotations

from typing import Any, Tuple

import flax.linen as nn
import jax.numpy as jnp

import kernels


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
        return kernels.rms_norm(x.astype(self.dtype), self.scale.astype(self.dtype), eps=self.eps,
                                impl=self.impl)

    def residual(self, x: jnp.ndarray, residual: jnp.ndarray) -> Tuple[jnp.ndarray, jnp.ndarray]:
        """(norm(x + residual), x + residual), fused where the kernel allows."""
        return kernels.rms_norm_residual(x.astype(self.dtype), residual.astype(self.dtype),
                                         self.scale.astype(self.dtype), eps=self.eps, impl=self.impl)
