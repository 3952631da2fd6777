"""Logit processing and sampling with transformers' semantics (repetition penalty, temperature, top-k, top-p)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from iva_jax.config import ConfigBase, check


@dataclasses.dataclass(frozen=True)
class SamplingConfig(ConfigBase):
    """temperature 0 is greedy; top_k 0/None and top_p 1/None disable those filters."""

    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None

    def validate(self) -> None:
        check(self.temperature >= 0, "temperature", self.temperature, "must be >= 0")
        check(self.top_k is None or (isinstance(self.top_k, int) and self.top_k >= 0), "top_k", self.top_k,
              "must be a non-negative integer")
        check(self.top_p is None or 0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
        check(self.min_p is None or 0 <= self.min_p <= 1, "min_p", self.min_p, "must be in [0, 1]")
        check(self.repetition_penalty is None or self.repetition_penalty > 0, "repetition_penalty",
              self.repetition_penalty, "must be > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: jnp.ndarray, seen: jnp.ndarray, penalty: float) -> jnp.ndarray:
    """CTRL-style penalty (HF RepetitionPenaltyLogitsProcessor): seen tokens' logits /p if > 0 else *p."""
    penalized = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalized, logits)


def top_k_filter(logits: jnp.ndarray, k: int) -> jnp.ndarray:
    """Keep logits >= the k-th largest (ties kept, as HF TopKLogitsWarper)."""
    k = min(k, logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jnp.ndarray, p: float) -> jnp.ndarray:
    """Nucleus filter as HF TopPLogitsWarper: drop the low tail whose mass is <= 1 - p (keeps >= 1 token)."""
    order = jnp.argsort(logits, axis=-1)  # ascending
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = cum <= (1 - p)
    remove_sorted = remove_sorted.at[..., -1].set(False)
    remove = jnp.zeros_like(remove_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
    return jnp.where(remove, -jnp.inf, logits)


def min_p_filter(logits: jnp.ndarray, min_p: float) -> jnp.ndarray:
    """Drop tokens whose probability is below min_p times the top token's."""
    probs = jax.nn.softmax(logits, axis=-1)
    thresh = min_p * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(probs < thresh, -jnp.inf, logits)


def process_logits(logits: jnp.ndarray, seen: Optional[jnp.ndarray], cfg: SamplingConfig) -> jnp.ndarray:
    """Float32 logits [B, V] after the configured processors, in HF's order."""
    x = logits.astype(jnp.float32)
    if cfg.repetition_penalty not in (None, 1.0) and seen is not None:
        x = apply_repetition_penalty(x, seen, cfg.repetition_penalty)
    if cfg.greedy:
        return x
    x = x / cfg.temperature
    if cfg.top_k:
        x = top_k_filter(x, cfg.top_k)
    if cfg.top_p is not None and cfg.top_p < 1.0:
        x = top_p_filter(x, cfg.top_p)
    if cfg.min_p:
        x = min_p_filter(x, cfg.min_p)
    return x


def sample(logits: jnp.ndarray, rng: jax.Array, seen: Optional[jnp.ndarray], cfg: SamplingConfig) -> jnp.ndarray:
    """Next token ids [B] (argmax when greedy)."""
    x = process_logits(logits, seen, cfg)
    if cfg.greedy:
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, x, axis=-1).astype(jnp.int32)
