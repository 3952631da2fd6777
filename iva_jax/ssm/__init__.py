"""State-space and recurrent sequence mixers.

Every mixer maps x [B, L, H] -> [B, L, H] (`__call__`, with `mask=` and `return_state=` where it has a
state); the recurrent ones (mamba, mamba2, retnet, rwkv) also have `init_state(batch)` and
`step(x_t [B, H], state) -> (y_t, state)` with the state an explicit NamedTuple (O(1) memory per token).
`make_mixer(SSMConfig, hidden_size)` builds one from a config.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from iva_jax.ssm.config import MIXER_TYPES, SSMConfig  # noqa: F401
from iva_jax.ssm.mamba import MambaMixer, MambaState  # noqa: F401
from iva_jax.ssm.mamba2 import Mamba2Mixer, Mamba2State, ssd_chunked, ssd_sequential  # noqa: F401
from iva_jax.ssm.mixers import (HyenaOperator, RWKVState, RWKVTimeMix, TopKAttention,  # noqa: F401
                                fft_causal_conv, topk_attention)
from iva_jax.ssm.retnet import (MultiScaleRetention, RetNetState, retention_chunkwise,  # noqa: F401
                                retention_parallel, retention_recurrent)
from iva_jax.ssm.scan import selective_scan, selective_scan_bld  # noqa: F401

MIXERS = {"mamba": MambaMixer, "mamba2": Mamba2Mixer, "retnet": MultiScaleRetention, "rwkv": RWKVTimeMix,
          "hyena": HyenaOperator, "topk_attention": TopKAttention}
RECURRENT = ("mamba", "mamba2", "retnet", "rwkv")  # mixers with init_state / step


def make_mixer(config: SSMConfig, hidden_size: int, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               name: str | None = None, **kwargs):
    """The mixer module config.type names (kwargs: e.g. scan_config= / interpret= for mamba)."""
    if not isinstance(config, SSMConfig):
        raise ValueError(f"make_mixer expects an SSMConfig, got {type(config).__name__}")
    if not (isinstance(hidden_size, int) and hidden_size > 0):
        raise ValueError(f"hidden_size={hidden_size!r} must be a positive int")
    return MIXERS[config.type](config, hidden_size, dtype=dtype, param_dtype=param_dtype, name=name, **kwargs)
