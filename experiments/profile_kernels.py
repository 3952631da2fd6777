"""Benchmark every kernel against its anchors (torch, cuDNN, XLA), all measured in the same run.

Rows: copy bandwidth and bf16 matmul peak (ceilings); RMSNorm 32768 x {576, 2048, 4096, 8192} bf16
forward and forward+backward (ours, XLA, torch F.rms_norm, torch.compile); causal attention
B=4 S=4096 H=16 D=128 forward and forward+backward (ours, cuDNN via jax and torch, torch SDPA
default/flash/efficient) plus S = 1k/8k/16k, D=64, GQA 4:1 and sliding window 1024; SwiGLU
8192x4096 -> 14336 (ours, XLA's unfused expression, torch); grouped matmul (MoE: 16k tokens top-2,
8 experts, 2048 -> 5632, balanced and skewed groups; ours vs jax.lax.ragged_dot, a dense matmul of
the same FLOPs, torch._grouped_mm); selective scan (b8 l4096 d2048 n16, f32 and bf16; ours vs
lax.associative_scan, lax.scan, and the anchors' plain linear recurrence); decode attention (B16
Hq32 Hkv8 8k cache and B1 32k, dense and paged; ours vs XLA and torch SDPA, GB/s of K+V); int4/int8
weight-only matmul at decode shapes (M = 1, 16; 4096 -> 14336; vs the bf16 matmul in XLA and torch).
Median of many timed runs after warm-up on random inputs (jax: batches of back-to-back calls between
host syncs; torch: triton.testing.do_bench, CUDA events).  Memory-bound rows rotate among enough
input buffers to defeat the 50 MB L2.  Writes JSON (--out, default $OUT/profile_kernels.json) and
prints one markdown table plus the goal ratios last.  Torch is optional: its rows are skipped with a
message if it is missing.  Rows of the newer groups carry `case` / `label` fields for plotting
(`iva_jax.analysis.plots.plot_kernel_speed`).  --tiny runs every group at toy shapes on any device
(CPU smoke test of this script; Pallas rows that cannot run here are skipped with the reason).

    PYTHONPATH=. python3 experiments/profile_kernels.py [--quick] [--skip-sweep] [--only rms,attention,...]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # noqa: E402

import benchlib  # noqa: E402  (experiments/benchlib.py, beside this script)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from kernels import dispatch  # noqa: E402

# modules, not the same-named functions that kernels/__init__ re-exports
fa, rn, sw, fam, swm = (importlib.import_module(f"kernels.{m}") for m in (  # noqa: E402
    "flash_attention", "rms_norm", "swiglu", "flash_attention_mosaic", "swiglu_mosaic"))

ROWS: list[dict] = []
QUICK = False
TINY = False  # toy shapes, any device (smoke test)
GROUPS = ("rms", "attention", "swiglu", "gmm", "scan", "decode", "quant")


def row(group, name, ms, figure=None, unit="", **extra):
    r = dict(group=group, name=name, ms=round(ms, 4), figure=None if figure is None else round(figure, 1), unit=unit,
             **extra)
    ROWS.append(r)
    fig = "" if figure is None else f"{figure:9.1f} {unit}"
    print(f"{group:<10} {name:<56} {ms:9.4f} ms {fig}", flush=True)
    return r


def guard(label, f):
    return benchlib.guard(label, f, lambda msg: ROWS.append(dict(group="error", name=label, error=msg)), limit=2)


def time_jax(fn, arg_sets, reps=20, inner=5, warm=2):
    """Median ms per call; calls are issued back to back (async) in batches of `inner`."""
    return benchlib.async_ms(fn, arg_sets, max(5, reps // 3) if QUICK else reps, inner, warm)


def time_torch(fn, reps_ms=200):
    return benchlib.torch_ms(fn, reps_ms if not QUICK else 50)


def rotations(nbytes_one, min_total=400e6):
    return benchlib.rotations(nbytes_one, min_total)


def runnable(impls, label=""):
    """The implementations of `impls` that can run on this device ("auto"/"xla" always); the others are
    printed as skipped with the dispatcher's reason (so a CPU --tiny run does not fill the JSON with errors)."""
    out = []
    for impl in impls:
        why = None if impl in ("auto", "xla") else dispatch.platform_reason(impl)
        if why:
            print(f"{label:<40} skip impl={impl}: {why}", flush=True)
        else:
            out.append(impl)
    return out


# ----------------------------------------------------------------------------- ceilings

def ceilings(torch_ok):
    out = {}
    if torch_ok:
        import torch

        def copy():
            x = torch.randn(256 * 1024 * 1024 if not TINY else 1 << 20, device="cuda", dtype=torch.bfloat16)
            y = torch.empty_like(x)
            ms = time_torch(lambda: y.copy_(x))
            out["copy"] = 2 * x.numel() * 2 / ms / 1e6
            row("ceiling", f"torch copy {2 * x.numel() // 2 ** 20}MiB (read+write)", ms, out["copy"], "GB/s")
        guard("torch copy", copy)

        def mm():
            a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
            b = torch.randn_like(a)
            ms = time_torch(lambda: a @ b)
            out["mm_torch"] = 2 * 8192 ** 3 / ms / 1e9
            row("ceiling", "torch matmul 8192^3 bf16", ms, out["mm_torch"], "TFLOP/s")
        guard("torch matmul", mm)
        torch.cuda.empty_cache()

    def jcopy():
        x = jax.random.normal(jax.random.key(0), (256 * 1024 * 1024 if not TINY else 1 << 20,), jnp.bfloat16)
        f = jax.jit(lambda x: x * jnp.bfloat16(1.0001))
        ms = time_jax(f, [(x,)])
        out["copy_jax"] = 2 * x.size * 2 / ms / 1e6
        row("ceiling", f"jax elementwise {2 * x.size // 2 ** 20}MiB (read+write)", ms, out["copy_jax"], "GB/s")
    guard("jax copy", jcopy)

    def jmm():
        n = 8192 if not TINY else 256
        a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
        b = jax.random.normal(jax.random.key(2), (n, n), jnp.bfloat16)
        ms = time_jax(jax.jit(lambda a, b: a @ b), [(a, b)], reps=10)
        out["mm_jax"] = 2 * n ** 3 / ms / 1e9
        row("ceiling", f"jax matmul {n}^3 bf16", ms, out["mm_jax"], "TFLOP/s")
    guard("jax matmul", jmm)
    return out


