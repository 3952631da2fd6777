"""The lighter sequence mixers: RWKV-4 time mixing (token shift + WKV recurrence, with a recurrent step),
a Hyena operator (gated FFT long convolution with an implicit filter), and top-k sparse attention.

Every mixer maps x [B, L, H] -> [B, L, H].  RWKV also has `init_state` / `step` (O(1) memory decoding);
Hyena and top-k attention have no constant-size recurrent state (their `step` raises NotImplementedError).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from iva_jax.layers.linear import Linear
from iva_jax.ssm.common import DepthwiseCausalConv1d, param
from iva_jax.ssm.config import SSMConfig

# ---------------------------------------------------------------------------------------------
# RWKV-4 time mixing (HF RwkvSelfAttention parameter names)
# ---------------------------------------------------------------------------------------------
_NEG = -1e38  # the running max starts here (HF rwkv_linear_attention_cpu)


class RWKVState(NamedTuple):
    shift: jax.Array  # [B, H] the previous token's input (token shift)
    num: jax.Array  # [B, H] f32 numerator of the WKV average (scaled by exp(-max))
    den: jax.Array  # [B, H] f32 denominator
    max: jax.Array  # [B, H] f32 running log-scale


def wkv_step(state: RWKVState, k, v, w, u):
    """One WKV step (stable): out = (e^(u+k) v + sum_i e^(k_i - (t-1-i) w') v_i) / (same with v = 1)."""
    m = jnp.maximum(state.max, u + k)
    e1, e2 = jnp.exp(state.max - m), jnp.exp(u + k - m)
    out = (e1 * state.num + e2 * v) / (e1 * state.den + e2)
    m2 = jnp.maximum(state.max + w, k)
    e1, e2 = jnp.exp(state.max + w - m2), jnp.exp(k - m2)
    return out, state._replace(num=e1 * state.num + e2 * v, den=e1 * state.den + e2, max=m2)


class RWKVTimeMix(nn.Module):
    """RWKV-4 time mixing: token shift, key/value/receptance, WKV, sigmoid(r) gate, output projection."""

    config: SSMConfig
    hidden_size: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        hs = self.hidden_size
        i = np.arange(hs) / max(hs - 1, 1)
        r = 0.5  # HF's ratio_0_to_1 for a middle layer
        consts = {
            "time_decay": -5.0 + 8.0 * i ** (0.7 + 1.3 * r),
            "time_first": math.log(0.3) + 0.5 * ((np.arange(hs) + 1) % 3 - 1),
            "time_mix_key": (np.arange(hs) / hs) ** (1.0 - r),
            "time_mix_value": (np.arange(hs) / hs) ** (1.0 - r) + 0.3 * r,
            "time_mix_receptance": (np.arange(hs) / hs) ** (0.5 * (1.0 - r)),
        }
        for name, val in consts.items():
            init = lambda key, shape, dtype, val=val: jnp.asarray(val, dtype)
            setattr(self, name, param(self, name, init, (hs,), ("embed",), self.param_dtype))
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.key = Linear(hs, hs, axes=("embed", "mlp"), **kw)
        self.value = Linear(hs, hs, axes=("embed", "mlp"), **kw)
        self.receptance = Linear(hs, hs, axes=("embed", "mlp"), **kw)
        self.output = Linear(hs, hs, axes=("mlp", "embed"), **kw)

    def _kvr(self, x, shifted):
        mix = lambda m: x * m.astype(x.dtype) + shifted * (1 - m.astype(x.dtype))
        f32 = jnp.float32
        k = self.key(mix(self.time_mix_key)).astype(f32)
        v = self.value(mix(self.time_mix_value)).astype(f32)
        r = nn.sigmoid(self.receptance(mix(self.time_mix_receptance)).astype(f32))
        return k, v, r

    def _wu(self):
        return -jnp.exp(self.time_decay.astype(jnp.float32)), self.time_first.astype(jnp.float32)

    def __call__(self, x: jax.Array, *, mask: Optional[jax.Array] = None, state: Optional[RWKVState] = None,
                 return_state: bool = False):
        """y [B, L, H]; `state` continues from an earlier chunk (None: zeros); with return_state also the
        RWKVState.  Padded tokens (`mask` 0) leave the state as it is: the next real token shifts in the last
        real token and the WKV sums skip them (their outputs are garbage)."""
        if x.ndim != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"RWKVTimeMix expects [batch, seqlen, {self.hidden_size}], got shape {x.shape}")
        b, l, _ = x.shape
        x = x.astype(self.dtype)
        st = self.init_state(b) if state is None else state
        if mask is None:
            shifted = jnp.concatenate([st.shift[:, None].astype(self.dtype), x[:, :-1]], axis=1)
            last_x = x[:, -1]
            m = jnp.ones((l, b, 1), bool)
        else:
            if mask.shape != (b, l):
                raise ValueError(f"mask shape {mask.shape} != [batch, seqlen] {(b, l)}")
            real = mask.astype(bool)
            # the last real position <= t (-1: none yet; then the state's shift)
            last = lax.cummax(jnp.where(real, jnp.arange(l)[None], -1), axis=1)
            prev = jnp.concatenate([jnp.full((b, 1), -1, last.dtype), last[:, :-1]], axis=1)
            pick = lambda i: jnp.where((i >= 0)[..., None], jnp.take_along_axis(  # noqa: E731
                x, jnp.maximum(i, 0)[..., None], axis=1), st.shift[:, None].astype(self.dtype))
            shifted, last_x = pick(prev), pick(last[:, -1:])[:, 0]
            m = jnp.swapaxes(real, 0, 1)[..., None]
        k, v, r = self._kvr(x, shifted)
        w, u = self._wu()

        def body(s, kvm):
            out, s2 = wkv_step(s, kvm[0], kvm[1], w, u)
            return jax.tree_util.tree_map(lambda a, c: jnp.where(kvm[2], a, c), s2, s), out

        st, wkv = lax.scan(body, st, (jnp.swapaxes(k, 0, 1), jnp.swapaxes(v, 0, 1), m))
        y = self.output((r * jnp.swapaxes(wkv, 0, 1)).astype(self.dtype))
        return (y, st._replace(shift=last_x)) if return_state else y

    def init_state(self, batch: int) -> RWKVState:
        z = jnp.zeros((batch, self.hidden_size), jnp.float32)
        return RWKVState(shift=jnp.zeros((batch, self.hidden_size), self.dtype), num=z, den=z,
                         max=jnp.full((batch, self.hidden_size), _NEG, jnp.float32))

    def step(self, x_t: jax.Array, state: RWKVState):
        """One token: x_t [B, H] -> (y_t, new RWKVState); equals __call__ on the sequence."""
        if x_t.ndim != 2 or x_t.shape[-1] != self.hidden_size:
            raise ValueError(f"RWKVTimeMix.step expects [batch, {self.hidden_size}], got shape {x_t.shape}")
        x_t = x_t.astype(self.dtype)
        k, v, r = self._kvr(x_t, state.shift.astype(self.dtype))
        out, state = wkv_step(state, k, v, *self._wu())
        return self.output((r * out).astype(self.dtype)), state._replace(shift=x_t)


# ---------------------------------------------------------------------------------------------
# Hyena: gated FFT long convolution
# ---------------------------------------------------------------------------------------------
def fft_causal_conv(u: jax.Array, k: jax.Array, bias: Optional[jax.Array] = None) -> jax.Array:
    """Causal long convolution y_t = sum_{s<=t} k_s u_{t-s} (+ bias * u_t) via FFTs of length 2L.

    u [B, L, D]; k [Lk, D] with Lk <= L (shorter filters are zero-extended); bias [D].  f32 result.
    """
    if u.ndim != 3 or k.ndim != 2 or k.shape[1] != u.shape[2] or k.shape[0] > u.shape[1]:
        raise ValueError(f"fft_causal_conv expects u [B, L, D] and k [Lk <= L, D], got {u.shape} and {k.shape}")
    L = u.shape[1]
    n = 2 * L  # no wrap-around: the circular convolution of length 2L equals the linear one on [0, L)
    uf = jnp.fft.rfft(u.astype(jnp.float32), n=n, axis=1)
    kf = jnp.fft.rfft(k.astype(jnp.float32), n=n, axis=0)
    y = jnp.fft.irfft(uf * kf[None], n=n, axis=1)[:, :L]
    return y if bias is None else y + u.astype(jnp.float32) * bias.astype(jnp.float32)


class HyenaFilter(nn.Module):
    """Implicit long filter h_t = MLP(sin/cos features of t) * exp(-alpha t), per channel and order.

    Features use absolute positions (not t / L), so a prefix's outputs do not depend on the total length.
    """

    channels: int
    order: int
    width: int = 64
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, length: int) -> jax.Array:  # -> [order, length, channels] f32
        t = jnp.arange(length, dtype=jnp.float32)[:, None]
        half = max(self.width // 2, 1)
        freqs = jnp.asarray(1e-4 ** (np.arange(half) / half), jnp.float32)
        z = jnp.concatenate([jnp.cos(t * freqs), jnp.sin(t * freqs)], axis=-1)  # [L, 2 * half]
        h = z
        for i in range(2):
            h = nn.Dense(self.width, name=f"mlp_{i}", param_dtype=self.param_dtype)(h)
            freq = param(self, f"sin_freq_{i}", nn.initializers.ones, (self.width,), (None,), self.param_dtype)
            h = jnp.sin(freq * h)
        h = nn.Dense(self.order * self.channels, name="mlp_out", param_dtype=self.param_dtype)(h)
        h = h.reshape(length, self.order, self.channels)
        # decay rates spread between fast (1/8 per step) and slow (1/4096 per step), learnable
        rates = np.exp(np.linspace(np.log(1 / 8), np.log(1 / 4096), self.channels))
        log_rate = param(self, "log_decay", lambda k, s, d: jnp.broadcast_to(jnp.log(jnp.asarray(rates, d)), s),
                         (self.order, self.channels), (None, "mlp"), self.param_dtype)
        window = jnp.exp(-t[:, :, None] * jnp.exp(log_rate.astype(jnp.float32))[None])  # [L, order, C]
        return jnp.moveaxis(h * window, 1, 0)


class HyenaOperator(nn.Module):
    """Hyena of order N (Poli et al. 2023, def. 3.1): in_proj -> short causal conv -> (x_1..x_N, v);
    z = v; z <- x_i * (h_i conv z) for i = 1..N (FFT long convolutions, implicit filters h_i); out_proj(z)."""

    config: SSMConfig
    hidden_size: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, hs = self.config, self.hidden_size
        if x.ndim != 3 or x.shape[-1] != hs:
            raise ValueError(f"HyenaOperator expects [batch, seqlen, {hs}], got shape {x.shape}")
        n = c.hyena_order
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        u = Linear(hs, (n + 1) * hs, axes=("embed", "mlp"), name="in_proj", **kw)(x)
        u = DepthwiseCausalConv1d((n + 1) * hs, c.hyena_short_conv, name="short_filter", **kw)(u)
        *xs, v = jnp.split(u.astype(jnp.float32), n + 1, axis=-1)
        filt = HyenaFilter(hs, n, c.hyena_filter_dim, param_dtype=self.param_dtype, name="filter")(x.shape[1])
        bias = param(self, "filter_bias", nn.initializers.normal(1.0), (n, hs), (None, "mlp"), self.param_dtype)
        z = v
        for i in range(n):
            z = xs[i] * fft_causal_conv(z, filt[i], bias[i])
        return Linear(hs, hs, axes=("mlp", "embed"), name="out_proj", **kw)(z.astype(self.dtype))

    def init_state(self, batch: int):
        raise NotImplementedError("HyenaOperator has no constant-size recurrent state (a long convolution)")

    def step(self, x_t, state):
        raise NotImplementedError("HyenaOperator has no constant-size recurrent state (a long convolution)")


# ---------------------------------------------------------------------------------------------
# top-k sparse attention
# ---------------------------------------------------------------------------------------------
def topk_attention(q, k, v, k_top: int, *, causal: bool = True, scale: Optional[float] = None) -> jax.Array:
    """Softmax attention where each query keeps only its k_top highest-scoring (allowed) keys.

    q [B, Lq, H, d], k/v [B, Lk, H, d]; ties at the k-th score keep all tied keys.  k_top > Lk raises ValueError.
    """
    if q.ndim != 4 or k.ndim != 4 or v.shape[:3] != k.shape[:3] or q.shape[::2] != k.shape[::2]:
        raise ValueError(f"q, k, v must be [batch, seqlen, heads, dim], got {q.shape}, {k.shape}, {v.shape}")
    lk = k.shape[1]
    if not (isinstance(k_top, int) and 1 <= k_top <= lk):
        raise ValueError(f"k_top={k_top!r} must be an int in [1, seqlen={lk}]")
    f32 = jnp.float32
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(f32), k.astype(f32)) * scale
    if causal:
        lq = q.shape[1]
        allowed = jnp.arange(lk)[None, :] <= jnp.arange(lq)[:, None] + (lk - lq)
        s = jnp.where(allowed, s, -jnp.inf)
    kth = lax.top_k(s, k_top)[0][..., -1:]  # -inf when a row has fewer allowed keys: keeps them all
    s = jnp.where(s >= kth, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(f32)).astype(v.dtype)


