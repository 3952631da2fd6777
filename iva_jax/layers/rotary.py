"""Rotary position embeddings with the scalings transformers defines (linear, dynamic NTK, YaRN, llama3).

Uses the rotate-half convention of HF Llama/Qwen/Mistral (the first and second halves of the rotary
dims form the pairs).  Frequencies are computed in float32, as transformers does; `partial_rotary_factor`
rotates only the leading `rotary_dim` dims of each head.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import jax.numpy as jnp
import numpy as np

from iva_jax.config import ModelConfig, RopeScaling


def _base_inv_freq(base: float, dim: int) -> np.ndarray:
    return (1.0 / (base ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)))).astype(np.float32)


def _yarn(base: float, dim: int, rs: RopeScaling, max_pos: int) -> Tuple[np.ndarray, float]:
    factor = rs.factor
    orig = rs.original_max_position_embeddings or max_pos

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if rs.attention_factor is not None:
        attn_factor = rs.attention_factor
    elif rs.mscale and rs.mscale_all_dim:
        attn_factor = float(get_mscale(factor, rs.mscale) / get_mscale(factor, rs.mscale_all_dim))
    else:
        attn_factor = get_mscale(factor)

    def corr_dim(n_rot: float) -> float:
        return (dim * math.log(orig / (n_rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(rs.beta_fast or 32), corr_dim(rs.beta_slow or 1)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    pos_freqs = (base ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))).astype(np.float32)
    extra, inter = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extra_factor = 1 - ramp
    inv = inter * (1 - extra_factor) + extra * extra_factor
    return inv.astype(np.float32), float(attn_factor)


def _llama3(base: float, dim: int, rs: RopeScaling) -> np.ndarray:
    inv = _base_inv_freq(base, dim)
    factor, lo, hi = rs.factor, rs.low_freq_factor, rs.high_freq_factor
    old = rs.original_max_position_embeddings
    low_wl, high_wl = old / lo, old / hi
    wavelen = 2 * math.pi / inv
    out = np.where(wavelen > low_wl, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
    return np.where(medium, smoothed, out).astype(np.float32)


def rope_frequencies(config: ModelConfig) -> Tuple[np.ndarray, float]:
    """Static (inv_freq [rotary_dim/2], attention_scaling) for every rope type except `dynamic`'s growth."""
    dim, base = config.rotary_dim, config.rope_theta
    rs = config.rope_scaling
    kind = rs.rope_type if rs is not None else "default"
    if kind in ("default", "dynamic"):
        return _base_inv_freq(base, dim), 1.0
    if kind == "linear":
        return (_base_inv_freq(base, dim) / np.float32(rs.factor)).astype(np.float32), 1.0
    if kind == "llama3":
        return _llama3(base, dim, rs), 1.0
    if kind == "yarn":
        return _yarn(base, dim, rs, config.max_position_embeddings)
    raise ValueError(f"unsupported rope_type {kind!r}")


def rope_cos_sin(config: ModelConfig, positions: jnp.ndarray) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin of shape [batch, seq, rotary_dim] (float32) for integer positions [batch, seq]."""
    inv_freq, scaling = rope_frequencies(config)
    inv = jnp.asarray(inv_freq)
    rs = config.rope_scaling
    if rs is not None and rs.rope_type == "dynamic":
        # transformers grows the base once the sequence exceeds max_position_embeddings
        dim, maxp = config.rotary_dim, config.max_position_embeddings
        seq_len = jnp.maximum(jnp.max(positions) + 1, maxp).astype(jnp.float32)
        base = config.rope_theta * ((rs.factor * seq_len / maxp) - (rs.factor - 1)) ** (dim / (dim - 2))
        inv = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * scaling, jnp.sin(emb) * scaling


def apply_rotary(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate x [batch, seq, heads, head_dim]; cos/sin [batch, seq, rotary_dim] (rotate-half convention)."""
    rot = cos.shape[-1]
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    xr, xp = (x[..., :rot], x[..., rot:]) if rot < x.shape[-1] else (x, None)
    x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
    out = xr * cos + jnp.concatenate([-x2, x1], axis=-1) * sin
    return out if xp is None else jnp.concatenate([out, xp], axis=-1)


def positions_from_mask(attention_mask: jnp.ndarray, offset: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Position ids for a (left-)padded batch: count of real tokens before each token (pads get 0)."""
    m = attention_mask.astype(jnp.int32)
    pos = jnp.cumsum(m, axis=-1) - 1
    if offset is not None:
        pos = pos + offset[:, None]
    return jnp.where(m > 0, pos, 0)
