"""Distillation and contrastive losses: temperature-scaled KD and NT-Xent (SimCLR)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from iva_jax.rl.masking import fill_masked, masked_mean

Array = jnp.ndarray


def distillation_loss(student_logits: Array, teacher_logits: Array, temperature: float = 1.0,
                      mask: Optional[Array] = None) -> Array:
    """Knowledge distillation tau^2 * KL(p_teacher^tau || p_student^tau) (Hinton et al. 2015).

    p^tau = softmax(logits / tau) over the last axis; the KL is averaged over the (masked)
    positions, i.e. torch's `kl_div(log_softmax(s/T), softmax(t/T), reduction="batchmean") * T^2`
    for [N, V] inputs.  The tau^2 keeps gradient magnitudes comparable across temperatures.
    The teacher gets no gradient.
    """
    student_logits, teacher_logits = jnp.asarray(student_logits), jnp.asarray(teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits shape {student_logits.shape} != teacher_logits shape {teacher_logits.shape}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    student_logits, teacher_logits = fill_masked(student_logits, mask), fill_masked(teacher_logits, mask)
    t_logp = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature, axis=-1)
    s_logp = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    t_p = jnp.exp(t_logp)
    safe = jnp.isfinite(t_logp)  # teacher zeros contribute 0 (0 * log 0 := 0)
    kl = jnp.sum(jnp.where(safe, t_p * (jnp.where(safe, t_logp, 0.0) - s_logp), 0.0), axis=-1)
    return temperature ** 2 * masked_mean(kl, mask)


def nt_xent_loss(z_i: Array, z_j: Array, temperature: float = 0.5, reduction: str = "mean") -> Array:
    """NT-Xent of SimCLR (Chen et al. 2020): two views per item, 2N - 2 in-batch negatives.

    z = l2-normalize([z_i; z_j]); s = z z^T / tau; for each of the 2N anchors k with partner p(k),
    l_k = -s[k, p(k)] + logsumexp_{m != k} s[k, m].  reduction "mean" gives mean_k l_k, "none"
    the per-item loss (l_k + l_{k+N}) / 2, shape [N].
    """
    z_i, z_j = jnp.asarray(z_i), jnp.asarray(z_j)
    if z_i.ndim != 2 or z_i.shape != z_j.shape:
        raise ValueError(f"z_i {z_i.shape} and z_j {z_j.shape} must be the same [N, D]")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction={reduction!r}: must be 'mean' or 'none'")
    n = z_i.shape[0]
    z = jnp.concatenate([z_i, z_j], axis=0).astype(jnp.float32)
    z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
    sim = z @ z.T / temperature
    sim = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, sim)
    partner = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
    pos = jnp.take_along_axis(sim, partner[:, None], axis=1)[:, 0]
    per_anchor = jax.nn.logsumexp(sim, axis=1) - pos
    if reduction == "mean":
        return jnp.mean(per_anchor)
    return 0.5 * (per_anchor[:n] + per_anchor[n:])
