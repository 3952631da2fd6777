"""Selective scan (Mamba S6) with mamba_ssm's API, in four implementations.

`selective_scan` takes mamba_ssm's layout and argument names (u, delta: [batch, dim, seqlen]; A: [dim, dstate];
B, C: [batch, dstate, seqlen] or grouped [batch, groups, dstate, seqlen]) and the semantics of its
`selective_scan_ref`.  `selective_scan_bld` is the same op in channels-last layout ([batch, seqlen, dim],
B/C [batch, seqlen, groups, dstate]), the one Mamba blocks use, with no transposes.

impl:
  "sequential"  `lax.scan` over time (kernels.selective_scan.reference): the definition of correct.
  "associative" `lax.associative_scan` over the whole sequence: log-depth, materializes [b, l, d, n].
  "chunked"     associative scan inside chunks of `chunk_size` steps, `lax.scan` carrying the state across
                chunks, each chunk rematerialized in the backward: memory O(chunk) instead of O(seqlen).
  "pallas"      the Triton kernel in kernels/selective_scan.py (interpret=True runs it on CPU; on a GPU it
                raises until the kernel is GPU-validated, see kernels.selective_scan.VALIDATED_ON_GPU).
  "auto"        pallas on sm80+ GPUs (once validated); chunked on other GPUs; sequential on CPU, where a well-fused
                `lax.scan` moves the least memory (associative/chunked do ~log(chunk) passes over
                [b, l, d, n]; see `AUTO_CPU` for the measurement).

`initial_state` [b, d, n] (`selective_scan_bld` only) continues a scan from a previous state, e.g. a prompt
chunk after an earlier one: the XLA implementations carry it natively; the Pallas kernel starts from zero
and adds the state's (linear) contribution afterwards, <C_t, exp(A * sum_{s<=t} dt_s) h0>, in a fused
reduction.
"""

from __future__ import annotations

import importlib
import logging
import math

import jax
import jax.numpy as jnp
from jax import lax

from kernels import dispatch
from iva_jax.parallel.kernel_sharding import per_shard

_kss = importlib.import_module("kernels.selective_scan")  # the module (kernels/__init__ exports the function)

_LOG = logging.getLogger(__name__)
IMPLS = ("auto", "sequential", "associative", "chunked", "pallas")
# Measured on the 2-core CPU box (batch 2, dim 256, seqlen 1024, dstate 16, f32, jit, best of 3):
# fwd: sequential 0.016 s, chunked(64) 0.14 s, associative 0.46 s; fwd+bwd: 1.41 / 2.08 / 2.81 s.
# -> on CPU "auto" picks sequential.
AUTO_CPU = "sequential"


def resolve_impl(impl: str) -> str:
    """Turn "auto" into a concrete implementation for the default device."""
    if impl not in IMPLS:
        raise ValueError(f"scan impl={impl!r}; expected one of {IMPLS}")
    if impl != "auto":
        return impl
    if _kss.triton_supported():
        return "pallas"
    if dispatch.device_info().platform in ("cuda", "rocm"):
        _LOG.info("selective_scan: GPU below sm80, using the chunked XLA scan")
        return "chunked"
    return AUTO_CPU


def _prep(u, delta, A, B, C, delta_bias, delta_softplus):
    """f32 grouped operands: dt, u [b, l, g, dg]; Ag [g, dg, n]; B, C [b, l, g, n]."""
    b, l, d, g, n = _kss.check_inputs(u, delta, A, B, C, None, None, delta_bias)
    f32 = jnp.float32
    dt = delta.astype(f32)
    if delta_bias is not None:
        dt = dt + delta_bias.astype(f32)
    if delta_softplus:
        dt = _kss.softplus(dt)
    dg = d // g
    return (dt.reshape(b, l, g, dg), u.astype(f32).reshape(b, l, g, dg), A.astype(f32).reshape(g, dg, n),
            B.astype(f32), C.astype(f32))


def _finish(y, u, D, z):
    """y [b, l, d] f32 -> (y + D u) * silu(z), cast to u's dtype."""
    if D is not None:
        y = y + u.astype(jnp.float32) * D.astype(jnp.float32)
    if z is not None:
        y = y * jax.nn.silu(z.astype(jnp.float32))
    return y.astype(u.dtype)


