"""Mamba selective scan: a `lax.scan` reference and a Pallas (Triton) kernel with a kernel backward.

Layout here is channels-last, the layout a JAX sequence model already holds its activations in:
    u, delta, z : [batch, seqlen, dim]          A : [dim, dstate]
    B, C        : [batch, seqlen, groups, dstate] (dim is split into `groups` contiguous blocks)
    D, delta_bias : [dim]
and the result is (out [batch, seqlen, dim] in u's dtype, last_state [batch, dim, dstate] f32).
`iva_jax.ssm.scan.selective_scan` wraps this with mamba_ssm's [batch, dim, seqlen] layout.

Semantics (mamba_ssm `selective_scan_ref`), all in f32:
    dt = softplus(delta + delta_bias) (softplus only if delta_softplus)
    h_t = exp(dt_t * A) * h_{t-1} + dt_t * u_t * B_t ;  y_t = <h_t, C_t> + D * u_t ;  out_t = y_t * silu(z_t)

The kernel (grid: batch x groups x dim-blocks) keeps the [block_d, dstate] state in registers and
walks time inside the kernel in statically unrolled chunks of `chunk` steps, so every load of a chunk
is issued before its recurrence needs it.  With gradients requested, the forward also writes the state
at every chunk start (f32, [batch, seqlen/chunk, dim, dstate]); the backward kernel walks the chunks in
reverse, recomputes the chunk's states from that checkpoint into registers and runs the adjoint
recurrence.  dB/dC are per-dim-block partial sums reduced by XLA afterwards (deterministic, no atomics).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

_LOG = logging.getLogger(__name__)
LOG2E = 1.4426950408889634
SOFTPLUS_THRESHOLD = 20.0  # torch.nn.functional.softplus: x > 20 -> x
IMPLS = ("auto", "xla", "triton")


# ---------------------------------------------------------------------------------------------
# shared checks
# ---------------------------------------------------------------------------------------------
def check_inputs(u, delta, A, B, C, D=None, z=None, delta_bias=None) -> Tuple[int, int, int, int, int]:
    """Validate channels-last shapes; returns (batch, seqlen, dim, groups, dstate)."""
    if u.ndim != 3:
        raise ValueError(f"u must be [batch, seqlen, dim], got shape {u.shape}")
    b, l, d = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta shape {delta.shape} != u shape {u.shape}")
    if A.ndim != 2 or A.shape[0] != d:
        raise ValueError(f"A must be [dim={d}, dstate], got shape {A.shape}")
    if jnp.iscomplexobj(A):
        raise ValueError("complex A is not supported")
    n = A.shape[1]
    for name, x in (("B", B), ("C", C)):
        if x.ndim != 4 or x.shape[0] != b or x.shape[1] != l or x.shape[3] != n:
            raise ValueError(f"{name} must be [batch={b}, seqlen={l}, groups, dstate={n}], got shape {x.shape}")
        if d % x.shape[2]:
            raise ValueError(f"{name} has {x.shape[2]} groups, which do not divide dim={d}")
    if B.shape[2] != C.shape[2]:
        raise ValueError(f"B groups {B.shape[2]} != C groups {C.shape[2]}")
    for name, x in (("D", D), ("delta_bias", delta_bias)):
        if x is not None and x.shape != (d,):
            raise ValueError(f"{name} must be [dim={d}], got shape {x.shape}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z shape {z.shape} != u shape {u.shape}")
    return b, l, d, B.shape[2], n


def softplus(x: jax.Array) -> jax.Array:
    """torch's softplus (threshold 20), the one mamba_ssm applies to delta."""
    return jnp.where(x > SOFTPLUS_THRESHOLD, x, jnp.log1p(jnp.exp(jnp.minimum(x, SOFTPLUS_THRESHOLD))))


