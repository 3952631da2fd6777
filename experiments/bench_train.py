"""Training throughput, memory and MFU of a ~1B Llama-style decoder: iva-jax (our kernels vs XLA) vs torch.

    python experiments/bench_train.py --out experiments/results/bench_train_h100.json        # 1 x H100 sweep
    python experiments/bench_train.py --mesh data=2 --remats full --batches 16 --out ...    # 2 GPUs, data parallel
    python experiments/bench_train.py --mesh fsdp=2 --remats full --batches 16 --out ...    # 2 GPUs, FSDP
    python experiments/bench_train.py --tiny                                                 # CPU smoke run
    python experiments/bench_train.py --impls auto --remats none --param_dtypes bfloat16 --batches 8 \
        --no_torch --breakdown [--fused] --out ...                                  # where the step's time goes

Model: Llama, hidden 2048, 16 layers, 16 heads (MHA), ffn 5632, vocab 32000 (untied), seq 2048: the shape
of the torch anchor (HF Llama ~0.95B).  The step is iva_jax.train.step.make_train_step: bf16 compute,
AdamW behind the non-finite guard with gradient clipping, params float32 (master weights) or bfloat16.

Single-GPU sweep: for each `--impls` (auto = our Pallas kernels where the dispatcher picks them, xla =
plain XLA) and each `--remats` policy, batch sizes `--batches` (per GPU) in increasing order until one
does not fit; then the best float32 configuration again with bfloat16 params; then the torch anchor
(HF LlamaForCausalLM bf16 + fused AdamW, SDPA, `--torch_batch` x seq) in the same run.
Mesh mode (`--mesh data=2` / `fsdp=2` / `data=2,fsdp=2`): each configuration on all mesh GPUs (global
batch = per-GPU batch x GPUs) and on one GPU; reports tokens/s per GPU and the scaling efficiency.

FLOPs per step = 6 * params * tokens + 12 * layers * hidden * seq^2 * batch / 2 (matmul FLOPs of forward
and backward; causal attention counted at half), params counted as the anchor counts them (embedding
and lm_head included).  MFU = FLOPs / step time / peak, with two peaks: 989 TFLOP/s (H100 SXM bf16
dense) and the bf16 matmul rate measured at the start of this run (8192^3, median of 20).  No HFU: XLA's
cost analysis of the compiled step counts a scanned layer body once and Pallas custom calls not at all
(it reported 1.7 TFLOP for a 100 TFLOP step on the H100), so it is kept in the JSON only as
`xla_flops_per_device_unreliable`.
`--fused`: the step runs on the decode view's fused projections (`make_train_step(fuse_projections=True)`:
q/k/v as one matmul, gate/up too where the SwiGLU runs XLA); the gradient flows back to the HF-layout params.
`--breakdown`: in the same trial process, after the timed steps, the median of `--steps` synchronized calls
(after `--warmup`) of: the full step; loss + gradients (value_and_grad of the step's loss, no optimizer); the
forward loss; the decoder trunk forward (embeddings, layers, final norm; the unused LM head is dead code) and
its forward + backward (cotangent: random); the LM head + cross-entropy forward + backward on random hidden
states; the optimizer update (tx.update + apply_updates on random gradients).  Each is recorded in the trial's
`breakdown` (ms and share of the step) and printed as a table.
Every configuration runs in a fresh subprocess, so its peak memory is its own and an out-of-memory
configuration cannot disturb the next; results are written to --out after every configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEAK_TFLOPS = 989.0  # H100 SXM dense bf16
ANCHOR = {"name": "torch anchor (h100-2026-11-22.md)", "step_ms": 272.5, "tokens_per_sec": 60100.0,
          "tflops": 368.0, "mfu_989": 0.37, "batch": 8, "seq": 2048}
FULL = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
            num_key_value_heads=16, max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-5)


def model_flops(shape: dict, n_params: int, batch: int, seq: int) -> float:
    """6 * N * tokens + causal attention 12 * L * hidden * seq^2 * batch / 2 (the anchor's count)."""
    attention = 12.0 * shape["num_hidden_layers"] * shape["hidden_size"] * seq * seq * batch / 2
    return 6.0 * n_params * batch * seq + attention


# ------------------------------------------------------------------------------------------------
# one configuration (runs in its own process)
# ------------------------------------------------------------------------------------------------
def _peak_bytes(devices) -> float:
    peaks = []
    for d in devices:
        try:
            s = d.memory_stats() or {}
        except Exception:  # noqa: BLE001 - CPU has no stats
            s = {}
        if "peak_bytes_in_use" in s:
            peaks.append(s["peak_bytes_in_use"])
    return float(max(peaks)) if peaks else float("nan")


def _median_ms(call, n: int, warmup: int) -> float:
    """Median wall time (ms) of `call()` over n calls after `warmup` calls, each waited for (block_until_ready)."""
    import jax
    import numpy as np

    for _ in range(warmup):
        jax.block_until_ready(call())
    ts = []
    for _ in range(max(1, n)):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)) * 1e3


