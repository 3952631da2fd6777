"""Policy and value losses: token log-probs and entropy from logits, REINFORCE, the PPO clipped
surrogate (symmetric, asymmetric clip-higher, dual-clip) and the clipped value loss.

RLax functions keep RLax's names, argument order and semantics (`policy_gradient_loss`,
`entropy_loss`, `clipped_surrogate_pg_loss`); the token-level LM losses follow verl's
`compute_policy_loss` / `compute_value_loss` and return (loss, metrics).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from iva_jax.rl.masking import agg_loss, fill_masked, masked_mean

Array = jnp.ndarray


def logprobs_from_logits(logits: Array, labels: Array) -> Array:
    """log softmax(logits)[labels] in float32: [..., V] logits, [...] integer labels -> [...]."""
    logits = jnp.asarray(logits)
    if logits.shape[:-1] != jnp.shape(labels):
        raise ValueError(f"logits shape {logits.shape} must be labels shape {jnp.shape(labels)} + [vocab]")
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, jnp.asarray(labels)[..., None].astype(jnp.int32), axis=-1)[..., 0]


def entropy_from_logits(logits: Array) -> Array:
    """Entropy of softmax(logits) over the last axis, in float32 (verl `entropy_from_logits`).

    -inf logits (masked vocabulary entries) contribute 0, with finite gradients.
    """
    logits = jnp.asarray(logits).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.exp(logp) * jnp.where(jnp.isfinite(logp), logp, 0.0), axis=-1)


def masked_entropy(logits: Array, mask: Optional[Array], loss_agg_mode: str = "token-mean") -> Array:
    """Mean policy entropy over valid tokens of [batch, T, V] logits, aggregated as `agg_loss`."""
    return agg_loss(entropy_from_logits(fill_masked(logits, mask)), mask, loss_agg_mode)


def policy_gradient_loss(logits_t: Array, a_t: Array, adv_t: Array, w_t: Array,
                         use_stop_gradient: bool = True) -> Array:
    """REINFORCE loss -mean(log pi(a_t) * adv_t * w_t) (Williams 1992; RLax `policy_gradient_loss`)."""
    logits_t = jnp.asarray(logits_t)
    for name, x in (("a_t", a_t), ("adv_t", adv_t), ("w_t", w_t)):
        if jnp.shape(x) != logits_t.shape[:-1]:
            raise ValueError(f"{name} shape {jnp.shape(x)} must be logits_t shape {logits_t.shape} "
                             "without the last axis")
    adv_t = jax.lax.stop_gradient(adv_t) if use_stop_gradient else adv_t
    return -jnp.mean(logprobs_from_logits(logits_t, a_t) * adv_t * w_t)


def entropy_loss(logits_t: Array, w_t: Array) -> Array:
    """Entropy regularizer -mean(H(pi_t) * w_t) (Williams & Peng 1991; RLax `entropy_loss`)."""
    logits_t = jnp.asarray(logits_t)
    if jnp.shape(w_t) != logits_t.shape[:-1]:
        raise ValueError(f"w_t shape {jnp.shape(w_t)} must be logits_t shape {logits_t.shape} without the last axis")
    return -jnp.mean(entropy_from_logits(logits_t) * w_t)


def ppo_clip_objective(prob_ratios: Array, adv: Array, epsilon_low: float, epsilon_high: float,
                       dual_clip: Optional[float] = None) -> Tuple[Array, Array, Array]:
    """Per-element PPO loss -min(r A, clip(r, 1-eps_low, 1+eps_high) A), optionally dual-clipped.

    Dual clip (Ye et al. 2020, verl `clip_ratio_c`): for A < 0 the loss is capped at -c A, so a
    huge ratio on a bad action cannot blow up the update.  Returns (loss, clipped, dual_clipped)
    where `clipped` marks elements on the clipped side (zero gradient) as verl's clipfrac counts.
    """
    if jnp.shape(prob_ratios) != jnp.shape(adv):
        raise ValueError(f"prob_ratios shape {jnp.shape(prob_ratios)} != adv shape {jnp.shape(adv)}")
    unclipped = -adv * prob_ratios
    clipped_loss = -adv * jnp.clip(prob_ratios, 1.0 - epsilon_low, 1.0 + epsilon_high)
    loss = jnp.maximum(unclipped, clipped_loss)
    clipped = clipped_loss > unclipped
    if dual_clip is None:
        return loss, clipped, jnp.zeros_like(clipped)
    if not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    cap = -adv * dual_clip
    dual = (adv < 0) & (loss > cap)
    return jnp.where(adv < 0, jnp.minimum(loss, cap), loss), clipped, dual


def clipped_surrogate_pg_loss(prob_ratios_t: Array, adv_t: Array, epsilon: float,
                              use_stop_gradient: bool = True) -> Array:
    """PPO-clip loss -mean(min(r_t A_t, clip(r_t, 1-eps, 1+eps) A_t)) (Schulman et al. 2017).

    RLax `clipped_surrogate_pg_loss` (same arguments; any shape, mean over all elements).
    """
    adv_t = jax.lax.stop_gradient(adv_t) if use_stop_gradient else adv_t
    loss, _, _ = ppo_clip_objective(prob_ratios_t, adv_t, epsilon, epsilon)
    return jnp.mean(loss)


def _token_advantages(advantages: Array, shape) -> Array:
    advantages = jnp.asarray(advantages)
    if advantages.shape == tuple(shape[:1]):  # one advantage per sequence (GRPO)
        return jnp.broadcast_to(advantages[:, None], shape)
    if advantages.shape != tuple(shape):
        raise ValueError(f"advantages shape {advantages.shape} must be [batch] or [batch, T] = {tuple(shape)}")
    return advantages


def ppo_policy_loss(
    log_prob: Array,
    old_log_prob: Array,
    advantages: Array,
    response_mask: Optional[Array],
    clip_ratio_low: float = 0.2,
    clip_ratio_high: Optional[float] = None,
    clip_ratio_c: Optional[float] = None,
    loss_agg_mode: str = "token-mean",
    norm_len: Optional[int] = None,
) -> Tuple[Array, Dict[str, Array]]:
    """Token-level PPO/GRPO/DAPO policy loss, verl `compute_policy_loss`.

    log_prob, old_log_prob: [batch, T] sampled-token log-probs; advantages [batch] or [batch, T]
    (no gradient).  clip_ratio_high defaults to clip_ratio_low (symmetric PPO); DAPO clip-higher
    uses e.g. 0.2 / 0.28.  clip_ratio_c enables dual-clip.  The log-ratio is clamped to [-20, 20]
    before exp as in verl.  Metrics: clipfrac, clipfrac_lower (dual), ppo_kl (mean old - new).
    """
    log_prob = jnp.asarray(log_prob)
    if log_prob.ndim != 2 or jnp.shape(old_log_prob) != log_prob.shape:
        raise ValueError(f"log_prob {log_prob.shape} and old_log_prob {jnp.shape(old_log_prob)} "
                         "must be the same [batch, T]")
    eps_high = clip_ratio_low if clip_ratio_high is None else clip_ratio_high
    if not (0 < clip_ratio_low < 1 and eps_high > 0):
        raise ValueError(f"need 0 < clip_ratio_low < 1 and clip_ratio_high > 0, got {clip_ratio_low}, {eps_high}")
    adv = jax.lax.stop_gradient(_token_advantages(advantages, log_prob.shape).astype(jnp.float32))
    adv, log_prob, old_log_prob = (fill_masked(x, response_mask) for x in (adv, log_prob, old_log_prob))
    old_log_prob = jax.lax.stop_gradient(old_log_prob).astype(jnp.float32)
    log_ratio = jnp.clip(log_prob.astype(jnp.float32) - old_log_prob, -20.0, 20.0)
    ratio = jnp.exp(log_ratio)
    losses, clipped, dual = ppo_clip_objective(ratio, adv, clip_ratio_low, eps_high, clip_ratio_c)
    loss = agg_loss(losses, response_mask, loss_agg_mode, norm_len)
    metrics = {
        "clipfrac": masked_mean(clipped.astype(jnp.float32), response_mask),
        "clipfrac_lower": masked_mean(dual.astype(jnp.float32), response_mask),
        "ppo_kl": masked_mean(jax.lax.stop_gradient(-log_ratio), response_mask),
    }
    return loss, metrics


def clipped_value_loss(
    values: Array,
    old_values: Array,
    returns: Array,
    response_mask: Optional[Array],
    clip_range_value: Optional[float] = 0.2,
    loss_agg_mode: str = "token-mean",
) -> Tuple[Array, Dict[str, Array]]:
    """PPO value loss 0.5 * agg(max((V - R)^2, (V_clip - R)^2)), V_clip = V_old + clip(V - V_old, +-c).

    Matches verl `compute_value_loss` and TRL PPOTrainer (`cliprange_value`); clip_range_value=None
    gives the plain 0.5 * (V - R)^2.  Metrics: vf_clipfrac.
    """
    values = jnp.asarray(values)
    for name, x in (("old_values", old_values), ("returns", returns)):
        if jnp.shape(x) != values.shape:
            raise ValueError(f"{name} shape {jnp.shape(x)} must equal values shape {values.shape}")
    values = fill_masked(values, response_mask)
    returns = jax.lax.stop_gradient(fill_masked(returns, response_mask))
    old_values = jax.lax.stop_gradient(fill_masked(old_values, response_mask))
    l1 = jnp.square(values - returns)
    if clip_range_value is None:
        return 0.5 * agg_loss(l1, response_mask, loss_agg_mode), {"vf_clipfrac": jnp.zeros((), jnp.float32)}
    v_clip = old_values + jnp.clip(values - old_values, -clip_range_value, clip_range_value)
    l2 = jnp.square(v_clip - returns)
    loss = 0.5 * agg_loss(jnp.maximum(l1, l2), response_mask, loss_agg_mode)
    return loss, {"vf_clipfrac": masked_mean((l2 > l1).astype(jnp.float32), response_mask)}
