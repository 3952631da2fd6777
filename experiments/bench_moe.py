"""MoE layer and expert-parallel benchmarks (issue 4).

layer mode (one GPU): an MoE FFN layer (router + dispatch + SwiGLU experts + combine), 8 experts top-2,
hidden 2048, expert ffn 5632, 16k tokens, bf16, forward and forward+backward:
  pallas          dropless, kernels.grouped_matmul (Triton Pallas)
  mosaic          dropless, kernels.grouped_matmul_mosaic (Mosaic GPU forward and backward dh / dx on a
                  tile-padded layout, Triton weight gradients); mosaic_tbwd: the same with the all-Triton
                  backward; the default (= mosaic_fused) has the silu backward in the dh kernel's epilogue
                  (grouped_swiglu_bwd), mosaic_unfused not; *_tdx: Triton dx;
                  mosaic_dh6 / mosaic_dn128 / mosaic_s3: other tiles (mosaic_variants)
  ragged_mgpu     anchor: dropless with jax's example kernel pallas/ops/gpu/ragged_dot_mgpu.ragged_dot
                  (forward only: it has no VJP; skipped if its API does not match)
  ragged          dropless, jax.lax.ragged_dot (XLA)
  capacity        capacity 1.25, index gather/scatter dispatch
  capacity_einsum capacity 1.25, GShard one-hot einsum dispatch
  dense           a dense SwiGLU FFN with the same active FLOPs (ffn = top_k * expert ffn), the anchor
check mode (H100): the Mosaic grouped kernels (forward h, g, u, down; backward grouped_matmul_nt with one
pair (dh) and two pairs (dx), grouped_swiglu_bwd) and the dropless "mosaic" layer (outputs and all gradients,
also with the unfused dh backward: unfused_*; runs before 4ca3c26 had fused_* = the then opt-in fused one)
against the float32 XLA reference on a few shapes (balanced, skewed with empty experts); PASS/FAIL and the
max relative errors go to the JSON.
ep mode (2+ GPUs): tokens/s per GPU at the same per-GPU load for EP=1 (one GPU, all experts), DP=n
(experts replicated, no exchange) and EP=n (experts sharded, all-to-all / ragged all-to-all).
Median of --iters timed runs after --warmup runs; inputs random; prints a table, writes JSON to --out.

  python experiments/bench_moe.py --out results/bench_moe_layer.json                 # H100
  python experiments/bench_moe.py --mode ep --out results/bench_moe_ep.json          # 2 x H200
  python experiments/bench_moe.py --mode check,layer --impls dense,pallas,mosaic,mosaic_fused,mosaic_tbwd  # H100
  python experiments/bench_moe.py --tiny                                             # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

if "--tiny" in sys.argv and "XLA_FLAGS" not in os.environ:  # CPU smoke run: 2 fake devices for ep mode
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # kernel_times beside this script
from iva_jax.moe import dispatch as dp  # noqa: E402
from iva_jax.moe.expert_parallel import expert_parallel_moe, shard_map  # noqa: E402
from iva_jax.moe.losses import routing_metrics  # noqa: E402
from iva_jax.moe.routing import route  # noqa: E402
from iva_jax.parallel import make_mesh  # noqa: E402


def timeit(fn, args, warmup: int, iters: int) -> float:
    """Median wall time in ms of fn(*args) (outputs blocked on)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(ts))


def make_inputs(key, t, d, f, e, dtype):
    ks = jax.random.split(key, 5)
    x = jax.random.normal(ks[0], (t, d), dtype)
    router = jax.random.normal(ks[1], (d, e), jnp.float32) * d ** -0.5
    s_in, s_f = d ** -0.5, f ** -0.5
    wg = (jax.random.normal(ks[2], (e, d, f), jnp.float32) * s_in).astype(dtype)
    wu = (jax.random.normal(ks[3], (e, d, f), jnp.float32) * s_in).astype(dtype)
    wd = (jax.random.normal(ks[4], (e, f, d), jnp.float32) * s_f).astype(dtype)
    return x, router, wg, wu, wd


