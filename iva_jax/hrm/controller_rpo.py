"""The HRM controller inside HRM-RPO (`iva_jax.rl.shaping`): ponder steps, halting probabilities and z_H
per rollout, and the controller's own update during RL.

`RPOController` is the `controller` that `HRMRPOShaping` calls: it ponders over an LM on each rollout
(prompt + response, left-padded prompts handled by the attention mask) and returns, per sequence,
  ponder_steps  sum_t t w_t, the expected depth of the ACT halting distribution, in [1, max_steps]
                (r_halt = -ponder_steps / max_steps; continuous, unlike the integer N)
  halt_probs    p_h(t) [N, max_steps];  steps  the integer ACT N;  z_h  the halting-weighted z_H [N, Dc]
`update(rollout, hidden)` (called by the trainer once per RL step) takes one Adam step on the
controller: the ponder-mixture cross-entropy of the response tokens + lambda * ponder cost
(+ mem_coef * NT-Xent(z_H(i), z_H(j)) over the two views of each GRPO group, the L_mem term).

The trainer hands a hook the policy's hidden states only, while pondering re-runs the LM on the
tokens, so the rollout must reach the controller: `ControllerShaping` is `HRMRPOShaping` binding the
rollout for the call.  The LM it ponders over is the one given here (e.g. the LoRA policy's frozen
base, which is also the KL reference); the trainer does not pass the live policy weights to hooks
(`set_lm_params` swaps them in).  With read="all" the controller reads the response it is scored
on, so its LM term is a fit of the response (a difficulty signal for shaping), not a prediction.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from iva_jax.hrm.controller import ControllerConfig, init_controller, make_controller, ponder_forward, ponder_objective
from iva_jax.rl.distill import nt_xent_loss
from iva_jax.rl.shaping import HRMRPOShaping, group_partners
from iva_jax.train.step import cross_entropy_sums

READS = ("all", "prompt", "response")


class RPOController:
    """HRMRPOShaping's controller: `max_steps`, `__call__(hidden, response_mask)`, `update(rollout, hidden)`."""

    def __init__(self, lm: Any, lm_params: Any, config: ControllerConfig, params: Any = None, *, seed: int = 0,
                 lr: float = 1e-3, read: str = "all", mem_coef: float = 0.0, mem_temperature: float = 0.1,
                 compiler_options: Optional[Dict[str, Any]] = None):
        if read not in READS:
            raise ValueError(f"read={read!r} must be one of {list(READS)}")
        self.lm, self.lm_params, self.config = lm, lm_params, config
        self.ctrl = make_controller(config, lm.config)
        self.params = params if params is not None else init_controller(self.ctrl, lm.config.hidden_size, seed)
        self.max_steps = int(config.max_steps)
        self.read, self.mem_coef, self.mem_temperature = read, float(mem_coef), float(mem_temperature)
        self.tx = optax.adam(lr)
        self.opt_state = self.tx.init(self.params)
        self._rollout = None
        jit_kw = dict(compiler_options=compiler_options) if compiler_options else {}
        self._score = jax.jit(self._score_impl, **jit_kw)
        self._update = jax.jit(self._update_impl, static_argnums=(4, 5), **jit_kw)

    # ---- pieces ------------------------------------------------------------------------------------
    def _inputs(self, rollout):
        ids, mask = jnp.asarray(rollout.input_ids), jnp.asarray(rollout.attention_mask)
        p = rollout.prompt_len
        region = jnp.arange(ids.shape[1])[None] < p
        read = {"all": mask > 0, "prompt": (mask > 0) & region, "response": (mask > 0) & ~region}[self.read]
        return ids, mask, read

    def _ponder(self, params, lm_params, ids, mask, read):
        return ponder_forward(self.lm, lm_params, self.ctrl, params, ids, mask, read_mask=read)

    def _score_impl(self, params, lm_params, ids, mask, read):
        out = self._ponder(params, lm_params, ids, mask, read)
        return {"ponder_steps": out.expected_steps, "halt_probs": out.halt_probs, "steps": out.steps, "z_h": out.z_h}

    def _update_impl(self, params, opt_state, lm_params, batch, prompt_len: int, group_size: int):
        p = prompt_len

        def loss_fn(cp):
            out = self._ponder(cp, lm_params, batch["ids"], batch["mask"], batch["read"])
            sums = cross_entropy_sums(out.logits[:, p - 1:-1], batch["responses"], batch["response_mask"])
            ce = sums["loss"] / jnp.maximum(sums["tokens"], 1.0)
            loss, m = ponder_objective(ce, out, self.config)
            if self.mem_coef > 0:
                z = out.z_h
                mem = nt_xent_loss(z, z[group_partners(z.shape[0], group_size)], self.mem_temperature)
                loss = loss + self.mem_coef * mem
                m = dict(m, mem_loss=mem)
            return loss, dict(m, loss=loss)

        (loss, m), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        upd, opt_state = self.tx.update(g, opt_state, params)
        return optax.apply_updates(params, upd), opt_state, m

    # ---- the hook protocol -------------------------------------------------------------------------
    @contextlib.contextmanager
    def bound(self, rollout) -> Iterator[None]:
        """Within the block, `__call__` ponders over this rollout's tokens."""
        self._rollout = rollout
        try:
            yield
        finally:
            self._rollout = None

    def score(self, rollout) -> Dict[str, jax.Array]:
        """{"ponder_steps" [N], "halt_probs" [N, max_steps], "steps" [N], "z_h" [N, Dc]} for a rollout."""
        return self._score(self.params, self.lm_params, *self._inputs(rollout))

    def __call__(self, hidden: Optional[jax.Array], response_mask: jax.Array) -> Dict[str, jax.Array]:
        if self._rollout is None:
            raise ValueError("RPOController re-runs the LM on the rollout's tokens, which HRMRPOShaping does not "
                             "pass: use iva_jax.hrm.controller_rpo.ControllerShaping as the reward hook")
        n = np.shape(response_mask)[0]
        if self._rollout.responses.shape[0] != n:
            raise ValueError(f"bound rollout has {self._rollout.responses.shape[0]} rows, response_mask {n}")
        return self.score(self._rollout)

    def update(self, rollout, hidden: Optional[jax.Array] = None) -> Dict[str, float]:
        """One controller step on the rollout (see the module docstring); host-float metrics."""
        ids, mask, read = self._inputs(rollout)
        batch = {"ids": ids, "mask": mask, "read": read, "responses": jnp.asarray(rollout.responses, jnp.int32),
                 "response_mask": jnp.asarray(rollout.response_mask, jnp.float32)}
        group = int(getattr(rollout, "group_size", 1) or 1)
        self.params, self.opt_state, m = self._update(self.params, self.opt_state, self.lm_params, batch,
                                                         rollout.prompt_len, group)
        m = jax.device_get(m)
        keys = ("loss", "ce", "ponder_penalty", "halt_rate", "avg_steps", "expected_steps", "mem_loss")
        return {f"controller_{k}": float(m[k]) for k in keys if k in m}

    def set_lm_params(self, lm_params: Any) -> None:
        """Ponder over these LM weights from now on (e.g. the current policy's)."""
        self.lm_params = lm_params


class ControllerShaping(HRMRPOShaping):
    """`HRMRPOShaping` with an `RPOController` that sees each rollout's tokens (the GRPO trainer's
    reward hook for algorithm="hrm_rpo"): R' = R + b_halt r_halt + b_entropy r_entropy + b_mem r_mem."""

    def __init__(self, b_halt: float = 0.0, b_entropy: float = 0.0, b_mem: float = 0.0, group_size: int = 1,
                 controller: Optional[RPOController] = None, mem_temperature: float = 0.1):
        if not isinstance(controller, RPOController):
            raise ValueError(f"ControllerShaping needs an RPOController, got {type(controller).__name__}")
        super().__init__(b_halt, b_entropy, b_mem, group_size, controller, mem_temperature)

    def __call__(self, rollout, rewards, hidden=None):
        with self.controller.bound(rollout):
            return super().__call__(rollout, rewards, hidden)


__all__ = ("ControllerShaping", "RPOController")
