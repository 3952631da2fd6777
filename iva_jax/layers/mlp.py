"""SwiGLU feed-forward (HF LlamaMLP): down_proj(silu(gate_proj(x)) * up_proj(x)).

`fused_gate_up=True` (the decode view, `Transformer.decode_view`) declares one `gate_up_proj` instead of
gate_proj / up_proj: kernel [D, 2F] = gate and up kernels concatenated on the output axis (gate first),
one matmul whose output is split, then the unfused path's arithmetic (`kernels.swiglu`'s XLA expression):
the same values up to the matmul's summation order.
"""

from __future__ import annotations

import importlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import kernels
from iva_jax.parallel.kernel_sharding import per_shard
from iva_jax.layers.linear import Linear, default_kernel_init, linear_apply


def swiglu_impl(impl: str, rows: int, hidden: int, intermediate: int, dtype: Any) -> str:
    """The implementation `kernels.swiglu` runs for [rows, hidden] x [hidden, intermediate] under `impl`."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)):
        return "xla"
    choose = importlib.import_module("kernels.swiglu").choose_impl  # the module (kernels.swiglu is the op)
    return choose(impl, max(1, rows), hidden, intermediate, dtype)


class MLP(nn.Module):
    hidden_size: int
    intermediate_size: int
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    impl: str = "auto"
    init_std: float = 0.02
    fused_gate_up: bool = False
    save_products: bool = False  # kernels.swiglu(save_products=...): keep gate/up products for the backward

    def setup(self) -> None:
        kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                  kernel_init=default_kernel_init(self.init_std))
        if self.fused_gate_up:
            self.gate_up_proj = Linear(self.hidden_size, 2 * self.intermediate_size, ("embed", "mlp"), **kw)
        else:
            self.gate_proj = Linear(self.hidden_size, self.intermediate_size, ("embed", "mlp"), **kw)
            self.up_proj = Linear(self.hidden_size, self.intermediate_size, ("embed", "mlp"), **kw)
        self.down_proj = Linear(self.intermediate_size, self.hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = x.astype(self.dtype)
        if self.fused_gate_up:
            return self.down_proj(self._fused(x))
        wg, bg = self.gate_proj.weights()
        wu, bu = self.up_proj.weights()
        plain = not (hasattr(wg, "matmul") or hasattr(wu, "matmul"))
        if plain and bg is None and bu is None:
            h = self._swiglu(x, jnp.asarray(wg).astype(self.dtype), jnp.asarray(wu).astype(self.dtype))
        else:  # biases or quantized weights: unfused XLA expression
            h = jax.nn.silu(linear_apply(x, wg, bg, self.dtype)) * linear_apply(x, wu, bu, self.dtype)
        return self.down_proj(h)

    def _swiglu(self, x: jnp.ndarray, wg: jnp.ndarray, wu: jnp.ndarray) -> jnp.ndarray:
        """kernels.swiglu, per shard under a mesh (token rows over the batch axes, FFN columns over mlp's)."""
        rows = ("batch",) + (None,) * (x.ndim - 1) if x.ndim >= 2 else (None,)
        cols = ("batch",) + (None,) * (x.ndim - 2) + ("mlp",) if x.ndim >= 2 else ("mlp",)
        return per_shard(lambda x, wg, wu: kernels.swiglu(x, wg, wu, impl=self.impl,
                                                          save_products=self.save_products), (x, wg, wu),
                         (rows, (None, "mlp"), (None, "mlp")), cols)

    def _fused(self, x: jnp.ndarray) -> jnp.ndarray:
        """silu(gate) * up from one [D, 2F] product, mirroring each branch of the unfused path."""
        w, b = self.gate_up_proj.weights()
        f = self.intermediate_size
        if b is not None or hasattr(w, "matmul"):  # the biased / quantized branch
            g, u = jnp.split(linear_apply(x, w, b, self.dtype), (f,), axis=-1)
            return jax.nn.silu(g) * u
        w = jnp.asarray(w).astype(self.dtype)
        rows = x.size // max(self.hidden_size, 1)
        if x.size == 0 or swiglu_impl(self.impl, rows, self.hidden_size, f, self.dtype) != "xla":
            return self._swiglu(x, w[:, :f], w[:, f:])  # a Pallas kernel takes them apart
        # kernels.swiglu's "xla" implementation on the concatenated weight
        prec = jax.lax.Precision.HIGHEST if jnp.dtype(self.dtype) == jnp.float32 else None
        g, u = jnp.split(jnp.dot(x.reshape(-1, x.shape[-1]), w, precision=prec), (f,), axis=-1)
        g, u = g.astype(jnp.float32), u.astype(jnp.float32)
        return (g * jax.nn.sigmoid(g) * u).astype(self.dtype).reshape(*x.shape[:-1], f)
