"""Grouped matmul (the dropless-MoE expert matmul): out[rows of group g] = lhs[rows of g] @ rhs[g].

lhs [M, K] holds the rows of all groups back to back (group g = rows [sum(gs[:g]), sum(gs[:g+1])));
rhs [G, K, N]; group_sizes [G] int32 with sum <= M (rows past the sum come back as zeros, as in
`jax.lax.ragged_dot`).  Three faces:
  reference(lhs, rhs, group_sizes)          dense masked loop over groups: the definition of correct
  impl "xla"                                 jax.lax.ragged_dot
  impl "triton"                              Pallas (Triton lowering, sm80+), jax.custom_vjp:
    forward: grid (column tile, visit); a visit is one (group, row tile) pair, so a row tile that
      straddles a group boundary is visited once per group, each visit storing only its own rows.
      Column tiles vary fastest, so CTAs in flight share the lhs row tile and one expert's rhs.
    d lhs: the same kernel with rhs read transposed (no transposed copy of the weights).
    d rhs: per group, [block_m, block_n] tiles of lhs_g.T @ dout_g, reducing over the group's rows
      in chunks of block_k.
  Block sizes: output tile block_m x block_n, reduction chunk block_k (powers of two >= 16).
`grouped_matmul(..., impl="auto")` picks "triton" on an sm80+ GPU (or with interpret=True), otherwise
"xla", through `kernels.dispatch.select_impl` (logged once); "pallas" means "triton".
Accumulation is float32; the output has lhs's dtype unless `preferred_element_type` says otherwise.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.dispatch import device_info, select_impl

try:  # Triton-lowered Pallas helpers (present on CPU jaxlib too, for interpret mode)
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

IMPLS = ("auto", "xla", "pallas", "triton")
# (block_m, block_n, block_k, num_warps, num_stages).  GPU: best of `bench_moe.py --mode sweep` on the H100
# ([32768, 2048] x [8, 2048, 5632] bf16: 1.64 ms = 462 TFLOP/s vs 2.75 ms for the small tiles; BENCHMARKS.md).
GPU_BLOCKS = (128, 256, 64, 8, 3)  # 2-byte dtypes on sm80 / sm90: (128*64 + 64*256) * 2 B * 3 stages = 144 KiB
GPU_BLOCKS_SMALL = (64, 128, 32, 4, 3)  # 4-byte dtypes (the tiles above: 288 KiB > sm90's 227) and GPUs with
# ~100 KiB of shared memory per block (sm86 / sm89 / sm120: RTX, A10, L4, L40S)
INTERPRET_BLOCKS = (64, 128, 32, 4, 3)  # small tiles: interpret mode's cost grows with the tile


# ---------------------------------------------------------------------------------------------
# reference and XLA
# ---------------------------------------------------------------------------------------------
def reference(lhs: jnp.ndarray, rhs: jnp.ndarray, group_sizes: jnp.ndarray,
              preferred_element_type=None) -> jnp.ndarray:
    """Dense masked loop: every group's matmul on all rows, kept only on that group's rows."""
    out_dtype = preferred_element_type or lhs.dtype
    m = lhs.shape[0]
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    row = jnp.arange(m)
    out = jnp.zeros((m, rhs.shape[2]), jnp.float32)
    for g in range(rhs.shape[0]):
        inside = ((row >= starts[g]) & (row < ends[g]))[:, None]
        out = out + jnp.where(inside, jnp.dot(lhs, rhs[g], preferred_element_type=jnp.float32), 0.0)
    return out.astype(out_dtype)


def _xla(lhs, rhs, group_sizes, out_dtype):
    prec = jax.lax.Precision.HIGHEST if lhs.dtype == jnp.float32 else None  # no TF32 for f32 inputs on the GPU
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32,
                              precision=prec).astype(out_dtype)


# ---------------------------------------------------------------------------------------------
# row permutations around the grouped matmul (dropless dispatch)
# ---------------------------------------------------------------------------------------------
def gather_rows(src: jnp.ndarray, idx: jnp.ndarray, inv: jnp.ndarray) -> jnp.ndarray:
    """src[idx] (rows; idx out of range gives zero rows), whose gradient is a gather too, not a scatter-add.

    inv [S, r] lists, for each source row s, the r positions j with idx[j] == s (out of range where s has
    fewer): the caller knows them (the dispatch's permutations), so the backward is
    dsrc[s] = sum_r dy[inv[s, r]] in f32, with no atomics.  `inv` must be exactly that inverse.
    """
    ints = all(jnp.issubdtype(a.dtype, jnp.integer) for a in (idx, inv))
    if src.ndim < 1 or idx.ndim != 1 or inv.ndim != 2 or inv.shape[0] != src.shape[0] or not ints:
        raise ValueError(f"gather_rows expects src [S, ...], integer idx [J] and inv [S, r]; got src {src.shape}, "
                         f"idx {idx.dtype}{idx.shape}, inv {inv.dtype}{inv.shape}")
    return _gather_rows(src, idx, inv)


@jax.custom_vjp
def _gather_rows(src, idx, inv):
    return jnp.take(src, idx, axis=0, mode="fill", fill_value=0)


def _gather_rows_fwd(src, idx, inv):
    return _gather_rows(src, idx, inv), (inv, jnp.zeros((0,), src.dtype))


def _gather_rows_bwd(res, dy):
    inv, like = res
    d = jnp.take(dy.astype(jnp.float32), inv.reshape(-1), axis=0, mode="fill", fill_value=0)
    return d.reshape(inv.shape + dy.shape[1:]).sum(axis=1).astype(like.dtype), None, None


_gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


# ---------------------------------------------------------------------------------------------
# Pallas (Triton) kernels
# ---------------------------------------------------------------------------------------------
def _tf32(a, b) -> bool | None:
    """allow_tf32 for plgpu.dot: off for f32 operands (f32 results to ~1e-6, as the other f32 kernels)."""
    return False if a.dtype == jnp.float32 and b.dtype == jnp.float32 else None


def _compiler_params(num_warps: int, num_stages: int):
    cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
    return cls(num_warps=num_warps, num_stages=num_stages)


def _visits(group_sizes: jnp.ndarray, m: int, block_m: int) -> Tuple[jnp.ndarray, ...]:
    """Work list of the forward kernel: one (group, row tile) pair per visit.

    A row tile that straddles a group boundary is visited once per group, each visit writing only
    its group's rows.  Group index G is a pseudo group covering rows [sum(gs), M) (written as zeros).
    Visits past the real count get group G + 1 and do nothing.  Static length: cdiv(M, bm) + G.
    """
    g = group_sizes.shape[0]
    gs = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(gs)
    starts = ends - gs
    starts = jnp.concatenate([starts, ends[-1:], jnp.full((1,), m, jnp.int32)])
    ends = jnp.concatenate([ends, jnp.full((2,), m, jnp.int32)])
    sizes = ends - starts  # [G + 2]; the last entry is the "do nothing" group (size 0)
    first_tile = starts // block_m
    n_tiles = jnp.where(sizes > 0, (ends - 1) // block_m - first_tile + 1, 0)
    cum = jnp.cumsum(n_tiles)
    n_visits = pl.cdiv(m, block_m) + g
    v = jnp.arange(n_visits, dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(cum, v, side="right"), g + 1).astype(jnp.int32)
    tile = first_tile[group] + v - (cum[group] - n_tiles[group])
    return group, tile.astype(jnp.int32), starts.astype(jnp.int32), ends.astype(jnp.int32)


def _gmm_kernel(group_ref, tile_ref, start_ref, end_ref, lhs_ref, rhs_ref, out_ref, *,
                num_groups, m, k, n, block_m, block_n, block_k, transpose_rhs):
    j = pl.program_id(0)  # column tile: the fastest launch axis, so neighbours share the lhs row tile
    v = pl.program_id(1)
    g = group_ref[v]
    row0 = tile_ref[v] * block_m
    rows = row0 + jnp.arange(block_m)
    row_mask = (rows >= start_ref[g]) & (rows < end_ref[g]) & (rows < m)
    cols = j * block_n + jnp.arange(block_n)
    col_mask = cols < n
    out_mask = row_mask[:, None] & col_mask[None, :]
    row_sl = pl.ds(row0, block_m)
    col_sl = pl.ds(j * block_n, block_n)

    @pl.when(g < num_groups)
    def _compute():
        def body(kb, acc):
            kk = kb * block_k + jnp.arange(block_k)
            k_mask = kk < k
            k_sl = pl.ds(kb * block_k, block_k)
            a = plgpu.load(lhs_ref.at[row_sl, k_sl], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            if transpose_rhs:  # rhs [G, N, K]
                b = plgpu.load(rhs_ref.at[g, col_sl, k_sl], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
                return acc + plgpu.dot(a, b, trans_b=True, allow_tf32=_tf32(a, b))
            b = plgpu.load(rhs_ref.at[g, k_sl, col_sl], mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            return acc + plgpu.dot(a, b, allow_tf32=_tf32(a, b))

        acc = jax.lax.fori_loop(0, pl.cdiv(k, block_k), body, jnp.zeros((block_m, block_n), jnp.float32))
        plgpu.store(out_ref.at[row_sl, col_sl], acc.astype(out_ref.dtype), mask=out_mask)

    @pl.when(g == num_groups)
    def _zero_tail():
        plgpu.store(out_ref.at[row_sl, col_sl], jnp.zeros((block_m, block_n), out_ref.dtype), mask=out_mask)


def _gmm_pallas(lhs, rhs, group_sizes, out_dtype, *, transpose_rhs, block_m, block_n, block_k,
                num_warps, num_stages, interpret, poison=False):
    """Forward kernel call.  poison=True (tests) starts from a NaN output so unwritten rows show."""
    m, k = lhs.shape
    g = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    group, tile, starts, ends = _visits(group_sizes, m, block_m)
    kernel = functools.partial(_gmm_kernel, num_groups=g, m=m, k=k, n=n, block_m=block_m,
                               block_n=block_n, block_k=block_k, transpose_rhs=transpose_rhs)
    anyspec = pl.BlockSpec(memory_space=pl.ANY)
    args = (group, tile, starts, ends, lhs, rhs)
    extra = dict(input_output_aliases={6: 0}) if poison else {}
    if poison:
        args += (jnp.full((m, n), jnp.nan, out_dtype),)
        kernel = functools.partial(_drop_alias, kernel)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(n, block_n), group.shape[0]),
        in_specs=[anyspec] * len(args),
        out_specs=anyspec,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        compiler_params=_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="grouped_matmul",
        **extra,
    )(*args)


def _drop_alias(kernel, *refs):
    """Kernel wrapper ignoring the aliased (poisoned) output input ref."""
    *ins, _aliased, out = refs
    return kernel(*ins, out)


def _tgmm_kernel(start_ref, end_ref, lhs_ref, dout_ref, out_ref, *, k, n, block_m, block_n, block_k):
    """out[g] = lhs[rows of g].T @ dout[rows of g]: [K, N] per group in [block_m, block_n] tiles,
    reducing over the group's rows in chunks of block_k."""
    j = pl.program_id(0)
    i = pl.program_id(1)
    g = pl.program_id(2)
    start = start_ref[g]
    end = end_ref[g]
    kk = i * block_m + jnp.arange(block_m)
    cols = j * block_n + jnp.arange(block_n)
    k_mask = kk < k
    col_mask = cols < n
    k_sl = pl.ds(i * block_m, block_m)
    col_sl = pl.ds(j * block_n, block_n)

    def body(rb, acc):
        r0 = start + rb * block_k
        r_mask = (r0 + jnp.arange(block_k)) < end
        a = plgpu.load(lhs_ref.at[pl.ds(r0, block_k), k_sl], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        b = plgpu.load(dout_ref.at[pl.ds(r0, block_k), col_sl], mask=r_mask[:, None] & col_mask[None, :],
                       other=0.0)
        return acc + plgpu.dot(a, b, trans_a=True, allow_tf32=_tf32(a, b))

    acc = jax.lax.fori_loop(0, pl.cdiv(end - start, block_k), body, jnp.zeros((block_m, block_n), jnp.float32))
    plgpu.store(out_ref.at[g, k_sl, col_sl], acc.astype(out_ref.dtype), mask=k_mask[:, None] & col_mask[None, :])


def _tgmm_pallas(lhs, dout, group_sizes, out_dtype, *, block_m, block_n, block_k, num_warps, num_stages,
                 interpret):
    m, k = lhs.shape
    n = dout.shape[1]
    g = group_sizes.shape[0]
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    starts = ends - group_sizes.astype(jnp.int32)
    kernel = functools.partial(_tgmm_kernel, k=k, n=n, block_m=block_m, block_n=block_n, block_k=block_k)
    anyspec = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(n, block_n), pl.cdiv(k, block_m), g),
        in_specs=[anyspec] * 4,
        out_specs=anyspec,
        out_shape=jax.ShapeDtypeStruct((g, k, n), out_dtype),
        compiler_params=_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="grouped_matmul_transposed",
    )(starts, ends, lhs, dout)


