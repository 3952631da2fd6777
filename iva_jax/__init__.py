"""iva-jax: a JAX/Flax reasoning-and-efficiency engine for large language models.

Never imports torch.  Subpackages: config, layers, models, inference, moe, ssm, hrm, rl, train,
quant, parallel.  See README.md for the map.
"""

__version__ = "0.1.0"

from iva_jax.config import ModelConfig, RopeScaling  # noqa: E402,F401
