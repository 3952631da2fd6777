"""Meshes, the logical-axis rules table and sharding helpers."""

from iva_jax.parallel.mesh import MeshConfig, initialize_distributed, mesh_context, single_device_mesh  # noqa: F401
from iva_jax.parallel.rules import DEFAULT_RULES, MESH_AXES, logical_to_mesh_spec, make_mesh  # noqa: F401
from iva_jax.parallel.sharding import (  # noqa: F401
    abstract_with_shardings,
    batch_shard_count,
    batch_sharding,
    batch_spec,
    fit_spec,
    logical_specs,
    process_batch_slice,
    put_batch,
    replicated,
    shard_params,
    sharded_jit,
    spec_for_names,
    tree_shardings,
    unbox,
)
