"""One-shot validation of the seed's acceptance checks: a pass/fail table and a telemetry JSON.

    python experiments/validate_end_to_end.py --device auto|cpu|gpu [--quick] [--out FILE] [--only a,b]

Checks (targets are the seed's):
  rmsnorm_speed     kernels.rms_norm(impl="auto") forward vs torch F.rms_norm, 32768x4096 bf16  >= 1.25x (GPU)
  attention_speed   kernels.flash_attention(impl="auto") causal forward vs torch SDPA (default backend),
                    B4 S4096 H16 D128 bf16  >= 1.1x (GPU)
  hrm_halt_rate     halt_rate in [0.3, 0.7]: a target for the HRM controller over an LM, which is not built
                    yet, so the check is "not available".  Meanwhile it reports HRM-ACT-v1's halting on a
                    brief 4x4 Sudoku run (half 15-given, half minimal puzzles; share of held-out puzzles that
                    halt before the step limit under adaptive Q-halting, per difficulty) for information:
                    so early in training that statistic swings between 0 and 1 with the seed and step
                    count, so gating on it would be noise.
  hrm_no_nan        the same HRM-ACT run: loss and parameters finite
  moe_balance       per-expert load std/mean <= 1.0 and overflow <= 5% at capacity_factor 1.25: a tiny MoE LM
                    (byte embeddings -> iva_jax.moe.MoeBlock -> lm_head) trained briefly on the embedded corpus
  quant_int8_ppl,   perplexity drift <= 5% of int8 / int4 weight-only (iva_jax.quant.quantize) vs the
  quant_int4_ppl    unquantized model (bf16 weights) on the embedded corpus, SmolLM2-135M-Instruct.
                    The embedded GGUF is itself Q4_1 (blocks of 32), so the defaults there are int8 g64 and
                    int4 g32 (the source grid; int4 g64 drifts ~40%, as tests/test_quant_smollm2.py notes);
                    --quant-model HF_DIR checks another (e.g. a bf16 safetensors) checkpoint.
  quant_int4_generate  int4 model generates 64 new tokens (EOS disabled), all valid ids
  fp8_t4_guard      the fp8 guard refuses a T4 (sm75) device description (and allows an H100)
"not applicable" and "not available" are not failures but always say why; any FAIL or ERROR exits 1.
--quick (the CPU test) trains fewer steps and runs the quant checks on a tiny random decoder instead of
SmolLM2 (the threshold then only exercises the code path).  The JSON (default
runs/validate/validate_<platform>.json) holds every check and a `telemetry` dict in the schema's blocks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

PASS, FAIL, NA, UNAVAILABLE, ERROR = "PASS", "FAIL", "not applicable", "not available", "ERROR"
FAILING = (FAIL, ERROR)


@dataclasses.dataclass
class Result:
    name: str
    status: str
    measured: Dict[str, Any]
    target: str
    note: str = ""
    seconds: float = 0.0


class Ctx:
    """What the checks share: arguments, the device, and the lazily loaded SmolLM2 (or tiny) model."""

    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        import jax

        from kernels import dispatch

        self.info = dispatch.device_info()
        self.gpu = self.info.platform == "cuda"
        self.jax = jax
        self._model = None

    def torch_cuda(self) -> Optional[str]:
        """None when torch with CUDA is importable, else why not."""
        try:
            import torch
        except ImportError:
            return "torch is not installed (pip install torch with CUDA); the anchor must run in this process"
        if not torch.cuda.is_available():
            return f"torch {torch.__version__} has no CUDA device (CPU build?)"
        return None


def _result(name, status, measured, target, note="") -> Result:
    return Result(name, status, measured, target, note)


# ------------------------------------------------------------------------------------------------ speed
def _gpu_gate(ctx: Ctx, name: str, target: str) -> Optional[Result]:
    if not ctx.gpu:
        return _result(name, NA, {}, target, f"speed targets compare GPU kernels with torch CUDA; this device is "
                                             f"{ctx.info.platform} ({ctx.info.kind})")
    why = ctx.torch_cuda()
    if why:
        return _result(name, UNAVAILABLE, {}, target, why)
    return None


def check_rmsnorm_speed(ctx: Ctx) -> List[Result]:
    target = ">= 1.25x torch F.rms_norm (32768x4096 bf16 forward)"
    gate = _gpu_gate(ctx, "rmsnorm_speed", target)
    if gate:
        return [gate]
    import jax
    import jax.numpy as jnp
    import torch
    import torch.nn.functional as F

    import profile_kernels as pk
    from kernels import rms_norm
    from kernels.rms_norm import _choose

    T, H = 32768, 4096
    nrot = pk.rotations(2 * T * H * 2)
    keys = jax.random.split(jax.random.key(0), nrot + 1)
    xs = [jax.random.normal(k, (T, H), jnp.bfloat16) for k in keys[:nrot]]
    w = (1 + 0.1 * jax.random.normal(keys[-1], (H,))).astype(jnp.bfloat16)
    f = jax.jit(lambda x, w: rms_norm(x, w, eps=1e-6, impl="auto"))
    ours = pk.time_jax(f, [(x, w) for x in xs])
    del xs
    tx = [torch.randn(T, H, device="cuda", dtype=torch.bfloat16) for _ in range(nrot)]
    tw = (1 + 0.1 * torch.randn(H, device="cuda")).to(torch.bfloat16)
    it = [0]

    def nxt():
        it[0] += 1
        return tx[it[0] % nrot]
    theirs = pk.time_torch(lambda: F.rms_norm(nxt(), (H,), tw, 1e-6))
    ratio = theirs / ours
    m = {"ours_ms": round(ours, 4), "torch_ms": round(theirs, 4), "ratio": round(ratio, 3),
         "impl": _choose("auto", H, False, log=False), "ours_GBps": round(2 * T * H * 2 / ours / 1e6, 1)}
    return [_result("rmsnorm_speed", PASS if ratio >= 1.25 else FAIL, m, target)]


def check_attention_speed(ctx: Ctx) -> List[Result]:
    target = ">= 1.1x torch SDPA default (causal B4 S4096 H16 D128 bf16 forward)"
    gate = _gpu_gate(ctx, "attention_speed", target)
    if gate:
        return [gate]
    import jax
    import jax.numpy as jnp
    import torch
    import torch.nn.functional as F

    import profile_kernels as pk
    from kernels import flash_attention
    from kernels.flash_attention import _choose

    b, s, h, d = 4, 4096, 16, 128
    ks = jax.random.split(jax.random.key(1), 3)
    q, k, v = (jax.random.normal(kk, (b, s, h, d), jnp.bfloat16) for kk in ks)
    f = jax.jit(lambda q, k, v: flash_attention(q, k, v, causal=True, impl="auto"))
    ours = pk.time_jax(f, [(q, k, v)])
    tq, tk, tv = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    theirs = pk.time_torch(lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=True))
    flops = pk.attn_flops(b, h, s, s, d, True, None)
    ratio = theirs / ours
    m = {"ours_ms": round(ours, 4), "torch_ms": round(theirs, 4), "ratio": round(ratio, 3),
         "impl": _choose("auto", q.dtype, d, True, False, log=False),
         "ours_TFLOPs": round(flops / ours / 1e9, 1), "torch_TFLOPs": round(flops / theirs / 1e9, 1)}
    return [_result("attention_speed", PASS if ratio >= 1.1 else FAIL, m, target)]


# ------------------------------------------------------------------------------------------------ HRM
def _mixed_sudoku(num_each: int, test_each: int):
    """4x4 Sudoku: half easy (15 givens), half hard (minimal givens); group ids kept distinct."""
    import numpy as np

    from iva_jax.hrm import tasks

    easy = tasks.build_sudoku(4, num_each, test_each, num_aug=2, min_givens=15, seed=0)
    hard = tasks.build_sudoku(4, num_each, test_each, num_aug=2, min_givens=0, seed=1)

    def cat(a, b):
        arr = {k: np.concatenate([a[0][k], b[0][k] + (a[0][k].max() + 1 if k == "group_ids" else 0)])
               for k in a[0]}
        meta = dict(a[1], num_examples=len(arr["inputs"]), mean_givens=None, min_givens="mixed 15 / 0")
        return arr, meta
    return cat(easy["train"], hard["train"]), easy["test"], hard["test"]


def check_hrm(ctx: Ctx) -> List[Result]:
    import jax
    import numpy as np

    from iva_jax.hrm import train as T
    from iva_jax.hrm.config import HRMConfig, HRMTrainConfig
    from iva_jax.hrm.data import PuzzleBatcher
    from iva_jax.hrm.model import HRMACT

    steps = 30 if ctx.quick else 120
    B = 64
    (tr, trm), (te_easy, m_easy), (te_hard, m_hard) = _mixed_sudoku(100, 32)
    cfg = HRMConfig(batch_size=B, seq_len=trm["seq_len"], vocab_size=trm["vocab_size"], num_puzzle_identifiers=1,
                    puzzle_emb_ndim=32, H_cycles=2, L_cycles=2, H_layers=1, L_layers=1, hidden_size=32, num_heads=2,
                    mlp_multiple_of=8, halt_max_steps=4, halt_exploration_prob=0.1, forward_dtype="float32",
                    eval_mode="adaptive")
    tc = HRMTrainConfig(model=cfg, total_steps=steps, lr=3e-3, lr_warmup_steps=5, lr_min_ratio=1.0,
                        puzzle_emb_lr=1e-2, weight_decay=0.1)
    model = HRMACT(cfg)
    step = jax.jit(T.make_train_step(model, tc))
    batches = PuzzleBatcher(tr, trm, B, seed=3)
    state = T.init_train_state(model, tc, jax.random.PRNGKey(0))
    losses, train_halt = [], []
    for i in range(steps):
        state, sums = step(state, batches.train_batch(i))
        m = T.train_metrics(jax.device_get(sums), B)
        losses.append(m["loss"])
        train_halt.append(m["halt_rate"])
    ev = jax.jit(T.make_eval_step(model, "adaptive"))
    res_easy = T.evaluate(ev, state, PuzzleBatcher(te_easy, m_easy, B).eval_batches())
    res_hard = T.evaluate(ev, state, PuzzleBatcher(te_hard, m_hard, B).eval_batches())
    n_e, n_h = res_easy["count"], res_hard["count"]
    halt_rate = (res_easy["halt_rate"] * n_e + res_hard["halt_rate"] * n_h) / (n_e + n_h)
    avg_steps = (res_easy["avg_steps"] * n_e + res_hard["avg_steps"] * n_h) / (n_e + n_h)
    finite = bool(np.all(np.isfinite(losses))) and all(
        bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(state.params))
    proxy = {"hrm_act_halt_rate": round(halt_rate, 3), "hrm_act_halt_rate_easy": round(res_easy["halt_rate"], 3),
             "hrm_act_halt_rate_hard": round(res_hard["halt_rate"], 3), "hrm_act_avg_steps": round(avg_steps, 3),
             "train_halt_rate_2nd_half": round(float(np.mean(train_halt[steps // 2:])), 3),
             "exact_accuracy_easy": round(res_easy["exact_accuracy"], 3),
             "exact_accuracy_hard": round(res_hard["exact_accuracy"], 3), "steps": steps,
             "halt_max_steps": cfg.halt_max_steps}
    note = ("not available yet: the HRM controller over an LM (iva_jax.hrm controller, issue 5 item 4) is not "
            "built; measured values are HRM-ACT-v1's adaptive halting on held-out 4x4 Sudoku after a brief run, "
            "for information only (not gated: unstable this early in training)")
    return [_result("hrm_halt_rate", UNAVAILABLE, proxy, "controller halt_rate in [0.3, 0.7]", note),
            _result("hrm_no_nan", PASS if finite else FAIL,
                    {"no_nan": finite, "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
                     "steps": steps}, "loss and parameters finite",
                    "HRM-ACT-v1 on 4x4 Sudoku (the controller's run once it lands)")]


# ------------------------------------------------------------------------------------------------ MoE
def check_moe(ctx: Ctx) -> List[Result]:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from iva_jax.moe import MoeBlock, MoEConfig
    from iva_jax.train.data import default_corpus_path

    vocab, d, seq, batch = 256, 48, 64, 8
    steps = 60 if ctx.quick else 120
    cfg = MoEConfig(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, capacity_factor=1.25,
                    router="softmax_topk", aux_loss_coef=0.05, z_loss_coef=1e-3)

    class ByteMoeLM(nn.Module):  # byte + previous-byte embeddings -> one MoE FFN -> lm_head
        @nn.compact
        def __call__(self, ids, deterministic=True):
            prev = jnp.pad(ids, ((0, 0), (1, 0)))[:, :-1]
            h = nn.Embed(vocab, d, name="embed_tokens")(ids) + nn.Embed(vocab, d, name="embed_prev")(prev)
            y, aux = MoeBlock(cfg, hidden_size=d, name="mlp")(nn.RMSNorm()(h), deterministic=deterministic)
            return nn.Dense(vocab, use_bias=False, name="lm_head")(nn.RMSNorm()(h + y)), aux

    model = ByteMoeLM()
    data = np.frombuffer(default_corpus_path().read_bytes(), np.uint8).astype(np.int32)
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((batch, seq), jnp.int32))
    params = jax.tree_util.tree_map_with_path(
        lambda p, s: jnp.ones(s.shape) if "scale" in str(p[-1]) else jnp.asarray(rng.normal(size=s.shape) * 0.02,
                                                                                   jnp.float32), shapes["params"])
    stats = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape), shapes.get("moe_stats", {}))
    opt = optax.adamw(3e-3)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, stats, opt_state, tokens):
        def loss_fn(p):
            (logits, aux), new = model.apply({"params": p, "moe_stats": stats}, tokens[:, :-1], deterministic=False,
                                             mutable=["moe_stats"])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
            return ce + aux["loss"], (ce, aux, new.get("moe_stats", {}))
        (_, (ce, aux, new_stats)), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        upd, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, upd), new_stats, opt_state, ce, aux

    ces, stdm, over = [], [], []
    for _ in range(steps):
        starts = rng.integers(0, len(data) - seq - 2, size=batch)
        tokens = jnp.asarray(np.stack([data[s:s + seq + 1] for s in starts]))
        params, stats, opt_state, ce, aux = step(params, stats, opt_state, tokens)
        ces.append(float(ce))
        stdm.append(float(aux["load_std_over_mean"]))
        over.append(float(aux["overflow_pct"]))
    last = slice(-10, None)
    m = {"load_std_over_mean": round(float(np.mean(stdm[last])), 4),
         "overflow_pct": round(float(np.mean(over[last])), 3),
         "loss_first": round(float(np.mean(ces[:5])), 4), "loss_last": round(float(np.mean(ces[last])), 4),
         "steps": steps, "capacity_factor": 1.25, "experts": 8, "top_k": 2}
    ok = m["load_std_over_mean"] <= 1.0 and m["overflow_pct"] <= 5.0 and all(map(math.isfinite, ces))
    note = ("tiny byte-level MoE LM (iva_jax.moe.MoeBlock, softmax top-2, 8 experts) on the embedded corpus; "
            "mean of the last 10 steps")
    return [_result("moe_balance", PASS if ok else FAIL, m, "load std/mean <= 1.0 and overflow <= 5% at cf 1.25",
                    note)]


# ------------------------------------------------------------------------------------------------ quant
def _quant_model(ctx: Ctx):
    """(label, model, params, token ids [2, T], prompt ids [1, P]) for the quantization checks."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from iva_jax.train.data import default_corpus_path

    text = default_corpus_path().read_text()
    if ctx.quick:
        from iva_jax.config import ModelConfig
        from iva_jax.models.transformer import Transformer
        from iva_jax.train.data import ByteTokenizer

        mc = ModelConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                         attn_impl="xla", norm_impl="xla", mlp_impl="xla")
        model = Transformer(mc)
        abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
        rng = np.random.default_rng(0)
        params = jax.tree_util.tree_map_with_path(
            lambda p, s: np.ones(s.shape, np.float32) if "scale" in str(p[-1])
            else (0.08 * rng.standard_normal(s.shape)).astype(np.float32), nn_unbox(abstract))
        toks = ByteTokenizer()(text)
        label, seq = "tiny random decoder (--quick)", 128
    else:
        from torch_bridge import load_pretrained
        from torch_bridge.tokenizer import load_tokenizer

        src = ctx.args.quant_model
        model, params = load_pretrained(src, dtype=jnp.bfloat16)  # the seed's reference: bf16 weights
        toks = load_tokenizer(src)(text).input_ids
        name = "SmolLM2-135M-Instruct (embedded Q4_1 GGUF)" if src == "smollm2-135m" else src
        label, seq = f"{name}, bf16 weights", 256
    ids = np.asarray([toks[:seq], toks[seq:2 * seq]], np.int32)
    return label, model, params, jnp.asarray(ids), jnp.asarray(ids[:1, :16])


