"""Masked statistics and loss aggregation over [batch, time] token matrices.

Masks are 1 (or True) on real response tokens and 0 on prompt/padding positions.  Masked-out
entries never reach a result, not even as NaN or inf: they are replaced by zero with `jnp.where`
before any arithmetic (TRL multiplies by the mask, which lets a NaN in the padding through).
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

Array = jnp.ndarray

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _check_same_shape(name_a: str, a: Array, name_b: str, b: Array) -> None:
    if jnp.shape(a) != jnp.shape(b):
        raise ValueError(f"{name_a} shape {jnp.shape(a)} must equal {name_b} shape {jnp.shape(b)}")


def _as_mask(values: Array, mask: Optional[Array]) -> Array:
    if mask is None:
        return jnp.ones(jnp.shape(values), dtype=bool)
    _check_same_shape("values", values, "mask", mask)
    return jnp.asarray(mask).astype(bool)


def fill_masked(x: Array, mask: Optional[Array], value: float = 0.0) -> Array:
    """`x` with masked-out entries replaced by `value` (mask broadcast over trailing axes of x).

    Apply to the *inputs* of a loss so NaN/inf padding cannot reach the value or the gradient
    (a `where` on the output alone still lets 0 * NaN into the backward pass).
    """
    if mask is None:
        return x
    x, m = jnp.asarray(x), jnp.asarray(mask).astype(bool)
    if x.shape[:m.ndim] != m.shape:
        raise ValueError(f"mask shape {m.shape} must be a leading part of shape {x.shape}")
    m = m.reshape(m.shape + (1,) * (x.ndim - m.ndim))
    return jnp.where(m, x, jnp.asarray(value, x.dtype))


def masked_sum(values: Array, mask: Optional[Array] = None, axis=None) -> Array:
    """Sum of `values` where `mask` is set (masked entries contribute exactly 0)."""
    m = _as_mask(values, mask)
    return jnp.sum(jnp.where(m, values, 0), axis=axis)


def masked_mean(values: Array, mask: Optional[Array] = None, axis=None) -> Array:
    """Mean over masked entries (TRL/verl `masked_mean`); an all-masked slice gives 0, not NaN."""
    m = _as_mask(values, mask)
    count = jnp.sum(m, axis=axis).astype(jnp.result_type(values, jnp.float32))
    return masked_sum(values, m, axis) / jnp.maximum(count, 1)


def masked_var(values: Array, mask: Optional[Array] = None, unbiased: bool = True) -> Array:
    """Variance over all masked entries (TRL `masked_var`): Bessel-corrected when `unbiased`.

    With fewer than two valid entries the Bessel factor is dropped (TRL raises instead; under jit
    we cannot), so one entry gives variance 0.
    """
    m = _as_mask(values, mask)
    mean = masked_mean(values, m)
    var = masked_mean(jnp.square(values - mean), m)
    if unbiased:
        n = jnp.sum(m).astype(var.dtype)
        var = var * jnp.where(n > 1, n / jnp.maximum(n - 1, 1), 1.0)
    return var


def masked_whiten(values: Array, mask: Optional[Array] = None, shift_mean: bool = True,
                  eps: float = 1e-8) -> Array:
    """TRL `masked_whiten`: (x - mean) * rsqrt(var + eps) with unbiased masked stats.

    `shift_mean=False` adds the mean back (only the scale changes).  Masked positions return 0.
    """
    m = _as_mask(values, mask)
    mean, var = masked_mean(values, m), masked_var(values, m)
    whitened = (values - mean) * jnp.reciprocal(jnp.sqrt(var + eps))
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(m, whitened, 0)


def agg_loss(loss_mat: Array, loss_mask: Optional[Array], loss_agg_mode: str = "token-mean",
             norm_len: Optional[int] = None) -> Array:
    """Reduce a [batch, time] loss matrix to a scalar, with verl's `agg_loss` mode names.

    token-mean: sum / #valid tokens over the whole batch (DAPO's token-level loss, TRL "bnpo").
    seq-mean-token-mean: per-sequence token mean, then mean over sequences (original GRPO).
    seq-mean-token-sum: per-sequence token sum, then mean over sequences.
    seq-mean-token-sum-norm: Dr. GRPO's constant normalizer, sum / (batch * norm_len) with
      norm_len defaulting to the time dimension (TRL `dr_grpo` with max_completion_length; verl's
      early version omits the 1/batch).  Sequences with no valid token contribute 0.
    """
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode={loss_agg_mode!r}: must be one of {list(LOSS_AGG_MODES)}")
    if jnp.ndim(loss_mat) != 2:
        raise ValueError(f"loss_mat must be [batch, time], got shape {jnp.shape(loss_mat)}")
    m = _as_mask(loss_mat, loss_mask)
    if loss_agg_mode == "token-mean":
        return masked_mean(loss_mat, m)
    seq_sum = masked_sum(loss_mat, m, axis=-1)
    if loss_agg_mode == "seq-mean-token-sum":
        return jnp.mean(seq_sum)
    if loss_agg_mode == "seq-mean-token-mean":
        count = jnp.sum(m, axis=-1).astype(seq_sum.dtype)
        return jnp.mean(seq_sum / jnp.maximum(count, 1))
    length = loss_mat.shape[-1] if norm_len is None else norm_len
    if length <= 0:
        raise ValueError(f"norm_len must be > 0, got {norm_len}")
    return jnp.sum(seq_sum) / (loss_mat.shape[0] * length)
