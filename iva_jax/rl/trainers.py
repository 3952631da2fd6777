"""RL trainers on the train stack (TrainState, make_optimizer, sharded_jit): PPO with a value head
and GRPO (one policy-gradient trainer, verl's loop), DPO on preference pairs, and a pairwise reward model.

State is explicit (`RLState`); a trainer holds the compiled functions, so several seeds reuse one
compile.  One step of `PolicyGradientTrainer`:

  rollout   G samples per prompt from the jitted `generate` (left-padded prompts), response mask
            to the first EOS; one teacher-forced forward gives old log-probs (logits / temperature),
            entropy, values (PPO) and, from the frozen reference, ref log-probs
  reward    reward_fn(rollout) on the host, then the optional `reward_hook` (HRM-RPO shaping)
  advantage GRPO: group-normalized outcome advantages; PPO: KL-penalized token rewards, GAE, whitening
  update    ppo_epochs x mini_batches jitted steps: clipped surrogate (+ KL loss vs the reference,
            - entropy bonus, + clipped value loss), optimizer chain from TrainConfig
  KL coef   fixed or adaptive (Ziegler et al.), fed the rollout's mean summed KL

Metrics per step (host floats): reward_mean/std, kl, clipfrac, entropy, response_length,
rollout_tokens_per_s, update_tokens_per_s, ...; `telemetry_record` files them into the schema.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Dict, Mapping, Optional, Protocol, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from iva_jax.config import dtype_of
from iva_jax.parallel.rules import DEFAULT_RULES
from iva_jax.parallel.sharding import batch_sharding, replicated, sharded_jit
from iva_jax.rl.advantages import gae_advantages_and_returns, grpo_advantages, kl_penalized_rewards
from iva_jax.rl.config import RLConfig
from iva_jax.rl.kl import adaptive_kl_update, kl_penalty
from iva_jax.rl.masking import agg_loss, fill_masked, masked_mean, masked_whiten
from iva_jax.rl.policy import Policy, cast_floating, response_forward, sequence_logprobs, sequence_scores
from iva_jax.rl.policy_losses import clipped_value_loss, ppo_policy_loss
from iva_jax.rl.preference import dpo_loss, pairwise_reward_loss
from iva_jax.rl.rollout import PromptBatch, RewardFn, Rollout, rollout_stats, sample_rollout
from iva_jax.train.optim import make_optimizer, make_schedule, optimizer_metrics
from iva_jax.train.step import TrainState, create_train_state

Array = jnp.ndarray
_global_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm

QUALITY_KEYS = ("loss", "grad_norm", "lr", "skipped")


@dataclasses.dataclass(frozen=True)
class RLState:
    """train: the TrainState (params {"lm", ["head"]}, opt state, LoRA base as `frozen`);
    ref: frozen reference decoder params in compute dtype (None under LoRA, whose base is the
    reference, or when no KL is used); kl_coef: the controller's current coefficient; key: sampling key."""

    train: TrainState
    ref: Any = None
    kl_coef: float = 0.0
    key: Any = None
    step: int = 0
    seed: int = 0

    def replace(self, **kw) -> "RLState":
        return dataclasses.replace(self, **kw)


class RewardHook(Protocol):
    """Reward shaping plugged into the policy-gradient trainer (HRM-RPO's controller lives here).

    `__call__(rollout, rewards [N], hidden [N, T, D] or None) -> (shaped [N], metrics)` runs after
    the task reward and before the advantages; `needs_hidden` asks the trainer for the policy's
    hidden states at the response positions (else hidden is None).  An optional
    `update(rollout, hidden) -> metrics` trains the hook's own model (e.g. the HRM controller) once
    per rollout, right after shaping (the rollout then holds rewards and the shaped scores).
    """

    needs_hidden: bool

    def __call__(self, rollout: Rollout, rewards: np.ndarray,
                 hidden: Optional[Array]) -> Tuple[np.ndarray, Dict[str, float]]: ...


def _copy(tree: Any, dtype=None) -> Any:
    return jax.tree_util.tree_map(
        lambda x: jnp.array(x, dtype=dtype if dtype is not None and jnp.issubdtype(jnp.result_type(x), jnp.floating)
                            else None, copy=True), tree)


