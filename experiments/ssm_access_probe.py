"""How fast the chunked selective-scan forward's memory access pattern alone can run (issue 6 diagnostic).

A Pallas Triton kernel with the forward's grid (batch, 1, dim / block_d), its tiles ([scan_chunk, block_d] rows of
u, delta, z; [scan_chunk, dstate] rows of B, C) and its software pipeline (rows loaded `ahead` chunks ahead), but no
scan: out = u * delta + z + <B, C>.  Its kernel time against a copy of the same bytes says whether the access
pattern (block_d contiguous values per row, rows D apart) or the scan's math sets the forward's time.
    PYTHONPATH=. python3 experiments/ssm_access_probe.py            # GPU only (CUPTI kernel times)
Writes $OUT/ssm_access_probe.json.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import sys

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

import kernel_times as kt  # noqa: E402

K = importlib.import_module("kernels.selective_scan")
# (chunk steps T, block_d, warps, chunks loaded ahead).  The first is the forward's own pattern; the others ask
# whether more bytes in flight per program (loads further ahead, longer chunks) or wider rows speed it up.
VARIANTS = ((8, 16, 1, 2), (8, 16, 1, 3), (8, 16, 1, 4), (16, 16, 1, 2), (16, 16, 1, 3), (8, 32, 1, 2),
            (8, 64, 2, 2), (8, 64, 2, 4))


def probe_kernel(u_ref, dt_ref, z_ref, b_ref, c_ref, o_ref, *, T, BD, L, ahead=2):
    from jax.experimental import pallas as pl

    b, j = pl.program_id(0), pl.program_id(2)
    dsl = pl.ds(pl.multiple_of(j * BD, BD), BD)
    nch = L // T

    def load(c):
        tsl = pl.ds(pl.multiple_of(jnp.minimum(c, nch - 1) * T, T), T)
        return (u_ref[b, tsl, dsl].astype(jnp.float32), dt_ref[b, tsl, dsl].astype(jnp.float32),
                z_ref[b, tsl, dsl].astype(jnp.float32), b_ref[b, tsl, 0, :].astype(jnp.float32),
                c_ref[b, tsl, 0, :].astype(jnp.float32))

    def trip(c, carry):  # carry: the rows of chunks c .. c + ahead - 1
        cur, rest = carry[0], carry[1:]
        new = load(c + ahead)
        u, dt, z, bt, ct = cur
        y = u * dt + z + jnp.sum(bt * ct, axis=1)[:, None]
        o_ref[b, pl.ds(pl.multiple_of(c * T, T), T), dsl] = y.astype(o_ref.dtype)
        return (*rest, new)

    lax.fori_loop(0, nch, trip, tuple(load(k) for k in range(ahead)))


def main():
    from jax.experimental import pallas as pl

    b, l, d, n = 8, 4096, 2048, 16
    res = []
    for dn in ("float32", "bfloat16"):
        dt_ = jnp.dtype(dn)
        r = np.random.default_rng(0)
        f = lambda *s: jnp.asarray(r.standard_normal(s), jnp.float32).astype(dt_)  # noqa: E731
        u, dl, z, B, C = f(b, l, d), f(b, l, d), f(b, l, d), f(b, l, 1, n), f(b, l, 1, n)
        x = f(b * l * d * 2)
        cp = kt.kernel_table(jax.jit(lambda x: x + 1), [x], iters=20)["kernel_us_per_iter"]
        copy_gbs = 2 * x.size * dt_.itemsize / cp / 1e3
        nbytes = K.copy_bytes(b, l, d, n, 1, dt_.itemsize, True, False)
        for T, bd, nw, ahead in VARIANTS:
            call = pl.pallas_call(functools.partial(probe_kernel, T=T, BD=bd, L=l, ahead=ahead),
                                  out_shape=jax.ShapeDtypeStruct((b, l, d), dt_), grid=(b, 1, d // bd),
                                  compiler_params=K._compiler_params(nw, 1), name="ssm_access_probe")
            fn = jax.jit(call)
            got = np.asarray(fn(u, dl, z, B, C), np.float32)
            ref = np.asarray(u.astype(jnp.float32) * dl + z + jnp.sum(B * C, axis=3), np.float32)
            err = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
            us = kt.kernel_table(fn, [u, dl, z, B, C], iters=20)["kernel_us_per_iter"]
            row = dict(dtype=dn, chunk=T, block_d=bd, num_warps=nw, ahead=ahead, us=us, gbs=nbytes / us / 1e3,
                       copy_gbs=copy_gbs, pct_copy=100 * nbytes / us / 1e3 / copy_gbs, err=err)
            res.append(row)
            print(json.dumps(row), flush=True)
    out = os.path.join(os.environ.get("OUT", "."), "ssm_access_probe.json")
    with open(out, "w") as fh:
        json.dump(dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, rows=res), fh, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()
