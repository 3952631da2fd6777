"""How fast can a kernel only *read* the int4 weights of a decode GEMV (no decode, no math)?  Separates the memory
side of the int4 GEMV from its compute: per-call GPU time (CUPTI, rotating sets of >= 400 MB so the L2 serves
none) of streaming the 29.4 MB int32 word matrix [K/2, N/4] of a 4096 -> 14336 layer:

  xla_rows / xla_cols   XLA reductions over the matrix (its own streaming kernels)
  strip                 the GEMV's access pattern: program = 1 warp x (128 words wide, 32 rows), loads
                        [4, 128] per step with the next step prefetched, rows 14336 B apart
  tiled                 the same programs, but each program's 16 KB is contiguous (a pre-tiled layout)
  tiled_wide            contiguous per program, 4 warps x 64 KB per program

    PYTHONPATH=. python3 experiments/int4_stream_probe.py --out $OUT/int4_stream_probe.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=14336)
    ap.add_argument("--interpret", action="store_true", help="CPU smoke test: each kernel's sum of the words against XLA's")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "int4_stream_probe.json"))
    a = ap.parse_args()

    import jax
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    from experiments.kernel_times import per_call
    from kernels.quant_matmul import _compiler_params

    rows, words = a.k // 2, a.n // 4
    nbytes = rows * words * 4
    nsets = max(2, int(-(-400e6 // nbytes)))
    sets = [(jax.random.randint(jax.random.PRNGKey(i), (rows, words), -2**31, 2**31 - 1, jnp.int32),)
            for i in range(nsets)]
    x = jnp.zeros((1,), jnp.float32)  # unused (per_call's signature)
    anyspec = pl.BlockSpec(memory_space=pl.ANY)

    def stream_sum(w_ref, r0, nrows, cols, unroll):
        """Sum of rows [r0, r0 + nrows) of w_ref at `cols`: [unroll, len(cols)] per step, next step prefetched."""
        def load(t):
            rr = jnp.minimum(r0 + t * unroll + jnp.arange(unroll), r0 + nrows - 1)
            return plt.load(w_ref.at[rr[:, None], cols[None, :]])

        def step(t, c):
            acc, wn = c
            cur, wn = wn, load(t + 1)
            return acc + cur, wn

        acc, _ = lax.fori_loop(0, nrows // unroll, step, (jnp.zeros((unroll, cols.shape[0]), jnp.int32), load(0)))
        return jnp.sum(acc, axis=0)

    def strip(w, *, bw=128, plen=32, unroll=4):
        """Program (j, s): words [j*bw, (j+1)*bw), rows [s*plen, (s+1)*plen); one warp."""
        def kernel(w_ref, o_ref):
            j, s = pl.program_id(0), pl.program_id(1)
            wc = j * bw + jnp.arange(bw)
            plt.store(o_ref.at[s, wc], stream_sum(w_ref, s * plen, plen, wc, unroll))
        return pl.pallas_call(kernel, grid=(words // bw, rows // plen), in_specs=[anyspec], out_specs=anyspec,
                              out_shape=jax.ShapeDtypeStruct((rows // plen, words), jnp.int32),
                              compiler_params=_compiler_params(1, 1), name="probe_strip", interpret=a.interpret)(w)

    def tiled(w, *, chunk=16384, warps=1, unroll=4, lane_words=128):
        """Program p reads bytes [p*chunk, (p+1)*chunk) of the matrix, contiguous: [unroll, lane_words] per step."""
        flat = w.reshape(-1, lane_words)  # [rows*words/lane_words, lane_words], a free view
        per = chunk // (4 * lane_words)  # rows of `flat` per program
        nprog = flat.shape[0] // per

        def kernel(w_ref, o_ref):
            p = pl.program_id(0)
            cols = jnp.arange(lane_words)
            plt.store(o_ref.at[p, cols], stream_sum(w_ref, p * per, per, cols, unroll))
        return pl.pallas_call(kernel, grid=(nprog,), in_specs=[anyspec], out_specs=anyspec,
                              out_shape=jax.ShapeDtypeStruct((nprog, lane_words), jnp.int32),
                              compiler_params=_compiler_params(warps, 1), name="probe_tiled",
                              interpret=a.interpret)(flat)

    cases = {
        "xla_rows": lambda x, w: jnp.sum(w, axis=1),
        "xla_cols": lambda x, w: jnp.sum(w, axis=0),
        "strip_128x32": lambda x, w: strip(w),
        "strip_128x64": lambda x, w: strip(w, plen=64),
        "strip_64x32_u8": lambda x, w: strip(w, bw=64, unroll=8),
        "tiled_16k": lambda x, w: tiled(w),
        "tiled_16k_u8": lambda x, w: tiled(w, unroll=8),
        "tiled_8k": lambda x, w: tiled(w, chunk=8192),
        "tiled_64k_4w": lambda x, w: tiled(w, chunk=65536, warps=4, unroll=16),
        "tiled_32k_4w": lambda x, w: tiled(w, chunk=32768, warps=4, unroll=8, lane_words=256),
    }
    out = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, date=time.strftime("%Y-%m-%d"),
               bytes=nbytes, sets=nsets, rows={})
    if a.interpret:  # every kernel reads every word once: its outputs sum (mod 2^32) to the matrix's sum
        w = sets[0][0]
        want = jax.device_get(jnp.sum(w))
        for name, fn in cases.items():
            if not name.startswith("xla"):
                got = jax.device_get(jnp.sum(fn(x, w)))
                print(name, "ok" if got == want else f"MISMATCH {got} != {want}")
        return 0
    for name, fn in cases.items():
        try:
            r = per_call(fn, x, sets)
            out["rows"][name] = dict(us=r["us"], tb_s=nbytes / r["us"] / 1e6, kernels=r["kernels"])
            print(f"{name:<16} {r['us']:7.2f} us  {nbytes / r['us'] / 1e6:5.2f} TB/s  {r['kernels']}", flush=True)
        except Exception as e:  # noqa: BLE001
            out["rows"][name] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
            print(f"{name:<16} FAILED {str(e)[:200]}", flush=True)
        with open(a.out, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