# ----------------------------------------------------------------------------- RMSNorm

def bench_rms(torch_ok, sweep):
    T = 32768 if not TINY else 64
    for H in ((576, 2048, 4096, 8192) if not TINY else (576,)):
        nbytes = T * H * 2
        nrot = rotations(2 * nbytes)
        keys = jax.random.split(jax.random.key(H), nrot + 1)
        xs = [jax.random.normal(kk, (T, H), jnp.bfloat16) for kk in keys[:nrot]]
        w = (1 + 0.1 * jax.random.normal(keys[-1], (H,))).astype(jnp.bfloat16)
        gs = [x * 0.5 for x in xs]
        tag = f"rms {T}x{H}"
        for impl in runnable(("triton", "xla"), f"rms H={H}"):
            f = jax.jit(lambda x, w, impl=impl: rn.rms_norm(x, w, eps=1e-6, impl=impl))
            guard(f"{tag} {impl} fwd", lambda f=f, impl=impl: row(
                "rms_fwd", f"{tag} ours-{impl}" if impl != "xla" else f"{tag} xla", ms := time_jax(f, [(x, w) for x in xs]),
                2 * nbytes / ms / 1e6, "GB/s", H=H, impl=impl))
            fb = jax.jit(lambda x, w, g, impl=impl: jax.vjp(lambda x, w: rn.rms_norm(x, w, eps=1e-6, impl=impl), x, w)[1](g))
            guard(f"{tag} {impl} fwd+bwd", lambda fb=fb, impl=impl: row(
                "rms_fwdbwd", f"{tag} ours-{impl}" if impl != "xla" else f"{tag} xla vjp",
                ms := time_jax(fb, [(x, w, g) for x, g in zip(xs, gs)]), 5 * nbytes / ms / 1e6, "GB/s", H=H, impl=impl))
        if H == 4096:
            for impl in runnable(("triton", "xla"), "rms residual"):
                f = jax.jit(lambda x, r, w, impl=impl: rn.rms_norm_residual(x, r, w, eps=1e-6, impl=impl))
                pairs = [(xs[i], xs[(i + 1) % nrot], w) for i in range(nrot)]
                guard(f"{tag} residual {impl}", lambda f=f, impl=impl, pairs=pairs: row(
                    "rms_res", f"{tag} residual+norm {impl}", ms := time_jax(f, pairs), 4 * nbytes / ms / 1e6, "GB/s",
                    H=H, impl=impl))
        if torch_ok:
            import torch
            import torch.nn.functional as F
            nxt, tw = benchlib.torch_rms_inputs(T, H, nrot)
            guard(f"{tag} torch F.rms_norm", lambda: row("rms_fwd", f"{tag} torch F.rms_norm",
                                                         ms := time_torch(lambda: F.rms_norm(nxt(), (H,), tw, 1e-6)),
                                                         2 * nbytes / ms / 1e6, "GB/s", H=H, impl="torch"))
            comp = torch.compile(benchlib.torch_rms_naive)
            guard(f"{tag} torch.compile", lambda: row("rms_fwd", f"{tag} torch.compile", ms := time_torch(
                lambda: comp(nxt(), tw)), 2 * nbytes / ms / 1e6, "GB/s", H=H, impl="torch.compile"))

            def tfb():
                xr = [nxt().clone().requires_grad_(True) for _ in range(2)]
                wr = tw.clone().requires_grad_(True)
                g = torch.randn_like(xr[0])
                j = [0]

                def fb():
                    j[0] += 1
                    y = F.rms_norm(xr[j[0] % len(xr)], (H,), wr, 1e-6)
                    y.backward(g)
                ms = time_torch(fb)
                row("rms_fwdbwd", f"{tag} torch F.rms_norm fwd+bwd", ms, 5 * nbytes / ms / 1e6, "GB/s", H=H, impl="torch")
            guard(f"{tag} torch fwd+bwd", tfb)
            del nxt
            torch.cuda.empty_cache()
        if sweep and not TINY:
            saved = rn._config

            def sweep_one(br, nw):
                rn._config = lambda n_rows, hidden: (pl_next_pow2(hidden), br, nw)
                try:
                    f = jax.jit(lambda x, w: rn._triton_fwd(x, w, None, 1e-6, False)[0])
                    ms = time_jax(f, [(x, w) for x in xs], reps=10)
                    row("sweep", f"{tag} triton rows={br} warps={nw}", ms, 2 * nbytes / ms / 1e6, "GB/s")
                finally:
                    rn._config = saved
            for br in (1, 2, 4, 8):
                for nw in (4, 8):
                    if 2048 <= br * pl_next_pow2(H) <= 16384:
                        guard(f"sweep rms {br} {nw}", lambda br=br, nw=nw: sweep_one(br, nw))
        del xs, gs


def pl_next_pow2(n):
    return 1 << (int(n) - 1).bit_length()


# ----------------------------------------------------------------------------- attention

def attn_flops(b, h, sq, skv, d, causal, window):
    qpos = np.arange(sq)[:, None]
    kpos = np.arange(skv)[None, :]
    vis = np.ones((sq, skv), bool)
    if causal:
        vis &= kpos <= qpos
    if window:
        vis &= (qpos - kpos) < window
    return 4.0 * b * h * d * vis.sum()


