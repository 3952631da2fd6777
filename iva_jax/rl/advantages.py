"""Advantage estimators: GAE(lambda) with per-step discounts and masks, GRPO group advantages,
and the KL-penalized token rewards of RLHF-style PPO.

Time is the last axis everywhere; leading axes are batch axes.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import jax
import jax.numpy as jnp

from iva_jax.rl.kl import kl_penalty
from iva_jax.rl.masking import fill_masked

Array = jnp.ndarray

GRPO_REWARD_SCALES = ("group", "batch", "none")


def _broadcast(name: str, x, shape: Tuple[int, ...], dtype) -> Array:
    x = jnp.asarray(x)
    try:
        return jnp.broadcast_to(x.astype(dtype), shape)
    except ValueError:
        raise ValueError(f"{name} shape {x.shape} does not broadcast to r_t shape {shape}") from None


def truncated_generalized_advantage_estimation(
    r_t: Array,
    discount_t: Array,
    lambda_: Union[float, Array],
    values: Array,
    stop_target_gradients: bool = False,
    mask_t: Optional[Array] = None,
) -> Array:
    """GAE(lambda) of Schulman et al. (2016), RLax's function with its name and argument order.

    A_t = delta_t + discount_t * lambda_t * A_{t+1},  delta_t = r_t + discount_t * v_{t+1} - v_t,
    with `values` one longer than `r_t` on the time (last) axis; a terminal is discount_t = 0.
    Extension: `mask_t` (same shape as r_t) makes masked steps transparent: they get advantage 0
    and the recursion and the bootstrap value skip over them to the next valid step, so whatever
    sits in padded rewards/values/discounts cannot leak.  Without a mask this equals RLax exactly.
    """
    r_t = jnp.asarray(r_t)
    values = jnp.asarray(values)
    if r_t.ndim < 1:
        raise ValueError(f"r_t must have a time axis, got shape {r_t.shape}")
    if values.shape != r_t.shape[:-1] + (r_t.shape[-1] + 1,):
        raise ValueError(f"values shape {values.shape} must be r_t shape {r_t.shape} with T+1 on the last axis")
    dtype = jnp.result_type(r_t, values, jnp.float32)
    discount_t = _broadcast("discount_t", discount_t, r_t.shape, dtype)
    lam = _broadcast("lambda_", lambda_, r_t.shape, dtype)
    mask = _broadcast("mask_t", True if mask_t is None else mask_t, r_t.shape, bool)

    def body(carry, xs):
        next_v, acc = carry
        r, d, lam_, v, m = xs
        adv = r + d * next_v - v + d * lam_ * acc
        carry = (jnp.where(m, v, next_v), jnp.where(m, adv, acc))
        return carry, jnp.where(m, adv, 0)

    # Zero the masked inputs first so NaN/inf padding cannot reach values or gradients.
    clean = [jnp.where(mask, x, 0).astype(dtype) for x in (r_t, discount_t, lam, values[..., :-1])]
    xs = tuple(jnp.moveaxis(x, -1, 0) for x in clean + [mask])
    init = (values[..., -1].astype(dtype), jnp.zeros(r_t.shape[:-1], dtype))
    _, adv = jax.lax.scan(body, init, xs, reverse=True)
    adv = jnp.moveaxis(adv, 0, -1)
    return jax.lax.stop_gradient(adv) if stop_target_gradients else adv


def gae_advantages_and_returns(rewards: Array, values: Array, response_mask: Array, gamma: float = 1.0,
                               lam: float = 1.0) -> Tuple[Array, Array]:
    """Token-level GAE for LM responses (verl `compute_gae_advantage_return`, TRL PPOTrainer).

    rewards, values, response_mask: [batch, T].  The episode ends after the last valid token
    (bootstrap value 0); masked tokens are skipped.  Returns (advantages, returns = A + V), both
    zero on masked tokens and carrying no gradient (they are targets).  Whitening is separate.
    """
    values = jnp.asarray(values)
    if jnp.shape(rewards) != values.shape or jnp.shape(response_mask) != values.shape or values.ndim != 2:
        raise ValueError(f"rewards {jnp.shape(rewards)}, values {values.shape}, response_mask "
                         f"{jnp.shape(response_mask)} must all be the same [batch, T] shape")
    values = jax.lax.stop_gradient(values)
    v_ext = jnp.concatenate([values, jnp.zeros(values.shape[:-1] + (1,), values.dtype)], axis=-1)
    adv = truncated_generalized_advantage_estimation(
        jax.lax.stop_gradient(rewards), gamma, lam, v_ext, stop_target_gradients=True, mask_t=response_mask)
    returns = jnp.where(jnp.asarray(response_mask).astype(bool), adv + values, 0)
    return adv, returns


def grpo_advantages(rewards: Array, group_size: int, scale_rewards: str = "group",
                    epsilon: float = 1e-6) -> Array:
    """GRPO outcome advantages (Shao et al. 2024; verl `compute_grpo_outcome_advantage`, TRL).

    `rewards` [num_groups * group_size] with each group's samples contiguous (one prompt repeated).
    A_i = (r_i - mean_group) / (std + epsilon), std the unbiased (Bessel) std as torch.std:
    scale_rewards "group" uses the group's std, "batch" the whole batch's (TRL), and "none" no
    division (Dr. GRPO, Liu et al. 2025).  A group whose rewards are all equal gets A = 0.
    group_size 1 leaves the reward unchanged (verl: mean 0, std 1).
    """
    rewards = jnp.asarray(rewards)
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D [num_groups * group_size], got shape {rewards.shape}")
    if group_size < 1 or rewards.shape[0] % group_size != 0:
        raise ValueError(f"group_size={group_size} must be >= 1 and divide the batch {rewards.shape[0]}")
    if scale_rewards not in GRPO_REWARD_SCALES:
        raise ValueError(f"scale_rewards={scale_rewards!r}: must be one of {list(GRPO_REWARD_SCALES)}")
    rewards = rewards.astype(jnp.result_type(rewards, jnp.float32))
    if group_size == 1:
        return rewards
    grouped = rewards.reshape(-1, group_size)
    centered = (grouped - grouped.mean(axis=1, keepdims=True)).reshape(-1)
    if scale_rewards == "none":
        return centered
    if scale_rewards == "group":
        std = jnp.repeat(jnp.std(grouped, axis=1, ddof=1), group_size)
    else:
        std = jnp.std(rewards, ddof=1) if rewards.shape[0] > 1 else jnp.ones((), rewards.dtype)
    return centered / (std + epsilon)


def kl_penalized_rewards(scores: Array, log_prob: Array, ref_log_prob: Array, response_mask: Array,
                         kl_coef: Union[float, Array], estimator: str = "k1") -> Tuple[Array, Array]:
    """Token rewards of RLHF PPO (Ziegler et al. 2019; TRL PPOTrainer, verl `apply_kl_penalty`).

    r_t = -kl_coef * KL_t on every valid token, plus the sequence score on the last valid token.
    scores [batch]; the rest [batch, T].  Returns (rewards, kl) with both zero on masked tokens;
    a row without valid tokens gets no score.
    """
    log_prob, ref_log_prob = jnp.asarray(log_prob), jnp.asarray(ref_log_prob)
    mask = jnp.asarray(response_mask).astype(bool)
    if log_prob.ndim != 2 or mask.shape != log_prob.shape:
        raise ValueError(f"log_prob {log_prob.shape} and response_mask {mask.shape} must be the same [batch, T]")
    if jnp.shape(scores) != log_prob.shape[:1]:
        raise ValueError(f"scores shape {jnp.shape(scores)} must be [batch] = {log_prob.shape[:1]}")
    kl = jnp.where(mask, kl_penalty(fill_masked(log_prob, mask), fill_masked(ref_log_prob, mask), estimator), 0)
    t = jnp.arange(mask.shape[-1])
    last = jnp.max(jnp.where(mask, t, -1), axis=-1)
    at_last = (t[None, :] == last[:, None]) & mask
    rewards = -kl_coef * kl + jnp.where(at_last, jnp.asarray(scores, kl.dtype)[:, None], 0)
    return rewards, kl