def _combine(left, right):
    a1, b1 = left
    a2, b2 = right
    return a1 * a2, a2 * b1 + b2


def _scan_terms(dt, u, Ag, B):
    """Per-step decay exp(dt A) and input dt u B, both [b, l, g, dg, n]."""
    return jnp.exp(dt[..., None] * Ag), (dt * u)[..., None] * B[:, :, :, None, :]


def _sequential(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0):
    """`lax.scan` over time from the state h0 [b, d, n] (the kernels' reference starts from zero)."""
    dt, uf, Ag, Bf, Cf = _prep(u, delta, A, B, C, delta_bias, delta_softplus)
    b, l, g, dg = dt.shape

    def step(h, xs):
        dt_t, u_t, b_t, c_t = xs
        h = jnp.exp(dt_t[..., None] * Ag) * h + (dt_t * u_t)[..., None] * b_t[:, :, None, :]
        return h, jnp.einsum("bgdn,bgn->bgd", h, c_t)

    tm = lambda x: jnp.moveaxis(x, 1, 0)  # noqa: E731
    last, ys = lax.scan(step, h0.astype(jnp.float32).reshape(b, g, dg, -1), tuple(map(tm, (dt, uf, Bf, Cf))))
    y = jnp.moveaxis(ys, 0, 1).reshape(b, l, g * dg)
    return _finish(y, u, D, z), last.reshape(b, g * dg, -1)


def _add_initial_state(out, last, u, delta, A, C, z, delta_bias, delta_softplus, h0):
    """A zero-state scan's (out, last) -> the scan from h0: the recurrence is linear in the state."""
    f32 = jnp.float32
    dt = delta.astype(f32) + (0.0 if delta_bias is None else delta_bias.astype(f32))
    dt = _kss.softplus(dt) if delta_softplus else dt
    b, l, d = dt.shape
    g, n = C.shape[2], A.shape[1]
    decay = jnp.exp(jnp.cumsum(dt, axis=1)[..., None] * A.astype(f32))  # [b, l, d, n], fused into the sum
    c = jnp.repeat(C.astype(f32), d // g, axis=2)  # [b, l, d, n]
    y0 = jnp.sum(c * decay * h0.astype(f32)[:, None], axis=-1)
    if z is not None:
        y0 = y0 * jax.nn.silu(z.astype(f32))
    return (out.astype(f32) + y0).astype(out.dtype), last + decay[:, -1] * h0.astype(f32)


def _associative(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0=None):
    dt, uf, Ag, Bf, Cf = _prep(u, delta, A, B, C, delta_bias, delta_softplus)
    b, l, g, dg = dt.shape
    P, h = lax.associative_scan(_combine, _scan_terms(dt, uf, Ag, Bf), axis=1)
    if h0 is not None:
        h = h + P * h0.astype(jnp.float32).reshape(b, 1, g, dg, -1)
    y = jnp.einsum("blgdn,blgn->blgd", h, Cf).reshape(b, l, g * dg)
    return _finish(y, u, D, z), h[:, -1].reshape(b, g * dg, -1)


def _chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size: int, h0=None):
    dt, uf, Ag, Bf, Cf = _prep(u, delta, A, B, C, delta_bias, delta_softplus)
    b, l, g, dg = dt.shape
    n = Ag.shape[-1]
    T = max(1, min(int(chunk_size), l))
    nc = -(-l // T)
    pad = nc * T - l

    def chunks(x):  # [b, l, ...] -> [nc, b, T, ...]; padded steps have dt = 0: state passes unchanged
        if pad:
            x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape((b, nc, T) + x.shape[2:]), 1, 0)

    @jax.checkpoint
    def body(h0, xs):
        dt_c, u_c, b_c, c_c = xs
        decay, inp = _scan_terms(dt_c, u_c, Ag, b_c)
        P, hl = lax.associative_scan(_combine, (decay, inp), axis=1)
        h = P * h0[:, None] + hl
        return h[:, -1], jnp.einsum("btgdn,btgn->btgd", h, c_c)

    h0 = jnp.zeros((b, g, dg, n), jnp.float32) if h0 is None else h0.astype(jnp.float32).reshape(b, g, dg, n)
    last, ys = lax.scan(body, h0, tuple(map(chunks, (dt, uf, Bf, Cf))))
    y = jnp.moveaxis(ys, 0, 1).reshape(b, nc * T, g * dg)[:, :l]
    return _finish(y, u, D, z), last.reshape(b, g * dg, n)