BREAKDOWN = (  # (key, what); the step's share is each part's median over the step's median
    ("step", "full train step"),
    ("loss_and_grads", "loss + gradients (no optimizer)"),
    ("forward_loss", "forward loss"),
    ("trunk_forward", "decoder trunk forward (no LM head / CE)"),
    ("trunk_forward_backward", "decoder trunk forward + backward"),
    ("head_ce_forward_backward", "LM head + CE forward + backward"),
    ("optimizer", "optimizer update"),
)


def run_breakdown(model, apply_fn, tx, tc, mesh, compiled, state, batch, n: int, warmup: int):
    """Median ms of the step and of its parts (see BREAKDOWN) on the trial's model, shapes and state.

    Returns {key: {"ms", "share"} or {"error"}}.  The optimizer part runs last and consumes the state's params
    and optimizer state (donated): the caller's state is spent afterwards.
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    from iva_jax.config import dtype_of
    from iva_jax.parallel.mesh import mesh_context
    from iva_jax.parallel.rules import DEFAULT_RULES
    from iva_jax.train.step import DEFAULT_FORWARD_KEYS, cross_entropy_sums, make_loss_fn, shifted_targets

    cdt = dtype_of(tc.compute_dtype)
    cast = lambda tree: jax.tree_util.tree_map(  # noqa: E731 - what the step does to the params
        lambda x: x.astype(cdt) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def jit(fn, **kw):
        f = jax.jit(fn, **kw)

        def call(*args):
            with mesh_context(mesh), nn.logical_axis_rules(DEFAULT_RULES):
                return f(*args)
        return call

    loss = make_loss_fn(apply_fn, tc)  # the step's objective (one microbatch, no dropout rng)

    def trunk(p, b):  # (logits, hidden): only hidden is returned, so the LM head is dead code
        kw = {k: b[k] for k in DEFAULT_FORWARD_KEYS if k in b}
        return apply_fn({"params": cast(p)}, b["input_ids"], return_hidden=True, **kw)[1]

    def head_ce(hp, h, b):  # the step's token loss from hidden states: unembed, shift, CE (+ z-loss)
        logits = model.apply({"params": cast(hp)}, h, method=type(model).unembed)
        tgt, w = shifted_targets(b, 1)
        s = cross_entropy_sums(logits[:, :-1], tgt, w, tc.label_smoothing)
        return (s["loss"] + tc.z_loss_coef * s["z"]) / jnp.maximum(s["tokens"], 1.0)

    txe = optax.with_extra_args_support(tx)

    def opt(g, os, p, value):
        u, os = txe.update(g, os, p, value=value)
        return optax.apply_updates(p, u), os

    hold = {"state": state}
    params = lambda: hold["state"].params  # noqa: E731
    b, s_len = batch["input_ids"].shape
    D = model.config.hidden_size
    head = "embed_tokens" if model.config.tie_word_embeddings else "lm_head"
    key = jax.random.PRNGKey(1)
    ct = jax.random.normal(key, (b, s_len, D), jnp.float32).astype(cdt)  # trunk cotangent / LM head input

    def step():
        hold["state"], m = compiled(hold["state"], batch)
        return hold["state"], m

    grads = jit(jax.value_and_grad(loss))
    fwd = jit(loss)
    tf = jit(trunk)
    tfb = jit(jax.grad(lambda q, bb, c: jnp.sum(trunk(q, bb).astype(jnp.float32) * c.astype(jnp.float32))))
    hce = jit(jax.value_and_grad(head_ce, argnums=(0, 1)))

    def optimizer():  # random gradients; params / optimizer state donated and threaded through the calls
        g = jit(lambda q: jax.tree_util.tree_map(
            lambda x: (1e-3 * jax.random.normal(key, x.shape, jnp.float32)).astype(x.dtype), q))(params())
        o = jit(opt, donate_argnums=(1, 2))
        cur = [hold["state"].params, hold["state"].opt_state]

        def call():
            cur[0], cur[1] = o(g, cur[1], cur[0], jnp.float32(2.0))
            return cur
        return call

    calls = {
        "step": lambda: step,
        "loss_and_grads": lambda: lambda: grads(params(), hold["state"].model_state, batch),
        "forward_loss": lambda: lambda: fwd(params(), hold["state"].model_state, batch),
        "trunk_forward": lambda: lambda: tf(params(), batch),
        "trunk_forward_backward": lambda: lambda: tfb(params(), batch, ct),
        "head_ce_forward_backward": lambda: lambda: hce({head: params()[head]}, ct, batch),
        "optimizer": optimizer,  # last: it consumes the state
    }
    parts = {}
    for name, make in calls.items():
        try:
            parts[name] = {"ms": _median_ms(make(), n, warmup)}
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: keep the other parts
            parts[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
    step_ms = parts["step"].get("ms", float("nan"))
    for v in parts.values():
        if "ms" in v:
            v["share"] = v["ms"] / step_ms
    return parts


def _breakdown_table(r: dict) -> str:
    bd = r["breakdown"]
    lines = [f"breakdown of {r.get('label', '?')} (median of {r.get('steps')} synchronized calls):",
             "| part | ms | share of step |", "|---|---|---|"]
    for k, what in BREAKDOWN:
        v = bd.get(k, {})
        if "ms" in v:
            lines.append(f"| {what} | {v['ms']:.2f} | {v['share']:.1%} |")
        else:
            lines.append(f"| {what} | {v.get('error', 'not measured')[:80]} | |")
    ms = {k: v["ms"] for k, v in bd.items() if "ms" in v}
    if {"step", "loss_and_grads", "optimizer"} <= set(ms):
        rest = ms["step"] - ms["loss_and_grads"] - ms["optimizer"]
        lines.append(f"step - (loss + grads) - optimizer = {rest:.2f} ms "
                     "(grad norm, clipping, guard, metrics, fusion differences)")
    if {"loss_and_grads", "trunk_forward_backward", "head_ce_forward_backward"} <= set(ms):
        lines.append(f"trunk fwd+bwd + head/CE fwd+bwd = "
                     f"{ms['trunk_forward_backward'] + ms['head_ce_forward_backward']:.2f} ms "
                     f"vs loss + grads {ms['loss_and_grads']:.2f} ms")
    return "\n".join(lines)


def run_trial(t: dict) -> dict:
    """Compile and time one configuration.

    t = {impl, param_dtype, remat, batch (global), seq, mesh, tiny, steps, warmup, fused, breakdown}.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from iva_jax.config import ModelConfig
    from iva_jax.models.transformer import Transformer
    from iva_jax.parallel import MeshConfig, batch_sharding, put_batch
    from iva_jax.train.config import TrainConfig
    from iva_jax.train.step import fused_view_apply, init_train_state, make_train_step, make_tx_and_schedule

    choices = []

    class Grab(logging.Handler):
        def emit(self, record):
            choices.append(record.getMessage())

    klog = logging.getLogger("iva_jax.kernels")
    klog.setLevel(logging.INFO)
    klog.addHandler(Grab())

    shape = TINY if t["tiny"] else FULL
    impl = t["impl"]
    mc = ModelConfig(**shape, dtype="bfloat16", param_dtype=t["param_dtype"], remat=t["remat"],
                     attn_impl=impl, norm_impl=impl, mlp_impl=impl,
                     **({} if t.get("save_products") is None else {"mlp_save_products": t["save_products"] == "on"}))
    B, S = t["batch"], t["seq"]
    tc = TrainConfig(steps=1000, batch_size=B, seq_len=S, compute_dtype="bfloat16", param_dtype=t["param_dtype"],
                     optimizer="adamw", lr=1e-4, warmup_steps=10, weight_decay=0.1, grad_clip_norm=1.0,
                     mesh=MeshConfig.from_dict(t["mesh"]))
    mesh = tc.mesh.build(allow_subset=True)
    model = Transformer(mc)
    tx, sched = make_tx_and_schedule(tc)
    out = {**t, "devices": int(mesh.devices.size), "device_kind": jax.devices()[0].device_kind,
           "n_params": mc.num_params(), "tokens_per_step": B * S}
    try:
        state, sh = init_train_state(lambda k: model.init(k, jnp.zeros((1, 2), jnp.int32))["params"], tx,
                                     jax.random.PRNGKey(0), mesh=mesh, param_dtype=t["param_dtype"])
        fused = bool(t.get("fused"))
        step = make_train_step(model.apply, tx, tc, schedule=sched, mesh=mesh, state_shardings=sh,
                               fuse_projections=fused)
        ids = np.random.default_rng(0).integers(0, shape["vocab_size"], (B, S)).astype(np.int32)
        batch = put_batch({"input_ids": ids}, batch_sharding(mesh, batch_size=B))
        t0 = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        out["compile_s"] = time.perf_counter() - t0
        try:
            ma = compiled.memory_analysis()
            out["compiled_memory_gb"] = (ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
                                         - ma.alias_size_in_bytes) / 1e9
        except Exception:  # noqa: BLE001 - not every backend reports it
            pass
        try:
            ca = compiled.cost_analysis()
            ca = ca[0] if isinstance(ca, (list, tuple)) else ca
            out["xla_flops_per_device_unreliable"] = float(ca.get("flops", float("nan")))
        except Exception:  # noqa: BLE001
            pass
        losses = []
        for _ in range(t["warmup"]):
            state, m = compiled(state, batch)
            losses.append(float(m["loss"]))
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        for _ in range(t["steps"]):
            state, m = compiled(state, batch)
        jax.block_until_ready((state, m))
        dt = (time.perf_counter() - t0) / t["steps"]
        losses.append(float(m["loss"]))
        peak = _peak_bytes(mesh.devices.flat)  # before the breakdown's extra buffers
        if t.get("breakdown"):
            apply_fn = fused_view_apply(model) if fused else model.apply
            out["breakdown"] = run_breakdown(model, apply_fn, tx, tc, mesh, compiled, state, batch,
                                             t["steps"], t["warmup"])
            state = None
    except Exception as e:  # noqa: BLE001 - report OOM and other failures as data
        msg = f"{type(e).__name__}: {e}"
        oom = any(s in msg for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM"))
        out.update(ok=False, oom=oom, error=msg[:800], kernel_choices=sorted(set(choices)))
        return out
    flops = model_flops(shape, mc.num_params(), B, S)
    n = out["devices"]
    out.update(ok=True, oom=False, step_ms=dt * 1e3, tokens_per_sec=B * S / dt,
               tokens_per_sec_per_device=B * S / dt / n,
               model_tflops_per_device=flops / dt / 1e12 / n, peak_memory_gb=peak / 1e9,
               losses=losses, finite=bool(np.all(np.isfinite(losses))), kernel_choices=sorted(set(choices)))
    return out


def measure_matmul(tiny: bool) -> dict:
    """bf16 matmul rate of this device (n^3, median of 20 after warm-up)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    n = 512 if tiny else 8192
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16)
    f = jax.jit(lambda x, y: x @ y)
    for _ in range(3):
        f(a, b).block_until_ready()
    ts = []
    for _ in range(20):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        ts.append(time.perf_counter() - t0)
    dt = float(np.median(ts))
    return {"n": n, "ms": dt * 1e3, "tflops": 2 * n ** 3 / dt / 1e12}


def run_torch(tiny: bool, batch: int, seq: int, steps: int, warmup: int) -> dict:
    """The anchor's measurement: HF LlamaForCausalLM bf16 + AdamW (fused on CUDA), SDPA, same shape."""
    import torch
    import transformers as tf

    shape = TINY if tiny else FULL
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = tf.LlamaConfig(**{k: v for k, v in shape.items()}, attn_implementation="sdpa")
    m = tf.LlamaForCausalLM(cfg).to(dev, torch.bfloat16).train()
    n = sum(p.numel() for p in m.parameters())
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=dev == "cuda")
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), device=dev)

    def step():
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / steps
    flops = model_flops(shape, n, batch, seq)
    return {"name": "torch (this run)", "torch": torch.__version__, "transformers": tf.__version__, "device": dev,
            "n_params": n, "batch": batch, "seq": seq, "step_ms": dt * 1e3, "tokens_per_sec": batch * seq / dt,
            "tflops": flops / dt / 1e12, "peak_memory_gb": (torch.cuda.max_memory_allocated() / 1e9 if dev == "cuda"
                                                            else float("nan")), "ok": True}


