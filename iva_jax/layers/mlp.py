"""SwiGLU feed-forward (HF LlamaMLP): down_proj(silu(gate_proj(x)) * up_proj(x))."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import kernels
from iva_jax.layers.linear import Linear, default_kernel_init, linear_apply


class MLP(nn.Module):
    hidden_size: int
    intermediate_size: int
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    impl: str = "auto"
    init_std: float = 0.02

    def setup(self) -> None:
        kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                  kernel_init=default_kernel_init(self.init_std))
        self.gate_proj = Linear(self.hidden_size, self.intermediate_size, ("embed", "mlp"), **kw)
        self.up_proj = Linear(self.hidden_size, self.intermediate_size, ("embed", "mlp"), **kw)
        self.down_proj = Linear(self.intermediate_size, self.hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = x.astype(self.dtype)
        wg, bg = self.gate_proj.weights()
        wu, bu = self.up_proj.weights()
        plain = not (hasattr(wg, "matmul") or hasattr(wu, "matmul"))
        if plain and bg is None and bu is None:
            h = kernels.swiglu(x, jnp.asarray(wg).astype(self.dtype), jnp.asarray(wu).astype(self.dtype),
                               impl=self.impl)
        else:  # biases or quantized weights: unfused XLA expression
            h = jax.nn.silu(linear_apply(x, wg, bg, self.dtype)) * linear_apply(x, wu, bu, self.dtype)
        return self.down_proj(h)