def mosaic_variants() -> dict:
    """Mosaic tile variants timed as separate layer rows (kernels.grouped_matmul_mosaic.Tiles)."""
    from kernels.grouped_matmul_mosaic import Tiles
    # "mosaic" is the default (fused dh + silu backward since 4ca3c26; runs before that: mosaic_unfused)
    return {"mosaic": {}, "mosaic_tbwd": dict(mosaic_backward=False), "mosaic_fused": dict(fuse_silu_bwd=True),
            "mosaic_unfused": dict(fuse_silu_bwd=False),
            "mosaic_fused_tdx": dict(fuse_silu_bwd=True, dx_tiles=None),
            "mosaic_tdx": dict(fuse_silu_bwd=False, dx_tiles=None),
            "mosaic_dh6": dict(dh_tiles=Tiles(stages=6)),
            "mosaic_dn128": dict(down_tiles=Tiles(tile_n=128)),
            "mosaic_s3": dict(gate_up_tiles=Tiles(stages=3), down_tiles=Tiles(stages=3))}


def ragged_mgpu_swiglu():
    """The anchor's expert FFN with jax's example Mosaic ragged_dot (forward only); None if it does not import."""
    try:
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    except Exception:  # an example module: absent or changed in some jax versions
        return None

    def ffn(xs, sizes, wg, wu, wd):
        mm = lambda a, w: ragged_dot_mgpu.ragged_dot(a, w, group_sizes=sizes, block_m=128, block_n=128,  # noqa: E731
                                                     block_k=64, max_concurrent_steps=4, grid_block_n=4)
        h = dp._silu_mul(mm(xs, wg), mm(xs, wu), xs.dtype)
        return mm(h, wd)
    return ffn


def moe_layer(kind, top_k, cf, dtype, gmm_kw):
    """x, router, wg, wu, wd -> y: routing + the chosen dispatch."""
    mgpu = ragged_mgpu_swiglu() if kind == "ragged_mgpu" else None
    if kind == "ragged_mgpu" and mgpu is None:
        raise ImportError("jax.experimental.pallas.ops.gpu.ragged_dot_mgpu does not import")

    def fn(x, router, wg, wu, wd):
        r = route(jnp.dot(x.astype(jnp.float32), router), top_k=top_k)
        if kind == "pallas":
            y = dp.dropless_moe(x, r.expert_index, r.gate_weights, wg, wu, wd, impl="pallas", dtype=dtype, **gmm_kw)
        elif kind.startswith("mosaic"):
            y = dp.dropless_moe(x, r.expert_index, r.gate_weights, wg, wu, wd, impl="mosaic", dtype=dtype,
                                **gmm_kw, **mosaic_variants()[kind])
        elif kind == "ragged_mgpu":
            t, k = r.expert_index.shape
            order, sizes = dp.sort_by_expert(r.expert_index, wg.shape[0])
            out = mgpu(x[order // k].astype(dtype), sizes, *(w.astype(dtype) for w in (wg, wu, wd)))
            inv = jnp.zeros_like(order).at[order].set(jnp.arange(t * k, dtype=jnp.int32))
            y = jnp.einsum("tk,tkd->td", r.gate_weights, out[inv].reshape(t, k, -1).astype(jnp.float32))
        elif kind == "ragged":
            y = dp.dropless_moe(x, r.expert_index, r.gate_weights, wg, wu, wd, impl="ragged", dtype=dtype)
        elif kind in ("capacity", "capacity_einsum"):
            y, _ = dp.capacity_moe(x, r.expert_index, r.gate_weights, wg, wu, wd, cf, dtype=dtype,
                                   combine="einsum" if kind == "capacity_einsum" else "gather")
        else:
            raise ValueError(kind)
        return y.astype(x.dtype)
    return fn


def dense_ffn(x, wg, wu, wd):
    """The dense anchor, written like the experts: matmuls store the compute dtype, silu * up in f32."""
    dt = x.dtype
    h = jax.nn.silu(jnp.dot(x, wg).astype(jnp.float32)) * jnp.dot(x, wu).astype(jnp.float32)
    return jnp.dot(h.astype(dt), wd)


def fwd_bwd(fn, n_args):
    def loss(*a):
        return jnp.sum(fn(*a).astype(jnp.float32) ** 2) * 1e-6
    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(n_args))))


def gmm_kwargs(a) -> dict:
    """The grouped-matmul tile / interpret arguments given on the command line (None: the kernel's defaults)."""
    return dict(block_m=a.block_m, block_n=a.block_n, block_k=a.block_k, num_warps=a.num_warps,
                num_stages=a.num_stages, interpret=a.interpret)