# ---------------------------------------------------------------------------------------------
# reference: plain lax.scan over time, f32 state, the definition of correct
# ---------------------------------------------------------------------------------------------
def reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus: bool = False):
    """Sequential `lax.scan` selective scan; returns (out, last_state) (see module docstring)."""
    b, l, d, g, n = check_inputs(u, delta, A, B, C, D, z, delta_bias)
    dg = d // g
    f32 = jnp.float32
    dt = delta.astype(f32)
    if delta_bias is not None:
        dt = dt + delta_bias.astype(f32)
    if delta_softplus:
        dt = softplus(dt)
    Ag = A.astype(f32).reshape(g, dg, n)

    def step(h, xs):  # h [b, g, dg, n]
        dt_t, u_t, b_t, c_t = xs  # [b, g, dg], [b, g, dg], [b, g, n], [b, g, n]
        h = jnp.exp(dt_t[..., None] * Ag) * h + (dt_t * u_t)[..., None] * b_t[:, :, None, :]
        return h, jnp.einsum("bgdn,bgn->bgd", h, c_t)

    tm = lambda x: jnp.moveaxis(x.astype(f32), 1, 0)  # time-major
    xs = (tm(dt).reshape(l, b, g, dg), tm(u).reshape(l, b, g, dg), tm(B), tm(C))
    h, ys = lax.scan(step, jnp.zeros((b, g, dg, n), f32), xs)
    y = jnp.moveaxis(ys, 0, 1).reshape(b, l, d)
    if D is not None:
        y = y + u.astype(f32) * D.astype(f32)
    if z is not None:
        y = y * jax.nn.silu(z.astype(f32))
    return y.astype(u.dtype), h.reshape(b, d, n)


