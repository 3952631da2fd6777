"""Issue 6 measurements: the selective-scan kernel against XLA scans and the copy bandwidth, and SSD TFLOP/s.

1. check   : the Pallas kernel vs the chunked XLA scan on the GPU (values and VJPs, f32 and bf16, grouped B/C,
             odd sizes; the default config and --check-configs): max |err| / max |ref| per output, PASS/FAIL
             against 2e-4 (f32) / 2.5e-2 (bf16).
2. copy    : jnp `x + 1` over 512 MiB bf16 (read + write): the bandwidth ceiling of this run.
3. scan    : batch 8, seqlen 4096, dim 2048, dstate 16 (Mamba's shape: z gate, D, delta_bias, softplus),
             f32 and bf16, forward and forward+backward: pallas (channels-last, as the Mamba block calls it),
             pallas through the mamba_ssm-layout API (adds the [b, d, l] transposes), lax.associative_scan,
             chunked, lax.scan.  GB/s = the minimum bytes (kernels.selective_scan.copy_bytes) / time.
4. ssd     : Mamba-2 chunked SSD at batch 8, seqlen 4096, 32 heads x 64, dstate 128, chunk 256, forward and
             forward+backward (f32 and bf16 matmul operands): TFLOP/s of its matmuls (mamba2.ssd_flops; x3 for
             forward+backward).
5. sweep   : (--sweep) kernel configs at the scan shape, bf16 (--sweep-dtypes) (`sweep_configs`, or --sweep-fwd /
             --sweep-bwd lists): forward (chunk, load schedule
             group_loads / prefetch, time_splits, block_d x num_warps) and forward+backward (backward knobs, and the
             forward options under gradients); each row with its max error vs the default config.
6. generate: greedy generation tokens/s of the hybrid (configs/model_hybrid.yaml scaled to ~230M params:
             [mamba, mamba, attention] x 4, hidden 1024, MoE on the Mamba layers) vs a same-size transformer
             (the same config with every mixer attention, dense FFN widened to match the parameter count within
             10%), bf16 weights and compute, batch 1 and 16, an 8k prompt prefilled in chunks through the cache,
             then 256 new tokens in one jitted loop.  Reports prefill and decode tokens/s, ms per decode step,
             and the decode state's bytes (KV of the attention layers + SSM states: `KVCache.nbytes`).

Median of timed runs after warm-up, random inputs.  Prints a table and writes JSON (--out).
    PYTHONPATH=. python3 experiments/bench_ssm.py --out bench_ssm.json [--sweep] [--skip-slow]
    PYTHONPATH=. python3 experiments/bench_ssm.py --only generate --out bench_ssm_generate.json
    PYTHONPATH=. python3 experiments/bench_ssm.py --tiny      # CPU smoke run (interpret-mode kernel)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
_SET_ALLOW = "IVA_KERNELS_ALLOW_UNVALIDATED" not in os.environ
os.environ.setdefault("IVA_KERNELS_ALLOW_UNVALIDATED", "1")  # this script is what validates the kernel

import numpy as np  # noqa: E402

import flax.linen as nn  # noqa: E402
import benchlib  # noqa: E402  (experiments/benchlib.py, beside this script)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import importlib  # noqa: E402

from iva_jax.config import ModelConfig  # noqa: E402
from iva_jax.inference import KVCache  # noqa: E402
from iva_jax.models.transformer import Transformer, layer_layout  # noqa: E402
from iva_jax.ssm import scan as S  # noqa: E402
from iva_jax.ssm.mamba2 import ssd_chunked, ssd_flops, ssd_sequential  # noqa: E402

K = importlib.import_module("kernels.selective_scan")  # the module (kernels/__init__ exports the function)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ROWS: list[dict] = []
ARGS = None


def row(group, name, ms=None, **extra):
    r = dict(group=group, name=name, ms=None if ms is None else round(ms, 4), **extra)
    ROWS.append(r)
    tail = " ".join(f"{k}={v}" for k, v in extra.items())
    print(f"{group:<7} {name:<58} {'' if ms is None else f'{ms:10.4f} ms'} {tail}", flush=True)
    return r


def guard(label, f):
    return benchlib.guard(label, f, lambda msg: ROWS.append(dict(group="error", name=label, error=msg)))


def time_jax(fn, args, reps=None, warm=2):
    """Median ms per call (each call synced: these ops run for milliseconds)."""
    reps = reps or ARGS.reps
    for _ in range(warm):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


# ---------------------------------------------------------------------------------------------
def scan_inputs(seed, b, l, d, n, g, dtype):
    """Channels-last inputs shaped like a Mamba layer's: dt bias = softplus^-1 of dt in [1e-3, 0.1]."""
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    dt0 = np.exp(rng.uniform(np.log(1e-3), np.log(0.1), d))
    act = lambda a: jnp.asarray(a, dtype)
    return dict(u=act(f(b, l, d)), delta=act(0.5 * f(b, l, d)),
                A=jnp.asarray(-np.arange(1, n + 1)[None] * rng.uniform(0.5, 1.5, (d, n)), jnp.float32),
                B=act(f(b, l, g, n)), C=act(f(b, l, g, n)), D=jnp.asarray(f(d), jnp.float32), z=act(f(b, l, d)),
                delta_bias=jnp.asarray(dt0 + np.log(-np.expm1(-dt0)), jnp.float32))