def selective_scan_bld(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus: bool = False, *,
                       impl: str = "auto", chunk_size: int = 64, interpret: bool = False, config=None,
                       initial_state=None):
    """Channels-last selective scan; returns (out [b, l, d] in u's dtype, last_state [b, d, n] f32).

    u, delta, z: [b, l, d]; A: [d, n]; B, C: [b, l, groups, n]; D, delta_bias: [d]; initial_state [b, d, n]
    (None: zeros) is the state before u[:, 0].
    """
    impl = resolve_impl(impl)
    h0 = initial_state
    if h0 is not None and h0.shape != (u.shape[0], u.shape[2], A.shape[-1]):
        raise ValueError(f"initial_state shape {h0.shape} != [batch, dim, dstate] "
                         f"{(u.shape[0], u.shape[2], A.shape[-1])}")
    if impl == "sequential":
        if h0 is not None:
            return _sequential(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0)
        return _kss.reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if impl == "associative":
        return _associative(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0)
    if impl == "chunked":
        if not (isinstance(chunk_size, int) and chunk_size > 0):
            raise ValueError(f"chunk_size={chunk_size!r} must be a positive int")
        return _chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size, h0)
    def kernel(u, delta, A, B, C, D, z, delta_bias):
        return _kss.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, impl="triton",
                                   interpret=interpret, config=config)

    bld, bc = ("batch", None, None), ("batch", None, None, None)
    out, last = per_shard(kernel, (u, delta, A, B, C, D, z, delta_bias), (bld, bld, None, bc, bc, None, bld, None),
                          [bld, bld])  # batch rows are independent; under a mesh each device scans its own
    if h0 is not None:
        out, last = _add_initial_state(out, last, u, delta, A, C, z, delta_bias, delta_softplus, h0)
    return out, last


def _bc_to_bld(x, name: str, b: int, l: int, n: int):
    """mamba_ssm B/C ([b, n, l] or [b, g, n, l]) -> [b, l, g, n]."""
    if x.ndim == 3 and x.shape == (b, n, l):
        return jnp.transpose(x, (0, 2, 1))[:, :, None, :]
    if x.ndim == 4 and x.shape[0] == b and x.shape[2:] == (n, l):
        return jnp.transpose(x, (0, 3, 1, 2))
    raise ValueError(f"{name} must be [batch={b}, dstate={n}, seqlen={l}] or [batch, groups, dstate, seqlen], "
                     f"got shape {x.shape} (time-invariant [dim, dstate] {name} is not supported)")


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus: bool = False,
                   return_last_state: bool = False, impl: str = "auto", *, chunk_size: int = 64,
                   interpret: bool = False, config=None):
    """mamba_ssm `selective_scan_fn` / `selective_scan_ref`: out [b, d, l] (u's dtype), and with
    return_last_state also the final state [b, d, n] (f32)."""
    if u.ndim != 3:
        raise ValueError(f"u must be [batch, dim, seqlen], got shape {u.shape}")
    b, d, l = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta shape {delta.shape} != u shape {u.shape}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z shape {z.shape} != u shape {u.shape}")
    if A.ndim != 2 or A.shape[0] != d:
        raise ValueError(f"A must be [dim={d}, dstate], got shape {A.shape}")
    n = A.shape[1]
    Bl, Cl = _bc_to_bld(B, "B", b, l, n), _bc_to_bld(C, "C", b, l, n)
    gb, gc = Bl.shape[2], Cl.shape[2]
    if gb != gc:  # mamba_ssm allows B and C to be grouped differently: bring both to lcm groups
        g = gb * gc // math.gcd(gb, gc)
        Bl, Cl = jnp.repeat(Bl, g // gb, axis=2), jnp.repeat(Cl, g // gc, axis=2)
    t = lambda x: None if x is None else jnp.transpose(x, (0, 2, 1))
    out, last = selective_scan_bld(t(u), t(delta), A, Bl, Cl, D, t(z), delta_bias, delta_softplus, impl=impl,
                                   chunk_size=chunk_size, interpret=interpret, config=config)
    out = jnp.transpose(out, (0, 2, 1))
    return (out, last) if return_last_state else out