class _Cfg(NamedTuple):
    """Static kernel settings (hashable: passed as a nondiff argument of the custom_vjp)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    interpret: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm_triton(lhs, rhs, group_sizes, out_dtype, cfg):
    return _gmm_pallas(lhs, rhs, group_sizes, out_dtype, transpose_rhs=False, **cfg._asdict())


def _gmm_triton_fwd(lhs, rhs, group_sizes, out_dtype, cfg):
    return _gmm_triton(lhs, rhs, group_sizes, out_dtype, cfg), (lhs, rhs, group_sizes)


def _gmm_triton_bwd(out_dtype, cfg, res, dout):
    lhs, rhs, group_sizes = res
    dout = dout.astype(lhs.dtype)  # one operand dtype for the kernels' dots (out_dtype may be wider)
    kw = cfg._asdict()
    dlhs = _gmm_pallas(dout, rhs, group_sizes, lhs.dtype, transpose_rhs=True, **kw)
    drhs = _tgmm_pallas(lhs, dout, group_sizes, rhs.dtype, **kw)
    return dlhs, drhs, None


_gmm_triton.defvjp(_gmm_triton_fwd, _gmm_triton_bwd)


# ---------------------------------------------------------------------------------------------
# public
# ---------------------------------------------------------------------------------------------
def _pick_impl(impl: str, interpret: bool) -> str:
    return select_impl("grouped_matmul", impl, interpret=interpret, preference=("triton",),
                       unsupported={"mosaic": "no Mosaic GPU grouped matmul yet (use triton)"})


def grouped_matmul(lhs: jnp.ndarray, rhs: jnp.ndarray, group_sizes: jnp.ndarray, *,
                   preferred_element_type=None, impl: str = "auto", interpret: bool = False,
                   block_m: Optional[int] = None, block_n: Optional[int] = None, block_k: Optional[int] = None,
                   num_warps: Optional[int] = None, num_stages: Optional[int] = None) -> jnp.ndarray:
    """[M, K] x [G, K, N] with group_sizes [G] -> [M, N]; differentiable in lhs and rhs.

    Tiles left None take `GPU_BLOCKS` (the H100 sweep's best) for 2-byte inputs on sm80 / sm90,
    `GPU_BLOCKS_SMALL` otherwise (4-byte inputs, GPUs with less shared memory), `INTERPRET_BLOCKS` in
    interpret mode.
    """
    big_smem = device_info().compute_capability in ((8, 0), (9, 0))
    dflt = (INTERPRET_BLOCKS if interpret
            else GPU_BLOCKS if jnp.dtype(lhs.dtype).itemsize <= 2 and big_smem else GPU_BLOCKS_SMALL)
    block_m, block_n, block_k, num_warps, num_stages = (
        d if v is None else v for v, d in zip((block_m, block_n, block_k, num_warps, num_stages), dflt))
    if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"grouped_matmul expects lhs [M, K] and rhs [G, K, N], got {lhs.shape} and {rhs.shape}")
    if group_sizes.shape != (rhs.shape[0],) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be an integer array of shape ({rhs.shape[0]},), "
                         f"got {group_sizes.dtype}{group_sizes.shape}")
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} must be one of {IMPLS}")
    for name, b in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name}={b} must be a power of two >= 16")
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    impl = _pick_impl(impl, interpret)
    if impl == "xla":
        return _xla(lhs, rhs, group_sizes, out_dtype)
    rhs = rhs.astype(lhs.dtype)
    cfg = _Cfg(block_m, block_n, block_k, num_warps, num_stages, interpret)
    return _gmm_triton(lhs, rhs, group_sizes.astype(jnp.int32), out_dtype, cfg)