def bench_attention(torch_ok, peak, sweep, which="all"):
    configs = [
        ("B4 S4096 H16 D128 causal", 4, 4096, 16, 16, 128, None, True),
        ("B16 S1024 H16 D128 causal", 16, 1024, 16, 16, 128, None, False),
        ("B2 S8192 H16 D128 causal", 2, 8192, 16, 16, 128, None, False),
        ("B1 S16384 H16 D128 causal", 1, 16384, 16, 16, 128, None, False),
        ("B4 S4096 H32 D64 causal", 4, 4096, 32, 32, 64, None, False),
        ("B4 S4096 Hq16 Hkv4 D128 causal GQA4", 4, 4096, 16, 4, 128, None, False),
        ("B4 S4096 H16 D128 causal window1024", 4, 4096, 16, 16, 128, 1024, False),
    ]
    if QUICK or which == "main":
        configs = configs[:1]
    if TINY:
        configs = [("B1 S100 Hq4 Hkv2 D64 causal", 1, 100, 4, 2, 64, None, True)]
    if which == "d64":
        configs = [c for c in configs if c[5] == 64]
    for name, b, s, hq, hkv, d, window, main in configs:
        do_sweep = sweep and (main or which == "d64")
        key = jax.random.split(jax.random.key(s + hq + d), 4)
        q = jax.random.normal(key[0], (b, s, hq, d), jnp.bfloat16)
        k = jax.random.normal(key[1], (b, s, hkv, d), jnp.bfloat16)
        v = jax.random.normal(key[2], (b, s, hkv, d), jnp.bfloat16)
        do = jax.random.normal(key[3], (b, s, hq, d), jnp.bfloat16)
        fl = attn_flops(b, hq, s, s, d, True, window)
        extra = dict(config=name)

        def rec(group, label, ms, mult):
            tf = mult * fl / ms / 1e9
            row(group, f"{name} | {label}", ms, tf, "TFLOP/s", pct_peak=round(100 * tf / peak, 1) if peak else None,
                **extra)

        impls = ["auto", "triton"] if main else ["auto"]
        for impl in runnable(impls, name):
            f = jax.jit(lambda q, k, v, impl=impl: fa.flash_attention(q, k, v, causal=True, sliding_window=window,
                                                                     impl=impl))
            label = "ours-" + ("auto(" + fa._choose("auto", q.dtype, d, True, False, log=False) + ")"
                               if impl == "auto" else impl)
            guard(f"{name} {label} fwd", lambda f=f, label=label: rec("attn_fwd", label, time_jax(f, [(q, k, v)]), 1))
            fb = jax.jit(lambda q, k, v, do, impl=impl: jax.vjp(
                lambda q, k, v: fa.flash_attention(q, k, v, causal=True, sliding_window=window, impl=impl), q, k, v)[1](do))
            blabel = label + "+bwd(" + fa._choose(impl, q.dtype, d, True, False, backward=True, log=False) + ")"
            guard(f"{name} {blabel} fwd+bwd",
                  lambda fb=fb, blabel=blabel: rec("attn_fwdbwd", blabel, time_jax(fb, [(q, k, v, do)], reps=10), 3.5))
        lw = None if window is None else (window - 1, 0)

        def cudnn(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=lw, implementation="cudnn")
        if TINY or jax.default_backend() != "gpu":
            continue  # cuDNN and torch anchors: GPU only
        guard(f"{name} jax cudnn fwd", lambda: rec("attn_fwd", "jax cuDNN", time_jax(jax.jit(cudnn), [(q, k, v)]), 1))
        cfb = jax.jit(lambda q, k, v, do: jax.vjp(cudnn, q, k, v)[1](do))
        guard(f"{name} jax cudnn fwd+bwd", lambda: rec("attn_fwdbwd", "jax cuDNN", time_jax(cfb, [(q, k, v, do)], reps=10),
                                                       3.5))
        if torch_ok and window is None:
            import torch
            import torch.nn.functional as F
            from torch.nn.attention import SDPBackend, sdpa_kernel
            tq = torch.randn(b, hq, s, d, device="cuda", dtype=torch.bfloat16)
            tk = torch.randn(b, hkv, s, d, device="cuda", dtype=torch.bfloat16)
            tv = torch.randn_like(tk)
            gqa = hq != hkv
            backends = [("default", None)] + ([("FLASH", SDPBackend.FLASH_ATTENTION), ("CUDNN", SDPBackend.CUDNN_ATTENTION),
                                               ("EFFICIENT", SDPBackend.EFFICIENT_ATTENTION)] if main else [])
            for bname, be in backends:
                def sdpa():
                    return F.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=gqa)

                def run_fwd(be=be, bname=bname):
                    if be is None:
                        ms = time_torch(sdpa)
                    else:
                        with sdpa_kernel(be):
                            ms = time_torch(sdpa)
                    rec("attn_fwd", f"torch sdpa {bname}", ms, 1)

                def run_fb(be=be, bname=bname):
                    qq, kk, vv = (t.clone().requires_grad_(True) for t in (tq, tk, tv))
                    g = torch.randn_like(tq)

                    def fb():
                        F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=gqa).backward(g)
                    if be is None:
                        ms = time_torch(fb)
                    else:
                        with sdpa_kernel(be):
                            ms = time_torch(fb)
                    rec("attn_fwdbwd", f"torch sdpa {bname}", ms, 3.5)
                guard(f"{name} torch {bname} fwd", run_fwd)
                guard(f"{name} torch {bname} fwd+bwd", run_fb)
            del tq, tk, tv
            torch.cuda.empty_cache()
        if do_sweep and not TINY:
            scale2 = d ** -0.5 * 1.4426950408889634
            # heavy_first=False: the launch order before session 10 (q tiles in order within each batch)
            fwd_tiles = ((fam.Tiles(block_kv=128), fam.Tiles(heavy_first=False), fam.Tiles(block_kv=64))
                         if d > 64 else (fam.Tiles(block_kv=128), fam.Tiles(heavy_first=False),
                                         fam.Tiles(block_kv=256), fam.Tiles(block_kv=128, stages=3)))
            order = lambda t: "" if t.heavy_first else " natural order"  # noqa: E731
            for tiles in fwd_tiles:
                f = jax.jit(lambda q, k, v, t=tiles: fam.forward(q, k, v, None, None, scale2=scale2, causal=True,
                                                                 window=None, q_offset=0, tiles=t))
                guard(f"sweep fwd {tiles}", lambda f=f, tiles=tiles: rec(
                    "sweep", f"mosaic fwd bq={tiles.block_q} bk={tiles.block_kv} st={tiles.stages}{order(tiles)}",
                    time_jax(f, [(q, k, v)], reps=10), 1))
            o, lse = fa.flash_attention_with_lse(q, k, v, impl="auto")
            lse2 = lse * 1.4426950408889634
            delta = jnp.einsum("bqhd,bqhd->bhq", o.astype(jnp.float32), do.astype(jnp.float32))
            two, fused = fam.Tiles(fused_dq=False), fam.Tiles(fused_dq=True)
            natural = fam.Tiles(fused_dq=False, heavy_first=False)
            bwd_tiles = ((two, natural, fam.Tiles(fused_dq=False, dq_block_kv=128), fused,
                          fam.Tiles(fused_dq=True, dq_split=False)) if d > 64 else
                         (two, natural, fam.Tiles(fused_dq=False, dq_block_kv=128),
                          fam.Tiles(fused_dq=False, bwd_block_q=128), fused, fam.Tiles(fused_dq=True, dq_split=False)))

            def bwd_label(t):
                how = ("fused dQ " + ("split" if t.dq_split else "per-wg")) if t.fused_dq else \
                    f"dQ kernel dq_bk={t.dq_block_kv}"
                return f"mosaic bwd {how} dkv_bq={t.bwd_block_q} st={t.stages}{order(t)}"
            for tiles in bwd_tiles:
                f = jax.jit(lambda q, k, v, do, lse2, delta, t=tiles: fam.backward(
                    q, k, v, None, None, do, lse2, delta, scale2=scale2, causal=True, window=None, q_offset=0, tiles=t))
                guard(f"sweep bwd {tiles}", lambda f=f, tiles=tiles: rec(
                    "sweep", bwd_label(tiles), time_jax(f, [(q, k, v, do, lse2, delta)], reps=10), 2.5))
            for tiles in (two, natural):  # end to end through the public op (fam.TILES is read when the VJP traces)
                saved, fam.TILES = fam.TILES, tiles
                try:
                    fb = jax.jit(lambda q, k, v, do: jax.vjp(lambda q, k, v: fa.flash_attention(
                        q, k, v, causal=True, impl="mosaic"), q, k, v)[1](do))
                    guard(f"sweep fwd+bwd {tiles}", lambda fb=fb, tiles=tiles: rec(
                        "sweep", "mosaic fwd+" + bwd_label(tiles)[7:], time_jax(fb, [(q, k, v, do)], reps=10), 3.5))
                finally:
                    fam.TILES = saved