# ------------------------------------------------------------------------------------------------
# the driver
# ------------------------------------------------------------------------------------------------
def _child(kind: str, payload: dict, env_extra: dict, timeout: float) -> dict:
    env = {**os.environ, **env_extra}
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # use the whole 80 GB, as torch does
    cmd = [sys.executable, str(Path(__file__).resolve()), f"--{kind}", json.dumps(payload)]
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**payload, "ok": False, "oom": False, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (p.stderr or p.stdout)[-1500:]
    oom = "RESOURCE_EXHAUSTED" in tail or "out of memory" in tail.lower()
    return {**payload, "ok": False, "oom": oom, "error": f"exit {p.returncode}: {tail}"}


def _parse_mesh(s: str) -> dict:
    out = {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}
    for part in filter(None, s.split(",")):
        k, _, v = part.partition("=")
        if k not in out or not v.isdigit():
            raise ValueError(f"--mesh {s!r}: expected axis=size pairs over {sorted(out)}")
        out[k] = int(v)
    return out


def _fmt(r: dict) -> str:
    if not r.get("ok"):
        why = "OOM" if r.get("oom") else (r.get("error", "failed").splitlines() or ["failed"])[0][:60]
        return f"| {r.get('label', '?')} | {r.get('batch', '')} | {why} ||||||"
    mfu = r.get("mfu_989", float("nan"))
    return (f"| {r['label']} | {r['batch']} | {r['tokens_per_sec']:,.0f} | {r['step_ms']:.1f} | "
            f"{r.get('peak_memory_gb', float('nan')):.1f} | {r.get('tflops', float('nan')):.3g} | {mfu:.1%} | "
            f"{r.get('mfu_matmul', float('nan')):.1%} | "
            f"{r.get('vs_torch', float('nan')):.2f}x |")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU (smoke run of the whole script)")
    p.add_argument("--out", default=None, help="JSON results (rewritten after every configuration)")
    p.add_argument("--impls", default="auto,xla")
    p.add_argument("--remats", default=None,
                   help="remat policies to try (default none,dots_saveable,full; tiny none,full)")
    p.add_argument("--batches", default=None, help="per-GPU batch sizes to try, increasing (default 8,16; tiny 2)")
    p.add_argument("--param_dtypes", default="float32,bfloat16",
                   help="first: the sweep; others: the best configuration of the sweep again")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 2048; tiny 64)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; tiny 2)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--mesh", default=None, help="e.g. data=2 or fsdp=2: scaling mode over several GPUs")
    p.add_argument("--torch_batch", type=int, default=None, help="batch of the torch measurement (default 8; tiny 2)")
    p.add_argument("--no_torch", action="store_true")
    p.add_argument("--save_products", nargs="?", const="on", default=None, choices=["on", "off"],
                   help="ModelConfig.mlp_save_products (SwiGLU backward reuses the forward's gate/up products); "
                        "default: the library's default (on)")
    p.add_argument("--fused", action="store_true",
                   help="train on the fused q/k/v (and gate/up) projections (make_train_step(fuse_projections=True))")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the step's parts (loss+grads, forward, trunk, LM head+CE, optimizer) per trial")
    p.add_argument("--budget_s", type=float, default=450.0,
                   help="start no new configuration after this many seconds (one device command may run 600 s)")
    p.add_argument("--trial", default=None, help=argparse.SUPPRESS)
    p.add_argument("--matmul", default=None, help=argparse.SUPPRESS)
    p.add_argument("--torchrun", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.trial or a.matmul or a.torchrun:  # child process
        if a.trial:
            res = run_trial(json.loads(a.trial))
        elif a.matmul:
            res = measure_matmul(json.loads(a.matmul)["tiny"])
        else:
            kw = json.loads(a.torchrun)
            try:
                res = run_torch(**kw)
            except Exception as e:  # noqa: BLE001 - torch is optional
                res = {"name": "torch (this run)", "ok": False, "error": f"{type(e).__name__}: {e}"[:800]}
        print("RESULT " + json.dumps(res), flush=True)
        return res

    t_start = time.time()
    tiny = a.tiny
    seq = a.seq or (64 if tiny else 2048)
    steps = a.steps or (2 if tiny else 10)
    batches = [int(b) for b in (a.batches or ("2" if tiny else "8,16")).split(",")]
    impls = a.impls.split(",")
    remats = (a.remats or ("none,full" if tiny else "none,dots_saveable,full")).split(",")
    dtypes = a.param_dtypes.split(",")
    mesh = _parse_mesh(a.mesh) if a.mesh else None
    n_mesh = 1
    for v in (mesh or {}).values():
        n_mesh *= v
    env_one = {}
    env_mesh = {}
    if tiny:  # fake CPU devices
        env_one = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
        env_mesh = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={max(n_mesh, 1)}", "JAX_PLATFORMS": "cpu"}
    elif mesh:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        env_one = {"CUDA_VISIBLE_DEVICES": visible}

    def left() -> float:
        return a.budget_s - (time.time() - t_start)

    results = {"config": {"shape": TINY if tiny else FULL, "seq": seq, "steps": steps, "warmup": a.warmup,
                          "mesh": mesh, "argv": sys.argv[1:], "python": platform.python_version()},
               "flops_formula": "6*params*tokens + 12*layers*hidden*seq^2*batch/2 (causal attention at half)",
               "peak_tflops": PEAK_TFLOPS, "anchor": ANCHOR, "runs": [], "skipped": []}

    def save():
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(results, indent=1))

    mm = _child("matmul", {"tiny": tiny}, env_one, timeout=300)
    results["matmul"] = mm
    mm_tflops = mm.get("tflops", float("nan"))
    print(f"bf16 matmul {mm.get('n')}^3: {mm.get('ms', float('nan')):.3f} ms = {mm_tflops:.3g} TFLOP/s", flush=True)
    save()

    torch_res = None
    if not a.no_torch and mesh is None:
        tb = a.torch_batch or (2 if tiny else 8)
        torch_res = _child("torchrun", {"tiny": tiny, "batch": tb, "seq": seq, "steps": steps, "warmup": 3},
                           env_one, timeout=max(60.0, min(600.0, left())))
        results["torch"] = torch_res
        if torch_res.get("ok"):
            print(f"torch: {torch_res['step_ms']:.1f} ms/step, {torch_res['tokens_per_sec']:,.0f} tok/s, "
                  f"{torch_res['tflops']:.3g} TFLOP/s = {torch_res['tflops'] / PEAK_TFLOPS:.1%} of 989, "
                  f"peak {torch_res['peak_memory_gb']:.1f} GB", flush=True)
        else:
            print(f"torch: not measured ({torch_res.get('error', '')[:200]})", flush=True)
        save()
    torch_tps = torch_res["tokens_per_sec"] if torch_res and torch_res.get("ok") else float("nan")

    def finish(r: dict, label: str) -> dict:
        r["label"] = label
        if r.get("ok"):
            r["tflops"] = r["model_tflops_per_device"]
            r["mfu_989"] = r["tflops"] / PEAK_TFLOPS
            r["mfu_matmul"] = r["tflops"] / mm_tflops if mm_tflops == mm_tflops else float("nan")
            r["vs_torch"] = r["tokens_per_sec_per_device"] / torch_tps if torch_tps == torch_tps else float("nan")
        results["runs"].append(r)
        save()
        print(_fmt(r), flush=True)
        if isinstance(r.get("breakdown"), dict):  # a failed trial keeps the request flag (a bool)
            print(_breakdown_table(r), flush=True)
        return r

    print("| config | batch/GPU | tok/s | step ms | peak GB | TFLOP/s/GPU | MFU(989) | MFU(matmul) | vs torch |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = {"seq": seq, "steps": steps, "warmup": a.warmup, "tiny": tiny, "fused": a.fused, "breakdown": a.breakdown,
            "save_products": a.save_products}
    tag = (" fused" if a.fused else "") + (f" save_products={a.save_products}" if a.save_products else "")
    if mesh is None:
        best = None
        for impl in impls:
            for remat in remats:
                for b in batches:
                    if left() <= 0:
                        results["skipped"].append(f"{impl}/{remat}/b{b}: time budget")
                        continue
                    t = {**base, "impl": impl, "param_dtype": dtypes[0], "remat": remat, "batch": b,
                         "mesh": {"data": 1}}
                    r = finish(_child("trial", t, env_one, timeout=max(60.0, min(600.0, left() + 60))),
                               f"{impl} {dtypes[0]} remat={remat}{tag}")
                    if not r.get("ok"):
                        break  # a larger batch will not fit either
                    if best is None or r["tokens_per_sec"] > best["tokens_per_sec"]:
                        best = r
        for dt in dtypes[1:]:
            if best is None or left() <= 0:
                results["skipped"].append(f"param_dtype={dt}: no fitting configuration or time budget")
                continue
            t = {**base, "impl": best["impl"], "param_dtype": dt, "remat": best["remat"], "batch": best["batch"],
                 "mesh": {"data": 1}}
            finish(_child("trial", t, env_one, timeout=max(60.0, min(600.0, left() + 60))),
                   f"{best['impl']} {dt} remat={best['remat']}{tag}")
        ok = [r for r in results["runs"] if r.get("ok")]
        if ok:
            results["best"] = max(ok, key=lambda r: r["tokens_per_sec"])
    else:
        for impl in impls:
            for remat in remats:
                for b in batches:
                    if left() <= 0:
                        results["skipped"].append(f"{impl}/{remat}/b{b}: time budget")
                        continue
                    common = {**base, "impl": impl, "param_dtype": dtypes[0], "remat": remat}
                    one = finish(_child("trial", {**common, "batch": b, "mesh": {"data": 1}}, env_one,
                                        timeout=max(60.0, min(600.0, left() + 60))),
                                 f"{impl} remat={remat}{tag} 1 GPU")
                    many = finish(_child("trial", {**common, "batch": b * n_mesh, "mesh": mesh}, env_mesh,
                                         timeout=max(60.0, min(600.0, left() + 60))),
                                  f"{impl} remat={remat}{tag} {a.mesh} ({n_mesh} GPUs)")
                    if one.get("ok") and many.get("ok"):
                        many["batch_per_gpu"] = b
                        many["scaling_efficiency"] = many["tokens_per_sec_per_device"] / one["tokens_per_sec"]
                        print(f"  {a.mesh}: {many['tokens_per_sec_per_device']:,.0f} tok/s per GPU vs "
                              f"{one['tokens_per_sec']:,.0f} on 1 GPU = {many['scaling_efficiency']:.1%} efficiency",
                              flush=True)
                        save()
    results["wall_s"] = time.time() - t_start
    save()
    print(f"anchor (h100-2026-11-22.md): {ANCHOR['step_ms']} ms/step, {ANCHOR['tokens_per_sec']:,.0f} tok/s, "
          f"{ANCHOR['tflops']:.0f} TFLOP/s = {ANCHOR['mfu_989']:.0%} MFU")
    print("FLOPs = " + results["flops_formula"] + f"; MFU over {PEAK_TFLOPS:.0f} TFLOP/s and over the matmul rate "
          f"measured above ({mm_tflops:.3g} TFLOP/s)")
    if results.get("skipped"):
        print("skipped: " + "; ".join(results["skipped"]))
    return results


if __name__ == "__main__":
    main()
