"""Decoder-only transformer (Llama / Mistral / Qwen2 / Qwen3) in flax.linen.

Parameter tree (HF names, `model.` prefix dropped; scanned layers stacked on a leading `layers` axis):
  embed_tokens/embedding [V, D]
  layers/{input_layernorm,post_attention_layernorm}/scale [L, D]
  layers/self_attn/{q,k,v,o}_proj/{kernel,bias} [L, in, out]   (+ q_norm/k_norm/scale [L, hd])
  layers/mlp/{gate,up,down}_proj/kernel [L, in, out]
  norm/scale [D];  lm_head/kernel [D, V] (absent when embeddings are tied)

Call contract: `model.apply({"params": p}, input_ids)` -> logits [B, S, V].  Optional arguments:
`attention_mask` [B, S] (1 = token, 0 = padding; left padding works), `positions` [B, S],
`segment_ids` [B, S] (packed sequences), `cache` (a `KVCache` or a paged `PagedKVCache`; then the result is
(logits, cache)),
`return_hidden` (append the final normed hidden states), `last_logits_only` (logits of the last
position only, [B, 1, V]), `inputs_embeds` (instead of input_ids).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from iva_jax.config import ModelConfig, dtype_of
from iva_jax.inference.kv_cache import KVCache
from iva_jax.layers.attention import Attention
from iva_jax.layers.linear import Linear, default_kernel_init
from iva_jax.layers.mlp import MLP
from iva_jax.layers.norms import RMSNorm
from iva_jax.layers.remat import remat_policy
from iva_jax.layers.rotary import positions_from_mask, rope_cos_sin


class DecoderLayer(nn.Module):
    """Pre-norm block: h += attn(norm(h)); h += mlp(norm(h)).  Signature fits `nn.scan`.

    carry = (h, cache, layer): the hidden states, the whole KV cache ((k, v) of [L, B, S, Hkv, hd], or
    None) that each layer updates in place at its own index, and that layer index.
    """

    config: ModelConfig
    static_window: Optional[int] = None

    @nn.compact
    def __call__(self, carry, layer_window, cos, sin, segment_ids, cache_index, kv_valid):
        h, cache, layer = carry
        c = self.config
        dt, pdt = dtype_of(c.dtype), dtype_of(c.param_dtype)
        nkw = dict(eps=c.rms_norm_eps, dtype=dt, param_dtype=pdt, impl=c.norm_impl)
        window = self.static_window if layer_window is None else layer_window
        x = RMSNorm(c.hidden_size, name="input_layernorm", **nkw)(h)
        a, cache = Attention(c, name="self_attn")(
            x, cos, sin, window=window, segment_ids=segment_ids, cache=cache, layer=layer, cache_index=cache_index,
            kv_valid=kv_valid)
        x, h = RMSNorm(c.hidden_size, name="post_attention_layernorm", **nkw).residual(a, h)
        h = h + MLP(c.hidden_size, c.intermediate_size, c.mlp_bias, dt, pdt, impl=c.mlp_impl, name="mlp")(x)
        return (h, cache, layer + 1), None


class Transformer(nn.Module):
    """The decoder assembled from a `ModelConfig`."""

    config: ModelConfig

    def setup(self) -> None:
        c = self.config
        dt, pdt = dtype_of(c.dtype), dtype_of(c.param_dtype)
        self.embed_tokens = nn.Embed(
            c.vocab_size, c.hidden_size, dtype=dt, param_dtype=pdt,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
        windows = c.layer_windows()
        self._uniform_window = len(set(windows)) == 1
        layer_cls = DecoderLayer
        if c.remat != "none":
            layer_cls = nn.remat(layer_cls, policy=remat_policy(c.remat), prevent_cse=not c.scan_layers)
        static_window = windows[0] if self._uniform_window else None
        if c.scan_layers:
            window_axis = nn.broadcast if self._uniform_window else 0
            self.layers = nn.scan(
                layer_cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                in_axes=(window_axis, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=c.num_hidden_layers, metadata_params={nn.PARTITION_NAME: "layers"},
                unroll=min(c.scan_unroll, c.num_hidden_layers),
            )(c, static_window)
        else:
            self.layers = [layer_cls(c, windows[i] if not self._uniform_window else static_window,
                                     name=f"layers_{i}") for i in range(c.num_hidden_layers)]
        self.norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=dt, param_dtype=pdt, impl=c.norm_impl)
        if not c.tie_word_embeddings:
            self.lm_head = Linear(c.hidden_size, c.vocab_size, ("embed", "vocab"), dtype=dt, param_dtype=pdt,
                                  kernel_init=default_kernel_init())

    def __call__(self, input_ids: Optional[jnp.ndarray] = None, attention_mask: Optional[jnp.ndarray] = None,
                 positions: Optional[jnp.ndarray] = None, cache: Optional[KVCache] = None, *,
                 segment_ids: Optional[jnp.ndarray] = None, inputs_embeds: Optional[jnp.ndarray] = None,
                 return_hidden: bool = False, last_logits_only: bool = False, deterministic: bool = True):
        c = self.config
        h = self.embed(input_ids, inputs_embeds)
        b, t = h.shape[:2]
        if attention_mask is not None and attention_mask.shape != (b, t):
            raise ValueError(f"attention_mask shape {attention_mask.shape} != (batch, seq) {(b, t)}")
        if positions is not None and positions.shape != (b, t):
            raise ValueError(f"positions shape {positions.shape} != (batch, seq) {(b, t)}")
        mask = attention_mask if attention_mask is not None else jnp.ones((b, t), jnp.int32)

        cache_index = kv_valid = None
        layer_caches = None
        if cache is None:
            if positions is None:
                positions = positions_from_mask(mask) if attention_mask is not None else \
                    jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            if attention_mask is not None:
                seg = mask.astype(jnp.int32)
                segment_ids = seg if segment_ids is None else segment_ids * seg
        elif hasattr(cache, "begin"):  # paged / ring KV cache (iva_jax.inference.paged) keeps its own bookkeeping
            if segment_ids is not None:
                raise ValueError("segment_ids (packed sequences) cannot be combined with a KV cache")
            positions, layer_caches = cache.begin(mask, positions, c)
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids (packed sequences) cannot be combined with a KV cache")
            if cache.k.shape[1] != b:
                raise ValueError(f"cache batch {cache.k.shape[1]} != input batch {b}")
            if cache.k.shape[0] != c.num_hidden_layers:
                raise ValueError(f"cache has {cache.k.shape[0]} layers, model has {c.num_hidden_layers}")
            if positions is None:
                positions = positions_from_mask(mask, cache.next_pos)
            cache_index = cache.index
            kv_valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, mask.astype(bool), cache_index, axis=1)
            layer_caches = (cache.k, cache.v)

        cos, sin = rope_cos_sin(c, positions)
        windows = c.layer_windows()
        layer_windows = None if self._uniform_window else jnp.asarray([w or 0 for w in windows], jnp.int32)
        args = (cos, sin, segment_ids, cache_index, kv_valid)
        carry = (h, layer_caches, jnp.zeros((), jnp.int32))
        if c.scan_layers:
            carry, _ = self.layers(carry, layer_windows, *args)
        else:
            for layer in self.layers:
                carry, _ = layer(carry, None, *args)  # unscanned layers hold their window statically
        h, new_caches, _ = carry

        if last_logits_only:
            h = h[:, -1:]
        hidden = self.norm(h)
        logits = self.unembed(hidden)
        out: Tuple[Any, ...] = (logits,)
        if cache is not None and hasattr(cache, "begin"):
            out += (new_caches.finish(),)
        elif cache is not None:
            new_cache = KVCache(k=new_caches[0], v=new_caches[1], valid=kv_valid, index=cache_index + t,
                                next_pos=cache.next_pos + jnp.sum(mask, axis=1).astype(jnp.int32))
            out += (new_cache,)
        if return_hidden:
            out += (hidden,)
        return out[0] if len(out) == 1 else out

    def embed(self, input_ids: Optional[jnp.ndarray], inputs_embeds: Optional[jnp.ndarray] = None) -> jnp.ndarray:
        """Token embeddings [B, S, D] (exactly one of input_ids / inputs_embeds)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is not None:
            if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
                raise ValueError(f"inputs_embeds must be [batch, seq, {self.config.hidden_size}], "
                                 f"got {inputs_embeds.shape}")
            return inputs_embeds.astype(dtype_of(self.config.dtype))
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be integers, got {input_ids.dtype}")
        return self.embed_tokens(input_ids)

    def unembed(self, hidden: jnp.ndarray) -> jnp.ndarray:
        """Logits from final (normed) hidden states."""
        if self.config.tie_word_embeddings:
            return self.embed_tokens.attend(hidden)
        return self.lm_head(hidden)


def init_params(config: ModelConfig, seed: int = 0, batch: int = 1, seq: int = 8):
    """Random params for `config` (unboxed plain arrays) and the model."""
    model = Transformer(config)
    ids = jnp.zeros((batch, seq), jnp.int32)
    variables = jax.jit(model.init)(jax.random.PRNGKey(seed), ids)
    return model, nn.meta.unbox(variables["params"])


def param_logical_axes(config: ModelConfig):
    """Pytree of logical axis-name tuples, matching the param tree."""
    model = Transformer(config)
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
    return nn.get_partition_spec(abstract)["params"]