def scan_fn(impl, config=None, interpret=False, layout="bld"):
    """(fwd, fwd+bwd) jitted callables on the dict of channels-last inputs."""
    def run(a):
        if layout == "mamba":  # mamba_ssm layout: the API transposes in and out
            t = lambda x: jnp.swapaxes(x, 1, 2)
            bc = lambda x: jnp.transpose(x, (0, 2, 3, 1))
            out, last = S.selective_scan(t(a["u"]), t(a["delta"]), a["A"], bc(a["B"]), bc(a["C"]), a["D"], t(a["z"]),
                                         a["delta_bias"], True, True, impl=impl, interpret=interpret, config=config)
            return t(out), last
        return S.selective_scan_bld(**a, delta_softplus=True, impl=impl, interpret=interpret, config=config,
                                    chunk_size=64)

    fwd = jax.jit(lambda a: run(a)[0])

    def loss(a, g):
        return jnp.sum(run(a)[0].astype(jnp.float32) * g)

    fb = jax.jit(lambda a, g: jax.grad(loss)(a, g))
    return fwd, fb


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
        return float("nan")
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def check_kernel(interpret):
    """Kernel vs chunked XLA scan on this device: values and all VJPs (the default config, then --check-configs)."""
    shapes = [(2, 1000, 384, 16, 1), (1, 777, 300, 16, 2), (2, 257, 96, 4, 3)] if not ARGS.tiny else \
        [(1, 37, 12, 3, 2)]
    base = dict(chunk=4, ckpt_chunk=8, bwd_chunk=2) if interpret else {}
    configs = [None] + [kw for kw in json.loads(ARGS.check_configs or "[]") if kw]
    ok = True
    ref_f, ref_fb = scan_fn("chunked")  # compiled once per shape, shared by the configs
    for (b, l, d, n, g) in shapes:
        for dtype in (jnp.float32, jnp.bfloat16):
            a = scan_inputs(1, b, l, d, n, g, dtype)
            ct = jnp.asarray(np.random.default_rng(2).standard_normal((b, l, d)), jnp.float32)
            a32 = {k: v.astype(jnp.float32) for k, v in a.items()}  # the reference in f32 from the rounded inputs
            r_out, r_grads = ref_f(a32), ref_fb(a32, ct)
            for kw in configs[:1] if (b, l, d, n, g) == shapes[0] and len(shapes) > 1 else configs:  # the extra
                # configs on the odd shapes only (grouped B/C, padded dims, dstate 4): each is 3 kernel compiles
                cfg = K.ScanBlockConfig(**{**base, **(kw or {})}) if (base or kw) else None
                k_f, k_fb = scan_fn("pallas", cfg, interpret)
                errs = {"out": rel(k_f(a), r_out)}
                gk = k_fb(a, ct)
                errs.update({f"d{k}": rel(gk[k], r_grads[k]) for k in a})
                tol = 2e-4 if dtype == jnp.float32 else 2.5e-2
                passed = all(e <= tol for e in errs.values())  # NaN fails
                ok &= passed
                row("check", f"pallas{'' if kw is None else ' ' + json.dumps(kw)} vs chunked b{b} l{l} d{d} n{n} "
                    f"g{g} {jnp.dtype(dtype).name}", status="PASS" if passed else "FAIL", config=kw,
                    max_err=f"{max(errs.values()):.2e}", errs={k: float(f"{v:.3e}") for k, v in errs.items()})
    return ok


