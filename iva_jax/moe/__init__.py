"""Mixture of Experts: routers, capacity / dropless dispatch, expert parallelism, losses and metrics.

    from iva_jax.moe import MoEConfig, MoeBlock
    y, aux = MoeBlock(MoEConfig(num_experts=8, num_experts_per_tok=2), hidden_size=512).apply(params, x)
"""

from iva_jax.moe.config import MoEConfig  # noqa: F401
from iva_jax.moe.layer import MoeBlock, MoeExperts, SharedExpert  # noqa: F401
from iva_jax.moe.routing import Routing, route, update_expert_bias  # noqa: F401
