"""Mamba (S6) mixer with HF `MambaMixer` parameter names and a recurrent one-token step.

    x [B, L, H] -> in_proj -> (u, z) [B, L, di] ; u = silu(causal depthwise conv1d(u))
    (dt_r, B, C) = x_proj(u) ; dt = dt_r @ dt_proj.kernel ; A = -exp(A_log)
    y = selective_scan(u, dt, A, B, C, D, z, delta_bias=dt_proj.bias, delta_softplus=True) ; out_proj(y)

Parameters (HF name -> here): in_proj, conv1d (weight [di, 1, k] -> kernel [k, 1, di]), x_proj, dt_proj,
A_log, D, out_proj; dense `weight` -> `kernel` transposed.  The state for generation is explicit:
`MambaState(conv [B, d_conv-1, di], ssm [B, di, d_state] f32)`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from iva_jax.layers.linear import Linear
from iva_jax.ssm.common import DepthwiseCausalConv1d, apply_mask, dt_bias_init, param, softplus, uniform_init
from iva_jax.ssm.config import SSMConfig
from iva_jax.ssm.scan import selective_scan_bld


class MambaState(NamedTuple):
    conv: jax.Array  # [B, d_conv - 1, d_inner] previous conv inputs
    ssm: jax.Array  # [B, d_inner, d_state] f32


class DtProj(nn.Module):
    """dt_proj: kernel [dt_rank, di] (uniform +-dt_rank^-0.5 * dt_scale) and the softplus-inverse bias [di]."""

    config: SSMConfig
    rank: int
    features: int
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        c = self.config
        std = self.rank ** -0.5 * c.dt_scale
        w_init = uniform_init(std) if c.dt_init == "random" else nn.initializers.constant(std)
        self.kernel = param(self, "kernel", w_init, (self.rank, self.features), (None, "mlp"), self.param_dtype)
        self.bias = param(self, "bias", dt_bias_init(c.dt_min, c.dt_max, c.dt_init_floor), (self.features,),
                          ("mlp",), self.param_dtype)

    def __call__(self, x):  # never used directly: Mamba feeds the bias to the scan (fused softplus)
        return x @ self.kernel + self.bias


class MambaMixer(nn.Module):
    """Mamba block as a sequence mixer: __call__(x [B, L, H]) -> [B, L, H]; init_state / step for decoding."""

    config: SSMConfig
    hidden_size: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_config: Any = None  # kernels.selective_scan.ScanBlockConfig for the Pallas kernel
    interpret: bool = False  # run the Pallas kernel in interpret mode (CPU tests)

    def setup(self) -> None:
        c, h = self.config, self.hidden_size
        di, n, r = c.d_inner(h), c.d_state, c.resolved_dt_rank(h)
        self.d_inner, self.rank = di, r
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.in_proj = Linear(h, 2 * di, axes=("embed", "mlp"), use_bias=c.proj_bias, **kw)
        self.conv1d = DepthwiseCausalConv1d(di, c.d_conv, use_bias=c.conv_bias, **kw)
        self.x_proj = Linear(di, r + 2 * n, axes=("mlp", None), **kw)
        self.dt_proj = DtProj(c, r, di, param_dtype=self.param_dtype)
        a_init = lambda key, shape, dtype: jnp.broadcast_to(jnp.log(jnp.arange(1, n + 1, dtype=jnp.float32)),
                                                             shape).astype(dtype)  # S4D-real: A = -(1..N)
        self.A_log = param(self, "A_log", a_init, (di, n), ("mlp", None), self.param_dtype)
        self.D = param(self, "D", nn.initializers.ones, (di,), ("mlp",), self.param_dtype)
        self.out_proj = Linear(di, h, axes=("mlp", "embed"), use_bias=c.proj_bias, **kw)

    def _ssm_inputs(self, u):
        """x_proj(u) -> (dt before bias/softplus, B, C) in f32."""
        n, r = self.config.d_state, self.rank
        dbc = self.x_proj(u).astype(jnp.float32)
        dt = dbc[..., :r] @ self.dt_proj.kernel.astype(jnp.float32)
        return dt, dbc[..., r:r + n], dbc[..., r + n:]

    def __call__(self, x: jax.Array, *, mask: Optional[jax.Array] = None, state: Optional[MambaState] = None,
                 return_state: bool = False):
        """y [B, L, H]; `state` continues from an earlier chunk (None: zeros); with return_state also the
        MambaState after the last token (prefill)."""
        if x.ndim != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"MambaMixer expects [batch, seqlen, {self.hidden_size}], got shape {x.shape}")
        xz = self.in_proj(apply_mask(x, mask))
        u_in, z = jnp.split(xz, 2, axis=-1)
        conv0 = None if state is None else state.conv
        u = apply_mask(nn.silu(self.conv1d(u_in, conv0)), mask)
        dt, B, C = self._ssm_inputs(u)
        A = -jnp.exp(self.A_log.astype(jnp.float32))
        c = self.config
        y, last = selective_scan_bld(u, dt, A, B[:, :, None, :], C[:, :, None, :], self.D.astype(jnp.float32), z,
                                     self.dt_proj.bias.astype(jnp.float32), True, impl=c.scan_impl,
                                     chunk_size=c.chunk_size, interpret=self.interpret, config=self.scan_config,
                                     initial_state=None if state is None else state.ssm)
        out = self.out_proj(y.astype(self.dtype))
        if not return_state:
            return out
        conv = self.conv1d.tail(u_in, conv0).astype(self.dtype)
        return out, MambaState(conv=conv, ssm=last)

    def init_state(self, batch: int) -> MambaState:
        """Zero state (no parameters needed)."""
        c, h = self.config, self.hidden_size
        di = c.d_inner(h)
        return MambaState(conv=jnp.zeros((batch, c.d_conv - 1, di), self.dtype),
                          ssm=jnp.zeros((batch, di, c.d_state), jnp.float32))

    def step(self, x_t: jax.Array, state: MambaState):
        """One token: x_t [B, H] -> (y_t [B, H], new MambaState); equals __call__ on the sequence."""
        if x_t.ndim != 2 or x_t.shape[-1] != self.hidden_size:
            raise ValueError(f"MambaMixer.step expects [batch, {self.hidden_size}], got shape {x_t.shape}")
        u_in, z = jnp.split(self.in_proj(x_t), 2, axis=-1)
        u, conv = self.conv1d.step(u_in, state.conv)
        u = nn.silu(u)
        dt, B, C = self._ssm_inputs(u)
        f32 = jnp.float32
        dt = softplus(dt + self.dt_proj.bias.astype(f32))
        A = -jnp.exp(self.A_log.astype(f32))
        uf = u.astype(f32)
        h = jnp.exp(dt[..., None] * A) * state.ssm + (dt * uf)[..., None] * B[:, None, :]
        y = jnp.einsum("bdn,bn->bd", h, C) + self.D.astype(f32) * uf
        y = y * nn.silu(z.astype(f32))
        return self.out_proj(y.astype(self.dtype)), MambaState(conv=conv, ssm=h)
