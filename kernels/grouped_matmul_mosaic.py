"""Mosaic GPU (Hopper) grouped matmuls for the dropless MoE FFN, on a tile-padded row layout.

Rows sorted by expert are placed so that every group starts at a multiple of `tile_m` (`padded_layout`):
each row tile then belongs to exactly one expert (`tile_group[i]`; `E` marks the tiles past the used
ones), pad rows are zero, and the kernels need no row masks.  Persistent, warp-specialized kernels
in the shape of `kernels/swiglu_mosaic.py` (a memory warpgroup streams K-slices with TMA into a
`stages`-deep SMEM ring; two compute warpgroups each own a [tile_m, tile_n] slice of a
[tile_m, 2 * tile_n] CTA tile and accumulate with wgmma), reading the expert of each row tile from
`tile_group` in GMEM and taking that expert's weight slices:
  grouped_swiglu_fwd   h = silu(x @ w_gate[e]) * (x @ w_up[e]), two accumulators from one x tile;
                       save_products=True also stores g and u (bf16) for the backward.
  grouped_matmul_fwd   out = lhs @ rhs[e] (the down projection).
  grouped_matmul_nt    out = sum_j lhs_j @ rhs_j[e]^T, rhs stored [E, N, K] and handed to wgmma as a
                       transposed SMEM view, one or two pairs in one accumulator (backward dh and dx).
  grouped_swiglu_bwd   dh = dy @ w_down[e]^T with the silu backward in the epilogue (g, u tiles
                       TMA-prefetched during the K loop): dg, du without dh in memory.
Tiles whose group is the sentinel are skipped: their output rows are undefined (no caller reads them;
the backward masks them).  `grouped_swiglu_ffn` is the differentiable expert FFN (custom_vjp): Mosaic
forward; backward dh = dy Wd^T and dx = dg Wg^T + du Wu^T on `grouped_matmul_nt`, the silu backward in
float32 from the saved g, u, and the weight gradients on the Triton kernels of `kernels/grouped_matmul.py`
with the padded group sizes (pad rows are zero, so they add nothing).  With `interpret=True` the Mosaic
kernels are XLA stand-ins (`jax.lax.ragged_dot`; undefined rows NaN) and the Triton ones run in Pallas
interpret mode: the CPU tests of the padding and the backward math.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels.grouped_matmul import (GPU_BLOCKS, GPU_BLOCKS_SMALL, INTERPRET_BLOCKS, _gmm_pallas, gather_rows,
                                     _tgmm_pallas)
from kernels.dispatch import device_info, select_impl

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Tiles:
    tile_m: int = 128  # rows per tile; the padded layout's group alignment
    tile_n: int = 64  # per compute warpgroup (and per matrix for gate/up); CTA tile = 2 * tile_n
    tile_k: int = 64
    stages: int = 4
    epi_m: int = 64  # epilogue store chunk
    epi_n: int = 64
    grid_tile_width: int = 4


GATE_UP_TILES = Tiles()  # swiglu_mosaic's tiles: (128x64 + 2 x 64x128) * 2 B * 4 stages + 32 KiB out = 224 KiB
DOWN_TILES = Tiles()
DH_TILES = Tiles()  # backward, one pair: (128x64 + 128x64) * 2 B * 4 stages + 32 KiB = 160 KiB
DX_TILES = Tiles(stages=3)  # backward, two pairs: 2 x (128x64 + 128x64) * 2 B * 3 stages + 32 KiB = 224 KiB
# `experiments/bench_moe.py --mode check` passed on the H100 (jax 0.11.2, 2026-11-22): forward kernels, dh / dx
# (one and two pairs), the fused dh + silu backward, and the dropless layer's output and all gradients vs f32
# XLA on balanced, skewed (3 empty experts) and the benchmark's routing (experiments/results/moe_mosaic_bwd_*).
VALIDATED = True


# ---------------------------------------------------------------------------------------------
# padded row layout
# ---------------------------------------------------------------------------------------------
class PaddedLayout(NamedTuple):
    """Where each expert-sorted row sits in the tile-aligned buffer of `padded_rows(...)` rows."""

    row_index: jnp.ndarray  # [M] int32: padded row of each sorted row (P = out of range, rows past sum(sizes))
    source: jnp.ndarray  # [P] int32: sorted row of each padded row (M for pad rows)
    tile_group: jnp.ndarray  # [P // tile_m] int32: expert of each row tile, E past the used tiles
    group_sizes: jnp.ndarray  # [E] int32: padded group sizes (multiples of tile_m)
    num_tiles: jnp.ndarray  # () int32: used row tiles


def padded_rows(m: int, num_groups: int, tile_m: int) -> int:
    """Static size of the padded buffer: the most rows M rows in `num_groups` tile-aligned groups can need."""
    return max(1, (m + num_groups * (tile_m - 1)) // tile_m) * tile_m


def padded_layout(group_sizes: jnp.ndarray, m: int, tile_m: int) -> PaddedLayout:
    """Tile-aligned placement of M expert-sorted rows with group_sizes [E] (sum <= M; pure jnp)."""
    if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be a 1-D integer array, got {group_sizes.dtype}{group_sizes.shape}")
    if tile_m < 1:
        raise ValueError(f"tile_m={tile_m} must be positive")
    e = group_sizes.shape[0]
    p = padded_rows(m, e, tile_m)
    gs = group_sizes.astype(jnp.int32)
    tiles = (gs + tile_m - 1) // tile_m
    psizes = tiles * tile_m
    ends, pends = jnp.cumsum(gs), jnp.cumsum(psizes)
    starts, pstarts = ends - gs, pends - psizes
    row = jnp.arange(m, dtype=jnp.int32)
    grp = jnp.searchsorted(ends, row, side="right").astype(jnp.int32)  # E for rows past sum(sizes)
    gc = jnp.minimum(grp, e - 1)
    row_index = jnp.where(grp < e, pstarts[gc] + row - starts[gc], p).astype(jnp.int32)
    tile = jnp.arange(p // tile_m, dtype=jnp.int32)
    tile_group = jnp.searchsorted(jnp.cumsum(tiles), tile, side="right").astype(jnp.int32)
    prow = jnp.arange(p, dtype=jnp.int32)
    pg = jnp.repeat(tile_group, tile_m)
    pgc = jnp.minimum(pg, e - 1)
    off = prow - pstarts[pgc]
    source = jnp.where((pg < e) & (off < gs[pgc]), starts[pgc] + off, m).astype(jnp.int32)
    return PaddedLayout(row_index, source, tile_group, psizes.astype(jnp.int32), jnp.sum(tiles).astype(jnp.int32))


def pad_rows(xs: jnp.ndarray, layout: PaddedLayout) -> jnp.ndarray:
    """[M, D] sorted rows -> [P, D] padded buffer (pad rows zero); the gradient is a gather through row_index."""
    return gather_rows(xs, layout.source, layout.row_index[:, None])


def unpad_rows(out_padded: jnp.ndarray, layout: PaddedLayout) -> jnp.ndarray:
    """[P, N] padded buffer -> [M, N] sorted rows (rows past sum(sizes) zero); the gradient is a gather."""
    return gather_rows(out_padded, layout.row_index, layout.source[:, None])


# ---------------------------------------------------------------------------------------------
# Mosaic GPU kernels
# ---------------------------------------------------------------------------------------------
def unsupported_reason(m_padded: int, d: int, f: int, dtype, gate_up: Tiles = GATE_UP_TILES,
                       down: Tiles = DOWN_TILES,
                       backward: Sequence[Optional[Tiles]] = (DH_TILES, DX_TILES)) -> Optional[str]:
    """Why the Mosaic grouped FFN may not take x [m_padded, d] with experts d -> f -> d (None if it can);
    `backward`: the (dh, dx) tiles of a Mosaic backward (None: that one on Triton), () for the Triton one."""
    from kernels import dispatch
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {jnp.dtype(dtype)} (Mosaic grouped matmul takes bf16/f16)"
    bwd = tuple(backward) + (None,) * (2 - len(tuple(backward)))
    shapes = (("gate/up", gate_up, d, f), ("down", down, f, d), ("dh", bwd[0], d, f), ("dx", bwd[1], f, d))
    shapes = tuple(s for s in shapes if s[1] is not None)
    for name, t, _, _ in shapes[1:]:
        if t.tile_m != gate_up.tile_m:
            return f"gate/up tile_m={gate_up.tile_m} != {name} tile_m={t.tile_m}"
    for name, t, k, n in shapes:
        if m_padded % t.tile_m or n % (2 * t.tile_n) or k % t.tile_k:
            return (f"{name}: shape M={m_padded} K={k} N={n} not a multiple of the tiles "
                    f"({t.tile_m}, {t.tile_k}, {2 * t.tile_n})")
        if t.tile_m % t.epi_m or t.tile_n % t.epi_n or t.epi_m % 64:
            return (f"{name}: epilogue chunk ({t.epi_m}, {t.epi_n}) must divide ({t.tile_m}, {t.tile_n}) "
                    "with epi_m a multiple of 64 (the wgmma row layout)")
    if not VALIDATED and not dispatch.allow_unvalidated():
        return "Mosaic grouped matmul not yet validated on GPU (set IVA_KERNELS_ALLOW_UNVALIDATED=1 to try it)"
    return None


def _num_sms() -> int:
    return device_info().core_count or 132


def _transforms(plgpu, cols: int, dtype):
    swizzle = plgpu.find_swizzle(cols * jnp.dtype(dtype).itemsize * 8)
    elems = swizzle // jnp.dtype(dtype).itemsize
    return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle))


def _grouped_call(lhs: Sequence[jnp.ndarray], rhs: Sequence[jnp.ndarray], tile_group, tiles: Tiles, epilogue,
                  n_out: int, *, accumulate: bool = False, transpose_rhs: bool = False,
                  aux: Sequence[jnp.ndarray] = ()):
    """Persistent grouped kernel over row tiles i with e = tile_group[i] (tiles with e = E skipped).

    accumulate=False: one lhs, one wgmma accumulator per rhs j: acc_j = lhs @ rhs[j][e].
    accumulate=True: pairs (lhs[j], rhs[j]) summed into ONE accumulator: acc = sum_j lhs[j] @ rhs[j][e].
    transpose_rhs: rhs stored [E, N, K] (the SMEM tile [N, K] is handed to wgmma transposed), else [E, K, N].
    `epilogue(accs, *aux)` maps [epi_m, epi_n] chunks of the f32 accumulators (and of the aux [P, N]
    inputs at the output tile, TMA-prefetched while the K loop runs) elementwise to `n_out` chunks stored
    (in lhs.dtype) to the n_out outputs [P, N]."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    p, k = lhs[0].shape
    n = rhs[0].shape[1] if transpose_rhs else rhs[0].shape[2]
    dtype = lhs[0].dtype
    tm, tn, tk = tiles.tile_m, tiles.tile_n, tiles.tile_k
    em, en = tiles.epi_m, tiles.epi_n
    cta_n = 2 * tn
    m_iters, n_iters, k_iters = p // tm, n // cta_n, k // tk
    num_groups = rhs[0].shape[0]
    in_tr = w_tr = _transforms(plgpu, tk, dtype)  # 128 B swizzle at tile_k = 64 (bf16), either rhs layout
    out_tr = _transforms(plgpu, en, dtype)
    aux_tr = _transforms(plgpu, tn, dtype)
    n_lhs, n_rhs, n_aux = len(lhs), len(rhs), len(aux)
    n_acc = 1 if accumulate else n_rhs
    if transpose_rhs:
        w_spec = plgpu.BlockSpec((cta_n, tk), lambda kk: (0, kk), transforms=w_tr, memory_space=plgpu.SMEM)
    else:
        w_spec = plgpu.BlockSpec((tk, cta_n), lambda kk: (kk, 0), transforms=w_tr, memory_space=plgpu.SMEM)

    def pipeline(body, context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_iters,),
            memory_registers=40,
            in_specs=[plgpu.BlockSpec((tm, tk), lambda kk: (0, kk), transforms=in_tr, memory_space=plgpu.SMEM)]
            * n_lhs + [w_spec] * n_rhs,
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=tiles.stages,
            compute_context=context,
        )

    def w_block(w, grp, n_sl):
        return w.at[grp, n_sl, :] if transpose_rhs else w.at[grp, :, n_sl]

    def kernel(tg_gmem, *refs):
        x_gmems, w_gmems = refs[:n_lhs], refs[n_lhs:n_lhs + n_rhs]
        aux_gmems, o_gmems = refs[n_lhs + n_rhs:n_lhs + n_rhs + n_aux], refs[n_lhs + n_rhs + n_aux:]
        ignore = lambda *_, **__: None  # noqa: E731  (the body does not change the allocations)
        aux_scratch = dict(aux_smem=plgpu.SMEM((2, n_aux, tm, tn), dtype, transforms=aux_tr),
                           aux_bar=plgpu.Barrier(num_barriers=2 * n_aux)) if n_aux else {}

        @functools.partial(pl.run_scoped,
                           allocs=pipeline(ignore, ignore).get_allocations(*x_gmems, *(w.at[0] for w in w_gmems)),
                           out_smem=plgpu.SMEM((2, 2, em, en), dtype, transforms=out_tr),
                           **aux_scratch, collective_axes="wg")
        def _scope(allocs, out_smem, aux_smem=None, aux_bar=None):
            wg = lax.axis_index("wg")

            @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
            def _tiles(info):
                (lin,) = info.index
                mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters), 1, tiles.grid_tile_width)
                grp = tg_gmem[mi]
                m_sl = pl.ds(mi * tm, tm)
                n_sl = pl.ds(ni * cta_n, cta_n)
                wg_n = pl.ds(wg * tn, tn)

                def context(run):
                    @functools.partial(pl.run_scoped, accs=[plgpu.ACC((tm, tn), _F32)] * n_acc)
                    def _accs(accs):
                        for j, a_gmem in enumerate(aux_gmems):  # this warpgroup's aux tiles, during the K loop
                            plgpu.copy_gmem_to_smem(a_gmem.at[m_sl, n_sl].at[:, wg_n], aux_smem.at[wg, j],
                                                    aux_bar.at[wg * n_aux + j])
                        run(tuple(accs))
                        for j in range(n_aux):
                            plgpu.barrier_wait(aux_bar.at[wg * n_aux + j])
                        acc_vals = [a[...] for a in accs]
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        c = 0
                        for ei in range(tm // em):  # the epilogue chunk by chunk: fewer live registers
                            for ej in range(tn // en):
                                rows, cols = pl.ds(ei * em, em), pl.ds(ej * en, en)
                                outs = epilogue([v[ei * em:(ei + 1) * em, ej * en:(ej + 1) * en] for v in acc_vals],
                                                *(aux_smem.at[wg, j].at[rows, cols][...] for j in range(n_aux)))
                                for o_val, o_gmem in zip(outs, o_gmems):
                                    slot = c % 2
                                    c += 1
                                    plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                                    out_smem[wg, slot] = o_val.astype(dtype)
                                    plgpu.commit_smem()
                                    plgpu.copy_smem_to_gmem(out_smem.at[wg, slot],
                                                            o_gmem.at[m_sl, n_sl].at[:, wg_n].at[rows, cols])

                def wg_rhs(w_smem):  # this warpgroup's [tk, tn] view of the rhs tile
                    if transpose_rhs:
                        return plgpu.transpose_ref(w_smem.at[wg_n, :], (1, 0))
                    return w_smem.at[:, wg_n]

                def body(_, *smems):
                    x_smems, w_smems, carry = smems[:n_lhs], smems[n_lhs:n_lhs + n_rhs], smems[n_lhs + n_rhs]
                    if accumulate:
                        for x_smem, w_smem in zip(x_smems, w_smems):
                            plgpu.wgmma(carry[0], x_smem, wg_rhs(w_smem))
                    else:
                        for acc, w_smem in zip(carry, w_smems):
                            plgpu.wgmma(acc, x_smems[0], wg_rhs(w_smem))
                    plgpu.wgmma_wait(0)
                    return carry

                @pl.when(grp < num_groups)
                def _run():
                    pipeline(body, context)(*(x.at[m_sl, :] for x in x_gmems),
                                            *(w_block(w, grp, n_sl) for w in w_gmems), allocations=allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    out_type = [jax.ShapeDtypeStruct((p, n), dtype)] * n_out
    return plgpu.kernel(
        kernel,
        out_type=out_type,
        grid=(min(_num_sms(), m_iters * n_iters),),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True,
                                             lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )(tile_group, *lhs, *rhs, *aux)


def _check_kernel_args(lhs, rhs, tile_group, tiles: Tiles, what: str, transpose_rhs: bool = False):
    p, k = lhs.shape
    for w in rhs:
        kn = (w.shape[2], w.shape[1]) if transpose_rhs and w.ndim == 3 else w.shape[1:]
        if w.ndim != 3 or kn[0] != k or w.shape != rhs[0].shape or w.dtype != lhs.dtype:
            want = f"[E, N, {k}]" if transpose_rhs else f"[E, {k}, N]"
            raise ValueError(f"{what}: weights must all be {want} {lhs.dtype}, got {w.dtype}{w.shape}")
    n = rhs[0].shape[1 if transpose_rhs else 2]
    if p % tiles.tile_m or n % (2 * tiles.tile_n) or k % tiles.tile_k:
        raise ValueError(f"{what}: M={p} K={k} N={n} not a multiple of the tiles "
                         f"({tiles.tile_m}, {tiles.tile_k}, {2 * tiles.tile_n})")
    if tile_group.shape != (p // tiles.tile_m,):
        raise ValueError(f"{what}: tile_group must have shape ({p // tiles.tile_m},), got {tile_group.shape}")


def grouped_swiglu_fwd(xs_padded: jnp.ndarray, w_gate: jnp.ndarray, w_up: jnp.ndarray, tile_group: jnp.ndarray,
                       *, save_products: bool = False, tiles: Tiles = GATE_UP_TILES):
    """h = silu(x @ w_gate[e]) * (x @ w_up[e]) per row tile (e = tile_group[tile]); [P, D] -> [P, F].

    save_products=True returns (h, g, u) with g, u the matmul results in x's dtype.
    """
    _check_kernel_args(xs_padded, (w_gate, w_up), tile_group, tiles, "grouped_swiglu_fwd")

    def epilogue(accs):
        g, u = accs
        h = g / (1.0 + jnp.exp(-g)) * u
        return [h, g, u] if save_products else [h]

    outs = _grouped_call((xs_padded,), (w_gate, w_up), tile_group.astype(jnp.int32), tiles, epilogue,
                         3 if save_products else 1)
    return tuple(outs) if save_products else outs[0]


def grouped_matmul_fwd(lhs_padded: jnp.ndarray, rhs: jnp.ndarray, tile_group: jnp.ndarray,
                       *, tiles: Tiles = DOWN_TILES) -> jnp.ndarray:
    """out = lhs @ rhs[e] per row tile (e = tile_group[tile]); [P, K] x [E, K, N] -> [P, N]."""
    _check_kernel_args(lhs_padded, (rhs,), tile_group, tiles, "grouped_matmul_fwd")
    return _grouped_call((lhs_padded,), (rhs,), tile_group.astype(jnp.int32), tiles, lambda accs: accs, 1)[0]


def grouped_matmul_nt(lhs: Sequence[jnp.ndarray], rhs: Sequence[jnp.ndarray], tile_group: jnp.ndarray,
                      *, tiles: Optional[Tiles] = None) -> jnp.ndarray:
    """out = sum_j lhs[j] @ rhs[j][e].T per row tile (e = tile_group[tile]); lhs [P, K], rhs [E, N, K] -> [P, N].

    One or two pairs summed in one f32 accumulator (the backward's dh = dy Wd^T, dx = dg Wg^T + du Wu^T);
    rhs is read as stored (no transposed copy).  tiles None: DH_TILES for one pair, DX_TILES for two.
    """
    lhs, rhs = tuple(lhs), tuple(rhs)
    if not 1 <= len(lhs) == len(rhs) <= 2:
        raise ValueError(f"grouped_matmul_nt takes 1 or 2 (lhs, rhs) pairs, got {len(lhs)} lhs and {len(rhs)} rhs")
    tiles = tiles or (DH_TILES if len(lhs) == 1 else DX_TILES)
    p, k = lhs[0].shape
    for a in lhs:
        if a.shape != (p, k) or a.dtype != lhs[0].dtype:
            raise ValueError(f"grouped_matmul_nt: every lhs must be {lhs[0].dtype}{(p, k)}, got {a.dtype}{a.shape}")
    _check_kernel_args(lhs[0], rhs, tile_group, tiles, "grouped_matmul_nt", transpose_rhs=True)
    return _grouped_call(lhs, rhs, tile_group.astype(jnp.int32), tiles, lambda accs: accs, 1,
                         accumulate=True, transpose_rhs=True)[0]


def _silu_mul_bwd(dh, g, u):
    """(dg, du) of h = silu(g) * u given dh, all float32."""
    s = jax.nn.sigmoid(g)
    return dh * u * s * (1.0 + g * (1.0 - s)), dh * g * s


def grouped_swiglu_bwd(dy: jnp.ndarray, w_down: jnp.ndarray, g: jnp.ndarray, u: jnp.ndarray,
                       tile_group: jnp.ndarray, *, tiles: Tiles = DH_TILES):
    """(dg, du) of h = silu(g) * u for dh = dy @ w_down[e].T per row tile, the silu backward in the epilogue.

    dy [P, D], w_down [E, F, D], g, u [P, F] (the forward's saved products) -> dg, du [P, F] in dy's dtype;
    dh never goes to memory.  Rows of skipped tiles are undefined.
    """
    _check_kernel_args(dy, (w_down,), tile_group, tiles, "grouped_swiglu_bwd", transpose_rhs=True)
    want = (dy.shape[0], w_down.shape[1])
    if g.shape != want or u.shape != want or g.dtype != dy.dtype or u.dtype != dy.dtype:
        raise ValueError(f"grouped_swiglu_bwd: g, u must be {dy.dtype}{want}, got {g.dtype}{g.shape}, "
                         f"{u.dtype}{u.shape}")

    def epilogue(accs, g_tile, u_tile):
        return list(_silu_mul_bwd(accs[0], g_tile.astype(_F32), u_tile.astype(_F32)))

    dg, du = _grouped_call((dy,), (w_down,), tile_group.astype(jnp.int32), tiles, epilogue, 2,
                           accumulate=True, transpose_rhs=True, aux=(g, u))
    return dg, du


# ---------------------------------------------------------------------------------------------
# differentiable expert FFN
# ---------------------------------------------------------------------------------------------
class _Cfg(NamedTuple):
    """Static settings (hashable nondiff argument of the custom_vjp)."""

    gate_up: Tiles
    down: Tiles
    bwd_blocks: tuple  # (block_m, block_n, block_k, num_warps, num_stages) of the Triton backward
    interpret: bool  # XLA forward and dh / dx + Pallas interpret weight gradients (CPU tests)
    dh: Optional[Tiles] = None  # tiles of the Mosaic dh / dx kernels; None: Triton dh / dx
    dx: Optional[Tiles] = None
    fuse_silu_bwd: bool = True  # Mosaic dh kernel with the silu backward in its epilogue (dg, du out)


def _ragged(a, w, gs):
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.ragged_dot(a, w, gs, preferred_element_type=_F32, precision=prec)


def _gate_up(xs, wg, wu, tile_group, gsp, cfg: _Cfg, save: bool):
    if cfg.interpret:  # the kernel's semantics in XLA: f32 accumulators, products stored in x's dtype
        g, u = _ragged(xs, wg, gsp), _ragged(xs, wu, gsp)
        h = (jax.nn.silu(g) * u).astype(xs.dtype)
        return (h, g.astype(xs.dtype), u.astype(xs.dtype)) if save else h
    return grouped_swiglu_fwd(xs, wg, wu, tile_group, save_products=save, tiles=cfg.gate_up)


def _down(h, wd, tile_group, gsp, cfg: _Cfg):
    if cfg.interpret:
        return _ragged(h, wd, gsp).astype(h.dtype)
    return grouped_matmul_fwd(h, wd, tile_group, tiles=cfg.down)


def _undefined_past(v, gsp):
    """The stand-ins' rows of skipped tiles (past sum(gsp)): NaN, i.e. undefined."""
    return jnp.where((jnp.arange(v.shape[0]) < jnp.sum(gsp))[:, None], v, jnp.nan)


def _nt(lhs, rhs, tile_group, gsp, tiles: Tiles, cfg: _Cfg):
    if cfg.interpret:  # the kernel's semantics in XLA
        acc = sum(_ragged(a, jnp.swapaxes(w, 1, 2), gsp) for a, w in zip(lhs, rhs))
        return _undefined_past(acc, gsp).astype(lhs[0].dtype)
    return grouped_matmul_nt(lhs, rhs, tile_group, tiles=tiles)


def _dh_silu(dout, wd, g, u, tile_group, gsp, cfg: _Cfg):
    if cfg.interpret:
        dg, du = _silu_mul_bwd(_ragged(dout, jnp.swapaxes(wd, 1, 2), gsp), g.astype(_F32), u.astype(_F32))
        return tuple(_undefined_past(v, gsp).astype(dout.dtype) for v in (dg, du))
    return grouped_swiglu_bwd(dout, wd, g, u, tile_group, tiles=cfg.dh)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _ffn(xs, tile_group, gsp, wg, wu, wd, cfg):
    return _down(_gate_up(xs, wg, wu, tile_group, gsp, cfg, False), wd, tile_group, gsp, cfg)


def _ffn_fwd(xs, tile_group, gsp, wg, wu, wd, cfg):
    h, g, u = _gate_up(xs, wg, wu, tile_group, gsp, cfg, True)
    return _down(h, wd, tile_group, gsp, cfg), (xs, tile_group, gsp, wg, wu, wd, h, g, u)


def _ffn_bwd(cfg, res, dout):
    xs, tile_group, gsp, wg, wu, wd, h, g, u = res
    dt = xs.dtype
    dout = dout.astype(dt)
    bm, bn, bk, nw, ns = cfg.bwd_blocks
    kw = dict(block_m=bm, block_n=bn, block_k=bk, num_warps=nw, num_stages=ns, interpret=cfg.interpret)
    gmm_t = lambda a, w: _gmm_pallas(a, w, gsp, dt, transpose_rhs=True, **kw)  # noqa: E731  a @ w[e].T
    tgmm = lambda a, b: _tgmm_pallas(a, b, gsp, dt, **kw)  # noqa: E731  per group a.T @ b
    if cfg.dh is not None and cfg.fuse_silu_bwd:  # rows of skipped tiles undefined in dg, du: the grouped
        dg, du = _dh_silu(dout, wd, g, u, tile_group, gsp, cfg)  # kernels below read only rows of groups
    else:
        # Triton: rows past sum(gsp) come back zero; Mosaic: rows of skipped tiles undefined
        dh = (_nt((dout,), (wd,), tile_group, gsp, cfg.dh, cfg) if cfg.dh is not None
              else gmm_t(dout, wd)).astype(_F32)
        # rows of skipped tiles hold whatever the forward kernel left in g, u, dh: select, never multiply, them away
        valid = (jnp.arange(xs.shape[0]) < jnp.sum(gsp))[:, None]
        dg, du = (jnp.where(valid, v, 0.0).astype(dt) for v in _silu_mul_bwd(dh, g.astype(_F32), u.astype(_F32)))
    if cfg.dx is not None:  # one kernel, one f32 accumulator; rows of skipped tiles undefined (pad_rows' VJP drops them)
        dx = _nt((dg, du), (wg, wu), tile_group, gsp, cfg.dx, cfg)
    else:
        dx = (gmm_t(dg, wg).astype(_F32) + gmm_t(du, wu).astype(_F32)).astype(dt)
    return dx, None, None, tgmm(xs, dg), tgmm(xs, du), tgmm(h, dout)


_ffn.defvjp(_ffn_fwd, _ffn_bwd)


def grouped_swiglu_ffn(xs_padded: jnp.ndarray, tile_group: jnp.ndarray, group_sizes_padded: jnp.ndarray,
                       w_gate: jnp.ndarray, w_up: jnp.ndarray, w_down: jnp.ndarray, *,
                       gate_up_tiles: Tiles = GATE_UP_TILES, down_tiles: Tiles = DOWN_TILES,
                       mosaic_backward: bool = True, dh_tiles: Optional[Tiles] = DH_TILES,
                       dx_tiles: Optional[Tiles] = DX_TILES,
                       fuse_silu_bwd: bool = True,
                       interpret: bool = False, block_m: Optional[int] = None, block_n: Optional[int] = None,
                       block_k: Optional[int] = None, num_warps: Optional[int] = None,
                       num_stages: Optional[int] = None) -> jnp.ndarray:
    """Expert SwiGLU FFN on the padded layout: [P, D] -> [P, D] in x's dtype, differentiable in x and weights.

    xs_padded, tile_group, group_sizes_padded come from `padded_layout` / `pad_rows` (pad rows must be zero).
    Forward: the two Mosaic kernels (interpret=True: XLA stand-ins); backward: dh and dx on
    `grouped_matmul_nt` (mosaic_backward=False: Triton; fuse_silu_bwd: dh straight to dg, du in
    `grouped_swiglu_bwd`; dh_tiles / dx_tiles None: that one on Triton), the weight gradients on the Triton grouped matmuls of `kernels.grouped_matmul`
    (block_* as there; None = its defaults) over `group_sizes_padded`.
    Rows of tiles past the used ones are undefined in the output and in its gradient in x.
    """
    if xs_padded.ndim != 2 or w_gate.ndim != 3 or w_gate.shape != w_up.shape or w_gate.shape[1] != xs_padded.shape[1]:
        raise ValueError(f"grouped_swiglu_ffn expects x [P, D], w_gate/w_up [E, D, F]; got {xs_padded.shape}, "
                         f"{w_gate.shape}, {w_up.shape}")
    e, d, f = w_gate.shape
    if w_down.shape != (e, f, d):
        raise ValueError(f"w_down must have shape {(e, f, d)}, got {w_down.shape}")
    p = xs_padded.shape[0]
    tm = gate_up_tiles.tile_m
    if p % tm or tile_group.shape != (p // tm,) or group_sizes_padded.shape != (e,):
        raise ValueError(f"padded layout mismatch: x rows {p} (tile_m {tm}), tile_group {tile_group.shape}, "
                         f"group sizes {group_sizes_padded.shape} for {e} experts")
    dt = xs_padded.dtype
    if not interpret:
        select_impl("grouped_swiglu_ffn", "mosaic", log=False,
                    unsupported={"mosaic": unsupported_reason(
                        p, d, f, dt, gate_up_tiles, down_tiles, (dh_tiles, dx_tiles) if mosaic_backward else ())})
    big_smem = device_info().compute_capability in ((8, 0), (9, 0))
    dflt = (INTERPRET_BLOCKS if interpret
            else GPU_BLOCKS if jnp.dtype(dt).itemsize <= 2 and big_smem else GPU_BLOCKS_SMALL)
    blocks = tuple(dv if v is None else v for v, dv in zip((block_m, block_n, block_k, num_warps, num_stages), dflt))
    cfg = _Cfg(gate_up_tiles, down_tiles, blocks, interpret,
               dh_tiles if mosaic_backward else None, dx_tiles if mosaic_backward else None, fuse_silu_bwd)
    return _ffn(xs_padded, tile_group.astype(jnp.int32), group_sizes_padded.astype(jnp.int32),
                w_gate.astype(dt), w_up.astype(dt), w_down.astype(dt), cfg)
