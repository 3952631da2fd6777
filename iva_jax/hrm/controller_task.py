"""A task where harder inputs need more ponder steps, and the seed's check on it (halt_rate in [0.3, 0.7]).

Modulation recovery.  A frozen LM; sequences start with a marker token, EASY or HARD, followed by
random tokens.  The target at every scored position is the LM's own next-token distribution, computed
plainly for EASY rows and with an attention-sink bias alpha* on every layer and head for HARD rows.
The controller reads the context prefix (which holds the marker) and is trained with
KL(target || ponder output) + lambda * ponder cost.

Why the halting rate lands near the share of easy rows.  Step 1 is the plain LM (the controller has
read nothing yet), so EASY rows are solved exactly at step 1 and any further step only costs lambda:
their p_h(1) is pushed to 1 and they halt at step 1.  HARD rows are off by KL(alpha*) ~ 0.5 nats per
token at step 1; after reading the marker the controller can set alpha_s ~ alpha* for step 2, which
removes that error, so as long as lambda is well below the KL gap their p_h(1) is pushed to 0 and they
run to the step limit (max_steps = 2).  Halting before the limit is thus learned per row from its
content, and halt_rate -> the share of EASY rows (0.5 here).  Each failure mode lands outside
[0.3, 0.7]: a controller that never learns to halt gives 0, one that the penalty overwhelms (or
that cannot tell the rows apart) gives 1, one that halts at random gives a share set by its bias.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from iva_jax.config import ModelConfig
from iva_jax.hrm.controller import (ControllerConfig, init_controller, make_controller, ponder_forward,
                                    ponder_objective)
from iva_jax.models.transformer import Transformer

EASY, HARD = 1, 2  # marker tokens at position 0; the body uses tokens >= 3
TINY_LM = dict(vocab_size=61, hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, attn_impl="xla", norm_impl="xla", mlp_impl="xla")


def random_lm(config: ModelConfig, seed: int = 0, std: float = 0.3) -> Tuple[Transformer, Dict[str, Any]]:
    """(model, params) with random weights made on the host (no init compile): norm scales 1, embeddings
    N(0, 1), every other weight N(0, std^2) (std 0.3: decisive attention, routing and logits)."""
    model = Transformer(config)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    rng = np.random.default_rng(seed)

    def fill(path, s):
        key = jax.tree_util.keystr(path)
        if "scale" in key:
            return jnp.ones(s.shape, s.dtype)
        return jnp.asarray(rng.normal(size=s.shape) * (1.0 if "embed" in key else std), s.dtype)

    return model, jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(shapes))


def tiny_lm(seed: int = 0, moe: bool = False, **overrides: Any) -> Tuple[Transformer, Dict[str, Any]]:
    """A 2-layer, width-40 random decoder (vocab 61); `moe=True` makes its FFNs 5-expert top-2 MoE."""
    kw = dict(TINY_LM, **overrides)
    if moe:
        kw["moe"] = dict(num_experts=5, num_experts_per_tok=2, moe_intermediate_size=16)
    return random_lm(ModelConfig(**kw), seed)


@functools.partial(jax.jit, static_argnums=0)
def _sink_logits(lm: Transformer, params: Any, ids: jax.Array, alpha: jax.Array) -> jax.Array:
    return lm.apply({"params": params}, ids, attn_sink_bias=alpha)


def modulation_task(lm: Transformer, lm_params: Any, n: int, seq_len: int, context_len: int, *,
                    alpha_star: float = 3.0, hard_fraction: float = 0.5, seed: int = 0,
                    hard: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """n rows: input_ids [n, S] (marker at 0), read_mask (the first context_len positions), weights (the
    predictions at positions >= context_len - 1), target_probs [n, S, V] (the LM's distribution, with
    sink bias alpha* on HARD rows), hard [n] bool (given, or exactly round(n * hard_fraction) rows, shuffled)."""
    if not 1 <= context_len < seq_len:
        raise ValueError(f"context_len={context_len} must be in [1, seq_len={seq_len})")
    v = lm.config.vocab_size
    if v <= HARD + 1:
        raise ValueError(f"vocab_size={v} leaves no body tokens (markers are {EASY}, {HARD})")
    rng = np.random.default_rng(seed)
    if hard is None:
        hard = rng.permutation(np.arange(n) < round(n * hard_fraction))
    hard = np.asarray(hard, bool)
    if hard.shape != (n,):
        raise ValueError(f"hard has shape {hard.shape}, expected ({n},)")
    ids = rng.integers(HARD + 1, v, (n, seq_len)).astype(np.int32)
    ids[:, 0] = np.where(hard, HARD, EASY)
    alpha = jnp.asarray(np.where(hard, alpha_star, 0.0), jnp.float32)
    logits = _sink_logits(lm, lm_params, jnp.asarray(ids), alpha)
    pos = np.arange(seq_len)[None]
    return {"input_ids": ids, "read_mask": np.broadcast_to(pos < context_len, ids.shape).copy(),
            "weights": np.broadcast_to(pos >= context_len - 1, ids.shape).astype(np.float32).copy(),
            "target_probs": np.asarray(jax.nn.softmax(logits.astype(jnp.float32), axis=-1)), "hard": hard}


def kl_to_target(logits: jax.Array, target_probs: jax.Array, weights: jax.Array) -> jax.Array:
    """Weighted token mean of KL(target || softmax(logits)) (0 when they agree)."""
    logq = jnp.log(jnp.maximum(target_probs, 1e-30))
    kl = jnp.sum(target_probs * (logq - jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)), axis=-1)
    return jnp.sum(kl * weights) / jnp.maximum(jnp.sum(weights), 1.0)


SEED_CHECK = dict(steps=80, batch=32, lr=1.5e-2, n_train=512, n_eval=256, seq_len=12, context_len=6,
                  alpha_star=3.0)
SEED_CONTROLLER = ControllerConfig(hidden_size=32, max_steps=2, L_cycles=2, halt_eps=0.05, ponder_weight=0.05,
                                   sink="layer_head", halt_bias_init=0.0)


def seed_check(seed: int = 0, controller: ControllerConfig = SEED_CONTROLLER, *,
               compiler_options: Optional[Dict[str, Any]] = None, **kw: Any) -> Dict[str, Any]:
    """Train a controller on modulation recovery over a tiny frozen LM; report held-out halting statistics.

    Returns halt_rate (adaptive halting on held-out rows), halt_rate_easy / _hard, avg_steps, the KL of
    the plain LM and of the ponder output, the first / last training loss, `no_nan` (losses, outputs
    and params finite) and `passed` (halt_rate in [0.3, 0.7] and no_nan).  Keywords override SEED_CHECK;
    `compiler_options` go to `jax.jit` (e.g. {"xla_backend_optimization_level": 0}: faster CPU compile).
    Evaluation reuses the training step's compiled program with a zero update (one compile).
    """
    unknown = set(kw) - set(SEED_CHECK)
    if unknown:
        raise ValueError(f"unknown seed_check options {sorted(unknown)}; valid: {sorted(SEED_CHECK)}")
    o = dict(SEED_CHECK, **kw)
    t0 = time.perf_counter()
    lm, lm_params = tiny_lm(seed)
    ctrl = make_controller(controller, lm.config)
    params = init_controller(ctrl, lm.config.hidden_size, seed)
    task = dict(seq_len=o["seq_len"], context_len=o["context_len"], alpha_star=o["alpha_star"])
    rng = np.random.default_rng(seed)
    hard = np.concatenate([rng.permutation(np.arange(m) < m // 2) for m in (o["n_train"], o["n_eval"])])  # 50 / 50
    data = modulation_task(lm, lm_params, o["n_train"] + o["n_eval"], seed=seed + 1, hard=hard, **task)
    train = {k: v[:o["n_train"]] for k, v in data.items()}
    held = {k: v[o["n_train"]:] for k, v in data.items()}
    tx = optax.adam(o["lr"])
    opt = tx.init(params)
    thr_eval = controller.threshold if controller.eval_threshold is None else controller.eval_threshold

    def loss_fn(p, batch, thr):
        out = ponder_forward(lm, lm_params, ctrl, p, batch["input_ids"], read_mask=batch["read_mask"], threshold=thr,
                             return_step_hidden=True)
        kl = lambda x: kl_to_target(x, batch["target_probs"], batch["weights"])  # noqa: E731
        loss, m = ponder_objective(kl(out.logits), out, controller)
        plain = lm.apply({"params": lm_params}, out.step_hidden[0], method="unembed")  # step 1 = the plain LM
        return loss, dict(m, kl_plain=kl(plain), steps=out.steps,
                          finite=jnp.all(jnp.isfinite(out.logits)) & jnp.all(jnp.isfinite(out.halt_probs)))

    @functools.partial(jax.jit, compiler_options=compiler_options)
    def step(p, opt, batch, thr, lr_scale):
        """One Adam step (lr_scale 1), or the same forward as an evaluation (lr_scale 0): one compile for both."""
        (_, m), g = jax.value_and_grad(loss_fn, has_aux=True)(p, batch, thr)
        upd, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, jax.tree_util.tree_map(lambda u: u * lr_scale, upd)), opt, m

    def rows(data, idx):
        return {k: jnp.asarray(v[idx]) for k, v in data.items() if k != "hard"}

    rng = np.random.default_rng([seed, 1])  # batch order
    losses = []
    for _ in range(o["steps"]):
        idx = rng.choice(o["n_train"], o["batch"], replace=False)
        params, opt, m = step(params, opt, rows(train, idx), controller.threshold, 1.0)
        losses.append(float(m["loss"]))
    evals = [jax.device_get(step(params, opt, rows(held, np.arange(i, i + o["batch"])), thr_eval, 0.0)[2])
             for i in range(0, o["n_eval"] - o["batch"] + 1, o["batch"])]
    n_rows = len(evals) * o["batch"]
    steps = np.concatenate([e["steps"] for e in evals])
    early, hard = steps < controller.max_steps, held["hard"][:n_rows]
    finite = bool(np.all(np.isfinite(losses)) and all(bool(e["finite"]) for e in evals)
                  and all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(params)))
    res = {"halt_rate": float(early.mean()), "halt_rate_easy": float(early[~hard].mean()),
           "halt_rate_hard": float(early[hard].mean()), "avg_steps": float(steps.mean()),
           "max_steps": controller.max_steps, "kl_plain": float(np.mean([e["kl_plain"] for e in evals])),
           "kl_ponder": float(np.mean([e["ce"] for e in evals])), "loss_first": losses[0],
           "loss_last": float(np.mean(losses[-10:])), "no_nan": finite, "steps": o["steps"],
           "seconds": time.perf_counter() - t0}
    res["passed"] = bool(0.3 <= res["halt_rate"] <= 0.7 and finite)
    return res


__all__ = ("EASY", "HARD", "SEED_CHECK", "SEED_CONTROLLER", "kl_to_target", "modulation_task", "random_lm",
           "seed_check", "tiny_lm")