def nn_unbox(tree):
    from flax.core import meta

    return meta.unbox(tree)


def _ppl(model, params, ids) -> float:
    import jax
    import jax.numpy as jnp

    @jax.jit
    def nll(params, ids):
        logits = model.apply({"params": params}, ids[:, :-1]).astype(jnp.float32)
        lp = jax.nn.log_softmax(logits, -1)
        return -jnp.mean(jnp.take_along_axis(lp, ids[:, 1:, None], -1))
    return float(math.exp(float(nll(params, ids))))


def _group_size(ctx: Ctx, model, precision: str) -> int:
    """--quant-group; else for the embedded GGUF int8 g64 / int4 g32 (its weights are Q4_1 in blocks of 32:
    group 32 keeps that grid, group 64 merges two blocks' grids and drifts ~40%, 128 does not divide 576);
    else the largest of 128/64/32 dividing the layers."""
    if ctx.args.quant_group:
        return ctx.args.quant_group
    if not ctx.quick and ctx.args.quant_model == "smollm2-135m":
        return 64 if precision == "int8" else 32
    c = model.config
    return next(g for g in (128, 64, 32) if c.hidden_size % g == 0 and c.intermediate_size % g == 0)


def check_quant(ctx: Ctx) -> List[Result]:
    try:
        import iva_jax.quant as Q
    except ImportError as e:
        why = f"iva_jax.quant is not importable ({e})"
        return [_result(n, UNAVAILABLE, {}, t, why) for n, t in (("quant_int8_ppl", "drift <= 5%"),
                                                                  ("quant_int4_ppl", "drift <= 5%"),
                                                                  ("quant_int4_generate", "64 tokens"))]
    import numpy as np

    from iva_jax.inference import generate

    label, model, params, ids, prompt = _quant_model(ctx)
    ppl_ref = _ppl(model, params, ids)
    out = []
    q4 = None
    for prec in ("int8", "int4"):
        gs = _group_size(ctx, model, prec)
        qm, qp = Q.quantize(model, params, prec, group_size=gs)
        ppl = _ppl(qm, qp, ids)
        drift = abs(ppl / ppl_ref - 1.0)
        m = {"ppl_ref": round(ppl_ref, 4), "ppl": round(ppl, 4), "drift_pct": round(100 * drift, 3),
             "group_size": gs, "tokens": int(ids.size), "model": label,
             "bytes_ratio": round(Q.params_nbytes(qp) / Q.params_nbytes(params), 3)}
        out.append(_result(f"quant_{prec}_ppl", PASS if drift <= 0.05 and math.isfinite(ppl) else FAIL, m,
                           "perplexity drift <= 5% vs unquantized", f"{label}, embedded corpus"))
        if prec == "int4":
            q4 = (qm, qp)
    new = np.asarray(generate(q4[0], q4[1], prompt, 64, eos_token_id=()))
    vocab = model.config.vocab_size
    ok = new.shape == (1, 64) and bool(np.all((new >= 0) & (new < vocab)))
    ref = np.asarray(generate(model, params, prompt, 64, eos_token_id=()))
    m = {"new_tokens": int(new.shape[1]), "valid_ids": ok, "greedy_agreement_with_unquantized":
         round(float(np.mean(new == ref)), 3), "distinct_tokens": int(np.unique(new).size)}
    out.append(_result("quant_int4_generate", PASS if ok else FAIL, m, "64 new tokens, valid ids",
                       f"{label}, greedy, EOS disabled"))
    return out


