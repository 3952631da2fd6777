"""Router balancing losses and the per-layer routing metrics (the `moe` telemetry block).

Shapes: probs / logits [T, E] (flattened tokens), expert_index [T, k], optional token mask [T]
(True = a real token; padding is left out of every mean).  All results are float32.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp


def _mask(mask: Optional[jnp.ndarray], t: int) -> jnp.ndarray:
    if mask is None:
        return jnp.ones((t,), jnp.float32)
    if mask.size != t:
        raise ValueError(f"token mask of shape {mask.shape} does not match {t} tokens")
    return mask.reshape(t).astype(jnp.float32)


def expert_counts(expert_index: jnp.ndarray, num_experts: int,
                  mask: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """[E] number of (unmasked) token->expert assignments per expert, as float32."""
    t = expert_index.shape[0]
    onehot = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32)  # [T, k, E]
    return jnp.einsum("tke,t->e", onehot, _mask(mask, t))


def load_balancing_stats(probs: jnp.ndarray, expert_index: jnp.ndarray,
                         mask: Optional[jnp.ndarray] = None) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """(f, P), both [E]: f_e = assignments to e / tokens (sums to k), P_e = mean router prob of e.

    Kept separate from the loss so a model can average f and P over layers before multiplying,
    which is what HF `load_balancing_loss_func` does over its tuple of layers.
    """
    t, e = probs.shape
    m = _mask(mask, t)
    n = jnp.maximum(jnp.sum(m), 1.0)
    f = jax.lax.stop_gradient(expert_counts(expert_index, e, mask) / n)
    p = jnp.einsum("te,t->e", probs.astype(jnp.float32), m) / n
    return f, p


def load_balancing_loss_from_stats(f: jnp.ndarray, p: jnp.ndarray) -> jnp.ndarray:
    """E * sum_e f_e * P_e."""
    return f.shape[-1] * jnp.sum(f * p, axis=-1)


def load_balancing_loss(probs: jnp.ndarray, expert_index: jnp.ndarray,
                        mask: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Switch Transformer aux loss E * sum_e f_e * P_e with HF `load_balancing_loss_func` normalization.

    f_e = (number of tokens whose top-k includes e) / tokens (so sum_e f_e = k), P_e = mean over
    tokens of the router probability of e.  Perfect balance gives k (1 for Switch's top-1, where this
    is exactly eqs. 4-6 of Fedus et al. 2021); all tokens on one expert with prob 1 gives E*k.
    """
    return load_balancing_loss_from_stats(*load_balancing_stats(probs, expert_index, mask))


def importance_loss(probs: jnp.ndarray, expert_index: jnp.ndarray,
                    mask: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """The seed's L_aux = sum_e p_e * l_e: p_e = mean router prob of e (importance share, sums to 1),
    l_e = share of the token->expert assignments that went to e (load share, sums to 1).

    Equals load_balancing_loss / (E * k); 1/E at perfect balance, 1 when everything hits one expert.
    """
    f, p = load_balancing_stats(probs, expert_index, mask)
    return importance_loss_from_stats(f, p, expert_index.shape[-1])


def importance_loss_from_stats(f: jnp.ndarray, p: jnp.ndarray, top_k: int) -> jnp.ndarray:
    """sum_e p_e * l_e from `load_balancing_stats` (l_e = f_e / k)."""
    return jnp.sum(p * (f / top_k), axis=-1)


def router_z_loss(logits: jnp.ndarray, mask: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)^2."""
    t = logits.shape[0]
    m = _mask(mask, t)
    z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return jnp.sum(m * z * z) / jnp.maximum(jnp.sum(m), 1.0)


def routing_metrics(probs: jnp.ndarray, expert_index: jnp.ndarray, keep: Optional[jnp.ndarray] = None,
                    mask: Optional[jnp.ndarray] = None) -> Dict[str, jnp.ndarray]:
    """The `moe` telemetry block for one layer (all stop-gradient).

    load_per_expert [E]: share of assignments routed to each expert (before dropping; sums to 1).
    overflow_pct: percent of assignments dropped by the capacity limit (0 when `keep` is None).
    route_entropy: mean per-token entropy of the router distribution, in nats (log E = uniform).
    load_std_over_mean: std/mean of the per-expert assignment counts (0 = perfectly balanced).
    expert_counts [E]: raw assignment counts (what the bias-balanced router's update consumes).
    """
    probs = jax.lax.stop_gradient(probs.astype(jnp.float32))
    t, e = probs.shape
    m = _mask(mask, t)
    n_tok = jnp.maximum(jnp.sum(m), 1.0)
    counts = expert_counts(expert_index, e, mask)
    total = jnp.maximum(jnp.sum(counts), 1.0)
    if keep is None:
        overflow = jnp.zeros((), jnp.float32)
    else:
        dropped = jnp.sum((1.0 - keep.astype(jnp.float32)) * m[:, None])
        overflow = 100.0 * dropped / total
    ent = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)
    mean = jnp.mean(counts)
    return {
        "load_per_expert": counts / total,
        "overflow_pct": overflow,
        "route_entropy": jnp.sum(ent * m) / n_tok,
        "load_std_over_mean": jnp.std(counts) / jnp.maximum(mean, 1e-9),
        "expert_counts": counts,
    }
