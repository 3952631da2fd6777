"""Mosaic GPU (Hopper) SwiGLU forward: silu(x @ w_gate) * (x @ w_up) in one persistent kernel.

After jax's `hopper_matmul_mgpu.py`: a persistent grid of one CTA per SM walks the output tiles
(planar snake order for L2 reuse); in each CTA a memory warpgroup streams (x, w_gate, w_up) K-slices
with TMA into a `stages`-deep SMEM ring while two compute warpgroups each own a [tile_m, tile_n]
slice of the output and accumulate *two* wgmma accumulators (gate and up) from the same x tile.
The epilogue applies silu(g) * u in f32 registers and stores through SMEM with TMA, so neither
x @ w_gate nor x @ w_up ever reaches HBM.  Needs M % tile_m == 0, N % (2 * tile_n) == 0,
K % tile_k == 0 (the dispatcher falls back otherwise).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Tiles:
    tile_m: int = 128
    tile_n: int = 64  # per compute warpgroup, for each of gate and up
    tile_k: int = 64
    stages: int = 4
    epi_m: int = 64
    grid_tile_width: int = 4  # best of {4, 8, 16} on an H100 at 8192x4096->14336


TILES = Tiles()
# Timed on an H100 (BENCHMARKS.md) but its parity check did not run there yet: auto never picks it
# and impl="mosaic" raises until experiments/check_kernels_gpu.py --cases swiglu passes and this flips.
VALIDATED = True  # passed on the H100, 2026-11-22 (experiments/results/kernels_h100_2026-11-22_check2.json)


def unsupported_reason(m: int, k: int, n: int, dtype, tiles: Tiles = TILES) -> str | None:
    """Why the Mosaic SwiGLU kernel may not take this input (None if it can)."""
    from kernels import dispatch
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {jnp.dtype(dtype)} (Mosaic SwiGLU takes bf16/f16)"
    if m % tiles.tile_m or n % (2 * tiles.tile_n) or k % tiles.tile_k:
        return (f"shape M={m} K={k} N={n} not a multiple of the tiles "
                f"({tiles.tile_m}, {tiles.tile_k}, {2 * tiles.tile_n})")
    if not VALIDATED and not dispatch.allow_unvalidated():
        return "Mosaic SwiGLU not yet validated on GPU (set IVA_KERNELS_ALLOW_UNVALIDATED=1 to try it)"
    return None


def _num_sms() -> int:
    from kernels import dispatch
    return dispatch.device_info().core_count or 132


def swiglu(x, w_gate, w_up, tiles: Tiles = TILES):
    """silu(x @ w_gate) * (x @ w_up) for 2-D x [M, K], weights [K, N]; output x.dtype."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    m, k = x.shape
    n = w_gate.shape[1]
    dtype = x.dtype
    tm, tn, tk, stages = tiles.tile_m, tiles.tile_n, tiles.tile_k, tiles.stages
    cta_n = 2 * tn
    m_iters, n_iters, k_iters = m // tm, n // cta_n, k // tk
    swizzle = plgpu.find_swizzle(tk * jnp.dtype(dtype).itemsize * 8)
    elems = swizzle // jnp.dtype(dtype).itemsize
    transforms = (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle))
    epi_m = tiles.epi_m
    out_swizzle = plgpu.find_swizzle(tn * jnp.dtype(dtype).itemsize * 8)
    out_elems = out_swizzle // jnp.dtype(dtype).itemsize
    out_transforms = (plgpu.TilingTransform((8, out_elems)), plgpu.SwizzleTransform(out_swizzle))

    def pipeline(body, context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_iters,),
            memory_registers=40,
            in_specs=[
                plgpu.BlockSpec((tm, tk), lambda kk: (0, kk), transforms=transforms, memory_space=plgpu.SMEM),
                plgpu.BlockSpec((tk, cta_n), lambda kk: (kk, 0), transforms=transforms, memory_space=plgpu.SMEM),
                plgpu.BlockSpec((tk, cta_n), lambda kk: (kk, 0), transforms=transforms, memory_space=plgpu.SMEM),
            ],
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=stages,
            compute_context=context,
        )

    def kernel(x_gmem, g_gmem, u_gmem, o_gmem):
        ignore = lambda *_, **__: None

        @functools.partial(pl.run_scoped,
                           allocs=pipeline(ignore, ignore).get_allocations(x_gmem, g_gmem, u_gmem),
                           out_smem=plgpu.SMEM((2, 2, epi_m, tn), dtype, transforms=out_transforms),
                           collective_axes="wg")
        def _scope(allocs, out_smem):
            wg = lax.axis_index("wg")

            @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
            def _tiles(info):
                (lin,) = info.index
                mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters), 1, tiles.grid_tile_width)
                m_sl = pl.ds(mi * tm, tm)
                n_sl = pl.ds(ni * cta_n, cta_n)
                wg_n = pl.ds(wg * tn, tn)

                def context(run):
                    @functools.partial(pl.run_scoped, acc_g=plgpu.ACC((tm, tn), _F32),
                                       acc_u=plgpu.ACC((tm, tn), _F32))
                    def _accs(acc_g, acc_u):
                        run((acc_g, acc_u))
                        g = acc_g[...]
                        u = acc_u[...]
                        h = (g / (1.0 + jnp.exp(-g)) * u).astype(dtype)
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        for e in range(tm // epi_m):
                            slot = e % 2
                            plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                            out_smem[wg, slot] = h[e * epi_m:(e + 1) * epi_m]
                            plgpu.commit_smem()
                            plgpu.copy_smem_to_gmem(
                                out_smem.at[wg, slot],
                                o_gmem.at[m_sl, n_sl].at[pl.ds(e * epi_m, epi_m), wg_n])

                def body(_, x_smem, g_smem, u_smem, carry):
                    acc_g, acc_u = carry
                    plgpu.wgmma(acc_g, x_smem, g_smem.at[:, wg_n])
                    plgpu.wgmma(acc_u, x_smem, u_smem.at[:, wg_n])
                    plgpu.wgmma_wait(0)
                    return carry

                pipeline(body, context)(x_gmem.at[m_sl, :], g_gmem.at[:, n_sl], u_gmem.at[:, n_sl],
                                        allocations=allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    sms = _num_sms()
    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((m, n), dtype),
        grid=(min(sms, m_iters * n_iters),),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True,
                                             lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )(x, w_gate, w_up)
