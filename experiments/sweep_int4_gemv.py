"""Sweep the int4 GEMV's tiling on the GPU: per-call kernel time (CUPTI, over rotating weight sets of >= 400 MB
so the L2 serves none of them) against the bf16 GEMM, with each config's error against the f32 product of the
dequantized weights.  A config is a dict of `kernels.quant_matmul.Int4Blocks` overrides.

    PYTHONPATH=. python3 experiments/sweep_int4_gemv.py --out $OUT/int4_gemv_sweep.json
    PYTHONPATH=. python3 experiments/sweep_int4_gemv.py --configs '[{"unroll": 8, "parts": 2}]' --shapes 4096x14336 --rows 1,2
    PYTHONPATH=. python3 experiments/sweep_int4_gemv.py --parity --configs '[{}, {"idot": false}]'
`--parity`: instead of timing, each config's f32 output against the f32 reference on small odd shapes (groups
32-256, partial word blocks, bf16 / f16 activations, M 1 / 2, with and without zero points, a NaN row), and
the same bits over 5 calls.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# the f32 GEMV's own knobs (bf16 activations take the integer-dot GEMV unless idot=False): words per one-warp
# program, packed rows per step, programs per group, prefetch
DEFAULT_CONFIGS = [dict(idot=False, words=w, unroll=u, parts=p, prefetch=f)
                   for w in (64, 128) for u in (2, 4, 8) for p in (1, 2, 4) for f in (True, False) if u * p <= 64]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default=None, help="JSON list of Int4Blocks overrides (default: the built-in grid)")
    ap.add_argument("--shapes", default="4096x14336", help="KxN list, comma-separated")
    ap.add_argument("--rows", default="1", help="activation rows M, comma-separated")
    ap.add_argument("--sym", action="store_true", help="symmetric codes (default: with zero points, the library default)")
    ap.add_argument("--parity", action="store_true", help="check values (f32 out) instead of timing")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "int4_gemv_sweep.json"))
    a = ap.parse_args()
    if a.parity:
        return parity(json.loads(a.configs) if a.configs else [{}])

    import jax
    import jax.numpy as jnp
    import numpy as np

    from experiments.kernel_times import per_call
    from iva_jax import quant
    from kernels import quant_matmul as qm

    configs = json.loads(a.configs) if a.configs else DEFAULT_CONFIGS
    out = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, date=time.strftime("%Y-%m-%d"),
               sym=a.sym, results=[])
    t0 = time.time()
    for shape in a.shapes.split(","):
        k, n = map(int, shape.split("x"))
        w = jax.random.normal(jax.random.PRNGKey(0), (k, n), jnp.float32) * 0.02
        nset = lambda b: max(2, int(-(-400e6 // (k * n * b))))  # noqa: E731
        wb = [((w * (1 + 0.01 * i)).astype(jnp.bfloat16),) for i in range(nset(2))]
        q4 = [quant.quantize_groupwise(w * (1 + 0.01 * i), bits=4, group_size=128, symmetric=a.sym)
              for i in range(nset(0.5))]
        for m in map(int, a.rows.split(",")):
            x = jax.random.normal(jax.random.PRNGKey(m), (m, k), jnp.bfloat16)
            ref = np.asarray(qm.reference(x.astype(jnp.float32), *q4[0], bits=4, group_size=128))
            bf = per_call(lambda x, w: x @ w, x, wb)
            print(f"== {k}->{n} M{m}: bf16 {bf['us']:.1f} us", flush=True)
            for cfg in configs:
                blk = qm.QuantBlocks(int4=qm.Int4Blocks(**cfg))
                row = dict(shape=shape, m=m, cfg=cfg, bf16_us=bf["us"],
                           plan=qm.plan(m, k, n, 128, blk, bits=4, x_dtype=x.dtype))
                try:
                    f = lambda x, c, s, z, blk=blk: qm.quant_matmul(x, c, s, z, bits=4, group_size=128,  # noqa: E731
                                                                    impl="triton", blocks=blk)
                    got = np.asarray(jax.jit(f)(x, *q4[0]).astype(jnp.float32))
                    row["err"] = float(np.abs(got - ref).max() / np.abs(ref).max())
                    r = per_call(f, x, q4)
                    row.update(us=r["us"], kernels=r["kernels"], x_bf16=bf["us"] / r["us"])
                    print(f"  {json.dumps(cfg):<80} {r['us']:6.1f} us  {row['x_bf16']:.2f}x  err {row['err']:.1e}  "
                          f"splits {row['plan']['splits']}  {r['kernels']}", flush=True)
                except Exception as e:  # noqa: BLE001 - a config that fails to compile is a result, not a stop
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    print(f"  {json.dumps(cfg):<80} FAILED {row['error'][:200]}", flush=True)
                out["results"].append(row)
                with open(a.out, "w") as fh:
                    json.dump(out, fh, indent=1)
    print(f"done in {time.time() - t0:.0f} s")
    return 0


def parity(configs: list[dict], tol: float = 2e-4) -> int:
    """Each config against `qm.reference` (f32) with f32 output: max |err| / max |ref| <= tol, NaN rows stay NaN,
    the same bits over 5 calls.  Each line names the plan's path (and groups per program for the idot GEMV)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from iva_jax import quant
    from kernels import quant_matmul as qm

    fails = 0
    cases = [(576, 1536, 64), (576, 1000, 64), (320, 130, 32), (1024, 520, 256), (4096, 14336, 128), (14336, 4096, 128)]
    for ci, (k, n, g) in enumerate(cases):
        w = jax.random.normal(jax.random.PRNGKey(ci), (k, n), jnp.float32) * 0.05
        for sym in (False, True):
            codes = quant.quantize_groupwise(w, bits=4, group_size=g, symmetric=sym)
            for m, dt in ((1, jnp.bfloat16), (2, jnp.float16)):
                x = (jax.random.normal(jax.random.PRNGKey(100 + m), (m, k), jnp.float32) * 3).astype(dt)
                ref = np.asarray(qm.reference(x.astype(jnp.float32), *codes, bits=4, group_size=g))
                for cfg in configs:
                    blk = qm.QuantBlocks(int4=qm.Int4Blocks(**cfg))
                    f = jax.jit(lambda x, c, s, z, blk=blk, g=g: qm.quant_matmul(
                        x, c, s, z, bits=4, group_size=g, impl="triton", blocks=blk, out_dtype=jnp.float32))
                    name = f"{k}->{n} g{g} {'sym' if sym else 'asym'} M{m} {jnp.dtype(dt).name} {json.dumps(cfg)}"
                    try:
                        got = np.asarray(f(x, *codes))
                        err = float(np.abs(got - ref).max() / np.abs(ref).max())
                        nan_ok = True
                        if m == 2:  # a NaN in row 1: row 1 all NaN, row 0 unchanged
                            got2 = np.asarray(f(x.at[1, k // 3].set(jnp.nan), *codes))
                            nan_ok = bool(np.isnan(got2[1]).all() and np.array_equal(got2[0], got[0]))
                        # the same bits on every call (every sum runs in a fixed order)
                        same = all(np.array_equal(np.asarray(f(x, *codes)), got) for _ in range(4))
                        ok = err <= tol and nan_ok and same
                        p = qm.plan(m, k, n, g, blk, bits=4, x_dtype=dt)
                        path = p["path"] + (f" gw {p['gw']}" if "gw" in p else "")
                        print(f"{'PASS' if ok else 'FAIL'} {name} [{path}] err {err:.2e} nan_ok {nan_ok} "
                              f"repeatable {same}", flush=True)
                    except Exception as e:  # noqa: BLE001
                        ok = False
                        print(f"FAIL {name} {type(e).__name__}: {str(e)[:300]}", flush=True)
                    fails += not ok
    print(f"parity: {fails} failed")
    return int(fails > 0)


if __name__ == "__main__":
    sys.exit(main())
