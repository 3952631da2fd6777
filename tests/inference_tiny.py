"""Tiny random decoders for the inference / quantization tests, built without compiling `model.init`
(parameter shapes from `jax.eval_shape`, values from numpy), so test modules start fast."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from iva_jax.config import ModelConfig
from iva_jax.models.transformer import Transformer

CFG = ModelConfig(vocab_size=89, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=256)


def tiny_model(config: ModelConfig = CFG, seed: int = 0, std: float = 0.1):
    """(model, params): normal(0, std) matrices and biases, norm scales near 1, float32."""
    model = Transformer(config)
    shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0),
                                                             jnp.zeros((1, 2), jnp.int32))["params"]))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = str(getattr(path[-1], "key", ""))
        if name == "scale":
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(s.shape), jnp.float32)
        return jnp.asarray(std * rng.standard_normal(s.shape), jnp.float32)

    return model, jax.tree_util.tree_map_with_path(fill, shapes)
