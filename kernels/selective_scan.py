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

Two forward kernels and a backward kernel for each (grid: batch x groups x dim-blocks).

The chunked forward (the default, `ScanBlockConfig.scan_chunk` = 8) scans a [scan_chunk, dstate, block_d] f32
tile per loop trip with `kernels.linear_scan` (one Triton `tt.scan`).  The tile's time axis is its slowest, so
Triton keeps it inside each thread (a sequential in-register scan), dstate is mostly in-thread as well (the
<h, C> sum is FMAs plus a shuffle: `kernels.fma_ops`, since XLA's Triton path does not contract a multiply
and an add), and the previous chunk's state enters through the first step.  Its loads run ahead of the math
through one of two pipelines (`ScanBlockConfig.scan_pipeline`): three rotated row buffers, or one buffer per
unrolled chunk, reloaded after its chunk's store so the loaded registers are never copied (a copy of a loaded
register waits for the load).  That is ~8 instructions per (step, dim, state) against ~30 for the per-step
forward (SASS, Triton 3.6, sm90), and 2x faster on the H100 (BENCHMARKS.md scan run 9: f32 693 us, 51% of
copy; bf16 529 us, 35%; at B8 L4096 D2048 N16).  Padded steps
past seqlen get dt = 0 (masked loads and stores), i.e. the identity map on the state.  With it comes the
chunked backward (`_bwd_chunk_kernel`: the adjoint as a reverse `tt.scan`), 2.0x faster forward+backward.
All kernels take softplus and sigmoid from MUFU approximations (`_softplus_k`, `_sigmoid_k`), not libdevice.

The per-step forward (scan_chunk = 0) keeps a [block_d, dstate] f32 state tile in registers and
walks time inside the kernel, `chunk` steps statically unrolled per loop trip.  block_d defaults to 128/dstate
with one warp: Triton then gives each thread 4 consecutive states of one dim (a warp covers 8 dims x 16
states), the dstate reduction is in-thread plus two shuffles, and the forward has no barrier.  (Checked by
compiling the lowered TTIR offline with Triton 3.6 for sm90, dstate 16: forward 63 registers, backward 156
with bwd_chunk 2, no spills.)  Without the load options below each step loads its rows (dt, u, B, C, z) after
the previous step's store of out, and neither LLVM nor ptxas moves a load above a store that may alias (the
sm90 SASS is LDG..STG per step): one load latency per step (~1 us per step at B8 L4096 D2048 on an H100).
Its default, `prefetch` with chunk 4, overlaps those loads with the recurrence: 2.1x faster on the H100
(BENCHMARKS.md).  With gradients requested either forward also saves the state every `ckpt_chunk` steps.  The
per-step backward kernel (loads per step) walks those chunks in reverse: it recomputes
a chunk into `bwd_chunk`-step checkpoints in a small per-program scratch buffer (L2-resident), then for each
sub-chunk recomputes its states into registers and runs the adjoint recurrence.  dB/dC (sums over dims)
are accumulated with f32 atomics, so their last bits depend on scheduling, as in mamba_ssm.

