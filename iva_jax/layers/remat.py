"""Named rematerialization policies (the one place that maps config names to jax policies)."""

from __future__ import annotations

from typing import Callable, Optional

import jax

REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")


def remat_policy(name: str) -> Optional[Callable]:
    """The jax.checkpoint policy for `name`; "full" saves nothing (recompute everything)."""
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    if name == "dots_saveable":
        return jax.checkpoint_policies.dots_saveable
    if name == "dots_with_no_batch_dims_saveable":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    raise ValueError(f"unknown remat policy {name!r}; valid: {list(REMAT_POLICIES)}")
