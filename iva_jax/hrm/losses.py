"""HRM losses: stablemax cross-entropy and the ACT loss head (sapientinc/HRM `models/losses.py`).

Stablemax replaces exp in softmax by s(x) = x + 1 (x >= 0), 1 / (1 - x) (x < 0), which grows only
linearly and so avoids the softmax collapse of long grokking-style training.  The reference takes
log(s / sum s) in float64.  Here it runs in float64 when jax x64 is enabled (`jax_enable_x64`, e.g.
`HRMTrainConfig.stablemax_x64`); otherwise it falls back to float32, computed as
log s - log sum s, which is accurate to float32 round-off for |logits| < ~1e6 (s is then at most
~1e6 times its smallest value, far from float32 overflow or underflow).
"""

from __future__ import annotations

from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import optax

Array = jax.Array
IGNORE_LABEL_ID = -100


def _x64_enabled() -> bool:
    try:
        return bool(jax.config.read("jax_enable_x64"))
    except AttributeError:  # older / newer config APIs
        return bool(getattr(jax.config, "jax_enable_x64", False))


def _wide_dtype():
    return jnp.float64 if _x64_enabled() else jnp.float32


def stablemax_s(x: Array) -> Array:
    """s(x) = x + 1 for x >= 0, 1 / (1 - x) for x < 0 (both branches NaN-free for grads)."""
    is_pos = x >= 0
    pos = jnp.where(is_pos, x, 0)  # where, not maximum: the derivative at 0 must be 1, not 1/2
    neg = jnp.where(is_pos, 0, x)
    return jnp.where(is_pos, pos + 1, 1 / (1 - neg))


def log_stablemax(x: Array, axis: int = -1) -> Array:
    """log(s(x) / sum s(x)) along `axis`, in x's dtype."""
    s = stablemax_s(x)
    return jnp.log(s) - jnp.log(jnp.sum(s, axis=axis, keepdims=True))


def _gather_label(logprobs: Array, labels: Array, ignore_index: int) -> Tuple[Array, Array]:
    if logprobs.shape[:-1] != labels.shape:
        raise ValueError(f"logits {logprobs.shape} and labels {labels.shape} disagree")
    valid = labels != ignore_index
    # A select-and-sum, not take_along_axis: its gradient is a select, not a (GPU-atomic) scatter-add.
    hit = jnp.arange(logprobs.shape[-1], dtype=jnp.int32) == labels[..., None].astype(jnp.int32)
    picked = jnp.sum(jnp.where(hit, logprobs, 0), axis=-1)
    return -jnp.where(valid, picked, 0), valid


def stablemax_cross_entropy(logits: Array, labels: Array, ignore_index: int = IGNORE_LABEL_ID) -> Array:
    """Per-token stablemax CE (0 where labels == ignore_index); float64 under x64, else float32."""
    loss, _ = _gather_label(log_stablemax(logits.astype(_wide_dtype()), axis=-1), labels, ignore_index)
    return loss


def softmax_cross_entropy(logits: Array, labels: Array, ignore_index: int = IGNORE_LABEL_ID) -> Array:
    """Per-token softmax CE in float32 (0 where labels == ignore_index)."""
    loss, _ = _gather_label(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), labels, ignore_index)
    return loss


LOSS_FNS = {"stablemax": stablemax_cross_entropy, "softmax": softmax_cross_entropy}

METRIC_KEYS = ("count", "accuracy", "exact_accuracy", "q_halt_accuracy", "steps", "halted",
               "lm_loss", "q_halt_loss", "q_continue_loss")


def act_loss(outputs: Dict[str, Array], labels: Array, halted: Array, steps: Array,
             loss_type: str = "stablemax") -> Tuple[Array, Dict[str, Array]]:
    """The reference ACTLossHead: (summed loss, metric sums).

    loss = sum_b mean_tokens(CE) + 0.5 * (BCE(q_halt, sequence exactly correct) + BCE(q_continue,
    target_q_continue)), each summed over the batch; the caller divides by the batch size.  Metric
    sums count only halted samples with at least one label (divide by "count"; losses by batch).
    """
    if loss_type not in LOSS_FNS:
        raise ValueError(f"loss_type={loss_type!r} must be one of {sorted(LOSS_FNS)}")
    logits = outputs["logits"]
    mask = labels != IGNORE_LABEL_ID
    counts = mask.sum(-1)
    divisor = jnp.maximum(counts, 1)[:, None]
    is_correct = mask & (jnp.argmax(logits, axis=-1) == labels)
    seq_correct = is_correct.sum(-1) == counts
    valid = halted & (counts > 0)
    q_halt = outputs["q_halt_logits"]

    lm_loss = jnp.sum(LOSS_FNS[loss_type](logits, labels) / divisor).astype(jnp.float32)
    q_halt_loss = jnp.sum(optax.sigmoid_binary_cross_entropy(q_halt, seq_correct.astype(q_halt.dtype)))
    if "target_q_continue" in outputs:
        q_continue_loss = jnp.sum(optax.sigmoid_binary_cross_entropy(outputs["q_continue_logits"],
                                                                     outputs["target_q_continue"]))
    else:
        q_continue_loss = jnp.zeros((), jnp.float32)

    sg = jax.lax.stop_gradient
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    metrics = {
        "count": f32(valid.sum()),
        "accuracy": f32(jnp.where(valid, (is_correct / divisor).sum(-1), 0).sum()),
        "exact_accuracy": f32((valid & seq_correct).sum()),
        "q_halt_accuracy": f32((valid & ((q_halt >= 0) == seq_correct)).sum()),
        "steps": f32(jnp.where(valid, steps, 0).sum()),
        "halted": f32(halted.sum()),
        "lm_loss": sg(lm_loss),
        "q_halt_loss": sg(q_halt_loss),
        "q_continue_loss": sg(q_continue_loss),
    }
    return lm_loss + 0.5 * (q_halt_loss + q_continue_loss), metrics


def reduce_metrics(sums: Dict[str, Array], batch_size: int) -> Dict[str, float]:
    """Normalise metric sums: accuracies and steps by `count`, losses by batch; halt_rate = halted / B."""
    count = max(float(sums["count"]), 1.0)
    out = {}
    for k, v in sums.items():
        v = float(v)
        if k == "count":
            out[k] = v
        elif k == "halted":
            out["halt_rate"] = v / batch_size
        elif k.endswith("loss"):
            out[k] = v / batch_size
        else:
            out[k] = v / count
    return out


def eval_metrics(preds: Array, labels: Array, steps: Array, q_halt_logits: Array,
                 halt_max_steps: int) -> Dict[str, Array]:
    """Metric sums for a finished evaluation batch (samples with no label are not counted).

    halted_early counts samples that stopped before `halt_max_steps` (divide by count: halt_rate).
    """
    mask = labels != IGNORE_LABEL_ID
    counts = mask.sum(-1)
    valid = counts > 0
    is_correct = mask & (preds == labels)
    seq_correct = is_correct.sum(-1) == counts
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return {
        "count": f32(valid.sum()),
        "accuracy": f32(jnp.where(valid, is_correct.sum(-1) / jnp.maximum(counts, 1), 0).sum()),
        "exact_accuracy": f32((valid & seq_correct).sum()),
        "q_halt_accuracy": f32((valid & ((q_halt_logits >= 0) == seq_correct)).sum()),
        "steps": f32(jnp.where(valid, steps, 0).sum()),
        "halted_early": f32((valid & (steps < halt_max_steps)).sum()),
    }
