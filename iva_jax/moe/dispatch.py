"""Moving tokens to experts and back: capacity dispatch (with dropping) and dropless grouped dispatch.

Expert weights are stacked SwiGLU matrices: w_gate, w_up [E, D, F], w_down [E, F, D];
expert e computes down(silu(x @ w_gate[e]) * (x @ w_up[e])).  Tokens are flattened: x [T, D],
routing expert_index / gate_weights [T, k].

Capacity path: every expert takes at most C = ceil(T * k * capacity_factor / E) assignments (per token
group, see `num_groups`).  Slots are claimed in choice order: all tokens' first choices (in token
order) before any second choice, and so on.  A dropped assignment contributes zero; a token whose
every assignment is dropped outputs zero and rides the residual.  Data moves by index gathers
("gather", O(T k D)) or by one-hot dispatch/combine einsums ("einsum", GShard style, O(T E C D)).

Dropless path: assignments are sorted by expert and multiplied with a grouped matmul
(`jax.lax.ragged_dot`, the Pallas kernel `kernels.grouped_matmul`, or the Mosaic GPU expert FFN
`kernels.grouped_matmul_mosaic` on a tile-padded row layout), then unsorted and combined.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from kernels.grouped_matmul import gather_rows, grouped_matmul, reference as gmm_reference


def expert_capacity(num_tokens: int, top_k: int, capacity_factor: float, num_experts: int) -> int:
    """C = ceil(tokens * k * capacity_factor / experts) (at least 1)."""
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    return max(1, math.ceil(num_tokens * top_k * capacity_factor / num_experts))


# ---------------------------------------------------------------------------------------------
# expert FFNs
# ---------------------------------------------------------------------------------------------
def swiglu_experts(xe: jnp.ndarray, w_gate: jnp.ndarray, w_up: jnp.ndarray, w_down: jnp.ndarray,
                   dtype=None) -> jnp.ndarray:
    """Batched expert FFN on a capacity buffer: [E, C, D] -> [E, C, D] in `dtype` (f32 accumulation)."""
    dtype = dtype or xe.dtype
    xe = xe.astype(dtype)
    dot = lambda eq, a, b: jnp.einsum(eq, a, b.astype(dtype), preferred_element_type=dtype)
    h = _silu_mul(dot("ecd,edf->ecf", xe, w_gate), dot("ecd,edf->ecf", xe, w_up), dtype)
    return dot("ecf,efd->ecd", h, w_down)


def resolve_dropless_impl(impl: str, dtype, d: int, f: int, kernel_kw: Optional[dict] = None) -> str:
    """impl "auto" -> the fastest dropless implementation this device, dtype and expert shape (d -> f -> d)
    allow ("mosaic" on Hopper for bf16/f16 tile-aligned shapes, "pallas" on sm80+, else "ragged"; logged
    once); other impls unchanged.  (Row counts never matter: the Mosaic layout pads rows to whole tiles.)"""
    if impl != "auto":
        return impl
    from kernels import dispatch as kd
    from kernels import grouped_matmul_mosaic as gmm_mosaic
    kw = kernel_kw or {}
    if kw.get("interpret"):
        return "pallas"
    tm = _mosaic_tile_m(kw)
    bwd = ((kw.get("dh_tiles", gmm_mosaic.DH_TILES), kw.get("dx_tiles", gmm_mosaic.DX_TILES))
           if kw.get("mosaic_backward", True) else ())
    why = gmm_mosaic.unsupported_reason(tm, d, f, dtype,
                                        kw.get("gate_up_tiles", gmm_mosaic.GATE_UP_TILES),
                                        kw.get("down_tiles", gmm_mosaic.DOWN_TILES), bwd)
    choice = kd.select_impl("dropless_moe", "auto", unsupported={"mosaic": why}, preference=("mosaic", "triton"))
    return {"mosaic": "mosaic", "triton": "pallas"}.get(choice, "ragged")


def _mosaic_tile_m(kernel_kw) -> int:
    from kernels import grouped_matmul_mosaic as gmm_mosaic
    return kernel_kw.get("gate_up_tiles", gmm_mosaic.GATE_UP_TILES).tile_m


def _silu_mul(g: jnp.ndarray, u: jnp.ndarray, dtype) -> jnp.ndarray:
    """silu(g) * u in float32, stored in `dtype` (matmul outputs stay in the compute dtype)."""
    g = g.astype(jnp.float32)
    return (jax.nn.silu(g) * u.astype(jnp.float32)).astype(dtype)


def grouped_swiglu(xs: jnp.ndarray, group_sizes: jnp.ndarray, w_gate: jnp.ndarray, w_up: jnp.ndarray,
                   w_down: jnp.ndarray, impl: str = "ragged", dtype=None, **kernel_kw) -> jnp.ndarray:
    """Expert FFN on expert-sorted rows xs [M, D] with group_sizes [E] -> [M, D] in `dtype`; rows past
    sum(sizes) give 0.  Matmuls accumulate in float32 and store `dtype`; silu(g) * u runs in float32.

    impl: "ragged" (jax.lax.ragged_dot), "pallas" (kernels.grouped_matmul, impl auto / kernel_kw),
    "mosaic" (kernels.grouped_matmul_mosaic on a tile-padded copy of the rows; kernel_kw as in its
    `grouped_swiglu_ffn`), "dense" (kernels.grouped_matmul.reference: every expert on every row, masked; for tests).
    """
    dtype = dtype or xs.dtype
    xs = xs.astype(dtype)
    if impl == "mosaic":
        from kernels import grouped_matmul_mosaic as gmm_mosaic
        w = [v.astype(dtype) for v in (w_gate, w_up, w_down)]
        lay = gmm_mosaic.padded_layout(group_sizes, xs.shape[0], _mosaic_tile_m(kernel_kw))
        xp = gmm_mosaic.pad_rows(xs, lay)
        out = gmm_mosaic.grouped_swiglu_ffn(xp, lay.tile_group, lay.group_sizes, *w,
                                            **kernel_kw)
        return gmm_mosaic.unpad_rows(out, lay)
    if impl == "ragged":
        prec = jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None  # no TF32 for f32 on GPU
        mm = lambda a, w: jax.lax.ragged_dot(a, w.astype(dtype), group_sizes, preferred_element_type=dtype,  # noqa: E731
                                             precision=prec)
    elif impl == "pallas":
        mm = lambda a, w: grouped_matmul(a, w.astype(dtype), group_sizes, preferred_element_type=dtype, **kernel_kw)
    elif impl == "dense":
        mm = lambda a, w: gmm_reference(a, w.astype(dtype), group_sizes, preferred_element_type=dtype)
    else:
        raise ValueError(f"grouped_swiglu impl={impl!r} must be 'ragged', 'pallas', 'mosaic' or 'dense'")
    return mm(_silu_mul(mm(xs, w_gate), mm(xs, w_up), dtype), w_down)


# ---------------------------------------------------------------------------------------------
# capacity dispatch
# ---------------------------------------------------------------------------------------------
def capacity_positions(expert_index: jnp.ndarray, num_experts: int, capacity: int,
                       valid: Optional[jnp.ndarray] = None) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """Slot of each assignment in its expert's buffer and whether it fits.

    expert_index [T, k] -> (position [T, k] int32, keep [T, k] bool).  Choice-major priority: every
    token's choice j claims its slot before any token's choice j+1.  Tokens with valid=False claim
    nothing and are not kept.
    """
    t, k = expert_index.shape
    onehot = jax.nn.one_hot(expert_index.T, num_experts, dtype=jnp.int32)  # [k, T, E], choice-major
    if valid is not None:
        onehot = onehot * valid.reshape(1, t, 1).astype(jnp.int32)
    pos = jnp.cumsum(onehot.reshape(k * t, num_experts), axis=0).reshape(k, t, num_experts) - 1
    pos = jnp.sum(pos * onehot, axis=-1).T  # [T, k]
    keep = pos < capacity
    if valid is not None:
        keep = keep & valid.reshape(t, 1).astype(bool)
    return pos.astype(jnp.int32), keep


def capacity_dispatch(x: jnp.ndarray, expert_index: jnp.ndarray, position: jnp.ndarray, keep: jnp.ndarray,
                      num_experts: int, capacity: int) -> jnp.ndarray:
    """Gather tokens into the expert buffer [E, C, D]; empty slots are zero."""
    t, k = expert_index.shape
    n_slots = num_experts * capacity
    slot = jnp.where(keep, expert_index * capacity + position, n_slots).reshape(-1)
    token = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[:, None], (t, k)).reshape(-1)
    src = jnp.full((n_slots + 1,), t, jnp.int32).at[slot].set(token)[:n_slots]  # token t = the zero row
    x_pad = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)], axis=0)
    return x_pad[src].reshape(num_experts, capacity, x.shape[1])


def capacity_combine(expert_out: jnp.ndarray, expert_index: jnp.ndarray, position: jnp.ndarray,
                     keep: jnp.ndarray, gate_weights: jnp.ndarray) -> jnp.ndarray:
    """y[t] = sum over kept choices of gate_weight * expert_out[e, slot]; [E, C, D] -> [T, D] float32."""
    e, c, d = expert_out.shape
    slot = jnp.where(keep, expert_index * c + position, 0)
    rows = expert_out.reshape(e * c, d)[slot]  # [T, k, D]
    w = jnp.where(keep, gate_weights, 0.0).astype(jnp.float32)
    return jnp.einsum("tk,tkd->td", w, rows.astype(jnp.float32))


def dispatch_mask(expert_index: jnp.ndarray, position: jnp.ndarray, keep: jnp.ndarray, num_experts: int,
                  capacity: int) -> jnp.ndarray:
    """GShard one-hot dispatch tensor [T, E, C] (float32; 1 where token t sits in slot (e, c))."""
    oe = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32)  # [T, k, E]
    oc = jax.nn.one_hot(jnp.where(keep, position, capacity), capacity, dtype=jnp.float32)  # [T, k, C]
    return jnp.einsum("tke,tkc->tec", oe, oc)


def _capacity_one_group(x, expert_index, gate_weights, w_gate, w_up, w_down, capacity, valid, combine, dtype):
    e = w_gate.shape[0]
    pos, keep = capacity_positions(expert_index, e, capacity, valid)
    if combine == "gather":
        buf = capacity_dispatch(x, expert_index, pos, keep, e, capacity)
        out = swiglu_experts(buf, w_gate, w_up, w_down, dtype)
        y = capacity_combine(out, expert_index, pos, keep, gate_weights)
    elif combine == "einsum":
        mask = dispatch_mask(expert_index, pos, keep, e, capacity)
        dt = dtype or x.dtype
        buf = jnp.einsum("tec,td->ecd", mask.astype(dt), x.astype(dt))
        out = swiglu_experts(buf, w_gate, w_up, w_down, dtype)
        onehot_k = jax.nn.one_hot(expert_index, e, dtype=jnp.float32) * jnp.where(keep, gate_weights, 0.0)[..., None]
        comb = mask * jnp.einsum("tke->te", onehot_k)[:, :, None]  # [T, E, C] gate weight per slot
        y = jnp.einsum("tec,ecd->td", comb, out.astype(jnp.float32))
    else:
        raise ValueError(f"combine={combine!r} must be 'gather' or 'einsum'")
    return y, keep


def capacity_moe(x: jnp.ndarray, expert_index: jnp.ndarray, gate_weights: jnp.ndarray, w_gate: jnp.ndarray,
                 w_up: jnp.ndarray, w_down: jnp.ndarray, capacity_factor: float, *, num_groups: int = 1,
                 valid: Optional[jnp.ndarray] = None, combine: str = "gather",
                 dtype=None) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """Capacity-limited MoE FFN: x [T, D] -> (y [T, D] float32, keep [T, k] bool).

    Tokens are split into `num_groups` contiguous groups (GShard groups; expert parallelism uses one
    group per token shard) and each group gets capacity ceil(T/groups * k * capacity_factor / E).
    """
    t, d = x.shape
    k = expert_index.shape[1]
    e = w_gate.shape[0]
    if t % num_groups:
        raise ValueError(f"{t} tokens are not divisible into num_groups={num_groups}")
    tg = t // num_groups
    cap = expert_capacity(tg, k, capacity_factor, e)
    if valid is None:
        valid = jnp.ones((t,), bool)
    fn = lambda xx, ei, gw, vv: _capacity_one_group(xx, ei, gw, w_gate, w_up, w_down, cap, vv, combine, dtype)
    y, keep = jax.vmap(fn)(x.reshape(num_groups, tg, d), expert_index.reshape(num_groups, tg, k),
                           gate_weights.reshape(num_groups, tg, k), valid.reshape(num_groups, tg))
    return y.reshape(t, d), keep.reshape(t, k)


# ---------------------------------------------------------------------------------------------
# dropless dispatch
# ---------------------------------------------------------------------------------------------
def permute_rows(impl: str):
    """The row gather for a dropless impl: `gather_rows` around the kernels (whose custom VJPs rule out
    forward-mode autodiff anyway), plain `jnp.take` for "ragged" / "dense" (jvp, jacfwd, hessian keep working)."""
    if impl in ("pallas", "mosaic"):
        return gather_rows
    return lambda src, idx, inv: jnp.take(src, idx, axis=0, mode="fill", fill_value=0)


def sort_by_expert(expert_index: jnp.ndarray, num_experts: int) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """(order [T*k], group_sizes [E]): flat assignments sorted by expert (stable); token = order // k."""
    flat = expert_index.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, sizes


