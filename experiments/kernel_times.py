"""Per-kernel GPU time of a jitted JAX function, read with torch's CUPTI-based profiler.

CUPTI's activity records are process-wide, so `torch.profiler` (CUDA activity) also sees the kernels that
XLA and Pallas launch from JAX in the same process.  `kernel_table(fn, args)` runs `fn(*args)` `iters`
times inside the profiler and returns one row per kernel name: calls per iteration, mean microseconds per
call and share of the total kernel time.  What it answers that wall-clock timing cannot: how much of a
step is the Pallas kernel itself, and how much the small XLA kernels around it (split-K sums, casts,
gathers) and the gaps between them.

    PYTHONPATH=. python3 experiments/kernel_times.py --demo int4     # GPU only: int4 / int8 / bf16 at decode shapes
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from typing import Callable, Sequence

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def kernel_table(fn: Callable, args: Sequence, iters: int = 20, warm: int = 3,
                 sync: Callable = jax.block_until_ready) -> dict:
    """{"rows": [{name, calls_per_iter, us_per_call, us_per_iter, share}], "kernel_us_per_iter",
    "wall_us_per_iter"} for `iters` calls of fn(*args) (each followed by `sync` of its result), kernels sorted
    by time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warm):
        sync(fn(*args))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for _ in range(iters):
            sync(fn(*args))
        wall = (time.perf_counter() - t) / iters * 1e6
        torch.cuda.synchronize()
    per = collections.defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            dur = ev.time_range.elapsed_us()  # the kernel's own GPU interval
            per[ev.name][0] += 1
            per[ev.name][1] += dur
    total = sum(v[1] for v in per.values()) or float("nan")
    rows = [dict(name=k[:120], calls_per_iter=c / iters, us_per_call=us / max(c, 1), us_per_iter=us / iters,
                 share=us / total) for k, (c, us) in sorted(per.items(), key=lambda kv: -kv[1][1])]
    return dict(rows=rows, kernel_us_per_iter=total / iters, wall_us_per_iter=wall)


def print_table(title: str, tab: dict, top: int = 12) -> None:
    print(f"\n{title}: kernels {tab['kernel_us_per_iter']:.1f} us / iter, wall {tab['wall_us_per_iter']:.1f} us / iter")
    for r in tab["rows"][:top]:
        print(f"  {r['us_per_iter']:9.2f} us/iter  {r['calls_per_iter']:6.2f} calls  {r['us_per_call']:8.2f} us/call"
              f"  {100 * r['share']:5.1f}%  {r['name']}")


def per_call(fn: Callable, x, sets: Sequence[tuple], iters: int = 8) -> dict:
    """Kernel time per call of fn(x, *w), over distinct weight sets (jitted together, >= 400 MB in all, so the
    L2 serves none of them): {"us": total kernel us per call, "kernels": {name: us per call}}."""
    fj = jax.jit(lambda x, sets: [fn(x, *w) for w in sets])
    tab = kernel_table(fj, (x, sets), iters=iters, warm=2)
    return dict(us=tab["kernel_us_per_iter"] / len(sets),
                kernels={r["name"][:60]: r["us_per_iter"] / len(sets) for r in tab["rows"][:4]})


def torch_per_call(fn: Callable, iters: int = 30, warm: int = 5) -> float:
    """Kernel time (us) per call of a torch callable fn() (all the CUDA kernels it launches)."""
    import torch

    return kernel_table(fn, (), iters=iters, warm=warm, sync=lambda _: torch.cuda.synchronize())["kernel_us_per_iter"]


def _demo_int4(out: dict) -> None:
    import jax.numpy as jnp

    from iva_jax import quant
    from kernels import quant_matmul as qm

    for k, n in ((4096, 14336), (14336, 4096)):
        w = jax.random.normal(jax.random.PRNGKey(0), (k, n), jnp.float32) * 0.02
        nset = lambda b: max(2, int(-(-400e6 // (k * n * b))))  # noqa: E731
        wb = [((w * (1 + 0.01 * i)).astype(jnp.bfloat16),) for i in range(nset(2))]
        q4 = [quant.quantize_groupwise(w * (1 + 0.01 * i), bits=4, group_size=128, symmetric=False)
              for i in range(nset(0.5))]
        q8 = [quant.quantize_groupwise(w * (1 + 0.01 * i), bits=8, group_size=128, symmetric=True)
              for i in range(nset(1))]
        for m in (1, 16):
            x = jax.random.normal(jax.random.PRNGKey(m), (m, k), jnp.bfloat16)
            bf = per_call(lambda x, w: x @ w, x, wb)
            res = {"bf16": bf}
            for bits, sets in ((4, q4), (8, q8)):
                res[f"int{bits}"] = r = per_call(lambda x, c, s, z, bits=bits: qm.quant_matmul(
                    x, c, s, z, bits=bits, group_size=128, impl="triton"), x, sets)
                r["x_bf16"] = bf["us"] / r["us"]
            print(f"M{m} {k}->{n}: bf16 {bf['us']:.1f} us | int4 {res['int4']['us']:.1f} us = "
                  f"{res['int4']['x_bf16']:.2f}x {res['int4']['kernels']} | int8 {res['int8']['us']:.1f} us = "
                  f"{res['int8']['x_bf16']:.2f}x", flush=True)
            out[f"M{m} {k}->{n}"] = res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", default="int4", choices=["int4"])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "kernel_times.json"))
    a = ap.parse_args()
    out: dict = {"device": str(jax.devices()[0]), "jax": jax.__version__}
    _demo_int4(out)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