def run_layer(a) -> dict:
    t, d, f, e, k = a.tokens, a.hidden, a.ffn, a.experts, a.top_k
    dtype = jnp.dtype(a.dtype)
    x, router, wg, wu, wd = make_inputs(jax.random.PRNGKey(0), t, d, f, e, dtype)
    active_flops = 2 * t * k * 3 * d * f  # forward matmul FLOPs of the routed tokens
    gmm_kw = gmm_kwargs(a)
    r = route(jnp.dot(x.astype(jnp.float32), router), top_k=k)
    _, keep = dp.capacity_positions(r.expert_index, e, dp.expert_capacity(t, k, a.capacity_factor, e))
    m = routing_metrics(r.probs, r.expert_index, keep)
    rows = []
    kinds = [s for s in a.impls.split(",") if s]
    kd = jax.random.split(jax.random.PRNGKey(1), 3)
    dense_w = (jax.random.normal(kd[0], (d, k * f), jnp.float32) * d ** -0.5).astype(dtype), \
              (jax.random.normal(kd[1], (d, k * f), jnp.float32) * d ** -0.5).astype(dtype), \
              (jax.random.normal(kd[2], (k * f, d), jnp.float32) * (k * f) ** -0.5).astype(dtype)
    ref = None
    to_profile = []
    for kind in kinds:
        try:
            if kind == "dense":
                fn, args = dense_ffn, (x,) + dense_w
            else:
                fn, args = moe_layer(kind, k, a.capacity_factor, dtype, gmm_kw), (x, router, wg, wu, wd)
            fwd = jax.jit(fn)
            out = fwd(*args)
            err = None
            if kind != "dense" and ref is not None:  # against the first dropless impl of the run
                err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref[1])) / (jnp.max(jnp.abs(ref[1])) + 1e-9))
            elif kind in ("ragged", "pallas"):
                ref = (kind, out.astype(jnp.float32))
            t_f = timeit(fwd, args, a.warmup, a.iters)
            no_bwd = a.fwd_only or kind == "ragged_mgpu"  # the example kernel has no VJP
            t_fb = timeit(fwd_bwd(fn, len(args)), args, a.warmup, a.iters) if not no_bwd else float("nan")
            rows.append(dict(impl=kind, fwd_ms=t_f, fwd_bwd_ms=t_fb, fwd_tflops=active_flops / t_f / 1e9,
                             fwd_bwd_tflops=3 * active_flops / t_fb / 1e9, tokens_per_s=t / t_f * 1e3,
                             rel_err=err, rel_err_vs=None if ref is None or err is None else ref[0]))
            if a.profile and not no_bwd:  # profiled after every impl is timed (CUPTI slows what runs after it)
                to_profile.append((rows[-1], fn, args))
        except Exception as ex:  # keep going: one failing impl should not hide the others
            rows.append(dict(impl=kind, error=f"{type(ex).__name__}: {str(ex)[:300]}"))
    for r_, fn, args in to_profile:  # GPU time per kernel of the forward+backward (CUPTI via torch)
        from kernel_times import kernel_table, print_table
        r_["kernels_fwd_bwd"] = tab = kernel_table(fwd_bwd(fn, len(args)), args, iters=5)
        print_table(f"{r_['impl']} fwd+bwd", tab, top=14)
    dense = next((r_ for r_ in rows if r_["impl"] == "dense" and "error" not in r_), None)
    for r_ in rows:
        if dense and "error" not in r_:
            r_["fwd_vs_dense"] = dense["fwd_ms"] / r_["fwd_ms"]
            r_["fwd_bwd_vs_dense"] = dense["fwd_bwd_ms"] / r_["fwd_bwd_ms"]
    print(f"\nMoE layer: T={t} D={d} F={f} E={e} top-{k} {a.dtype}, capacity {a.capacity_factor} "
          f"(overflow {float(m['overflow_pct']):.1f}%), load std/mean {float(m['load_std_over_mean']):.3f}, "
          f"{jax.devices()[0].device_kind}")
    print(f"{'impl':16s} {'fwd ms':>9s} {'TFLOP/s':>8s} {'fwd+bwd ms':>11s} {'TFLOP/s':>8s} {'x dense fwd':>11s} "
          f"{'x dense f+b':>11s}")
    for r_ in rows:
        if "error" in r_:
            print(f"{r_['impl']:16s} ERROR {r_['error']}")
            continue
        print(f"{r_['impl']:16s} {r_['fwd_ms']:9.3f} {r_['fwd_tflops']:8.1f} {r_['fwd_bwd_ms']:11.3f} "
              f"{r_['fwd_bwd_tflops']:8.1f} {r_.get('fwd_vs_dense', float('nan')):11.2f} "
              f"{r_.get('fwd_bwd_vs_dense', float('nan')):11.2f}")
    return dict(mode="layer", tokens=t, hidden=d, ffn=f, experts=e, top_k=k, dtype=a.dtype,
                capacity_factor=a.capacity_factor, gmm=gmm_kw, load_std_over_mean=float(m["load_std_over_mean"]),
                overflow_pct=float(m["overflow_pct"]),
                rows=rows)