def dropless_moe(x: jnp.ndarray, expert_index: jnp.ndarray, gate_weights: jnp.ndarray, w_gate: jnp.ndarray,
                 w_up: jnp.ndarray, w_down: jnp.ndarray, *, impl: str = "ragged", dtype=None,
                 **kernel_kw) -> jnp.ndarray:
    """Dropless MoE FFN: x [T, D] -> y [T, D] float32 (sort by expert, grouped matmul, unsort, combine).

    impl="mosaic" gathers the tokens straight into the tile-padded layout of
    `kernels.grouped_matmul_mosaic` and reads each assignment's row back from it (no sorted copy).
    """
    t, d = x.shape
    k = expert_index.shape[1]
    e = w_gate.shape[0]
    order, sizes = sort_by_expert(expert_index, e)
    if impl == "mosaic":
        from kernels import grouped_matmul_mosaic as gmm_mosaic
        dt = dtype or x.dtype
        lay = gmm_mosaic.padded_layout(sizes, t * k, _mosaic_tile_m(kernel_kw))
        used = lay.source < t * k
        assign = jnp.where(used, order[jnp.minimum(lay.source, t * k - 1)], t * k)  # of each padded row
        token = jnp.where(used, assign // k, t)  # t: a pad row (zeros)
        row = jnp.zeros_like(order).at[order].set(lay.row_index)  # padded row of each assignment
        xp = gather_rows(x.astype(dt), token, row.reshape(t, k))
        out = gmm_mosaic.grouped_swiglu_ffn(xp, lay.tile_group, lay.group_sizes,
                                            *(w.astype(dt) for w in (w_gate, w_up, w_down)), **kernel_kw)
        out = gather_rows(out, row, assign[:, None]).reshape(t, k, d)
        return jnp.einsum("tk,tkd->td", gate_weights.astype(jnp.float32), out.astype(jnp.float32))
    inv = jnp.zeros_like(order).at[order].set(jnp.arange(t * k, dtype=jnp.int32))  # sorted position of each
    take = permute_rows(impl)
    xs = take(x, order // k, inv.reshape(t, k))
    out = grouped_swiglu(xs, sizes, w_gate, w_up, w_down, impl=impl, dtype=dtype, **kernel_kw)
    out = take(out, inv, order[:, None]).reshape(t, k, d)
    return jnp.einsum("tk,tkd->td", gate_weights.astype(jnp.float32), out.astype(jnp.float32))


def dense_reference(x: jnp.ndarray, expert_index: jnp.ndarray, gate_weights: jnp.ndarray, w_gate: jnp.ndarray,
                    w_up: jnp.ndarray, w_down: jnp.ndarray) -> jnp.ndarray:
    """Every expert on every token, combined with the routing weights (O(T E); tests only), float32."""
    e = w_gate.shape[0]
    out = swiglu_experts(jnp.broadcast_to(x.astype(jnp.float32), (e,) + x.shape), w_gate, w_up, w_down,
                         jnp.float32)  # [E, T, D]
    comb = jnp.einsum("tke,tk->te", jax.nn.one_hot(expert_index, e, dtype=jnp.float32),
                      gate_weights.astype(jnp.float32))
    return jnp.einsum("te,etd->td", comb, out)
