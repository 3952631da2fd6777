"""Generation speed: iva-jax vs transformers `generate` on the same GPU, same weights, same run.

SmolLM2-135M shape (Llama, 30 layers, hidden 576, GQA 9/3, vocab 49152), bf16, random weights (speed
does not depend on the values; the embedded GGUF is not needed), prompt 128 random tokens, 256 new
tokens, greedy, EOS disabled so every run generates all 256.

    python experiments/bench_generate.py --batches 1 32 --reps 3 --variants auto auto_nofuse xla xla_nofuse

Reports prefill tokens/s, end-to-end new tokens/s (prefill included, as transformers is timed) and
decode-only tokens/s, each the median of --reps timed runs after warm-up, plus transformers'
dynamic-cache and static-cache (compiled) generate.  Variants: `auto` / `xla` (kernel dispatch), `_unroll`
(layers unrolled), `_nofuse` (decode on the plain params, not `Transformer.decode_view`).  Also checks greedy
agreement of the first tokens with transformers and between a variant and its `_nofuse` twin (bf16, so late
divergence is expected).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from iva_jax.inference import KVCache, generate  # noqa: E402
from torch_bridge import load_pretrained  # noqa: E402

SMOL = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=8192, rope_theta=100000.0)


def median_time(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def bench_iva(path, batches, prompt, new, reps, overrides, tag, fuse=True):
    model, params = load_pretrained(path, dtype=jnp.bfloat16, **overrides)
    out = {}

    @jax.jit
    def prefill(params, ids):
        cache = KVCache.init(model.config, ids.shape[0], ids.shape[1] + new)
        logits, cache = model.apply({"params": params}, ids, cache=cache, last_logits_only=True)
        return logits, cache

    for b in batches:
        ids = jnp.asarray(np.random.default_rng(b).integers(0, SMOL["vocab_size"], (b, prompt)), jnp.int32)
        jax.block_until_ready(prefill(params, ids))
        t_pre = median_time(lambda: jax.block_until_ready(prefill(params, ids)), reps * 4)
        run = lambda: jax.block_until_ready(generate(model, params, ids, new, eos_token_id=[],  # noqa: E731
                                                     fuse_projections=fuse))
        toks = np.asarray(run())
        t_gen = median_time(run, reps)
        out[f"{tag}_bs{b}"] = dict(prefill_tok_s=b * prompt / t_pre, new_tok_s=b * new / t_gen,
                                   decode_tok_s=b * (new - 1) / max(t_gen - t_pre, 1e-9), t_gen_s=t_gen,
                                   t_prefill_s=t_pre)
        out[f"{tag}_bs{b}"]["first_tokens"] = toks[0, :32].tolist()
        print(f"iva-jax [{tag}] bs{b}: prefill {b * prompt / t_pre:,.0f} tok/s | generate {b * new / t_gen:,.1f} "
              f"new tok/s | decode-only {b * (new - 1) / (t_gen - t_pre):,.1f} tok/s", flush=True)
    return out, model.config


def bench_hf(path, batches, prompt, new, reps, dynamic: bool):
    import torch
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    out = {}
    for b in batches:
        ids = torch.tensor(np.random.default_rng(b).integers(0, SMOL["vocab_size"], (b, prompt)), device="cuda")
        kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)

        def timed(**extra):
            def f():
                with torch.no_grad():
                    r = m.generate(ids, **kw, **extra)
                torch.cuda.synchronize()
                return r
            f()  # warm-up / compile
            f()
            return f, median_time(f, reps)

        if dynamic:
            _, t = timed()
            out[f"hf_dynamic_bs{b}"] = dict(new_tok_s=b * new / t)
            print(f"transformers dynamic cache bs{b}: {b * new / t:,.1f} new tok/s", flush=True)
        f, t = timed(cache_implementation="static")
        toks = f()[:, prompt:].cpu().numpy()
        out[f"hf_static_bs{b}"] = dict(new_tok_s=b * new / t, first_tokens=toks[0, :32].tolist())
        print(f"transformers static cache (compiled) bs{b}: {b * new / t:,.1f} new tok/s", flush=True)
    del m
    torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--hf-dynamic", action="store_true", help="also time the (slow) dynamic-cache generate")
    ap.add_argument("--variants", nargs="+", default=["auto", "auto_nofuse"],
                    help="iva-jax settings to time: a base impl, auto (kernels dispatcher) or xla (attn/norm/mlp "
                         "impl), plus optional suffixes _unroll (layers unrolled) and _nofuse (decode on the plain "
                         "params instead of the fused decode view), e.g. xla xla_nofuse auto auto_nofuse xla_unroll")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_generate.json"))
    args = ap.parse_args()

    import torch
    import transformers

    torch.manual_seed(0)
    d = tempfile.mkdtemp()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOL)).to(torch.bfloat16)
    hf.save_pretrained(d)
    del hf
    res = {"device": str(jax.devices()[0].device_kind), "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__, "torch": torch.__version__,
           "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d"),
           "shape": dict(SMOL, prompt=args.prompt, new=args.new, dtype="bfloat16")}
    for v in args.variants:
        base, *mods = v.split("_")
        if base not in ("auto", "xla") or set(mods) - {"unroll", "nofuse"}:
            ap.error(f"variant {v!r}: expected auto|xla with optional _unroll / _nofuse")
        ov = dict(attn_impl="xla", norm_impl="xla", mlp_impl="xla") if base == "xla" else {}
        if "unroll" in mods:
            ov["scan_unroll"] = SMOL["num_hidden_layers"]
        r, _ = bench_iva(d, args.batches, args.prompt, args.new, args.reps, ov, v, fuse="nofuse" not in mods)
        res.update(r)
    if not args.no_hf:
        res.update(bench_hf(d, args.batches, args.prompt, args.new, args.reps, args.hf_dynamic))
    print("\n| batch | iva-jax variant | prefill tok/s | generate new tok/s | decode-only tok/s | HF static new tok/s | ratio |")
    print("|---|---|---|---|---|---|---|")
    first = lambda a, h: next((i for i, (x, y) in enumerate(zip(a, h)) if x != y), len(a))  # noqa: E731
    for b in args.batches:
        hf_s = res.get(f"hf_static_bs{b}", {}).get("new_tok_s", float("nan"))
        for v in args.variants:
            r = res[f"{v}_bs{b}"]
            agree = ""
            if f"hf_static_bs{b}" in res:
                n = first(r["first_tokens"], res[f"hf_static_bs{b}"]["first_tokens"])
                agree = f" (greedy tokens agree with HF for the first {n}/32"
                other = v.replace("_nofuse", "") if "nofuse" in v else None
                if other in args.variants:
                    agree += f", with {other} for {first(r['first_tokens'], res[f'{other}_bs{b}']['first_tokens'])}/32"
                agree += ")"
            print(f"| {b} | {v} | {r['prefill_tok_s']:,.0f} | {r['new_tok_s']:,.1f} | {r['decode_tok_s']:,.1f} | "
                  f"{hf_s:,.1f} | {r['new_tok_s'] / hf_s:.2f}x{agree} |")
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
