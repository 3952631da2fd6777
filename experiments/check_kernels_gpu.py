"""Parity checks of every kernel implementation on the real GPU (values and VJPs).

For each op, case and implementation (xla, triton, mosaic where the dispatcher allows it) draws
fresh random inputs, runs the op and its VJP on the GPU, and compares with the reference computed
in float64 on the CPU: error = max|out - ref| / max|ref| per output.  Before each kernel call the
device allocator is handed a freed NaN-filled buffer (best-effort poisoning: an output element the
kernel never writes then shows as NaN).  Prints a table (last) and writes JSON.

    PYTHONPATH=. python3 experiments/check_kernels_gpu.py [--out check.json] [--only attention]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import time
import traceback

import numpy as np

os.environ.setdefault("IVA_KERNELS_ALLOW_UNVALIDATED", "1")  # this script is what validates them

import jax
import jax.numpy as jnp

from kernels import dispatch

# modules, not the same-named functions that kernels/__init__ re-exports
fa, rn, sw = (importlib.import_module(f"kernels.{m}") for m in ("flash_attention", "rms_norm", "swiglu"))

TOL = {"float32": 2e-4, "bfloat16": 2.5e-2, "float16": 5e-3}  # f32: TF32-free kernels still reorder sums
ROWS: list[dict] = []


def _cpu():
    return jax.devices("cpu")[0]


def poison_allocator(nbytes: int = 1 << 30) -> None:
    """Fill and free a large buffer with NaN so that the next allocations likely reuse NaN memory."""
    x = jnp.full((nbytes // 4,), jnp.nan, jnp.float32)
    x.block_until_ready()
    del x


def rel(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    fin = np.isfinite(b)
    if not np.array_equal(np.isfinite(a), fin):
        return float("nan")
    if not fin.any():
        return 0.0
    den = np.max(np.abs(b[fin])) or 1.0
    return float(np.max(np.abs(a[fin] - b[fin])) / den)


def ref64(fn, *args):
    """fn(*args) and its VJP in float64 on the CPU; args are numpy arrays (cotangent last)."""
    *inputs, ct = args
    with jax.enable_x64(True), jax.default_device(_cpu()):
        xs = [jnp.asarray(np.asarray(a, np.float64)) if np.issubdtype(np.asarray(a).dtype, np.floating)
              else jnp.asarray(a) for a in inputs]
        out, vjp = jax.vjp(fn, *xs)
        cts = jax.tree.map(lambda o, c: jnp.asarray(np.asarray(c, np.float64)).astype(o.dtype), out, ct)
        grads = vjp(cts)
        return jax.tree.map(np.asarray, out), [np.asarray(g) for g in grads]


CASE_FILTER: list[str] = []


def run_case(op, case, impl, dtype, fn_impl, fn_ref, inputs, ct, grad_names, out_names):
    label = dict(op=op, case=case, impl=impl, dtype=jnp.dtype(dtype).name)
    if CASE_FILTER and not any(f in f"{op} {case}" for f in CASE_FILTER):
        return
    try:
        t0 = time.perf_counter()
        dev_in = [jnp.asarray(a) for a in inputs]
        dev_ct = jax.tree.map(jnp.asarray, ct)
        poison_allocator()
        out, vjp = jax.vjp(fn_impl, *dev_in)
        poison_allocator()
        grads = vjp(dev_ct)
        out = jax.tree.map(lambda o: np.asarray(o.astype(jnp.float32)), out)
        grads = [np.asarray(g.astype(jnp.float32)) for g in grads]
        r_out, r_grads = ref64(fn_ref, *inputs, ct)
        outs = out if isinstance(out, (tuple, list)) else [out]
        r_outs = r_out if isinstance(r_out, (tuple, list)) else [r_out]
        errs = {n: rel(a, b) for n, a, b in zip(out_names, outs, r_outs)}
        errs.update({n: rel(a, b) for n, a, b in zip(grad_names, grads, r_grads) if n})
        worst = max(errs.values(), key=lambda e: (np.isnan(e), e))
        ok = bool(np.isfinite(worst) and worst <= TOL[jnp.dtype(dtype).name])
        ROWS.append(dict(label, errors=errs, worst=worst, ok=ok, seconds=round(time.perf_counter() - t0, 2)))
    except Exception as e:  # noqa: BLE001 - report every failure, keep checking the rest
        ROWS.append(dict(label, error=f"{type(e).__name__}: {str(e)[:400]}", ok=False))
        traceback.print_exc(limit=3)
    r = ROWS[-1]
    print(f"{op:>16} {case:<34} {impl:<7} {label['dtype']:<9} "
          + (f"worst={r['worst']:.2e} ok={r['ok']} {r['seconds']}s" if "worst" in r else f"ERROR {r['error'][:200]}"),
          flush=True)


def impls_for(op_choose) -> list[str]:
    out = ["xla"]
    for impl in ("triton", "mosaic"):
        try:
            op_choose(impl)
            out.append(impl)
        except ValueError as e:
            print(f"   skip {impl}: {e}", flush=True)
    return out


def check_rms(rng):
    for dtype, shape in [(jnp.bfloat16, (4, 1000, 576)), (jnp.bfloat16, (2048, 4096)), (jnp.float32, (3, 77, 2048)),
                         (jnp.float16, (1000, 8192))]:
        x = rng.standard_normal(shape).astype(np.float32)
        r = rng.standard_normal(shape).astype(np.float32)
        w = (1 + 0.1 * rng.standard_normal(shape[-1])).astype(np.float32)
        g = rng.standard_normal(shape).astype(np.float32)
        cast = lambda a: np.asarray(jnp.asarray(a, dtype))
        x, r, w, g = map(cast, (x, r, w, g))
        for impl in impls_for(lambda i: rn._choose(i, shape[-1], False, log=False)):
            run_case("rms_norm", f"{shape}", impl, dtype,
                     lambda x, w, impl=impl: rn.rms_norm(x, w, eps=1e-6, impl=impl),
                     lambda x, w: rn.reference(x, w, eps=1e-6), [x, w], g, ["dx", "dw"], ["y"])
            run_case("rms_norm_res", f"{shape}", impl, dtype,
                     lambda x, r, w, impl=impl: rn.rms_norm_residual(x, r, w, eps=1e-6, impl=impl),
                     lambda x, r, w: rn.reference_residual(x, r, w, eps=1e-6), [x, r, w], (g, g),
                     ["dx", "dres", "dw"], ["y", "h"])


ATTN_CASES = [
    # name, B, Sq, Skv, Hq, Hkv, D, causal, window, q_offset, segments
    ("causal S1024 GQA4 D128", 2, 1024, 1024, 8, 2, 128, True, None, 0, False),
    ("causal S1000 GQA3 D64", 2, 1000, 1000, 6, 2, 64, True, None, 0, False),
    ("window129 off667 q333/kv1000 D64", 1, 333, 1000, 6, 2, 64, True, 129, 667, False),
    ("segments+leftpad S777 D128", 2, 777, 777, 4, 4, 128, True, None, 0, True),
    ("segments window 64 S520 GQA2 D64", 2, 520, 520, 4, 2, 64, True, 64, 0, True),
    ("noncausal S512 MQA D128", 1, 512, 300, 4, 1, 128, False, None, 0, False),
    ("causal off-50 (empty rows) D64", 1, 200, 256, 2, 1, 64, True, None, -50, False),
    ("window200 off300 q700/kv1000 GQA2 D128", 1, 700, 1000, 8, 4, 128, True, 200, 300, False),
]
# Mosaic backward variants besides the default tiles ("mosaic"): the two-kernel backward (dQ kernel + dK/dV
# kernel), the fused one (dK/dV kernel adds dQ via TMA reduce-add) with dQ's columns split between the
# warpgroups, and fused with per-warpgroup partials; the one equal to the default is not run twice
_MOSAIC_BWD = {"mosaic:2k": dict(fused_dq=False), "mosaic:fdq": dict(fused_dq=True, dq_split=True),
               "mosaic:pwg": dict(fused_dq=True, dq_split=False)}
# CHECK_ATTN_IMPLS=mosaic (comma list) runs only those attention implementations (a short GPU run)
_ATTN_IMPLS = [s for s in os.environ.get("CHECK_ATTN_IMPLS", "").split(",") if s]


def check_attention(rng):
    for name, b, sq, skv, hq, hkv, d, causal, window, q_off, segs in ATTN_CASES:
        for dtype in (jnp.bfloat16, jnp.float32):
            if dtype == jnp.float32 and (d != 64 or sq > 600):
                continue
            cast = lambda a: np.asarray(jnp.asarray(a, dtype))
            q = cast(rng.standard_normal((b, sq, hq, d)))
            k = cast(rng.standard_normal((b, skv, hkv, d)))
            v = cast(rng.standard_normal((b, skv, hkv, d)))
            do = cast(rng.standard_normal((b, sq, hq, d)))
            dlse = np.asarray(rng.standard_normal((b, hq, sq)), np.float32)
            kw = dict(causal=causal, sliding_window=window, q_offset=q_off)
            if segs:
                ks = np.ones((b, skv), np.int32)
                ks[0, : skv // 5] = 0  # left padding of row 0
                ks[:, skv // 2:] = 2  # a second packed sequence
                qs = ks[:, skv - sq:].copy()
                kw.update(q_segment_ids=qs, kv_segment_ids=ks)
            static_ids = {k_: v_ for k_, v_ in kw.items() if k_.endswith("segment_ids")}
            plain = {k_: v_ for k_, v_ in kw.items() if not k_.endswith("segment_ids")}

            def impl_fn(q, k, v, impl, plain=plain, static_ids=static_ids):
                return fa.flash_attention_with_lse(q, k, v, impl=impl, **plain,
                                                   **{k_: jnp.asarray(v_) for k_, v_ in static_ids.items()})

            def ref_fn(q, k, v, plain=plain, static_ids=static_ids):
                return fa.reference(q, k, v, return_lse=True, **plain,
                                    **{k_: jnp.asarray(v_) for k_, v_ in static_ids.items()})

            for impl in impls_for(lambda i: fa._choose(i, dtype, d, True, False, log=False, causal=causal,
                                                       q_offset=q_off)):
                if _ATTN_IMPLS and impl not in _ATTN_IMPLS:
                    continue
                run_case("flash_attention", name, impl, dtype, lambda q, k, v, impl=impl: impl_fn(q, k, v, impl),
                         ref_fn, [q, k, v], (do, dlse), ["dq", "dk", "dv"], ["o", "lse"])
                if impl != "mosaic":
                    continue
                fam = importlib.import_module("kernels.flash_attention_mosaic")
                for label, flags in _MOSAIC_BWD.items():
                    if all(getattr(fam.TILES, f) == x for f, x in flags.items()):
                        continue  # that is the default, run above
                    saved, fam.TILES = fam.TILES, dataclasses.replace(fam.TILES, **flags)
                    try:  # backward(tiles=None) reads fam.TILES when the VJP is traced, inside run_case
                        run_case("flash_attention", name, label, dtype, lambda q, k, v: impl_fn(q, k, v, "mosaic"),
                                 ref_fn, [q, k, v], (do, dlse), ["dq", "dk", "dv"], ["o", "lse"])
                    finally:
                        fam.TILES = saved


def check_swiglu(rng):
    for dtype, (m, k, n) in [(jnp.bfloat16, (1024, 576, 1536)), (jnp.bfloat16, (1000, 640, 1000)),
                             (jnp.float32, (300, 256, 520)), (jnp.bfloat16, (2048, 2048, 5632))]:
        cast = lambda a: np.asarray(jnp.asarray(a, dtype))
        x = cast(rng.standard_normal((m, k)))
        wg = cast(rng.standard_normal((k, n)) / np.sqrt(k))
        wu = cast(rng.standard_normal((k, n)) / np.sqrt(k))
        dh = cast(rng.standard_normal((m, n)))
        for impl in impls_for(lambda i: sw._choose(i, m, k, n, dtype, False, log=False)):
            run_case("swiglu", f"{m}x{k}->{n}", impl, dtype, lambda x, a, b, impl=impl: sw.swiglu(x, a, b, impl=impl),
                     sw.reference, [x, wg, wu], dh, ["dx", "dwg", "dwu"], ["y"])
        run_case("swiglu", f"{m}x{k}->{n} save_products", "auto", dtype,
                 lambda x, a, b: sw.swiglu(x, a, b, save_products=True), sw.reference, [x, wg, wu], dh,
                 ["dx", "dwg", "dwu"], ["y"])


def check_grouped_matmul(rng):
    """The Pallas grouped matmul with its default (GPU) tiles: uneven groups, an empty group, a row tail."""
    gm = importlib.import_module("kernels.grouped_matmul")
    for dtype, (m, k, n, sizes) in [(jnp.bfloat16, (1000, 576, 520, [130, 0, 401, 77, 300])),
                                    (jnp.float32, (777, 256, 300, [100, 250, 0, 400])),
                                    (jnp.bfloat16, (4096, 2048, 5632, [512] * 8))]:
        cast = lambda a: np.asarray(jnp.asarray(a, dtype))
        x = cast(rng.standard_normal((m, k)))
        w = cast(rng.standard_normal((len(sizes), k, n)) / np.sqrt(k))
        gs = np.asarray(sizes, np.int32)
        dy = cast(rng.standard_normal((m, n)))
        for impl in ("xla", "triton"):
            run_case("grouped_matmul", f"{m}x{k}->{n} groups {len(sizes)}", impl, dtype,
                     lambda x, w, impl=impl: gm.grouped_matmul(x, w, jnp.asarray(gs), impl=impl),
                     lambda x, w: gm.reference(x, w, jnp.asarray(gs)), [x, w], dy, ["dx", "dw"], ["y"])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ["OUT"], "check_kernels.json") if os.environ.get("OUT")
                    else "check_kernels.json")
    ap.add_argument("--only", default="rms,attention,swiglu,gmm")
    ap.add_argument("--cases", default="", help="comma-separated substrings of 'op case' to run (default: all)")
    args = ap.parse_args()
    CASE_FILTER.extend(c for c in args.cases.split(",") if c)
    info = dispatch.device_info()
    print("device", info, "jax", jax.__version__, flush=True)
    rng = np.random.default_rng(int(time.time()))  # fresh inputs every run
    only = args.only.split(",")
    if "rms" in only:
        check_rms(rng)
    if "attention" in only:
        check_attention(rng)
    if "swiglu" in only:
        check_swiglu(rng)
    if "gmm" in only:
        check_grouped_matmul(rng)
    with open(args.out, "w") as f:
        json.dump(dict(device=str(info), jax=jax.__version__, rows=ROWS), f, indent=1, default=str)
    print("\n| op | case | impl | dtype | worst rel err | per output | ok |\n|---|---|---|---|---|---|---|")
    for r in ROWS:
        if "worst" in r:
            per = " ".join(f"{k}={v:.1e}" for k, v in r["errors"].items())
            print(f"| {r['op']} | {r['case']} | {r['impl']} | {r['dtype']} | {r['worst']:.2e} | {per} | {'ok' if r['ok'] else 'FAIL'} |")
        else:
            print(f"| {r['op']} | {r['case']} | {r['impl']} | {r['dtype']} | error | {r['error'][:120]} | FAIL |")
    bad = [r for r in ROWS if not r["ok"]]
    print(f"\n{len(ROWS) - len(bad)}/{len(ROWS)} passed", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
