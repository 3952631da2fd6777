"""Expert parallelism: experts sharded over the mesh's `expert` axis, tokens exchanged with all-to-all.

Layout (mesh axes (data, fsdp, tensor, expert) from `iva_jax.parallel.make_mesh`): tokens [T, D] are
sharded over every batch axis (data, fsdp, expert), expert weights [E, ...] over `expert`; the
exchange runs inside `shard_map` along `expert` only, so it composes with data parallelism (each
data row of the mesh exchanges among its own expert group).  Routing happens outside, on the global
token view, so router, losses and metrics are exactly the single-device ones.

* capacity: each device fills an [E, C, D] buffer for its local tokens (C from its T_local, i.e.
  one GShard group per token shard: the single-device equivalent is `capacity_moe(...,
  num_groups=token shards)`), `all_to_all` sends each expert shard its [E_local, C, D] slices,
  experts run as batched einsums, and a second `all_to_all` brings the results back.
* dropless: assignments are sorted by expert (so slices for one device are contiguous) and moved
  with a ragged all-to-all into an expert-major receive buffer of worst-case size
  ep * T_local * k rows (exact, never drops), run through the grouped matmul, and sent back.
  `exchange="ragged"` uses `jax.lax.ragged_all_to_all` (GPU/TPU); `exchange="dense"` emulates it
  with an `all_to_all` of per-peer windows padded to T_local * k rows (what XLA:CPU can run; it
  moves ep x more bytes).  "auto" picks ragged off-CPU.
Expert weights enter the shard_map whole along embed/mlp (fsdp/tensor shards are gathered there).
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from iva_jax.moe.dispatch import (capacity_combine, capacity_dispatch, capacity_positions, expert_capacity,
                                  grouped_swiglu, permute_rows, sort_by_expert, swiglu_experts)

from iva_jax.parallel.kernel_sharding import shard_map  # noqa: E402  (re-exported: the one compat wrapper)

TOKEN_AXES = ("data", "fsdp", "expert")  # the mesh axes that shard the "batch" logical axis


def _excl_cumsum(x: jnp.ndarray, axis: int = -1) -> jnp.ndarray:
    return jnp.cumsum(x, axis=axis) - x


def ragged_all_to_all_dense(operand: jnp.ndarray, output: jnp.ndarray, input_offsets: jnp.ndarray,
                            send_sizes: jnp.ndarray, output_offsets: jnp.ndarray, recv_sizes: jnp.ndarray, *,
                            axis_name: str, max_rows_per_peer: int) -> jnp.ndarray:
    """`jax.lax.ragged_all_to_all` semantics from a dense `all_to_all` (for backends without it).

    Each peer's slices are packed into a window of `max_rows_per_peer` rows (must bound the rows
    sent to any one peer), windows are exchanged with all_to_all, and rows are scattered into
    `output` at the senders' `output_offsets`.  Differentiable by ordinary autodiff.
    """
    ep = jax.lax.axis_size(axis_name)
    n_slices = input_offsets.shape[0]
    spd = n_slices // ep
    w = max_rows_per_peer
    q = jnp.arange(w, dtype=jnp.int32)

    def locate(sizes, offsets):  # per peer: window row q -> (slice l, offset of the row), valid
        sizes = sizes.reshape(ep, spd)
        incl = jnp.cumsum(sizes, axis=1)
        sl = jax.vmap(lambda c: jnp.searchsorted(c, q, side="right"))(incl)  # [ep, W]
        valid = q[None, :] < incl[:, -1:]
        sl = jnp.minimum(sl, spd - 1)
        rel = jnp.take_along_axis(incl - sizes, sl, axis=1)
        row = jnp.take_along_axis(offsets.reshape(ep, spd), sl, axis=1) + q[None, :] - rel
        return row, valid

    src_row, src_valid = locate(send_sizes, input_offsets)
    valid = src_valid.reshape(src_valid.shape + (1,) * (operand.ndim - 1))
    window = jnp.where(valid, operand[jnp.clip(src_row, 0, operand.shape[0] - 1)], 0)
    recv = jax.lax.all_to_all(window, axis_name, 0, 0, tiled=True)  # [ep (source), W, ...]
    out_off = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
    dst_row, dst_valid = locate(recv_sizes, out_off)
    dst_row = jnp.where(dst_valid, dst_row, output.shape[0])
    return output.at[dst_row.reshape(-1)].set(recv.reshape((-1,) + recv.shape[2:]), mode="drop")


def _exchange_fn(exchange: str, max_rows: int, axis_name: str):
    if exchange == "ragged":
        return functools.partial(jax.lax.ragged_all_to_all, axis_name=axis_name)
    if exchange == "dense":
        return functools.partial(ragged_all_to_all_dense, axis_name=axis_name, max_rows_per_peer=max_rows)
    raise ValueError(f"exchange={exchange!r} must be 'auto', 'ragged' or 'dense'")


def _capacity_body(x, ei, gw, valid, wg, wu, wd, *, capacity_factor, axis, dtype):
    ep = jax.lax.axis_size(axis)
    e_loc, d = wg.shape[0], x.shape[1]
    e = e_loc * ep
    cap = expert_capacity(x.shape[0], ei.shape[1], capacity_factor, e)
    pos, keep = capacity_positions(ei, e, cap, valid)
    buf = capacity_dispatch(x, ei, pos, keep, e, cap).reshape(ep, e_loc, cap, d)
    buf = jax.lax.all_to_all(buf, axis, 0, 0, tiled=True)  # [ep (source), E_local, C, D]
    buf = buf.transpose(1, 0, 2, 3).reshape(e_loc, ep * cap, d)
    out = swiglu_experts(buf, wg, wu, wd, dtype)
    out = out.reshape(e_loc, ep, cap, d).transpose(1, 0, 2, 3)
    out = jax.lax.all_to_all(out, axis, 0, 0, tiled=True).reshape(e, cap, d)  # back to token owners
    return capacity_combine(out, ei, pos, keep, gw), keep


def _dropless_body(x, ei, gw, wg, wu, wd, *, axis, impl, exchange, dtype, kernel_kw):
    ep = jax.lax.axis_size(axis)
    me = jax.lax.axis_index(axis)
    t, k = ei.shape
    e_loc, d = wg.shape[0], x.shape[1]
    e = e_loc * ep
    order, sizes = sort_by_expert(ei, e)  # sizes [E]: my assignments per global expert
    inv = jnp.zeros_like(order).at[order].set(jnp.arange(t * k, dtype=jnp.int32))  # sorted position of each
    take = permute_rows(impl)
    xs = take(x, order // k, inv.reshape(t, k))
    all_sizes = jax.lax.all_gather(sizes, axis).reshape(ep, ep, e_loc)  # [source, dest, local expert]
    per_expert = jnp.sum(all_sizes, axis=0)  # [dest, local expert]
    # receive buffer on each device: expert-major (local expert, then source)
    expert_base = _excl_cumsum(per_expert, axis=1)  # [dest, local expert]
    before_me = jnp.take(_excl_cumsum(all_sizes, axis=0), me, axis=0)  # rows of lower sources, [dest, l]
    input_offsets = _excl_cumsum(sizes).astype(jnp.int32)
    output_offsets = (expert_base + before_me).reshape(e).astype(jnp.int32)
    recv_sizes = jnp.take(all_sizes, me, axis=1).reshape(e).astype(jnp.int32)  # index source * E_l + l
    rows_per_peer = t * k
    ex = _exchange_fn(exchange, rows_per_peer, axis)
    recv = ex(xs, jnp.zeros((ep * t * k, d), xs.dtype), input_offsets, sizes, output_offsets, recv_sizes)
    group_sizes = jnp.take(per_expert, me, axis=0).astype(jnp.int32)
    out = grouped_swiglu(recv, group_sizes, wg, wu, wd, impl=impl, dtype=dtype, **kernel_kw)
    # return trip: the exact reverse exchange
    back_in = jax.lax.all_to_all(output_offsets, axis, 0, 0, tiled=True)
    back_out = jax.lax.all_to_all(input_offsets, axis, 0, 0, tiled=True)
    ys = ex(out, jnp.zeros((t * k, d), out.dtype), back_in, recv_sizes, back_out, sizes)
    ys = take(ys, inv, order[:, None]).reshape(t, k, d)
    return jnp.einsum("tk,tkd->td", gw.astype(jnp.float32), ys.astype(jnp.float32))


def check_expert_mesh(mesh: Mesh, num_experts: int, num_tokens: Optional[int] = None,
                      expert_axis: str = "expert") -> Tuple[int, Tuple[str, ...]]:
    """(expert-parallel size, token axes); ValueError when experts or tokens do not divide the mesh."""
    if expert_axis not in mesh.shape:
        raise ValueError(f"mesh axes {tuple(mesh.shape)} have no {expert_axis!r} axis")
    ep = mesh.shape[expert_axis]
    if num_experts % ep:
        raise ValueError(f"num_experts={num_experts} is not divisible by the {expert_axis!r} mesh axis of size {ep}")
    token_axes = tuple(a for a in TOKEN_AXES if a in mesh.shape)
    if num_tokens is not None:
        n = 1
        for a in token_axes:
            n *= mesh.shape[a]
        if num_tokens % n:
            raise ValueError(f"{num_tokens} tokens are not divisible by the {n} token shards of mesh axes {token_axes}")
    return ep, token_axes


def expert_parallel_moe(x: jnp.ndarray, expert_index: jnp.ndarray, gate_weights: jnp.ndarray,
                        w_gate: jnp.ndarray, w_up: jnp.ndarray, w_down: jnp.ndarray, *, mesh: Mesh,
                        capacity_factor: Optional[float] = None, valid: Optional[jnp.ndarray] = None,
                        impl: str = "ragged", exchange: str = "auto", dtype=None, expert_axis: str = "expert",
                        **kernel_kw) -> Tuple[jnp.ndarray, Optional[jnp.ndarray]]:
    """MoE FFN over `mesh` with experts sharded on `expert_axis`: x [T, D] -> (y [T, D] f32, keep or None).

    capacity_factor=None: dropless (impl = grouped-matmul impl, exchange as in the module docstring);
    else capacity dispatch with one token group per token shard (keep [T, k] is returned).
    """
    t, d = x.shape
    e = w_gate.shape[0]
    ep, token_axes = check_expert_mesh(mesh, e, t, expert_axis)
    tok = P(token_axes)
    wspec = P(expert_axis)
    if capacity_factor is not None:
        if valid is None:
            valid = jnp.ones((t,), bool)
        body = functools.partial(_capacity_body, capacity_factor=capacity_factor, axis=expert_axis, dtype=dtype)
        f = shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, tok, wspec, wspec, wspec), out_specs=(tok, tok))
        return f(x, expert_index, gate_weights, valid, w_gate, w_up, w_down)
    if exchange == "auto":
        exchange = "dense" if jax.devices()[0].platform == "cpu" else "ragged"
    body = functools.partial(_dropless_body, axis=expert_axis, impl=impl, exchange=exchange, dtype=dtype,
                             kernel_kw=kernel_kw)
    f = shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, wspec, wspec, wspec), out_specs=tok,
                  check=impl not in ("pallas", "mosaic"))  # a Pallas call's outputs carry no replication info to check
    return f(x, expert_index, gate_weights, w_gate, w_up, w_down), None