def bench_copy():
    n = (256 * 1024 * 1024) if not ARGS.tiny else (1 << 20)
    x = jnp.ones((n,), jnp.bfloat16)
    f = jax.jit(lambda x: x + 1)
    ms = time_jax(f, (x,))
    gbs = 2 * n * 2 / ms / 1e6
    row("copy", f"x + 1 over {2 * n / 2**20:.0f} MiB bf16", ms, GBps=round(gbs, 1))
    return gbs


def bench_scan(copy_gbs, interpret):
    b, l, d, n = (8, 4096, 2048, 16) if not ARGS.tiny else (1, 64, 32, 4)
    impls = [("pallas", "bld", "pallas (channels-last)"), ("pallas", "mamba", "pallas (mamba layout API)"),
             ("associative", "bld", "lax.associative_scan"), ("chunked", "bld", "chunked (64)"),
             ("sequential", "bld", "lax.scan")]
    if ARGS.skip_slow:
        impls = [i for i in impls if i[0] in ("pallas", "associative")]
    res = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        dn = jnp.dtype(dtype).name
        a = scan_inputs(0, b, l, d, n, 1, dtype)
        g = jnp.asarray(np.random.default_rng(3).standard_normal((b, l, d)), jnp.float32)
        for impl, layout, label in impls:
            fwd, fb = scan_fn(impl, interpret=interpret and impl == "pallas", layout=layout)
            for mode, fn, args in (("fwd", fwd, (a,)), ("fwd+bwd", fb, (a, g))):
                nbytes = K.copy_bytes(b, l, d, n, 1, jnp.dtype(dtype).itemsize, True, mode == "fwd+bwd")

                def one(fn=fn, args=args, mode=mode, label=label, nbytes=nbytes):
                    ms = time_jax(fn, args)
                    res[(dn, mode, label)] = ms
                    gbs = nbytes / ms / 1e6
                    return row("scan", f"b{b} l{l} d{d} n{n} {dn} {mode} {label}", ms, GBps=round(gbs, 1),
                               pct_copy=round(100 * gbs / copy_gbs, 1), dtype=dn, mode=mode, impl=label)

                guard(f"scan {dn} {mode} {label}", one)
        for mode in ("fwd", "fwd+bwd"):
            base = res.get((dn, mode, "lax.associative_scan"))
            kern = res.get((dn, mode, "pallas (channels-last)"))
            if base and kern:
                row("ratio", f"{dn} {mode}: associative_scan / pallas", None, speedup=round(base / kern, 2))
            seq = res.get((dn, mode, "lax.scan"))
            if seq and kern:
                row("ratio", f"{dn} {mode}: lax.scan / pallas", None, speedup=round(seq / kern, 2))


def bench_ssd():
    b, l, h, p, g, n, q = (8, 4096, 32, 64, 1, 128, 256) if not ARGS.tiny else (1, 64, 2, 8, 1, 8, 16)
    rng = np.random.default_rng(4)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    for dn, dot in (("float32", None), ("bfloat16", jnp.bfloat16)):
        act = lambda x: jnp.asarray(x, dot or jnp.float32)
        a = dict(x=act(f(b, l, h, p)), dt=jnp.asarray(rng.uniform(1e-3, 0.1, (b, l, h)), jnp.float32),
                 A=-jnp.asarray(rng.uniform(1, 16, h), jnp.float32), B=act(f(b, l, g, n)), C=act(f(b, l, g, n)),
                 D=jnp.asarray(f(h), jnp.float32))
        fl = ssd_flops(b, l, h, p, g, n, q)
        fwd = jax.jit(lambda a: ssd_chunked(**a, chunk_size=q, dot_dtype=dot)[0])
        fb = jax.jit(jax.grad(lambda a: jnp.sum(ssd_chunked(**a, chunk_size=q, dot_dtype=dot)[0])))
        for mode, fn, mult in (("fwd", fwd, 1), ("fwd+bwd", fb, 3)):
            guard(f"ssd {dn} {mode}", lambda fn=fn, mode=mode, mult=mult: row(
                "ssd", f"b{b} l{l} h{h} p{p} n{n} chunk{q} {dn} {mode}", ms := time_jax(fn, (a,)),
                TFLOPs=round(mult * fl / ms / 1e9, 2), dtype=dn, mode=mode))
        if dn == "float32" and not ARGS.skip_slow:
            seq = jax.jit(lambda a: ssd_sequential(**a)[0])
            guard("ssd lax.scan", lambda: row("ssd", f"b{b} l{l} h{h} p{p} n{n} lax.scan reference f32 fwd",
                                              time_jax(seq, (a,), reps=5)))