# ---------------------------------------------------------------------------------------------
# Pallas / Triton kernel
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ScanBlockConfig:
    """Tuning knobs of the kernel (powers of two). `chunk` = time steps unrolled per loop trip
    (and the checkpoint interval of the backward)."""

    block_d: int = 32
    chunk: int = 16
    num_warps: int = 4
    num_stages: int = 1
    block_d_bwd: int = 32
    num_warps_bwd: int = 4

    def __post_init__(self):
        for f in ("block_d", "chunk", "num_warps", "block_d_bwd", "num_warps_bwd"):
            v = getattr(self, f)
            if not (isinstance(v, int) and v > 0 and v & (v - 1) == 0):
                raise ValueError(f"ScanBlockConfig.{f}={v!r} must be a positive power of two")
        if self.num_stages < 1:
            raise ValueError(f"ScanBlockConfig.num_stages={self.num_stages!r} must be >= 1")


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything static about one kernel call (hashable: used as a custom_vjp nondiff arg)."""

    L: int
    G: int
    Dgp: int  # padded dims per group
    Np: int  # padded dstate
    cfg: ScanBlockConfig
    softplus: bool
    has_D: bool
    has_z: bool
    has_bias: bool
    interpret: bool

    def block(self, bwd: bool) -> int:
        return min(self.cfg.block_d_bwd if bwd else self.cfg.block_d, self.Dgp)

    @property
    def K(self) -> int:
        return min(self.cfg.chunk, _next_pow2(self.L))

    @property
    def NC(self) -> int:
        return -(-self.L // self.K)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _compiler_params(num_warps: int, num_stages: int):
    from jax.experimental.pallas import triton as plgpu

    cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
    return cls(num_warps=num_warps, num_stages=num_stages)


def _load(ref, idx, interpret: bool):
    return ref[idx]


def _store(ref, idx, val, mask):
    """ref[idx] = val where mask (mask None: unconditional)."""
    if mask is None:
        ref[idx] = val
    else:
        from jax.experimental.pallas import triton as plgpu

        plgpu.store(ref.at[idx], val, mask=jnp.broadcast_to(mask, val.shape))


def _step_inputs(st: _Static, refs, b, g, t_raw, dsl):
    """Load (dt_raw_plus_bias, dt, u, B_t) for time t (clamped to L-1; masked to zero beyond L)."""
    from jax.experimental import pallas as pl  # noqa: F401

    f32 = jnp.float32
    partial = st.L % st.K != 0
    t = jnp.minimum(t_raw, st.L - 1) if partial else t_raw
    x = refs["dt"][b, t, dsl].astype(f32)
    if st.has_bias:
        x = x + refs["bias_v"]
    dt = softplus(x) if st.softplus else x
    u = refs["u"][b, t, dsl].astype(f32)
    bt = refs["B"][b, t, g, :].astype(f32)
    valid = (t_raw < st.L) if partial else None
    if partial:
        dt = jnp.where(valid, dt, 0.0)
        u = jnp.where(valid, u, 0.0)
    return t, valid, x, dt, u, bt


def _fwd_kernel(*refs, st: _Static, save_ckpt: bool):
    from jax.experimental import pallas as pl

    names = ["u", "dt", "A", "B", "C"] + (["D"] if st.has_D else []) + (["z"] if st.has_z else []) \
        + (["bias"] if st.has_bias else []) + ["out", "last"] + (["ckpt"] if save_ckpt else [])
    r = dict(zip(names, refs))
    f32 = jnp.float32
    BD, K = st.block(False), st.K
    b, g, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    d0 = pl.multiple_of(g * st.Dgp + j * BD, BD)
    dsl = pl.ds(d0, BD)
    A2 = r["A"][dsl, :].astype(f32) * LOG2E  # exp(dt*A) = exp2(dt*A*log2e)
    Dv = r["D"][dsl].astype(f32) if st.has_D else None
    if st.has_bias:
        r["bias_v"] = r["bias"][dsl].astype(f32)

    def chunk_body(c, h):
        if save_ckpt:
            r["ckpt"][b, c, dsl, :] = h
        for k in range(K):
            t, valid, _, dt, u, bt = _step_inputs(st, r, b, g, c * K + k, dsl)
            ct = r["C"][b, t, g, :].astype(f32)
            h = jnp.exp2(dt[:, None] * A2) * h + (dt * u)[:, None] * bt[None, :]
            y = jnp.sum(h * ct[None, :], axis=1)
            if st.has_D:
                y = y + Dv * u
            if st.has_z:
                zt = r["z"][b, t, dsl].astype(f32)
                y = y * (zt * jax.nn.sigmoid(zt))
            _store(r["out"], (b, t, dsl), y.astype(r["out"].dtype), valid)
        return h

    h = lax.fori_loop(0, st.NC, chunk_body, jnp.zeros((BD, st.Np), f32))
    r["last"][b, dsl, :] = h


def _bwd_kernel(*refs, st: _Static):
    from jax.experimental import pallas as pl

    names = ["u", "dt", "A", "B", "C"] + (["D"] if st.has_D else []) + (["z"] if st.has_z else []) \
        + (["bias"] if st.has_bias else []) + ["ckpt", "dout", "dlast"] \
        + ["du", "ddt"] + (["dz"] if st.has_z else []) + ["dA", "dB", "dC"] \
        + (["dD"] if st.has_D else []) + (["dbias"] if st.has_bias else [])
    r = dict(zip(names, refs))
    f32 = jnp.float32
    BD, K = st.block(True), st.K
    b, g, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    d0 = pl.multiple_of(g * st.Dgp + j * BD, BD)
    dsl = pl.ds(d0, BD)
    A = r["A"][dsl, :].astype(f32)
    A2 = A * LOG2E
    Dv = r["D"][dsl].astype(f32) if st.has_D else None
    if st.has_bias:
        r["bias_v"] = r["bias"][dsl].astype(f32)
    zero_v = jnp.zeros((BD,), f32)

    def chunk_body(i, carry):
        lam, dA_acc, dD_acc, dbias_acc = carry
        c = st.NC - 1 - i
        h0 = r["ckpt"][b, c, dsl, :]
        # 1. recompute this chunk's states from its checkpoint (kept in registers).
        hs, ins = [], []
        h = h0
        for k in range(K):
            t, valid, x, dt, u, bt = _step_inputs(st, r, b, g, c * K + k, dsl)
            h = jnp.exp2(dt[:, None] * A2) * h + (dt * u)[:, None] * bt[None, :]
            hs.append(h)
            ins.append((t, valid, x, dt, u, bt))
        # 2. adjoint recurrence backwards through the chunk.
        for k in reversed(range(K)):
            t, valid, x, dt, u, bt = ins[k]
            h_t, h_prev = hs[k], (hs[k - 1] if k else h0)
            ct = r["C"][b, t, g, :].astype(f32)
            go = r["dout"][b, t, dsl].astype(f32)
            if st.has_z:
                zt = r["z"][b, t, dsl].astype(f32)
                sz = jax.nn.sigmoid(zt)
                y = jnp.sum(h_t * ct[None, :], axis=1)
                if st.has_D:
                    y = y + Dv * u
                dz = go * y * sz * (1.0 + zt * (1.0 - sz))
                _store(r["dz"], (b, t, dsl), dz.astype(r["dz"].dtype), valid)
                dy = go * zt * sz
            else:
                dy = go
            if valid is not None:
                dy = jnp.where(valid, dy, 0.0)
            _store(r["dC"], (b, t, g, j, slice(None)), jnp.sum(h_t * dy[:, None], axis=0), valid)
            lam = lam + dy[:, None] * ct[None, :]
            du = dt * jnp.sum(lam * bt[None, :], axis=1)
            ddt = u * jnp.sum(lam * bt[None, :], axis=1)
            if st.has_D:
                du = du + dy * Dv
                dD_acc = dD_acc + dy * u
            _store(r["dB"], (b, t, g, j, slice(None)), jnp.sum(lam * (dt * u)[:, None], axis=0), valid)
            a = jnp.exp2(dt[:, None] * A2)
            q = lam * h_prev * a
            ddt = ddt + jnp.sum(q * A, axis=1)
            dA_acc = dA_acc + q * dt[:, None]
            lam = lam * a
            if st.softplus:
                ddt = ddt * jnp.where(x > SOFTPLUS_THRESHOLD, 1.0, jax.nn.sigmoid(x))
            if valid is not None:
                ddt = jnp.where(valid, ddt, 0.0)
            if st.has_bias:
                dbias_acc = dbias_acc + ddt
            _store(r["du"], (b, t, dsl), du.astype(r["du"].dtype), valid)
            _store(r["ddt"], (b, t, dsl), ddt.astype(r["ddt"].dtype), valid)
        return lam, dA_acc, dD_acc, dbias_acc

    init = (r["dlast"][b, dsl, :].astype(f32), jnp.zeros((BD, st.Np), f32), zero_v, zero_v)
    _, dA_acc, dD_acc, dbias_acc = lax.fori_loop(0, st.NC, chunk_body, init)
    r["dA"][b, dsl, :] = dA_acc
    if st.has_D:
        r["dD"][b, dsl] = dD_acc
    if st.has_bias:
        r["dbias"][b, dsl] = dbias_acc


def _call_fwd(st: _Static, args, save_ckpt: bool):
    from jax.experimental import pallas as pl

    u = args[0]
    bsz, L, Dp = u.shape
    BD = st.block(False)
    out_shape = [jax.ShapeDtypeStruct((bsz, L, Dp), u.dtype), jax.ShapeDtypeStruct((bsz, Dp, st.Np), jnp.float32)]
    if save_ckpt:
        out_shape.append(jax.ShapeDtypeStruct((bsz, st.NC, Dp, st.Np), jnp.float32))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, st=st, save_ckpt=save_ckpt),
        out_shape=tuple(out_shape),
        grid=(bsz, st.G, st.Dgp // BD),
        interpret=st.interpret,
        compiler_params=None if st.interpret else _compiler_params(st.cfg.num_warps, st.cfg.num_stages),
        name="selective_scan_fwd",
    )(*args)


def _call_bwd(st: _Static, args, ckpt, dout, dlast):
    from jax.experimental import pallas as pl

    u, dt = args[0], args[1]
    bsz, L, Dp = u.shape
    BD = st.block(True)
    J = st.Dgp // BD
    f32 = jnp.float32
    out_shape = [jax.ShapeDtypeStruct(u.shape, u.dtype), jax.ShapeDtypeStruct(dt.shape, dt.dtype)]
    if st.has_z:
        z = args[5 + int(st.has_D)]
        out_shape.append(jax.ShapeDtypeStruct(z.shape, z.dtype))
    out_shape += [jax.ShapeDtypeStruct((bsz, Dp, st.Np), f32),
                  jax.ShapeDtypeStruct((bsz, L, st.G, J, st.Np), f32),
                  jax.ShapeDtypeStruct((bsz, L, st.G, J, st.Np), f32)]
    if st.has_D:
        out_shape.append(jax.ShapeDtypeStruct((bsz, Dp), f32))
    if st.has_bias:
        out_shape.append(jax.ShapeDtypeStruct((bsz, Dp), f32))
    return pl.pallas_call(
        functools.partial(_bwd_kernel, st=st),
        out_shape=tuple(out_shape),
        grid=(bsz, st.G, J),
        interpret=st.interpret,
        compiler_params=None if st.interpret else _compiler_params(st.cfg.num_warps_bwd, st.cfg.num_stages),
        name="selective_scan_bwd",
    )(*args, ckpt, dout, dlast)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan_core(st: _Static, *args):
    out, last = _call_fwd(st, args, save_ckpt=False)
    return out, last


def _scan_core_fwd(st: _Static, *args):
    out, last, ckpt = _call_fwd(st, args, save_ckpt=True)
    return (out, last), (args, ckpt)


def _scan_core_bwd(st: _Static, res, cts):
    args, ckpt = res
    dout, dlast = cts
    grads = list(_call_bwd(st, args, ckpt, dout, dlast.astype(jnp.float32)))
    du, ddt = grads.pop(0), grads.pop(0)
    dz = grads.pop(0) if st.has_z else None
    dA_part, dB_part, dC_part = grads.pop(0), grads.pop(0), grads.pop(0)
    dD_part = grads.pop(0) if st.has_D else None
    dbias_part = grads.pop(0) if st.has_bias else None
    A, B, C = args[2], args[3], args[4]
    out = [du, ddt, dA_part.sum(0).astype(A.dtype), dB_part.sum(3).astype(B.dtype), dC_part.sum(3).astype(C.dtype)]
    k = 5
    if st.has_D:
        out.append(dD_part.sum(0).astype(args[k].dtype))
        k += 1
    if st.has_z:
        out.append(dz)
        k += 1
    if st.has_bias:
        out.append(dbias_part.sum(0).astype(args[k].dtype))
    return tuple(out)


_scan_core.defvjp(_scan_core_fwd, _scan_core_bwd)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus: bool = False,
                          *, config: Optional[ScanBlockConfig] = None, interpret: bool = False):
    """The Pallas kernel (differentiable); same contract as `reference`."""
    b, l, d, g, n = check_inputs(u, delta, A, B, C, D, z, delta_bias)
    cfg = config or ScanBlockConfig()
    dg = d // g
    bd = min(max(cfg.block_d, cfg.block_d_bwd), _next_pow2(dg))
    dgp = -(-dg // bd) * bd
    np_ = max(2, _next_pow2(n))
    st = _Static(L=l, G=g, Dgp=dgp, Np=np_, cfg=cfg, softplus=bool(delta_softplus), has_D=D is not None,
                 has_z=z is not None, has_bias=delta_bias is not None, interpret=bool(interpret))

    def pad_d(x, axis):  # [..., d, ...] -> [..., g * dgp, ...] (zeros in each group's padded tail)
        if dgp == dg:
            return x
        shp = x.shape
        x = x.reshape(shp[:axis] + (g, dg) + shp[axis + 1:])
        widths = [(0, 0)] * x.ndim
        widths[axis + 1] = (0, dgp - dg)
        return jnp.pad(x, widths).reshape(shp[:axis] + (g * dgp,) + shp[axis + 1:])

    def pad_n(x):
        return x if np_ == n else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, np_ - n)])

    args = [pad_d(u, 2), pad_d(delta, 2), pad_n(pad_d(A, 0)), pad_n(B), pad_n(C)]
    if D is not None:
        args.append(pad_d(D, 0))
    if z is not None:
        args.append(pad_d(z, 2))
    if delta_bias is not None:
        args.append(pad_d(delta_bias, 0))
    out, last = _scan_core(st, *args)
    if dgp != dg:
        out = out.reshape(b, l, g, dgp)[..., :dg].reshape(b, l, d)
        last = last.reshape(b, g, dgp, np_)[:, :, :dg].reshape(b, d, np_)
    return out, last[..., :n]


# ---------------------------------------------------------------------------------------------
# public entry
# ---------------------------------------------------------------------------------------------
def triton_supported() -> bool:
    """True on an NVIDIA GPU of compute capability >= 8.0 (the Triton kernel's target)."""
    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return False
    if dev.platform != "gpu":
        return False
    cc = getattr(dev, "compute_capability", None)
    try:
        return cc is not None and float(cc) >= 8.0
    except (TypeError, ValueError):
        return False


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus: bool = False, *,
                   impl: str = "auto", interpret: bool = False, config: Optional[ScanBlockConfig] = None):
    """Selective scan in channels-last layout; returns (out, last_state).

    impl: "xla" (the `lax.scan` reference), "triton" (the Pallas kernel; `interpret=True` runs it on CPU),
    "auto" (triton on sm80+ GPUs, else xla with a one-line log).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}; expected one of {IMPLS}")
    if impl == "auto":
        if interpret or triton_supported():
            impl = "triton"
        else:
            _LOG.info("selective_scan: no sm80+ GPU, using the XLA reference")
            impl = "xla"
    if impl == "xla":
        return reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, config=config,
                                 interpret=interpret)


def copy_bytes(b: int, l: int, d: int, n: int, g: int, itemsize: int, has_z: bool, bwd: bool) -> int:
    """HBM bytes the scan must move at least (inputs read once, outputs written once)."""
    act = b * l * d * itemsize
    bc = 2 * b * l * g * n * itemsize
    fwd = act * (3 + int(has_z)) + bc  # u, delta, (z) read; out written
    if not bwd:
        return fwd
    # backward: read u, delta, (z), dout, B, C; write du, ddelta, (dz), dB, dC
    return fwd + act * (3 + int(has_z)) + act * (2 + int(has_z)) + 2 * bc


__all__ = ["reference", "selective_scan", "selective_scan_triton", "ScanBlockConfig", "triton_supported",
           "check_inputs", "softplus", "copy_bytes", "math"]
