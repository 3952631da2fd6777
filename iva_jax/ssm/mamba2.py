"""Mamba-2 (SSD): the chunked state-space-duality form, a sequential reference, and the mixer block.

SSD with a scalar decay per head:  h_t = exp(dt_t A_h) h_{t-1} + dt_t x_t B_t^T ;  y_t = h_t C_t + D_h x_t
(x [b, l, heads, headdim], B/C [b, l, groups, dstate]; heads share their group's B/C).
`ssd_chunked` evaluates it in chunks of Q steps: inside a chunk as a masked, decayed (C B^T) x product
(matmuls), across chunks by passing [heads, headdim, dstate] states.  Parameter names follow HF
`Mamba2Mixer`: in_proj (-> z, xBC, dt), conv1d, dt_bias, A_log, D, norm (gated RMSNorm, `scale`), out_proj.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from iva_jax.layers.linear import Linear
from iva_jax.ssm.common import DepthwiseCausalConv1d, apply_mask, dt_bias_init, param, softplus
from iva_jax.ssm.config import SSMConfig


def _check_ssd(x, dt, A, B, C):
    if x.ndim != 4:
        raise ValueError(f"x must be [batch, seqlen, heads, headdim], got shape {x.shape}")
    b, l, h, _ = x.shape
    if dt.shape != (b, l, h):
        raise ValueError(f"dt shape {dt.shape} != [batch, seqlen, heads] {(b, l, h)}")
    if A.shape != (h,):
        raise ValueError(f"A must be [heads={h}], got shape {A.shape}")
    if B.ndim != 4 or B.shape[:2] != (b, l) or C.shape != B.shape or h % B.shape[2]:
        raise ValueError(f"B, C must be equal [batch, seqlen, groups | heads={h}, dstate], got {B.shape}, {C.shape}")
    return b, l, h, x.shape[3], B.shape[2], B.shape[3]


def ssd_sequential(x, dt, A, B, C, D=None, initial_state=None):
    """Reference: `lax.scan` over time of the SSD recurrence; returns (y [b, l, h, p] f32, state [b, h, p, n])."""
    b, l, h, p, g, n = _check_ssd(x, dt, A, B, C)
    f32 = jnp.float32
    h0 = jnp.zeros((b, h, p, n), f32) if initial_state is None else initial_state.astype(f32)

    def step(s, inp):
        s, y = ssd_step(s, *inp, A, D)
        return s, y

    tm = lambda a: jnp.moveaxis(a.astype(f32), 1, 0)
    last, ys = lax.scan(step, h0, (tm(x), tm(dt), tm(B), tm(C)))
    return jnp.moveaxis(ys, 0, 1), last


def ssd_step(state, x_t, dt_t, B_t, C_t, A, D=None):
    """One SSD step: state [b, h, p, n], x_t [b, h, p], dt_t [b, h], B_t/C_t [b, g, n] -> (state, y_t [b, h, p])."""
    f32 = jnp.float32
    h, g = x_t.shape[1], B_t.shape[1]
    Bh = jnp.repeat(B_t.astype(f32), h // g, axis=1)
    Ch = jnp.repeat(C_t.astype(f32), h // g, axis=1)
    dt_t, x_t = dt_t.astype(f32), x_t.astype(f32)
    state = jnp.exp(dt_t * A.astype(f32))[..., None, None] * state \
        + (dt_t[..., None] * x_t)[..., None] * Bh[:, :, None, :]
    y = jnp.einsum("bhpn,bhn->bhp", state, Ch)
    if D is not None:
        y = y + D.astype(f32)[:, None] * x_t
    return state, y


def ssd_chunked(x, dt, A, B, C, chunk_size: int, D=None, initial_state=None, dot_dtype=None):
    """Chunked SSD (Mamba-2's matmul form); same contract as `ssd_sequential`.

    dot_dtype (e.g. bfloat16): operand dtype of the four matmuls (f32 accumulation), as mamba_ssm's kernels
    do for bf16 models; None keeps every operand f32.
    """
    b, l, h, p, g, n = _check_ssd(x, dt, A, B, C)
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int")
    f32 = jnp.float32
    Q = min(chunk_size, l)
    nc = -(-l // Q)
    pad = nc * Q - l
    k = h // g  # heads per group

    def chunks(a):  # [b, l, ...] -> [b, nc, Q, ...]; padded steps have dt = 0 (no input, no decay)
        a = a.astype(f32)
        if pad:
            a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        return a.reshape((b, nc, Q) + a.shape[2:])

    xdt = chunks(x.astype(f32) * dt.astype(f32)[..., None]).reshape(b, nc, Q, g, k, p)
    a = jnp.moveaxis(chunks(dt.astype(f32) * A.astype(f32)).reshape(b, nc, Q, g, k), 2, -1)  # [b, c, g, k, Q]
    Bc, Cc = chunks(B), chunks(C)  # [b, c, Q, g, n]
    acum = jnp.cumsum(a, axis=-1)
    lo = (lambda t: t) if dot_dtype is None else (lambda t: t.astype(dot_dtype))
    ein = lambda spec, *ops: jnp.einsum(spec, *map(lo, ops), preferred_element_type=f32)
    # 1. inside each chunk: y_i = sum_{j<=i} (C_i . B_j) exp(acum_i - acum_j) dt_j x_j
    seg = acum[..., :, None] - acum[..., None, :]  # [b, c, g, k, i, j]
    causal = jnp.tril(jnp.ones((Q, Q), bool))
    decay = jnp.exp(jnp.where(causal, seg, -jnp.inf))
    CB = ein("bcign,bcjgn->bcgij", Cc, Bc)
    y = ein("bcgkij,bcjgkp->bcigkp", CB[:, :, :, None] * decay, xdt)
    # 2. each chunk's end state from its own inputs
    to_end = jnp.exp(acum[..., -1:] - acum)  # [b, c, g, k, Q]
    S = ein("bcjgn,bcjgkp->bcgkpn", Bc, xdt * jnp.moveaxis(to_end, -1, 2)[..., None])
    # 3. states entering each chunk: a short scan over chunks
    h0 = jnp.zeros((b, g, k, p, n), f32) if initial_state is None else initial_state.astype(f32).reshape(b, g, k, p, n)
    chunk_decay = jnp.exp(acum[..., -1])  # [b, c, g, k]

    def carry(hc, inp):
        s_c, d_c = inp
        return d_c[..., None, None] * hc + s_c, hc

    last, h_in = lax.scan(carry, h0, (jnp.moveaxis(S, 1, 0), jnp.moveaxis(chunk_decay, 1, 0)))
    h_in = jnp.moveaxis(h_in, 0, 1)  # [b, c, g, k, p, n]
    # 4. their contribution inside the chunk: y_i += exp(acum_i) C_i . h_in
    y = y + ein("bcign,bcgkpn->bcigkp", Cc, h_in) * jnp.moveaxis(jnp.exp(acum), -1, 2)[..., None]
    y = y.reshape(b, nc * Q, h, p)[:, :l]
    if D is not None:
        y = y + D.astype(f32)[:, None] * x.astype(f32)
    return y, last.reshape(b, h, p, n)


def ssd_flops(b: int, l: int, h: int, p: int, g: int, n: int, chunk: int) -> float:
    """Matmul FLOPs of `ssd_chunked` (C B^T, the intra-chunk product, chunk states, state outputs)."""
    return 2.0 * b * l * (g * chunk * n + h * chunk * p + 2 * h * p * n)


class Mamba2State(NamedTuple):
    conv: jax.Array  # [B, d_conv - 1, conv_dim]
    ssm: jax.Array  # [B, heads, headdim, d_state] f32


class GatedRMSNorm(nn.Module):
    """HF MambaRMSNormGated (norm_before_gate=False): scale * rmsnorm_per_group(x * silu(z)), f32 statistics."""

    dim: int
    group_size: int
    eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, z):
        scale = param(self, "scale", nn.initializers.ones, (self.dim,), ("mlp",), self.param_dtype)
        f32 = jnp.float32
        hs = x.astype(f32) * nn.silu(z.astype(f32))
        shp = hs.shape
        hs = hs.reshape(shp[:-1] + (self.dim // self.group_size, self.group_size))
        hs = hs * lax.rsqrt(jnp.mean(hs * hs, axis=-1, keepdims=True) + self.eps)
        return (scale.astype(f32) * hs.reshape(shp)).astype(self.dtype)


class Mamba2Mixer(nn.Module):
    """Mamba-2 block as a sequence mixer: __call__(x [B, L, H]) -> [B, L, H]; init_state / step for decoding."""

    config: SSMConfig
    hidden_size: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        c, hs = self.config, self.hidden_size
        self.d_inner, self.n_heads = c.d_inner(hs), c.mamba2_heads(hs)
        di, nh, gn = self.d_inner, self.n_heads, c.ngroups * c.d_state
        self.conv_dim = di + 2 * gn
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.in_proj = Linear(hs, 2 * di + 2 * gn + nh, axes=("embed", "mlp"), use_bias=c.proj_bias, **kw)
        self.conv1d = DepthwiseCausalConv1d(self.conv_dim, c.d_conv, use_bias=c.conv_bias, **kw)
        self.dt_bias = param(self, "dt_bias", dt_bias_init(c.dt_min, c.dt_max, c.dt_init_floor), (nh,), (None,),
                             self.param_dtype)
        lo, hi = c.A_init_min, c.A_init_max
        a_init = lambda key, shape, dtype: jnp.log(jax.random.uniform(key, shape, jnp.float32, lo, hi)).astype(dtype)
        self.A_log = param(self, "A_log", a_init, (nh,), (None,), self.param_dtype)
        self.D = param(self, "D", nn.initializers.ones, (nh,), (None,), self.param_dtype)
        self.norm = GatedRMSNorm(di, di // c.ngroups, eps=c.norm_eps, **kw)
        self.out_proj = Linear(di, hs, axes=("mlp", "embed"), use_bias=c.proj_bias, **kw)

    def _split(self, zxbcdt):
        di, gn = self.d_inner, self.config.ngroups * self.config.d_state
        return zxbcdt[..., :di], zxbcdt[..., di:di + self.conv_dim], zxbcdt[..., di + self.conv_dim:]

    def _dt(self, dt):
        c = self.config
        dt = softplus(dt.astype(jnp.float32) + self.dt_bias.astype(jnp.float32))
        return jnp.clip(dt, c.dt_limit_min, c.dt_limit_max)

    def _xbc(self, xbc):
        c, di, gn = self.config, self.d_inner, self.config.ngroups * self.config.d_state
        lead = xbc.shape[:-1]
        x = xbc[..., :di].reshape(lead + (self.n_heads, c.headdim))
        B = xbc[..., di:di + gn].reshape(lead + (c.ngroups, c.d_state))
        C = xbc[..., di + gn:].reshape(lead + (c.ngroups, c.d_state))
        return x, B, C

    def __call__(self, x: jax.Array, *, mask: Optional[jax.Array] = None, state: Optional[Mamba2State] = None,
                 return_state: bool = False):
        """y [B, L, H]; `state` continues from an earlier chunk (None: zeros); with return_state also the
        Mamba2State after the last token (prefill)."""
        if x.ndim != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"Mamba2Mixer expects [batch, seqlen, {self.hidden_size}], got shape {x.shape}")
        z, xbc_in, dt = self._split(self.in_proj(apply_mask(x, mask)))
        conv0 = None if state is None else state.conv
        xbc = apply_mask(nn.silu(self.conv1d(xbc_in, conv0)), mask)
        xs, B, C = self._xbc(xbc)
        A = -jnp.exp(self.A_log.astype(jnp.float32))
        dot = None if jnp.dtype(self.dtype) == jnp.float32 else self.dtype
        y, last = ssd_chunked(xs, self._dt(dt), A, B, C, self.config.chunk_size, D=self.D, dot_dtype=dot,
                              initial_state=None if state is None else state.ssm)
        y = self.norm(y.reshape(x.shape[:2] + (self.d_inner,)), z)
        out = self.out_proj(y)
        if not return_state:
            return out
        return out, Mamba2State(conv=self.conv1d.tail(xbc_in, conv0).astype(self.dtype), ssm=last)

    def init_state(self, batch: int) -> Mamba2State:
        c, hs = self.config, self.hidden_size
        di, nh = c.d_inner(hs), c.mamba2_heads(hs)
        conv_dim = di + 2 * c.ngroups * c.d_state
        return Mamba2State(conv=jnp.zeros((batch, c.d_conv - 1, conv_dim), self.dtype),
                           ssm=jnp.zeros((batch, nh, c.headdim, c.d_state), jnp.float32))

    def step(self, x_t: jax.Array, state: Mamba2State):
        """One token: x_t [B, H] -> (y_t [B, H], new Mamba2State); equals __call__ on the sequence."""
        if x_t.ndim != 2 or x_t.shape[-1] != self.hidden_size:
            raise ValueError(f"Mamba2Mixer.step expects [batch, {self.hidden_size}], got shape {x_t.shape}")
        z, xbc, dt = self._split(self.in_proj(x_t))
        xbc, conv = self.conv1d.step(xbc, state.conv)
        xs, B, C = self._xbc(nn.silu(xbc))
        A = -jnp.exp(self.A_log.astype(jnp.float32))
        ssm, y = ssd_step(state.ssm, xs, self._dt(dt), B, C, A, self.D)
        y = self.norm(y.reshape(x_t.shape[0], self.d_inner), z)
        return self.out_proj(y), Mamba2State(conv=conv, ssm=ssm)