# ----------------------------------------------------------------------------- SwiGLU

def bench_swiglu(torch_ok, peak, sweep):
    m, kd, n = (8192, 4096, 14336) if not TINY else (64, 96, 160)
    ks = jax.random.split(jax.random.key(7), 4)
    x = jax.random.normal(ks[0], (m, kd), jnp.bfloat16)
    wg = (jax.random.normal(ks[1], (kd, n)) * 0.02).astype(jnp.bfloat16)
    wu = (jax.random.normal(ks[2], (kd, n)) * 0.02).astype(jnp.bfloat16)
    dh = jax.random.normal(ks[3], (m, n), jnp.bfloat16)
    fl = 2 * 2 * m * kd * n
    tag = f"swiglu {m}x{kd}->{n}"

    def rec(group, label, ms, mult=1.0):
        tf = mult * fl / ms / 1e9
        row(group, f"{tag} | {label}", ms, tf, "TFLOP/s", pct_peak=round(100 * tf / peak, 1) if peak else None)

    unfused = jax.jit(lambda x, a, b: jax.nn.silu(x @ a) * (x @ b))
    guard("swiglu xla unfused", lambda: rec("swiglu_fwd", "xla unfused silu(x@wg)*(x@wu)", time_jax(unfused, [(x, wg, wu)])))
    for impl in runnable(("auto", "triton", "xla"), "swiglu"):
        f = jax.jit(lambda x, a, b, impl=impl: sw.swiglu(x, a, b, impl=impl))
        label = "ours-" + (f"auto({sw._choose('auto', m, kd, n, x.dtype, False, log=False)})" if impl == "auto" else impl)
        guard(f"swiglu {label}", lambda f=f, label=label: rec("swiglu_fwd", label, time_jax(f, [(x, wg, wu)])))
        fb = jax.jit(lambda x, a, b, g, impl=impl: jax.vjp(lambda x, a, b: sw.swiglu(x, a, b, impl=impl), x, a, b)[1](g))
        guard(f"swiglu {label} fwd+bwd", lambda fb=fb, label=label: rec("swiglu_fwdbwd", label,
                                                                          time_jax(fb, [(x, wg, wu, dh)], reps=10), 3.0))
    ufb = jax.jit(lambda x, a, b, g: jax.vjp(lambda x, a, b: jax.nn.silu(x @ a) * (x @ b), x, a, b)[1](g))
    guard("swiglu xla unfused fwd+bwd", lambda: rec("swiglu_fwdbwd", "xla unfused autodiff",
                                                    time_jax(ufb, [(x, wg, wu, dh)], reps=10), 3.0))
    if torch_ok:
        import torch
        import torch.nn.functional as F
        tx = torch.randn(m, kd, device="cuda", dtype=torch.bfloat16)
        ta = torch.randn(kd, n, device="cuda", dtype=torch.bfloat16) * 0.02
        tb = torch.randn_like(ta)
        guard("swiglu torch", lambda: rec("swiglu_fwd", "torch silu(x@wg)*(x@wu)",
                                          time_torch(lambda: F.silu(tx @ ta) * (tx @ tb))))
        del tx, ta, tb
        torch.cuda.empty_cache()
    if sweep and not TINY:
        for tiles in (swm.Tiles(), swm.Tiles(grid_tile_width=8), swm.Tiles(grid_tile_width=2)):
            f = jax.jit(lambda x, a, b, t=tiles: swm.swiglu(x, a, b, t))
            guard(f"sweep swiglu {tiles}", lambda f=f, tiles=tiles: rec(
                "sweep", f"mosaic tm={tiles.tile_m} tn={tiles.tile_n} st={tiles.stages} w={tiles.grid_tile_width}",
                time_jax(f, [(x, wg, wu)], reps=10)))


