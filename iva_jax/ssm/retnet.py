"""RetNet multi-scale retention (Sun et al. 2023): parallel, recurrent and chunkwise forms of one operator.

    o_n = sum_{m<=n} gamma_h^(n-m) (q_n . k_m) v_m        gamma_h = 1 - 2^(-5-h)
with q, k rotated by position (rotary; with the decay this is the paper's xPos-like relative encoding),
k scaled by dk^-1/2.  Recurrent: S_n = gamma S_{n-1} + k_n^T v_n, o_n = q_n S_n.  Chunkwise (chunk Q):
parallel inside a chunk, S carried across chunks.  The block: out_proj(swish(g_proj x) * GroupNorm_h(o)),
parameter names as torchscale (q_proj, k_proj, v_proj, g_proj, out_proj, group_norm).  torchscale's extra
rescalings (decay-row and |qk| normalizers) cancel in the per-head GroupNorm and are left out, so the three
forms are the same function exactly, not just approximately.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from iva_jax.layers.linear import Linear
from iva_jax.ssm.common import apply_mask, param
from iva_jax.ssm.config import SSMConfig


def retnet_log_gammas(num_heads: int) -> jnp.ndarray:
    """log(1 - 2^(-5-h)) for h = 0..num_heads-1 (f32)."""
    return jnp.asarray(np.log1p(-(2.0 ** (-5.0 - np.arange(num_heads)))), jnp.float32)


def _check(q, k, v, log_gamma):
    if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k must be equal [batch, heads, seqlen, dk] and v [batch, heads, seqlen, dv], "
                         f"got {q.shape}, {k.shape}, {v.shape}")
    if log_gamma.shape != (q.shape[1],):
        raise ValueError(f"log_gamma must be [heads={q.shape[1]}], got shape {log_gamma.shape}")


def retention_parallel(q, k, v, log_gamma):
    """(Q K^T * D) V with D[n, m] = gamma^(n-m) for n >= m; O(L^2).  q, k [b, h, l, dk], v [b, h, l, dv]."""
    _check(q, k, v, log_gamma)
    f32 = jnp.float32
    n = jnp.arange(q.shape[2])
    dist = (n[:, None] - n[None, :]).astype(f32)
    decay = jnp.exp(jnp.where(dist >= 0, dist[None] * log_gamma[:, None, None], -jnp.inf))  # [h, l, l]
    s = jnp.einsum("bhnd,bhmd->bhnm", q.astype(f32), k.astype(f32)) * decay
    return jnp.einsum("bhnm,bhme->bhne", s, v.astype(f32))


def retention_recurrent(q, k, v, log_gamma, state=None):
    """`lax.scan` of S = gamma S + k^T v, o = q S; returns (o [b, h, l, dv], S [b, h, dk, dv])."""
    _check(q, k, v, log_gamma)
    f32 = jnp.float32
    b, h, _, dk = q.shape
    s0 = jnp.zeros((b, h, dk, v.shape[-1]), f32) if state is None else state.astype(f32)
    g = jnp.exp(log_gamma)[None, :, None, None]

    def step(s, qkv):
        qt, kt, vt = qkv
        s = g * s + kt[..., :, None] * vt[..., None, :]
        return s, jnp.einsum("bhd,bhde->bhe", qt, s)

    tm = lambda a: jnp.moveaxis(a.astype(f32), 2, 0)
    s, o = lax.scan(step, s0, (tm(q), tm(k), tm(v)))
    return jnp.moveaxis(o, 0, 2), s


def retention_chunkwise(q, k, v, log_gamma, chunk_size: int, state=None):
    """Chunkwise recurrent retention; same contract as `retention_recurrent`, O(L * chunk)."""
    _check(q, k, v, log_gamma)
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int")
    f32 = jnp.float32
    b, h, l, dk = q.shape
    dv = v.shape[-1]
    Q = min(chunk_size, l)
    nc = -(-l // Q)
    pad = nc * Q - l  # padded at the end with q = k = v = 0 (their outputs are dropped; see the state fix below)

    def chunks(a):  # [b, h, l, d] -> [nc, b, h, Q, d], padded at the end
        a = jnp.pad(a.astype(f32), [(0, 0), (0, 0), (0, pad), (0, 0)]) if pad else a.astype(f32)
        return jnp.moveaxis(a.reshape(b, h, nc, Q, a.shape[-1]), 2, 0)

    j = jnp.arange(Q, dtype=f32)
    lg = log_gamma.astype(f32)[:, None]
    dist = j[:, None] - j[None, :]
    inner_decay = jnp.exp(jnp.where(dist >= 0, dist[None] * lg[..., None], -jnp.inf))  # [h, Q, Q]
    xi = jnp.exp((j + 1)[None] * lg)[:, :, None]  # gamma^(j+1): decay from the chunk start to position j
    zeta = jnp.exp((Q - 1 - j)[None] * lg)[:, :, None]  # gamma^(Q-1-j): from j to the chunk end
    gQ = jnp.exp(Q * lg)[:, :, None]  # [h, 1, 1]

    def body(s, qkv):
        qc, kc, vc = qkv
        o = jnp.einsum("bhnm,bhme->bhne", jnp.einsum("bhnd,bhmd->bhnm", qc, kc) * inner_decay, vc)
        o = o + jnp.einsum("bhnd,bhde->bhne", qc * xi, s)
        s = gQ * s + jnp.einsum("bhmd,bhme->bhde", kc, vc * zeta)
        return s, o

    s0 = jnp.zeros((b, h, dk, dv), f32) if state is None else state.astype(f32)
    s, o = lax.scan(body, s0, (chunks(q), chunks(k), chunks(v)))
    o = jnp.moveaxis(o, 0, 2).reshape(b, h, nc * Q, dv)[:, :, :l]
    if pad:  # the padded tail steps decayed s by gamma^pad with no input: undo exactly
        s = s * jnp.exp(-pad * log_gamma.astype(f32))[None, :, None, None]
    return o, s


def rotary(x, pos, theta: float):
    """torchscale RetNet rotation of interleaved pairs: angle_i = theta^-(i/(d/2-1)), i < d/2.  x [..., l, d]."""
    d = x.shape[-1]
    half = d // 2
    inv = theta ** -(np.linspace(0.0, 1.0, half) if half > 1 else np.zeros(1))
    ang = pos.astype(jnp.float32)[..., None] * jnp.asarray(inv, jnp.float32)  # [..., l, half]
    cos, sin = jnp.repeat(jnp.cos(ang), 2, -1), jnp.repeat(jnp.sin(ang), 2, -1)
    x1, x2 = x[..., ::2], x[..., 1::2]
    rot = jnp.stack([-x2, x1], axis=-1).reshape(x.shape)  # (x0, x1) -> (-x1, x0)
    return x * cos + rot * sin


class GroupNorm(nn.Module):
    """GroupNorm with one group per head (f32 statistics), affine `scale` and `bias` over all value channels."""

    heads: int
    dim: int
    eps: float = 1e-5
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, o):  # o [B, heads, L, dv] -> [B, L, heads * dv] f32
        scale = param(self, "scale", nn.initializers.ones, (self.dim,), ("norm",), self.param_dtype)
        bias = param(self, "bias", nn.initializers.zeros, (self.dim,), ("norm",), self.param_dtype)
        o = o.astype(jnp.float32)
        mu = jnp.mean(o, -1, keepdims=True)
        o = (o - mu) * lax.rsqrt(jnp.mean(jnp.square(o - mu), -1, keepdims=True) + self.eps)
        b, _, l, _ = o.shape
        o = jnp.swapaxes(o, 1, 2).reshape(b, l, self.dim)
        return o * scale.astype(jnp.float32) + bias.astype(jnp.float32)


class RetNetState(NamedTuple):
    S: jax.Array  # [B, heads, dk, dv] f32
    pos: jax.Array  # [] int32: tokens consumed (rotary phase; retention only sees relative positions)


class MultiScaleRetention(nn.Module):
    """RetNet retention as a sequence mixer: __call__(x [B, L, H]) -> [B, L, H]; init_state / step."""

    config: SSMConfig
    hidden_size: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        c, hs = self.config, self.hidden_size
        self.heads, self.dk = c.num_heads, c.head_dim(hs)
        self.vdim = c.value_factor * hs
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.q_proj = Linear(hs, hs, axes=("embed", "q_heads"), **kw)
        self.k_proj = Linear(hs, hs, axes=("embed", "kv_heads"), **kw)
        self.v_proj = Linear(hs, self.vdim, axes=("embed", "kv_heads"), **kw)
        self.g_proj = Linear(hs, self.vdim, axes=("embed", "mlp"), **kw)
        self.out_proj = Linear(self.vdim, hs, axes=("q_heads", "embed"), **kw)
        self.group_norm = GroupNorm(self.heads, self.vdim, eps=c.norm_eps, param_dtype=self.param_dtype)
        self.log_gamma = retnet_log_gammas(self.heads)

    def _qkv(self, x, pos, mask=None):
        """q, k (rotated, k scaled), v as [B, heads, L, d]; pos [L] int."""
        b, l, _ = x.shape
        split = lambda a, d: jnp.swapaxes(a.reshape(b, l, self.heads, d), 1, 2).astype(jnp.float32)
        q = rotary(split(self.q_proj(x), self.dk), pos, self.config.rope_theta)
        k = rotary(split(self.k_proj(x), self.dk), pos, self.config.rope_theta) * self.dk ** -0.5
        v = split(self.v_proj(x), self.vdim // self.heads)
        if mask is not None:  # padded tokens write nothing into the state
            m = mask.astype(jnp.float32)[:, None, :, None]
            k, v = k * m, v * m
        return q, k, v

    def _out(self, x, o):
        """GroupNorm per head (f32) -> swish(g_proj x) gate -> out_proj.  o [B, heads, L, dv]."""
        o = self.group_norm(o)
        gate = nn.silu(self.g_proj(x).astype(jnp.float32))
        return self.out_proj((gate * o).astype(self.dtype))

    def __call__(self, x: jax.Array, *, mask: Optional[jax.Array] = None, form: Optional[str] = None,
                 state: Optional[RetNetState] = None, return_state: bool = False):
        """y [B, L, H] using `form` (default config.retention_form); `state` continues from an earlier chunk
        (None: zeros); with return_state also the RetNetState."""
        if x.ndim != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"MultiScaleRetention expects [batch, seqlen, {self.hidden_size}], got shape {x.shape}")
        form = form or self.config.retention_form
        x = apply_mask(x, mask)
        l = x.shape[1]
        pos0 = jnp.zeros((), jnp.int32) if state is None else state.pos
        s0 = None if state is None else state.S
        q, k, v = self._qkv(x, pos0 + jnp.arange(l), mask)
        if form == "parallel":
            o = retention_parallel(q, k, v, self.log_gamma)
            s = None
            n = jnp.arange(l)
            if s0 is not None:  # o_n += gamma^(n+1) q_n S_0
                xi = jnp.exp((n + 1)[None, :, None] * self.log_gamma[:, None, None])  # [h, l, 1]
                o = o + jnp.einsum("bhnd,bhde->bhne", q * xi, s0.astype(jnp.float32))
            if return_state:  # S_L = gamma^L S_0 + sum_m gamma^(L-1-m) k_m^T v_m
                w = jnp.exp((l - 1 - n)[None, :] * self.log_gamma[:, None])[None, :, :, None]
                s = jnp.einsum("bhmd,bhme->bhde", k * w, v)
                if s0 is not None:
                    s = s + jnp.exp(l * self.log_gamma)[None, :, None, None] * s0.astype(jnp.float32)
        elif form == "recurrent":
            o, s = retention_recurrent(q, k, v, self.log_gamma, s0)
        elif form == "chunkwise":
            o, s = retention_chunkwise(q, k, v, self.log_gamma, self.config.chunk_size, s0)
        else:
            raise ValueError(f"retention form {form!r}; expected parallel | recurrent | chunkwise")
        y = self._out(x, o)
        return (y, RetNetState(S=s, pos=pos0 + l)) if return_state else y

    def init_state(self, batch: int) -> RetNetState:
        c, hs = self.config, self.hidden_size
        return RetNetState(S=jnp.zeros((batch, c.num_heads, c.head_dim(hs), c.value_factor * hs // c.num_heads),
                                       jnp.float32), pos=jnp.zeros((), jnp.int32))

    def step(self, x_t: jax.Array, state: RetNetState):
        """One token: x_t [B, H] -> (y_t [B, H], new RetNetState); equals __call__ on the sequence."""
        if x_t.ndim != 2 or x_t.shape[-1] != self.hidden_size:
            raise ValueError(f"MultiScaleRetention.step expects [batch, {self.hidden_size}], got shape {x_t.shape}")
        x = x_t[:, None]
        q, k, v = self._qkv(x, state.pos[None])
        g = jnp.exp(self.log_gamma)[None, :, None, None]
        s = g * state.S + jnp.einsum("bhd,bhe->bhde", k[:, :, 0], v[:, :, 0])
        o = jnp.einsum("bhd,bhde->bhe", q[:, :, 0], s)[:, :, None]
        return self._out(x, o)[:, 0], RetNetState(S=s, pos=state.pos + 1)
