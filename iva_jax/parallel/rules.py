"""The one table mapping logical parameter/activation axes to mesh axes.

Every parameter in iva-jax is created with `nn.with_logical_partitioning(init, names)` using the
names below; `logical_to_mesh_spec` turns those names into a `PartitionSpec` on a mesh with axes
`MESH_AXES`.  Logical names:
  batch, length            activations
  embed                    the model (hidden) dimension
  vocab                    vocabulary rows of the embedding / lm_head columns
  mlp                      FFN intermediate dimension
  q_heads, kv_heads        flattened (heads * head_dim) projection outputs
  head_dim                 per-head vectors (q_norm/k_norm scales)
  layers                   the stacked layer axis created by nn.scan
  expert                   MoE expert axis
  norm                     norm scales (replicated)
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

MESH_AXES: Tuple[str, ...] = ("data", "fsdp", "tensor", "expert")

DEFAULT_RULES: Tuple[Tuple[str, object], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("expert", "expert"),
    ("norm", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, expert: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor, expert); `-1` takes the devices left over.

    Raises ValueError when the sizes do not multiply to the number of devices.
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor, "expert": expert}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {free}")
    for k, v in sizes.items():
        if v != -1 and (not isinstance(v, int) or v < 1):
            raise ValueError(f"mesh axis {k}={v!r} must be a positive integer or -1")
    fixed = int(np.prod([v for v in sizes.values() if v != -1]))
    if free:
        if len(devices) % fixed:
            raise ValueError(f"{len(devices)} devices are not divisible by the fixed mesh sizes {sizes}")
        sizes[free[0]] = len(devices) // fixed
    total = int(np.prod(list(sizes.values())))
    if total != len(devices):
        raise ValueError(f"mesh sizes {sizes} multiply to {total}, but {len(devices)} devices are present")
    arr = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(arr, MESH_AXES)


def logical_to_mesh_spec(names: Iterable[Optional[str]], rules=DEFAULT_RULES,
                         mesh: Optional[Mesh] = None) -> PartitionSpec:
    """PartitionSpec for a tuple of logical axis names; mesh axes of size 1 (or absent) are dropped."""
    table = dict(rules)
    used: set = set()
    out = []
    for n in names:
        target = table.get(n) if n is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        keep = []
        for a in axes:
            if a in used:
                continue
            if mesh is not None and (a not in mesh.shape or mesh.shape[a] == 1):
                continue
            keep.append(a)
        used.update(keep)
        out.append(None if not keep else (keep[0] if len(keep) == 1 else tuple(keep)))
    return PartitionSpec(*out)
