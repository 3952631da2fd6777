"""TinyLM: a few-thousand-parameter causal LM that follows every convention of the real decoder.

It exists to test and smoke-run the training stack without the full decoder: logical axes on every
parameter, layers under `nn.scan`, HF-style names (embed_tokens, q_proj, ..., lm_head), remat by
policy name, packing inputs (`segment_ids`, `positions`), an auxiliary loss and a metric sown into
the "losses" / "metrics" collections, and optional multi-token-prediction heads returned as
`(logits, {"mtp_logits": (...)})`.  See `iva_jax.train.step` for that protocol.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from iva_jax.config import ConfigBase, check_positive
from iva_jax.layers.remat import remat_policy


@dataclasses.dataclass(frozen=True)
class TinyConfig(ConfigBase):
    vocab_size: int = 67
    hidden_size: int = 24
    intermediate_size: int = 40
    num_heads: int = 2
    num_layers: int = 2
    max_len: int = 64
    mtp_heads: int = 0
    aux_loss_coef: float = 0.0  # > 0: sow coef * mean(h^2) per layer into "losses"
    remat: str = "none"

    def validate(self) -> None:
        check_positive(self, "vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_layers", "max_len")


def _dense(features: int, names, name: str) -> nn.Dense:
    init = nn.with_logical_partitioning(nn.initializers.normal(0.2), names)
    return nn.Dense(features, use_bias=False, kernel_init=init, name=name)


class _RMSNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],))
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + 1e-6)
        return (y * scale.astype(jnp.float32)).astype(x.dtype)


class _Block(nn.Module):
    cfg: TinyConfig

    @nn.compact
    def __call__(self, h, mask):
        c = self.cfg
        hd = c.hidden_size // c.num_heads
        x = _RMSNorm(name="input_layernorm")(h)
        b, s, _ = x.shape
        q = _dense(c.hidden_size, ("embed", "q_heads"), "q_proj")(x).reshape(b, s, c.num_heads, hd)
        k = _dense(c.hidden_size, ("embed", "kv_heads"), "k_proj")(x).reshape(b, s, c.num_heads, hd)
        v = _dense(c.hidden_size, ("embed", "kv_heads"), "v_proj")(x).reshape(b, s, c.num_heads, hd)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(hd)
        scores = jnp.where(mask[:, None], scores, -1e30)
        att = jax.nn.softmax(scores, -1).astype(v.dtype)
        o = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, s, c.hidden_size)
        h = h + _dense(c.hidden_size, ("q_heads", "embed"), "o_proj")(o)
        x = _RMSNorm(name="post_attention_layernorm")(h)
        u = _dense(c.intermediate_size, ("embed", "mlp"), "up_proj")(x)
        h = h + _dense(c.hidden_size, ("mlp", "embed"), "down_proj")(nn.silu(u))
        h = nn.with_logical_constraint(h, ("batch", "length", "embed"))
        if c.aux_loss_coef > 0:
            self.sow("losses", "act_l2", c.aux_loss_coef * jnp.mean(jnp.square(h.astype(jnp.float32))))
        self.sow("metrics", "act_rms", jnp.sqrt(jnp.mean(jnp.square(h.astype(jnp.float32)))))
        return h, None


class TinyLM(nn.Module):
    """`apply({"params": p}, input_ids, segment_ids=None, positions=None) -> logits [B,S,V]`."""

    cfg: TinyConfig

    @nn.compact
    def __call__(self, input_ids, segment_ids: Optional[jax.Array] = None, positions: Optional[jax.Array] = None):
        c = self.cfg
        b, s = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(s), (b, s))
        emb = self.param("embed_tokens", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
                         (c.vocab_size, c.hidden_size))
        pos = self.param("embed_positions", nn.with_logical_partitioning(nn.initializers.normal(0.1), (None, "embed")),
                         (c.max_len, c.hidden_size))
        h = jnp.take(emb, input_ids, axis=0) + jnp.take(pos, positions, axis=0)
        causal = jnp.tril(jnp.ones((s, s), bool))[None]
        mask = causal if segment_ids is None else causal & (segment_ids[:, :, None] == segment_ids[:, None, :])
        block = _Block if c.remat == "none" else nn.remat(_Block, policy=remat_policy(c.remat), prevent_cse=False)
        layers = nn.scan(block, variable_axes={"params": 0, "losses": 0, "metrics": 0},
                         split_rngs={"params": True}, in_axes=nn.broadcast, length=c.num_layers,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        h, _ = layers(c, name="layers")(h, mask)
        h = _RMSNorm(name="norm")(h)
        logits = _dense(c.vocab_size, ("embed", "vocab"), "lm_head")(h)
        if c.mtp_heads == 0:
            return logits
        mtp = tuple(_dense(c.vocab_size, ("embed", "vocab"), f"mtp_head_{k}")(h) for k in range(1, c.mtp_heads + 1))
        return logits, {"mtp_logits": mtp}


def tiny_init_fn(cfg: TinyConfig, seq_len: int = 8):
    """rng -> boxed params of a TinyLM (what `init_train_state` wants)."""
    model = TinyLM(cfg)

    def init(rng):
        return model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]

    return model, init


def tiny_host_params(cfg: TinyConfig, seed: int = 0, seq_len: int = 8):
    """(model, boxed abstract params, numpy params): random weights made on the host, no init compile.

    Norm scales are ones, embeddings N(0, 1), kernels N(0, 0.2^2) -- the initializers' distributions.
    """
    import numpy as np
    from flax.core import meta

    model, init = tiny_init_fn(cfg, seq_len)
    logical = jax.eval_shape(init, jax.random.PRNGKey(0))
    rng = np.random.default_rng(seed)

    def one(path, s):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            return np.ones(s.shape, np.float32)
        std = 1.0 if name == "embed_tokens" else 0.1 if name == "embed_positions" else 0.2
        return (std * rng.standard_normal(s.shape)).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(one, meta.unbox(logical))
    return model, logical, params
