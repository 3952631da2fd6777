"""Count the kernels one decode step launches (SmolLM2 shape), from the optimized HLO of the jitted step.

    PYTHONPATH=. python3 experiments/decode_hlo_report.py [--impl xla|auto] [--unroll]

Prints the number of fusions, library calls (cuBLAS / custom calls) and other thunks in the entry
computation and in loop bodies, to see where batch-1 decode time (launch-bound) goes.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from iva_jax.config import ModelConfig  # noqa: E402
from iva_jax.inference import KVCache  # noqa: E402
from iva_jax.models.transformer import Transformer  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", default="xla")
    ap.add_argument("--unroll", action="store_true")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--dump", default=None, help="write the optimized HLO text here")
    args = ap.parse_args()
    c = ModelConfig.from_yaml("configs/model_dense.yaml", num_hidden_layers=args.layers, attn_impl=args.impl,
                              norm_impl=args.impl, mlp_impl=args.impl,
                              scan_unroll=args.layers if args.unroll else 1)
    model = Transformer(c)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    import flax.linen as nn

    params = nn.meta.unbox(params)
    params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, jnp.bfloat16), params)
    cache = KVCache.init(c, 1, 384, jnp.bfloat16)

    def step(params, tok, cache):
        logits, cache = model.apply({"params": params}, tok, jnp.ones_like(tok), cache=cache)
        return jnp.argmax(logits[:, -1], -1), cache

    tok = jnp.zeros((1, 1), jnp.int32)
    hlo = jax.jit(step).lower(params, tok, cache).compile().as_text()
    if args.dump:
        open(args.dump, "w").write(hlo)
    counts = collections.Counter()
    comp = None
    for line in hlo.split("\n"):
        if line.endswith("{") and (line.startswith("%") or line.startswith("ENTRY")):
            name = line.split(" ")[1 if line.startswith("ENTRY") else 0].lstrip("%")
            # fused / reducer / wrapped computations run inside one kernel; only count launching ones
            comp = None if re.match(r"(fused_|wrapped_|region_|add|max|min|.*_computation)", name) else name
            continue
        if comp is None:
            continue
        m = re.search(r"=\s*\S+\s+(fusion|custom-call|while|conditional|dynamic-update-slice|copy|dot|"
                      r"convolution|gather|scatter|sort|reduce)\(", line)
        if m:
            op = m.group(1)
            if op == "custom-call":
                tgt = re.search(r'custom_call_target="([^"]+)"', line)
                op = f"custom-call:{tgt.group(1) if tgt else '?'}"
            counts[(comp[:50], op)] += 1
    total = 0
    for (name, op), n in sorted(counts.items()):
        print(f"{name:50s} {op:45s} {n}")
        total += n
    print(f"total launching ops: {total} (a rolled loop body runs once per layer); impl={args.impl} "
          f"unroll={args.unroll}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
