"""Adam-atan2 (Everett et al. 2024, "Scaling Exponents Across Parameterizations and Optimizers").

Adam without epsilon: the step direction is a * atan2(m_hat, b * sqrt(v_hat)) with bias-corrected
moments m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t).  atan2 is bounded and scale invariant, and
equals ~ a * m_hat / (b * sqrt(v_hat)) where that ratio is small.  The paper (and lucidrains'
adam-atan2-pytorch) use a = 1.27, b = 1; the sapientinc/adam-atan2 CUDA kernel HRM trains with has
no scale constants (a = b = 1).  Weight decay is decoupled and scaled by the learning rate, as that
kernel does (p <- p * (1 - lr * wd) - lr * update).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

ScalarOrSchedule = Union[float, jax.Array, Callable[[jax.Array], jax.Array]]


class ScaleByAdamAtan2State(NamedTuple):
    count: jax.Array  # int32 []
    mu: Any
    nu: Any


def scale_by_adam_atan2(b1: float = 0.9, b2: float = 0.999, a: float = 1.27, b: float = 1.0,
                        mu_dtype: Optional[Any] = None) -> optax.GradientTransformation:
    """Rescale updates to a * atan2(m_hat, b * sqrt(v_hat)) (no epsilon)."""
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"betas must be in [0, 1), got b1={b1}, b2={b2}")
    if not (a > 0 and b > 0):
        raise ValueError(f"a and b must be > 0, got a={a}, b={b}")

    def init_fn(params):
        mu = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=mu_dtype or p.dtype), params)
        nu = jax.tree.map(jnp.zeros_like, params)
        return ScaleByAdamAtan2State(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g.astype(m.dtype), state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g.astype(v.dtype)), state.nu, updates)
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        bc1 = 1 - jnp.power(jnp.float32(b1), t)
        bc2 = 1 - jnp.power(jnp.float32(b2), t)

        def direction(m, v, g):
            m_hat = m / bc1.astype(m.dtype)
            v_hat = v / bc2.astype(v.dtype)
            return (a * jnp.arctan2(m_hat, b * jnp.sqrt(v_hat))).astype(g.dtype)

        new_updates = jax.tree.map(direction, mu, nu, updates)
        mu = jax.tree.map(lambda m: m.astype(mu_dtype) if mu_dtype else m, mu)
        return new_updates, ScaleByAdamAtan2State(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def adam_atan2(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
               weight_decay: float = 0.0, a: float = 1.27, b: float = 1.0,
               mask: Optional[Any] = None) -> optax.GradientTransformation:
    """AdamATan2 with decoupled weight decay: p <- p - lr * (a*atan2(m_hat, b*sqrt(v_hat)) + wd * p)."""
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    return optax.chain(
        scale_by_adam_atan2(b1=b1, b2=b2, a=a, b=b),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
