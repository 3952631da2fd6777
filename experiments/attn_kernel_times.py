"""Causal attention at kernel time (CUPTI), ours against cuDNN (jax and torch) and torch SDPA's default backend.

Host-timed rows (`profile_kernels.py`) of one implementation move by several percent between places in a run.
Here every implementation's kernels are timed by the GPU itself, in `rounds` interleaved rounds (A B C ... A B C),
and each figure is the median of its rounds, so clock drift hits all of them alike.  Inputs random (never zeros).
    PYTHONPATH=. python3 experiments/attn_kernel_times.py                 # all configs, fwd and fwd+bwd
    PYTHONPATH=. python3 experiments/attn_kernel_times.py --configs main --orders   # + the launch-order A/B
Writes $OUT/attn_kernel_times.json (GPU only).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import kernel_times as kt  # noqa: E402
from profile_kernels import attn_flops  # noqa: E402

CONFIGS = {  # name: (batch, seq, q heads, kv heads, head_dim, window)
    "main": (4, 4096, 16, 16, 128, None),
    "s1k": (16, 1024, 16, 16, 128, None),
    "s8k": (2, 8192, 16, 16, 128, None),
    "s16k": (1, 16384, 16, 16, 128, None),
    "d64": (4, 4096, 32, 32, 64, None),
    "gqa4": (4, 4096, 16, 4, 128, None),
    "window1024": (4, 4096, 16, 16, 128, 1024),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--orders", action="store_true", help="also time the forward/backward in natural launch order")
    ap.add_argument("--variants", default="{}", help='JSON {name: Tiles overrides} of Mosaic variants to time too, '
                    'e.g. \'{"unfolded scale": {"fold_scale": false}}\'')
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "attn_kernel_times.json"))
    args = ap.parse_args()
    import torch
    import torch.nn.functional as F

    fa = importlib.import_module("kernels.flash_attention")  # the module (kernels/__init__ exports the function)
    fam = importlib.import_module("kernels.flash_attention_mosaic")

    results = []
    for cname in args.configs.split(","):
        b, s, hq, hkv, d, window = CONFIGS[cname]
        ks = jax.random.split(jax.random.key(s + hq + d), 4)
        q, do = (jax.random.normal(k, (b, s, hq, d), jnp.bfloat16) for k in (ks[0], ks[3]))
        k, v = (jax.random.normal(kk, (b, s, hkv, d), jnp.bfloat16) for kk in ks[1:3])
        fl = attn_flops(b, hq, s, s, d, True, window)
        lw = None if window is None else (window - 1, 0)

        def attn(q, k, v):
            return fa.flash_attention(q, k, v, causal=True, sliding_window=window, impl="auto")

        def cudnn(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=lw, implementation="cudnn")

        def with_tiles(fn, tiles):  # fam.TILES is read while tracing (the forward and the VJP's backward)
            def traced(*a):
                saved, fam.TILES = fam.TILES, tiles
                try:
                    return fn(*a)
                finally:
                    fam.TILES = saved
            return traced

        impls = {"ours": (attn, None), "jax cuDNN": (cudnn, None)}
        if args.orders:
            impls["ours natural order"] = (attn, fam.Tiles(heavy_first=False))
        for vname, kw in json.loads(args.variants).items():
            impls[f"ours {vname}"] = (attn, fam.Tiles(**kw))
        runs = {}
        for name, (f, tiles) in impls.items():
            fb = lambda q, k, v, do, f=f: jax.vjp(f, q, k, v)[1](do)  # noqa: E731
            if tiles is not None:
                f, fb = with_tiles(f, tiles), with_tiles(fb, tiles)
            runs[f"fwd | {name}"] = (jax.jit(f), (q, k, v))
            runs[f"fwd+bwd | {name}"] = (jax.jit(fb), (q, k, v, do))
        torch_rows = {}
        if window is None:  # torch SDPA has no sliding window
            tq, tdo = (torch.randn(b, hq, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            tk, tv = (torch.randn(b, hkv, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            gqa = hq != hkv
            qq, kk, vv = (t.clone().requires_grad_(True) for t in (tq, tk, tv))
            torch_rows["fwd | torch SDPA default"] = lambda: F.scaled_dot_product_attention(
                tq, tk, tv, is_causal=True, enable_gqa=gqa)
            torch_rows["fwd+bwd | torch SDPA default"] = lambda: F.scaled_dot_product_attention(
                qq, kk, vv, is_causal=True, enable_gqa=gqa).backward(tdo)
        times = {key: [] for key in list(runs) + list(torch_rows)}
        for _ in range(args.rounds):
            for key, (fn, a) in runs.items():
                times[key].append(kt.kernel_table(fn, a, iters=args.iters, warm=2)["kernel_us_per_iter"])
            for key, fn in torch_rows.items():
                times[key].append(kt.torch_per_call(fn, iters=args.iters, warm=2))
        for key, ts in times.items():
            us = statistics.median(ts)
            mult = 3.5 if key.startswith("fwd+bwd") else 1.0
            row = dict(config=cname, shape=dict(b=b, s=s, hq=hq, hkv=hkv, d=d, window=window), what=key, us=us,
                       rounds_us=[round(t, 1) for t in ts], tflops=mult * fl / us / 1e6)
            results.append(row)
            print(f"{cname:<11} {key:<36} {us:9.1f} us  {row['tflops']:6.1f} TFLOP/s  rounds {row['rounds_us']}",
                  flush=True)
        for part in ("fwd", "fwd+bwd"):
            ours_us = next(r["us"] for r in results if r["config"] == cname and r["what"] == f"{part} | ours")
            for r in results:
                if r["config"] == cname and r["what"].startswith(part + " |") and r["what"] != f"{part} | ours":
                    print(f"{cname:<11} {part:<8} ours / {r['what'].split('| ')[1]}: {r['us'] / ours_us:.3f}x")
        del q, k, v, do
        torch.cuda.empty_cache()
    with open(args.out, "w") as fh:
        json.dump(dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, torch=torch.__version__,
                       rows=results), fh, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
