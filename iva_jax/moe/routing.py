"""Routers: which k experts each token goes to, and with what gate weights.

Every router works on flattened tokens: logits [T, E] (the router's raw output) -> `Routing`
(expert_index [T, k] int32, gate_weights [T, k] f32, probs [T, E] f32 = softmax(logits / tau),
logits [T, E] f32).  `probs` feed the balancing losses and metrics; `logits` the z-loss.

* "softmax_topk": top-k of softmax(logits / tau) (Mixtral, Qwen2/3-MoE); gate weights are the k
  probabilities, renormalized to sum to 1 when `norm_topk_prob`.
* "switch": top-1 with the raw probability as gate weight (Switch Transformer), so the router keeps a
  gradient through the task loss (never renormalized).
* "hash": expert = a fixed hash of the token id (Hash Layers, Roller et al. 2021); the k experts are
  consecutive ids after the hashed one; gate weights are the router probabilities at those experts.
* "sinkhorn": in training, selection by top-k of the Sinkhorn-Knopp balanced assignment matrix
  (columns rescaled to T/E, rows to 1); at eval, plain top-k (as Megatron-LM's sinkhorn router).
  Gate weights always come from `probs`.
* "bias_balanced": DeepSeek-V3 aux-loss-free balancing: selection by top-k of probs + bias, gate
  weights from probs alone; the bias is non-trainable and moved by `update_expert_bias`.
  (DeepSeek-V3 uses sigmoid affinities; here the affinities are the softmax probabilities.)
The temperature tau is a Python float, a traced scalar, or one value per token ([T] / [B, S]), so a
controller (HRM) can drive it per call.  tau > 0 keeps top-k selection unchanged for the softmax routers
(softmax is monotone); it changes the gate weights (and bias_balanced's selection).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

ArrayLike = Union[jnp.ndarray, float]


class Routing(NamedTuple):
    expert_index: jnp.ndarray  # [T, k] int32
    gate_weights: jnp.ndarray  # [T, k] float32
    probs: jnp.ndarray  # [T, E] float32, softmax(logits / tau)
    logits: jnp.ndarray  # [T, E] float32, raw router logits


def _temperature(temperature: ArrayLike, num_tokens: int) -> jnp.ndarray:
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ValueError(f"router temperature must be > 0, got {temperature}")
    t = jnp.asarray(temperature, jnp.float32)
    if t.ndim == 0:
        return t
    if t.size not in (1, num_tokens):
        raise ValueError(f"router temperature of shape {t.shape} is neither a scalar nor one value per "
                         f"token ({num_tokens} tokens)")
    return t.reshape(-1, 1)


def router_probs(logits: jnp.ndarray, temperature: ArrayLike = 1.0) -> jnp.ndarray:
    """softmax(logits / tau) over experts in float32; tau a scalar or one value per token."""
    logits = logits.astype(jnp.float32)
    return jax.nn.softmax(logits / _temperature(temperature, logits.shape[0]), axis=-1)


def jitter(x: jnp.ndarray, rng: jax.Array, eps: float) -> jnp.ndarray:
    """Multiplicative U(1-eps, 1+eps) noise on the router input (Switch Transformer / Mixtral)."""
    noise = jax.random.uniform(rng, x.shape, jnp.float32, 1.0 - eps, 1.0 + eps)
    return (x.astype(jnp.float32) * noise).astype(x.dtype)


def hash_experts(token_ids: jnp.ndarray, num_experts: int, top_k: int) -> jnp.ndarray:
    """[T] token ids -> [T, k] expert ids: Knuth multiplicative hash, then the next k-1 ids (mod E)."""
    h = (token_ids.reshape(-1).astype(jnp.uint32) * jnp.uint32(2654435761)) >> jnp.uint32(7)
    first = (h % jnp.uint32(num_experts)).astype(jnp.int32)
    return (first[:, None] + jnp.arange(top_k, dtype=jnp.int32)[None, :]) % num_experts


def sinkhorn_log(logits: jnp.ndarray, num_iters: int) -> jnp.ndarray:
    """log of the Sinkhorn-Knopp scaling of exp(logits) [T, E]: rows sum to 1, columns to about T/E."""
    t, e = logits.shape
    log_p = logits.astype(jnp.float32)
    col_target = float(np.log(t / e))

    def body(_, lp):
        lp = lp - jax.nn.logsumexp(lp, axis=0, keepdims=True) + col_target
        return lp - jax.nn.logsumexp(lp, axis=1, keepdims=True)

    return jax.lax.fori_loop(0, num_iters, body, log_p)


def update_expert_bias(bias: jnp.ndarray, expert_load: jnp.ndarray, rate: float) -> jnp.ndarray:
    """DeepSeek-V3 bias step: overloaded experts (load > mean) go down by `rate`, underloaded up."""
    load = expert_load.astype(jnp.float32)
    return (bias + rate * jnp.sign(jnp.mean(load) - load)).astype(bias.dtype)


def _gather(probs: jnp.ndarray, index: jnp.ndarray) -> jnp.ndarray:
    return jnp.take_along_axis(probs, index, axis=-1)


def route(logits: jnp.ndarray, *, router: str = "softmax_topk", top_k: int = 2,
          temperature: ArrayLike = 1.0, norm_topk_prob: bool = True, training: bool = False,
          token_ids: Optional[jnp.ndarray] = None, expert_bias: Optional[jnp.ndarray] = None,
          sinkhorn_iters: int = 8) -> Routing:
    """Route T tokens given router logits [T, E]; see the module docstring for each router."""
    if logits.ndim != 2:
        raise ValueError(f"router logits must be [tokens, experts], got shape {logits.shape}")
    t, e = logits.shape
    if not 1 <= top_k <= e:
        raise ValueError(f"top_k={top_k} must be in [1, num_experts={e}]")
    logits = logits.astype(jnp.float32)
    probs = router_probs(logits, temperature)
    normalize = norm_topk_prob
    if router in ("softmax_topk", "switch"):
        if router == "switch":
            if top_k != 1:
                raise ValueError(f"the switch router is top-1, got top_k={top_k}")
            normalize = False
        weights, index = jax.lax.top_k(probs, top_k)
    elif router == "hash":
        if token_ids is None:
            raise ValueError("router='hash' needs token_ids")
        if token_ids.size != t:
            raise ValueError(f"token_ids of shape {token_ids.shape} do not match {t} tokens")
        index = hash_experts(token_ids, e, top_k)
        weights = _gather(probs, index)
    elif router == "sinkhorn":
        score = jax.lax.stop_gradient(sinkhorn_log(logits, sinkhorn_iters) if training else probs)
        _, index = jax.lax.top_k(score, top_k)
        weights = _gather(probs, index)
    elif router == "bias_balanced":
        if expert_bias is None:
            raise ValueError("router='bias_balanced' needs expert_bias [num_experts]")
        if expert_bias.shape != (e,):
            raise ValueError(f"expert_bias shape {expert_bias.shape} != ({e},)")
        _, index = jax.lax.top_k(jax.lax.stop_gradient(probs + expert_bias.astype(jnp.float32)), top_k)
        weights = _gather(probs, index)
    else:
        raise ValueError(f"unknown router {router!r}")
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(index.astype(jnp.int32), weights, probs, logits)
