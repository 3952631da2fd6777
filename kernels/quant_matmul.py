"""Weight-only quantized matmul: y = x @ dequant(W) for int8 / int4 group-wise weights (decode shapes).

Weight format (one group = `group_size` consecutive rows of W [K, N], one scale per group and column):
  * bits 8:  qweight int8 [K, N] (symmetric, q in [-127, 127]) or uint8 [K, N] (asymmetric, u in [0, 255]).
  * bits 4:  qweight int32 [K / 2, ceil(N / 4)]: two 4-bit codes u in [0, 15] per byte, packed WITHIN each
             group (byte r of group g, column n, holds row g*G + r in its low nibble and row g*G + G/2 + r
             in its high nibble, so a kernel reads one group as two contiguous half-groups), and the bytes
             of four neighbouring columns in one little-endian 32-bit word: byte j of word (r, c) is column
             4c + j (columns past N are zero).  `int4_words` / `int4_bytes` convert from / to the byte view
             uint8 [K / 2, N].  Symmetric codes are q + 8 (q in [-7, 7]).
  * scale [K / G, N] (float16 or float32); zero [K / G, N] or None.
  dequant:  symmetric  W[k, n] = q[k, n] * scale[g, n]                      (g = k // G)
            asymmetric W[k, n] = u[k, n] * scale[g, n] + zero[g, n]         (zero = the group's minimum)

Implementations (all accumulate in f32, the integer-dot GEMV exactly in int32; output in x.dtype unless
`out_dtype`):
  * "xla":    up to 16 rows, per-group dots on the codes with the scales applied to the partial sums;
              above, dequantize to x's dtype and one jnp.dot (`reference`: dequantise in f32/f64).
  * "triton": Pallas-Triton kernels; k-splits write f32 partials that one small XLA sum combines
              (deterministic, no atomics).  VJP w.r.t. x through XLA.
              int4, rows <= `Int4Blocks.gemv_rows` (decode), bf16 / f16 activations (`Int4Blocks.idot`): a GEMV
                on integer dot products.  Each warp takes 128 words (512 columns) of one group, a program
                `idot_groups` groups (8: 4 partials at K = 4096, not 32); each group's activations become
                int16 (scaled by their max: |error| <= max|x| / 65534, ~2^-16 relative, far below bf16's own
                rounding); per step each thread's [4 rows, 4 words] block is byte-transposed with `prmt` so
                that one register holds 4 rows of one column, its nibbles masked into bytes, and `dp2a`
                multiplies them by activation pairs with exact int32 accumulation (inline PTX, ~1.7
                instructions per weight with the activations' conversion, against ~3.6 for the f32 GEMV);
                the scales, zero points and activation scale are applied once per group, and the program's
                groups summed in f32 before its partial is stored.
              int4, rows <= `Int4Blocks.gemv_rows`, f32 activations (or `idot=False`): a GEMV on the 32-bit words,
                exact in f32.  One warp per program, each program one part of one group for 128 words (512 columns);
                the 8 nibbles of a word become exact f32 values c * 2^p with one `lop3` (mask | 2^23 exponent) and one
                subtract each (inline PTX; the nibbles stay at their bit position p, the 2^-p goes into the per-group
                scale), multiplied by the row's activation with f32 accumulation in the thread (no cross-thread
                reduction until the program's end); the next step's words are loaded before this step's math.
              int4, more rows (up to 16; the default, `Int4Blocks.dot_tiles`): per group the words tile
                [G/2, words] becomes 8 exact code tiles in x's dtype and 8 tl.dot [16, G/2] x [G/2, words].
              int4, `dot_tiles=False` (bf16/f16 activations): tensor cores.  Per step of `mma_rows`
                rows, nibble i of every word becomes (2^7 + c) in bf16 (2^10 + c in f16: one `prmt` +
                `lop3` per two weights, two words per asm instance) and one tl.dot per nibble,
                [words, rows] x [rows, 16 activation rows], accumulates in f32; the constant offset
                times sum(x) is removed once per group (exact: the products are exact in f32).  GPU-validated,
                but slower than the tl.dot path at M = 16 on the H100 (88 vs 29 us at 4096 -> 14336), so off.
              int8: rows <= `QuantBlocks.dot_rows`: exact f32 codes by the exponent trick, multiplied and
                summed over the group's rows (no tl.dot); more rows: one tl.dot per group on
                [16, group] x [group, block_n] tiles, scale applied to the f32 partial.
Until a kernel has passed `experiments/bench_inference.py --check` on a GPU, `auto` keeps XLA.
"""

from __future__ import annotations

import dataclasses
import functools
import math
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
_GPU_VALIDATED = True  # int8 kernels, H100, jax 0.11.2, 2026-11-22: bench_inference --only check, PASS (sym/asym, M 1/7/16)
_W4_GPU_VALIDATED = True  # int4 word kernels, H100, jax 0.11.2, 2026-11-23: bench_inference --only check, 30/30 PASS;
# the integer-dot GEMV: experiments/sweep_int4_gemv.py --parity, 0 failed (2026-11-23, sessions 8 and 9: 96/96
# with idot_groups 8)


def _pow2(name: str, v: Any, lo: int) -> None:
    if not isinstance(v, int) or v < lo or v & (v - 1):
        raise ValueError(f"{name} must be a power of 2 >= {lo}, got {v!r}")


