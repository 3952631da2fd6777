"""Named rematerialization policies, in one place (the decoder reads `remat` from its config).

    none           no remat: every activation of the block is kept for the backward pass
    full           keep only the block inputs; recompute the whole block in the backward pass
    dots_saveable  keep matmul outputs, recompute the cheap elementwise work (norms, activations)
"""

from __future__ import annotations

from typing import Callable, Optional

import flax.linen as nn
import jax

REMAT_POLICIES = ("none", "full", "dots_saveable")


def remat_policy(name: str) -> Optional[Callable]:
    """The jax.checkpoint policy for a policy name (None for "none", which means: do not remat)."""
    if name == "none":
        return None
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    if name == "dots_saveable":
        return jax.checkpoint_policies.dots_saveable
    raise ValueError(f"remat policy {name!r} must be one of {list(REMAT_POLICIES)}")


def remat_module(module_cls: type, name: str, *, scanned: bool = True, static_argnums=()) -> type:
    """`module_cls` wrapped in `nn.remat` with the named policy ("none" returns it unchanged).

    Inside `nn.scan` (`scanned=True`) CSE prevention is unnecessary and is turned off, as jax advises.
    """
    policy = remat_policy(name)
    if name == "none":
        return module_cls
    return nn.remat(module_cls, policy=policy, prevent_cse=not scanned, static_argnums=static_argnums)
