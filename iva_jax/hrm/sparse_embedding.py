"""The sparse puzzle embedding and its sign-SGD update (sapientinc/HRM `models/sparse_embedding.py`).

The table [num_puzzle_identifiers, ndim] is not a parameter of the Adam-type optimizer: the model
reads the rows of the batch (`lookup`), the train step differentiates the loss w.r.t. those rows,
and `signsgd_update` applies the reference's CastedSparseEmbeddingSignSGD_Distributed step to the
rows present in the batch only: gradients of repeated ids are summed, then
    w <- w * (1 - lr * weight_decay) - lr * sign(grad)
(decoupled weight decay, also on rows whose summed gradient is 0).  Rows absent from the batch are
untouched.  Single process; under data parallelism all-gather ids and row grads first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def init_puzzle_table(num_puzzle_identifiers: int, ndim: int) -> Array:
    """Zeros [num, ndim] float32 (the reference initialises puzzle embeddings with std 0)."""
    if num_puzzle_identifiers < 1 or ndim < 0:
        raise ValueError(f"need num_puzzle_identifiers >= 1 and ndim >= 0, got {num_puzzle_identifiers}, {ndim}")
    return jnp.zeros((num_puzzle_identifiers, ndim), jnp.float32)


def lookup(table: Array, ids: Array) -> Array:
    """Rows of `table` for `ids` [B] -> [B, ndim]."""
    if ids.ndim != 1:
        raise ValueError(f"puzzle ids must be [B], got shape {ids.shape}")
    return table[ids]


def signsgd_update(table: Array, ids: Array, row_grads: Array, lr: Array | float,
                   weight_decay: float) -> Array:
    """Sign-SGD with decoupled weight decay on the unique ids of the batch; O(B * ndim) work."""
    if ids.ndim != 1 or row_grads.shape != (ids.shape[0], table.shape[1]):
        raise ValueError(f"ids {ids.shape} and row_grads {row_grads.shape} do not fit table {table.shape}")
    if table.shape[1] == 0:
        return table
    B = ids.shape[0]
    n = table.shape[0]
    # Unique ids padded with an out-of-range id: those slots read clamped rows and are dropped on write.
    uids, inv = jnp.unique(ids, size=B, fill_value=n, return_inverse=True)
    # Sum the rows of repeated ids with a one-hot matmul (O(B^2 ndim)), not segment_sum: with few
    # distinct ids (Sudoku has one) a scatter-add is a heavily contended atomic loop on GPUs.
    member = jax.nn.one_hot(inv.reshape(-1), B, dtype=jnp.float32)  # [B rows, B unique slots]
    grad = jnp.dot(member.T, row_grads.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    rows = table[jnp.minimum(uids, n - 1)]
    rows = rows * (1.0 - lr * weight_decay) - lr * jnp.sign(grad)
    return table.at[uids].set(rows.astype(table.dtype), mode="drop")
