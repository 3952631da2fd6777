"""Dense projections whose parameters mirror HF `nn.Linear` (as a Flax `kernel` [in, out] plus `bias`).

`Linear` declares the parameters with logical-axis names and applies them; its `weights()` method
returns (kernel, bias) in the compute dtype so fused kernels (SwiGLU) can consume them directly.
Quantized weights (iva_jax.quant) replace `kernel` by a quantized leaf that `linear_apply` understands.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp

Initializer = Callable[..., Any]


def default_kernel_init(stddev: float = 0.02) -> Initializer:
    return nn.initializers.normal(stddev)


class Linear(nn.Module):
    """y = x @ kernel (+ bias); kernel [in_features, features] with logical axes `axes`."""

    in_features: int
    features: int
    axes: Tuple[str, str]
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = default_kernel_init()

    def setup(self) -> None:
        self.kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
                                 (self.in_features, self.features), self.param_dtype)
        if self.use_bias:
            self.bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axes[1],)),
                                   (self.features,), self.param_dtype)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.name}: input last dim {x.shape[-1]} != in_features {self.in_features}")
        return linear_apply(x, self.kernel, self.bias if self.use_bias else None, self.dtype)

    def weights(self) -> Tuple[Any, Optional[jnp.ndarray]]:
        """(kernel, bias-or-None) as stored (call `.astype` yourself for plain arrays)."""
        return self.kernel, (self.bias if self.use_bias else None)


def linear_apply(x: jnp.ndarray, kernel: Any, bias: Optional[jnp.ndarray], dtype: Any) -> jnp.ndarray:
    """x @ kernel + bias in `dtype`; `kernel` may be a plain array or a quantized weight object."""
    if hasattr(kernel, "matmul"):  # quantized weight (iva_jax.quant) knows how to multiply itself
        y = kernel.matmul(x, dtype)
    else:
        y = jnp.dot(x.astype(dtype), jnp.asarray(kernel).astype(dtype))
    if bias is not None:
        y = y + bias.astype(dtype)
    return y