class TopKAttention(nn.Module):
    """Causal multi-head attention through `topk_attention` (q_proj/k_proj/v_proj/o_proj, no positional code).
    Sequences shorter than config.k_top attend densely (k_top is clamped to the length)."""

    config: SSMConfig
    hidden_size: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, hs = self.config, self.hidden_size
        if x.ndim != 3 or x.shape[-1] != hs:
            raise ValueError(f"TopKAttention expects [batch, seqlen, {hs}], got shape {x.shape}")
        hd = c.head_dim(hs)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        heads = lambda name, ax: Linear(hs, hs, axes=("embed", ax), name=name, **kw)(x).reshape(
            x.shape[:2] + (c.num_heads, hd))
        q, k, v = heads("q_proj", "q_heads"), heads("k_proj", "kv_heads"), heads("v_proj", "kv_heads")
        o = topk_attention(q, k, v, min(c.k_top, x.shape[1]), causal=True)
        return Linear(hs, hs, axes=("q_heads", "embed"), name="o_proj", **kw)(o.reshape(x.shape))

    def init_state(self, batch: int):
        raise NotImplementedError("TopKAttention needs a KV cache, not a recurrent state")

    def step(self, x_t, state):
        raise NotImplementedError("TopKAttention needs a KV cache, not a recurrent state")
