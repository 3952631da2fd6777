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
`HRMRPOShaping` plugs these into the GRPO trainer as its reward hook.
"""

from __future__ import annotations

from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

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


@jax.jit
def _shape(rewards, entropy, mask, r_halt, r_mem, b_halt, b_entropy, b_mem):
    """(R', term means) with r_entropy the masked mean token entropy per response; absent terms are 0."""
    r_entropy = jnp.sum(jnp.where(mask, entropy, 0.0), -1) / jnp.maximum(jnp.sum(mask, -1), 1)
    r_halt = jnp.zeros_like(r_entropy) if r_halt is None else r_halt
    r_mem = jnp.zeros_like(r_entropy) if r_mem is None else r_mem
    shaped = hrm_rpo_reward(rewards, r_halt, r_entropy, r_mem, b_halt, b_entropy, b_mem)
    return shaped, {"r_entropy": jnp.mean(r_entropy), "r_halt": jnp.mean(r_halt), "r_mem": jnp.mean(r_mem),
                    "shaped_mean": jnp.mean(shaped)}


def group_partners(n: int, group_size: int) -> np.ndarray:
    """For rows in contiguous groups, the index of the next row of the same group (cyclic): the second view."""
    if group_size < 1 or n % group_size:
        raise ValueError(f"group_size={group_size} must be >= 1 and divide {n}")
    idx = np.arange(n)
    return idx - idx % group_size + (idx % group_size + 1) % group_size


class HRMRPOShaping:
    """HRM-RPO as the GRPO trainer's RewardHook: R' = R + b_halt r_halt + b_entropy r_entropy + b_mem r_mem.

    r_entropy is the response's mean token entropy (from the rollout's scoring pass).  r_halt and
    r_mem need the HRM controller, a callable `controller(hidden [N, T, D], response_mask [N, T])
    -> {"ponder_steps" [N] or "halt_probs" [N, S], "z_h" [N, Dz]}` with an int `max_steps`; r_mem
    pairs each sample with the next sample of its GRPO group (two views of one prompt).  If the
    controller has `update(rollout, hidden) -> metrics`, the trainer calls it once per step.
    """

    def __init__(self, b_halt: float = 0.0, b_entropy: float = 0.0, b_mem: float = 0.0, group_size: int = 1,
                 controller=None, mem_temperature: float = 0.1):
        if controller is None and (b_halt or b_mem):
            raise ValueError(f"b_halt={b_halt} / b_mem={b_mem} need the HRM controller (controller=None)")
        if controller is not None and not isinstance(getattr(controller, "max_steps", None), int):
            raise ValueError("the controller needs an int attribute max_steps")
        self.b_halt, self.b_entropy, self.b_mem = b_halt, b_entropy, b_mem
        self.group_size, self.controller, self.mem_temperature = group_size, controller, mem_temperature

    @classmethod
    def from_config(cls, cfg, controller=None) -> "HRMRPOShaping":
        """From an RLConfig (b_halt, b_entropy, b_mem, group_size, mem_temperature)."""
        return cls(cfg.b_halt, cfg.b_entropy, cfg.b_mem, cfg.group_size, controller, cfg.mem_temperature)

    @property
    def needs_hidden(self) -> bool:
        return self.controller is not None

    def __call__(self, rollout, rewards, hidden=None):
        r_halt = r_mem = None
        if self.controller is not None:
            out = self.controller(hidden, jnp.asarray(rollout.response_mask))
            steps = out["ponder_steps"] if "ponder_steps" in out else expected_ponder_steps(out["halt_probs"])
            r_halt = halting_reward(steps, self.controller.max_steps)
            z = jnp.asarray(out["z_h"])
            r_mem = memory_reward(z, z[group_partners(z.shape[0], self.group_size)], self.mem_temperature)
        shaped, terms = _shape(jnp.asarray(rewards, jnp.float32), jnp.asarray(rollout.entropy),
                               jnp.asarray(rollout.response_mask), r_halt, r_mem, self.b_halt, self.b_entropy,
                               self.b_mem)
        metrics = {k: float(v) for k, v in jax.device_get(terms).items()}
        return np.asarray(shaped, np.float32), metrics

    def update(self, rollout, hidden):
        fn = getattr(self.controller, "update", None)
        return fn(rollout, hidden) if fn is not None else {}
