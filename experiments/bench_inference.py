"""Inference efficiency (issue 9), all measured in one run on one device.

  check    the decode-attention and quant-matmul Pallas kernels vs their references on this device
           (dense / paged bf16 / paged fp8, split-K; int4 / int8, sym / asym): PASS lines are what
           flipping `_GPU_VALIDATED` in kernels/decode_attention.py and kernels/quant_matmul.py needs.
  e2e      SmolLM2-135M shape (random bf16 weights), prompt 128, 256 new greedy tokens, batch 1 / 16 / 64:
           dense KV (XLA attention; Pallas dense decode kernel), paged KV (XLA; Pallas paged kernel; fp8
           KV), int4 weights + paged kernel, vs transformers' generate with a static cache (compiled).
           new tok/s = batch x new / wall time of the whole generate call (prefill included, as
           transformers is timed); decode tok/s = batch x (new - 1) / (that time - prefill time).
  memory   32k context, batch 1: KV bytes of the dense cache (preallocated to max length), the paged
           cache (pages for the tokens held) in bf16 and fp8, and device bytes in use with the cache
           alive; ms per decode step at 32k with each cache (cache filled with random K/V: no prefill).
  quant    int4 / int8 group-128 dequant-matmul vs the bf16 matmul at decode shapes (M = 1, 16, 64;
           576 -> 1536, 4096 -> 4096, 4096 -> 14336): Pallas kernel (and a block sweep at M = 1) and
           XLA, GB/s of the bytes each reads; goal int4 >= 2.5x bf16 at M = 1.
  decode   paged decode kernel at B16 Hq32 Hkv8 8k D128 bf16 (and B1 32k): GB/s of K+V read, as a
           fraction of the copy bandwidth measured in the same run (goal >= 85%), vs torch SDPA over
           the dense cache (anchor: 2813 GB/s on the H100), with a (block_k, splits, warps, stages) sweep.

Median of --reps timed runs after warm-up; random inputs; markdown table on stdout, JSON to --out.
--tiny runs everything at toy shapes on any device (CPU: Pallas in interpret mode, no torch GPU rows).

    PYTHONPATH=. python3 experiments/bench_inference.py --out $OUT/bench_inference.json
    PYTHONPATH=. python3 experiments/bench_inference.py --tiny          # CPU smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch
os.environ.setdefault("IVA_KERNELS_ALLOW_UNVALIDATED", "1")  # this script is the kernels' GPU check

import flax.linen as nn  # noqa: E402
import benchlib  # noqa: E402  (experiments/benchlib.py, beside this script)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from iva_jax import quant  # noqa: E402
from iva_jax.config import ModelConfig  # noqa: E402
from iva_jax.inference import KVCache, generate  # noqa: E402
from iva_jax.inference.paged import PagedKVCache, generate_paged  # noqa: E402
from iva_jax.models.transformer import Transformer  # noqa: E402
from kernels import decode_attention as da  # noqa: E402
from kernels import dispatch  # noqa: E402
from kernels import quant_matmul as qm  # noqa: E402

SMOL = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, head_dim=64, tie_word_embeddings=True, max_position_embeddings=65536,
            rope_theta=100000.0, rms_norm_eps=1e-5)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=4096)
RES: dict = {"rows": [], "errors": []}
ON_GPU = dispatch.device_info().platform == "cuda"


def median_ms(fn, reps: int, warm: int = 1) -> float:
    for _ in range(warm):
        jax.block_until_ready(fn())
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def kernel_ms(fn, arg_sets, reps: int, inner: int = 5) -> float:
    """Median ms per call of back-to-back async calls (rotating argument sets to defeat the L2)."""
    return benchlib.async_ms(fn, arg_sets, reps, inner)


def torch_ms(fn) -> float:
    return benchlib.torch_ms(fn)


def row(section: str, name: str, **vals) -> dict:
    r = dict(section=section, name=name, **vals)
    RES["rows"].append(r)
    shown = "  ".join(f"{k}={v:,.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in vals.items())
    print(f"{section:<8} {name:<58} {shown}", flush=True)
    return r


def guard(label: str, f):
    return benchlib.guard(label, f, lambda msg: RES["errors"].append(dict(name=label, error=msg)))


def rotations(nbytes: int, total: float = 400e6) -> int:
    """Distinct input sets whose bytes exceed `total` (defeats the 50 MB L2; 2 off the GPU)."""
    return benchlib.rotations(nbytes, total) if ON_GPU else 2


def kernel_impl() -> str:
    """'triton' where the Pallas kernels can run (GPU, or interpret mode on CPU)."""
    return "triton"


INTERPRET = not ON_GPU  # Pallas on CPU only runs in interpret mode


# ------------------------------------------------------------------------------------------------ check

def check_kernels(tiny: bool) -> None:
    rng = np.random.default_rng(0)
    shapes = [(3, 9, 3, 64, 16, 40, 100), (2, 32, 8, 128, 64, 130, 300)] if not tiny else [(3, 6, 2, 40, 8, 13, 29)]
    for b, hq, hkv, d, ps, npg, s in shapes:
        maxp = -(-s // ps)
        pool = max(npg, b * maxp)
        kp = jnp.asarray(rng.standard_normal((2, pool, ps, hkv, d)), jnp.bfloat16)
        vp = jnp.asarray(rng.standard_normal((2, pool, ps, hkv, d)), jnp.bfloat16)
        q = jnp.asarray(rng.standard_normal((b, hq, d)), jnp.bfloat16)
        table = jnp.asarray(rng.permutation(pool)[: b * maxp].reshape(b, maxp), jnp.int32)
        lengths = jnp.asarray(rng.integers(0, s + 1, b), jnp.int32).at[0].set(s)
        starts = jnp.asarray(rng.integers(0, 5, b), jnp.int32)
        ks = jnp.asarray(rng.uniform(0.5, 2, (2, pool, ps, hkv)), jnp.float32)
        kp8, vp8 = kp.astype(jnp.float8_e4m3fn), vp.astype(jnp.float8_e4m3fn)
        for splits in (1, 3):
            blk = da.DecodeBlocks(num_splits=splits)
            for label, args, kw in (("paged bf16", (q, kp, vp, table, lengths), {}),
                                    ("paged fp8", (q, kp8, vp8, table, lengths), dict(k_scale=ks, v_scale=ks))):
                def run(args=args, kw=kw, blk=blk):
                    ref = da.reference_paged(*[a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a for a in args],
                                             starts=starts, layer=1, **kw)
                    out = jax.jit(lambda *a: da.paged_decode_attention(
                        *a, starts=starts, layer=1, impl=kernel_impl(), interpret=INTERPRET, blocks=blk, **kw))(*args)
                    return float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))
                name = f"decode {label} B{b} Hq{hq} Hkv{hkv} D{d} ps{ps} splits{splits}"
                err = guard(name, run)
                if err is not None:
                    row("check", name, rel_err=err, ok="PASS" if err < 2e-2 else "FAIL")
        kd = jnp.asarray(rng.standard_normal((2, b, s, hkv, d)), jnp.bfloat16)
        valid = jnp.asarray(rng.random((b, s)) > 0.1)

        def dense():
            ref = da.reference_dense(q.astype(jnp.float32), kd.astype(jnp.float32), kd.astype(jnp.float32), lengths,
                                     starts=starts, kv_valid=valid, layer=1)
            out = jax.jit(lambda q, k: da.decode_attention(q, k, k, lengths, starts=starts, kv_valid=valid, layer=1,
                                                           impl=kernel_impl(), interpret=INTERPRET))(q, kd)
            return float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))
        name = f"decode dense B{b} Hq{hq} Hkv{hkv} D{d} S{s}"
        err = guard(name, dense)
        if err is not None:
            row("check", name, rel_err=err, ok="PASS" if err < 2e-2 else "FAIL")
    # int4: word GEMV at M = 1, 2, tl.dot on words at 7, 16; N = 1000: a partial last block of words
    for (k, n), bits, sym in [((576, 1536) if not tiny else (128, 72), b, s_) for b, s_ in
                              ((4, False), (4, True), (8, True), (8, False))] + ([((576, 1000), 4, False)] if not tiny else []):
        w = jnp.asarray(rng.standard_normal((k, n)) * 0.05, jnp.float32)
        for m in ((1, 2, 7, 16) if not tiny else (3,)):  # the kernel serves decode rows (<= 16)
            x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
            codes, scale, zero = quant.quantize_groupwise(w, bits=bits, group_size=64, symmetric=sym)

            def run(x=x, codes=codes, scale=scale, zero=zero, bits=bits):
                ref = qm.reference(x.astype(jnp.float32), codes, scale, zero, bits=bits, group_size=64)
                out = jax.jit(lambda x: qm.quant_matmul(x, codes, scale, zero, bits=bits, group_size=64,
                                                        impl=kernel_impl(), interpret=INTERPRET))(x)
                return float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))
            name = f"quant int{bits} {'sym' if sym else 'asym'} M{m} {k}->{n} g64"
            err = guard(name, run)
            if err is not None:
                row("check", name, rel_err=err, ok="PASS" if err < 1e-2 else "FAIL")


# ------------------------------------------------------------------------------------------------ e2e

def e2e(cfg: dict, path: str, batches, prompt: int, new: int, reps: int, tiny: bool) -> None:
    from torch_bridge import load_pretrained

    # XLA ops everywhere (bench_generate's fastest decode setting) unless a variant says otherwise
    model, params = load_pretrained(path, dtype=jnp.bfloat16, attn_impl="xla", norm_impl="xla", mlp_impl="xla")
    kmodel = Transformer(model.config.replace(attn_impl=kernel_impl())) if ON_GPU else None
    _, q4 = quant.quantize(model, params, "int4", 64)  # impl auto: Pallas for <= 64 rows where validated/allowed
    variants = [
        ("dense KV, XLA attention", lambda ids: generate(model, params, ids, new, eos_token_id=[])),
        ("paged KV, XLA attention", lambda ids: generate_paged(model, params, ids, new, eos_token_id=[],
                                                               kernel_impl="xla", page_size=16)),
        ("paged KV, Pallas kernel", lambda ids: generate_paged(model, params, ids, new, eos_token_id=[],
                                                               kernel_impl=kernel_impl(), interpret=INTERPRET,
                                                               page_size=16)),
        ("paged fp8 KV, Pallas kernel", lambda ids: generate_paged(model, params, ids, new, eos_token_id=[],
                                                                   kernel_impl=kernel_impl(), interpret=INTERPRET,
                                                                   page_size=16, kv_dtype="fp8")),
        ("int4 g64 weights, paged KV, Pallas kernels", lambda ids: generate_paged(
            model, q4, ids, new, eos_token_id=[], kernel_impl=kernel_impl(), interpret=INTERPRET, page_size=16)),
    ]
    if kmodel is not None:
        variants.insert(1, ("dense KV, Pallas dense decode kernel",
                            lambda ids: generate(kmodel, params, ids, new, eos_token_id=[])))

    @jax.jit
    def prefill(params, ids):
        cache = KVCache.init(model.config, ids.shape[0], ids.shape[1] + new)
        return model.apply({"params": params}, ids, cache=cache, last_logits_only=True)

    for b in batches:
        ids = jnp.asarray(np.random.default_rng(b).integers(0, cfg["vocab_size"], (b, prompt)), jnp.int32)
        t_pre = guard(f"prefill bs{b}", lambda: median_ms(lambda: prefill(params, ids), reps * 2))
        first = None
        for name, fn in variants:
            def run(fn=fn):
                toks = np.asarray(fn(ids))
                return median_ms(lambda: fn(ids), reps), toks
            r = guard(f"e2e {name} bs{b}", run)
            if r is None:
                continue
            ms, toks = r
            first = toks if first is None else first
            agree = int(next((i for i, (x, y) in enumerate(zip(toks[0], first[0])) if x != y), toks.shape[1]))
            row("e2e", f"bs{b} {name}", new_tok_s=b * new / ms * 1e3,
                decode_tok_s=b * (new - 1) / max(ms - (t_pre or 0), 1e-6) * 1e3, ms=ms,
                tokens_equal_dense=agree)


def e2e_hf(cfg: dict, path: str, batches, prompt: int, new: int, reps: int) -> None:
    import torch
    import transformers

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(dev).eval()
    for b in batches:
        ids = torch.tensor(np.random.default_rng(b).integers(0, cfg["vocab_size"], (b, prompt)), device=dev)
        kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0,
                  cache_implementation="static")

        def f():
            with torch.no_grad():
                r = m.generate(ids, **kw)
            if dev == "cuda":
                torch.cuda.synchronize()
            return r

        def run():
            f()
            f()  # warm-up / compile
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                f()
                ts.append((time.perf_counter() - t) * 1e3)
            return statistics.median(ts)
        ms = guard(f"transformers static bs{b}", run)
        if ms is not None:
            row("e2e", f"bs{b} transformers generate, static cache", new_tok_s=b * new / ms * 1e3, ms=ms)
    m = None  # free the GPU memory before torch empties its cache
    if dev == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ memory

def device_bytes() -> float:
    stats = jax.devices()[0].memory_stats() or {}
    return float(stats.get("bytes_in_use", float("nan")))


def memory(cfg: dict, ctx: int, steps: int, reps: int) -> None:
    c = ModelConfig(**cfg, dtype="bfloat16", param_dtype="bfloat16")
    model = Transformer(c)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"])
    ps = 64
    base = device_bytes()

    def loop(cache):
        def body(_, carry):
            tok, cache = carry
            logits, cache = model.apply({"params": params}, tok[:, None], cache=cache)
            return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache
        return jax.lax.fori_loop(0, steps, body, (jnp.zeros((1,), jnp.int32), cache))

    def fill(shape, dtype, key):
        return (jax.random.normal(key, shape, jnp.float32) * 0.5).astype(dtype)

    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    held = ctx - steps
    variants = []
    dense_shape = (c.num_hidden_layers, 1, ctx, c.num_key_value_heads, c.resolved_head_dim)
    variants.append((f"dense KV bf16 (preallocated to {ctx})", lambda: KVCache(
        k=fill(dense_shape, jnp.bfloat16, k1), v=fill(dense_shape, jnp.bfloat16, k2),
        valid=jnp.arange(ctx)[None] < held, index=jnp.asarray(held, jnp.int32), next_pos=jnp.full((1,), held))))
    for kvd in ("bfloat16", "fp8"):
        for impl in ("xla", kernel_impl()):
            def mk(kvd=kvd, impl=impl):
                cache = PagedKVCache.init(c, 1, -(-ctx // ps), page_size=ps, kv_dtype=kvd, kernel_impl=impl,
                                          interpret=INTERPRET)
                k_pages = fill(cache.k_pages.shape, cache.k_pages.dtype, k1)
                v_pages = fill(cache.v_pages.shape, cache.v_pages.dtype, k2)
                return cache.replace(k_pages=k_pages, v_pages=v_pages, lengths=jnp.full((1,), held, jnp.int32),
                                     next_pos=jnp.full((1,), held, jnp.int32))
            variants.append((f"paged KV {kvd} ({impl})", mk))
    for name, mk in variants:
        def run(mk=mk):
            cache = mk()
            jax.block_until_ready(cache)
            nbytes = sum(int(a.size * a.dtype.itemsize) for a in jax.tree_util.tree_leaves(cache))
            in_use = device_bytes() - base
            f = jax.jit(loop)
            ms = median_ms(lambda: f(cache), reps)
            return nbytes, in_use, ms
        r = guard(f"memory {name}", run)
        if r is not None:
            row("memory", f"ctx {ctx} {name}", kv_mib=r[0] / 2 ** 20, device_mib=r[1] / 2 ** 20,
                ms_per_token=r[2] / steps)
    # what paging buys: KV for a 1k-token sequence next to a 32k-capable slot
    per_tok = 2 * c.num_hidden_layers * c.num_key_value_heads * c.resolved_head_dim * 2
    row("memory", f"KV bytes for a 1k-token sequence: dense slot sized {ctx} vs paged",
        dense_mib=per_tok * ctx / 2 ** 20, paged_bf16_mib=per_tok * 1024 / 2 ** 20,
        paged_fp8_mib=per_tok * 1024 / 2 / 2 ** 20 * (1 + 4 / c.resolved_head_dim))


# ------------------------------------------------------------------------------------------------ quant matmul

def loop_ms(op, x, wsets, reps: int, calls: int = 96) -> float:
    """Kernel time of op(x, *w): ms per call of ~`calls` calls inside ONE jit (a fori_loop whose every
    step calls op once per weight set of `wsets`, distinct buffers >= 400 MB in all so the L2 never
    serves them).  Each step's x depends on the previous step's outputs (x + eps * sum(outputs), eps a
    runtime 0), so XLA can neither hoist nor drop a call; one host sync per `calls` calls, so launch
    and dispatch overhead (~0.06 ms per jit call on the H100) is out of the figure."""
    nw = len(wsets)
    iters = max(2, -(-calls // nw))

    @jax.jit
    def many(x, wsets, eps):
        def body(_, x):
            tot = sum(op(x, *w).astype(jnp.float32) for w in wsets)  # one fused add+reduce per step
            return x + (eps * jnp.sum(tot)).astype(x.dtype)
        return jax.lax.fori_loop(0, iters, body, x)

    eps = jnp.zeros((), jnp.float32)
    return median_ms(lambda: many(x, wsets, eps), reps, warm=2) / (iters * nw)


def torch_graph_ms(calls) -> float:
    """ms per call of the torch callables `calls` (one per weight set), captured together in a CUDA graph."""
    import torch
    import triton.testing

    def fn():
        for c in calls:
            c()
    torch.cuda.synchronize()
    bench = getattr(triton.testing, "do_bench_cudagraph", None)
    if bench is None:
        return torch_ms(fn) / len(calls)
    return float(bench(fn, rep=100, return_mode="median")) / len(calls)


def _sweep_space(m: int) -> dict:
    """QuantBlocks values tried by the sweep, one field at a time (coordinate descent from the default)."""
    if not ON_GPU:  # CPU smoke test of the sweep machinery (interpret mode is slow)
        return dict(block_n=(32, 64))
    space = dict(block_n=(32, 64, 128, 256), num_splits=(None, 1, 2, 4, 8, 16), block_k=(128, 256, 512, 1024),
                 num_warps=(1, 2, 4, 8), num_stages=(1, 2, 3, 4))
    if m > 1:
        space["dot_rows"] = (0, 4, m)  # tl.dot tiles vs the multiply-reduce GEMV at these rows
    return space


def quant_bench(shapes, ms_rows, reps: int, sweep: bool, sweep_shape=None,
                sweep_cases=((4, 1), (4, 16), (8, 1), (8, 16))) -> None:
    """int4 / int8 quant matmul vs the bf16 matmul (XLA, torch) at decode shapes, kernel time (`loop_ms`);
    with `sweep`, a coordinate-descent search over QuantBlocks at M = 1 and 16 on `sweep_shape`."""
    best_cfg = RES.setdefault("quant_best_blocks", {})
    for k, n in shapes:
        group = 128 if k % 128 == 0 else 64
        w = (jax.random.normal(jax.random.PRNGKey(k + n), (k, n)) * 0.02).astype(jnp.float32)
        nrot = rotations(k * n * 2)
        wb = [(w * (1 + 0.01 * i)).astype(jnp.bfloat16) for i in range(nrot)]
        packed = {}
        for bits in (4, 8):
            nb = rotations(k * n * bits // 8)  # int4 weights are 4x smaller: more sets to defeat the L2
            packed[bits] = [quant.quantize_groupwise((w * (1 + 0.01 * i)), bits=bits, group_size=group,
                                                     symmetric=bits == 8) for i in range(nb)]
        for m in ms_rows:
            x = jax.random.normal(jax.random.PRNGKey(m), (m, k), jnp.bfloat16)
            case = f"M{m} {k}->{n} g{group}"
            t_bf = guard(f"quant {case} bf16", lambda: loop_ms(lambda x, w: x @ w, x, [(wi,) for wi in wb], reps))
            if t_bf is not None:
                row("quant", f"{case} bf16 matmul (XLA)", ms=t_bf, gbs=k * n * 2 / t_bf / 1e6, M=m, impl="xla-bf16")
            if ON_GPU:
                def tmm():
                    import torch
                    tx = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                    tw = [torch.randn(k, n, device="cuda", dtype=torch.bfloat16) for _ in range(nrot)]
                    return torch_graph_ms([lambda wi=wi: tx @ wi for wi in tw])
                t = guard(f"quant {case} torch bf16", tmm)
                if t is not None:
                    row("quant", f"{case} torch bf16 matmul (CUDA graph)", ms=t, gbs=k * n * 2 / t / 1e6, M=m,
                        impl="torch-bf16", speedup_vs_bf16=(t_bf / t) if t_bf else float("nan"))
            for bits in (4, 8):
                c0, s0, z0 = packed[bits][0]
                nbytes = sum(int(a.size * a.dtype.itemsize) for a in (c0, s0, z0) if a is not None)

                def measure(impl, blk, bits=bits):
                    op = lambda x, c, s_, z: qm.quant_matmul(  # noqa: E731
                        x, c, s_, z, bits=bits, group_size=group, impl=impl, interpret=INTERPRET and impl != "xla",
                        blocks=blk)
                    return loop_ms(op, x, packed[bits], reps)

                def record(impl, blk, t, tag=""):
                    label = f"{case} int{bits} {impl}{tag}" + (f" {blk}" if blk != qm.QuantBlocks() else "")
                    row("quant", label, ms=t, gbs=nbytes / t / 1e6, speedup_vs_bf16=(t_bf / t) if t_bf else float("nan"),
                        bits=bits, M=m, impl=impl, blocks=str(blk),
                        plan=str(qm.plan(m, k, n, group, blk, bits=bits, x_dtype=x.dtype)) if impl != "xla" else "")
                for impl in ("xla", kernel_impl()):
                    t = guard(f"quant {case} int{bits} {impl}", lambda impl=impl: measure(impl, qm.QuantBlocks()))
                    if t is not None:
                        record(impl, qm.QuantBlocks(), t)
                if not (sweep and (k, n) == (sweep_shape or shapes[-1]) and (bits, m) in sweep_cases
                        and (ON_GPU or m == 1)):
                    continue
                cur, tried = qm.QuantBlocks(), {}
                for field, values in _sweep_space(m).items():
                    for v in values:
                        try:
                            blk = dataclasses.replace(cur, **{field: v})
                        except ValueError:
                            continue
                        if blk not in tried:
                            tried[blk] = guard(f"quant sweep {case} int{bits} {blk}",
                                               lambda blk=blk: measure(kernel_impl(), blk))
                            if tried[blk] is not None:
                                RES.setdefault("quant_sweep", []).append(dict(case=f"int{bits} {case}",
                                                                              blocks=str(blk), ms=tried[blk]))
                                print(f"quant sweep {case} int{bits} {blk}: {tried[blk]:.4f} ms", flush=True)
                    ok = {b_: t_ for b_, t_ in tried.items() if t_ is not None}
                    cur = min(ok, key=ok.get) if ok else cur
                if tried.get(cur) is not None:
                    record(kernel_impl(), cur, tried[cur], tag=" best of sweep")
                    best_cfg[f"int{bits} {case}"] = dict(blocks=dataclasses.asdict(cur), ms=tried[cur],
                                                         gbs=nbytes / tried[cur] / 1e6,
                                                         speedup_vs_bf16=(t_bf / tried[cur]) if t_bf else None,
                                                         configs_tried=len(tried))
                    print(f"quant sweep best int{bits} {case}: {cur} {tried[cur]:.4f} ms", flush=True)


# ------------------------------------------------------------------------------------------------ decode kernel

def compiled_impl(f, args) -> str:
    """'triton' when the compiled program of jitted `f` holds a Triton (Pallas) kernel, else 'xla' (what
    actually ran, whatever the dispatcher reported)."""
    if INTERPRET:
        return "interpret"
    try:
        text = f.lower(*args).as_text()
    except Exception as e:  # noqa: BLE001
        return f"unknown ({type(e).__name__})"
    return "triton" if ("__gpu$xla.gpu.triton" in text or "pallas_call" in text) else "xla"


def copy_bandwidth(reps: int, nbytes: int, timer: str = "async") -> float:
    """The copy (read + write) ceiling of this run, in GB/s, timed the way the decode rows are: "loop" =
    kernel time (jax: a fori_loop of x * c over a 1 GiB buffer, c a runtime scalar; torch: copies captured
    in a CUDA graph), "async" = back-to-back calls.  The higher of jax and torch is the ceiling."""
    timer = timer if ON_GPU else "async"
    x = jax.random.normal(jax.random.PRNGKey(5), (nbytes // 2,), jnp.bfloat16)
    nb = 2 * x.size * 2
    if timer == "loop":
        iters = 20

        @jax.jit
        def many(x, c):
            return jax.lax.fori_loop(0, iters, lambda i, x: x * c, x)
        c = jnp.asarray(1.0, jnp.bfloat16)
        ms = median_ms(lambda: many(x, c), reps, warm=2) / iters
    else:
        f = jax.jit(lambda x: x * jnp.bfloat16(1.0001))
        ms = kernel_ms(f, [(x,)], reps)
    gbs = nb / ms / 1e6
    row("decode", f"jax copy {nb / 2 ** 20:.0f} MiB (read+write, {timer})", ms=ms, gbs=gbs)
    try:
        import torch
        if torch.cuda.is_available():
            a = torch.randn(nbytes // 2, dtype=torch.bfloat16, device="cuda")
            bt = torch.empty_like(a)
            tms = torch_graph_ms([lambda: bt.copy_(a)] * 4) if timer == "loop" else torch_ms(lambda: bt.copy_(a))
            tg = 2 * a.numel() * 2 / tms / 1e6
            row("decode", f"torch copy (read+write, {'CUDA graph' if timer == 'loop' else 'do_bench'})", ms=tms, gbs=tg)
            gbs = max(gbs, tg)
    except ImportError:
        pass
    return gbs


def decode_bench(configs, reps: int, sweep: bool, copy_gbs: float, layouts=("dense", "paged"),
                 timer: str = "loop") -> None:
    """timer "loop": kernel time, ~96 decode steps inside one jit (each step's q depends on the last
    output, as in generation), torch in a CUDA graph; "async": back-to-back jit calls between host syncs
    (host dispatch included where a call is shorter than its dispatch)."""
    loop = timer == "loop" and ON_GPU
    timer = timer if ON_GPU else "async"

    def jax_ms(op, args):
        if loop:  # args: [(q, k, v)] per rotation; q is the loop-carried operand
            return loop_ms(op, args[0][0], [a[1:] for a in args], reps)
        return kernel_ms(jax.jit(op), args, reps)

    for b, hq, hkv, s, d in configs:
        case = f"B{b} Hq{hq} Hkv{hkv} L{s} D{d} bf16"
        kv_bytes = 2 * b * s * hkv * d * 2
        nrot = rotations(kv_bytes)
        keys = jax.random.split(jax.random.PRNGKey(s + b), 3 * nrot)
        qs = [jax.random.normal(keys[3 * i], (b, hq, d), jnp.bfloat16) for i in range(nrot)]
        ks = [jax.random.normal(keys[3 * i + 1], (b, s, hkv, d), jnp.bfloat16) for i in range(nrot)]
        vs = [jax.random.normal(keys[3 * i + 2], (b, s, hkv, d), jnp.bfloat16) for i in range(nrot)]
        lengths = jnp.full((b,), s, jnp.int32)
        page = 64 if s % 64 == 0 else 16
        npg = s // page
        perm = np.random.default_rng(0).permutation(b * npg)
        table = jnp.asarray(perm.reshape(b, npg), jnp.int32)
        inv = jnp.asarray(np.argsort(perm))
        pools = [(kk.reshape(b * npg, page, hkv, d)[inv], vv.reshape(b * npg, page, hkv, d)[inv])
                 for kk, vv in zip(ks, vs)]

        def rec(label, ms, **extra):
            gbs = kv_bytes / ms / 1e6
            row("decode", f"{case} {label}", ms=ms, gbs=gbs, pct_copy=100 * gbs / copy_gbs, **extra)

        jax.block_until_ready(pools)  # built before any timing starts
        blocks = [da.DecodeBlocks()]
        if sweep and ON_GPU:  # splits up to 128 for the short batch (32k cache, 8 kv heads: 8 programs per split)
            splits = (None, 1, 2, 4, 8) if b > 1 else (None, 8, 16, 32, 64, 128)
            blocks += [da.DecodeBlocks(block_k=bk, num_splits=sp, num_warps=nw, num_stages=st)
                       for bk in (32, 64, 128) for sp in splits for nw in (4, 8) for st in (2,)]
            blocks = list(dict.fromkeys(blocks))  # the default once
        runs = [("auto", da.DecodeBlocks()), ("xla", da.DecodeBlocks())] + [(kernel_impl(), blk) for blk in blocks]
        for impl, blk in runs:
            if impl == "auto" and not ON_GPU:
                continue  # CPU: auto is XLA (interpret mode is never automatic)
            tag = "" if blk == da.DecodeBlocks() else f" {blk}"
            dense_args, paged_args = list(zip(qs, ks, vs)), [(q, kp, vp) for q, (kp, vp) in zip(qs, pools)]
            kw = dict(impl=impl, interpret=INTERPRET and impl != "xla", blocks=blk)
            dense = lambda q, k, v, kw=kw: da.decode_attention(q, k, v, lengths, **kw)  # noqa: E731
            paged = lambda q, kp, vp, kw=kw: da.paged_decode_attention(q, kp, vp, table, lengths, **kw)  # noqa: E731
            for layout, op, args, label in (("dense", dense, dense_args, "dense"),
                                            ("paged", paged, paged_args, f"paged({page})")):
                if layout not in layouts:
                    continue
                t = guard(f"decode {case} {layout} {impl}{tag}", lambda op=op, args=args: jax_ms(op, args))
                if t is not None:
                    rec(f"{label} {impl}{tag}", t, impl=impl, layout=layout, blocks=str(blk), timer=timer,
                        compiled=compiled_impl(jax.jit(op), args[0]))
        pools = None
        if ON_GPU:
            def sdpa():
                import torch
                import torch.nn.functional as F
                tq = [torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16) for _ in range(nrot)]
                tk = [torch.randn(b, hkv, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(nrot)]
                tv = [torch.randn(b, hkv, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(nrot)]
                it = [0]

                def call():
                    it[0] += 1
                    i = it[0] % nrot
                    return F.scaled_dot_product_attention(tq[i], tk[i], tv[i], enable_gqa=True)
                if loop:  # kernel time, as the jax rows: the rotations captured in one CUDA graph
                    return torch_graph_ms([lambda i=i: F.scaled_dot_product_attention(
                        tq[i], tk[i], tv[i], enable_gqa=True) for i in range(nrot)])
                return torch_ms(call)
            t = guard(f"decode {case} torch sdpa", sdpa)
            if t is not None:
                rec("torch SDPA dense (anchor)", t, impl="torch", layout="dense")


# ------------------------------------------------------------------------------------------------ report

def summary() -> None:
    rows = RES["rows"]
    print("\n## bench_inference summary\n")
    print("| section | case | figures |\n|---|---|---|")
    for r in rows:
        figs = ", ".join(f"{k} {v:,.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                         if k not in ("section", "name", "blocks"))
        print(f"| {r['section']} | {r['name']} | {figs} |")
    goals = []
    for r in rows:
        if r["section"] == "quant" and r.get("M") == 1 and r.get("bits") == 4 and r.get("impl") != "xla":
            goals.append(("int4 vs bf16 at M=1 (goal >= 2.5x)", r["name"], r["speedup_vs_bf16"]))
        if r["section"] == "decode" and r.get("layout") == "paged" and r.get("impl") not in ("xla", "torch"):
            goals.append(("paged decode kernel % of copy (goal >= 85%)", r["name"], r["pct_copy"]))
    if goals:
        print("\n| goal | best case | value |\n|---|---|---|")
        for g in sorted({g[0] for g in goals}):
            best = max((x for x in goals if x[0] == g), key=lambda x: x[2])
            print(f"| {g} | {best[1]} | {best[2]:.2f} |")
    fails = [r["name"] for r in rows if r.get("ok") == "FAIL"]
    print(f"\nkernel check: {'ALL PASS' if not fails else 'FAIL: ' + ', '.join(fails)}"
          f"{' (with ' + str(len(RES['errors'])) + ' errors)' if RES['errors'] else ''}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="toy shapes on any device (CPU smoke test)")
    ap.add_argument("--only", default="check,e2e,memory,quant,decode")
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="block sweeps: quant matmul (M=1, 16) and decode kernel")
    ap.add_argument("--no-sweep", action="store_true", help="(default) no block sweeps")
    ap.add_argument("--quant-sweep-cases", default="4:1,4:16,8:1,8:16", help="bits:M pairs the quant sweep tunes")
    ap.add_argument("--decode-layouts", default="dense,paged", help="decode section: dense,paged")
    ap.add_argument("--timer", default="loop", choices=["loop", "async"],
                    help="decode section: kernel time in one jit (loop) or async jit calls")
    ap.add_argument("--quant-shapes", default=None,
                    help="KxN,... for the quant section (default 576x1536,4096x4096,14336x4096,4096x14336)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_inference.json"))
    args = ap.parse_args()

    def save() -> None:  # after every section: a run stopped by its time limit keeps what it measured
        with open(args.out, "w") as f:
            json.dump(RES, f, indent=1, default=str)

    only = set(args.only.split(","))
    tiny = args.tiny
    reps = args.reps or (2 if tiny else 7)
    cfg = TINY if tiny else SMOL
    RES.update(device=dispatch.device_info().kind, platform=dispatch.device_info().platform, jax=jax.__version__,
               date=time.strftime("%Y-%m-%d"), tiny=tiny, interpret=INTERPRET)
    print(f"device: {RES['device']} ({RES['platform']}), jax {jax.__version__}, interpret={INTERPRET}", flush=True)
    if "check" in only:
        check_kernels(tiny)
        save()
    if "e2e" in only:
        import torch
        import transformers

        torch.manual_seed(0)
        d = tempfile.mkdtemp()
        hfc = {k: v for k, v in cfg.items()}
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**hfc)).to(torch.bfloat16).save_pretrained(d)
        batches = args.batches or ([1, 2] if tiny else [1, 16, 64])
        prompt, new = (8, 8) if tiny else (128, 256)
        RES["torch"], RES["transformers"] = torch.__version__, transformers.__version__
        e2e(cfg, d, batches, prompt, new, reps, tiny)
        if not args.no_hf:
            e2e_hf(cfg, d, batches, prompt, new, reps)
        save()
    if "memory" in only:
        memory(cfg, 256 if tiny else 32768, 4 if tiny else 32, reps)
        save()
    if "quant" in only:
        shapes = [(128, 96)] if tiny else [(576, 1536), (4096, 4096), (14336, 4096), (4096, 14336)]
        if args.quant_shapes:
            shapes = [tuple(int(v) for v in kn.lower().split("x")) for kn in args.quant_shapes.split(",")]
        quant_bench(shapes, (1, 3) if tiny else (1, 16), reps, sweep=args.sweep and not args.no_sweep,
                    sweep_shape=shapes[-1] if (tiny or args.quant_shapes) else (4096, 14336),
                    sweep_cases=[tuple(int(v) for v in c.split(":")) for c in args.quant_sweep_cases.split(",")])
        save()
    if "decode" in only:
        copy = copy_bandwidth(reps, 2 ** 24 if tiny else 2 ** 30, timer=args.timer)
        configs = [(2, 4, 2, 96, 64)] if tiny else [(16, 32, 8, 8192, 128), (1, 32, 8, 32768, 128)]
        decode_bench(configs, reps, sweep=args.sweep and not args.no_sweep, copy_gbs=copy,
                     layouts=tuple(args.decode_layouts.split(",")), timer=args.timer)
    summary()
    with open(args.out, "w") as f:
        json.dump(RES, f, indent=1, default=str)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
