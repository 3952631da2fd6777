"""Count the ops one decode step launches per decoder layer (SmolLM2 shape), from the optimized HLO.

    PYTHONPATH=. python3 experiments/decode_hlo_report.py [--impl xla|auto] [--unroll] [--fuse on|off|both]
        [--batch 1] [--dtype bfloat16] [--param-dtype bfloat16|float32] [--detail] [--json out.json] [--dump h.txt]

The step is the one `generate` runs inside its while loop (`iva_jax.inference.generate._decode`, greedy) on
the decode view (`Transformer.decode_view`, built once outside the step) or on the plain params.  Launching
ops are every HLO instruction of a computation that runs as its own kernel or library call (fusion, dot,
custom-call, copy, dynamic-update-slice, ...); instructions inside fusions, parameters, tuples,
get-tuple-element, constants and bitcasts are not.  Per layer = (ops(L layers) - ops(2 layers)) / (L - 2),
with loop bodies counted once per trip, so rolled and unrolled layer stacks compare.  The counts come from
the backend this runs on (CPU here: a proxy; GPU fusion decisions differ).  `--detail` lists the rolled layer
body's ops with the jax op that produced each.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from iva_jax.config import ModelConfig  # noqa: E402
from iva_jax.inference import KVCache  # noqa: E402
from iva_jax.inference.generate import _decode, decode_view  # noqa: E402
from iva_jax.inference.sampling import SamplingConfig  # noqa: E402
from iva_jax.models.transformer import Transformer  # noqa: E402

NOT_LAUNCHED = {"parameter", "get-tuple-element", "constant", "tuple", "bitcast", "after-all", "opt-barrier",
                "partition-id", "replica-id"}
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s+(ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([a-z][a-z0-9\-]*)\((.*)$")


def parse_hlo(text: str):
    """{computation: [(opcode, instruction line)]}, the entry computation's name."""
    comps, entry, cur = {}, None, None
    for line in text.split("\n"):
        h = _HEADER.match(line)
        if h and not line.startswith(" "):
            cur = h.group(2)
            comps[cur] = []
            if h.group(1):
                entry = cur
            continue
        if line.startswith("}"):
            cur = None
            continue
        m = _INSTR.match(line) if cur else None
        if m:
            comps[cur].append((m.group(3), line))
    return comps, entry


def _kind(op: str, line: str) -> str:
    if op == "custom-call":
        tgt = re.search(r'custom_call_target="([^"]+)"', line)
        return f"custom-call:{tgt.group(1) if tgt else '?'}"
    return op


def launch_counts(comps, name: str, mult: int = 1, out=None) -> collections.Counter:
    """Launching ops of computation `name`, loop bodies counted once per known trip."""
    out = collections.Counter() if out is None else out
    for op, line in comps[name]:
        if op in NOT_LAUNCHED:
            continue
        if op == "while":
            body = re.search(r"body=%?([\w.\-]+)", line).group(1)
            trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            launch_counts(comps, body, mult * (int(trip.group(1)) if trip else 1), out)
            continue
        if op in ("call", "conditional"):
            for callee in re.findall(r"(?:to_apply|branch_computations=\{|calls)=?%?([\w.\-]+)", line):
                if callee in comps:
                    launch_counts(comps, callee, mult, out)
            continue
        out[_kind(op, line)] += mult
    return out


def layer_body(comps, entry):
    """The while body with the most dots / custom calls (the layer scan), or None when unrolled."""
    best, score = None, 0
    for op, line in comps[entry]:
        if op == "while":
            body = re.search(r"body=%?([\w.\-]+)", line).group(1)
            s = sum(o in ("dot", "custom-call", "fusion") for o, _ in comps[body])
            if s > score:
                best, score = body, s
    return best


