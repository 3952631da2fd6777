"""Preference losses: DPO and its variants, and the pairwise (Bradley-Terry) reward-model loss."""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

Array = jnp.ndarray

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")


def dpo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    reference_chosen_logps: Array,
    reference_rejected_logps: Array,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
) -> Tuple[Array, Array, Array]:
    """Per-pair DPO losses and implicit rewards, the formulas of TRL `DPOTrainer.dpo_loss`.

    h = (pi_c - pi_r) - (ref_c - ref_r)  (ref term 0 when reference_free), eps = label_smoothing:
      sigmoid (Rafailov et al. 2023; cDPO): -(1-eps) log s(beta h) - eps log s(-beta h)
      robust (Chowdhury et al. 2024):      (-(1-eps) log s(beta h) + eps log s(-beta h)) / (1 - 2 eps)
      hinge (SLiC, Zhao et al. 2023):      relu(1 - beta h)
      ipo (Azar et al. 2023, eq. 17):      (h - 1/(2 beta))^2   (TRL feeds length-averaged logps)
    Inputs are [batch] summed (or averaged) response log-probs.  Returns (losses [batch],
    chosen_rewards, rejected_rewards) with rewards beta * (pi - ref), gradient-free.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: must be one of {list(DPO_LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    shape = jnp.shape(policy_chosen_logps)
    for name, x in (("policy_rejected_logps", policy_rejected_logps),
                    ("reference_chosen_logps", reference_chosen_logps),
                    ("reference_rejected_logps", reference_rejected_logps)):
        if jnp.shape(x) != shape:
            raise ValueError(f"{name} shape {jnp.shape(x)} must equal policy_chosen_logps shape {shape}")
    ref_c = jax.lax.stop_gradient(reference_chosen_logps)
    ref_r = jax.lax.stop_gradient(reference_rejected_logps)
    h = policy_chosen_logps - policy_rejected_logps
    if not reference_free:
        h = h - (ref_c - ref_r)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * jax.nn.log_sigmoid(beta * h) - label_smoothing * jax.nn.log_sigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
                  + label_smoothing * jax.nn.log_sigmoid(-beta * h)) / (1 - 2 * label_smoothing)
    elif loss_type == "hinge":
        losses = jax.nn.relu(1 - beta * h)
    else:
        losses = jnp.square(h - 1 / (2 * beta))
    chosen_rewards = jax.lax.stop_gradient(beta * (policy_chosen_logps - ref_c))
    rejected_rewards = jax.lax.stop_gradient(beta * (policy_rejected_logps - ref_r))
    return losses, chosen_rewards, rejected_rewards


def pairwise_reward_loss(chosen_rewards: Array, rejected_rewards: Array, margin: Optional[Array] = None) -> Array:
    """Bradley-Terry reward-model loss -mean(log s(r_c - r_r - margin)) (Ouyang et al. 2022; TRL RewardTrainer)."""
    if jnp.shape(chosen_rewards) != jnp.shape(rejected_rewards):
        raise ValueError(f"chosen_rewards shape {jnp.shape(chosen_rewards)} != rejected_rewards shape "
                         f"{jnp.shape(rejected_rewards)}")
    diff = jnp.asarray(chosen_rewards) - jnp.asarray(rejected_rewards)
    if margin is not None:
        diff = diff - margin
    return -jnp.mean(jax.nn.log_sigmoid(diff))