def _rel(a, b) -> float:
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    if not bool(jnp.all(jnp.isfinite(a))):
        return float("inf")
    return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))


def run_check(a) -> dict:
    """Mosaic grouped kernels and the dropless "mosaic" layer (bf16) against the float32 XLA reference."""
    from kernels import grouped_matmul_mosaic as gmm_m
    tol = a.check_tol
    dtype = jnp.dtype(a.dtype)
    interp = dict(interpret=True) if a.interpret else {}
    cases = [("balanced", 2048, 512, 768, 8, 0.0), ("skewed, 3 empty experts", 1536, 256, 640, 8, 3.0),
             ("layer shape", a.tokens, a.hidden, a.ffn, a.experts, 0.0)]
    if a.tiny:
        cases = [("balanced", 96, 128, 256, 4, 0.0), ("skewed, 1 empty expert", 80, 128, 256, 4, 3.0)]
    k = a.top_k
    rows = []
    for name, t, d, f, e, skew in cases:
        res = dict(case=name, tokens=t, hidden=d, ffn=f, experts=e)
        try:
            x, router, wg, wu, wd = make_inputs(jax.random.PRNGKey(7), t, d, f, e, dtype)
            logits = jnp.dot(x.astype(jnp.float32), router)
            if skew:  # expert 0 favoured, the last experts never chosen
                bias = jnp.where(jnp.arange(e) >= e - (3 if e >= 8 else 1), -1e9, 0.0).at[0].add(skew)
                logits = logits + bias
            r = route(logits, top_k=k)
            ei, gw = r.expert_index, r.gate_weights
            c = jax.random.normal(jax.random.PRNGKey(8), (t, d), jnp.float32)
            f32 = lambda v: v.astype(jnp.float32)  # noqa: E731

            def loss(impl, dt, **kw):
                return lambda xx, ww, g, u, dd: jnp.sum(dp.dropless_moe(xx, ei, ww, g, u, dd, impl=impl, dtype=dt, **kw) * c)
            y_m = jax.jit(lambda *v: dp.dropless_moe(v[0], ei, *v[1:], impl="mosaic", dtype=dtype, **interp))(
                x, gw, wg, wu, wd)
            y_r = jax.jit(lambda *v: dp.dropless_moe(v[0], ei, *v[1:], impl="ragged", dtype=jnp.float32))(
                f32(x), gw, f32(wg), f32(wu), f32(wd))
            res["y"] = _rel(y_m, y_r)
            g_m = jax.jit(jax.grad(loss("mosaic", dtype, **interp), argnums=range(5)))(x, gw, wg, wu, wd)
            g_r = jax.jit(jax.grad(loss("ragged", jnp.float32), argnums=range(5)))(f32(x), gw, f32(wg), f32(wu), f32(wd))
            for gname, gm_, gr_ in zip(("dx", "dgate_weights", "dw_gate", "dw_up", "dw_down"), g_m, g_r):
                res[gname] = _rel(gm_, gr_)
            g_f = jax.jit(jax.grad(loss("mosaic", dtype, fuse_silu_bwd=False, **interp), argnums=range(5)))(
                x, gw, wg, wu, wd)
            for gname, gf_, gr_ in zip(("dx", "dgate_weights", "dw_gate", "dw_up", "dw_down"), g_f, g_r):
                res["unfused_" + gname] = _rel(gf_, gr_)
            # the kernels alone on the padded layout: h, g, u and the down projection; pad rows exactly zero
            if not a.interpret:
                order, sizes = dp.sort_by_expert(ei, e)
                tm = gmm_m.GATE_UP_TILES.tile_m
                lay = gmm_m.padded_layout(sizes, t * k, tm)
                xp = gmm_m.pad_rows(x[order // k], lay)
                h, g, u = jax.jit(lambda *v: gmm_m.grouped_swiglu_fwd(*v, save_products=True))(xp, wg, wu, lay.tile_group)
                out = jax.jit(gmm_m.grouped_matmul_fwd)(h, wd, lay.tile_group)
                used = int(lay.num_tiles) * tm
                gsp = lay.group_sizes
                rg = jax.lax.ragged_dot(f32(xp), f32(wg), gsp, precision=jax.lax.Precision.HIGHEST)
                ru = jax.lax.ragged_dot(f32(xp), f32(wu), gsp, precision=jax.lax.Precision.HIGHEST)
                rh = jax.nn.silu(rg) * ru
                rout = jax.lax.ragged_dot(f32(h), f32(wd), gsp, precision=jax.lax.Precision.HIGHEST)
                res.update(kernel_h=_rel(h[:used], rh[:used]), kernel_g=_rel(g[:used], rg[:used]),
                           kernel_u=_rel(u[:used], ru[:used]), kernel_down=_rel(out[:used], rout[:used]),
                           used_tiles=int(lay.num_tiles), tiles=lay.tile_group.shape[0])
                # backward kernel: dh = dy @ wd[e]^T (one pair), dx = dg @ wg[e]^T + du @ wu[e]^T (two pairs)
                kb = jax.random.split(jax.random.PRNGKey(9), 3)
                dy = jax.random.normal(kb[0], (xp.shape[0], d), dtype)
                dg = jax.random.normal(kb[1], (xp.shape[0], f), dtype)
                du = jax.random.normal(kb[2], (xp.shape[0], f), dtype)
                nt = jax.jit(gmm_m.grouped_matmul_nt)
                dh = nt([dy], [wd], lay.tile_group)
                dxk = nt([dg, du], [wg, wu], lay.tile_group)
                rt = lambda v, w: jax.lax.ragged_dot(f32(v), jnp.swapaxes(f32(w), 1, 2), gsp,  # noqa: E731
                                                     precision=jax.lax.Precision.HIGHEST)
                res.update(kernel_nt_dh=_rel(dh[:used], rt(dy, wd)[:used]),
                           kernel_nt_dx=_rel(dxk[:used], (rt(dg, wg) + rt(du, wu))[:used]))
                # dh with the silu backward in the epilogue, from the kernel's own g, u
                kdg, kdu = jax.jit(gmm_m.grouped_swiglu_bwd)(dy, wd, g, u, lay.tile_group)
                rdh, sg = rt(dy, wd), jax.nn.sigmoid(f32(g))
                res.update(kernel_bwd_dg=_rel(kdg[:used], (rdh * f32(u) * sg * (1 + f32(g) * (1 - sg)))[:used]),
                           kernel_bwd_du=_rel(kdu[:used], (rdh * f32(g) * sg)[:used]))
                pad = (lay.source[:used] == t * k)[:, None]
                res["pad_rows_zero"] = bool(jnp.all(jnp.where(pad, out[:used], 0) == 0)
                                            and jnp.all(jnp.where(pad, h[:used], 0) == 0))
            errs = [v for kk, v in res.items() if kk.removeprefix("unfused_") in ("y", "dx", "dgate_weights", "dw_gate",
                                                                                  "dw_up", "dw_down")
                    or kk.startswith("kernel_")]
            res["max_rel_err"] = max(errs)
            res["status"] = "PASS" if max(errs) <= tol and res.get("pad_rows_zero", True) else "FAIL"
        except Exception as ex:  # record and go on
            res.update(status="ERROR", error=f"{type(ex).__name__}: {str(ex)[:400]}")
        rows.append(res)
    print(f"\nMosaic grouped-matmul check vs float32 XLA (tolerance {tol} relative to max |ref|), "
          f"{jax.devices()[0].device_kind}")
    for r_ in rows:
        if r_["status"] == "ERROR":
            print(f"{r_['case']:26s} ERROR {r_['error']}")
            continue
        detail = " ".join(f"{kk}={v:.2e}" for kk, v in r_.items() if isinstance(v, float))
        print(f"{r_['case']:26s} {r_['status']}  {detail}" + ("" if r_.get("pad_rows_zero", True) else " PAD ROWS NONZERO"))
    status = "PASS" if all(r_["status"] == "PASS" for r_ in rows) else "FAIL"
    print(f"check: {status}")
    return dict(mode="check", status=status, tolerance=tol, dtype=a.dtype, rows=rows)


def run_sweep(a) -> dict:
    """Grouped-matmul forward alone over a few block configs (pick the defaults for this GPU)."""
    t, d, f, e, k = a.tokens, a.hidden, a.ffn, a.experts, a.top_k
    dtype = jnp.dtype(a.dtype)
    from kernels.grouped_matmul import grouped_matmul
    x = jax.random.normal(jax.random.PRNGKey(0), (t * k, d), dtype)
    w = jax.random.normal(jax.random.PRNGKey(1), (e, d, f), dtype)
    gs = jnp.full((e,), t * k // e, jnp.int32)
    flops = 2 * t * k * d * f
    rows = []
    xla = timeit(jax.jit(lambda x, w: grouped_matmul(x, w, gs, impl="xla")), (x, w), a.warmup, a.iters)
    rows.append(dict(cfg="ragged_dot", ms=xla, tflops=flops / xla / 1e9))
    tiles = [(64, 128, 32, 4, 3), (128, 128, 32, 4, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
             (64, 256, 32, 4, 4), (128, 128, 64, 4, 4), (256, 128, 64, 8, 3)]
    if a.tiles:  # "bm,bn,bk,warps,stages;..."
        tiles = [tuple(int(v) for v in t.split(",")) for t in a.tiles.split(";") if t]
    dy = jax.random.normal(jax.random.PRNGKey(2), (t * k, f), dtype)
    for bm, bn, bk, nw, ns in tiles:
        try:
            gmm = lambda x, w: grouped_matmul(x, w, gs, impl="triton", block_m=bm, block_n=bn,  # noqa: E731
                                              block_k=bk, num_warps=nw, num_stages=ns)
            ms = timeit(jax.jit(gmm), (x, w), a.warmup, a.iters)
            extra = {}
            if a.sweep_bwd:  # the backward alone: d lhs (transposed-rhs gmm) + d rhs (grouped x^T dy)
                bwd = jax.jit(lambda x, w, dy, gmm=gmm: jax.vjp(gmm, x, w)[1](dy))  # unused forward: DCE'd
                bw = timeit(bwd, (x, w, dy), a.warmup, a.iters)
                extra = dict(bwd_ms=bw, bwd_tflops=2 * flops / bw / 1e9)
            rows.append(dict(cfg=f"bm{bm} bn{bn} bk{bk} w{nw} s{ns}", ms=ms, tflops=flops / ms / 1e9, **extra))
        except Exception as ex:
            rows.append(dict(cfg=f"bm{bm} bn{bn} bk{bk} w{nw} s{ns}", error=str(ex)[:200]))
    print(f"\ngrouped matmul [{t * k}, {d}] x [{e}, {d}, {f}] {a.dtype}")
    for r_ in rows:
        print(f"{r_['cfg']:28s} " + (f"{r_['ms']:8.3f} ms {r_['tflops']:7.1f} TFLOP/s" if "ms" in r_ else r_["error"])
              + (f"   bwd {r_['bwd_ms']:8.3f} ms {r_['bwd_tflops']:7.1f} TFLOP/s" if "bwd_ms" in r_ else ""))
    return dict(mode="sweep", rows=rows)


def run_ep(a) -> dict:
    n = len(jax.devices()) if a.ep == 0 else a.ep
    if n < 2:
        print("ep mode needs >= 2 devices")
        return dict(mode="ep", error="needs >= 2 devices")
    t, d, f, e, k = a.tokens, a.hidden, a.ffn, a.experts, a.top_k
    dtype = jnp.dtype(a.dtype)
    cf = a.capacity_factor
    rows = []
    devs = jax.devices()[:n]
    ep_kw = {} if a.ep_impl == "ragged" else gmm_kwargs(a)

    def bench(name, fn, args, n_gpu, total_tokens):
        try:
            t_f = timeit(jax.jit(fn), args, a.warmup, a.iters)
            t_fb = timeit(fwd_bwd(fn, len(args)), args, a.warmup, a.iters) if not a.fwd_only else float("nan")
            rows.append(dict(config=name, gpus=n_gpu, fwd_ms=t_f, fwd_bwd_ms=t_fb,
                             fwd_tokens_per_s_per_gpu=total_tokens / t_f * 1e3 / n_gpu,
                             fwd_bwd_tokens_per_s_per_gpu=total_tokens / t_fb * 1e3 / n_gpu))
        except Exception as ex:
            rows.append(dict(config=name, error=f"{type(ex).__name__}: {str(ex)[:300]}"))

    def local_moe(capf):
        def fn(x, idx, w, wg, wu, wd):
            if capf is None:
                return dp.dropless_moe(x, idx, w, wg, wu, wd, impl=a.ep_impl, dtype=dtype, **ep_kw)
            return dp.capacity_moe(x, idx, w, wg, wu, wd, capf, dtype=dtype)[0]
        return fn

    for disp in a.ep_dispatch.split(","):
        capf = cf if disp == "capacity" else None
        # EP=1: one GPU holding all experts, t tokens
        with jax.default_device(devs[0]):
            args = make_inputs(jax.random.PRNGKey(0), t, d, f, e, dtype)

            def single(x, router, wg, wu, wd, capf=capf):
                r = route(jnp.dot(x.astype(jnp.float32), router), top_k=k)
                return local_moe(capf)(x, r.expert_index, r.gate_weights, wg, wu, wd).astype(dtype)

            bench(f"{disp} EP=1 (1 GPU)", single, args, 1, t)
        # n GPUs, n * t tokens sharded over them: DP (experts replicated, no exchange) and EP (experts sharded)
        for label, mesh in ((f"DP={n} (experts replicated)", make_mesh(data=n, devices=devs)),
                            (f"EP={n}", make_mesh(data=1, expert=n, devices=devs))):
            ep_on = mesh.shape["expert"] > 1
            tok = P(("data", "fsdp", "expert"))
            put = lambda v, spec, mesh=mesh: jax.device_put(v, NamedSharding(mesh, spec))
            x, router, wg, wu, wd = make_inputs(jax.random.PRNGKey(0), n * t, d, f, e, dtype)
            wspec = P("expert") if ep_on else P()
            args = (put(x, tok), put(router, P()), put(wg, wspec), put(wu, wspec), put(wd, wspec))
            for exch in (a.exchange.split(",") if capf is None and ep_on else ["-"]):
                def fn(x, router, wg, wu, wd, mesh=mesh, capf=capf, exch=exch, ep_on=ep_on, tok=tok):
                    r = route(jnp.dot(x.astype(jnp.float32), router), top_k=k)
                    if ep_on:
                        y, _ = expert_parallel_moe(x, r.expert_index, r.gate_weights, wg, wu, wd, mesh=mesh,
                                                   capacity_factor=capf, exchange=exch if exch != "-" else "auto",
                                                   impl=a.ep_impl, dtype=dtype, **ep_kw)
                    else:
                        y = shard_map(local_moe(capf), mesh=mesh, in_specs=(tok, tok, tok, P(), P(), P()),
                                      out_specs=tok, check=a.ep_impl != "pallas")(x, r.expert_index, r.gate_weights, wg, wu, wd)
                    return y.astype(dtype)
                name = f"{disp} {label}" + (f" exchange={exch}" if exch != "-" else "")
                bench(name, fn, args, n, n * t)
    base = {}
    for r_ in rows:
        if "error" not in r_ and "EP=1" in r_["config"]:
            base[r_["config"].split()[0]] = r_
    print(f"\nexpert parallelism: {t} tokens per GPU, D={d} F={f} E={e} top-{k} {a.dtype}, "
          f"{jax.devices()[0].device_kind}")
    print(f"{'config':52s} {'fwd tok/s/GPU':>14s} {'vs EP=1':>8s} {'f+b tok/s/GPU':>14s} {'vs EP=1':>8s}")
    for r_ in rows:
        if "error" in r_:
            print(f"{r_['config']:52s} ERROR {r_['error']}")
            continue
        b = base.get(r_["config"].split()[0])
        if b:
            r_["fwd_vs_ep1"] = r_["fwd_tokens_per_s_per_gpu"] / b["fwd_tokens_per_s_per_gpu"]
            r_["fwd_bwd_vs_ep1"] = r_["fwd_bwd_tokens_per_s_per_gpu"] / b["fwd_bwd_tokens_per_s_per_gpu"]
        print(f"{r_['config']:52s} {r_['fwd_tokens_per_s_per_gpu']:14.0f} {r_.get('fwd_vs_ep1', float('nan')):8.2f} "
              f"{r_['fwd_bwd_tokens_per_s_per_gpu']:14.0f} {r_.get('fwd_bwd_vs_ep1', float('nan')):8.2f}")
    return dict(mode="ep", devices=n, tokens_per_gpu=t, hidden=d, ffn=f, experts=e, top_k=k, dtype=a.dtype,
                capacity_factor=cf, rows=rows)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="layer", help="comma list of layer, check, sweep, ep (all = layer,sweep,ep)")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--impls", default="dense,ragged,pallas,capacity,capacity_einsum")
    p.add_argument("--block-m", type=int, default=None)  # tiles: None = kernels.grouped_matmul's defaults
    p.add_argument("--block-n", type=int, default=None)
    p.add_argument("--block-k", type=int, default=None)
    p.add_argument("--num-warps", type=int, default=None)
    p.add_argument("--num-stages", type=int, default=None)
    p.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU)")
    p.add_argument("--ep", type=int, default=0, help="devices for ep mode (0 = all)")
    p.add_argument("--ep-dispatch", default="dropless,capacity")
    p.add_argument("--sweep-bwd", action="store_true", help="sweep mode: also time the backward per tile config")
    p.add_argument("--tiles", default=None, help='sweep mode: "bm,bn,bk,warps,stages;..." instead of the built-in list')
    p.add_argument("--ep-impl", default="pallas", choices=["pallas", "ragged"],
                   help="grouped matmul of the dropless rows in ep mode (EP=1, DP and EP alike)")
    p.add_argument("--exchange", default="ragged,dense", help="dropless EP exchanges to time")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--fwd-only", action="store_true")
    p.add_argument("--profile", action="store_true", help="layer mode: GPU time per kernel of each fwd+bwd (needs torch)")
    p.add_argument("--check-tol", type=float, default=3e-2, help="check mode: max error relative to max |ref|")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, CPU smoke run (Pallas in interpret mode)")
    p.add_argument("--out", default=None, help="write results JSON here")
    a = p.parse_args(argv)
    if a.tiny:
        a.tokens, a.hidden, a.ffn, a.experts = 128, 64, 96, 4
        a.block_m = a.block_n = a.block_k = 16
        a.num_warps, a.num_stages = 4, 2
        a.warmup, a.iters = 1, 2
        a.interpret = jax.devices()[0].platform == "cpu"
        if a.interpret:
            a.exchange = "dense"  # XLA:CPU has no ragged all-to-all
    info = dict(device=jax.devices()[0].device_kind, n_devices=len(jax.devices()), jax=jax.__version__,
                python=platform.python_version(), date=time.strftime("%Y-%m-%d %H:%M:%S"),
                command=" ".join(sys.argv))
    results = dict(info=info)
    modes = ["layer", "sweep", "ep"] if a.mode == "all" else [m for m in a.mode.split(",") if m]
    runners = {"layer": run_layer, "ep": run_ep, "sweep": run_sweep, "check": run_check}
    bad = [m for m in modes if m not in runners]
    if bad:
        p.error(f"unknown mode(s) {bad}; choose from {sorted(runners)} or all")
    if "check" in modes or "mosaic" in a.impls:  # the Mosaic grouped FFN is opt-in until its check passed
        os.environ["IVA_KERNELS_ALLOW_UNVALIDATED"] = "1"
    for m in modes:
        if m == "sweep" and a.interpret:
            continue
        results[m] = runners[m](a)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as fh:
            json.dump(results, fh, indent=1)
        print(f"\nwrote {a.out}")
    return results


if __name__ == "__main__":
    main()
