"""Training the HRM controller over a frozen LM (optionally LoRA) on next-token prediction.

The objective per packed row: the controller reads the hidden states of the first `context_len`
positions (a causal LM's hidden states there depend on those tokens only) and the loss is the
cross-entropy of the predictions at positions >= context_len - 1, i.e. of tokens it never read, plus
lambda * ponder cost.  The plain LM is scored on exactly the same tokens, so "perplexity with and
without pondering" compares like with like.

The train state is the stack's `TrainState`: params {"ctrl": controller, ["lora": adapters]}, the LM
weights as `frozen` (never updated; under LoRA the adapters are merged into them inside the step),
the optimizer from `make_optimizer(cfg.train)`.  `ControllerTrainer.fit` runs the stack's `fit` loop
with the telemetry `hrm` block (halt_rate, avg_steps, ponder_cost, ...) and an `eval` block
(perplexity plain / adaptive / fixed, halting statistics at evaluation).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from iva_jax.config import ConfigBase, check, dtype_of
from iva_jax.hrm.controller import (ControllerConfig, HRMController, halting_stats, init_controller,
                                    make_controller, ponder_forward, ponder_lm_loss)
from iva_jax.train.config import TrainConfig
from iva_jax.train.lora import LoRAConfig, init_lora, merge_lora
from iva_jax.train.optim import make_optimizer, make_schedule, optimizer_metrics
from iva_jax.train.step import TrainState, create_train_state, cross_entropy_sums, shifted_targets

Array = jax.Array
_global_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


def _default_train() -> TrainConfig:
    return TrainConfig(steps=300, batch_size=8, seq_len=256, lr=1e-3, warmup_steps=20, weight_decay=0.0,
                       schedule="cosine", min_lr_ratio=0.1, compute_dtype="bfloat16", log_every=10, eval_every=100,
                       eval_batches=8)


@dataclasses.dataclass(frozen=True)
class ControllerTrainConfig(ConfigBase):
    """A controller run: the `controller:` section of configs/hrm.yaml."""

    model: ControllerConfig = dataclasses.field(default_factory=ControllerConfig)
    train: TrainConfig = dataclasses.field(default_factory=_default_train)
    lm: str = "smollm2-135m"  # anything torch_bridge.load_pretrained reads
    tokenizer: Optional[str] = None  # None: the LM's own ("bytes" for the byte tokenizer)
    lora: Optional[LoRAConfig] = None  # None: the LM stays frozen
    context_len: int = 128  # the controller reads positions [0, context_len); later predictions are scored
    out_dir: str = "runs/hrm_controller"

    def validate(self) -> None:
        check(isinstance(self.model, ControllerConfig), "model", self.model, "must be a ControllerConfig")
        check(isinstance(self.train, TrainConfig), "train", self.train, "must be a TrainConfig")
        check(isinstance(self.context_len, int) and 1 <= self.context_len < self.train.seq_len, "context_len",
              self.context_len, f"must be an int in [1, train.seq_len={self.train.seq_len})")


def lm_batch(batch: Mapping[str, Any], context_len: int) -> Dict[str, np.ndarray]:
    """A packed batch (`iva_jax.train.data.PackedBatches`: input_ids [, labels, segment_ids, positions])
    -> the controller's (numpy, host side): the same keys, filled in, plus read_mask [B, S] (real tokens
    before context_len).  `scored_targets` turns it into targets / weights inside the jitted step."""
    ids = np.asarray(batch["input_ids"])
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}")
    b, s = ids.shape
    if not 1 <= context_len < s:
        raise ValueError(f"context_len={context_len} must be in [1, seq_len={s})")
    seg = np.asarray(batch.get("segment_ids", np.ones_like(ids)), np.int32)
    pos = np.asarray(batch.get("positions", np.broadcast_to(np.arange(s), (b, s))), np.int32)
    labels = np.asarray(batch.get("labels", ids), np.int32)
    read = (np.arange(s)[None] < context_len) & (seg != 0)
    return {"input_ids": ids.astype(np.int32), "labels": labels, "positions": pos, "segment_ids": seg,
            "read_mask": read}


def scored_targets(batch: Mapping[str, Array], context_len: int) -> Tuple[Array, Array]:
    """(targets, weights) [B, S-1] of a `lm_batch`: next-token targets (`shifted_targets`: no loss on
    -100 labels, padding or across segments), weighted only for predictions at positions >=
    context_len - 1, i.e. for tokens the controller did not read."""
    tgt, w = shifted_targets(batch)
    return tgt, w * (jnp.arange(tgt.shape[1])[None] >= context_len - 1)


class ControllerTrainer:
    """Jitted train / eval steps of a controller over `lm` (a `Transformer`) for one ControllerTrainConfig.

    `tx` replaces the optimizer chain of `cfg.train`; `compiler_options` go to `jax.jit` (e.g.
    {"xla_backend_optimization_level": 0} trades run time for compile time in quick CPU runs)."""

    def __init__(self, cfg: ControllerTrainConfig, lm: Any, tx: Optional[optax.GradientTransformation] = None, *,
                 compiler_options: Optional[Dict[str, Any]] = None):
        if not isinstance(cfg, ControllerTrainConfig):
            raise ValueError(f"cfg must be a ControllerTrainConfig, got {type(cfg).__name__}")
        self.cfg, self.lm = cfg, lm
        self.ctrl: HRMController = make_controller(cfg.model, lm.config)
        self.schedule = make_schedule(cfg.train)
        self.tx = optax.with_extra_args_support(tx if tx is not None else make_optimizer(cfg.train, self.schedule))
        self.compute_dtype = dtype_of(cfg.train.compute_dtype)
        jit_kw = dict(compiler_options=compiler_options) if compiler_options else {}
        self._step = jax.jit(self._step_impl, donate_argnums=(0,), **jit_kw)
        self._eval = jax.jit(self._eval_impl, **jit_kw)

    # ---- state -------------------------------------------------------------------------------------
    def init_state(self, lm_params: Any, seed: Optional[int] = None) -> TrainState:
        """Controller (+ LoRA adapters) as trainable params, a copy of the LM (in compute dtype) as frozen."""
        seed = self.cfg.train.seed if seed is None else seed
        k_lora, k_state = jax.random.split(jax.random.PRNGKey(seed))
        params = {"ctrl": init_controller(self.ctrl, self.lm.config.hidden_size, seed)}
        if self.cfg.lora is not None:
            params["lora"] = jax.tree_util.tree_map(jnp.asarray, init_lora(lm_params, self.cfg.lora, k_lora))
        # copies: the step donates its state, frozen weights included, and must not delete the caller's
        frozen = jax.tree_util.tree_map(
            lambda x: jnp.array(x, self.compute_dtype if jnp.issubdtype(jnp.result_type(x), jnp.floating) else None,
                                copy=True), lm_params)
        state, _ = create_train_state(params, self.tx, k_state, param_dtype="float32", frozen=frozen)
        return state

    def lm_params(self, params: Mapping[str, Any], frozen: Any) -> Any:
        """The decoder params the forward uses (LoRA merged when enabled)."""
        return frozen if "lora" not in params else merge_lora(frozen, params["lora"], self.cfg.lora)

    # ---- jitted pieces -----------------------------------------------------------------------------
    def _ponder(self, params, frozen, batch, **kw):
        return ponder_forward(self.lm, self.lm_params(params, frozen), self.ctrl, params["ctrl"], batch["input_ids"],
                              read_mask=batch["read_mask"], positions=batch["positions"],
                              segment_ids=batch["segment_ids"], **kw)

    def _step_impl(self, state: TrainState, batch: Dict[str, Array]):
        tgt, w = scored_targets(batch, self.cfg.context_len)

        def loss_fn(params):
            out = self._ponder(params, state.frozen, batch)
            return ponder_lm_loss(out, tgt, w, self.cfg.model, logits=out.logits[:, :-1])

        (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params, value=loss)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "ce": m["ce"], "ppl": m["ppl"], "grad_norm": _global_norm(grads),
                   "tokens": m["tokens"], **optimizer_metrics(opt_state, self.schedule)}
        metrics.update({f"hrm/{k}": m[k] for k in ("halt_rate", "avg_steps", "ponder_cost", "expected_steps",
                                                   "p_first", "sink_alpha", "router_tau", "ponder_penalty")})
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def _eval_impl(self, params, frozen, batch):
        c = self.cfg.model
        tgt, w = scored_targets(batch, self.cfg.context_len)

        def nll(logits):
            return cross_entropy_sums(logits[:, :-1], tgt, w)["nll"]

        kw = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
        plain = lambda p: nll(self.lm.apply({"params": p}, batch["input_ids"], **kw))  # noqa: E731
        out = {"tokens": jnp.sum(w), "nll_plain": plain(self.lm_params(params, frozen))}
        out["nll_base"] = plain(frozen) if "lora" in params else out["nll_plain"]
        ada = self._ponder(params, frozen, batch, mode="adaptive", threshold=c.eval_threshold, early_exit=True)
        fixed = self._ponder(params, frozen, batch, mode="fixed", steps=c.eval_steps)
        out.update(nll_adaptive=nll(ada.logits), nll_fixed=nll(fixed.logits), steps_run=ada.steps_run,
                   **{f"stat_{k}": v for k, v in halting_stats(ada).items()})
        return out

    # ---- host API ----------------------------------------------------------------------------------
    def step(self, state: TrainState, batch: Mapping[str, Any]) -> Tuple[TrainState, Dict[str, Array]]:
        """One optimizer step on a `lm_batch`; metrics: loss, ce, ppl, grad_norm, lr, skipped, hrm/*."""
        return self._step(state, {k: jnp.asarray(v) for k, v in batch.items()})

    def evaluate(self, state: TrainState, batches: Iterable[Mapping[str, Any]]) -> Dict[str, float]:
        """Token-weighted perplexities on the scored tokens: plain LM (`ppl_base`: without LoRA too),
        adaptive pondering (`ppl_ponder`), fixed eval_steps (`ppl_fixed`), and the adaptive run's
        halting statistics (batch means)."""
        sums: Dict[str, float] = {}
        stats: Dict[str, list] = {}
        n = 0
        for batch in batches:
            r = jax.device_get(self._eval(state.params, state.frozen, {k: jnp.asarray(v) for k, v in batch.items()}))
            for k in ("tokens", "nll_plain", "nll_base", "nll_adaptive", "nll_fixed"):
                sums[k] = sums.get(k, 0.0) + float(r[k])
            for k, v in r.items():
                if k.startswith("stat_") or k == "steps_run":
                    stats.setdefault(k.removeprefix("stat_"), []).append(float(v))
            n += 1
        if n == 0:
            raise ValueError("evaluate got no batches")
        tok = max(sums["tokens"], 1.0)
        out = {f"ppl_{k}": float(np.exp(min(sums[f'nll_{m}'] / tok, 50.0)))
               for k, m in (("plain", "plain"), ("base", "base"), ("ponder", "adaptive"), ("fixed", "fixed"))}
        out.update({k: float(np.mean(v)) for k, v in stats.items()})
        out["tokens"] = sums["tokens"]
        return out

    def fit(self, state: TrainState, batches: Iterable[Mapping[str, Any]], *, eval_batches: Optional[Callable] = None,
            telemetry: Any = None, progress: bool = False):
        """The stack's `fit` loop over packed batches (converted with `lm_batch`); `eval_batches()` returns
        a fresh iterable of packed eval batches.  Returns `iva_jax.train.loop.FitResult`."""
        from iva_jax.train.loop import fit

        ctx = self.cfg.context_len
        it = (lm_batch(b, ctx) for b in batches)
        ev = None
        if eval_batches is not None:
            def ev(st, _step):
                return {("eval_" + k if not k.startswith("ppl") else k): v
                        for k, v in self.evaluate(st, (lm_batch(b, ctx) for b in eval_batches())).items()}

        def blocks(m):
            return {"hrm": {k[4:]: v for k, v in m.items() if k.startswith("hrm/")}}

        return fit(self.step, state, it, self.cfg.train, eval_fn=ev, telemetry=telemetry, blocks_fn=blocks,
                   progress=progress, desc="hrm-controller")


__all__ = ("ControllerTrainConfig", "ControllerTrainer", "lm_batch", "scored_targets")
