"""Mesh construction from a config, the mesh context for tracing, and multi-host start-up.

`MeshConfig(data, fsdp, tensor, expert)` builds a `jax.sharding.Mesh` with axes `MESH_AXES`; one size
may be -1 ("the devices left over").  `mesh_context(mesh)` is the context every jitted call that uses
logical activation constraints runs under (it picks `jax.set_mesh` or its predecessors, so the code
works on jax 0.10 and 0.11).  `initialize_distributed` wraps `jax.distributed.initialize` for
multi-process runs (one process per host, launched by SLURM / mpirun / your scheduler).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Iterator, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import Mesh

from iva_jax.config import ConfigBase, check
from iva_jax.parallel.rules import MESH_AXES, make_mesh

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MeshConfig(ConfigBase):
    """Mesh axis sizes; their product must equal the device count (one may be -1 = the rest)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1

    def validate(self) -> None:
        for f in MESH_AXES:
            v = getattr(self, f)
            check(isinstance(v, int) and not isinstance(v, bool) and (v == -1 or v >= 1), f, v,
                  "must be a positive integer or -1")
        free = [f for f in MESH_AXES if getattr(self, f) == -1]
        check(len(free) <= 1, "mesh", free, "at most one axis may be -1")

    @property
    def fixed_size(self) -> Optional[int]:
        """Product of the axis sizes, or None when one axis is -1."""
        sizes = [getattr(self, f) for f in MESH_AXES]
        return None if -1 in sizes else int(np.prod(sizes))

    def build(self, devices: Optional[Sequence[jax.Device]] = None, allow_subset: bool = False) -> Mesh:
        """The mesh over `devices` (default: all); ValueError when the sizes do not fit them.

        `allow_subset`: fixed sizes that multiply to fewer devices than present take the first ones
        (logged), e.g. a single-device run (all sizes 1) on a multi-GPU host.
        """
        devices = list(devices if devices is not None else jax.devices())
        n = self.fixed_size
        if allow_subset and n is not None and n < len(devices):
            log.warning("mesh %s uses %d of the %d devices present", self.to_dict(), n, len(devices))
            devices = devices[:n]
        return make_mesh(self.data, self.fsdp, self.tensor, self.expert, devices=devices)


def single_device_mesh(device: Optional[jax.Device] = None) -> Mesh:
    """A 1x1x1x1 mesh on one device (the unsharded baseline with the same code path)."""
    return make_mesh(1, 1, 1, 1, devices=[device or jax.devices()[0]])


@contextlib.contextmanager
def mesh_context(mesh: Optional[Mesh]) -> Iterator[None]:
    """Make `mesh` the ambient mesh for tracing (flax logical constraints read it); None is a no-op."""
    if mesh is None:
        yield
        return
    if hasattr(jax, "set_mesh"):
        ctx = jax.set_mesh(mesh)
    elif hasattr(jax.sharding, "use_mesh"):
        ctx = jax.sharding.use_mesh(mesh)
    else:  # pragma: no cover - very old jax
        ctx = mesh
    with ctx:
        yield


def _cluster_env_size() -> int:
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "JAX_NUM_PROCESSES"):
        v = os.environ.get(var)
        if v and v.isdigit():
            return int(v)
    return 1


def initialize_distributed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None,
                           local_device_ids: Optional[Sequence[int]] = None) -> Tuple[int, int]:
    """Start jax's multi-process runtime when this is a multi-process run; return (process_index, count).

    A single process (no arguments, no cluster environment) is a no-op, so scripts can always call it.
    Arguments left as None are auto-detected by jax (SLURM, Open MPI, JAX_COORDINATOR_ADDRESS, ...).
    Must run before anything touches `jax.devices()`.
    """
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes={num_processes} must be >= 1")
    wanted = (coordinator_address is not None or (num_processes or 1) > 1
              or "JAX_COORDINATOR_ADDRESS" in os.environ or _cluster_env_size() > 1)
    if wanted and not jax.distributed.is_initialized():
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, local_device_ids=local_device_ids)
        log.info("jax.distributed initialized: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
    return jax.process_index(), jax.process_count()
