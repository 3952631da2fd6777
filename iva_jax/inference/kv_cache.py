"""Preallocated KV cache, carried as explicit state through prefill and decode."""

from __future__ import annotations

from typing import Any, Optional

import flax.struct
import jax.numpy as jnp

from iva_jax.config import ModelConfig


@flax.struct.dataclass
class KVCache:
    """k, v: [layers, batch, max_len, kv_heads, head_dim]; valid: [batch, max_len] (slot written and
    not padding); index: next slot to write (shared by the batch); next_pos: [batch] next position id."""

    k: jnp.ndarray
    v: jnp.ndarray
    valid: jnp.ndarray
    index: jnp.ndarray
    next_pos: jnp.ndarray

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @classmethod
    def init(cls, config: ModelConfig, batch: int, max_len: int, dtype: Optional[Any] = None) -> "KVCache":
        """An empty cache for `batch` sequences of up to `max_len` tokens (prompt + generated)."""
        if batch < 1 or max_len < 1:
            raise ValueError(f"KVCache needs batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}")
        from iva_jax.config import dtype_of

        dt = dtype if dtype is not None else dtype_of(config.dtype)
        shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.resolved_head_dim)
        return cls(k=jnp.zeros(shape, dt), v=jnp.zeros(shape, dt), valid=jnp.zeros((batch, max_len), bool),
                   index=jnp.zeros((), jnp.int32), next_pos=jnp.zeros((batch,), jnp.int32))