def check_fp8_guard(ctx: Ctx) -> List[Result]:
    target = "fp8 refused on T4 (sm75) and A100 (sm80), allowed on H100 (sm90)"
    try:
        from iva_jax.quant import fp8 as F8
    except ImportError as e:
        return [_result("fp8_t4_guard", UNAVAILABLE, {}, target, f"iva_jax.quant.fp8 is not importable ({e})")]
    from unittest import mock

    from kernels import dispatch

    decisions = {}
    for name, cc in (("Tesla T4", (7, 5)), ("NVIDIA A100-SXM4-40GB", (8, 0)), ("NVIDIA H100 80GB HBM3", (9, 0))):
        info = dispatch.DeviceInfo("cuda", name, cc, None)
        with mock.patch.object(dispatch, "device_info", lambda info=info: info):
            why = F8.fp8_unsupported_reason()
            try:
                F8.check_fp8(allow_emulation=True)  # emulation is never allowed on a CUDA device
                refused = False
            except ValueError:
                refused = True
        decisions[f"sm{cc[0]}{cc[1]}"] = {"refused": refused, "reason": why}
    here = F8.fp8_unsupported_reason()
    m = {"t4_refused": decisions["sm75"]["refused"], "a100_refused": decisions["sm80"]["refused"],
         "h100_refused": decisions["sm90"]["refused"], "t4_reason": decisions["sm75"]["reason"],
         "this_device": "allowed" if here is None else f"refused: {here}"}
    ok = m["t4_refused"] and m["a100_refused"] and not m["h100_refused"] and "T4" in (m["t4_reason"] or "")
    return [_result("fp8_t4_guard", PASS if ok else FAIL, m, target,
                    "iva_jax.quant.fp8 guard evaluated for described devices (no GPU needed)")]


