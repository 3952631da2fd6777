"""Benchmark the kernels against the anchors (torch, cuDNN, XLA), all measured in the same run.

Rows: copy bandwidth and bf16 matmul peak (ceilings); RMSNorm 32768 x {576, 2048, 4096, 8192} bf16
forward and forward+backward (ours, XLA, torch F.rms_norm, torch.compile); causal attention
B=4 S=4096 H=16 D=128 forward and forward+backward (ours, cuDNN via jax and torch, torch SDPA
default/flash/efficient) plus S = 1k/8k/16k, D=64, GQA 4:1 and sliding window 1024; SwiGLU
8192x4096 -> 14336 (ours, XLA's unfused expression, torch).  Median of many timed runs after
warm-up on random inputs (jax: batches of back-to-back calls between host syncs; torch:
triton.testing.do_bench, CUDA events).  Memory-bound rows rotate among enough input buffers to
defeat the 50 MB L2.  Writes JSON (--out, default $OUT/profile_kernels.json) and prints a
markdown table last.  Torch is optional: its rows are skipped with a message if it is missing.

    PYTHONPATH=. python3 experiments/profile_kernels.py [--quick] [--skip-sweep]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("IVA_KERNELS_ALLOW_UNVALIDATED", "1")  # time every kernel, validated or not

import numpy as np  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from kernels import dispatch  # noqa: E402

# modules, not the same-named functions that kernels/__init__ re-exports
fa, rn, sw, fam, swm = (importlib.import_module(f"kernels.{m}") for m in (  # noqa: E402
    "flash_attention", "rms_norm", "swiglu", "flash_attention_mosaic", "swiglu_mosaic"))

ROWS: list[dict] = []
QUICK = False


def row(group, name, ms, figure=None, unit="", **extra):
    r = dict(group=group, name=name, ms=round(ms, 4), figure=None if figure is None else round(figure, 1), unit=unit,
             **extra)
    ROWS.append(r)
    fig = "" if figure is None else f"{figure:9.1f} {unit}"
    print(f"{group:<10} {name:<56} {ms:9.4f} ms {fig}", flush=True)
    return r


def guard(label, f):
    try:
        return f()
    except Exception as e:  # noqa: BLE001
        msg = f"{type(e).__name__}: {str(e)[:300]}"
        print(f"{label:<66} FAILED: {msg}", flush=True)
        traceback.print_exc(limit=2)
        ROWS.append(dict(group="error", name=label, error=msg))
        return None


def time_jax(fn, arg_sets, reps=20, inner=5, warm=2):
    """Median ms per call; calls are issued back to back (async) in batches of `inner`."""
    for i in range(warm):
        jax.block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
    if QUICK:
        reps = max(5, reps // 3)
    ts, n = [], 0
    for _ in range(reps):
        t = time.perf_counter()
        out = None
        for _ in range(inner):
            out = fn(*arg_sets[n % len(arg_sets)])
            n += 1
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t) * 1e3 / inner)
    return statistics.median(ts)


def time_torch(fn, reps_ms=200):
    import torch
    import triton.testing
    torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=25, rep=reps_ms if not QUICK else 50, return_mode="median"))


def rotations(nbytes_one, min_total=400e6):
    return max(1, int(np.ceil(min_total / max(nbytes_one, 1))))


# ----------------------------------------------------------------------------- ceilings

def ceilings(torch_ok):
    out = {}
    if torch_ok:
        import torch

        def copy():
            x = torch.randn(256 * 1024 * 1024, device="cuda", dtype=torch.bfloat16)
            y = torch.empty_like(x)
            ms = time_torch(lambda: y.copy_(x))
            out["copy"] = 2 * x.numel() * 2 / ms / 1e6
            row("ceiling", "torch copy 512MiB (read+write)", ms, out["copy"], "GB/s")
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
        x = jax.random.normal(jax.random.key(0), (256 * 1024 * 1024,), jnp.bfloat16)
        f = jax.jit(lambda x: x * jnp.bfloat16(1.0001))
        ms = time_jax(f, [(x,)])
        out["copy_jax"] = 2 * x.size * 2 / ms / 1e6
        row("ceiling", "jax elementwise 512MiB (read+write)", ms, out["copy_jax"], "GB/s")
    guard("jax copy", jcopy)

    def jmm():
        a = jax.random.normal(jax.random.key(1), (8192, 8192), jnp.bfloat16)
        b = jax.random.normal(jax.random.key(2), (8192, 8192), jnp.bfloat16)
        ms = time_jax(jax.jit(lambda a, b: a @ b), [(a, b)], reps=10)
        out["mm_jax"] = 2 * 8192 ** 3 / ms / 1e9
        row("ceiling", "jax matmul 8192^3 bf16", ms, out["mm_jax"], "TFLOP/s")
    guard("jax matmul", jmm)
    return out


# ----------------------------------------------------------------------------- RMSNorm

def bench_rms(torch_ok, sweep):
    T = 32768
    for H in (576, 2048, 4096, 8192):
        nbytes = T * H * 2
        nrot = rotations(2 * nbytes)
        keys = jax.random.split(jax.random.key(H), nrot + 1)
        xs = [jax.random.normal(kk, (T, H), jnp.bfloat16) for kk in keys[:nrot]]
        w = (1 + 0.1 * jax.random.normal(keys[-1], (H,))).astype(jnp.bfloat16)
        gs = [x * 0.5 for x in xs]
        tag = f"rms {T}x{H}"
        for impl in ("triton", "xla"):
            f = jax.jit(lambda x, w, impl=impl: rn.rms_norm(x, w, eps=1e-6, impl=impl))
            guard(f"{tag} {impl} fwd", lambda f=f, impl=impl: row(
                "rms_fwd", f"{tag} ours-{impl}" if impl != "xla" else f"{tag} xla", ms := time_jax(f, [(x, w) for x in xs]),
                2 * nbytes / ms / 1e6, "GB/s", H=H, impl=impl))
            fb = jax.jit(lambda x, w, g, impl=impl: jax.vjp(lambda x, w: rn.rms_norm(x, w, eps=1e-6, impl=impl), x, w)[1](g))
            guard(f"{tag} {impl} fwd+bwd", lambda fb=fb, impl=impl: row(
                "rms_fwdbwd", f"{tag} ours-{impl}" if impl != "xla" else f"{tag} xla vjp",
                ms := time_jax(fb, [(x, w, g) for x, g in zip(xs, gs)]), 5 * nbytes / ms / 1e6, "GB/s", H=H, impl=impl))
        if H == 4096:
            for impl in ("triton", "xla"):
                f = jax.jit(lambda x, r, w, impl=impl: rn.rms_norm_residual(x, r, w, eps=1e-6, impl=impl))
                pairs = [(xs[i], xs[(i + 1) % nrot], w) for i in range(nrot)]
                guard(f"{tag} residual {impl}", lambda f=f, impl=impl, pairs=pairs: row(
                    "rms_res", f"{tag} residual+norm {impl}", ms := time_jax(f, pairs), 4 * nbytes / ms / 1e6, "GB/s",
                    H=H, impl=impl))
        if torch_ok:
            import torch
            import torch.nn.functional as F
            tx = [torch.randn(T, H, device="cuda", dtype=torch.bfloat16) for _ in range(nrot)]
            tw = (1 + 0.1 * torch.randn(H, device="cuda")).to(torch.bfloat16)
            it = [0]

            def nxt():
                it[0] += 1
                return tx[it[0] % nrot]

            def naive(x, w):
                xf = x.float()
                return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * w
            guard(f"{tag} torch F.rms_norm", lambda: row("rms_fwd", f"{tag} torch F.rms_norm",
                                                         ms := time_torch(lambda: F.rms_norm(nxt(), (H,), tw, 1e-6)),
                                                         2 * nbytes / ms / 1e6, "GB/s", H=H, impl="torch"))
            comp = torch.compile(naive)
            guard(f"{tag} torch.compile", lambda: row("rms_fwd", f"{tag} torch.compile", ms := time_torch(
                lambda: comp(nxt(), tw)), 2 * nbytes / ms / 1e6, "GB/s", H=H, impl="torch.compile"))

            def tfb():
                xr = [t.clone().requires_grad_(True) for t in tx[:2]]  # 1 or 2 buffers
                wr = tw.clone().requires_grad_(True)
                g = torch.randn_like(tx[0])
                j = [0]

                def fb():
                    j[0] += 1
                    y = F.rms_norm(xr[j[0] % len(xr)], (H,), wr, 1e-6)
                    y.backward(g)
                ms = time_torch(fb)
                row("rms_fwdbwd", f"{tag} torch F.rms_norm fwd+bwd", ms, 5 * nbytes / ms / 1e6, "GB/s", H=H, impl="torch")
            guard(f"{tag} torch fwd+bwd", tfb)
            del tx
            torch.cuda.empty_cache()
        if sweep:
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
        for impl in impls:
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
        if do_sweep:
            scale2 = d ** -0.5 * 1.4426950408889634
            fwd_tiles = ((fam.Tiles(block_kv=128), fam.Tiles(block_kv=64)) if d > 64 else
                         (fam.Tiles(block_kv=128), fam.Tiles(block_kv=256), fam.Tiles(block_kv=128, stages=3)))
            for tiles in fwd_tiles:
                f = jax.jit(lambda q, k, v, t=tiles: fam.forward(q, k, v, None, None, scale2=scale2, causal=True,
                                                                 window=None, q_offset=0, tiles=t))
                guard(f"sweep fwd {tiles}", lambda f=f, tiles=tiles: rec(
                    "sweep", f"mosaic fwd bq={tiles.block_q} bk={tiles.block_kv} st={tiles.stages}",
                    time_jax(f, [(q, k, v)], reps=10), 1))
            o, lse = fa.flash_attention_with_lse(q, k, v, impl="auto")
            lse2 = lse * 1.4426950408889634
            delta = jnp.einsum("bqhd,bqhd->bhq", o.astype(jnp.float32), do.astype(jnp.float32))
            bwd_tiles = ((fam.Tiles(), fam.Tiles(dq_block_kv=128)) if d > 64 else
                         (fam.Tiles(), fam.Tiles(dq_block_kv=128), fam.Tiles(bwd_block_q=128),
                          fam.Tiles(dq_block_kv=128, bwd_block_q=128)))
            for tiles in bwd_tiles:
                f = jax.jit(lambda q, k, v, do, lse2, delta, t=tiles: fam.backward(
                    q, k, v, None, None, do, lse2, delta, scale2=scale2, causal=True, window=None, q_offset=0, tiles=t))
                guard(f"sweep bwd {tiles}", lambda f=f, tiles=tiles: rec(
                    "sweep", f"mosaic bwd dq_bk={tiles.dq_block_kv} dkv_bq={tiles.bwd_block_q} st={tiles.stages}",
                    time_jax(f, [(q, k, v, do, lse2, delta)], reps=10), 2.5))


# ----------------------------------------------------------------------------- SwiGLU

def bench_swiglu(torch_ok, peak, sweep):
    m, kd, n = 8192, 4096, 14336
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
    for impl in ("auto", "triton", "xla"):
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
    if sweep:
        for tiles in (swm.Tiles(), swm.Tiles(grid_tile_width=8), swm.Tiles(grid_tile_width=2)):
            f = jax.jit(lambda x, a, b, t=tiles: swm.swiglu(x, a, b, t))
            guard(f"sweep swiglu {tiles}", lambda f=f, tiles=tiles: rec(
                "sweep", f"mosaic tm={tiles.tile_m} tn={tiles.tile_n} st={tiles.stages} w={tiles.grid_tile_width}",
                time_jax(f, [(x, wg, wu)], reps=10)))


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
    return lines


def main() -> int:
    global QUICK
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ["OUT"], "profile_kernels.json") if os.environ.get("OUT")
                    else "profile_kernels.json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--only", default="rms,attention,swiglu")
    ap.add_argument("--attn", default="all", choices=["all", "main", "d64"], help="attention configs to run")
    args = ap.parse_args()
    QUICK = args.quick
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
    only = args.only.split(",")
    if "rms" in only:
        bench_rms(torch_ok, not args.skip_sweep)
    if "attention" in only:
        bench_attention(torch_ok, peak, not args.skip_sweep, args.attn)
    if "swiglu" in only:
        bench_swiglu(torch_ok, peak, not args.skip_sweep)
    meta = dict(device=info.kind, cc=str(info.compute_capability), jax=jax.__version__, torch=tver,
                date=time.strftime("%Y-%m-%d"), seconds=round(time.time() - t0), ceilings=ceil)
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
