"""Selective scan at kernel time (CUPTI), with Mamba's features (z gate, D, delta_bias, softplus), B8 L4096 D2048 N16.

For f32 and bf16: each config's forward and forward+backward kernel time (the forward's share of the latter is
the checkpoint-saving forward), the forward's effective bandwidth (`kernels.selective_scan.copy_bytes`) as a
share of a copy (`x + 1`, timed the same way), and its output's difference from the first config's.
    python experiments/ssm_kernel_times.py                       # the chunked default vs the per-step forward
    python experiments/ssm_kernel_times.py '{"bd8": {"block_d": 8}}'   # extra ScanBlockConfig overrides by name
    ('"_fb": false' in a config's overrides times its forward only)
Writes $OUT/ssm_kernel_times.json (GPU only: kernel times come from torch's CUDA profiler).
"""
import importlib
import json
import os
import sys

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import kernel_times as kt  # noqa: E402

K = importlib.import_module("kernels.selective_scan")
b, l, d, n = 8, 4096, 2048, 16
cfgs = {"chunked (default)": {}}
if not os.environ.get("SSM_KT_NO_PER_STEP"):  # set: skip the per-step forward (saves its compiles)
    cfgs["per-step (prefetch, chunk 4)"] = dict(scan_chunk=0)
cfgs.update(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})
res = []
for dn in ("float32", "bfloat16"):
    dt_ = jnp.dtype(dn)
    r = np.random.default_rng(0)
    f = lambda *s: jnp.asarray(r.standard_normal(s), jnp.float32)
    a = dict(u=f(b, l, d).astype(dt_), delta=(f(b, l, d) * 0.5).astype(dt_), A=-jnp.exp(f(d, n) * 0.5),
             B=f(b, l, 1, n).astype(dt_), C=f(b, l, 1, n).astype(dt_), D=f(d), z=f(b, l, d).astype(dt_),
             delta_bias=f(d) * 0.3 - 3.0)
    nbytes = K.copy_bytes(b, l, d, n, 1, dt_.itemsize, True, False)
    x = f(b * l * d * 2).astype(dt_)
    cp = kt.kernel_table(jax.jit(lambda x: x + 1), [x], iters=20)["kernel_us_per_iter"]
    copy_gbs = 2 * x.size * dt_.itemsize / cp / 1e3
    ct = f(b, l, d)
    ref = None
    for name, kw in cfgs.items():
        kw = dict(kw)
        with_fb = kw.pop("_fb", True)  # "_fb": false times the forward only
        cfg = K.ScanBlockConfig(**kw)
        fwd = jax.jit(lambda a, cfg=cfg: K.selective_scan_triton(**a, delta_softplus=True, config=cfg)[0])
        loss = lambda a, cfg=cfg: jnp.sum(K.selective_scan_triton(**a, delta_softplus=True, config=cfg)[0].astype(jnp.float32) * ct)
        fb = jax.jit(jax.grad(loss))
        out = fwd(a).astype(jnp.float32)
        ref = out if ref is None else ref
        err = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
        tf = kt.kernel_table(fwd, [a], iters=20)
        tb = kt.kernel_table(fb, [a], iters=10) if with_fb else dict(kernel_us_per_iter=None, rows=[])
        row = dict(dtype=dn, config=name, kw=kw, fwd_us=tf["kernel_us_per_iter"], fwd_wall_us=tf["wall_us_per_iter"],
                   fwd_gbs=nbytes / tf["kernel_us_per_iter"] / 1e3, copy_gbs=copy_gbs,
                   pct_copy=100 * nbytes / tf["kernel_us_per_iter"] / 1e3 / copy_gbs,
                   fb_us=tb["kernel_us_per_iter"], fb_kernels=[(x["name"][:40], round(x["us_per_iter"], 1)) for x in tb["rows"][:4]],
                   err_vs_default=err)
        print(json.dumps(row), flush=True)
        res.append(row)
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "ssm_kernel_times.json"), "w"), indent=1)