def compile_step(layers: int, args, fuse: bool) -> str:
    c = ModelConfig.from_yaml("configs/model_dense.yaml", num_hidden_layers=layers, attn_impl=args.impl,
                              norm_impl=args.impl, mlp_impl=args.impl, param_dtype=args.param_dtype, dtype=args.dtype,
                              scan_unroll=layers if args.unroll else 1)
    model = Transformer(c)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"])
    import flax.linen as nn

    params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, args.param_dtype), nn.meta.unbox(shapes))
    model, params = decode_view(model, params, args.batch, fuse)  # once, outside the step, as generate does
    cache = KVCache.init(c, args.batch, args.cache_len)
    greedy = SamplingConfig(temperature=0.0)

    def step(params, tok, rng, cache):
        return _decode(model, params, tok, rng, cache, None, greedy)[:2]

    tok = jnp.zeros((args.batch,), jnp.int32)
    return jax.jit(step, donate_argnums=(3,)).lower(params, tok, jax.random.PRNGKey(0), cache).compile().as_text()


def report(args, fuse: bool) -> dict:
    hlo = compile_step(args.layers, args, fuse)
    if args.dump:
        open(args.dump.replace(".txt", f"_{'fused' if fuse else 'unfused'}.txt"), "w").write(hlo)
    comps, entry = parse_hlo(hlo)
    full = launch_counts(comps, entry)
    comps2, entry2 = parse_hlo(compile_step(2, args, fuse))
    two = launch_counts(comps2, entry2)
    per_layer = {k: (full[k] - two[k]) / (args.layers - 2) for k in sorted(set(full) | set(two))}
    per_layer = {k: v for k, v in per_layer.items() if v}
    total = sum(full.values())
    n_layer = sum(per_layer.values())
    res = dict(fuse=fuse, impl=args.impl, unroll=args.unroll, batch=args.batch, param_dtype=args.param_dtype,
               dtype=args.dtype,
               layers=args.layers, per_layer=per_layer, per_layer_total=n_layer, step_total=total,
               outside_layers=total - n_layer * args.layers, backend=jax.default_backend())
    body = layer_body(comps, entry)
    if args.detail and body:
        res["layer_body"] = []
        for op, line in comps[body]:
            if op in NOT_LAUNCHED or op == "while":
                continue
            name = re.search(r'op_name="([^"]+)"', line)
            src = name.group(1).split("closed_call/")[-1] if name else ""
            shape = line.split("=", 1)[1].strip().split(" ")[0]
            res["layer_body"].append(f"{_kind(op, line):28s} {shape:28s} {src}")
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", default="xla")
    ap.add_argument("--unroll", action="store_true")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--cache-len", type=int, default=384)
    ap.add_argument("--param-dtype", default="bfloat16", help="bfloat16 (as load_pretrained(dtype=bf16)) or float32")
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype (float32 avoids the CPU's bf16->f32 weight "
                                                        "converts that a GPU does not have)")
    ap.add_argument("--fuse", choices=("on", "off", "both"), default="both", help="decode view or plain params")
    ap.add_argument("--detail", action="store_true", help="list the layer-loop body's ops")
    ap.add_argument("--dump", default=None, help="write the optimized HLO here (suffixed _fused / _unfused)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.layers < 3:
        ap.error("--layers must be >= 3 (per-layer counts difference against 2 layers)")
    runs = [report(args, f) for f in {"on": [True], "off": [False], "both": [False, True]}[args.fuse]]
    for r in runs:
        print(f"\n== {'decode view (fused)' if r['fuse'] else 'plain params'}: impl={r['impl']} unroll={r['unroll']} "
              f"batch={r['batch']} dtype={r['dtype']} param_dtype={r['param_dtype']} backend={r['backend']}")
        for k, v in r["per_layer"].items():
            print(f"  per layer  {k:40s} {v:g}")
        print(f"  per layer total {r['per_layer_total']:g}; whole step {r['step_total']} "
              f"({r['outside_layers']:g} outside the layers)")
        for line in r.get("layer_body", []):
            print("    " + line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