@dataclasses.dataclass(frozen=True)
class Int4Blocks:
    """int4 kernel tiling (H100 sweeps: experiments/results/int4_words_*, int4_idot_*): GEMV up to `gemv_rows`
    rows.  With 16-bit activations and `idot`, the integer-dot GEMV: packed rows per step, runs per group,
    runs per program (one warp each, summed in the program: fewer partials; `idot_*`), 128 words per warp
    (`warps`).  Otherwise (f32 activations) the f32 GEMV:
    words (4 columns each) per program, warps, rows per step, programs per group (`parts`: more warps for
    the latency-bound stream), next-step prefetch.  More rows: the tl.dot path (`dot_tiles`, words per
    program; k-splits / steps from QuantBlocks) or the tensor-core path (words per program, rows per
    step, groups per program, warps, pipeline stages)."""

    gemv_rows: int = 2
    idot: bool = True
    idot_unroll: int = 16
    idot_parts: int = 1
    idot_groups: int = 8
    words: int = 128
    warps: int = 1
    unroll: int = 4
    parts: int = 2
    prefetch: bool = True
    dot_tiles: bool = True
    dot_words: int = 32
    mma_words: int = 64
    mma_rows: int = 64
    mma_groups: int = 2
    mma_warps: int = 4
    mma_stages: int = 1

    def __post_init__(self):
        for name, lo in (("words", 32), ("unroll", 1), ("parts", 1), ("idot_unroll", 4), ("idot_parts", 1),
                         ("idot_groups", 1),
                         ("dot_words", 16), ("mma_words", 16), ("mma_rows", 16), ("warps", 1), ("mma_warps", 1)):
            _pow2(f"Int4Blocks.{name}", getattr(self, name), lo)
        if not 0 <= self.gemv_rows <= _MAX_KERNEL_ROWS or self.mma_groups < 1 or self.mma_stages < 1:
            raise ValueError(f"Int4Blocks: gemv_rows in [0, {_MAX_KERNEL_ROWS}], mma_groups and mma_stages >= 1; "
                             f"got {self}")


@dataclasses.dataclass(frozen=True)
class QuantBlocks:
    """Kernel tiling (swept by experiments/bench_inference.py --sweep): int8 columns per program,
    K rows per loop step (a multiple of the group size; rounded down to one), k-splits (None =
    enough programs for ~4 per SM), warps, pipeline stages, and the row count up to which the
    multiply-reduce GEMV is used instead of 16-row tl.dot tiles (the int4 tl.dot path shares the K step,
    k-splits, warps and stages); `int4`: the int4 kernels' own tiling."""

    block_n: int = 128
    block_k: int = 256
    num_splits: Optional[int] = None
    num_warps: int = 4
    num_stages: int = 1  # the H100 sweep picked 1 stage in all four cases (int4/int8, M 1/16)
    dot_rows: int = 4
    int4: Int4Blocks = Int4Blocks()

    def __post_init__(self):
        for name in ("block_n", "block_k"):
            _pow2(f"QuantBlocks.{name}", getattr(self, name), 16)
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"QuantBlocks.num_splits must be >= 1, got {self.num_splits}")
        if self.num_warps < 1 or self.num_stages < 1 or self.dot_rows < 0:
            raise ValueError(f"QuantBlocks: num_warps/num_stages must be >= 1 and dot_rows >= 0, got {self}")


# ----------------------------------------------------------------------------- format helpers

