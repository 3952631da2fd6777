"""Models assembled from configs."""

from iva_jax.models.transformer import DecoderLayer, Transformer, init_params  # noqa: F401