def sweep_configs():
    """(forward, forward+backward) ScanBlockConfig overrides: 22 + 7 compiles, ~100 s at the benchmark shape.
    {} is the default (the chunked forward: scan_chunk 8, block_d 16, 1 warp; ckpt_chunk 64, bwd_chunk 2).
    The per-step forward (scan_chunk 0; its best: prefetch with chunk 4, the default before the chunked one) and
    its options follow.  Left out: prefetch with chunk 8 (166 registers: a second wave; ~30 s to compile)."""
    step = dict(scan_chunk=0)
    old = dict(prefetch=False, chunk=8, **step)  # the per-step loads of the first default, for the other options
    fwd = [dict(), dict(scan_chunk=4), dict(scan_chunk=16, block_d=8), dict(block_d=8), dict(block_d=32),
           dict(block_d=32, num_warps=2), {**old, "chunk": 16}]
    fwd += [{**old, "group_loads": True, "chunk": c} for c in (8, 4, 16)] + [dict(prefetch=True, chunk=4, **step)]
    fwd += [{**old, "time_splits": t} for t in (2, 4, 8)]
    fwd += [{**old, "time_splits": t, "group_loads": True} for t in (2, 4)]
    fwd += [dict(time_splits=4, prefetch=True, chunk=4, **step)]
    fwd += [{**old, "block_d": bd, "num_warps": nw} for bd, nw in ((16, 1), (16, 2), (32, 4))]
    fwd += [{**old, "block_d": bd, "num_warps": nw, "group_loads": True} for bd, nw in ((16, 2), (4, 1))]
    bwd = [dict(), dict(bwd_chunk=4), dict(bwd_chunk=1), dict(ckpt_chunk=128), dict(block_d_bwd=16, num_warps_bwd=2),
           dict(group_loads=True, time_splits=4, prefetch=False, **step), dict(prefetch=True, chunk=4, **step)]
    return fwd, bwd


def bench_sweep(copy_gbs, interpret):
    """Rows carry err_vs_default (max |x - x_default| / max |x_default| over out, or over every gradient; bf16
    outputs: ~1e-2 is rounding, time_splits reassociates the decay product) so that a wrong config cannot win."""
    for dn in ARGS.sweep_dtypes.split(","):
        _bench_sweep(copy_gbs, interpret, dn)