def int4_words(packed: jax.Array) -> jax.Array:
    """uint8 bytes [..., K/2, N] -> the stored int32 words [..., K/2, ceil(N/4)] (little-endian, zero pad)."""
    *lead, kh, n = packed.shape
    pad = -n % 4
    p = jnp.pad(packed.astype(jnp.uint8), [(0, 0)] * (len(lead) + 1) + [(0, pad)]) if pad else packed.astype(jnp.uint8)
    return lax.bitcast_convert_type(p.reshape(*lead, kh, (n + pad) // 4, 4), jnp.int32)


def int4_bytes(words: jax.Array, n: int) -> jax.Array:
    """int32 words [..., K/2, ceil(N/4)] -> uint8 bytes [..., K/2, N] (two codes per byte)."""
    *lead, kh, nw = words.shape
    if nw != -(-n // 4):
        raise ValueError(f"int4 words {words.shape} do not hold {n} columns (need {-(-n // 4)} words per row)")
    return lax.bitcast_convert_type(words, jnp.uint8).reshape(*lead, kh, 4 * nw)[..., :n]


def unpack_int4(words: jax.Array, group_size: int, n: int) -> jax.Array:
    """int32 words [..., K/2, ceil(N/4)] -> uint8 codes [..., K, N] in [0, 15]."""
    packed = int4_bytes(words, n)
    *lead, kh, _ = packed.shape
    g = group_size
    p = packed.reshape(*lead, (2 * kh) // g, g // 2, n)
    lo = p & jnp.uint8(15)
    hi = p >> jnp.uint8(4)
    return jnp.concatenate([lo, hi], axis=-2).reshape(*lead, 2 * kh, n)


def pack_int4(codes: jax.Array, group_size: int) -> jax.Array:
    """uint8 codes [..., K, N] in [0, 15] -> int32 words [..., K/2, ceil(N/4)] (see the module docstring)."""
    *lead, k, n = codes.shape
    g = group_size
    c = codes.astype(jnp.uint8).reshape(*lead, k // g, g, n)
    lo, hi = c[..., : g // 2, :], c[..., g // 2:, :]
    return int4_words((lo | (hi << jnp.uint8(4))).reshape(*lead, k // 2, n))


def dequantize(qweight: jax.Array, scale: jax.Array, zero: Optional[jax.Array], *, bits: int, group_size: int,
               dtype: Any = jnp.float32) -> jax.Array:
    """The float weight [..., K, N] the codes stand for, in `dtype` (arithmetic in f32, or f64 for f64)."""
    acc = jnp.promote_types(dtype, _F32)
    if bits == 4:
        codes = unpack_int4(qweight, group_size, scale.shape[-1]).astype(acc)
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
        p = int4_bytes(qweight, n).reshape(ng, g // 2, n)
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
    want = (k // 2, -(-scale.shape[1] // 4)) if bits == 4 else (k, scale.shape[1])
    if qweight.shape != want or scale.shape[0] != k // group_size:
        raise ValueError(f"quant_matmul: x {x.shape} needs qweight {want} and scale ({k // group_size}, N); "
                         f"got {qweight.shape}, {scale.shape}")
    if zero is not None and zero.shape != scale.shape:
        raise ValueError(f"quant_matmul: zero shape {zero.shape} != scale shape {scale.shape}")
    want_dt = jnp.int32 if bits == 4 else jnp.uint8 if zero is not None else jnp.int8
    if qweight.dtype != want_dt:
        raise ValueError(f"quant_matmul: bits={bits} {'asymmetric' if zero is not None else 'symmetric'} codes "
                         f"must be {jnp.dtype(want_dt).name}, got {qweight.dtype}"
                         + (" (uint8 bytes [K/2, N]: convert with int4_words)" if bits == 4 else ""))
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"quant_matmul: x dtype {x.dtype} is not floating")


def _unsupported(m: int, x_dtype, group_size: int, bits: int = 8, blocks: Optional["QuantBlocks"] = None
                 ) -> dict[str, str | None]:
    triton = None
    b4 = (blocks or QuantBlocks()).int4
    if jnp.dtype(x_dtype) not in _FLOATS:
        triton = f"x dtype {jnp.dtype(x_dtype)} not in bf16/f16/f32"
    elif bits == 4 and jnp.dtype(x_dtype) == _F32 and m > b4.gemv_rows and not b4.dot_tiles:
        triton = f"int4 with f32 activations above {b4.gemv_rows} rows (the tensor-core path takes bf16/f16)"
    elif m > _MAX_KERNEL_ROWS:
        triton = f"{m} rows > {_MAX_KERNEL_ROWS} (not a decode shape: XLA dequant + GEMM is faster)"
    elif group_size < 32 or group_size & (group_size - 1):
        triton = f"group_size {group_size} is not a power of 2 >= 32"
    elif (not (_W4_GPU_VALIDATED if bits == 4 else _GPU_VALIDATED) and not dispatch.allow_unvalidated()
          and dispatch.device_info().platform == "cuda"):
        triton = "quant matmul kernel not yet validated on a GPU (experiments/bench_inference.py --check)"
    return {"triton": triton, "mosaic": "no Mosaic quant-matmul kernel (Triton is the Pallas path)"}


def choose_impl(impl: str, m: int, x_dtype: Any, group_size: int, *, bits: int = 8,
                blocks: Optional["QuantBlocks"] = None, interpret: bool = False) -> str:
    """The implementation `impl` resolves to for these rows / dtype / group size / bits ("xla" or "triton")."""
    return dispatch.select_impl("quant_matmul", impl, interpret=interpret,
                                unsupported=_unsupported(m, x_dtype, group_size, bits, blocks), preference=("triton",))


def explain_auto() -> dict[str, tuple[str, str]]:
    """What `impl="auto"` picks here for a bf16 decode row on int4 weights, group 128, and why."""
    return {"bf16 M=1 g128": dispatch.explain("quant_matmul", unsupported=_unsupported(1, jnp.bfloat16, 128, 4),
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


def _decode_tiles(w_ref, gi, cols, cmask, *, g, sym):
    """int8 codes of group `gi`, columns `cols`, as an exact f32 tile [g, bn]."""
    rr = gi * g + jnp.arange(g)
    raw = _load(w_ref.at[rr[:, None], cols[None, :]], cmask, 0)
    if sym:  # int8 in [-128, 127]: shift to [0, 255] inside the integer add
        return lax.bitcast_convert_type(raw.astype(jnp.int32) + (_MAGIC + 128), _F32) - (_MAGIC_F + 128.0)
    return _exact_f32(raw.astype(jnp.int32), 0.0)


def _group_scales(s_ref, z_ref, gi, cols, c_ok, ok):
    """f32 scale (and zero) rows of group `gi`; zeros when `ok` is false (a clamped step past the split)."""
    def one(ref):
        v = _load(ref.at[gi, cols], c_ok, 0.0).astype(_F32)
        return jnp.where(ok, v, 0.0)
    return one(s_ref), None if z_ref is None else one(z_ref)


def _gemv_kernel(x_ref, w_ref, s_ref, z_ref, o_ref, *, m, n, bn, g, gps, per, ngroups, splits):
    """int8, rows <= dot_rows: acc[r] += scale * sum_k x[r, k] * code[k, :] (+ zero * sum_k x[r, k]) per group."""
    j = pl.program_id(0)
    sp = pl.program_id(1)
    cols = j * bn + jnp.arange(bn)
    c_ok = cols < n
    full = n % bn == 0
    cmask = None if full else c_ok[None, :]
    g0 = sp * per
    g1 = jnp.minimum(g0 + per, ngroups)
    sym = z_ref is None

    def step(t, accs):
        loads = []
        for u in range(gps):  # issue every load of the step first
            gi = g0 + t * gps + u
            ok = gi < g1  # past this split's last group: reload that group (cached), zero its scale
            gi = jnp.minimum(gi, g1 - 1)
            sc, zr = _group_scales(s_ref, z_ref, gi, cols, None if full else c_ok, ok)
            xs = [plt.load(x_ref.at[r, gi * g + jnp.arange(g)]).astype(_F32) for r in range(m)]
            loads.append((_decode_tiles(w_ref, gi, cols, cmask, g=g, sym=sym), sc, zr, xs))
        accs = list(accs)
        for tile, sc, zr, xs in loads:
            for r in range(m):
                accs[r] = accs[r] + jnp.sum(xs[r][:, None] * tile, axis=0) * sc
                if zr is not None:
                    accs[r] = accs[r] + jnp.sum(xs[r]) * zr
        return tuple(accs)

    nsteps = pl.cdiv(jnp.maximum(g1 - g0, 0), gps)
    accs = lax.fori_loop(0, nsteps, step, tuple(jnp.zeros((bn,), _F32) for _ in range(m)))
    omask = None if full else c_ok
    for r in range(m):
        if splits == 1:
            plt.store(o_ref.at[r, cols], accs[r].astype(o_ref.dtype), mask=omask)
        else:
            plt.store(o_ref.at[sp, r, cols], accs[r], mask=omask)


def _dot_kernel(x_ref, w_ref, s_ref, z_ref, o_ref, *, m, n, bm, bn, g, gps, per, ngroups, splits):
    """int8, rows > dot_rows: per group one [bm, g] x [g, bn] tl.dot on the exact codes, scale on the f32 partial."""
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
    cdt = x_ref.dtype
    sym = z_ref is None

    def step(t, acc):
        loads = []
        for u in range(gps):
            gi = g0 + t * gps + u
            ok = gi < g1
            gi = jnp.minimum(gi, g1 - 1)
            sc, zr = _group_scales(s_ref, z_ref, gi, cols, None if full else c_ok, ok)
            xs = plt.load(x_ref.at[rows[:, None], (gi * g + jnp.arange(g))[None, :]], mask=r_ok[:, None], other=0.0)
            loads.append((_decode_tiles(w_ref, gi, cols, cmask, g=g, sym=sym), sc, zr, xs))
        for tile, sc, zr, xs in loads:
            acc = acc + _dot(xs, tile.astype(cdt)) * sc[None, :]
            if zr is not None:
                acc = acc + jnp.sum(xs.astype(_F32), axis=1)[:, None] * zr[None, :]
        return acc

    nsteps = pl.cdiv(jnp.maximum(g1 - g0, 0), gps)
    acc = lax.fori_loop(0, nsteps, step, jnp.zeros((bm, bn), _F32))
    omask = r_ok[:, None] & c_ok[None, :]
    if splits == 1:
        plt.store(o_ref.at[rows[:, None], cols[None, :]], acc.astype(o_ref.dtype), mask=omask)
    else:
        plt.store(o_ref.at[sp, rows[:, None], cols[None, :]], acc, mask=omask)


# --- int4 on 32-bit words

def _nibble_pos(i: int) -> int:
    """Bit position at which the GEMV decodes nibble i of a word: 4i for i < 5, else 4i - 12 (of w >> 12)."""
    return 4 * i if i < 5 else 4 * i - 12


def _word_block(w_ref, j, bw: int):
    """Word columns [j*bw, (j+1)*bw) of the int32 weight ref, and their [1, bw] mask (None: a whole block)."""
    wc = j * bw + jnp.arange(bw)
    nw = w_ref.shape[1]
    return wc, None if nw % bw == 0 else (wc < nw)[None, :]


def _w4_nibbles_f32(w, interpret: bool):
    """The 8 nibbles of each int32 word as exact f32 values c * 2^_nibble_pos(i) (one lop3 + one subtract
    each on the GPU; bit ops in interpret mode)."""
    wh = lax.shift_right_logical(w, 12)
    out = []
    for i in range(8):
        src, pos = (w, 4 * i) if i < 5 else (wh, 4 * i - 12)
        if interpret:
            out.append(lax.bitcast_convert_type((src & (15 << pos)) | _MAGIC, _F32) - _MAGIC_F)
            continue
        asm = (f"lop3.b32 $0, $1, 0x{15 << pos:08X}, 0x{_MAGIC:08X}, 0xEA;\n"  # (src & mask) | 2^23
               f"sub.f32 $0, $0, 0f{_MAGIC:08X};")
        [v] = plt.elementwise_inline_asm(asm, args=[src], constraints="=r,r", pack=1,
                                         result_shape_dtypes=[jax.ShapeDtypeStruct(w.shape, _F32)])
        out.append(v)
    return out


def _run_start(sp, g: int, plen: int):
    """Run sp (a scalar or an array of runs) of `plen` packed rows, runs never crossing a group: its group, its
    first packed row and that row's first activation column (the second half-group's: + g / 2)."""
    parts = (g // 2) // plen
    gi = sp // parts
    return gi, gi * (g // 2) + (sp % parts) * plen, gi * g + (sp % parts) * plen


def _w4_gemv_kernel(x_ref, w_ref, s_ref, z_ref, o_ref, *, m, n, bw, g, unroll, parts, prefetch, interpret):
    """int4 GEMV: program (j, sp) takes words [j*bw, (j+1)*bw) of part sp % parts of group sp // parts;
    per step `unroll` packed rows, accumulators per (activation row, nibble) in f32."""
    half = g // 2
    plen = half // parts
    sp = pl.program_id(1)
    wc, wmask = _word_block(w_ref, pl.program_id(0), bw)
    gi, row0, kx = _run_start(sp, g, plen)
    row_end = row0 + plen
    sym = z_ref is None

    def load_w(r0):
        rows = jnp.minimum(r0 + jnp.arange(unroll), row_end - 1)[:, None]
        return _load(w_ref.at[rows, wc[None, :]], wmask, 0)

    def step(t, carry):
        accs, xsum, wnext = carry
        if prefetch:
            w, wnext = wnext, load_w(row0 + (t + 1) * unroll)
        else:
            w = load_w(row0 + t * unroll)
        vs = _w4_nibbles_f32(w, interpret)
        accs, xsum = list(accs), list(xsum)
        for r in range(m):
            xlo = plt.load(x_ref.at[r, kx + t * unroll + jnp.arange(unroll)]).astype(_F32)
            xhi = plt.load(x_ref.at[r, kx + half + t * unroll + jnp.arange(unroll)]).astype(_F32)
            xsum[r] = xsum[r] + jnp.sum(xlo) + jnp.sum(xhi)
            for i in range(8):  # nibble 2b: column 4c + b, first half-group row; 2b + 1: second half
                accs[8 * r + i] = accs[8 * r + i] + jnp.sum((xlo if i % 2 == 0 else xhi)[:, None] * vs[i], axis=0)
        return tuple(accs), tuple(xsum), wnext

    zeros = jnp.zeros((bw,), _F32)
    w0 = load_w(row0) if prefetch else jnp.zeros((unroll, bw), jnp.int32)
    accs, xsum, _ = lax.fori_loop(0, plen // unroll, step, (tuple(zeros for _ in range(8 * m)),
                                                            tuple(jnp.zeros((), _F32) for _ in range(m)), w0))
    for b in range(4):
        cols = 4 * wc + b
        cm = None if wmask is None and n % 4 == 0 else cols < n
        sc = _load(s_ref.at[gi, cols], cm, 0.0).astype(_F32)
        zr = None if sym else _load(z_ref.at[gi, cols], cm, 0.0).astype(_F32)
        for r in range(m):
            d = (accs[8 * r + 2 * b] * 2.0 ** -_nibble_pos(2 * b)
                 + accs[8 * r + 2 * b + 1] * 2.0 ** -_nibble_pos(2 * b + 1))
            y = (d - 8.0 * xsum[r]) * sc if sym else d * sc + xsum[r] * zr
            plt.store(o_ref.at[sp, r, b, wc], y, mask=None if wmask is None else wmask[0])


def _w4_dot_kernel(x_ref, w_ref, s_ref, z_ref, o_ref, *, m, bm, bw, g, gps, per, ngroups, interpret):
    """int4, more rows (up to 16): per group the words tile [g/2, bw] becomes 8 exact code tiles in x's dtype
    (nibble 2b: column 4c + b, first half-group rows; 2b + 1: second half) and 8 tl.dot of [bm, g/2] x
    [g/2, bw] accumulate acc_b [bm, bw] in f32, scaled once per group."""
    j = pl.program_id(0)
    i = pl.program_id(1)
    sp = pl.program_id(2)
    rows = i * bm + jnp.arange(bm)
    r_ok = rows < m
    wc, wmask = _word_block(w_ref, j, bw)
    half = g // 2
    g0 = sp * per
    g1 = jnp.minimum(g0 + per, ngroups)
    cdt = x_ref.dtype
    sym = z_ref is None
    n = s_ref.shape[1]

    def one_group(gi, ok, accs):
        rr = gi * half + jnp.arange(half)
        w = _load(w_ref.at[rr[:, None], wc[None, :]], wmask, 0)
        xs = [plt.load(x_ref.at[rows[:, None], (gi * g + h * half + jnp.arange(half))[None, :]], mask=r_ok[:, None],
                       other=0.0) for h in range(2)]
        vs = _w4_nibbles_f32(w, interpret)
        xsum = jnp.sum(xs[0].astype(_F32), axis=1) + jnp.sum(xs[1].astype(_F32), axis=1)
        accs = list(accs)
        for b in range(4):
            part = sum(_dot(xs[h], (vs[2 * b + h] * 2.0 ** -_nibble_pos(2 * b + h)).astype(cdt)) for h in range(2))
            cols = 4 * wc + b
            cm = None if wmask is None and n % 4 == 0 else cols < n
            sc = jnp.where(ok, _load(s_ref.at[gi, cols], cm, 0.0).astype(_F32), 0.0)[None, :]
            if sym:
                accs[b] = accs[b] + (part - 8.0 * xsum[:, None]) * sc
            else:
                zr = jnp.where(ok, _load(z_ref.at[gi, cols], cm, 0.0).astype(_F32), 0.0)[None, :]
                accs[b] = accs[b] + part * sc + xsum[:, None] * zr
        return tuple(accs)

    def step(t, accs):
        for u in range(gps):
            gi = g0 + t * gps + u
            accs = one_group(jnp.minimum(gi, g1 - 1), gi < g1, accs)
        return accs

    nsteps = pl.cdiv(jnp.maximum(g1 - g0, 0), gps)
    accs = lax.fori_loop(0, nsteps, step, tuple(jnp.zeros((bm, bw), _F32) for _ in range(4)))
    omask = r_ok[:, None] if wmask is None else r_ok[:, None] & wmask
    for b in range(4):
        plt.store(o_ref.at[sp, rows[:, None], b, wc[None, :]], accs[b], mask=omask)


# --- int4 GEMV on integer dot products (16-bit activations)

_IDOT_QMAX = 32767.0  # activations become int16 v = rint(x * 32767 / max|x|) per program
_IDOT_MAX_ROWS = 2048  # packed rows per program: 2 * 2048 * 15 * 32767 < 2^31 (int32 accumulators)


@functools.lru_cache(maxsize=None)
def _idot_asm_text() -> str:
    """PTX for one thread's [4 rows, 4 words] step (operand e = 4 * row + word, Triton's element order):
    each word's 4x4 byte block is transposed with 8 `prmt` (word c, column byte j -> one register holding
    rows 0..3), its low nibbles (first half-group rows) and high nibbles (second half) masked into bytes,
    and multiplied by int16 activation pairs with `dp2a` (2 products per instruction, int32 accumulation):
    156 instructions per 128 weights, the activations' conversion included.  Operands: $0-15 acc out
    (element 4j + c: column byte j of word c), $16-31 words, $32-47 / $48-63 scaled activations of the first /
    second half-group rows (row r of element 4r + c), $64-79 acc in."""
    lines = ["{", ".reg .b32 a<4>, b<4>, p<4>, t<4>, T, L, H;"]
    for h, base in enumerate((32, 48)):  # x pairs: p[2h] = rows (0, 1), p[2h + 1] = rows (2, 3), int16 halves
        for r in range(4):
            lines.append(f"cvt.rni.s32.f32 {'ab'[r % 2]}{r // 2 + 2 * h}, ${base + 4 * r};")
        for q in range(2):
            lines.append(f"prmt.b32 p{2 * h + q}, a{q + 2 * h}, b{q + 2 * h}, 0x5410;")
    for c in range(4):
        w = [f"${16 + 4 * r + c}" for r in range(4)]
        lines += [f"prmt.b32 t0, {w[0]}, {w[1]}, 0x5140;", f"prmt.b32 t1, {w[0]}, {w[1]}, 0x7362;",
                  f"prmt.b32 t2, {w[2]}, {w[3]}, 0x5140;", f"prmt.b32 t3, {w[2]}, {w[3]}, 0x7362;"]
        for j in range(4):
            src, sel = ("t0, t2", "t1, t3")[j // 2], ("0x5410", "0x7632")[j % 2]
            e = 4 * j + c
            lines += [f"prmt.b32 T, {src}, {sel};", "and.b32 L, T, 0x0F0F0F0F;", "shr.u32 H, T, 4;",
                      "and.b32 H, H, 0x0F0F0F0F;",
                      f"dp2a.lo.s32.u32 ${e}, p0, L, ${64 + e};", f"dp2a.hi.s32.u32 ${e}, p1, L, ${e};",
                      f"dp2a.lo.s32.u32 ${e}, p2, H, ${e};", f"dp2a.hi.s32.u32 ${e}, p3, H, ${e};"]
    return "\n".join(lines + ["}"])


def _idot_step(w, xl, xh, acc, interpret: bool):
    """For each block q of 4 rows: acc[4q + j, ..., c] += sum_r v(xl[4q + r, ...]) * lo_nibble(byte j of
    w[4q + r, ..., c]) + v(xh[4q + r, ...]) * hi_nibble(...), v = rint (int16); w, acc [U, G, bw] int32,
    xl / xh [U, G] f32 already scaled."""
    if interpret:
        u, gw, bw = w.shape
        vl, vh = (jnp.round(v).astype(jnp.int32).reshape(u // 4, 1, 4, gw, 1) for v in (xl, xh))
        shifts = (8 * jnp.arange(4, dtype=jnp.int32))[None, :, None, None, None]
        byte = lax.shift_right_logical(w.reshape(u // 4, 1, 4, gw, bw), shifts) & 255  # [q, j, r, G, c]
        return acc + jnp.sum(vl * (byte & 15) + vh * (byte >> 4), axis=2).reshape(u, gw, bw)
    xl = jnp.broadcast_to(xl[:, :, None], w.shape)
    xh = jnp.broadcast_to(xh[:, :, None], w.shape)
    [acc] = plt.elementwise_inline_asm(_idot_asm_text(), args=[w, xl, xh, acc],
                                       constraints=",".join(["=&r"] * 16 + ["r"] * 64), pack=16,
                                       result_shape_dtypes=[jax.ShapeDtypeStruct(w.shape, jnp.int32)])
    return acc


def _w4_idot_kernel(x_ref, w_ref, s_ref, z_ref, o_ref, *, m, n, bw, g, plen, unroll, gw, interpret):
    """int4 GEMV for 16-bit activations on integer dot products.  Program (j, p) takes words [j*bw, (j+1)*bw)
    of `gw` runs of `plen` packed rows (each inside one group): runs p*gw .. p*gw + gw - 1, one per warp (the
    tiles are [rows, run, words]: Triton puts the warps on the run axis), `unroll` rows per step.  Each run's
    2 * plen activations are scaled to int16 by their max (|error| <= max|x| / 65534 each) and the products
    summed exactly in int32 (one accumulator per 4-row block of the step, added at the end); the runs' f32
    results are summed in the program (deterministic) into one partial."""
    half = g // 2
    wc, wmask = _word_block(w_ref, pl.program_id(0), bw)
    gi, row0, kx = _run_start(pl.program_id(1) * gw + jnp.arange(gw), g, plen)  # [G] runs
    sym = z_ref is None
    nsteps = plen // unroll
    wm = None if wmask is None else wmask[:, None, :]

    def step(t, accs):
        rows = row0[None, :, None] + unroll * t + jnp.arange(unroll)[:, None, None]
        w = _load(w_ref.at[rows, wc[None, None, :]], wm, 0)
        accs = list(accs)
        for r in range(m):
            xl, xh = (plt.load(x_ref.at[r, kx[None, :] + h * half + unroll * t + jnp.arange(unroll)[:, None]])
                      .astype(_F32) * stats[r][1][None, :] for h in range(2))
            accs[r] = _idot_step(w, xl, xh, accs[r], interpret)
        return tuple(accs)

    stats = []
    for r in range(m):
        xs = [plt.load(x_ref.at[r, kx[:, None] + h * half + jnp.arange(plen)[None, :]]).astype(_F32)
              for h in range(2)]
        mx = jnp.maximum(jnp.max(jnp.abs(xs[0]), axis=1), jnp.max(jnp.abs(xs[1]), axis=1))  # [G]
        inv = jnp.where(mx > 0, _IDOT_QMAX / mx, 0.0)
        stats.append((mx, inv, jnp.sum(xs[0], axis=1) + jnp.sum(xs[1], axis=1)))
    zeros = jnp.zeros((unroll, gw, bw), jnp.int32)
    accs = lax.fori_loop(0, nsteps, step, tuple(zeros for _ in range(m)))
    r4 = jnp.arange(4)
    cols = 4 * wc[None, None, :] + r4[:, None, None]  # element (j, ., c): column 4c + j
    cm = None if wmask is None and n % 4 == 0 else jnp.broadcast_to(cols < n, (4, gw, bw))
    sc = _load(s_ref.at[gi[None, :, None], cols], cm, 0.0).astype(_F32)
    zr = None if sym else _load(z_ref.at[gi[None, :, None], cols], cm, 0.0).astype(_F32)
    for r in range(m):
        mx, _, xsum = (v[None, :, None] for v in stats[r])
        acc = accs[r] if unroll == 4 else jnp.sum(accs[r].reshape(unroll // 4, 4, gw, bw), axis=0)
        d = acc.astype(_F32) * (mx / _IDOT_QMAX)
        y = (d - 8.0 * xsum) * sc if sym else d * sc + xsum * zr
        y = y * (mx * 0.0 + 1.0)  # NaN / inf activations: NaN out, not the finite codes' sum
        y = y[:, 0, :] if gw == 1 else jnp.sum(y, axis=1)
        plt.store(o_ref.at[pl.program_id(1), r, r4[:, None], wc[None, :]], y, mask=wmask)


def _w4_pair_asm(w, i: int, dtype):
    """Nibble i of each int32 word -> (offset + code) in bf16 (offset 128) / f16 (1024): a prmt brings byte
    i // 2 of two words into the low bytes of the two halves, a lop3 masks the nibble and ors the exponent."""
    b, hi = divmod(i, 2)
    sel = b | (b << 4) | ((4 + b) << 8) | ((4 + b) << 12)
    magic = "0x43004300" if dtype == jnp.bfloat16 else "0x64006400"
    asm = ("{\n.reg .b32 t;\n"
           f"prmt.b32 t, $1, $2, 0x{sel:04X};\n"
           + ("shr.u32 t, t, 4;\n" if hi else "")
           + f"lop3.b32 $0, t, 0x000F000F, {magic}, 0xEA;\n}}")
    [v] = plt.elementwise_inline_asm(asm, args=[w], constraints="=r,r,r", pack=2,
                                     result_shape_dtypes=[jax.ShapeDtypeStruct(w.shape, dtype)])
    return v


def _w4_mma_kernel(x_ref, w_ref, s_ref, z_ref, o_ref, *, m, n, bw, g, rows, per, ngroups, interpret):
    """int4, up to 16 activation rows, 16-bit activations: per step of `rows` packed rows and byte b,
    acc_b [bw, 16] += (off + c_2b)^T [bw, rows] @ X_first_half [rows, 16] + (off + c_2b+1)^T @ X_second."""
    j = pl.program_id(0)
    sp = pl.program_id(1)
    cdt = x_ref.dtype
    off = 128.0 if cdt == jnp.bfloat16 else 1024.0
    wc, wmask = _word_block(w_ref, j, bw)
    half = g // 2
    g0 = sp * per
    g1 = jnp.minimum(g0 + per, ngroups)
    sym = z_ref is None
    mr = jnp.arange(16)
    m_ok = (mr < m)[None, :]
    dims = (((1,), (0,)), ((), ()))

    def group(gi, tots):
        def step(t, accs):
            rr = gi * half + t * rows + jnp.arange(rows)
            w = _load(w_ref.at[rr[:, None], wc[None, :]], wmask, 0)
            k0 = gi * g + t * rows
            xs = [plt.load(x_ref.at[mr[None, :], (k0 + h * half + jnp.arange(rows))[:, None]], mask=m_ok, other=0.0)
                  for h in range(2)]
            accs = list(accs)
            for i in range(8):
                if interpret:
                    v = ((lax.shift_right_logical(w, 4 * i) & 15).astype(_F32) + off).astype(cdt)
                else:
                    v = _w4_pair_asm(w, i, cdt)
                accs[i // 2] = accs[i // 2] + lax.dot_general(v.T, xs[i % 2], dims, preferred_element_type=_F32)
            return tuple(accs)

        accs = lax.fori_loop(0, half // rows, step, tuple(jnp.zeros((bw, 16), _F32) for _ in range(4)))
        kk = gi * g + jnp.arange(g)
        xsum = jnp.sum(plt.load(x_ref.at[mr[None, :], kk[:, None]], mask=m_ok, other=0.0).astype(_F32), axis=0)
        tots = list(tots)
        for b in range(4):
            cols = 4 * wc + b
            cm = None if wmask is None and n % 4 == 0 else cols < n
            sc = _load(s_ref.at[gi, cols], cm, 0.0).astype(_F32)[:, None]
            if sym:
                tots[b] = tots[b] + (accs[b] - (off + 8.0) * xsum[None, :]) * sc
            else:
                zr = _load(z_ref.at[gi, cols], cm, 0.0).astype(_F32)[:, None]
                tots[b] = tots[b] + (accs[b] - off * xsum[None, :]) * sc + xsum[None, :] * zr
        return tuple(tots)

    tots = lax.fori_loop(g0, g1, group, tuple(jnp.zeros((bw, 16), _F32) for _ in range(4)))
    for b in range(4):
        for r in range(m):
            y = jnp.sum(jnp.where(mr[None, :] == r, tots[b], 0.0), axis=1)
            plt.store(o_ref.at[sp, r, b, wc], y, mask=None if wmask is None else wmask[0])


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


def plan(m: int, k: int, n: int, group_size: int, blocks: "QuantBlocks" = None, *, bits: int = 8,
         interpret: bool = False, x_dtype: Any = jnp.float32) -> dict:
    """The kernel's static launch plan for x [m, k] @ W [k, n] (`bits` 4 or 8): path, tiles, k-splits, grid."""
    blocks = blocks or QuantBlocks()
    ngroups = k // group_size
    if bits == 4:
        b4, nw, half = blocks.int4, -(-n // 4), group_size // 2
        if m <= b4.gemv_rows and b4.idot and jnp.dtype(x_dtype) != _F32:
            unroll = max(4, min(b4.idot_unroll, half))
            parts = min(max(b4.idot_parts, -(-half // _IDOT_MAX_ROWS)), half // unroll)
            bw = 128 * b4.warps if not interpret else 32  # 4 words per thread: the asm's [4 rows, 4 words]
            # runs per program, one per warp; only on whole word blocks (a masked block's loads are not
            # vectorised, and Triton then lays the warps along the words instead of the runs)
            runs = ngroups * parts
            gw = math.gcd(b4.idot_groups, runs) if nw % bw == 0 else 1
            return dict(path="w4_idot", bw=bw, plen=half // parts, unroll=unroll, gw=gw, splits=runs // gw,
                        warps=b4.warps * gw, grid=(pl.cdiv(nw, bw), runs // gw))
        if m <= b4.gemv_rows:
            unroll = min(b4.unroll, half)
            parts = max(1, min(b4.parts, half // unroll))
            bw = b4.words if not interpret else min(b4.words, 32)
            return dict(path="w4_gemv", bw=bw, unroll=unroll, parts=parts, splits=ngroups * parts,
                        warps=b4.warps, grid=(pl.cdiv(nw, bw), ngroups * parts))
        if b4.dot_tiles:  # tl.dot on exact code tiles (the int8 kernel's scheme, on words)
            bw = b4.dot_words if not interpret else min(b4.dot_words, 16)
            gps = max(1, min(blocks.block_k // group_size, ngroups))
            programs = pl.cdiv(nw, bw) * pl.cdiv(m, 16)
            splits = min(blocks.num_splits or _heuristic_splits(programs, ngroups), ngroups)
            per = pl.cdiv(pl.cdiv(ngroups, splits), gps) * gps
            splits = pl.cdiv(ngroups, per)
            return dict(path="w4_dot", bm=16, bw=bw, gps=gps, per=per, splits=splits, warps=blocks.num_warps,
                        grid=(pl.cdiv(nw, bw), pl.cdiv(m, 16), splits))
        bw = b4.mma_words if not interpret else min(b4.mma_words, 32)
        # the f32 partials (splits * m * n * 4 bytes) stay <= 1/4 of the weights' (k * n / 2)
        per = min(max(b4.mma_groups, -(-32 * m // group_size)), ngroups)
        splits = pl.cdiv(ngroups, per)
        return dict(path="w4_mma", bw=bw, rows=min(b4.mma_rows, half), per=per, splits=splits, warps=b4.mma_warps,
                    grid=(pl.cdiv(nw, bw), splits))
    gemv = m <= blocks.dot_rows
    bn = blocks.block_n if not interpret else min(blocks.block_n, 32)
    bm = 16
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
    p = plan(m, k, n, group_size, blocks, bits=bits, interpret=interpret, x_dtype=x.dtype)
    splits, g = p["splits"], group_size
    if p["path"] == "w4_idot":
        kern = functools.partial(_w4_idot_kernel, m=m, n=n, bw=p["bw"], g=g, plen=p["plen"], unroll=p["unroll"],
                                 gw=p["gw"], interpret=interpret)
        warps, stages = p["warps"], 1
    elif p["path"] == "w4_gemv":
        kern = functools.partial(_w4_gemv_kernel, m=m, n=n, bw=p["bw"], g=g, unroll=p["unroll"], parts=p["parts"],
                                 prefetch=blocks.int4.prefetch, interpret=interpret)
        warps, stages = p["warps"], 1
    elif p["path"] == "w4_dot":
        kern = functools.partial(_w4_dot_kernel, m=m, bm=p["bm"], bw=p["bw"], g=g, gps=p["gps"], per=p["per"],
                                 ngroups=k // g, interpret=interpret)
        warps, stages = p["warps"], blocks.num_stages
    elif p["path"] == "w4_mma":
        kern = functools.partial(_w4_mma_kernel, m=m, n=n, bw=p["bw"], g=g, rows=p["rows"], per=p["per"],
                                 ngroups=k // g, interpret=interpret)
        warps, stages = p["warps"], blocks.int4.mma_stages
    else:
        common = dict(m=m, n=n, bn=p["bn"], g=g, gps=p["gps"], per=p["per"], ngroups=k // g, splits=splits)
        kern = (functools.partial(_gemv_kernel, **common) if p["path"] == "gemv"
                else functools.partial(_dot_kernel, bm=p["bm"], **common))
        warps, stages = blocks.num_warps, blocks.num_stages
    partials = bits == 4 or splits > 1  # the int4 kernels always write f32 partials
    # int4: partials [splits, m, byte b, word c] (column 4c + b): each store is contiguous along the words
    shape = (splits, m, 4, qweight.shape[1]) if bits == 4 else (splits, m, n) if partials else (m, n)
    args = [x, qweight, scale] + ([zero] if zero is not None else [])
    if zero is None:
        def kernel(x_ref, w_ref, s_ref, o_ref):
            return kern(x_ref, w_ref, s_ref, None, o_ref)
    else:
        kernel = kern
    anyspec = pl.BlockSpec(memory_space=pl.ANY)
    out = pl.pallas_call(
        kernel, grid=p["grid"], in_specs=[anyspec] * len(args), out_specs=anyspec,
        out_shape=jax.ShapeDtypeStruct(shape, _F32 if partials else out_dtype),
        compiler_params=_compiler_params(warps, stages), interpret=interpret,
        name=f"quant_matmul_int{bits}_{p['path']}",
    )(*args)
    if bits == 4:  # one XLA fusion: the split sum, the (b, c) -> 4c + b interleave and the cast
        return jnp.sum(out, axis=0).transpose(0, 2, 1).reshape(m, -1)[:, :n].astype(out_dtype)
    return jnp.sum(out, axis=0).astype(out_dtype) if partials else out


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
    chosen = choose_impl(impl, x.shape[0], x.dtype, group_size, bits=bits, blocks=blocks, interpret=interpret)
    if chosen == "xla":
        return _xla(x, qweight, scale, zero, bits, group_size, out_dtype)
    return _kernel_call(x, qweight, scale, zero, (bits, group_size, out_dtype, blocks, bool(interpret)))
