"""Meshes, the logical-axis rules table and sharding helpers."""

from iva_jax.parallel.rules import DEFAULT_RULES, MESH_AXES, logical_to_mesh_spec, make_mesh  # noqa: F401
