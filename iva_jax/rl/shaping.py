"""HRM-RPO reward shaping (the project seed's design): R'_t = R_t + b1 r_halt + b2 r_entropy + b3 r_mem.

The HRM controller (iva_jax.hrm) ponders over the LM's hidden states and halts with probability
p_h per ponder step; z_H is its high-level state.  The three shaping terms:
  r_halt    = -(ponder steps) / max_steps in [-1, 0]: rewards halting early, i.e. a ponder cost
              (Graves 2016 ACT; the controller's lambda * sum_t p_h(t) penalty, as a reward).
              With halting probabilities use the expected step count `expected_ponder_steps`.
  r_entropy = the policy's entropy on the response (mean over valid tokens): an entropy bonus
              in the reward, as in maximum-entropy RL (soft rewards).
  r_mem     = -L_mem with L_mem = NT-Xent(z_H(i), z_H(j)) over two views i, j of the same prompt
              (e.g. two rollouts in one GRPO group): rewards a memory state that identifies its
              problem.  As a reward it carries no gradient; L_mem can also be added to the loss.
"""

from __future__ import annotations

from typing import Union

import jax
import jax.numpy as jnp

from iva_jax.rl.distill import nt_xent_loss

Array = jnp.ndarray


def expected_ponder_steps(halt_probs: Array) -> Array:
    """Expected number of ponder steps under ACT halting: [..., N] per-step p_h -> [...].

    Step n halts with probability p_n * prod_{k<n} (1 - p_k); the last step N always halts
    (remainder), so E[steps] = sum_{n=1}^{N} prod_{k<n} (1 - p_k).
    """
    halt_probs = jnp.asarray(halt_probs)
    if halt_probs.ndim < 1 or halt_probs.shape[-1] < 1:
        raise ValueError(f"halt_probs must be [..., N] with N >= 1, got shape {halt_probs.shape}")
    survive = jnp.cumprod(1.0 - halt_probs, axis=-1)  # prob. of still running after step n
    return 1.0 + jnp.sum(survive[..., :-1], axis=-1)


def halting_reward(ponder_steps: Array, max_steps: int) -> Array:
    """r_halt = -ponder_steps / max_steps (in [-1, 0] for steps in [0, max_steps])."""
    if not max_steps > 0:
        raise ValueError(f"max_steps must be > 0, got {max_steps}")
    return -jnp.asarray(ponder_steps, jnp.float32) / max_steps


def memory_reward(z_h_i: Array, z_h_j: Array, temperature: float = 0.1) -> Array:
    """r_mem = -NT-Xent(z_H(i), z_H(j)) per item ([N, D] views -> [N]), gradient-free."""
    return -jax.lax.stop_gradient(nt_xent_loss(z_h_i, z_h_j, temperature, reduction="none"))


def hrm_rpo_reward(rewards: Array, r_halt: Union[float, Array], r_entropy: Union[float, Array],
                   r_mem: Union[float, Array], b_halt: float, b_entropy: float, b_mem: float) -> Array:
    """R' = R + b_halt r_halt + b_entropy r_entropy + b_mem r_mem (terms broadcast to R's shape)."""
    rewards = jnp.asarray(rewards)
    shaped = rewards + b_halt * r_halt + b_entropy * r_entropy + b_mem * r_mem
    if shaped.shape != rewards.shape:
        raise ValueError(f"shaping terms broadcast rewards {rewards.shape} to {shaped.shape}; "
                         f"they must broadcast to the rewards' shape")
    return shaped
