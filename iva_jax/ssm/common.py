"""Pieces shared by the mixers: the causal depthwise conv (parallel and one-token step) and dt/A inits."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from kernels.selective_scan import softplus  # noqa: F401  (the one softplus every mixer uses)


def uniform_init(bound: float):
    """U(-bound, bound): PyTorch's default init for conv / linear weights (bound = 1/sqrt(fan_in))."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

    return init


def dt_bias_init(dt_min: float, dt_max: float, floor: float):
    """mamba_ssm's dt bias: softplus^-1 of dt ~ log-uniform[dt_min, dt_max] (clamped below at floor)."""

    def init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape, jnp.float32)
        dt = jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)), floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)  # inverse of softplus

    return init


def param(module: nn.Module, name: str, init, shape: Tuple[int, ...], axes: Sequence[Optional[str]], dtype: Any):
    """A parameter with logical-axis names (iva_jax.parallel.rules)."""
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), shape, dtype)


class DepthwiseCausalConv1d(nn.Module):
    """HF `nn.Conv1d(C, C, width, groups=C, padding=width-1)(x)[..., :L]` on channels-last x [B, L, C].

    Parameters `kernel` [width, 1, C] (flax Conv layout; HF weight [C, 1, width] transposed) and `bias` [C].
    The recurrent state is the previous width-1 inputs, [B, width-1, C].
    """

    channels: int
    width: int
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    axis: Optional[str] = "mlp"

    def setup(self) -> None:
        bound = 1.0 / math.sqrt(self.width)  # fan_in of a depthwise conv = width
        self.kernel = param(self, "kernel", uniform_init(bound), (self.width, 1, self.channels),
                            (None, None, self.axis), self.param_dtype)
        if self.use_bias:
            self.bias = param(self, "bias", uniform_init(bound), (self.channels,), (self.axis,), self.param_dtype)

    def _weights(self):
        w = self.kernel[:, 0, :].astype(self.dtype)
        return w, (self.bias.astype(self.dtype) if self.use_bias else None)

    def __call__(self, x: jax.Array, state: Optional[jax.Array] = None) -> jax.Array:
        """y [B, L, C]; `state` [B, width-1, C] holds the inputs before x (zeros if None)."""
        if x.ndim != 3 or x.shape[-1] != self.channels:
            raise ValueError(f"conv1d expects [batch, seqlen, {self.channels}], got shape {x.shape}")
        w, b = self._weights()
        k, L = self.width, x.shape[1]
        prev = jnp.zeros((x.shape[0], k - 1, self.channels), self.dtype) if state is None else state.astype(self.dtype)
        xp = jnp.concatenate([prev, x.astype(self.dtype)], axis=1)
        y = sum(xp[:, i:i + L] * w[i] for i in range(k))
        return y if b is None else y + b

    def step(self, x_t: jax.Array, state: jax.Array) -> Tuple[jax.Array, jax.Array]:
        """One token: x_t [B, C], state [B, width-1, C] -> (y_t [B, C], new state)."""
        w, b = self._weights()
        window = jnp.concatenate([state.astype(self.dtype), x_t[:, None].astype(self.dtype)], axis=1)
        y = jnp.einsum("bkc,kc->bc", window, w)
        return (y if b is None else y + b), window[:, 1:].astype(state.dtype)

    def tail(self, x: jax.Array, state: Optional[jax.Array] = None) -> jax.Array:
        """The state after consuming x: the last width-1 inputs (zero-padded on the left)."""
        k = self.width
        prev = jnp.zeros((x.shape[0], k - 1, self.channels), x.dtype) if state is None else state.astype(x.dtype)
        return jnp.concatenate([prev, x], axis=1)[:, x.shape[1]:]

    def init_state(self, batch: int, dtype: Any = None) -> jax.Array:
        return jnp.zeros((batch, self.width - 1, self.channels), dtype or self.dtype)


def apply_mask(x: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
    """Zero padded positions (mask [B, L], 1 = real token), as HF's apply_mask_to_padding_states."""
    if mask is None:
        return x
    if mask.shape != x.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} != [batch, seqlen] {x.shape[:2]}")
    return (x * mask[:, :, None].astype(x.dtype)).astype(x.dtype)
