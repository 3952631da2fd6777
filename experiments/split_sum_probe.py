"""How fast can the int4 GEMV's k-split partials be summed?  Per-call GPU time (CUPTI) of the XLA sum the
library runs ([splits, m, 4, words] f32 -> [m, 4 * words] bf16, with the byte/word interleave), the same sum
without the interleave ([splits, m, n]), a row reduction ([m, n, splits]), and a Pallas Triton sum kernel
(column blocks x all splits, the interleave in its store) at several block sizes.  Inputs rotate over enough
sets that the L2 serves none of them.

    PYTHONPATH=. python3 experiments/split_sum_probe.py --out $OUT/split_sum.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pallas_sum(parts, n, bw, warps):
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    s, m, _, nw = parts.shape

    def kernel(p_ref, o_ref):
        j = pl.program_id(0)
        wc = j * bw + jnp.arange(bw)
        ok = wc < nw
        for r in range(m):
            t = plt.load(p_ref.at[jnp.arange(s)[:, None, None], r, jnp.arange(4)[None, :, None], wc[None, None, :]],
                         mask=ok[None, None, :], other=0.0)
            y = jnp.sum(t, axis=0)
            cols = 4 * wc[None, :] + jnp.arange(4)[:, None]
            plt.store(o_ref.at[r, cols], y.astype(o_ref.dtype), mask=cols < n)

    cls = getattr(plt, "CompilerParams", None) or getattr(plt, "TritonCompilerParams")
    return pl.pallas_call(kernel, grid=(pl.cdiv(nw, bw),), in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
                          out_specs=pl.BlockSpec(memory_space=pl.ANY),
                          out_shape=jax.ShapeDtypeStruct((m, n), jnp.bfloat16),
                          compiler_params=cls(num_warps=warps, num_stages=1))(parts)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "split_sum.json"))
    a = ap.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from experiments.kernel_times import per_call

    out = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, date=time.strftime("%Y-%m-%d"), rows=[])
    for s, n in ((32, 14336), (112, 4096), (64, 14336)):
        nw = n // 4
        sets = [(jax.random.normal(jax.random.PRNGKey(i), (s, 1, 4, nw), jnp.float32),) for i in range(64)]
        ref = np.asarray(jnp.sum(sets[0][0], axis=0).transpose(0, 2, 1).reshape(1, n))
        # "plain" and "rows" read the same bytes in another layout: timing only, so no error for them
        cands = {
            "xla interleave (library)": lambda p: jnp.sum(p, axis=0).transpose(0, 2, 1).reshape(1, -1).astype(jnp.bfloat16),
            "xla plain [s, m, n]": lambda p: jnp.sum(p.reshape(s, 1, n), axis=0).astype(jnp.bfloat16),
            "xla rows [m, n, s]": lambda p: jnp.sum(p.reshape(1, n, s), axis=-1).astype(jnp.bfloat16),
        }
        for bw, warps in ((16, 1), (32, 1), (32, 2), (64, 2), (64, 4), (128, 4)):
            cands[f"pallas bw{bw} w{warps}"] = functools.partial(pallas_sum, n=n, bw=bw, warps=warps)
        for name, f in cands.items():
            try:
                r = per_call(lambda _, p, f=f: f(p), jnp.zeros(()), sets[1:])
                got = np.asarray(jax.jit(f)(sets[0][0]).astype(jnp.float32))
                err = float(np.abs(got - ref).max() / np.abs(ref).max()) if "interleave" in name or "pallas" in name else None
                row = dict(splits=s, n=n, name=name, us=r["us"], kernels=r["kernels"], err=err)
            except Exception as e:  # noqa: BLE001
                row = dict(splits=s, n=n, name=name, error=f"{type(e).__name__}: {str(e)[:200]}")
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
    with open(a.out, "w") as fh:
        json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