Options of the per-step forward (`ScanBlockConfig`, scan_chunk=0; its default: prefetch on, chunk 4; the backward
kernel is the same for all):
  group_loads  a trip issues all `chunk` steps' loads before its math: one load latency per trip.
  prefetch     software pipelining: one flat time loop whose carry holds the next trip's raw rows, so a trip
               issues the next trip's loads before its own math, and the latency overlaps that math.
               (Through nested loops Triton would give the carried rows a layout of their own and a
               shared-memory convert at every use.)  Both only move loads: the same arithmetic in the same order.
  time_splits  P > 1 segments of time: u, dt, B, C, z viewed as [batch * P, L / P, ...] (free reshapes; P drops
               to the largest power of two with L a multiple of P * ckpt_chunk, else 1: padding L would copy
               every input).  Pass 1, a state-only kernel (reads dt, u, B; no stores in its loop), gives each
               segment's end state from h = 0 and its sum of dt; a `lax.scan` over segments in XLA combines them,
               h0[p+1] = exp(A sum dt[p]) h0[p] + S[p] (the product of the steps' exp(dt A) up to rounding);
               pass 2 is the forward kernel started from h0[p], and its checkpoints [batch * P, NC / P, ...]
               reshape to the backward's [batch, NC, ...].  P times the programs, L / P steps each, for a second
               read of dt, u and B.
Registers and Triton compile times (Triton 3.6, sm90, bf16, dstate 16, block_d 8, 1 warp; ptxas -v, no spills):
default 60; group_loads 90 (chunk 4: 63, chunk 16: 154); prefetch chunk 4: 96, chunk 8: 166 (and ~30 s to
compile); time_splits: state pass 64, forward 61.  At 2048 one-warp programs (B8 D2048) more than ~120
registers cost a second wave (65536 registers per SM).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from kernels import dispatch, fma_ops, linear_scan

LOG2E = 1.4426950408889634
SCAN_PIPELINES = ("rotate", "slots")  # ScanBlockConfig.scan_pipeline
SOFTPLUS_THRESHOLD = 20.0  # torch.nn.functional.softplus: x > 20 -> x
IMPLS = dispatch.IMPLS
# Flip once experiments/bench_ssm.py's GPU parity check (values and VJPs vs the XLA scan) passes on an H100.
VALIDATED_ON_GPU = True  # H100 parity check passed 2026-11-22 (experiments/results/ssm_h100_2026-11-22.json)


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
    """Tuning knobs of the Triton kernel (each a power of two).

    block_d: dims per program; None picks (128 * num_warps) // dstate, i.e. a [block_d, dstate] state tile
        of 4 values per thread, which Triton lays out as 4 states x 8 dims per warp row (no barriers).
    chunk: forward steps unrolled per loop trip.
    ckpt_chunk: steps between the states the forward saves for the backward
        (f32 memory: batch * dim * dstate * 4 bytes * seqlen / ckpt_chunk).
    bwd_chunk: backward steps whose states are held in registers; each ckpt_chunk is first recomputed
        into bwd_chunk-step checkpoints in a scratch buffer (small, L2-resident), then walked backwards.
        (Per-step backward only; the chunked backward walks scan_chunk steps.)
    block_d_bwd, num_warps_bwd: dims and warps per backward program (either backward); block_d_bwd None picks
        (128 * num_warps_bwd) // dstate (chunked backward at dstate 16: 8, 5.9 ms at B8 L4096 D2048 on the H100,
        against 7.4 ms at 4 and 9.1 ms at 16).
    group_loads: each forward trip loads all its `chunk` steps' rows before its math (see the module docstring).
    prefetch: forward software pipelining: each trip loads the next trip's rows before its own math.
    time_splits: forward time segments run in parallel (two passes); lowered to the largest power of two with
        seqlen a multiple of time_splits * ckpt_chunk (1 if none).
    scan_chunk: steps of the chunked forward's register tile (0: the per-step forward, which `chunk`,
        `prefetch`, `group_loads` and `time_splits` configure).  With it, block_d None picks
        2048 * num_warps / (scan_chunk * dstate) dims per program (64 tile values per thread: 16 at dstate 16).
    scan_unroll: chunks per loop trip of the chunked forward, statically unrolled (with "slots", also its
        row buffers: chunks of load latency hidden + 1).  None: `scan_pipeline`'s rule below.
    scan_pipeline: how the chunked forward keeps rows in flight.  "rotate": three f32 row buffers carried and
        rotated (rows loaded two chunks ahead; ptxas copies the loaded registers at the next trip's top, and a
        copy waits for its load, so about one trip of latency is hidden).  "slots": `scan_unroll` buffers in
        the storage dtype, chunk k of a trip reloading buffer k after its store: no copies.  None: the fastest
        measured (H100, B8 L4096 D2048 N16, BENCHMARKS.md scan run 9): the f32 forward of inference "slots"
        with 4 chunks per trip (693 us against 750 for the previous default, exp2 one chunk ahead); otherwise
        "rotate", 1 chunk per trip in f32 and 2 in bf16 / f16 (bf16 forward 529 us against 650; the
        checkpointing forward of training 649 / 553 us f32 / bf16, against 804 / 624).
    """

    block_d: Optional[int] = None
    num_warps: int = 1
    chunk: int = 4
    ckpt_chunk: int = 64
    bwd_chunk: int = 2
    block_d_bwd: Optional[int] = None
    num_warps_bwd: int = 1
    num_stages: int = 1
    prefetch: bool = True  # H100 sweep (B8 L4096 D2048 N16 bf16): 1.90 ms vs 3.98 ms for chunk 8 without
    group_loads: bool = False
    time_splits: int = 1
    scan_chunk: int = 8
    scan_unroll: Optional[int] = None
    scan_pipeline: Optional[str] = None

    def __post_init__(self):
        for f in ("block_d", "num_warps", "chunk", "ckpt_chunk", "bwd_chunk", "block_d_bwd", "num_warps_bwd",
                  "time_splits", "scan_chunk"):
            v = getattr(self, f)
            if (v is None and f.startswith("block_d")) or (v == 0 and f == "scan_chunk"):
                continue
            if not (isinstance(v, int) and v > 0 and v & (v - 1) == 0):
                raise ValueError(f"ScanBlockConfig.{f}={v!r} must be a positive power of two")
        if self.num_stages < 1:
            raise ValueError(f"ScanBlockConfig.num_stages={self.num_stages!r} must be >= 1")
        for f in ("prefetch", "group_loads"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"ScanBlockConfig.{f}={getattr(self, f)!r} must be a bool")
        if self.scan_unroll is not None and not (isinstance(self.scan_unroll, int) and 1 <= self.scan_unroll <= 4):
            raise ValueError(f"ScanBlockConfig.scan_unroll={self.scan_unroll!r} must be None, 1, 2, 3 or 4")
        if self.scan_pipeline is not None and self.scan_pipeline not in SCAN_PIPELINES:
            raise ValueError(f"ScanBlockConfig.scan_pipeline={self.scan_pipeline!r} must be None or one of "
                             f"{SCAN_PIPELINES}")
        if self.scan_chunk and self.time_splits > 1:
            raise ValueError("ScanBlockConfig: time_splits applies to the per-step forward; set scan_chunk=0 with it")


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything static about one kernel call (hashable: a custom_vjp nondiff argument)."""

    L: int
    G: int
    Dgp: int  # dims per group, padded to a multiple of both block sizes
    Np: int  # dstate padded to a power of two
    BD: int  # forward block_d
    BDb: int  # backward block_d
    Kf: int
    K1: int
    Kb: int
    nw: int
    nwb: int
    num_stages: int
    softplus: bool
    has_D: bool
    has_z: bool
    has_bias: bool
    interpret: bool
    prefetch: bool = False
    group_loads: bool = False
    P: int = 1  # forward time segments (the forward kernels then see seqlen L / P and batch * P)
    Tc: int = 0  # steps per chunk of the chunked forward (0: the per-step forward)
    U: int = 0  # chunks per loop trip of the chunked forward (0: ScanBlockConfig.scan_unroll's rule)
    pipe: str = ""  # chunked forward: ScanBlockConfig.scan_pipeline ("": its rule)

    @property
    def NC1(self) -> int:
        return -(-self.L // self.K1)


@functools.lru_cache(maxsize=None)
def _warn_once(msg: str) -> None:
    import warnings

    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _make_static(l, g, dg, n, cfg: ScanBlockConfig, **flags) -> _Static:
    np_ = max(2, _next_pow2(n))
    auto_bd = lambda nw: max(1, (128 * nw) // np_)
    k1 = min(cfg.ckpt_chunk, _next_pow2(l))
    tc = min(cfg.scan_chunk, k1)
    # chunked: 64 tile values per thread (H100, B8 L4096 D2048 N16 f32: 702-839 us at block_d 16, 941-1202 at 8)
    fwd_bd = min(128, max(1, (2048 * cfg.num_warps) // (tc * np_))) if tc else auto_bd(cfg.num_warps)
    bd = min(cfg.block_d or fwd_bd, _next_pow2(dg))
    bdb = min(cfg.block_d_bwd or auto_bd(cfg.num_warps_bwd), _next_pow2(dg))
    step = max(bd, bdb)
    p = 1  # time segments: the most, up to time_splits, that are whole checkpoint chunks
    while 2 * p <= cfg.time_splits and l % (2 * p * k1) == 0:
        p *= 2
    return _Static(L=l, G=g, Dgp=-(-dg // step) * step, Np=np_, BD=bd, BDb=bdb, Kf=min(cfg.chunk, k1), K1=k1,
                   Kb=min(cfg.bwd_chunk, k1), nw=cfg.num_warps, nwb=cfg.num_warps_bwd, num_stages=cfg.num_stages,
                   prefetch=cfg.prefetch, group_loads=cfg.group_loads, P=1 if tc else p, Tc=tc, U=cfg.scan_unroll or 0,
                   pipe=cfg.scan_pipeline or "",
                   **flags)


def _chunk_pipeline(st: _Static, dtype, save_ckpt: bool) -> Tuple[str, int]:
    """(pipeline, chunks per trip) of the chunked forward: the config's, else the fastest measured on the H100
    (BENCHMARKS.md, scan run 9, B8 L4096 D2048 N16): "slots" with 4 chunks per trip for the f32 forward of
    inference, else "rotate" (1 chunk per trip in f32, 2 in bf16 / f16)."""
    half = jnp.dtype(dtype).itemsize == 2
    pipe = st.pipe or ("rotate" if (half or save_ckpt) else "slots")
    if st.U:
        return pipe, st.U
    if pipe == "rotate":
        return pipe, 2 if half else 1
    return pipe, 2 if save_ckpt else 4


def _compiler_params(num_warps: int, num_stages: int):
    from jax.experimental.pallas import triton as plgpu

    cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
    return cls(num_warps=num_warps, num_stages=num_stages)


def _in_names(st: _Static):
    return ["u", "dt", "A", "B", "C"] + (["D"] if st.has_D else []) + (["z"] if st.has_z else []) \
        + (["bias"] if st.has_bias else [])


def _store(ref, idx, val, mask):
    """ref[idx] = val where mask (None: unconditionally)."""
    if mask is None:
        ref[idx] = val
    else:
        from jax.experimental.pallas import triton as plgpu

        plgpu.store(ref.at[idx], val, mask=jnp.broadcast_to(mask, val.shape))


def _atomic_add(ref, idx, val):
    """ref[idx] += val atomically (unmasked: past seqlen the kernel adds exact zeros at a clamped index)."""
    from jax.experimental.pallas import triton as plgpu

    plgpu.atomic_add(ref, idx, val)


# In-kernel elementwise math on MUFU approximations.  libdevice's expf, log1pf and an IEEE division cost ~40
# (softplus) and ~20 (silu) instructions per value: a third of the chunked f32 forward's loop (offline SASS).
# These take ~15 and ~5.  Relative errors: ~2e-7 (1 + |x|), the f32 rounding of the exponent x log2 e (as in the
# scan's own exp2(dt A log2 e)) being the part that grows with |x| (f32 values are checked to 1e-5).
_ATANH_COEFFS = tuple(2.0 / (2 * k + 1) for k in range(7))  # 2 atanh(s) = s * sum_k 2 s^(2k) / (2k + 1)


def _rcp(x, interpret: bool):
    """1 / x: `rcp.approx.ftz.f32` on the GPU (one MUFU op, error below 1 ulp), a division in interpret mode."""
    if interpret:
        return 1.0 / x
    from jax.experimental.pallas import triton as plt

    [r] = plt.elementwise_inline_asm("rcp.approx.ftz.f32 $0, $1;", args=[x], constraints="=r,r", pack=1,
                                     result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])
    return r


def _exp2_k(x, interpret: bool):
    """2^x: `ex2.approx.ftz.f32` on the GPU, one MUFU op.  jnp.exp2 lowers to libdevice's exp2f, which XLA's
    Triton path builds without flush-to-zero: a compare and two predicated multiplies around every MUFU.EX2
    (Nsight Compute, H100: 216 of the f32 forward's 958 instructions per trip).  Results below 2^-126 flush to 0,
    an absolute difference under 1.2e-38."""
    if interpret:
        return jnp.exp2(x)
    from jax.experimental.pallas import triton as plt

    [r] = plt.elementwise_inline_asm("ex2.approx.ftz.f32 $0, $1;", args=[x], constraints="=r,r", pack=1,
                                     result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])
    return r


def _to_f32_k(x, interpret: bool):
    """x in f32.  bf16 / f16 through `cvt.f32.{bf16,f16}` (inline PTX) on the GPU: Triton does not move an asm
    past a layout conversion, so rows loaded as bf16 convert once per loaded value, not once per element of the
    broadcast they feed (a plain convert is rematerialised after the conversion: 8x the conversions)."""
    src = {jnp.dtype(jnp.bfloat16): "bf16", jnp.dtype(jnp.float16): "f16"}.get(jnp.dtype(x.dtype))
    if src is None or interpret:
        return x.astype(jnp.float32)
    from jax.experimental.pallas import triton as plt

    [r] = plt.elementwise_inline_asm(f"cvt.f32.{src} $0, $1;", args=[x], constraints="=r,h", pack=1,
                                     result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])
    return r


def _sigmoid_k(x, interpret: bool):
    """sigmoid(x) in a kernel: 1 / (1 + 2^(-x log2 e)); in f32 exactly 1 beyond x ~ 17.3, as torch's."""
    return _rcp(1.0 + _exp2_k(-LOG2E * x, interpret), interpret)


def _softplus_k(x, interpret: bool):
    """softplus(x) in a kernel, within ~2e-7 (1 + |x|) relative of torch's (threshold 20: beyond it both give x in
    f32): max(x, 0) + log1p(e) with e = exp(-|x|) in (0, 1], and log1p(e) = 2 atanh(s), s = e / (2 + e) <= 1/3,
    whose series to s^13 is within 2e-8 relative."""
    e = _exp2_k(-LOG2E * jnp.abs(x), interpret)
    s = e * _rcp(2.0 + e, interpret)
    s2 = s * s
    p = _ATANH_COEFFS[-1]
    for c in reversed(_ATANH_COEFFS[:-1]):
        p = fma_ops.fma(p, s2, c)
    return jnp.maximum(x, 0.0) + s * p


def _dt(st: _Static, x, bias, valid=None):
    """(x + bias, dt) for raw dt rows x in f32: dt = softplus(x + bias) when st.softplus (else x + bias), zeroed
    where not valid (None: everywhere valid).  bias None: no delta_bias."""
    if bias is not None:
        x = x + bias
    dt = _softplus_k(x, st.interpret) if st.softplus else x
    return x, (dt if valid is None else jnp.where(valid, dt, 0.0))


class _Prog:
    """Per-program constants: which (batch, group, dim block) this program owns, and its parameters."""

    def __init__(self, st: _Static, r: dict, bd: int):
        from jax.experimental import pallas as pl

        f32 = jnp.float32
        self.b, self.g, self.j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        self.dsl = pl.ds(pl.multiple_of(self.g * st.Dgp + self.j * bd, bd), bd)
        self.A = r["A"][self.dsl, :].astype(f32)
        self.A2 = self.A * LOG2E  # exp(dt A) = exp2(dt A log2 e)
        self.interpret = st.interpret
        self.D = r["D"][self.dsl].astype(f32) if st.has_D else None
        self.bias = r["bias"][self.dsl].astype(f32) if st.has_bias else None

    def load(self, r: dict, t, names) -> tuple:
        """Raw rows (storage dtype) at time t of the named inputs: this block's dims of dt/u/z, its group's B/C."""
        return tuple(r[k][self.b, t, self.g, :] if k in ("B", "C") else r[k][self.b, t, self.dsl] for k in names)

    def prep(self, st: _Static, row, valid):
        """(dt_pre_softplus, dt, u, B_t) in f32 from row(i), the raw dt, u, B rows for i = 0, 1, 2 (fetched in
        that order); dt and u zeroed where not valid (None: everywhere valid)."""
        f32 = jnp.float32
        x, dt = _dt(st, row(0).astype(f32), self.bias, valid)
        u, bt = row(1).astype(f32), row(2).astype(f32)
        if valid is not None:
            u = jnp.where(valid, u, 0.0)
        return x, dt, u, bt

    def inputs(self, st: _Static, r: dict, t_raw, partial: bool):
        """(t, valid, dt_pre_softplus, dt, u, B_t) at time t_raw (clamped; zeroed beyond seqlen if partial)."""
        t = jnp.minimum(t_raw, st.L - 1) if partial else t_raw
        valid = (t_raw < st.L) if partial else None
        return (t, valid) + self.prep(st, lambda i: self.load(r, t, (("dt", "u", "B")[i],))[0], valid)

    def step(self, h, dt, u, bt):
        return _exp2_k(dt[:, None] * self.A2, self.interpret) * h + (dt * u)[:, None] * bt[None, :]


def _fwd_kernel(*refs, st: _Static, save_ckpt: bool = False, state_only: bool = False):
    """The forward recurrence over this program's time steps (with st.P > 1 the arrays are [batch * P, L / P, ...]
    views and st.L is a segment's length).

    state_only (time-split pass 1): from h = 0, write only the end state ("last") and the sum of dt over time.
    Otherwise start from zeros (st.P > 1: from "h0", the combined segment start states) and write out, the end
    state and (save_ckpt) the state at the start of every checkpoint chunk.
    """
    from jax.experimental import pallas as pl

    names = _in_names(st) + (["h0"] if st.P > 1 and not state_only else []) \
        + (["last", "sumdt"] if state_only else ["out", "last"] + (["ckpt"] if save_ckpt else []))
    assert len(refs) == len(names)
    r = dict(zip(names, refs))
    f32 = jnp.float32
    P = _Prog(st, r, st.BD)
    Kf, K1 = st.Kf, st.K1
    partial = st.L % Kf != 0  # the last sub-chunk runs past seqlen: mask it
    clamp = partial or st.prefetch  # prefetch also loads (and drops) the sub-chunk after the last one
    fields = ("dt", "u", "B") if state_only else ("dt", "u", "B", "C") + (("z",) if st.has_z else ())
    tclamp = lambda t: jnp.minimum(t, st.L - 1) if clamp else t  # noqa: E731

    def load(t0):  # one sub-chunk's raw rows: Kf tuples of `fields`
        return tuple(P.load(r, tclamp(t0 + k), fields) for k in range(Kf))

    def sub_chunk(t0, acc, rows=None):
        """Kf steps from t0.  rows: their raw rows, loaded ahead; None: each step loads its own rows, after the
        previous step's store (neither LLVM nor ptxas moves a load above it: one load latency per step)."""
        h, sdt = acc if state_only else (acc, None)
        for k in range(Kf):
            t = tclamp(t0 + k)
            valid = (t0 + k < st.L) if partial else None
            if rows is None:
                get = lambda i, t=t: P.load(r, t, fields[i:i + 1])[0]  # noqa: E731
            else:
                get = lambda i, row=rows[k]: row[i]  # noqa: E731
            _, dt, u, bt = P.prep(st, get, valid)
            ct = None if state_only else get(3).astype(f32)
            h = P.step(h, dt, u, bt)
            if state_only:
                sdt = sdt + dt
                continue
            y = jnp.sum(h * ct[None, :], axis=1)
            if st.has_D:
                y = y + P.D * u
            if st.has_z:
                zt = get(4).astype(f32)
                y = y * (zt * _sigmoid_k(zt, st.interpret))
            _store(r["out"], (P.b, t, P.dsl), y.astype(r["out"].dtype), valid)
        return (h, sdt) if state_only else h

    h = jnp.zeros((st.BD, st.Np), f32) if state_only or st.P == 1 else r["h0"][P.b, P.dsl, :]
    acc = (h, jnp.zeros((st.BD,), f32)) if state_only else h
    if not st.prefetch:
        def trip(t0, acc):  # one sub-chunk (group_loads: all its loads first)
            return sub_chunk(t0, acc, load(t0) if st.group_loads else None)

        def chunk(c1, acc):
            if save_ckpt:
                r["ckpt"][P.b, c1, P.dsl, :] = acc
            n_sub = jnp.minimum(K1 // Kf, (st.L - c1 * K1 + Kf - 1) // Kf)
            return lax.fori_loop(0, n_sub, lambda s, a: trip(c1 * K1 + s * Kf, a), acc)

        acc = lax.fori_loop(0, st.NC1, chunk, acc)
    else:  # software pipelining over one flat loop (rows carried through nested loops get a layout of their own
        # in Triton, with a shared-memory convert at every use)
        def trip(s, carry):  # sub-chunk s, its rows loaded by the previous trip
            acc, rows = carry
            if save_ckpt:
                @pl.when(lax.rem(s, K1 // Kf) == 0)
                def _():
                    r["ckpt"][P.b, lax.div(s, K1 // Kf), P.dsl, :] = acc

            nxt = load((s + 1) * Kf)  # issued before this sub-chunk's recurrence
            return sub_chunk(s * Kf, acc, rows), nxt

        acc, _ = lax.fori_loop(0, -(-st.L // Kf), trip, (acc, load(0)))
    if state_only:
        r["last"][P.b, P.dsl, :], r["sumdt"][P.b, P.dsl] = acc
    else:
        r["last"][P.b, P.dsl, :] = acc


def _fwd_chunk_kernel(*refs, st: _Static, save_ckpt: bool = False):
    """The chunked forward: each loop trip scans a [Tc, dstate, block_d] tile in registers.

    h0 enters through the first step (b_0 += a_0 h0), so `linear_scan`'s h is the state itself; the tile's time
    axis is its slowest, which Triton keeps within each thread (a sequential in-register scan, no shuffles), and
    dstate is mostly in-thread too (the <h, C> sum is FMAs plus at most a shuffle or two).  Rows are loaded ahead
    of their chunk through `_chunk_pipeline`'s pipeline; a chunk's exp2 (MUFU) and its scan's FMA chain are one
    trip's work, so ptxas interleaves them (computed a chunk ahead, its 64 MUFU ops ended up in a row at the end of
    the trip).
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    names = _in_names(st) + ["out", "last"] + (["ckpt"] if save_ckpt else [])
    assert len(refs) == len(names)
    r = dict(zip(names, refs))
    f32 = jnp.float32
    T, BD, Np = st.Tc, st.BD, st.Np
    b, g, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    dsl = pl.ds(pl.multiple_of(g * st.Dgp + j * BD, BD), BD)
    A2 = (r["A"][dsl, :].astype(f32) * LOG2E).T  # [Np, BD]: exp(dt A) = exp2(dt A log2 e)
    Dv = r["D"][dsl].astype(f32) if st.has_D else None
    bias = r["bias"][dsl].astype(f32) if st.has_bias else None
    nch = -(-st.L // T)
    partial = st.L % T != 0
    fields = ("dt", "u", "B", "C") + (("z",) if st.has_z else ())
    ti = lax.broadcasted_iota(jnp.int32, (T, Np, BD), 0)
    per_ckpt = st.K1 // T

    def valid(c):  # [T, 1]: steps of chunk c before seqlen
        return (c * T + lax.broadcasted_iota(jnp.int32, (T, 1), 0)) < st.L

    def load(c, f32_rows: bool = True):  # rows of chunk c (past the last chunk: the last one again, never used)
        # in f32 (rotate) or the storage dtype (slots).  Rotated rows convert at the load: converted later, Triton
        # converted them after their broadcast, per tile element (bf16: 1140 -> 795 SASS instructions per trip)
        c = jnp.minimum(c, nch - 1)
        tsl = pl.ds(pl.multiple_of(c * T, T), T)
        idx = lambda k: (b, tsl, g, slice(None)) if k in ("B", "C") else (b, tsl, dsl)  # noqa: E731
        cast = (lambda v: v.astype(f32)) if f32_rows else (lambda v: v)  # noqa: E731
        if not partial:
            return tuple(cast(r[k][idx(k)]) for k in fields)
        m = valid(c)
        return tuple(cast(plgpu.load(r[k].at[idx(k)], mask=jnp.broadcast_to(m, (T, Np if k in ("B", "C") else BD)),
                                     other=0)) for k in fields)

    def dt_exp(c, x):  # (dt [T, BD], exp(dt A) [T, Np, BD]) of chunk c from its raw dt rows; dt = 0 past seqlen
        dt = _dt(st, x, bias, valid(c) if partial else None)[1]
        return dt, _exp2_k(dt[:, None, :] * A2[None], st.interpret)

    def scan_chunk(c, h0, rows):
        """Chunk c from state h0 and its rows (dt, u, B, C[, z]; f32 or the storage dtype): stores out, returns
        the chunk's last state."""
        dt, a = dt_exp(c, _to_f32_k(rows[0], st.interpret))
        if save_ckpt:
            @pl.when(lax.rem(c, per_ckpt) == 0)
            def _():
                r["ckpt"][b, lax.div(c, per_ckpt), dsl, :] = h0.T

        u, bt, ct = (_to_f32_k(v, st.interpret) for v in rows[1:4])
        x = (dt * u)[:, None, :] * bt[:, :, None]
        x = jnp.where(ti == 0, fma_ops.fma(a, h0[None], x), x)
        _, h = linear_scan.linear_scan(a, x, axis=0)
        y = fma_ops.dot_sum(h, ct[:, :, None], axis=1)  # [T, BD]
        if st.has_D:
            y = fma_ops.fma(Dv[None, :], u, y)
        if st.has_z:
            zt = _to_f32_k(rows[4], st.interpret)
            y = y * (zt * _sigmoid_k(zt, st.interpret))
        tsl = pl.ds(pl.multiple_of(c * T, T), T)
        _store(r["out"], (b, tsl, dsl), y.astype(r["out"].dtype), valid(c) if partial else None)
        return jnp.sum(jnp.where(ti == T - 1, h, -0.0), axis=0)  # x + -0.0 folds away: no adds

    pipe, unroll = _chunk_pipeline(st, jnp.dtype(r["u"].dtype), save_ckpt)
    h0 = jnp.zeros((Np, BD), f32)
    if pipe == "slots":  # `unroll` row buffers, one per chunk of a trip: chunk i U + k reads buffer k, then
        # reloads it with chunk (i + 1) U + k after its store (no load passes a store that may alias), so the new
        # rows take the buffer's own registers: no copies (a copy of loaded registers waits for the load), and
        # U - 1 chunks of latency to hide.  Rows stay in their storage dtype until used (`_to_f32_k`).
        def trips(i, carry):
            h, slots = carry
            slots = list(slots)
            for k in range(unroll):
                c = i * unroll + k
                h = scan_chunk(c, h, slots[k])
                slots[k] = load(c + unroll, False)
            return h, tuple(slots)

        h0, slots = lax.fori_loop(0, nch // unroll, trips, (h0, tuple(load(k, False) for k in range(unroll))))
        for k in range(nch % unroll):  # the chunks left over, from their buffers
            h0 = scan_chunk(jnp.int32(nch - nch % unroll + k), h0, slots[k])
    else:  # three f32 row buffers carried and rotated (this chunk's, the next one's, the one in flight)
        def trip(c, carry):
            h, cur, nxt = carry
            ahead = load(c + 2)  # in flight during this trip's math
            return scan_chunk(c, h, cur), nxt, ahead

        def trips(i, carry):  # `unroll` chunks, statically unrolled
            for k in range(unroll):
                carry = trip(i * unroll + k, carry)
            return carry

        carry = lax.fori_loop(0, nch // unroll, trips, (h0, load(0), load(1)))
        for c in range(nch - nch % unroll, nch):  # the chunks left over, unrolled after the loop
            carry = trip(jnp.int32(c), carry)
        h0 = carry[0]
    r["last"][b, dsl, :] = h0.T


def _bwd_refs(st: _Static, refs) -> dict:
    """A backward kernel's refs by name: inputs, checkpoints, cotangents, dB/dC zeros (aliased), then outputs."""
    names = _in_names(st) + ["ckpt", "dout", "dlast", "dB_in", "dC_in", "du", "ddt"] \
        + (["dz"] if st.has_z else []) + ["dA"] + (["dD"] if st.has_D else []) \
        + (["dbias"] if st.has_bias else []) + ["dB", "dC", "scratch"]
    assert len(refs) == len(names)
    return dict(zip(names, refs))


def _bwd_kernel(*refs, st: _Static):
    from jax.experimental.pallas import triton as plgpu

    r = _bwd_refs(st, refs)
    f32 = jnp.float32
    BD, Kb, K1 = st.BDb, st.Kb, st.K1
    P = _Prog(st, r, BD)
    J = st.Dgp // BD
    prog = (P.b * st.G + P.g) * J + P.j
    partial = st.L % Kb != 0

    def recompute(t0, h):
        hs, ins = [], []
        for k in range(Kb):
            inp = P.inputs(st, r, t0 + k, partial)
            h = P.step(h, *inp[3:])
            hs.append(h)
            ins.append(inp)
        return hs, ins

    def reverse(t0, h0, carry):
        lam, dA_acc, dD_acc, dbias_acc = carry
        hs, ins = recompute(t0, h0)
        for k in reversed(range(Kb)):
            t, valid, x, dt, u, bt = ins[k]
            h_t, h_prev = hs[k], (hs[k - 1] if k else h0)
            ct = r["C"][P.b, t, P.g, :].astype(f32)
            go = r["dout"][P.b, t, P.dsl].astype(f32)
            if st.has_z:
                zt = r["z"][P.b, t, P.dsl].astype(f32)
                sz = _sigmoid_k(zt, st.interpret)
                y = jnp.sum(h_t * ct[None, :], axis=1)
                if st.has_D:
                    y = y + P.D * u
                _store(r["dz"], (P.b, t, P.dsl), (go * y * sz * (1.0 + zt * (1.0 - sz))).astype(r["dz"].dtype), valid)
                dy = go * zt * sz
            else:
                dy = go
            if partial:
                dy = jnp.where(valid, dy, 0.0)
            _atomic_add(r["dC"], (P.b, t, P.g, slice(None)), jnp.sum(h_t * dy[:, None], axis=0))
            lam = lam + dy[:, None] * ct[None, :]
            s_b = jnp.sum(lam * bt[None, :], axis=1)
            du, ddt = dt * s_b, u * s_b
            if st.has_D:
                du = du + dy * P.D
                dD_acc = dD_acc + dy * u
            _atomic_add(r["dB"], (P.b, t, P.g, slice(None)), jnp.sum(lam * (dt * u)[:, None], axis=0))
            a = _exp2_k(dt[:, None] * P.A2, st.interpret)
            q = lam * h_prev * a
            ddt = ddt + jnp.sum(q * P.A, axis=1)
            dA_acc = dA_acc + q * dt[:, None]
            lam = lam * a
            if st.softplus:
                ddt = ddt * _sigmoid_k(x, st.interpret)  # softplus' (1 beyond the threshold too)
            if partial:
                ddt = jnp.where(valid, ddt, 0.0)
            if st.has_bias:
                dbias_acc = dbias_acc + ddt
            _store(r["du"], (P.b, t, P.dsl), du.astype(r["du"].dtype), valid)
            _store(r["ddt"], (P.b, t, P.dsl), ddt.astype(r["ddt"].dtype), valid)
        return lam, dA_acc, dD_acc, dbias_acc

    def chunk(i, carry):
        c1 = st.NC1 - 1 - i
        n_sub = jnp.minimum(K1 // Kb, (st.L - c1 * K1 + Kb - 1) // Kb)

        def save(s, h):  # pass 1: the chunk's Kb-step checkpoints into this program's scratch rows
            r["scratch"][prog, s, :, :] = h
            return recompute(c1 * K1 + s * Kb, h)[0][-1]

        lax.fori_loop(0, n_sub, save, r["ckpt"][P.b, c1, P.dsl, :])
        if not st.interpret:
            plgpu.debug_barrier()  # scratch writes visible to every thread of the program

        def back(i2, carry):  # pass 2: walk the sub-chunks backwards
            s = n_sub - 1 - i2
            return reverse(c1 * K1 + s * Kb, r["scratch"][prog, s, :, :], carry)

        return lax.fori_loop(0, n_sub, back, carry)

    zv = jnp.zeros((BD,), f32)
    init = (r["dlast"][P.b, P.dsl, :].astype(f32), jnp.zeros((BD, st.Np), f32), zv, zv)
    _, dA_acc, dD_acc, dbias_acc = lax.fori_loop(0, st.NC1, chunk, init)
    r["dA"][P.b, P.dsl, :] = dA_acc
    if st.has_D:
        r["dD"][P.b, P.dsl] = dD_acc
    if st.has_bias:
        r["dbias"][P.b, P.dsl] = dbias_acc


def _bwd_chunk_kernel(*refs, st: _Static):
    """The chunked backward (with the chunked forward): per [Tc, dstate, block_d] tile, walked in reverse.

    Per checkpoint chunk, pass 1 recomputes the Tc-step chunks' start states into this program's scratch rows;
    pass 2 walks the chunks backwards.  In a chunk: h from the forward `linear_scan`; the adjoint
    L_t = dL/dh_t = dy_t C_t + a_{t+1} L_{t+1} from a reverse `linear_scan` whose multipliers are the exp2 of the
    rows one step later (the next chunk's L_{t0+Tc} enters through the last step); a_t h_{t-1} = h_t - dt_t u_t B_t.
    dB and dC (sums over dims) are atomic adds of [Tc, dstate] tiles into time-padded buffers (no masks); steps
    past seqlen have dt = 0 and dy = 0, the identity, so they add zeros and carry L through unchanged.
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    r = _bwd_refs(st, refs)
    f32 = jnp.float32
    T, BD, Np, K1 = st.Tc, st.BDb, st.Np, st.K1
    b, g, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    prog = (b * st.G + g) * (st.Dgp // BD) + j
    dsl = pl.ds(pl.multiple_of(g * st.Dgp + j * BD, BD), BD)
    A = r["A"][dsl, :].astype(f32).T  # [Np, BD]
    A2 = A * LOG2E
    Dv = r["D"][dsl].astype(f32) if st.has_D else None
    bias = r["bias"][dsl].astype(f32) if st.has_bias else None
    partial = st.L % T != 0
    ti = lax.broadcasted_iota(jnp.int32, (T, Np, BD), 0)
    per = K1 // T

    def valid(t0):  # [T, 1]
        return (t0 + lax.broadcasted_iota(jnp.int32, (T, 1), 0)) < st.L

    def load(k, t0, masked):
        tsl = pl.ds(t0, T)
        idx = (b, tsl, g, slice(None)) if k in ("B", "C") else (b, tsl, dsl)
        if not masked:
            return r[k][idx].astype(f32)
        m = jnp.broadcast_to(valid(t0), (T, Np if k in ("B", "C") else BD))
        return plgpu.load(r[k].at[idx], mask=m, other=0).astype(f32)

    def dt_of(t0, masked):  # (pre-softplus x, dt) of rows t0..t0+T-1; dt = 0 past seqlen
        return _dt(st, load("dt", t0, masked), bias, valid(t0) if masked else None)

    def forward(t0, h0):  # (x_pre, dt, u, B, a, dt u B, h) of the chunk at t0 from its start state h0
        x_pre, dt = dt_of(t0, partial)
        u, bt = load("u", t0, partial), load("B", t0, partial)
        a = _exp2_k(dt[:, None, :] * A2[None], st.interpret)
        xb = (dt * u)[:, None, :] * bt[:, :, None]
        _, h = linear_scan.linear_scan(a, jnp.where(ti == 0, xb + a * h0[None], xb), axis=0)
        return x_pre, dt, u, bt, a, xb, h

    def last_of(h):
        return jnp.sum(jnp.where(ti == T - 1, h, 0.0), axis=0)

    def backward(t0, h0, lam, accs):
        dA_acc, dD_acc, dbias_acc = accs
        x_pre, dt, u, bt, a, xb, h = forward(t0, h0)
        _, dtn = dt_of(t0 + 1, True)  # the rows one step later (past seqlen: dt = 0)
        an = _exp2_k(dtn[:, None, :] * A2[None], st.interpret)
        ct, go = load("C", t0, partial), load("dout", t0, partial)
        tsl = pl.ds(t0, T)
        vmask = valid(t0) if partial else None
        if st.has_z:
            zt = load("z", t0, partial)
            sz = _sigmoid_k(zt, st.interpret)
            y = jnp.sum(h * ct[:, :, None], axis=1)
            if st.has_D:
                y = y + Dv[None, :] * u
            _store(r["dz"], (b, tsl, dsl), (go * y * sz * (1.0 + zt * (1.0 - sz))).astype(r["dz"].dtype), vmask)
            dy = go * zt * sz
        else:
            dy = go
        gq = dy[:, None, :] * ct[:, :, None]
        _, lt = linear_scan.linear_scan(an, jnp.where(ti == T - 1, gq + an * lam[None], gq), axis=0, reverse=True)
        q = lt * (h - xb)  # L_t a_t h_{t-1}
        s_b = jnp.sum(lt * bt[:, :, None], axis=1)  # [T, BD]
        du = dt * s_b
        if st.has_D:
            du = du + dy * Dv[None, :]
            dD_acc = dD_acc + jnp.sum(dy * u, axis=0)
        ddt = u * s_b + jnp.sum(q * A[None], axis=1)
        dA_acc = dA_acc + jnp.sum(q * dt[:, None, :], axis=0)
        plgpu.atomic_add(r["dB"], (b, tsl, g, slice(None)), jnp.sum(lt * (dt * u)[:, None, :], axis=2))
        plgpu.atomic_add(r["dC"], (b, tsl, g, slice(None)), jnp.sum(h * dy[:, None, :], axis=2))
        if st.softplus:
            ddt = ddt * _sigmoid_k(x_pre, st.interpret)  # softplus' (1 beyond the threshold too)
        if partial:
            ddt = jnp.where(vmask, ddt, 0.0)
        if st.has_bias:
            dbias_acc = dbias_acc + jnp.sum(ddt, axis=0)
        _store(r["du"], (b, tsl, dsl), du.astype(r["du"].dtype), vmask)
        _store(r["ddt"], (b, tsl, dsl), ddt.astype(r["ddt"].dtype), vmask)
        return jnp.sum(jnp.where(ti == 0, lt, 0.0), axis=0), (dA_acc, dD_acc, dbias_acc)

    def chunk(i, carry):  # checkpoint chunk c1, from the last
        c1 = st.NC1 - 1 - i
        n_sub = jnp.minimum(per, (st.L - c1 * K1 + T - 1) // T)

        def save(s, h):  # pass 1: the Tc-step chunks' start states
            r["scratch"][prog, s, :, :] = h
            return last_of(forward(pl.multiple_of(c1 * K1 + s * T, T), h)[-1])

        lax.fori_loop(0, n_sub, save, r["ckpt"][b, c1, dsl, :].T)
        if not st.interpret:
            plgpu.debug_barrier()  # scratch writes visible to every thread of the program

        def back(i2, carry):  # pass 2: the chunks backwards
            s = n_sub - 1 - i2
            lam, accs = carry
            return backward(pl.multiple_of(c1 * K1 + s * T, T), r["scratch"][prog, s, :, :], lam, accs)

        return lax.fori_loop(0, n_sub, back, carry)

    zv = jnp.zeros((BD,), f32)
    init = (r["dlast"][b, dsl, :].astype(f32).T, (jnp.zeros((Np, BD), f32), zv, zv))
    _, (dA_acc, dD_acc, dbias_acc) = lax.fori_loop(0, st.NC1, chunk, init)
    r["dA"][b, dsl, :] = dA_acc.T
    if st.has_D:
        r["dD"][b, dsl] = dD_acc
    if st.has_bias:
        r["dbias"][b, dsl] = dbias_acc


def _segment_starts(A, S, sumdt, bsz: int, P: int):
    """Start state of every time segment: h0[0] = 0, h0[p+1] = exp(A * sumdt[p]) * h0[p] + S[p] (f32).

    S [bsz * P, dim, n] segment end states from zero, sumdt [bsz * P, dim]; returns [bsz * P, dim, n]."""
    A = A.astype(jnp.float32)
    S, sumdt = S.reshape((bsz, P) + S.shape[1:]), sumdt.reshape((bsz, P) + sumdt.shape[1:])

    def step(h, xs):
        s, d = xs
        return jnp.exp(d[..., None] * A) * h + s, h

    _, h0 = lax.scan(step, jnp.zeros_like(S[:, 0]), (jnp.moveaxis(S, 1, 0), jnp.moveaxis(sumdt, 1, 0)))
    return jnp.moveaxis(h0, 0, 1).reshape((bsz * P,) + S.shape[2:])


def _call_fwd(st: _Static, args, save_ckpt: bool):
    """(out, last[, ckpt]).  With st.P > 1: the state pass over [batch * P, L / P] views (free reshapes), the
    combine in XLA, then the forward from the segment start states; its checkpoints reshape to [batch, NC1, ...]."""
    from jax.experimental import pallas as pl

    u = args[0]
    bsz, L, Dp = u.shape
    f32 = jnp.float32
    sds = jax.ShapeDtypeStruct
    P = st.P
    seg = dataclasses.replace(st, L=L // P)  # P * K1 divides L (_make_static)
    if P > 1:  # u, dt, B, C, z: [bsz, L, ...] -> [bsz * P, L / P, ...]
        args = [a.reshape((bsz * P, L // P) + a.shape[2:]) if k in ("u", "dt", "B", "C", "z") else a
                for k, a in zip(_in_names(st), args)]
    last_sd = sds((bsz * P, Dp, st.Np), f32)  # one end state per (batch, segment)

    def call(out_shape, *a, name, **kw):
        return pl.pallas_call(
            functools.partial(_fwd_chunk_kernel if st.Tc else _fwd_kernel, st=seg, **kw),
            out_shape=tuple(out_shape),
            grid=(bsz * P, st.G, st.Dgp // st.BD),
            interpret=st.interpret,
            compiler_params=None if st.interpret else _compiler_params(st.nw, st.num_stages),
            name=name,
        )(*a)

    h0 = []
    if P > 1:
        S, sumdt = call([last_sd, sds((bsz * P, Dp), f32)], *args, name="selective_scan_state", state_only=True)
        h0 = [_segment_starts(args[2], S, sumdt, bsz, P)]
    out_shape = [sds((bsz * P, L // P, Dp), u.dtype), last_sd]
    if save_ckpt:
        out_shape.append(sds((bsz * P, seg.NC1, Dp, st.Np), f32))
    out, last, *ckpt = call(out_shape, *args, *h0, name="selective_scan_fwd", save_ckpt=save_ckpt)
    if P > 1:
        out, last = out.reshape(bsz, L, Dp), last.reshape(bsz, P, Dp, st.Np)[:, -1]
        ckpt = [c.reshape(bsz, st.NC1, Dp, st.Np) for c in ckpt]
    return (out, last, *ckpt)


def _call_bwd(st: _Static, args, ckpt, dout, dlast):
    from jax.experimental import pallas as pl

    u, dt = args[0], args[1]
    bsz, L, Dp = u.shape
    bd = st.BDb
    J = st.Dgp // bd
    f32 = jnp.float32
    out_shape = [jax.ShapeDtypeStruct(u.shape, u.dtype), jax.ShapeDtypeStruct(dt.shape, dt.dtype)]
    if st.has_z:
        z = args[5 + int(st.has_D)]
        out_shape.append(jax.ShapeDtypeStruct(z.shape, z.dtype))
    out_shape.append(jax.ShapeDtypeStruct((bsz, Dp, st.Np), f32))
    if st.has_D:
        out_shape.append(jax.ShapeDtypeStruct((bsz, Dp), f32))
    if st.has_bias:
        out_shape.append(jax.ShapeDtypeStruct((bsz, Dp), f32))
    lp = -(-L // st.Tc) * st.Tc if st.Tc else L  # chunked: dB / dC padded to whole chunks (unmasked atomics)
    bc = (bsz, lp, st.G, st.Np)
    scratch = (bsz * st.G * J, st.K1 // st.Tc, st.Np, bd) if st.Tc else (bsz * st.G * J, st.K1 // st.Kb, bd, st.Np)
    out_shape += [jax.ShapeDtypeStruct(bc, f32), jax.ShapeDtypeStruct(bc, f32), jax.ShapeDtypeStruct(scratch, f32)]
    n_in = len(args) + 5
    aliases = {n_in - 2: len(out_shape) - 3, n_in - 1: len(out_shape) - 2}  # dB, dC accumulate into zeros
    grads = pl.pallas_call(
        functools.partial(_bwd_chunk_kernel if st.Tc else _bwd_kernel, st=st),
        out_shape=tuple(out_shape),
        grid=(bsz, st.G, J),
        input_output_aliases=aliases,
        interpret=st.interpret,
        compiler_params=None if st.interpret else _compiler_params(st.nwb, st.num_stages),
        name="selective_scan_bwd",
    )(*args, ckpt, dout, dlast, jnp.zeros(bc, f32), jnp.zeros(bc, f32))[:-1]
    if lp != L:
        grads = grads[:-2] + tuple(x[:, :L] for x in grads[-2:])
    return grads


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
    dA = grads.pop(0).sum(0)
    dD = grads.pop(0).sum(0) if st.has_D else None
    dbias = grads.pop(0).sum(0) if st.has_bias else None
    dB, dC = grads
    names = _in_names(st)
    a = dict(zip(names, args))
    g = {"u": du, "dt": ddt, "A": dA, "B": dB, "C": dC, "D": dD, "z": dz, "bias": dbias}
    return tuple(g[k].astype(a[k].dtype) for k in names)


_scan_core.defvjp(_scan_core_fwd, _scan_core_bwd)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus: bool = False,
                          *, config: Optional[ScanBlockConfig] = None, interpret: bool = False):
    """The Pallas kernel (differentiable); same contract as `reference`."""
    b, l, d, g, n = check_inputs(u, delta, A, B, C, D, z, delta_bias)
    dg = d // g
    cfg = config or ScanBlockConfig()
    if cfg.scan_chunk and linear_scan.TRITON_ERROR and not interpret:  # this jax moved Pallas' lowering table
        _warn_once(f"selective_scan: the chunked forward cannot lower here ({linear_scan.TRITON_ERROR}); "
                   "using the per-step forward (scan_chunk=0)")
        cfg = dataclasses.replace(cfg, scan_chunk=0)
    st = _make_static(l, g, dg, n, cfg, softplus=bool(delta_softplus),
                      has_D=D is not None, has_z=z is not None, has_bias=delta_bias is not None,
                      interpret=bool(interpret))
    dgp, np_ = st.Dgp, st.Np

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
def unsupported(interpret: bool = False) -> dict:
    """Reasons the Pallas implementations cannot be picked (kernels.dispatch `unsupported=`)."""
    out = {"mosaic": "no Mosaic GPU selective scan; the Triton kernel serves sm80+ including sm90"}
    if not (VALIDATED_ON_GPU or interpret or dispatch.allow_unvalidated()):
        out["triton"] = ("the selective-scan Triton kernel is not yet validated on a GPU (experiments/bench_ssm.py "
                         "checks it; IVA_KERNELS_ALLOW_UNVALIDATED=1 uses it anyway)")
    return out


def triton_supported(interpret: bool = False) -> bool:
    """True where `impl="auto"` picks the Triton kernel (a validated kernel on an sm80+ CUDA GPU)."""
    return dispatch.select_impl("selective_scan", "auto", interpret=interpret, unsupported=unsupported(interpret),
                                preference=("triton",), log=False) == "triton"


def explain_auto() -> dict[str, tuple[str, str]]:
    """What `impl="auto"` picks here, and why."""
    return {"any shape": dispatch.explain("selective_scan", unsupported=unsupported(), preference=("triton",))}


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus: bool = False, *,
                   impl: str = "auto", interpret: bool = False, config: Optional[ScanBlockConfig] = None):
    """Selective scan in channels-last layout; returns (out, last_state).

    impl: "xla" (the `lax.scan` reference), "triton"/"pallas" (the Pallas kernel; interpret=True runs it
    on CPU), "auto" (triton on sm80+ GPUs once validated there, else xla; logged once by kernels.dispatch).
    """
    choice = dispatch.select_impl("selective_scan", impl, interpret=interpret, unsupported=unsupported(interpret),
                                  preference=("triton",))
    if choice == "xla":
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
           "unsupported", "explain_auto", "VALIDATED_ON_GPU", "check_inputs", "softplus", "copy_bytes"]
