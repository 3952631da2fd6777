"""RMSNorm forward at kernel time: GPU time per call read with CUPTI (torch's profiler sees JAX's kernels too), so
small shapes are not hidden behind host dispatch (a 32768 x 576 bf16 norm moves 75 MB: ~25 us at copy speed, less
than one jitted call's dispatch).  Ours (the shipped config and a rows x warps sweep), XLA, torch F.rms_norm,
torch.compile, and a copy of the same bytes timed the same way, over rotating inputs of >= 400 MB; forward+backward
(ours vs XLA's vjp, y unused so only the backward runs; bytes counted as 3 passes: read x and g, write dx).

    PYTHONPATH=. python3 experiments/rms_kernel_times.py --out $OUT/rms_kernel_times.json
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", default="576,2048,4096,8192")
    ap.add_argument("--rows", type=int, default=32768)
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--bwd-sweep", action="store_true", help="also sweep the backward kernel's rows x warps")
    ap.add_argument("--previous", default=None, help="path of another kernels/rms_norm.py to time beside ours "
                    "(e.g. `git show <rev>:kernels/rms_norm.py > /tmp/rms_prev.py`)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "rms_kernel_times.json"))
    a = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    import torch.nn.functional as F

    from experiments.benchlib import torch_rms_inputs, torch_rms_naive
    from experiments.kernel_times import per_call, torch_per_call

    rn = importlib.import_module("kernels.rms_norm")
    prev = None
    if a.previous:
        spec = importlib.util.spec_from_file_location("rms_norm_previous", a.previous)
        prev = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(prev)
    out = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, torch=torch.__version__,
               date=time.strftime("%Y-%m-%d"), rows=a.rows, results={})
    T = a.rows
    for H in map(int, a.hidden.split(",")):
        nbytes = 2 * T * H * 2  # read x + write y, bf16
        nrot = max(2, int(-(-400e6 // (T * H * 2))))
        keys = jax.random.split(jax.random.key(H), nrot + 1)
        xs = [jax.random.normal(k, (T, H), jnp.bfloat16) for k in keys[:nrot]]
        w = (1 + 0.1 * jax.random.normal(keys[-1], (H,))).astype(jnp.bfloat16)
        sets = [(x, w) for x in xs]
        dummy = jnp.zeros((1,), jnp.float32)
        res = {}

        def jax_row(name, fn):
            r = per_call(lambda _, x, w: fn(x, w), dummy, sets)
            res[name] = dict(us=r["us"], gb_s=nbytes / r["us"] / 1e3, kernels=r["kernels"])
            print(f"H={H:<5} {name:<28} {r['us']:8.2f} us  {nbytes / r['us'] / 1e3:7.1f} GB/s  {r['kernels']}", flush=True)

        jax_row("ours", lambda x, w: rn.rms_norm(x, w, eps=1e-6, impl="triton"))
        if prev is not None:
            jax_row("previous", lambda x, w: prev.rms_norm(x, w, eps=1e-6, impl="triton"))
        jax_row("xla", lambda x, w: rn.rms_norm(x, w, eps=1e-6, impl="xla"))
        jax_row("jax copy (x * 1.5)", lambda x, w: x * jnp.asarray(1.5, x.dtype))
        fb = lambda impl: lambda x, w: jax.vjp(lambda x, w: rn.rms_norm(x, w, eps=1e-6, impl=impl), x, w)[1](x)  # noqa: E731
        for name, impl in (("ours fwd+bwd", "triton"), ("xla fwd+bwd (vjp)", "xla")):
            # y is unused, so only the backward runs: read x and g, write dx (3 passes)
            r = per_call(lambda _, x, w, f=fb(impl): f(x, w), dummy, sets)
            res[name] = dict(us=r["us"], gb_s=1.5 * nbytes / r["us"] / 1e3, kernels=r["kernels"])
            print(f"H={H:<5} {name:<28} {r['us']:8.2f} us  {1.5 * nbytes / r['us'] / 1e3:7.1f} GB/s  {r['kernels']}",
                  flush=True)
        if a.bwd_sweep:
            saved = rn._bwd_config
            hp = 1 << (H - 1).bit_length()
            for br in (1, 2, 4, 8):
                for nw in (4, 8, 16):
                    if not (512 <= br * hp <= 16384 and br * hp >= 256 * nw):
                        continue
                    rn._bwd_config = lambda n_rows, hidden, br=br, nw=nw: (hp, br, nw)
                    try:
                        r = per_call(lambda _, x, w: rn._triton_bwd(x, w, x, None, 1e-6, False), dummy, sets)
                        res[f"bwd rows={br} warps={nw}"] = dict(us=r["us"], gb_s=1.5 * nbytes / r["us"] / 1e3)
                        print(f"H={H:<5} bwd rows={br} warps={nw:<14} {r['us']:8.2f} us  "
                              f"{1.5 * nbytes / r['us'] / 1e3:7.1f} GB/s  {r['kernels']}", flush=True)
                    except Exception as e:  # noqa: BLE001
                        print(f"H={H} bwd rows={br} warps={nw} FAILED {str(e)[:200]}")
                    finally:
                        rn._bwd_config = saved
        if not a.no_sweep:
            saved = rn._config
            hp = 1 << (H - 1).bit_length()
            for br in (1, 2, 4, 8, 16):
                for nw in (2, 4, 8, 16):
                    if not (1024 <= br * hp <= 32768 and br * hp >= 256 * nw):
                        continue
                    rn._config = lambda n_rows, hidden, br=br, nw=nw: (hp, br, nw)
                    try:
                        jax_row(f"ours rows={br} warps={nw}",
                                lambda x, w: rn._triton_fwd(x, w, None, 1e-6, False)[0])
                    except Exception as e:  # noqa: BLE001
                        print(f"H={H} rows={br} warps={nw} FAILED {str(e)[:200]}")
                    finally:
                        rn._config = saved
        nxt, tw = torch_rms_inputs(T, H, nrot)
        comp = torch.compile(torch_rms_naive)
        for name, fn in (("torch F.rms_norm", lambda: F.rms_norm(nxt(), (H,), tw, 1e-6)),
                         ("torch.compile", lambda: comp(nxt(), tw)),
                         ("torch copy", lambda: nxt().mul(1.5))):
            us = torch_per_call(fn)
            res[name] = dict(us=us, gb_s=nbytes / us / 1e3)
            print(f"H={H:<5} {name:<28} {us:8.2f} us  {nbytes / us / 1e3:7.1f} GB/s", flush=True)
        del nxt
        torch.cuda.empty_cache()
        out["results"][H] = res
        with open(a.out, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
