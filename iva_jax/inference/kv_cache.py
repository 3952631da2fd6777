"""Preallocated decode cache, carried as explicit state through prefill and decode: the KV of the attention
layers and, for SSM + attention hybrids, the recurrent state of every SSM mixer layer.

Memory: the KV part grows with `max_len` (one slot per token, attention layers only); the SSM part is
fixed-size per layer (e.g. Mamba: conv [B, d_conv-1, d_inner] + ssm [B, d_inner, d_state]), so a model
without attention layers decodes in O(1) memory however long the sequence (its KV arrays have no slots).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import flax.struct
import jax
import jax.numpy as jnp

from iva_jax.config import ModelConfig


@flax.struct.dataclass
class KVCache:
    """k, v: [attention layers, batch, max_len, kv_heads, head_dim] (leading axis: attention-layer ordinal,
    `config.attention_layers`); valid: [batch, max_len] (slot written and not padding); index: next slot to
    write (shared by the batch); next_pos: [batch] next position id.

    ssm: None (no SSM layers) or {param prefix: state} laid out like the params (see
    `iva_jax.models.transformer.layer_param_location`): the state of SSM layer i is
    `ssm[prefix][index]` (its NamedTuple, e.g. `MambaState`, stacked over the scanned axis; unstacked for
    unrolled layers).  A model without attention layers keeps max_len = 0 KV slots.
    """

    k: jnp.ndarray
    v: jnp.ndarray
    valid: jnp.ndarray
    index: jnp.ndarray
    next_pos: jnp.ndarray
    ssm: Optional[Dict[str, Any]] = None

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @classmethod
    def init(cls, config: ModelConfig, batch: int, max_len: int, dtype: Optional[Any] = None) -> "KVCache":
        """An empty cache for `batch` sequences of up to `max_len` tokens (prompt + generated); `dtype`: the
        KV dtype (default the compute dtype; SSM states keep their mixers' dtypes, f32 recurrences)."""
        if batch < 1 or max_len < 1:
            raise ValueError(f"KVCache needs batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}")
        from iva_jax.config import dtype_of
        from iva_jax.models.transformer import init_ssm_states  # the model owns its layer layout

        dt = dtype if dtype is not None else dtype_of(config.dtype)
        a = config.num_attention_layers
        slots = max_len if a else 0
        shape = (a, batch, slots, config.num_key_value_heads, config.resolved_head_dim)
        return cls(k=jnp.zeros(shape, dt), v=jnp.zeros(shape, dt), valid=jnp.zeros((batch, slots), bool),
                   index=jnp.zeros((), jnp.int32), next_pos=jnp.zeros((batch,), jnp.int32),
                   ssm=init_ssm_states(config, batch))

    def nbytes(self) -> int:
        """Bytes held (KV + validity + SSM states); works on `jax.eval_shape` results too."""
        return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(self))