def _host(metrics: Mapping[str, Any]) -> Dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}


def _mean_metrics(ms) -> Dict[str, float]:
    ms = [_host(m) for m in ms]
    return {k: float(np.mean([m[k] for m in ms])) for k in ms[0]} if ms else {}


class _Trainer:
    """Shared pieces: optimizer (cfg.train's make_optimizer chain unless `tx` is given), state
    creation, the jitted optimizer step."""

    updates_per_step = 1

    def __init__(self, policy: Policy, cfg: RLConfig, mesh=None, rules=DEFAULT_RULES,
                 tx: Optional[optax.GradientTransformation] = None):
        if not isinstance(policy, Policy):
            raise ValueError(f"policy must be an iva_jax.rl.policy.Policy, got {type(policy).__name__}")
        if not isinstance(cfg, RLConfig):
            raise ValueError(f"cfg must be an RLConfig, got {type(cfg).__name__}")
        self.policy, self.cfg, self.mesh, self.rules = policy, cfg, mesh, rules
        # the schedule counts optimizer updates: train.steps RL steps of `updates_per_step` each
        opt_cfg = cfg.train.replace(steps=cfg.train.steps * self.updates_per_step)
        self.schedule = make_schedule(opt_cfg)
        self.tx = optax.with_extra_args_support(tx if tx is not None else make_optimizer(opt_cfg, self.schedule))
        self.compute_dtype = dtype_of(policy.model.config.dtype)

    def _jit(self, fn, donate_argnums=(), static_argnums=()):
        return sharded_jit(fn, mesh=self.mesh, donate_argnums=donate_argnums, static_argnums=static_argnums,
                           rules=self.rules)

    def _place(self, tree):
        """Replicate on the mesh (data parallel: params replicated, batches split) or keep as is."""
        return tree if self.mesh is None else jax.device_put(tree, replicated(self.mesh))

    def _shard(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        """Split a batch's leading dimension over the mesh's batch axes (no-op without a mesh)."""
        if self.mesh is None:
            return batch
        n = int(np.shape(next(iter(batch.values())))[0])
        return jax.device_put(batch, batch_sharding(self.mesh, self.rules, n))

    needs_reference = True

    def init_state(self, lm_params: Any, seed: Optional[int] = None, reference: Optional[bool] = None) -> RLState:
        """Fresh state from pretrained decoder params (copied: the trainer donates its state).

        `reference`: keep a frozen copy of the decoder as the KL/DPO reference (default: when the
        algorithm uses one; never under LoRA, whose frozen base is the reference).
        """
        reference = self.needs_reference if reference is None else reference
        seed = self.cfg.seed if seed is None else seed
        k_init, k_state, k_sample = jax.random.split(jax.random.PRNGKey(seed), 3)
        params, frozen = self.policy.init_params(lm_params, k_init)
        params = _copy(params, dtype_of(self.cfg.train.param_dtype))
        frozen = None if frozen is None else _copy(frozen, self.compute_dtype)
        train, _ = create_train_state(params, self.tx, k_state, param_dtype=None, frozen=frozen)
        train = self._place(train)
        ref = None
        if reference and self.policy.lora is None:
            ref = self._place(_copy(lm_params, self.compute_dtype))
        return RLState(train=train, ref=ref, kl_coef=float(self.cfg.kl_coef), key=k_sample, step=0, seed=int(seed))

    def _apply_grads(self, train: TrainState, loss: Array, grads: Any, metrics: Dict[str, Array]):
        updates, opt_state = self.tx.update(grads, train.opt_state, train.params, value=loss)
        params = optax.apply_updates(train.params, updates)
        metrics = dict(metrics, grad_norm=_global_norm(grads), **optimizer_metrics(opt_state, self.schedule))
        return train.replace(step=train.step + 1, params=params, opt_state=opt_state), metrics


# ------------------------------------------------------------------------------------------------
# PPO / GRPO
# ------------------------------------------------------------------------------------------------
class PolicyGradientTrainer(_Trainer):
    """PPO (value head, GAE, KL in the reward) and GRPO / Dr. GRPO / DAPO / HRM-RPO (group advantages,
    KL loss to the frozen reference) from one RLConfig; see the module docstring for the loop."""

    def __init__(self, policy: Policy, cfg: RLConfig, reward_fn: RewardFn, *, reward_hook: Optional[RewardHook] = None,
                 eos_token_id: Any = None, pad_token_id: Optional[int] = None, mesh=None, rules=DEFAULT_RULES,
                 tx: Optional[optax.GradientTransformation] = None):
        self.updates_per_step = cfg.ppo_epochs * cfg.mini_batches
        super().__init__(policy, cfg, mesh, rules, tx)
        if cfg.algorithm not in ("ppo", "grpo", "hrm_rpo"):
            raise ValueError(f"algorithm={cfg.algorithm!r}: PolicyGradientTrainer runs ppo, grpo or hrm_rpo")
        if cfg.algorithm == "ppo" and not policy.head:
            raise ValueError("algorithm='ppo' needs a value head: Policy(model, head=True)")
        if cfg.algorithm == "hrm_rpo" and reward_hook is None:
            raise ValueError("algorithm='hrm_rpo' needs a reward_hook (e.g. iva_jax.rl.shaping.HRMRPOShaping)")
        if not callable(reward_fn):
            raise ValueError("reward_fn must be callable: reward_fn(rollout) -> [N] rewards")
        self.reward_fn, self.reward_hook = reward_fn, reward_hook
        mc = policy.model.config
        self.eos_token_id = mc.eos_token_id if eos_token_id is None else eos_token_id
        self.pad_token_id = pad_token_id
        self.uses_value = cfg.algorithm == "ppo"
        self.uses_ref = cfg.kl_mode != "none" and (cfg.kl_coef > 0 or cfg.adaptive_kl)
        self.needs_reference = self.uses_ref
        self._sampling_params = self._jit(
            lambda params, frozen: cast_floating(policy.decoder_params(params, frozen), self.compute_dtype))
        self._score = self._jit(self._score_impl, static_argnums=(6, 7))
        self._advantages = self._jit(self._advantages_impl)
        self._update = self._jit(self._update_impl, donate_argnums=(0,), static_argnums=(3,))

    # ---- jitted pieces -------------------------------------------------------------------------
    def _score_impl(self, params, frozen, ref, input_ids, attention_mask, responses, prompt_len: int,
                    with_hidden: bool):
        pol, cfg = self.policy, self.cfg
        out = response_forward(pol, pol.decoder_params(params, frozen), input_ids, attention_mask, prompt_len,
                               responses, cfg.temperature)
        res = {"old_logp": out["logp"], "entropy": out["entropy"]}
        if self.uses_value:
            res["values"] = pol.head_apply(params, out["hidden"])
        if with_hidden:
            res["hidden"] = out["hidden"]
        if self.uses_ref:
            ref_dec = frozen if pol.lora is not None else ref
            res["ref_logp"] = response_forward(pol, ref_dec, input_ids, attention_mask, prompt_len, responses,
                                               cfg.temperature)["logp"]
        return res

    def _advantages_impl(self, scores, old_logp, ref_logp, values, mask, kl_coef):
        cfg = self.cfg
        out = {}
        if ref_logp is not None:
            kl = jnp.where(mask, kl_penalty(fill_masked(old_logp, mask), fill_masked(ref_logp, mask),
                                            cfg.kl_estimator), 0.0)
        else:
            kl = jnp.zeros(old_logp.shape, jnp.float32)
        out["kl"] = masked_mean(kl, mask)
        out["kl_seq"] = jnp.mean(jnp.sum(kl, axis=-1))
        in_reward = cfg.kl_mode == "reward" and ref_logp is not None
        if self.uses_value:
            rewards, _ = kl_penalized_rewards(scores, old_logp, old_logp if ref_logp is None else ref_logp, mask,
                                              kl_coef if in_reward else 0.0, cfg.kl_estimator)
            adv, returns = gae_advantages_and_returns(rewards, values, mask, cfg.gamma, cfg.lam)
            if cfg.whiten_advantages:
                adv = masked_whiten(adv, mask)
            out.update(advantages=adv, returns=returns, scores=scores)
        else:
            if in_reward:
                scores = scores - kl_coef * jnp.sum(kl, axis=-1)
            out.update(advantages=grpo_advantages(scores, cfg.group_size, cfg.scale_rewards, cfg.adv_eps),
                       scores=scores)
        return out

    def _update_impl(self, train: TrainState, mb: Dict[str, Array], kl_coef, prompt_len: int):
        pol, cfg = self.policy, self.cfg
        mask = mb["response_mask"]

        def loss_fn(params):
            out = response_forward(pol, pol.decoder_params(params, train.frozen), mb["input_ids"],
                                   mb["attention_mask"], prompt_len, mb["responses"], cfg.temperature)
            pg_loss, m = ppo_policy_loss(out["logp"], mb["old_logp"], mb["advantages"], mask, cfg.clip_ratio_low,
                                         cfg.clip_ratio_high, cfg.clip_ratio_c, cfg.loss_agg_mode,
                                         cfg.resolved_norm_len)
            entropy = agg_loss(out["entropy"], mask, cfg.loss_agg_mode, cfg.resolved_norm_len)
            loss = pg_loss
            if cfg.entropy_coef > 0:
                loss = loss - cfg.entropy_coef * entropy
            m = dict(m, pg_loss=pg_loss, entropy=entropy)
            if self.uses_ref and cfg.kl_mode == "loss":
                kl = kl_penalty(fill_masked(out["logp"], mask), fill_masked(mb["ref_logp"], mask), cfg.kl_estimator)
                kl_loss = agg_loss(kl, mask, cfg.loss_agg_mode, cfg.resolved_norm_len)
                loss = loss + kl_coef * kl_loss
                m["kl_loss"] = kl_loss
            if self.uses_value:
                values = pol.head_apply(params, out["hidden"])
                vf_loss, vm = clipped_value_loss(values, mb["values"], mb["returns"], mask, cfg.clip_range_value,
                                                 cfg.loss_agg_mode)
                loss = loss + cfg.vf_coef * vf_loss
                m.update(vm, vf_loss=vf_loss)
            m["loss"] = loss
            return loss, m

        (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(train.params)
        return self._apply_grads(train, loss, grads, m)

    # ---- host loop -----------------------------------------------------------------------------
    def sample(self, state: RLState, prompts: PromptBatch, key: jax.Array, *, group_size: int,
               temperature: float) -> Rollout:
        """Responses only (no scoring): `group_size` samples per prompt at `temperature` (0 = greedy)."""
        cfg = self.cfg
        dec = self._sampling_params(state.train.params, state.train.frozen)
        return sample_rollout(self.policy.model, dec, prompts, group_size=group_size,
                              max_new_tokens=cfg.max_new_tokens, temperature=temperature, key=key,
                              top_k=cfg.top_k, top_p=cfg.top_p, eos_token_id=self.eos_token_id,
                              pad_token_id=self.pad_token_id)

    def rollout(self, state: RLState, prompts: PromptBatch) -> Tuple[RLState, Rollout, Dict[str, float]]:
        """Sample G responses per prompt, score them, reward them and compute advantages."""
        cfg = self.cfg
        if len(prompts) != cfg.prompts_per_step:
            raise ValueError(f"got {len(prompts)} prompts, RLConfig.prompts_per_step={cfg.prompts_per_step}")
        if self.uses_ref and self.policy.lora is None and state.ref is None:
            raise ValueError("this config uses a KL reference but the state has none: init_state(..., reference=True)")
        key, sub = jax.random.split(state.key)
        state = state.replace(key=key)
        t0 = time.perf_counter()
        ro = self.sample(state, prompts, sub, group_size=cfg.group_size, temperature=cfg.temperature)
        jax.block_until_ready(ro.responses)
        t_gen = time.perf_counter() - t0
        need_hidden = bool(getattr(self.reward_hook, "needs_hidden", False))
        b = self._shard({"ids": ro.input_ids, "mask": ro.attention_mask, "responses": jnp.asarray(ro.responses)})
        sc = self._score(state.train.params, state.train.frozen, state.ref, b["ids"], b["mask"], b["responses"],
                         ro.prompt_len, need_hidden)
        hidden = sc.pop("hidden", None)
        ro = ro.replace(**sc)
        jax.block_until_ready(ro.old_logp)
        t_score = time.perf_counter() - t0 - t_gen
        rewards = np.asarray(self.reward_fn(ro), np.float32)
        if rewards.shape != (ro.responses.shape[0],):
            raise ValueError(f"reward_fn returned shape {rewards.shape}, expected ({ro.responses.shape[0]},)")
        ro = ro.replace(rewards=rewards)
        metrics: Dict[str, float] = {}
        scores = rewards
        if self.reward_hook is not None:
            scores, hook_metrics = self.reward_hook(ro, rewards, hidden)
            scores = np.asarray(scores, np.float32)
            if scores.shape != rewards.shape:
                raise ValueError(f"reward_hook returned shape {scores.shape}, expected {rewards.shape}")
            metrics.update({f"hook/{k}": float(v) for k, v in hook_metrics.items()})
        mask = jnp.asarray(ro.response_mask)
        adv = self._advantages(jnp.asarray(scores), ro.old_logp, ro.ref_logp, ro.values, mask,
                               jnp.float32(state.kl_coef))
        ro = ro.replace(advantages=adv["advantages"], returns=adv.get("returns"), scores=adv["scores"])
        t_total = time.perf_counter() - t0
        new_tokens = float(np.asarray(ro.response_mask).sum())
        metrics.update(rollout_stats(ro))
        metrics.update(kl=float(adv["kl"]), kl_seq=float(adv["kl_seq"]),
                       rollout_entropy=float(masked_mean(ro.entropy, mask)),
                       score_mean=float(np.mean(np.asarray(ro.scores))),
                       rollout_new_tokens=new_tokens, rollout_tokens_per_s=new_tokens / max(t_gen, 1e-9),
                       t_generate_s=t_gen, t_score_s=t_score, t_rollout_s=t_total)
        if hasattr(self.reward_hook, "update"):
            metrics.update({f"hook/{k}": float(v) for k, v in self.reward_hook.update(ro, hidden).items()})
        return state, ro, metrics

    def _batch(self, ro: Rollout) -> Dict[str, Array]:
        b = {"input_ids": ro.input_ids, "attention_mask": ro.attention_mask, "responses": jnp.asarray(ro.responses),
             "response_mask": jnp.asarray(ro.response_mask), "old_logp": ro.old_logp, "advantages": ro.advantages}
        if self.uses_ref:
            b["ref_logp"] = ro.ref_logp
        if self.uses_value:
            b["values"], b["returns"] = ro.values, ro.returns
        for k, v in b.items():
            if v is None:
                raise ValueError(f"rollout lacks {k!r}: run it through trainer.rollout first")
        return b

    def update(self, state: RLState, ro: Rollout) -> Tuple[RLState, Dict[str, float]]:
        """ppo_epochs passes of mini_batches optimizer steps over one scored rollout."""
        cfg = self.cfg
        batch = self._batch(ro)
        n = batch["input_ids"].shape[0]
        mb = n // cfg.mini_batches
        rng = np.random.default_rng([state.seed, state.step])
        kl_coef = jnp.float32(state.kl_coef)
        t0 = time.perf_counter()
        train, ms = state.train, []
        for _ in range(cfg.ppo_epochs):
            perm = rng.permutation(n) if cfg.mini_batches > 1 else None
            for i in range(cfg.mini_batches):
                if perm is None:
                    part = batch
                else:
                    idx = jnp.asarray(perm[i * mb:(i + 1) * mb])
                    part = {k: jnp.take(v, idx, axis=0) for k, v in batch.items()}
                train, m = self._update(train, self._shard(part), kl_coef, ro.prompt_len)
                ms.append(m)
        jax.block_until_ready(train.params)
        dt = time.perf_counter() - t0
        metrics = _mean_metrics(ms)
        tokens = float(np.asarray(batch["attention_mask"]).sum()) * cfg.ppo_epochs
        metrics.update(update_tokens=tokens, update_tokens_per_s=tokens / max(dt, 1e-9), t_update_s=dt,
                       updates=float(len(ms)))
        return state.replace(train=train), metrics

    def step(self, state: RLState, prompts: PromptBatch) -> Tuple[RLState, Dict[str, float]]:
        """One RL step: rollout, update, KL-coefficient update.  Metrics are host floats."""
        cfg = self.cfg
        t0 = time.perf_counter()
        state, ro, rm = self.rollout(state, prompts)
        state, um = self.update(state, ro)
        metrics = {**rm, **um, "kl_coef": state.kl_coef}
        if cfg.adaptive_kl and self.uses_ref:
            state = state.replace(kl_coef=float(adaptive_kl_update(state.kl_coef, rm["kl_seq"], ro.responses.shape[0],
                                                                   cfg.kl_target, cfg.kl_horizon)))
        metrics["t_step_s"] = time.perf_counter() - t0
        return state.replace(step=state.step + 1), metrics

    def evaluate(self, state: RLState, prompts: PromptBatch, *, temperature: float = 0.0, seed: int = 0,
                 batch_size: Optional[int] = None, metrics: Optional[Mapping[str, RewardFn]] = None) -> Dict[str, Any]:
        """One response per prompt (greedy by default) in fixed-size chunks (one compile), scored by
        `metrics` (name -> RewardFn; default {"reward": reward_fn}).

        Returns {name + "_mean": float, name: [n] array for each metric, "response_length"}; `seed`
        fixes the sampling keys, so evaluations before and after training see the same noise.
        """
        fns = dict(metrics) if metrics else {"reward": self.reward_fn}
        bs = batch_size or self.cfg.rollout_batch
        n = len(prompts)
        scores: Dict[str, list] = {k: [] for k in fns}
        lengths = []
        key = jax.random.PRNGKey(seed)
        for start in range(0, n, bs):
            idx = list(range(start, min(start + bs, n)))
            k = len(idx)
            idx += [idx[-1]] * (bs - k)  # pad the last chunk: same shape, same compiled program
            key, sub = jax.random.split(key)
            ro = self.sample(state, prompts.take(idx), sub, group_size=1, temperature=temperature)
            ro = _head(ro, k)
            for name, fn in fns.items():
                scores[name].append(np.asarray(fn(ro), np.float32))
            lengths.append(np.asarray(ro.response_mask).sum(axis=1))
        out: Dict[str, Any] = {"response_length": float(np.concatenate(lengths).mean())}
        for name, parts in scores.items():
            out[name] = np.concatenate(parts)
            out[name + "_mean"] = float(out[name].mean())
        return out


def _head(ro: Rollout, k: int) -> Rollout:
    """The first k rows of an unscored rollout."""
    return ro.replace(prompt_ids=ro.prompt_ids[:k], prompt_mask=ro.prompt_mask[:k], responses=ro.responses[:k],
                      response_mask=ro.response_mask[:k], metas=tuple(ro.metas[:k]))


class GRPOTrainer(PolicyGradientTrainer):
    """The policy-gradient trainer for cfg.algorithm 'grpo' (or 'hrm_rpo' with a reward_hook)."""

    def __init__(self, policy: Policy, cfg: RLConfig, reward_fn: RewardFn, **kw):
        if cfg.algorithm not in ("grpo", "hrm_rpo"):
            raise ValueError(f"GRPOTrainer needs algorithm 'grpo' or 'hrm_rpo', got {cfg.algorithm!r}")
        super().__init__(policy, cfg, reward_fn, **kw)


class PPOTrainer(PolicyGradientTrainer):
    """The policy-gradient trainer for cfg.algorithm 'ppo' (the policy needs head=True: the value head)."""

    def __init__(self, policy: Policy, cfg: RLConfig, reward_fn: RewardFn, **kw):
        if cfg.algorithm != "ppo":
            raise ValueError(f"PPOTrainer needs algorithm 'ppo', got {cfg.algorithm!r}")
        super().__init__(policy, cfg, reward_fn, **kw)


# ------------------------------------------------------------------------------------------------
# preference pairs: DPO and the reward model
# ------------------------------------------------------------------------------------------------
PAIR_KEYS = ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")


def _check_pairs(batch: Mapping[str, Any], loss_masks: bool) -> None:
    keys = PAIR_KEYS + (("chosen_loss_mask", "rejected_loss_mask") if loss_masks else ())
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(f"preference batch lacks {missing} (see iva_jax.rl.rollout.preference_batch)")
    shape = np.shape(batch["chosen_ids"])
    for k in keys:
        if np.shape(batch[k]) != shape or len(shape) != 2:
            raise ValueError(f"{k} shape {np.shape(batch[k])} must equal chosen_ids shape {shape} ([B, S])")


def _concat_pairs(batch, suffix: str) -> Array:
    return jnp.concatenate([jnp.asarray(batch["chosen" + suffix]), jnp.asarray(batch["rejected" + suffix])], axis=0)


class DPOTrainer(_Trainer):
    """DPO on preference pairs (TRL DPOTrainer): chosen and rejected in one concatenated forward,
    reference log-probs from the frozen reference (the LoRA base under LoRA) in the same step."""

    def __init__(self, policy: Policy, cfg: RLConfig, mesh=None, rules=DEFAULT_RULES,
                 tx: Optional[optax.GradientTransformation] = None):
        super().__init__(policy, cfg, mesh, rules, tx)
        self._step = self._jit(self._step_impl, donate_argnums=(0,))
        self._eval = self._jit(lambda train, ref, batch: self._losses(train.params, train, ref, batch)[1])

    def _logps(self, dec, batch) -> Tuple[Array, Array]:
        ids, am, lm = (_concat_pairs(batch, s) for s in ("_ids", "_mask", "_loss_mask"))
        lp = sequence_logprobs(self.policy, dec, ids, am, lm, average=self.cfg.dpo_loss_type == "ipo")
        b = lp.shape[0] // 2
        return lp[:b], lp[b:]

    def _losses(self, params, train: TrainState, ref, batch):
        cfg, pol = self.cfg, self.policy
        ref_c, ref_r = self._logps(train.frozen if pol.lora is not None else ref, batch)
        pc, pr = self._logps(pol.decoder_params(params, train.frozen), batch)
        losses, cr, rr = dpo_loss(pc, pr, jax.lax.stop_gradient(ref_c), jax.lax.stop_gradient(ref_r), cfg.dpo_beta,
                                  cfg.dpo_loss_type, cfg.label_smoothing)
        loss = jnp.mean(losses)
        return loss, {"loss": loss, "rewards_chosen": cr.mean(), "rewards_rejected": rr.mean(),
                      "reward_margin": (cr - rr).mean(), "reward_accuracy": jnp.mean((cr > rr).astype(jnp.float32))}

    def _step_impl(self, train: TrainState, ref, batch):
        (loss, m), grads = jax.value_and_grad(lambda p: self._losses(p, train, ref, batch), has_aux=True)(train.params)
        return self._apply_grads(train, loss, grads, m)

    def step(self, state: RLState, batch: Mapping[str, Any]) -> Tuple[RLState, Dict[str, float]]:
        """One optimizer step on a batch of pairs (chosen/rejected _ids, _mask, _loss_mask [B, S])."""
        _check_pairs(batch, loss_masks=True)
        if self.policy.lora is None and state.ref is None:
            raise ValueError("DPO needs a reference: init_state(..., reference=True)")
        t0 = time.perf_counter()
        train, m = self._step(state.train, state.ref, dict(batch))
        m = _host(m)
        m["t_step_s"] = time.perf_counter() - t0
        return state.replace(train=train, step=state.step + 1), m

    def evaluate(self, state: RLState, batch: Mapping[str, Any]) -> Dict[str, float]:
        """Loss and implicit-reward statistics without an update."""
        _check_pairs(batch, loss_masks=True)
        return _host(self._eval(state.train, state.ref, dict(batch)))


class RewardModelTrainer(_Trainer):
    """Bradley-Terry reward model (TRL RewardTrainer): a ScalarHead on the last real token's hidden state."""

    def __init__(self, policy: Policy, cfg: RLConfig, mesh=None, rules=DEFAULT_RULES,
                 tx: Optional[optax.GradientTransformation] = None):
        if not policy.head:
            raise ValueError("a reward model needs Policy(model, head=True)")
        super().__init__(policy, cfg, mesh, rules, tx)
        self.needs_reference = False
        self._step = self._jit(self._step_impl, donate_argnums=(0,))
        self._scores = self._jit(lambda train, ids, mask: sequence_scores(
            policy, train.params, policy.decoder_params(train.params, train.frozen), ids, mask))

    def _losses(self, params, train: TrainState, batch):
        pol = self.policy
        s = sequence_scores(pol, params, pol.decoder_params(params, train.frozen), _concat_pairs(batch, "_ids"),
                            _concat_pairs(batch, "_mask"))
        b = s.shape[0] // 2
        rc, rr = s[:b], s[b:]
        loss = pairwise_reward_loss(rc, rr, batch.get("margin"))
        return loss, {"loss": loss, "accuracy": jnp.mean((rc > rr).astype(jnp.float32)), "margin": jnp.mean(rc - rr),
                      "reward_mean": jnp.mean(s)}

    def _step_impl(self, train: TrainState, batch):
        (loss, m), grads = jax.value_and_grad(lambda p: self._losses(p, train, batch), has_aux=True)(train.params)
        return self._apply_grads(train, loss, grads, m)

    def step(self, state: RLState, batch: Mapping[str, Any]) -> Tuple[RLState, Dict[str, float]]:
        """One optimizer step on pairs (chosen/rejected _ids and _mask [B, S]; optional margin [B])."""
        _check_pairs(batch, loss_masks=False)
        t0 = time.perf_counter()
        train, m = self._step(state.train, dict(batch))
        m = _host(m)
        m["t_step_s"] = time.perf_counter() - t0
        return state.replace(train=train, step=state.step + 1), m

    def evaluate(self, state: RLState, batch: Mapping[str, Any]) -> Dict[str, float]:
        """Pairwise loss, accuracy (chosen scored higher) and margin without an update (via `score`)."""
        _check_pairs(batch, loss_masks=False)
        rc, rr = (self.score(state, batch[f"{k}_ids"], batch[f"{k}_mask"]) for k in ("chosen", "rejected"))
        m = {"loss": pairwise_reward_loss(rc, rr, batch.get("margin")), "accuracy": jnp.mean(rc > rr),
             "margin": jnp.mean(rc - rr), "reward_mean": (jnp.mean(rc) + jnp.mean(rr)) / 2}
        return _host(m)

    def score(self, state: RLState, input_ids: Array, attention_mask: Array) -> Array:
        """Scalar rewards [B] of full sequences (prompt + response)."""
        return self._scores(state.train, jnp.asarray(input_ids), jnp.asarray(attention_mask))

    def reward_fn(self, state: RLState) -> RewardFn:
        """A RewardFn for the policy-gradient trainer that scores rollouts with this model (frozen)."""
        return lambda ro: np.asarray(self.score(state, ro.input_ids, ro.attention_mask), np.float32)


# ------------------------------------------------------------------------------------------------
# telemetry
# ------------------------------------------------------------------------------------------------
def telemetry_record(telemetry, step: int, metrics: Mapping[str, float],
                     eval_metrics: Optional[Mapping[str, float]] = None) -> Dict[str, Any]:
    """File an RL step into the telemetry schema: quality (loss, grad_norm, lr, skipped), speed
    (all tokens of the step / step time), an `rl` block with everything else, optional `eval`."""
    m = dict(metrics)
    quality = {k: m[k] for k in QUALITY_KEYS if k in m}
    quality["ppl"] = float("nan")  # not a language-modelling loss
    tokens = m.get("rollout_new_tokens", 0.0) + m.get("update_tokens", 0.0)
    blocks = {"rl": {k: v for k, v in m.items() if k not in QUALITY_KEYS}}
    if eval_metrics:
        blocks["eval"] = dict(eval_metrics)
    return telemetry.log(int(step), quality, tokens=tokens, step_time_s=m.get("t_step_s"), blocks=blocks)