def _bench_sweep(copy_gbs, interpret, dn):
    b, l, d, n = (8, 4096, 2048, 16) if not ARGS.tiny else (1, 64, 32, 4)
    dtype = jnp.dtype(dn)
    a = scan_inputs(0, b, l, d, n, 1, dtype)
    g = jnp.asarray(np.random.default_rng(3).standard_normal((b, l, d)), jnp.float32)
    fwd_cfgs, bwd_cfgs = sweep_configs()
    if ARGS.sweep_fwd is not None:  # e.g. '[{"chunk": 2}, {"block_d": 16}]' (the default config always first)
        fwd_cfgs, bwd_cfgs = [{}] + [kw for kw in json.loads(ARGS.sweep_fwd) if kw], bwd_cfgs[:1]
    if ARGS.sweep_bwd is not None:
        bwd_cfgs = [{}] + [kw for kw in json.loads(ARGS.sweep_bwd) if kw]
    nbytes = K.copy_bytes(b, l, d, n, 1, dtype.itemsize, True, False)
    ref = {}
    err = jax.jit(lambda x, y: jnp.max(jnp.abs(x.astype(jnp.float32) - y)) / jnp.max(jnp.abs(y)))
    for kw in fwd_cfgs:
        fwd, _ = scan_fn("pallas", K.ScanBlockConfig(**kw), interpret)

        def one(fwd=fwd, kw=kw):
            out = fwd(a)
            ref.setdefault("out", out.astype(jnp.float32))  # the first config is the default
            ms = time_jax(fwd, (a,))
            return row("sweep", f"fwd {dn} {kw or 'default'}", ms, GBps=round(nbytes / ms / 1e6, 1),
                       pct_copy=round(100 * nbytes / ms / 1e6 / copy_gbs, 1), config=kw, dtype=dn,
                       err_vs_default=float(f"{float(err(out, ref['out'])):.2e}"))

        guard(f"sweep fwd {dn} {kw}", one)
    for kw in bwd_cfgs:
        _, fb = scan_fn("pallas", K.ScanBlockConfig(**kw), interpret)

        def one_fb(fb=fb, kw=kw):
            grads = fb(a, g)
            ref.setdefault("grads", {k: v.astype(jnp.float32) for k, v in grads.items()})  # the default's
            e = max(float(err(grads[k], ref["grads"][k])) for k in grads)
            return row("sweep", f"fwd+bwd {dn} {kw or 'default'}", time_jax(fb, (a, g)), config=kw, dtype=dn,
                       err_vs_default=float(f"{e:.2e}"))

        guard(f"sweep fwd+bwd {dn} {kw}", one_fb)


# ---------------------------------------------------------------------------------------------
# 6. generation: hybrid vs same-size transformer
# ---------------------------------------------------------------------------------------------
GEN_FULL = dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=12, num_attention_heads=16,
                num_key_value_heads=4, intermediate_size=2816, max_position_embeddings=16384, moe_intermediate=1024,
                d_state=16, prompt=8192, new=256, chunk=512, batches=(1, 16))
GEN_TINY = dict(vocab_size=258, hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, max_position_embeddings=256, moe_intermediate=64, d_state=4, prompt=64,
                new=8, chunk=32, batches=(1, 2))


def gen_configs(g: dict):
    """(hybrid, transformer): configs/model_hybrid.yaml at size `g`, and the all-attention model with the dense
    FFN widened until the parameter counts agree (<= 10% apart, else ValueError)."""
    base = ModelConfig.from_yaml(os.path.join(ROOT, ARGS.gen_config))
    period = base.layer_mixers()[:3] if base.mixer_types else ("mamba", "mamba", "attention")
    L = g["num_hidden_layers"]
    mixers = tuple(period[i % len(period)] for i in range(L))
    moe = None
    if base.moe is not None:
        moe = base.moe.replace(moe_intermediate_size=g["moe_intermediate"], moe_layers=tuple(
            i for i, m in enumerate(mixers) if m != "attention"), capacity_factor=None)
    sizes = {k: g[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "num_key_value_heads", "intermediate_size", "max_position_embeddings")}
    hybrid = base.replace(**sizes, mixer_types=mixers, moe=moe, ssm=base.ssm.replace(d_state=g["d_state"]),
                          dtype="bfloat16", param_dtype="bfloat16", head_dim=None)
    tf = hybrid.replace(mixer_types=None)
    step = 64 if g["hidden_size"] >= 512 else 8
    p0, p1 = tf.num_params(), tf.replace(intermediate_size=tf.intermediate_size + step).num_params()
    f = tf.intermediate_size + step * round((hybrid.num_params() - p0) / (p1 - p0))
    tf = tf.replace(intermediate_size=max(step, f))
    ratio = tf.num_params() / hybrid.num_params()
    if abs(ratio - 1) > 0.1:
        raise ValueError(f"could not size the transformer to the hybrid: params {tf.num_params()} vs "
                         f"{hybrid.num_params()}")
    return hybrid, tf