# ----------------------------------------------------------------------------- newer kernels: shared

def rec_case(group, case, label, ms, figure=None, unit="", **extra):
    """A row with explicit `case` (panel) and `label` (bar) fields; name = "case | label"."""
    return row(group, f"{case} | {label}", ms, figure, unit, case=case, label=label, **extra)


def ours_label(impl, choice):
    return "ours-" + (f"auto({choice})" if impl == "auto" else impl)


# ----------------------------------------------------------------------------- grouped matmul (MoE)

def bench_gmm(torch_ok, peak):
    gm = importlib.import_module("kernels.grouped_matmul")
    tokens, top_k, e, d, f = (16384, 2, 8, 2048, 5632) if not TINY else (96, 2, 4, 64, 80)
    m = tokens * top_k
    ks = jax.random.split(jax.random.key(11), 4)
    lhs = jax.random.normal(ks[0], (m, d), jnp.bfloat16)
    rhs = (jax.random.normal(ks[1], (e, d, f)) * d ** -0.5).astype(jnp.bfloat16)
    dout = jax.random.normal(ks[2], (m, f), jnp.bfloat16)
    dense_w = rhs[0]
    fl = 2.0 * m * d * f
    skew = np.array([1.0 / (i + 1) for i in range(e)])
    sizes = {"balanced": np.full(e, m // e), "skewed 1/(e+1)": np.floor(m * skew / skew.sum()).astype(np.int64)}
    sizes["balanced"][-1] += m - sizes["balanced"].sum()
    sizes["skewed 1/(e+1)"][0] += m - sizes["skewed 1/(e+1)"].sum()
    choice = gm._pick_impl("auto", False) if hasattr(gm, "_pick_impl") else "?"
    for dist, gs_np in sizes.items():
        gs = jnp.asarray(gs_np, jnp.int32)
        case = f"gmm M{m} E{e} {d}->{f} {dist}"

        def rec(group, label, ms, mult=1.0):
            tf = mult * fl / ms / 1e9
            rec_case(group, case, label, ms, tf, "TFLOP/s", pct_peak=round(100 * tf / peak, 1) if peak else None,
                     dist=dist)

        for impl in runnable(("auto", "triton", "xla"), "gmm"):
            label = ours_label(impl, choice) if impl != "xla" else "ours-xla(ragged_dot)"
            f1 = jax.jit(lambda a, b, g, impl=impl: gm.grouped_matmul(a, b, g, impl=impl))
            guard(f"{case} {label}", lambda f1=f1, label=label: rec("gmm_fwd", label, time_jax(f1, [(lhs, rhs, gs)])))
            fb = jax.jit(lambda a, b, g, o, impl=impl: jax.vjp(
                lambda a, b: gm.grouped_matmul(a, b, g, impl=impl), a, b)[1](o))
            guard(f"{case} {label} fwd+bwd", lambda fb=fb, label=label: rec(
                "gmm_fwdbwd", label, time_jax(fb, [(lhs, rhs, gs, dout)], reps=10), 3.0))
        rd = jax.jit(lambda a, b, g: jax.lax.ragged_dot(a, b, g))
        guard(f"{case} ragged_dot", lambda: rec("gmm_fwd", "jax lax.ragged_dot", time_jax(rd, [(lhs, rhs, gs)])))
        if dist == "balanced":
            dm = jax.jit(lambda a, w: a @ w)
            guard(f"{case} dense", lambda: rec("gmm_fwd", "dense matmul, same FLOPs", time_jax(dm, [(lhs, dense_w)])))
            dfb = jax.jit(lambda a, w, o: jax.vjp(lambda a, w: a @ w, a, w)[1](o))
            guard(f"{case} dense fwd+bwd", lambda: rec("gmm_fwdbwd", "dense matmul, same FLOPs",
                                                       time_jax(dfb, [(lhs, dense_w, dout)], reps=10), 3.0))
        if torch_ok:
            import torch
            ta = torch.randn(m, d, device="cuda", dtype=torch.bfloat16)
            tb = torch.randn(e, f, d, device="cuda", dtype=torch.bfloat16) * d ** -0.5
            offs = torch.tensor(np.cumsum(gs_np), device="cuda", dtype=torch.int32)
            if hasattr(torch, "_grouped_mm"):
                guard(f"{case} torch _grouped_mm", lambda: rec("gmm_fwd", "torch _grouped_mm", time_torch(
                    lambda: torch._grouped_mm(ta, tb.transpose(-2, -1), offs=offs))))
            if dist == "balanced":
                tw = tb[0].t().contiguous()
                guard(f"{case} torch dense", lambda: rec("gmm_fwd", "torch dense mm, same FLOPs",
                                                         time_torch(lambda: ta @ tw)))
            del ta, tb
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- selective scan (Mamba)

def scan_inputs(b, l, d, n, dtype, seed=0):
    """Channels-last Mamba-layer-like inputs (dt bias = softplus^-1 of dt in [1e-3, 0.1]); B, C one group."""
    rng = np.random.default_rng(seed)
    r = lambda *sh: rng.standard_normal(sh).astype(np.float32)  # noqa: E731
    dt0 = np.exp(rng.uniform(np.log(1e-3), np.log(0.1), d))
    act = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    return dict(u=act(r(b, l, d)), delta=act(0.5 * r(b, l, d)),
                A=jnp.asarray(-np.arange(1, n + 1)[None] * rng.uniform(0.5, 1.5, (d, n)), jnp.float32),
                B=act(r(b, l, 1, n)), C=act(r(b, l, 1, n)), D=jnp.asarray(r(d), jnp.float32), z=act(r(b, l, d)),
                delta_bias=jnp.asarray(dt0 + np.log(-np.expm1(-dt0)), jnp.float32))


def bench_scan(copy_gbs):
    from iva_jax.ssm import scan as S
    kss = importlib.import_module("kernels.selective_scan")
    b, l, d, n = (8, 4096, 2048, 16) if not TINY else (1, 64, 32, 4)
    auto = S.resolve_impl("auto")
    impls = [("auto", f"ours-auto({auto})"), ("pallas", "ours-triton"), ("associative", "lax.associative_scan"),
             ("sequential", "lax.scan (reference)")]
    for dtype in (jnp.float32, jnp.bfloat16):
        dn = jnp.dtype(dtype).name
        a = scan_inputs(b, l, d, n, dtype)
        g = jnp.asarray(np.random.default_rng(3).standard_normal((b, l, d)), jnp.float32)
        case = f"scan b{b} l{l} d{d} n{n} {dn}"
        for impl, label in impls:
            if impl == "pallas" and not runnable(("triton",), case):
                continue
            fwd = jax.jit(lambda a, impl=impl: S.selective_scan_bld(**a, delta_softplus=True, impl=impl)[0])
            fb = jax.jit(lambda a, g, impl=impl: jax.grad(lambda a: jnp.sum(S.selective_scan_bld(
                **a, delta_softplus=True, impl=impl)[0].astype(jnp.float32) * g))(a))
            for group, fn, args, bwd in (("scan_fwd", fwd, (a,), False), ("scan_fwdbwd", fb, (a, g), True)):
                nbytes = kss.copy_bytes(b, l, d, n, 1, jnp.dtype(dtype).itemsize, True, bwd)

                def one(fn=fn, args=args, group=group, label=label, nbytes=nbytes):
                    ms = time_jax(fn, [args], reps=10 if not TINY else 3)
                    gbs = nbytes / ms / 1e6
                    rec_case(group, case, label, ms, gbs, "GB/s",
                             pct_copy=round(100 * gbs / copy_gbs, 1) if copy_gbs else None, dtype=dn)
                guard(f"{case} {label} {group}", one)
    # the anchors' plain linear recurrence h_t = a_t h_{t-1} + b_t (B8 L4096 C32768 f32; bytes = a, b, h)
    bb, ll, cc = (8, 4096, 32768) if not TINY else (1, 64, 128)
    if QUICK and not TINY:
        cc = 8192
    ka, kb = jax.random.split(jax.random.key(5))
    av = jax.random.uniform(ka, (bb, ll, cc), jnp.float32, 0.5, 1.0)
    bv = jax.random.normal(kb, (bb, ll, cc), jnp.float32)
    nbytes = 3 * bb * ll * cc * 4
    case = f"linear recurrence B{bb} L{ll} C{cc} f32 (anchor)"

    def assoc(a, b):
        return jax.lax.associative_scan(lambda x, y: (x[0] * y[0], y[0] * x[1] + y[1]), (a, b), axis=1)[1]

    def seq(a, b):
        def step(h, ab):
            h = ab[0] * h + ab[1]
            return h, h
        return jnp.swapaxes(jax.lax.scan(step, jnp.zeros((bb, cc), jnp.float32),
                                         (jnp.swapaxes(a, 0, 1), jnp.swapaxes(b, 0, 1)))[1], 0, 1)
    for label, fn in (("lax.associative_scan", assoc), ("lax.scan", seq)):
        guard(f"{case} {label}", lambda label=label, fn=fn: rec_case(
            "scan_fwd", case, label, ms := time_jax(jax.jit(fn), [(av, bv)], reps=10 if not TINY else 3),
            nbytes / ms / 1e6, "GB/s"))
    del av, bv


# ----------------------------------------------------------------------------- decode attention

def bench_decode(torch_ok, copy_gbs):
    da = importlib.import_module("kernels.decode_attention")
    configs = [(16, 32, 8, 8192, 128), (1, 32, 8, 32768, 128)] if not TINY else [(2, 4, 2, 96, 64)]
    if QUICK:
        configs = configs[:1]
    page = 64 if not TINY else 16
    for b, hq, hkv, s, d in configs:
        case = f"decode B{b} Hq{hq} Hkv{hkv} L{s} D{d} bf16"
        kv_bytes = 2 * b * s * hkv * d * 2
        nrot = rotations(kv_bytes)
        keys = jax.random.split(jax.random.key(s + b), 3 * nrot)
        qs = [jax.random.normal(keys[3 * i], (b, hq, d), jnp.bfloat16) for i in range(nrot)]
        ks_ = [jax.random.normal(keys[3 * i + 1], (b, s, hkv, d), jnp.bfloat16) for i in range(nrot)]
        vs_ = [jax.random.normal(keys[3 * i + 2], (b, s, hkv, d), jnp.bfloat16) for i in range(nrot)]
        lengths = jnp.full((b,), s, jnp.int32)
        choice = da.choose_impl("auto", jnp.bfloat16, d, log=False)

        def rec(label, ms):
            gbs = kv_bytes / ms / 1e6
            rec_case("decode", case, label, ms, gbs, "GB/s", pct_copy=round(100 * gbs / copy_gbs, 1) if copy_gbs
                     else None)
        for impl in runnable(("auto", "triton", "xla"), case):
            f = jax.jit(lambda q, k, v, impl=impl: da.decode_attention(q, k, v, lengths, impl=impl))
            label = ours_label(impl, choice) + " dense"
            guard(f"{case} {label}", lambda f=f, label=label: rec(label, time_jax(f, list(zip(qs, ks_, vs_)))))
        # paged: the same cache as a shuffled page pool [P, page, Hkv, D]
        npg = s // page
        perm = np.random.default_rng(0).permutation(b * npg)
        table = jnp.asarray(perm.reshape(b, npg), jnp.int32)
        inv = jnp.asarray(np.argsort(perm))
        pools = [(kk.reshape(b * npg, page, hkv, d)[inv], vv.reshape(b * npg, page, hkv, d)[inv])
                 for kk, vv in zip(ks_, vs_)]
        for impl in runnable(("auto", "triton"), case):
            f = jax.jit(lambda q, kp, vp, impl=impl: da.paged_decode_attention(q, kp, vp, table, lengths, impl=impl))
            label = ours_label(impl, choice) + f" paged({page})"
            guard(f"{case} {label}", lambda f=f, label=label: rec(
                label, time_jax(f, [(q, kp, vp) for q, (kp, vp) in zip(qs, pools)])))
        del pools
        if torch_ok:
            import torch
            import torch.nn.functional as F
            tq = [torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16) for _ in range(nrot)]
            tk = [torch.randn(b, hkv, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(nrot)]
            tv = [torch.randn(b, hkv, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(nrot)]
            it = [0]

            def sdpa():
                it[0] += 1
                i = it[0] % nrot
                return F.scaled_dot_product_attention(tq[i], tk[i], tv[i], enable_gqa=True)
            guard(f"{case} torch sdpa", lambda: rec("torch sdpa decode", time_torch(sdpa)))
            del tq, tk, tv
            torch.cuda.empty_cache()
        del qs, ks_, vs_


# ----------------------------------------------------------------------------- int4 / int8 weight-only matmul

def bench_quant(torch_ok):
    qm = importlib.import_module("kernels.quant_matmul")
    from iva_jax.quant.int_quant import quantize_groupwise
    k, n, group = (4096, 14336, 128) if not TINY else (256, 384, 64)
    ms_rows = (1, 16) if not QUICK else (1,)
    w = (jax.random.normal(jax.random.key(21), (k, n)) * 0.02).astype(jnp.bfloat16)
    wbytes = k * n * 2
    nrot = rotations(wbytes)
    ws = [w] + [w * (1 + 0.01 * i) for i in range(1, nrot)]
    packed = {bits: [quantize_groupwise(wi, bits=bits, group_size=group, symmetric=bits == 8) for wi in ws]
              for bits in (8, 4)}
    for m in ms_rows:
        case = f"quant matmul M{m} {k}->{n} g{group}"
        x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)

        def rec(label, ms, nbytes):
            rec_case("quant", case, label, ms, nbytes / ms / 1e6, "GB/s", M=m)
        bf = jax.jit(lambda x, w: x @ w)
        guard(f"{case} bf16", lambda: rec("xla bf16 matmul (anchor)", time_jax(bf, [(x, wi) for wi in ws]), wbytes))
        for bits in (4, 8):
            codes, scale, zero = packed[bits][0]
            nbytes = codes.size * codes.dtype.itemsize + scale.size * scale.dtype.itemsize + (
                0 if zero is None else zero.size * zero.dtype.itemsize)
            choice = qm.choose_impl("auto", m, x.dtype, group)
            for impl in runnable(("auto", "triton", "xla"), case):
                f = jax.jit(lambda x, c, s_, z, impl=impl, bits=bits: qm.quant_matmul(
                    x, c, s_, z, bits=bits, group_size=group, impl=impl))
                label = f"int{bits} " + ours_label(impl, choice)
                guard(f"{case} {label}", lambda f=f, label=label, bits=bits, nbytes=nbytes: rec(
                    label, time_jax(f, [(x, c, s_, z) for c, s_, z in packed[bits]]), nbytes))
        if torch_ok:
            import torch
            tx = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            tw = [torch.randn(k, n, device="cuda", dtype=torch.bfloat16) for _ in range(nrot)]
            it = [0]

            def mm():
                it[0] += 1
                return tx @ tw[it[0] % nrot]
            guard(f"{case} torch bf16", lambda: rec("torch bf16 matmul (anchor)", time_torch(mm), wbytes))
            del tx, tw
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- report

def best(group, pred):
    rs = [r for r in ROWS if r.get("group") == group and "ms" in r and pred(r)]
    return min(rs, key=lambda r: r["ms"]) if rs else None


def summary(ceil):
    lines = []

    def ratio(a, b):
        return f"{b['ms'] / a['ms']:.2f}x" if a and b else "n/a"
    copy = ceil.get("copy") or ceil.get("copy_jax")
    for h in (576, 2048, 4096, 8192):
        ours = best("rms_fwd", lambda r: r.get("H") == h and r.get("impl") == "triton")
        if ours:
            tr = best("rms_fwd", lambda r: r.get("H") == h and r.get("impl") == "torch")
            tc = best("rms_fwd", lambda r: r.get("H") == h and r.get("impl") == "torch.compile")
            xl = best("rms_fwd", lambda r: r.get("H") == h and r.get("impl") == "xla")
            pct = f"{100 * ours['figure'] / copy:.0f}%" if copy else "n/a"
            lines.append(f"| RMSNorm fwd H={h} | {ours['figure']} GB/s | vs F.rms_norm {ratio(ours, tr)} (goal 1.25x), "
                         f"vs torch.compile {ratio(ours, tc)} (1.15x), vs XLA {ratio(ours, xl)} (1.2x), "
                         f"{pct} of copy (85%) |")
        fb = best("rms_fwdbwd", lambda r: r.get("H") == h and r.get("impl") == "triton")
        xfb = best("rms_fwdbwd", lambda r: r.get("H") == h and r.get("impl") == "xla")
        if fb:
            lines.append(f"| RMSNorm fwd+bwd H={h} | {fb['figure']} GB/s | vs XLA vjp {ratio(fb, xfb)} (goal 1.2x) |")
    for cfg in sorted({r.get("config") for r in ROWS if r.get("config")}):
        for grp, goal in (("attn_fwd", "fwd"), ("attn_fwdbwd", "fwd+bwd")):
            ours = best(grp, lambda r: r.get("config") == cfg and "ours-auto" in r["name"])
            if not ours:
                continue
            cj = best(grp, lambda r: r.get("config") == cfg and "jax cuDNN" in r["name"])
            ct = best(grp, lambda r: r.get("config") == cfg and "sdpa CUDNN" in r["name"])
            td = best(grp, lambda r: r.get("config") == cfg and "sdpa default" in r["name"])
            lines.append(f"| attention {goal} {cfg} | {ours['figure']} TFLOP/s ({ours.get('pct_peak')}% of peak) | "
                         f"vs torch SDPA default {ratio(ours, td)}, vs cuDNN jax {ratio(ours, cj)}, "
                         f"vs cuDNN torch {ratio(ours, ct)} |")
    for grp in ("swiglu_fwd", "swiglu_fwdbwd"):
        ours = best(grp, lambda r: "ours-auto" in r["name"])
        xl = best(grp, lambda r: "xla unfused" in r["name"])
        if ours:
            lines.append(f"| SwiGLU {grp.split('_')[1]} | {ours['figure']} TFLOP/s | vs XLA unfused {ratio(ours, xl)} "
                         f"(goal 1.05x) |")
    lines += summary_newer(ratio, copy)
    return lines


def summary_newer(ratio, copy):
    """Goal lines of grouped matmul, selective scan, decode attention and quant matmul (rows with `case`)."""
    lines = []

    def find(group, case, pred):
        return best(group, lambda r: r.get("case") == case and pred(r.get("label", "")))

    def cases(group):
        return sorted({r["case"] for r in ROWS if r.get("group") == group and "case" in r and "ms" in r})
    for grp in ("gmm_fwd", "gmm_fwdbwd"):
        for case in cases(grp):
            ours = find(grp, case, lambda lb: lb.startswith("ours-auto"))
            if ours:
                rd = find(grp, case, lambda lb: "ragged_dot" in lb and not lb.startswith("ours"))
                dn = find(grp, case, lambda lb: lb.startswith("dense"))
                tg = find(grp, case, lambda lb: "_grouped_mm" in lb)
                lines.append(f"| grouped matmul {grp.split('_')[1]} {case} | {ours['figure']} TFLOP/s | vs ragged_dot "
                             f"{ratio(ours, rd)}, vs dense same FLOPs {ratio(ours, dn)}, vs torch _grouped_mm "
                             f"{ratio(ours, tg)} |")
    for grp in ("scan_fwd", "scan_fwdbwd"):
        for case in cases(grp):
            ours = find(grp, case, lambda lb: lb.startswith("ours-auto"))
            if ours:
                asc = find(grp, case, lambda lb: lb.startswith("lax.associative_scan"))
                seq = find(grp, case, lambda lb: lb.startswith("lax.scan"))
                pct = f"{100 * ours['figure'] / copy:.0f}%" if copy else "n/a"
                lines.append(f"| selective scan {grp.split('_')[1]} {case} | {ours['figure']} GB/s | "
                             f"vs associative_scan {ratio(ours, asc)} (goal 3x fwd), vs lax.scan {ratio(ours, seq)}, {pct} of copy "
                             f"(goal 70%) |")
    for case in cases("decode"):
        for kind in ("dense", "paged"):
            ours = find("decode", case, lambda lb, kind=kind: lb.startswith("ours-auto") and kind in lb)
            if ours:
                ts = find("decode", case, lambda lb: lb.startswith("torch"))
                pct = f"{100 * ours['figure'] / copy:.0f}%" if copy else "n/a"
                lines.append(f"| decode attention {kind} {case} | {ours['figure']} GB/s | {pct} of copy (goal 85%), "
                             f"vs torch SDPA {ratio(ours, ts)} |")
    for case in cases("quant"):
        bf = find("quant", case, lambda lb: lb.startswith("xla bf16"))
        for bits in (4, 8):
            ours = find("quant", case, lambda lb, bits=bits: lb.startswith(f"int{bits} ours-auto"))
            if ours:
                goal = " (goal 2.5x at M=1)" if bits == 4 else ""
                lines.append(f"| int{bits} matmul {case} | {ours['figure']} GB/s of weights | vs bf16 matmul "
                             f"{ratio(ours, bf)}{goal} |")
    return lines


def main() -> int:
    global QUICK, TINY
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.environ["OUT"], "profile_kernels.json") if os.environ.get("OUT")
                    else "profile_kernels.json")
    ap.add_argument("--quick", action="store_true", help="fewer configs and repetitions")
    ap.add_argument("--tiny", action="store_true", help="toy shapes on any device (smoke test of this script)")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated subset of {GROUPS}")
    ap.add_argument("--attn", default="all", choices=["all", "main", "d64"], help="attention configs to run")
    args = ap.parse_args()
    QUICK, TINY = args.quick or args.tiny, args.tiny
    os.environ.setdefault("IVA_KERNELS_ALLOW_UNVALIDATED", "1")  # time every kernel, validated or not
    only = args.only.split(",")
    unknown = sorted(set(only) - set(GROUPS))
    if unknown:
        ap.error(f"unknown --only groups {unknown}; choose from {GROUPS}")
    try:
        import torch
        torch_ok = torch.cuda.is_available()
        tver = torch.__version__
    except ImportError:
        torch_ok, tver = False, None
        print("torch not installed: torch anchors skipped", flush=True)
    info = dispatch.device_info()
    print("device", info, "jax", jax.__version__, "torch", tver, flush=True)
    t0 = time.time()
    ceil = ceilings(torch_ok)
    peak = ceil.get("mm_torch") or ceil.get("mm_jax")
    copy = ceil.get("copy") or ceil.get("copy_jax")
    if "rms" in only:
        bench_rms(torch_ok, not args.skip_sweep)
    if "attention" in only:
        bench_attention(torch_ok, peak, not args.skip_sweep, args.attn)
    if "swiglu" in only:
        bench_swiglu(torch_ok, peak, not args.skip_sweep)
    if "gmm" in only:
        guard("gmm", lambda: bench_gmm(torch_ok, peak))
    if "scan" in only:
        guard("scan", lambda: bench_scan(copy))
    if "decode" in only:
        guard("decode", lambda: bench_decode(torch_ok, copy))
    if "quant" in only:
        guard("quant", lambda: bench_quant(torch_ok))
    meta = dict(device=info.kind, cc=str(info.compute_capability), jax=jax.__version__, torch=tver,
                date=time.strftime("%Y-%m-%d"), seconds=round(time.time() - t0), ceilings=ceil,
                quick=QUICK, tiny=TINY, groups=only,
                auto={k: v["impl"] for k, v in dispatch.describe().items() if k != "device"})
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=ROWS), f, indent=1)
    print(f"\n{meta}\n\n| group | what | ms | figure |\n|---|---|---|---|")
    for r in ROWS:
        if "ms" in r:
            fig = "" if r["figure"] is None else f"{r['figure']} {r['unit']}"
            print(f"| {r['group']} | {r['name']} | {r['ms']} | {fig} |")
    print("\n| goal | ours | ratios |\n|---|---|---|")
    print("\n".join(summary(ceil)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
