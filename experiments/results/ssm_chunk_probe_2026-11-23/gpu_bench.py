import sys, os, json, time, traceback
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE), os.path.dirname(os.path.dirname(HERE))]
import jax, jax.numpy as jnp
import numpy as np
import kernel_times as kt
import proto
import importlib; ks = importlib.import_module("kernels.selective_scan")

print(jax.__version__, jax.devices()[0].device_kind, flush=True)
Bsz, L, D, N = 8, 4096, 2048, 16
variants = json.loads(sys.argv[1])
dtypes = sys.argv[2].split(",") if len(sys.argv) > 2 else ["float32"]
res = []
for dn in dtypes:
    dtype = jnp.dtype(dn)
    k = jax.random.split(jax.random.PRNGKey(0), 5)
    dt = (jax.nn.softplus(jax.random.normal(k[0], (Bsz, L, D))) * 0.1).astype(dtype)
    u = jax.random.normal(k[1], (Bsz, L, D)).astype(dtype)
    A = -jnp.exp(jax.random.normal(k[2], (D, N)) * 0.5)
    B = jax.random.normal(k[3], (Bsz, L, 1, N)).astype(dtype)
    C = jax.random.normal(k[4], (Bsz, L, 1, N)).astype(dtype)
    nbytes = 3 * Bsz * L * D * dtype.itemsize + 2 * Bsz * L * N * dtype.itemsize
    x = jax.random.normal(k[0], (Bsz * L * D * 3 // 2,), jnp.float32).astype(dtype)
    cp = kt.kernel_table(jax.jit(lambda x: x + 1), [x], iters=20)["kernel_us_per_iter"]
    copy_gbs = 2 * x.size * dtype.itemsize / cp / 1e3
    print(f"{dn} copy {cp:.1f} us {copy_gbs:.0f} GB/s (scan bytes {nbytes/1e6:.0f} MB)", flush=True)
    old = jax.jit(lambda *a: ks.selective_scan_triton(*a))
    ref_y, ref_h = old(u, dt, A, B, C)
    for v in [dict(name="old")] + variants:
        try:
            if v.get("name") == "old":
                f, args = old, (u, dt, A, B, C)
            else:
                kw = {k2: v2 for k2, v2 in v.items() if k2 != "name"}
                ns = kw.pop("ns", 1)
                f = jax.jit(lambda dt, u, A, B, C, kw=kw, ns=ns: proto.scan(dt, u, A, B, C, ns=ns, **kw))
                args = (dt, u, A, B, C)
            y, h = f(*args)
            err = float(jnp.abs(y.astype(jnp.float32) - ref_y.astype(jnp.float32)).max() / jnp.abs(ref_y.astype(jnp.float32)).max())
            errh = float(jnp.abs(h - ref_h).max() / jnp.abs(ref_h).max())
            tab = kt.kernel_table(f, args, iters=20)
            us = tab["kernel_us_per_iter"]
            r = dict(dtype=dn, v=v, us=us, gbs=nbytes / us / 1e3, pct_copy=nbytes / us / 1e3 / copy_gbs, err=err, errh=errh,
                     wall=tab["wall_us_per_iter"])
        except Exception as e:
            r = dict(dtype=dn, v=v, error=repr(e)[:400])
            traceback.print_exc()
        print(json.dumps(r), flush=True)
        res.append(r)
os.makedirs(os.environ.get("OUT", "/tmp"), exist_ok=True)
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "cs.json"), "w"), indent=1)
