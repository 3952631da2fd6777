"""Shardings derived from logical-axis metadata, batch placement, and `jax.jit` with declared shardings.

The flow for any flax model whose params carry `nn.with_logical_partitioning` boxes:

    abstract = jax.eval_shape(init_fn, rng)            # boxed (nn.LogicallyPartitioned) leaves
    shardings = tree_shardings(abstract, mesh)          # NamedSharding per leaf, unboxed structure
    state = jax.jit(lambda r: unbox(init_fn(r)), out_shardings=shardings)(rng)

`tree_shardings` maps logical names through the rules table (`rules.logical_to_mesh_spec`) and then
checks divisibility: a mesh axis that does not divide its array dimension is dropped (that dimension
is replicated over it) and the decision is logged once.  Leaves without boxes are replicated, so a
model without annotations still trains (data parallel only).  Optimizer states built by `tx.init`
from boxed params keep the boxes (optax maps over the tree), so the same call covers them.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
from flax.core import meta
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from iva_jax.parallel.mesh import mesh_context
from iva_jax.parallel.rules import DEFAULT_RULES, MESH_AXES, logical_to_mesh_spec

log = logging.getLogger(__name__)
_LOGGED: set = set()


def _log_once(msg: str) -> None:
    if msg not in _LOGGED:
        _LOGGED.add(msg)
        log.warning(msg)


def _is_box(x: Any) -> bool:
    return isinstance(x, meta.AxisMetadata)


def unbox(tree: Any) -> Any:
    """Strip flax axis-metadata boxes (nn.Partitioned) from a pytree."""
    return meta.unbox(tree)


def logical_specs(tree: Any) -> Any:
    """Logical PartitionSpecs of a boxed tree (PartitionSpec() for unboxed leaves)."""
    return nn.get_partition_spec(tree)


def _axis_size(mesh: Mesh, axes: Any) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return int(np.prod([mesh.shape[a] for a in axes]))


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh, what: str = "array") -> PartitionSpec:
    """Drop trailing mesh axes of each dimension until it divides the dimension size (logged once)."""
    if len(spec) > len(shape):
        raise ValueError(f"{what}: partition spec {spec} has more entries than the shape {tuple(shape)}")
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            out.append(None)
            continue
        keep = [axes] if isinstance(axes, str) else list(axes)
        orig = tuple(keep)
        while keep and dim % _axis_size(mesh, keep):
            keep.pop()
        if tuple(keep) != orig and (tuple(shape), orig, dim) not in _LOGGED:  # once per shape (not per moment)
            _LOGGED.add((tuple(shape), orig, dim))
            _log_once(f"sharding: {what} dim of size {dim} is not divisible by mesh axes {orig} "
                      f"(sizes {[mesh.shape[a] for a in orig]}); using {tuple(keep) or 'replicated'}")
        out.append(None if not keep else (keep[0] if len(keep) == 1 else tuple(keep)))
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def spec_for_names(names: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh,
                   rules=DEFAULT_RULES, what: str = "array") -> PartitionSpec:
    """PartitionSpec for logical `names` of an array of `shape`, divisibility-checked on `mesh`.

    A name that is already a mesh axis (e.g. from `nn.with_partitioning`) is used as is.
    """
    if len(names) != len(shape):
        raise ValueError(f"{what}: {len(names)} axis names {tuple(names)} for shape {tuple(shape)}")
    table = dict(rules)
    direct = {n: n for n in names if n in MESH_AXES and n not in table}
    spec = logical_to_mesh_spec(names, tuple(rules) + tuple(direct.items()), mesh)
    return fit_spec(spec, shape, mesh, what)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def tree_shardings(tree: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """NamedSharding for every leaf of a (possibly boxed) tree; result has the unboxed structure."""

    def one(path, x):
        if _is_box(x):
            value = x.unbox()
            names = getattr(x, "names", None)
            if names is None:
                return NamedSharding(mesh, PartitionSpec())
            return NamedSharding(mesh, spec_for_names(tuple(names), np.shape(value), mesh, rules, _path_str(path)))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=_is_box)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_spec(mesh: Mesh, rules=DEFAULT_RULES, batch_size: Optional[int] = None) -> PartitionSpec:
    """Spec of the leading (batch) dimension from the `batch` rule; fitted to `batch_size` when given."""
    spec = logical_to_mesh_spec(("batch",), rules, mesh)
    if batch_size is not None:
        spec = fit_spec(spec, (batch_size,), mesh, "batch")
    return spec


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES, batch_size: Optional[int] = None) -> NamedSharding:
    """NamedSharding splitting the leading dimension of every batch array over the batch mesh axes."""
    return NamedSharding(mesh, batch_spec(mesh, rules, batch_size))


def batch_shard_count(mesh: Mesh, rules=DEFAULT_RULES) -> int:
    """How many ways the batch dimension is split on `mesh` (before any divisibility fallback)."""
    spec = logical_to_mesh_spec(("batch",), rules, mesh)
    return _axis_size(mesh, spec[0]) if len(spec) else 1


def process_batch_slice(global_batch_size: int) -> slice:
    """Rows of a global batch this process feeds (equal contiguous shares, process-major device order)."""
    n, i = jax.process_count(), jax.process_index()
    if global_batch_size % n:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by {n} processes")
    per = global_batch_size // n
    return slice(i * per, (i + 1) * per)


def put_batch(batch: Any, sharding: NamedSharding) -> Any:
    """Place a host batch (numpy pytree) on the mesh.

    One process: `batch` is the global batch.  Several: `batch` holds this process's rows
    (`process_batch_slice`) and the global arrays are assembled across processes.
    """
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)

    def one(x):
        x = np.asarray(x)
        global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree_util.tree_map(one, batch)


def shard_params(tree: Any, shardings: Any) -> Any:
    """Place (unboxed) arrays according to a matching tree of shardings."""
    tree = unbox(tree)
    try:
        return jax.device_put(tree, shardings)
    except ValueError as e:
        raise ValueError(f"shard_params: tree and shardings do not match: {e}") from None


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying `shardings` (the restore target for orbax on any mesh)."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                                  unbox(tree), shardings)


def sharded_jit(fn: Callable, *, mesh: Optional[Mesh], in_shardings: Any = None, out_shardings: Any = None,
                donate_argnums: Tuple[int, ...] = (), static_argnums: Tuple[int, ...] = (),
                rules=DEFAULT_RULES) -> Callable:
    """`jax.jit` with declared in/out shardings (the seed's "pjit"), traced under the mesh and rules.

    Calls run inside `mesh_context(mesh)` and `nn.logical_axis_rules(rules)`, so the model's
    `nn.with_logical_constraint` activations resolve against the same table as the params.
    The jitted function is exposed as `.jitted` (for `.lower(...)` / cost analysis).
    """
    kwargs = dict(donate_argnums=donate_argnums, static_argnums=static_argnums)
    if mesh is not None:
        kwargs.update(in_shardings=in_shardings, out_shardings=out_shardings)
    jitted = jax.jit(fn, **kwargs)

    @functools.wraps(fn)
    def call(*args, **kw):
        with mesh_context(mesh), nn.logical_axis_rules(rules):
            return jitted(*args, **kw)

    def lower(*args, **kw):
        with mesh_context(mesh), nn.logical_axis_rules(rules):
            return jitted.lower(*args, **kw)

    call.jitted = jitted
    call.lower = lower
    return call
