"""KL estimators between the policy and a reference, and the KL-coefficient controllers.

Estimators follow J. Schulman, "Approximating KL Divergence" (2020), for samples drawn from the
current policy pi and the log-ratio log r = log pi_ref(a) - log pi(a):
  k1 = -log r                 unbiased, high variance, can be negative
  k2 = (log r)^2 / 2          biased, low variance, >= 0
  k3 = (r - 1) - log r        unbiased, low variance, >= 0
Names and aliases match verl's `kl_penalty` ("kl"/"k1", "mse"/"k2", "low_var_kl", "abs"; a
trailing "+" gives the estimator's value with k2's gradient, a straight-through estimator).
"""

from __future__ import annotations

import dataclasses
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

Array = jnp.ndarray

KL_ESTIMATORS = ("k1", "kl", "k2", "mse", "k3", "low_var_kl", "abs")


def _kl_value(log_prob: Array, ref_log_prob: Array, estimator: str) -> Array:
    if estimator in ("k1", "kl"):
        return log_prob - ref_log_prob
    if estimator == "abs":
        return jnp.abs(log_prob - ref_log_prob)
    if estimator in ("k2", "mse"):
        return 0.5 * jnp.square(log_prob - ref_log_prob)
    if estimator == "k3":  # TRL GRPO's per-token KL: exp(ref - logp) - (ref - logp) - 1, unclamped
        log_r = ref_log_prob - log_prob
        return jnp.expm1(log_r) - log_r
    # low_var_kl: verl's clamped k3 (log-ratio to [-20, 20], the estimate to [-10, 10])
    log_r = jnp.clip(ref_log_prob - log_prob, -20.0, 20.0)
    return jnp.clip(jnp.expm1(log_r) - log_r, -10.0, 10.0)


def kl_penalty(log_prob: Array, ref_log_prob: Array, estimator: str = "k3") -> Array:
    """Per-token KL(pi || pi_ref) estimate from sampled-token log-probs (verl `kl_penalty`).

    `estimator` is one of KL_ESTIMATORS, optionally with a "+" suffix (value of the estimator,
    gradient of k2: unbiased gradient of the KL with a low-variance value).
    """
    if jnp.shape(log_prob) != jnp.shape(ref_log_prob):
        raise ValueError(f"log_prob shape {jnp.shape(log_prob)} != ref_log_prob shape {jnp.shape(ref_log_prob)}")
    straight_through = estimator.endswith("+")
    base = estimator[:-1] if straight_through else estimator
    if base not in KL_ESTIMATORS:
        raise ValueError(f"KL estimator {estimator!r}: must be one of {list(KL_ESTIMATORS)} (optionally with '+')")
    value = _kl_value(log_prob, ref_log_prob, base)
    if not straight_through:
        return value
    grad_path = _kl_value(log_prob, ref_log_prob, "k2")
    return grad_path - jax.lax.stop_gradient(grad_path) + jax.lax.stop_gradient(value)


def adaptive_kl_update(kl_coef: Union[float, Array], current_kl: Union[float, Array], n_steps: int,
                       target: float, horizon: float) -> Union[float, Array]:
    """One step of Ziegler et al. (2019)'s proportional controller (TRL `AdaptiveKLController`).

    e = clip(current_kl / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n_steps / horizon).
    Works on Python floats and inside jit.
    """
    xp = jnp if isinstance(kl_coef, jax.Array) or isinstance(current_kl, jax.Array) else np
    error = xp.clip(current_kl / target - 1.0, -0.2, 0.2)
    out = kl_coef * (1.0 + error * n_steps / horizon)
    return float(out) if xp is np else out


@dataclasses.dataclass
class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning LMs from Human Preferences").

    Same interface as TRL's: `value`, `update(current_kl, n_steps)`.
    """

    init_kl_coef: float
    target: float
    horizon: float

    def __post_init__(self) -> None:
        if not (self.init_kl_coef >= 0):
            raise ValueError(f"init_kl_coef must be >= 0, got {self.init_kl_coef}")
        if not (self.target > 0):
            raise ValueError(f"target must be > 0, got {self.target}")
        if not (self.horizon > 0):
            raise ValueError(f"horizon must be > 0, got {self.horizon}")
        self.value = float(self.init_kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        self.value = adaptive_kl_update(self.value, float(current_kl), n_steps, self.target, self.horizon)
        return self.value


@dataclasses.dataclass
class FixedKLController:
    """Constant KL coefficient (TRL `FixedKLController`); `update` is a no-op."""

    kl_coef: float

    def __post_init__(self) -> None:
        if not (self.kl_coef >= 0):
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        self.value = float(self.kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value
