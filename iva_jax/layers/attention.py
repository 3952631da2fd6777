"""Grouped-query self-attention (HF Llama/Mistral/Qwen2/Qwen3 semantics) and the one attention entry point.

`attend` is the single function every attention call goes through.  Without a KV cache it hands
the work to `kernels.flash_attention` (the dispatcher picks Mosaic / Triton / XLA); with a cache
(queries at slots `q_offset..`, keys over the whole preallocated cache with a validity mask) it
runs the masked XLA path `masked_attention`, which is also the "xla" implementation.

Masks are in slot space, as transformers builds them: key slot j is visible to query slot i iff
j <= i (causal), i - j < window (sliding window), and the key is valid (not padding, already written).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

import kernels
from kernels import decode_attention as decode_kernels
from iva_jax.parallel.kernel_sharding import per_shard
from iva_jax.config import ModelConfig, dtype_of
from iva_jax.layers.linear import Linear, default_kernel_init
from iva_jax.layers.norms import RMSNorm
from iva_jax.layers.rotary import apply_rotary

_NEG = -1e30


def masked_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *, q_offset: Any = 0,
                     window: Any = None, kv_valid: Optional[jnp.ndarray] = None,
                     q_segment_ids: Optional[jnp.ndarray] = None, kv_segment_ids: Optional[jnp.ndarray] = None,
                     sm_scale: Optional[float] = None, causal: bool = True,
                     bias: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Reference GQA attention. q [B,T,H,D]; k, v [B,S,Hkv,D] -> [B,T,H,D].

    `q_offset` (int or traced scalar) is the slot of q[0]; `window` an int, None, or a traced scalar
    (<= 0 means no window); `bias` an optional additive [B or 1, H or 1, T, S] term (e.g. attention
    sinks).  Softmax in float32; a query row with no visible key returns zeros.
    """
    b, t, h, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    if h % hkv:
        raise ValueError(f"query heads {h} not a multiple of key/value heads {hkv}")
    g = h // hkv
    scale = sm_scale if sm_scale is not None else d ** -0.5
    qg = q.reshape(b, t, hkv, g, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    q_idx = q_offset + jnp.arange(t)[:, None]
    k_idx = jnp.arange(s)[None, :]
    mask = jnp.ones((t, s), bool) if not causal else (k_idx <= q_idx)
    if window is not None:
        w = jnp.asarray(window)
        mask = mask & jnp.where(w > 0, (q_idx - k_idx) < w, True)
    mask = jnp.broadcast_to(mask, (b, t, s))
    if kv_valid is not None:
        mask = mask & kv_valid[:, None, :]
    if q_segment_ids is not None or kv_segment_ids is not None:
        if q_segment_ids is None or kv_segment_ids is None:
            raise ValueError("q_segment_ids and kv_segment_ids must be given together")
        mask = mask & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    if bias is not None:
        bias5 = jnp.asarray(bias, jnp.float32)
        bias5 = jnp.broadcast_to(bias5, (b, h, t, s)).reshape(b, hkv, g, t, s)
        scores = scores + bias5
    m5 = mask[:, None, None, :, :]
    scores = jnp.where(m5, scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(m5, probs, 0.0).astype(v.dtype)  # rows with no visible key -> 0
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)


def attend(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *, impl: str = "auto", window: Any = None,
           q_offset: Any = 0, kv_valid: Optional[jnp.ndarray] = None,
           segment_ids: Optional[jnp.ndarray] = None, bias: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Causal GQA attention through the kernels dispatcher (no cache) or the masked XLA path (cache).

    `segment_ids` [B, T] (no-cache path only): tokens attend within equal ids; padding gets id 0.
    """
    static_window = window is None or isinstance(window, int)
    use_kernel = (impl != "xla" and kv_valid is None and bias is None and static_window
                  and isinstance(q_offset, int) and q.shape[1] == k.shape[1])
    if use_kernel:
        def kernel(q, k, v, seg):
            return kernels.flash_attention(q, k, v, causal=True, sliding_window=window, q_offset=q_offset,
                                           q_segment_ids=seg, kv_segment_ids=seg, impl=impl)

        heads = ("batch", None, "q_heads", None)  # one name for q and k/v heads: GQA groups stay aligned
        return per_shard(kernel, (q, k, v, segment_ids), (heads, heads, heads, ("batch", None)), heads)
    return masked_attention(q, k, v, q_offset=q_offset, window=window, kv_valid=kv_valid,
                            q_segment_ids=segment_ids, kv_segment_ids=segment_ids, bias=bias)


class Attention(nn.Module):
    """Self-attention with HF parameter names: q_proj, k_proj, v_proj, o_proj (+ q_norm, k_norm).

    `fused_qkv=True` (the decode view, `Transformer.decode_view`) declares one `qkv_proj` instead of
    q/k/v_proj: kernel [D, (Hq + 2 Hkv) hd] = q, k, v kernels concatenated on the output axis (biases
    too), one matmul whose output is split: the three projections' values up to the matmul's summation order.
    """

    config: ModelConfig
    fused_qkv: bool = False

    def setup(self) -> None:
        c = self.config
        hd = c.resolved_head_dim
        dt, pdt = dtype_of(c.dtype), dtype_of(c.param_dtype)
        kw = dict(dtype=dt, param_dtype=pdt, kernel_init=default_kernel_init())
        if self.fused_qkv:
            n = (c.num_attention_heads + 2 * c.num_key_value_heads) * hd
            self.qkv_proj = Linear(c.hidden_size, n, ("embed", "q_heads"), c.attention_bias, **kw)
        else:
            self.q_proj = Linear(c.hidden_size, c.num_attention_heads * hd, ("embed", "q_heads"), c.attention_bias,
                                 **kw)
            self.k_proj = Linear(c.hidden_size, c.num_key_value_heads * hd, ("embed", "kv_heads"), c.attention_bias,
                                 **kw)
            self.v_proj = Linear(c.hidden_size, c.num_key_value_heads * hd, ("embed", "kv_heads"), c.attention_bias,
                                 **kw)
        self.o_proj = Linear(c.num_attention_heads * hd, c.hidden_size, ("q_heads", "embed"), c.attention_out_bias,
                             **kw)
        if c.qk_norm:
            nkw = dict(eps=c.rms_norm_eps, dtype=dt, param_dtype=pdt, impl=c.norm_impl, axis_name="head_dim")
            self.q_norm = RMSNorm(hd, **nkw)
            self.k_norm = RMSNorm(hd, **nkw)

    def __call__(self, x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray, *, window: Any = None,
                 segment_ids: Optional[jnp.ndarray] = None,
                 cache: Optional[Tuple[jnp.ndarray, jnp.ndarray]] = None, layer: Any = 0, cache_index: Any = None,
                 kv_valid: Optional[jnp.ndarray] = None,
                 bias: Optional[jnp.ndarray] = None) -> Tuple[jnp.ndarray, Optional[Tuple[jnp.ndarray, jnp.ndarray]]]:
        """x [B,T,D] -> ([B,T,D], updated (k, v) cache or None).

        `cache=(k, v)` holds every layer, [L, B, S, Hkv, hd]: this layer (`layer`, an int or traced
        index) writes its new keys/values at slots `cache_index .. cache_index+T` in place and its
        queries attend over the layer's whole cache, masked by `kv_valid` [B, S].
        """
        c = self.config
        b, t, _ = x.shape
        hd = c.resolved_head_dim
        hq, hkv = c.num_attention_heads, c.num_key_value_heads
        if self.fused_qkv:
            q, k, v = jnp.split(self.qkv_proj(x), (hq * hd, (hq + hkv) * hd), axis=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = q.reshape(b, t, hq, hd), k.reshape(b, t, hkv, hd), v.reshape(b, t, hkv, hd)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        new_cache = None
        if cache is None:
            out = attend(q, k, v, impl=c.attn_impl, window=window, segment_ids=segment_ids, bias=bias)
        elif hasattr(cache, "attend"):  # paged / ring KV cache step (iva_jax.inference.paged)
            if bias is not None:
                raise ValueError("an additive attention bias is not supported with a paged KV cache")
            out, new_cache = cache.attend(q, k, v, layer=layer, window=window, impl=c.attn_impl)
        else:
            ck, cv = cache
            zero = jnp.zeros((), jnp.int32)
            at = (jnp.asarray(layer, jnp.int32), zero, jnp.asarray(cache_index, jnp.int32), zero, zero)
            # indices are never negative: skip jax's per-index wrap-around selects (per layer, per step)
            ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype)[None], at, allow_negative_indices=False)
            cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype)[None], at, allow_negative_indices=False)
            new_cache = (ck, cv)
            if decode_kernels.use_for_step(c.attn_impl, q, bias):  # one token: the Pallas decode kernel
                out = decode_kernels.dense_cache_step(q, ck, cv, layer=layer, cache_index=cache_index,
                                                      kv_valid=kv_valid, window=window, attn_impl=c.attn_impl)
                return self.o_proj(out.reshape(b, t, -1)), new_cache
            lk = jax.lax.dynamic_index_in_dim(ck, layer, 0, keepdims=False, allow_negative_indices=False)
            lv = jax.lax.dynamic_index_in_dim(cv, layer, 0, keepdims=False, allow_negative_indices=False)
            out = attend(q, lk.astype(q.dtype), lv.astype(q.dtype), impl="xla", window=window,
                         q_offset=cache_index, kv_valid=kv_valid, bias=bias)
        return self.o_proj(out.reshape(b, t, -1)), new_cache