CHECKS: Dict[str, Callable[[Ctx], List[Result]]] = {
    "rmsnorm_speed": check_rmsnorm_speed, "attention_speed": check_attention_speed, "hrm": check_hrm,
    "moe": check_moe, "quant": check_quant, "fp8": check_fp8_guard}


# ------------------------------------------------------------------------------------------------ report
def _fmt(m: Dict[str, Any], keys: int = 4) -> str:
    items = [(k, v) for k, v in m.items() if not isinstance(v, (dict, list)) and k not in ("model", "t4_reason")]
    return ", ".join(f"{k}={v}" for k, v in items[:keys])


def table(results: List[Result]) -> str:
    lines = ["| check | status | measured | target | note |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.name} | {r.status} | {_fmt(r.measured)} | {r.target} | {r.note} |")
    return "\n".join(lines)


def telemetry_blocks(results: List[Result]) -> Dict[str, Dict[str, Any]]:
    """The measured values in the telemetry schema's blocks (speed / hrm / moe / quant)."""
    by = {r.name: r.measured for r in results}
    blocks: Dict[str, Dict[str, Any]] = {}
    if by.get("rmsnorm_speed"):
        blocks.setdefault("speed", {})["rmsnorm_vs_torch"] = by["rmsnorm_speed"]["ratio"]
    if by.get("attention_speed"):
        blocks.setdefault("speed", {})["attention_vs_torch"] = by["attention_speed"]["ratio"]
    if by.get("hrm_halt_rate"):  # HRM-ACT proxy until the controller lands (see the check's note)
        blocks["hrm"] = {"halt_rate": by["hrm_halt_rate"]["hrm_act_halt_rate"],
                         "avg_steps": by["hrm_halt_rate"]["hrm_act_avg_steps"], "source": "hrm_act"}
    if by.get("moe_balance"):
        blocks["moe"] = {k: by["moe_balance"][k] for k in ("load_std_over_mean", "overflow_pct")}
    for prec in ("int8", "int4"):
        if by.get(f"quant_{prec}_ppl"):
            blocks.setdefault("quant", {})[f"ppl_drift_pct_{prec}"] = by[f"quant_{prec}_ppl"]["drift_pct"]
    if by.get("quant_int4_generate"):
        blocks.setdefault("quant", {})["int4_new_tokens"] = by["quant_int4_generate"]["new_tokens"]
    if by.get("fp8_t4_guard"):
        blocks.setdefault("quant", {})["fp8_enabled_on_t4"] = not by["fp8_t4_guard"]["t4_refused"]
    return blocks


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    p.add_argument("--quick", action="store_true", help="tiny settings (CI): fewer steps, quant on a tiny model")
    p.add_argument("--out", default=None, help="JSON path (default runs/validate/validate_<platform>.json)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {list(CHECKS)}")
    p.add_argument("--quant-model", default="smollm2-135m",
                   help="model for the quantization checks: smollm2-135m (embedded, itself Q4_1), an HF dir or .gguf")
    p.add_argument("--quant-group", type=int, default=None, help="group size for int8/int4 (default: see docs)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch
    import jax

    if args.device == "cpu":
        jax.config.update("jax_platforms", "cpu")
    if args.device == "gpu" and jax.default_backend() != "gpu":
        print(f"--device gpu but jax's backend is {jax.default_backend()} ({jax.devices()[0]}): install jax[cuda]",
              file=sys.stderr)
        return 2
    names = list(CHECKS) if not args.only else [n.strip() for n in args.only.split(",")]
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        print(f"unknown checks {unknown}; choose from {list(CHECKS)}", file=sys.stderr)
        return 2
    ctx = Ctx(args)
    from iva_jax.env import versions

    t_all = time.time()
    print(f"device: {ctx.info.kind} ({ctx.info.platform}, cc {ctx.info.compute_capability}); jax {jax.__version__}"
          f"{'; quick' if args.quick else ''}", flush=True)
    results: List[Result] = []
    for name in names:
        t0 = time.time()
        try:
            rs = CHECKS[name](ctx)
        except Exception as e:  # noqa: BLE001 - a crash is a failure with its message
            traceback.print_exc(limit=4)
            rs = [Result(name, ERROR, {}, "runs", f"{type(e).__name__}: {str(e)[:300]}")]
        dt = time.time() - t0
        for r in rs:
            r.seconds = round(dt / len(rs), 2)
            print(f"[{r.status:>14}] {r.name}: {_fmt(r.measured, 8)}{'  -- ' + r.note if r.note else ''}",
                  flush=True)
        results.extend(rs)
    failed = [r.name for r in results if r.status in FAILING]
    v = versions()
    report = {"device": {"platform": ctx.info.platform, "kind": ctx.info.kind,
                         "compute_capability": None if ctx.info.compute_capability is None
                         else ".".join(map(str, ctx.info.compute_capability))},
              "versions": {k: v.get(k) for k in ("jax", "jaxlib", "flax", "optax", "torch", "transformers")},
              "quick": args.quick, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": round(time.time() - t_all, 1),
              "passed": not failed, "failed": failed, "checks": [dataclasses.asdict(r) for r in results],
              "telemetry": telemetry_blocks(results)}
    out = Path(args.out or ROOT / "runs" / "validate" / f"validate_{ctx.info.platform}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    print("\n" + table(results))
    print(f"\n{'ALL CHECKS PASSED' if not failed else 'FAILED: ' + ', '.join(failed)} "
          f"({report['seconds']} s); JSON: {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
