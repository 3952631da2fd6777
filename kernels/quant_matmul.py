"""Weight-only quantized matmul: y = x @ dequant(W) for int8 / int4 group-wise weights (decode shapes).

Weight format (one group = `group_size` consecutive rows of W [K, N], one scale per group and column):
  * bits 8:  qweight int8 [K, N] (symmetric, q in [-127, 127]) or uint8 [K, N] (asymmetric, u in [0, 255]).
  * bits 4:  qweight uint8 [K / 2, N], two 4-bit codes u in [0, 15] per byte, packed WITHIN each group:
             byte r of group g holds row g*G + r in its low nibble and row g*G + G/2 + r in its high
             nibble (so a kernel reads one group as two contiguous half-groups).  Symmetric codes are
             q + 8 (q in [-7, 7]).
  * scale [K / G, N] (float16 or float32); zero [K / G, N] or None.
  dequant:  symmetric  W[k, n] = q[k, n] * scale[g, n]                      (g = k // G)
            asymmetric W[k, n] = u[k, n] * scale[g, n] + zero[g, n]         (zero = the group's minimum)

Implementations (all accumulate in f32; output in x.dtype unless `out_dtype`):
  * "xla":    up to 16 rows, per-group dots on the codes with the scales applied to the partial sums;
              above, dequantize to x's dtype and one jnp.dot (`reference`: dequantise in f32/f64).
  * "triton": Pallas-Triton kernels, grid (column block, [row block,] k-split), both memory-bound
              streams of the packed codes (int4: one byte for two weights) with f32 accumulation:
              - rows <= `QuantBlocks.dot_rows` (decode, M = 1..4): a GEMV.  Per group the codes tile
                [rows, block_n] is widened to int32 and turned into exact f32 values by the exponent
                trick bitcast(code | 0x4B000000) - 2^23 (integer ops + one add: no int->float
                conversion instructions, which throttled the int4 path), multiplied by the broadcast
                activations and summed over the group's rows (no tl.dot), then scaled (and zero *
                sum(x) added) once per group and column.
              - more rows: the same decode of the codes, exact in x's dtype, one tl.dot per group on
                [16, group] x [group, block_n] tiles, scale applied to the f32 partial.
              Each program unrolls `block_k // group_size` groups per loop step (all loads first, for
              many bytes in flight); k-splits (enough programs to fill the SMs) write f32 partials that
              one small XLA sum combines (deterministic, no atomics).  VJP w.r.t. x through XLA.
Until the kernel has passed `experiments/bench_inference.py --check` on a GPU, `auto` keeps XLA.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import dispatch

try:
    from jax.experimental.pallas import triton as plt
except ImportError:  # pragma: no cover
    plt = None

_F32 = jnp.float32
_FLOATS = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
_MAX_KERNEL_ROWS = 16  # H100, 2026-11-22: faster than XLA at M<=16, slower at M=64
_GROUPED_ROWS = 16  # XLA path: per-group dots up to this many rows
_GPU_VALIDATED = True  # H100, jax 0.11.2, 2026-11-22: bench_inference --only check, 12/12 PASS (int4/int8, sym/asym, M 1/7/16)


@dataclasses.dataclass(frozen=True)
class QuantBlocks:
    """Kernel tiling (all swept by experiments/bench_inference.py --sweep): columns per program,
    K rows per loop step (a multiple of the group size; rounded down to one), k-splits (None =
    enough programs for ~4 per SM), warps, pipeline stages, and the row count up to which the
    multiply-reduce GEMV is used instead of 16-row tl.dot tiles."""

    block_n: int = 128
    block_k: int = 256
    num_splits: Optional[int] = None
    num_warps: int = 4
    num_stages: int = 1  # the H100 sweep picked 1 stage in all four cases (int4/int8, M 1/16)
    dot_rows: int = 4

    def __post_init__(self):
        for name in ("block_n", "block_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 16 or v & (v - 1):
                raise ValueError(f"QuantBlocks.{name} must be a power of 2 >= 16, got {v!r}")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"QuantBlocks.num_splits must be >= 1, got {self.num_splits}")
        if self.num_warps < 1 or self.num_stages < 1 or self.dot_rows < 0:
            raise ValueError(f"QuantBlocks: num_warps/num_stages must be >= 1 and dot_rows >= 0, got {self}")


# ----------------------------------------------------------------------------- format helpers

def unpack_int4(packed: jax.Array, group_size: int) -> jax.Array:
    """uint8 [..., K/2, N] (packed within groups) -> uint8 codes [..., K, N] in [0, 15]."""
    *lead, kh, n = packed.shape
    g = group_size
    p = packed.reshape(*lead, (2 * kh) // g, g // 2, n)
    lo = p & jnp.uint8(15)
    hi = p >> jnp.uint8(4)
    return jnp.concatenate([lo, hi], axis=-2).reshape(*lead, 2 * kh, n)


def pack_int4(codes: jax.Array, group_size: int) -> jax.Array:
    """uint8 codes [..., K, N] in [0, 15] -> [..., K/2, N] (low nibble: first half of each group)."""
    *lead, k, n = codes.shape
    g = group_size
    c = codes.astype(jnp.uint8).reshape(*lead, k // g, g, n)
    lo, hi = c[..., : g // 2, :], c[..., g // 2:, :]
    return (lo | (hi << jnp.uint8(4))).reshape(*lead, k // 2, n)


def dequantize(qweight: jax.Array, scale: jax.Array, zero: Optional[jax.Array], *, bits: int, group_size: int,
               dtype: Any = jnp.float32) -> jax.Array:
    """The float weight [..., K, N] the codes stand for, in `dtype` (arithmetic in f32, or f64 for f64)."""
    acc = jnp.promote_types(dtype, _F32)
    if bits == 4:
        codes = unpack_int4(qweight, group_size).astype(acc)
        if zero is None:
            codes = codes - 8.0
    else:
        codes = qweight.astype(acc)
    *lead, k, n = codes.shape
    w = codes.reshape(*lead, k // group_size, group_size, n) * scale.astype(acc)[..., None, :]
    if zero is not None:
        w = w + zero.astype(acc)[..., None, :]
    return w.reshape(*lead, k, n).astype(dtype)


def reference(x: jax.Array, qweight: jax.Array, scale: jax.Array, zero: Optional[jax.Array] = None, *, bits: int,
              group_size: int, out_dtype: Any = None) -> jax.Array:
    """x [M, K] @ dequantize(...) in f32 (f64 for f64 x): the definition."""
    acc = jnp.promote_types(x.dtype, _F32)
    w = dequantize(qweight, scale, zero, bits=bits, group_size=group_size, dtype=acc)
    y = jnp.dot(x.astype(acc), w, precision=lax.Precision.HIGHEST)
    return y.astype(out_dtype or x.dtype)


def _xla(x, qweight, scale, zero, bits, group_size, out_dtype):
    prec = lax.Precision.HIGHEST if x.dtype == _F32 else None
    m, k = x.shape
    if m > _GROUPED_ROWS:  # prefill: dequantise once, one GEMM
        w = dequantize(qweight, scale, zero, bits=bits, group_size=group_size, dtype=x.dtype)
        return jnp.dot(x, w, preferred_element_type=_F32, precision=prec).astype(out_dtype)
    # decode: per-group dots on the raw codes, scales applied to the [M, groups, N] partial sums
    # (never materialises the float weight; several times faster than the dequantised GEMM on CPU)
    acc = jnp.promote_types(x.dtype, _F32)
    ng, g, n = k // group_size, group_size, scale.shape[1]
    if jax.default_backend() == "cpu":  # XLA:CPU has no bf16 x bf16 -> f32 dot for every shape
        x = x.astype(acc)
        prec = lax.Precision.HIGHEST
    xg = x.reshape(m, ng, g)
    if bits == 4:
        p = qweight.reshape(ng, g // 2, n)
        lo, hi = p & jnp.uint8(15), p >> jnp.uint8(4)
        if zero is None:
            lo, hi = lo.astype(jnp.int8) - 8, hi.astype(jnp.int8) - 8
        parts = ((xg[..., : g // 2], lo), (xg[..., g // 2:], hi))
    else:
        parts = ((xg, qweight.reshape(ng, g, n)),)
    part = sum(jnp.einsum("mgk,gkn->mgn", xp, c.astype(x.dtype), preferred_element_type=acc, precision=prec)
               for xp, c in parts)
    y = jnp.einsum("mgn,gn->mn", part, scale.astype(acc), precision=prec)
    if zero is not None:
        y = y + jnp.einsum("mg,gn->mn", jnp.sum(xg.astype(acc), axis=-1), zero.astype(acc), precision=prec)
    return y.astype(out_dtype)


# ----------------------------------------------------------------------------- checks and dispatch

def _check(x, qweight, scale, zero, bits, group_size):
    if bits not in (4, 8):
        raise ValueError(f"quant_matmul: bits must be 4 or 8, got {bits!r}")
    if x.ndim != 2 or qweight.ndim != 2:
        raise ValueError(f"quant_matmul: x must be [M, K] and qweight 2-D, got {x.shape}, {qweight.shape}")
    k = x.shape[1]
    if not isinstance(group_size, int) or group_size < 2 or group_size % 2 or k % group_size:
        raise ValueError(f"quant_matmul: group_size {group_size!r} must be an even divisor of in_features {k}")
    want = (k // 2 if bits == 4 else k, scale.shape[1])
    if qweight.shape != want or scale.shape[0] != k // group_size:
        raise ValueError(f"quant_matmul: x {x.shape} needs qweight {want} and scale ({k // group_size}, N); "
                         f"got {qweight.shape}, {scale.shape}")
    if zero is not None and zero.shape != scale.shape:
        raise ValueError(f"quant_matmul: zero shape {zero.shape} != scale shape {scale.shape}")
    want_dt = jnp.uint8 if (bits == 4 or zero is not None) else jnp.int8
    if qweight.dtype != want_dt:
        raise ValueError(f"quant_matmul: bits={bits} {'asymmetric' if zero is not None else 'symmetric'} codes "
                         f"must be {jnp.dtype(want_dt).name}, got {qweight.dtype}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"quant_matmul: x dtype {x.dtype} is not floating")


def _unsupported(m: int, x_dtype, group_size: int) -> dict[str, str | None]:
    triton = None
    if jnp.dtype(x_dtype) not in _FLOATS:
        triton = f"x dtype {jnp.dtype(x_dtype)} not in bf16/f16/f32"
    elif m > _MAX_KERNEL_ROWS:
        triton = f"{m} rows > {_MAX_KERNEL_ROWS} (not a decode shape: XLA dequant + GEMM is faster)"
    elif group_size < 32 or group_size & (group_size - 1):
        triton = f"group_size {group_size} is not a power of 2 >= 32"
    elif not _GPU_VALIDATED and not dispatch.allow_unvalidated() and dispatch.device_info().platform == "cuda":
        triton = "quant matmul kernel not yet validated on a GPU (experiments/bench_inference.py --check)"
    return {"triton": triton, "mosaic": "no Mosaic quant-matmul kernel (Triton is the Pallas path)"}


def choose_impl(impl: str, m: int, x_dtype: Any, group_size: int, *, interpret: bool = False) -> str:
    """The implementation `impl` resolves to for these rows / dtype / group size ("xla" or "triton")."""
    return dispatch.select_impl("quant_matmul", impl, interpret=interpret,
                                unsupported=_unsupported(m, x_dtype, group_size), preference=("triton",))


def explain_auto() -> dict[str, tuple[str, str]]:
    """What `impl="auto"` picks here for a bf16 decode row, group 128, and why."""
    return {"bf16 M=1 g128": dispatch.explain("quant_matmul", unsupported=_unsupported(1, jnp.bfloat16, 128),
                                              preference=("triton",))}


# ----------------------------------------------------------------------------- Triton kernel

_MAGIC = 0x4B000000  # f32 bit pattern of 2^23: bitcast(_MAGIC | c) == 2^23 + c exactly for 0 <= c < 2^23
_MAGIC_F = 8388608.0


def _load(ref, mask, other):
    """plt.load with `other` only where a mask is given (unmasked loads vectorise best)."""
    return plt.load(ref) if mask is None else plt.load(ref, mask=mask, other=other)


def _exact_f32(c, offset: float):
    """int32 codes c (with 0 <= c + offset-shift < 2^23) -> f32 values c - offset, exactly, without
    int->float conversion instructions (the exponent trick; see module docstring)."""
    return lax.bitcast_convert_type(c | _MAGIC, _F32) - (_MAGIC_F + offset)


def _decode_tiles(w_ref, gi, cols, cmask, *, g, bits, sym):
    """The codes of group `gi`, columns `cols`, as exact f32 tiles: int4 -> (first half-group rows,
    second half-group rows), each [g/2, bn]; int8 -> ([g, bn],)."""
    rows = g // 2 if bits == 4 else g
    rr = gi * rows + jnp.arange(rows)
    raw = _load(w_ref.at[rr[:, None], cols[None, :]], cmask, 0)
    if bits == 4:
        p = raw.astype(jnp.int32)  # zero extension of the packed byte
        off = 8.0 if sym else 0.0
        return _exact_f32(p & 15, off), _exact_f32(p >> 4, off)
    if sym:  # int8 in [-128, 127]: shift to [0, 255] inside the integer add
        return (lax.bitcast_convert_type(raw.astype(jnp.int32) + (_MAGIC + 128), _F32) - (_MAGIC_F + 128.0),)
    return (_exact_f32(raw.astype(jnp.int32), 0.0),)


def _group_scales(s_ref, z_ref, gi, cols, c_ok, ok):
    """f32 scale (and zero) rows of group `gi`; zeros when `ok` is false (a clamped step past the split)."""
    def one(ref):
        v = _load(ref.at[gi, cols], c_ok, 0.0).astype(_F32)
        return jnp.where(ok, v, 0.0)
    return one(s_ref), None if z_ref is None else one(z_ref)


def _gemv_kernel(x_ref, w_ref, s_ref, z_ref, o_ref, *, m, n, bn, g, bits, gps, per, ngroups, splits):
    """rows <= dot_rows: acc[r] += scale * sum_k x[r, k] * code[k, :] (+ zero * sum_k x[r, k]) per group."""
    j = pl.program_id(0)
    sp = pl.program_id(1)
    cols = j * bn + jnp.arange(bn)
    c_ok = cols < n
    full = n % bn == 0
    cmask = None if full else c_ok[None, :]
    g0 = sp * per
    g1 = jnp.minimum(g0 + per, ngroups)
    nparts = 2 if bits == 4 else 1
    plen = g // nparts
    sym = z_ref is None

    def step(t, accs):
        loads = []
        for u in range(gps):  # issue every load of the step first
            gi = g0 + t * gps + u
            ok = gi < g1  # past this split's last group: reload that group (cached), zero its scale
            gi = jnp.minimum(gi, g1 - 1)
            sc, zr = _group_scales(s_ref, z_ref, gi, cols, None if full else c_ok, ok)
            xs = [[plt.load(x_ref.at[r, gi * g + p * plen + jnp.arange(plen)]).astype(_F32) for p in range(nparts)]
                  for r in range(m)]
            loads.append((_decode_tiles(w_ref, gi, cols, cmask, g=g, bits=bits, sym=sym), sc, zr, xs))
        accs = list(accs)
        for tiles, sc, zr, xs in loads:
            for r in range(m):
                prod = sum(xs[r][p][:, None] * tiles[p] for p in range(nparts))
                accs[r] = accs[r] + jnp.sum(prod, axis=0) * sc
                if zr is not None:
                    accs[r] = accs[r] + sum(jnp.sum(xp) for xp in xs[r]) * zr
        return tuple(accs)

    nsteps = pl.cdiv(jnp.maximum(g1 - g0, 0), gps)
    accs = lax.fori_loop(0, nsteps, step, tuple(jnp.zeros((bn,), _F32) for _ in range(m)))
    omask = None if full else c_ok
    for r in range(m):
        if splits == 1:
            plt.store(o_ref.at[r, cols], accs[r].astype(o_ref.dtype), mask=omask)
        else:
            plt.store(o_ref.at[sp, r, cols], accs[r], mask=omask)


def _dot_kernel(x_ref, w_ref, s_ref, z_ref, o_ref, *, m, n, bm, bn, g, bits, gps, per, ngroups, splits):
    """rows > dot_rows: per group one [bm, g] x [g, bn] tl.dot on the exact codes, scale on the f32 partial."""
    j = pl.program_id(0)
    i = pl.program_id(1)
    sp = pl.program_id(2)
    rows = i * bm + jnp.arange(bm)
    cols = j * bn + jnp.arange(bn)
    r_ok = rows < m
    c_ok = cols < n
    full = n % bn == 0
    cmask = None if full else c_ok[None, :]
    g0 = sp * per
    g1 = jnp.minimum(g0 + per, ngroups)
    nparts = 2 if bits == 4 else 1
    plen = g // nparts
    cdt = x_ref.dtype
    sym = z_ref is None

    def step(t, acc):
        loads = []
        for u in range(gps):
            gi = g0 + t * gps + u
            ok = gi < g1
            gi = jnp.minimum(gi, g1 - 1)
            sc, zr = _group_scales(s_ref, z_ref, gi, cols, None if full else c_ok, ok)
            xs = [plt.load(x_ref.at[rows[:, None], (gi * g + p * plen + jnp.arange(plen))[None, :]],
                           mask=r_ok[:, None], other=0.0) for p in range(nparts)]
            loads.append((_decode_tiles(w_ref, gi, cols, cmask, g=g, bits=bits, sym=sym), sc, zr, xs))
        for tiles, sc, zr, xs in loads:
            part = sum(_dot(xs[p], tiles[p].astype(cdt)) for p in range(nparts))
            acc = acc + part * sc[None, :]
            if zr is not None:
                xsum = sum(jnp.sum(xp.astype(_F32), axis=1) for xp in xs)
                acc = acc + xsum[:, None] * zr[None, :]
        return acc

    nsteps = pl.cdiv(jnp.maximum(g1 - g0, 0), gps)
    acc = lax.fori_loop(0, nsteps, step, jnp.zeros((bm, bn), _F32))
    omask = r_ok[:, None] & c_ok[None, :]
    if splits == 1:
        plt.store(o_ref.at[rows[:, None], cols[None, :]], acc.astype(o_ref.dtype), mask=omask)
    else:
        plt.store(o_ref.at[sp, rows[:, None], cols[None, :]], acc, mask=omask)


def _dot(a, b):
    prec = lax.Precision.HIGHEST if a.dtype == _F32 else None
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=_F32, precision=prec)


def _compiler_params(num_warps: int, num_stages: int):
    cls = getattr(plt, "CompilerParams", None) or getattr(plt, "TritonCompilerParams")
    return cls(num_warps=num_warps, num_stages=num_stages)


def _heuristic_splits(programs: int, ngroups: int) -> int:
    """k-splits for ~8 programs per SM, a power of two (one when the column blocks alone give 2 per
    SM), >= 2 groups each.  On the H100 (132 SMs) at M=1, 4096->14336, block_n 128: 8 splits, the
    sweep's best (1.52x the bf16 matmul for int4, vs 1.25x with 4 splits)."""
    cores = dispatch.device_info().core_count or 132
    if programs >= 2 * cores or ngroups < 4:
        return 1
    want = min(pl.cdiv(8 * cores, programs), ngroups // 2)
    return int(max(1, 1 << (int(want).bit_length() - 1)))


def plan(m: int, k: int, n: int, group_size: int, blocks: "QuantBlocks" = None, *, interpret: bool = False) -> dict:
    """The kernel's static launch plan for x [m, k] @ W [k, n]: path, tiles, groups per step, k-splits."""
    blocks = blocks or QuantBlocks()
    gemv = m <= blocks.dot_rows
    bn = blocks.block_n if not interpret else min(blocks.block_n, 32)
    bm = 16
    ngroups = k // group_size
    gps = max(1, min(blocks.block_k // group_size, ngroups))
    programs = pl.cdiv(n, bn) * (1 if gemv else pl.cdiv(m, bm))
    splits = min(blocks.num_splits or _heuristic_splits(programs, ngroups), ngroups)
    per = pl.cdiv(ngroups, splits)
    if blocks.num_splits is None:  # whole steps per split
        per = pl.cdiv(per, gps) * gps
    else:  # the requested splits; steps that divide them
        gps = max(d for d in range(1, min(gps, per) + 1) if per % d == 0)
    splits = pl.cdiv(ngroups, per)  # no empty splits (only the last split may end on a partial step)
    return dict(path="gemv" if gemv else "dot", bm=bm, bn=bn, gps=gps, per=per, splits=splits,
                grid=(pl.cdiv(n, bn), splits) if gemv else (pl.cdiv(n, bn), pl.cdiv(m, bm), splits))


def _triton(x, qweight, scale, zero, bits, group_size, out_dtype, blocks, interpret):
    m, k = x.shape
    n = scale.shape[1]
    p = plan(m, k, n, group_size, blocks, interpret=interpret)
    splits = p["splits"]
    common = dict(m=m, n=n, bn=p["bn"], g=group_size, bits=bits, gps=p["gps"], per=p["per"], ngroups=k // group_size,
                  splits=splits)
    kern = (functools.partial(_gemv_kernel, **common) if p["path"] == "gemv"
            else functools.partial(_dot_kernel, bm=p["bm"], **common))
    args = [x, qweight, scale] + ([zero] if zero is not None else [])
    if zero is None:
        def kernel(x_ref, w_ref, s_ref, o_ref):
            return kern(x_ref, w_ref, s_ref, None, o_ref)
    else:
        kernel = kern
    anyspec = pl.BlockSpec(memory_space=pl.ANY)
    shape = (m, n) if splits == 1 else (splits, m, n)
    out = pl.pallas_call(
        kernel, grid=p["grid"], in_specs=[anyspec] * len(args), out_specs=anyspec,
        out_shape=jax.ShapeDtypeStruct(shape, out_dtype if splits == 1 else _F32),
        compiler_params=_compiler_params(blocks.num_warps, blocks.num_stages), interpret=interpret,
        name=f"quant_matmul_int{bits}_{p['path']}",
    )(*args)
    return out if splits == 1 else jnp.sum(out, axis=0).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _kernel_call(x, qweight, scale, zero, cfg):
    bits, group_size, out_dtype, blocks, interpret = cfg
    return _triton(x, qweight, scale, zero, bits, group_size, out_dtype, blocks, interpret)


def _kernel_fwd(x, qweight, scale, zero, cfg):
    return _kernel_call(x, qweight, scale, zero, cfg), (qweight, scale, zero)


def _kernel_bwd(cfg, res, dy):
    qweight, scale, zero = res
    bits, group_size = cfg[:2]
    w = dequantize(qweight, scale, zero, bits=bits, group_size=group_size, dtype=dy.dtype)
    prec = lax.Precision.HIGHEST if dy.dtype == _F32 else None
    dx = jnp.dot(dy, w.T, preferred_element_type=_F32, precision=prec)
    return dx, None, None, None


_kernel_call.defvjp(_kernel_fwd, _kernel_bwd)


# ----------------------------------------------------------------------------- public API

def quant_matmul(x: jax.Array, qweight: jax.Array, scale: jax.Array, zero: Optional[jax.Array] = None, *,
                 bits: int, group_size: int, out_dtype: Any = None, impl: str = "auto", interpret: bool = False,
                 blocks: QuantBlocks = QuantBlocks()) -> jax.Array:
    """x [M, K] @ dequant(qweight, scale, zero) -> [M, N] (f32 accumulation; see module docstring)."""
    _check(x, qweight, scale, zero, bits, group_size)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    chosen = choose_impl(impl, x.shape[0], x.dtype, group_size, interpret=interpret)
    if chosen == "xla":
        return _xla(x, qweight, scale, zero, bits, group_size, out_dtype)
    return _kernel_call(x, qweight, scale, zero, (bits, group_size, out_dtype, blocks, bool(interpret)))