def gen_fns(model, cfg, batch: int, prompt: int, new: int, chunk: int):
    """(prefill, decode) jitted: prefill scans the prompt through the cache `chunk` tokens at a time (the masked
    XLA attention of a whole 8k prompt at batch 16 would not fit); decode runs `new` greedy steps in a loop."""
    if prompt % chunk:
        raise ValueError(f"prompt {prompt} must be a multiple of the prefill chunk {chunk}")

    @jax.jit
    def prefill(params, ids):
        cache = KVCache.init(cfg, batch, prompt + new)

        def body(cache, x):
            logits, cache = model.apply({"params": params}, x, jnp.ones_like(x), cache=cache, last_logits_only=True)
            return cache, logits[:, -1]

        cache, last = jax.lax.scan(body, cache, jnp.swapaxes(ids.reshape(batch, prompt // chunk, chunk), 0, 1))
        return jnp.argmax(last[-1], -1).astype(jnp.int32), cache

    @jax.jit
    def decode(params, tok, cache):
        def body(i, carry):
            tok, cache, out = carry
            logits, cache = model.apply({"params": params}, tok[:, None], jnp.ones((batch, 1), jnp.int32),
                                        cache=cache)
            nxt = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
            return nxt, cache, out.at[:, i].set(nxt)

        out = jnp.zeros((batch, new), jnp.int32)
        return jax.lax.fori_loop(0, new, body, (tok, cache, out))[2]

    return prefill, decode


def bench_generate():
    """The production path: kernels the dispatcher would pick without IVA_KERNELS_ALLOW_UNVALIDATED (unless the
    caller set it), and the Mamba scan `auto` would pick (the chunked XLA scan until the kernel is validated)."""
    if _SET_ALLOW:
        os.environ.pop("IVA_KERNELS_ALLOW_UNVALIDATED", None)
    try:
        _bench_generate()
    finally:
        if _SET_ALLOW:
            os.environ["IVA_KERNELS_ALLOW_UNVALIDATED"] = "1"


def _bench_generate():
    g = GEN_TINY if ARGS.tiny else GEN_FULL
    hybrid, tf = gen_configs(g)
    scan_impl = S.resolve_impl(hybrid.ssm.scan_impl)
    hybrid = hybrid.replace(ssm=hybrid.ssm.replace(scan_impl=scan_impl))
    prompt, new, chunk = g["prompt"], g["new"], g["chunk"]
    res = {}
    for name, cfg in (("hybrid", hybrid), ("transformer", tf)):
        model = Transformer(cfg)
        params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
        desc = (f"{name} L{cfg.num_hidden_layers} ({cfg.num_attention_layers} attention) d{cfg.hidden_size} "
                f"ffn{cfg.intermediate_size} {cfg.num_params() / 1e6:.1f}M")
        row("gen", desc, None, params_M=round(cfg.num_params() / 1e6, 2), layout=layer_layout(cfg),
            mixers=",".join(cfg.layer_mixers()), scan_impl=scan_impl, attn_impl=cfg.attn_impl)
        for b in g["batches"]:
            ids = jnp.asarray(np.random.default_rng(b).integers(0, cfg.vocab_size, (b, prompt)), jnp.int32)
            prefill, decode = gen_fns(model, cfg, b, prompt, new, chunk)
            state = jax.eval_shape(lambda: KVCache.init(cfg, b, prompt + new))
            kv = 2 * math.prod(state.k.shape) * state.k.dtype.itemsize
            ssm = state.nbytes() - kv - math.prod(state.valid.shape)

            def one(b=b, prefill=prefill, decode=decode, ids=ids, state=state, kv=kv, ssm=ssm):
                reps = max(1, min(ARGS.reps, 3))
                tok, cache = prefill(params, ids)
                ms_pre = time_jax(prefill, (params, ids), reps=reps, warm=0)
                ms_dec = time_jax(decode, (params, tok, cache), reps=reps, warm=1)
                res[(name, b)] = ms_dec
                return row("gen", f"{name} batch {b} prompt {prompt} +{new} bf16", ms_dec,
                           decode_tok_s=round(b * new / ms_dec * 1e3, 1), ms_per_step=round(ms_dec / new, 3),
                           prefill_tok_s=round(b * prompt / ms_pre * 1e3, 1), prefill_ms=round(ms_pre, 1),
                           state_MiB=round(state.nbytes() / 2**20, 2), kv_MiB=round(kv / 2**20, 2),
                           ssm_state_MiB=round(ssm / 2**20, 3), model=name, batch=b)

            guard(f"generate {name} batch {b}", one)
    for b in g["batches"]:
        if ("hybrid", b) in res and ("transformer", b) in res:
            row("ratio", f"batch {b}: decode tokens/s hybrid / transformer", None,
                speedup=round(res[("transformer", b)] / res[("hybrid", b)], 2))


SECTIONS = ("check", "copy", "scan", "ssd", "sweep", "generate")


def main():
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_ssm.json"))
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run; kernel in interpret mode)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--sweep", action="store_true", help="also sweep kernel block configs")
    ap.add_argument("--sweep-fwd", default=None, help="JSON list of forward ScanBlockConfig overrides to sweep "
                    "instead of the built-in list (plus the default; forward+backward: the default only)")
    ap.add_argument("--sweep-bwd", default=None, help="JSON list of ScanBlockConfig overrides to time forward+"
                    "backward (plus the default)")
    ap.add_argument("--sweep-dtypes", default="bfloat16", help="comma list of activation dtypes for the sweep")
    ap.add_argument("--check-configs", default=None, help="JSON list of ScanBlockConfig overrides to check (values "
                    "and VJPs) besides the default")
    ap.add_argument("--skip-slow", action="store_true", help="skip lax.scan and chunked rows")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--only", default=None, help=f"comma-separated sections to run, of {','.join(SECTIONS)} "
                    "(default: all but sweep, which needs --sweep)")
    ap.add_argument("--gen-config", default="configs/model_hybrid.yaml",
                    help="the hybrid's layer pattern / SSM / MoE settings (sizes come from the script)")
    ARGS = ap.parse_args()
    only = set(ARGS.only.split(",")) if ARGS.only else None
    if only and not only <= set(SECTIONS):
        sys.exit(f"--only {ARGS.only}: sections are {SECTIONS}")
    want = lambda s: (s in only) if only else (s != "sweep" or ARGS.sweep) and not (  # noqa: E731
        s == "check" and ARGS.skip_check)
    if ARGS.tiny:
        ARGS.reps = min(ARGS.reps, 3)
    dev = jax.devices()[0]
    interpret = dev.platform != "gpu"
    print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}, kernel interpret={interpret}",
          flush=True)
    if interpret and not ARGS.tiny:
        sys.exit("no GPU: run with --tiny for a CPU smoke run")
    meta = dict(device=dev.device_kind, platform=dev.platform, jax=jax.__version__, tiny=ARGS.tiny)
    if want("check"):
        meta["check_passed"] = guard("check", lambda: check_kernel(interpret))
    copy_gbs = float("nan")
    if want("copy") or want("scan") or want("sweep"):
        copy_gbs = guard("copy", bench_copy) or float("nan")
    if want("scan"):
        guard("scan", lambda: bench_scan(copy_gbs, interpret))
    if want("ssd"):
        guard("ssd", bench_ssd)
    if want("sweep"):
        guard("sweep", lambda: bench_sweep(copy_gbs, interpret))
    if want("generate"):
        guard("generate", bench_generate)
    os.makedirs(os.path.dirname(os.path.abspath(ARGS.out)), exist_ok=True)
    with open(ARGS.out, "w") as fh:
        json.dump(dict(meta=meta, rows=ROWS), fh, indent=1, default=str)
    print("\n| group | what | ms | figure |\n|---|---|---|---|")
    for r in ROWS:
        fig = next((f"{k}={r[k]}" for k in ("GBps", "TFLOPs", "speedup", "status", "decode_tok_s", "params_M")
                    if k in r), r.get("error", ""))
        extra = f" ({r['pct_copy']}% of copy)" if "pct_copy" in r else \
            f" (decode state {r['state_MiB']} MiB)" if "state_MiB" in r else ""
        print(f"| {r['group']} | {r['name']} | {r.get('ms') or ''} | {fig}{extra} |")
    print(f"\nwrote {ARGS.out}")


if __name__ == "__main__":
    main()
