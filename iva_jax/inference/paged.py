"""Paged KV cache (page pool + page tables), ring-buffer sink/window KV, fp8 KV, and `generate_paged`.

Layout.  One page pool per k and v, [L, num_pages, page_size, Hkv, hd], shared by every sequence;
`page_table` [B, max_pages] maps row b's logical slot j to page page_table[b, j // page_size],
offset j % page_size.  Unlike the dense `KVCache` (one slot index shared by the batch, padding stored),
each row keeps its own `lengths[b]`: padding tokens (attention_mask 0) are never written, so slot j of
a row is its j-th real token and left-padded prompts cost no cache.  Pages come from a host-side
`PageAllocator` and go back to it when a sequence finishes (see `iva_jax.inference.continuous`).

fp8 KV (`kv_dtype=float8_e4m3fn`): each written (token, kv head) vector is scaled by its own f32
scale amax / 448 (stored in k_scale / v_scale [L, P, page_size, Hkv]: 4 bytes per head_dim bytes).

Sink + sliding-window ring (StreamingLLM; `n_sink`, `window`): a row keeps its first `n_sink` tokens
and its last `window` tokens in n_sink + window slots (token i >= n_sink lives in slot
n_sink + (i - n_sink) % window); `lengths` then counts every token seen.  Position semantics: every
token keeps its ORIGINAL position (RoPE is applied to keys at write time, as in the decoder); a query
at token i attends to tokens k with k <= i and (k < n_sink or i - k < window).  Memory stays bounded
for any generation length.  With n_sink = 0 and window = the model's sliding_window this is exactly
the model's own sliding-window attention.

Kernels: a decode step (one token per row) calls `kernels.decode_attention.paged_decode_attention`
(Pallas on a GPU when the dispatcher picks it, the XLA reference elsewhere); prompts (several tokens
per row) use the XLA path below.  The decoder talks to the cache through two duck-typed methods:
`PagedKVCache.begin` (once per call) and `PagedStep.attend` (once per layer).
"""

from __future__ import annotations

import functools
from typing import Any, List, Optional, Sequence, Tuple, Union

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from iva_jax.config import ModelConfig, dtype_of
from iva_jax.layers.rotary import positions_from_mask
from kernels import decode_attention as decode_kernels

_FP8 = jnp.dtype(jnp.float8_e4m3fn)
_FP8_MAX = 448.0
_NEG = -1e30
KV_DTYPES = ("auto", "float32", "bfloat16", "float16", "float8_e4m3fn", "fp8")


def kv_dtype_of(name: Union[str, Any, None], config: ModelConfig):
    """The KV storage dtype for a name ("auto" = the model's compute dtype, "fp8" = float8_e4m3fn)."""
    if name is None or (isinstance(name, str) and name == "auto"):
        return jnp.dtype(dtype_of(config.dtype))
    if isinstance(name, str):
        if name not in KV_DTYPES:
            raise ValueError(f"kv dtype {name!r} not in {KV_DTYPES}")
        return _FP8 if name == "fp8" else jnp.dtype(name)
    dt = jnp.dtype(name)
    if dt not in (_FP8, jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"kv dtype {dt} not supported (float32 / bfloat16 / float16 / float8_e4m3fn)")
    return dt


def quantize_kv(x: jnp.ndarray) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """x [..., hd] -> (float8_e4m3fn values, f32 scale [...]) with x ~= values * scale (per vector)."""
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=-1)
    scale = jnp.where(amax > 0, amax / _FP8_MAX, 1.0)
    return (xf / scale[..., None]).astype(_FP8), scale


@flax.struct.dataclass
class PagedKVCache:
    """k_pages, v_pages: [L, P, page_size, Hkv, hd]; k_scale, v_scale: [L, P, page_size, Hkv] (fp8) or None;
    page_table [B, max_pages]; lengths [B] (tokens written, or seen in ring mode); next_pos [B].

    Static: n_sink / window (ring mode when window is set), and kernel overrides `kernel_impl`
    (None = the model's attn_impl), `interpret` (Pallas interpret mode, for CPU tests), `blocks`.
    """

    k_pages: jnp.ndarray
    v_pages: jnp.ndarray
    k_scale: Optional[jnp.ndarray]
    v_scale: Optional[jnp.ndarray]
    page_table: jnp.ndarray
    lengths: jnp.ndarray
    next_pos: jnp.ndarray
    n_sink: int = flax.struct.field(pytree_node=False, default=0)
    window: Optional[int] = flax.struct.field(pytree_node=False, default=None)
    kernel_impl: Optional[str] = flax.struct.field(pytree_node=False, default=None)
    interpret: bool = flax.struct.field(pytree_node=False, default=False)
    blocks: Any = flax.struct.field(pytree_node=False, default=decode_kernels.DecodeBlocks())

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def init(cls, config: ModelConfig, batch: int, max_pages: int, *, page_size: int = 16,
             num_pages: Optional[int] = None, kv_dtype: Any = "auto", n_sink: int = 0,
             window: Optional[int] = None, page_table: Optional[Any] = None, kernel_impl: Optional[str] = None,
             interpret: bool = False, blocks: Optional[decode_kernels.DecodeBlocks] = None) -> "PagedKVCache":
        """Empty cache: `batch` rows of up to `max_pages` pages each from a pool of `num_pages` pages
        (default batch * max_pages, rows owning contiguous pages: `page_table` defaults to that)."""
        for name, v in (("batch", batch), ("max_pages", max_pages), ("page_size", page_size)):
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"PagedKVCache: {name} must be a positive integer, got {v!r}")
        num_pages = batch * max_pages if num_pages is None else num_pages
        if num_pages < 1:
            raise ValueError(f"PagedKVCache: num_pages must be >= 1, got {num_pages}")
        if window is not None:
            if window < 1 or n_sink < 0:
                raise ValueError(f"PagedKVCache: ring needs window >= 1 and n_sink >= 0, got {window}, {n_sink}")
            if n_sink + window > max_pages * page_size:
                raise ValueError(f"PagedKVCache: n_sink + window = {n_sink + window} slots exceed "
                                 f"max_pages * page_size = {max_pages * page_size}")
        elif n_sink:
            raise ValueError("PagedKVCache: n_sink needs a window (sink tokens + sliding window ring)")
        if page_table is None:
            if num_pages < batch * max_pages:
                raise ValueError(f"PagedKVCache: {num_pages} pages cannot give {batch} rows {max_pages} pages each;"
                                 " pass a page_table (from a PageAllocator)")
            page_table = np.arange(batch * max_pages, dtype=np.int32).reshape(batch, max_pages)
        page_table = jnp.asarray(page_table, jnp.int32)
        if page_table.shape != (batch, max_pages):
            raise ValueError(f"PagedKVCache: page_table shape {page_table.shape} != {(batch, max_pages)}")
        dt = kv_dtype_of(kv_dtype, config)
        shape = (config.num_attention_layers, num_pages, page_size, config.num_key_value_heads,
                 config.resolved_head_dim)
        fp8 = dt == _FP8
        scale = (lambda: jnp.ones(shape[:-1], jnp.float32)) if fp8 else (lambda: None)  # noqa: E731  (2 buffers)
        return cls(k_pages=jnp.zeros(shape, dt), v_pages=jnp.zeros(shape, dt), k_scale=scale(), v_scale=scale(),
                   page_table=page_table, lengths=jnp.zeros((batch,), jnp.int32),
                   next_pos=jnp.zeros((batch,), jnp.int32), n_sink=int(n_sink),
                   window=None if window is None else int(window), kernel_impl=kernel_impl,
                   interpret=bool(interpret), blocks=blocks or decode_kernels.DecodeBlocks())

    @property
    def page_size(self) -> int:
        return self.k_pages.shape[2]

    @property
    def num_pages(self) -> int:
        return self.k_pages.shape[1]

    @property
    def slots_per_row(self) -> int:
        """Slots a row can address (ring mode uses n_sink + window of them)."""
        return self.page_table.shape[1] * self.page_size

    @property
    def ring_slots(self) -> Optional[int]:
        return None if self.window is None else self.n_sink + self.window

    def nbytes(self) -> int:
        """Bytes held by the page pools (and fp8 scales)."""
        arrs = [self.k_pages, self.v_pages, self.k_scale, self.v_scale]
        return int(sum(a.size * a.dtype.itemsize for a in arrs if a is not None))

    # ---- the decoder protocol -------------------------------------------------------------
    def begin(self, mask: jnp.ndarray, positions: Optional[jnp.ndarray], config: ModelConfig):
        """Per-call bookkeeping: (positions [B, T], the `PagedStep` carried through the layers)."""
        b, t = mask.shape
        if self.page_table.shape[0] != b:
            raise ValueError(f"paged cache batch {self.page_table.shape[0]} != input batch {b}")
        if self.k_pages.shape[0] != config.num_attention_layers:
            raise ValueError(f"paged cache has {self.k_pages.shape[0]} layers, model has "
                             f"{config.num_attention_layers} attention layers")
        if self.k_pages.shape[3:] != (config.num_key_value_heads, config.resolved_head_dim):
            raise ValueError(f"paged cache heads/head_dim {self.k_pages.shape[3:]} != model "
                             f"{(config.num_key_value_heads, config.resolved_head_dim)}")
        if self.window is not None:
            wins = set(config.layer_windows())
            if wins != {None} and not (self.n_sink == 0 and wins == {self.window}):
                raise ValueError(f"sink/window ring (n_sink={self.n_sink}, window={self.window}) on a model with "
                                 f"sliding windows {sorted(w or 0 for w in wins)}: only n_sink=0 with window equal "
                                 "to the model's sliding_window is supported")
        m = mask.astype(jnp.int32)
        if positions is None:
            positions = positions_from_mask(m, self.next_pos)
        real = m > 0
        tok = self.lengths[:, None] + jnp.cumsum(m, axis=1) - 1  # token index of each real token
        new_len = self.lengths + jnp.sum(m, axis=1)
        if self.window is None:
            slot = tok
            keep = real & (tok < self.slots_per_row)
        else:
            slot = jnp.where(tok < self.n_sink, tok, self.n_sink + (tok - self.n_sink) % self.window)
            # a chunk longer than the ring overwrites its own early tokens: only the last writer stays
            keep = real & ((tok < self.n_sink) | (tok + self.window >= new_len[:, None]))
        page_idx = jnp.clip(slot // self.page_size, 0, self.page_table.shape[1] - 1)
        page = jnp.take_along_axis(self.page_table, page_idx, axis=1)
        page = jnp.where(keep, page, self.num_pages)  # out of bounds: the write is dropped
        step = PagedStep(cache=self, write_page=page, write_off=slot % self.page_size,
                         q_tok=jnp.where(real, tok, -1), new_len=new_len, real=real)
        return positions, step


@flax.struct.dataclass
class PagedStep:
    """One decoder call's view of a `PagedKVCache`: where each new token is written, carried through layers."""

    cache: PagedKVCache
    write_page: jnp.ndarray  # [B, T] page of each new token (num_pages = not written)
    write_off: jnp.ndarray  # [B, T]
    q_tok: jnp.ndarray  # [B, T] token index of each query in its sequence (-1 = padding)
    new_len: jnp.ndarray  # [B]
    real: jnp.ndarray  # [B, T] bool

    def attend(self, q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *, layer: Any, window: Any = None,
               impl: str = "auto") -> Tuple[jnp.ndarray, "PagedStep"]:
        """Write this layer's k, v [B, T, Hkv, hd]; attend q [B, T, Hq, hd] -> ([B, T, Hq, hd], next step)."""
        c = self.cache
        t = q.shape[1]
        layer = jnp.asarray(layer, jnp.int32)
        impl = c.kernel_impl or decode_kernels.impl_for_model(impl)
        old = None
        if c.window is not None and t > 1:  # ring: attend over (cache before the chunk) + chunk, then write
            old = self._gather(layer, q.dtype)
        new = self._write(layer, k, v)
        if old is not None:
            out = self._ring_chunk_attention(q, k, v, old)
        elif t == 1:
            lengths, starts = self._decode_range(window)
            lay_k = new.cache
            out = decode_kernels.paged_decode_attention(
                q[:, 0], lay_k.k_pages, lay_k.v_pages, lay_k.page_table, lengths, starts=starts, layer=layer,
                k_scale=lay_k.k_scale, v_scale=lay_k.v_scale, impl=impl, interpret=c.interpret,
                blocks=c.blocks)[:, None]
        else:
            kk, vv = new._gather(layer, q.dtype)
            j = jnp.arange(kk.shape[1])[None, None, :]
            qt = self.q_tok[:, :, None]
            vis = (j <= qt) & (qt >= 0)
            if window is not None:
                w = jnp.asarray(window)
                vis = vis & jnp.where(w > 0, qt - j < w, True)
            out = _multi_query_attention(q, kk, vv, vis)
        return out, new

    def finish(self) -> PagedKVCache:
        """The updated cache after the last layer."""
        c = self.cache
        return c.replace(lengths=self.new_len, next_pos=c.next_pos + jnp.sum(self.real, axis=1).astype(jnp.int32))

    # ---- helpers --------------------------------------------------------------------------
    def _write(self, layer, k, v) -> "PagedStep":
        c = self.cache
        at = (layer, self.write_page, self.write_off)
        if c.k_scale is not None:
            kq, ks = quantize_kv(k)
            vq, vs = quantize_kv(v)
            return self.replace(cache=c.replace(
                k_pages=c.k_pages.at[at].set(kq, mode="drop"), v_pages=c.v_pages.at[at].set(vq, mode="drop"),
                k_scale=c.k_scale.at[at].set(ks, mode="drop"), v_scale=c.v_scale.at[at].set(vs, mode="drop")))
        return self.replace(cache=c.replace(k_pages=c.k_pages.at[at].set(k.astype(c.k_pages.dtype), mode="drop"),
                                            v_pages=c.v_pages.at[at].set(v.astype(c.v_pages.dtype), mode="drop")))

    def _gather(self, layer, dtype):
        """This layer's cache per row in logical slot order, [B, max_pages * page_size, Hkv, hd] in `dtype`."""
        c = self.cache
        lay = lambda x: None if x is None else jax.lax.dynamic_index_in_dim(x, layer, 0, keepdims=False)  # noqa
        kk = decode_kernels.gather_pages(lay(c.k_pages), c.page_table, lay(c.k_scale), dtype)
        vv = decode_kernels.gather_pages(lay(c.v_pages), c.page_table, lay(c.v_scale), dtype)
        return kk, vv

    def _decode_range(self, window):
        c = self.cache
        if c.window is not None:
            return jnp.minimum(self.new_len, c.ring_slots), jnp.zeros_like(self.new_len)
        lengths = jnp.minimum(self.new_len, c.slots_per_row)
        if window is None:
            return lengths, jnp.zeros_like(lengths)
        w = jnp.asarray(window, jnp.int32)
        return lengths, jnp.where(w > 0, jnp.maximum(lengths - w, 0), 0)

    def _ring_chunk_attention(self, q, k, v, old):
        c = self.cache
        ok_, ov = old
        old_len = c.lengths[:, None]
        j = jnp.arange(ok_.shape[1])[None, :]
        r = j - c.n_sink
        wrap = jnp.floor_divide(old_len - 1 - c.n_sink - r, c.window)
        old_tok = jnp.where(j < c.n_sink, j, c.n_sink + r + c.window * wrap)
        old_ok = jnp.where(j < c.n_sink, j < old_len, (r >= 0) & (r < c.window) & (old_len > c.n_sink + r))
        k_tok = jnp.concatenate([old_tok, self.q_tok], axis=1)  # [B, S + T]
        k_ok = jnp.concatenate([old_ok, self.real], axis=1)
        qt = self.q_tok[:, :, None]
        kt = k_tok[:, None, :]
        vis = k_ok[:, None, :] & (kt <= qt) & ((kt < c.n_sink) | (qt - kt < c.window)) & (qt >= 0)
        kk = jnp.concatenate([ok_, k.astype(ok_.dtype)], axis=1)
        vv = jnp.concatenate([ov, v.astype(ov.dtype)], axis=1)
        return _multi_query_attention(q, kk, vv, vis)


def _multi_query_attention(q, k, v, vis):
    """q [B, T, Hq, D], k/v [B, S, Hkv, D], vis [B, T, S] -> [B, T, Hq, D]; f32 softmax, rows with no key -> 0."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, hq // hkv, d)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * d ** -0.5
    m5 = vis[:, None, None]
    s = jnp.where(m5, s, _NEG)
    p = jnp.where(m5, jax.nn.softmax(s, axis=-1), 0.0).astype(v.dtype)
    o = jnp.einsum("bkgts,bskd->btkgd", p, v, preferred_element_type=jnp.float32)
    return o.reshape(b, t, hq, d).astype(q.dtype)


# ------------------------------------------------------------------------------------------------
# host-side page allocator
# ------------------------------------------------------------------------------------------------
class PageAllocator:
    """Free list over a pool of `num_pages` pages (host side; pages are plain ints)."""

    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError(f"PageAllocator: num_pages must be >= 1, got {num_pages}")
        self.num_pages = int(num_pages)
        self._free: List[int] = list(range(num_pages - 1, -1, -1))
        self._used: set = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> List[int]:
        """`n` pages; ValueError when fewer are free (callers check `num_free` first)."""
        if n < 0 or n > len(self._free):
            raise ValueError(f"PageAllocator: cannot allocate {n} pages, {len(self._free)} free")
        out = [self._free.pop() for _ in range(n)]
        self._used.update(out)
        return out

    def free(self, pages: Sequence[int]) -> None:
        """Return pages to the pool (a page not allocated raises)."""
        for p in pages:
            if p not in self._used:
                raise ValueError(f"PageAllocator: page {p} is not allocated")
            self._used.remove(p)
            self._free.append(int(p))


def pages_needed(tokens: int, page_size: int, n_sink: int = 0, window: Optional[int] = None) -> int:
    """Pages a sequence of `tokens` tokens occupies (a ring never needs more than n_sink + window slots)."""
    slots = tokens if window is None else min(tokens, n_sink + window)
    return -(-slots // page_size)


# ------------------------------------------------------------------------------------------------
# generate with a paged cache
# ------------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "sampling", "eos", "pad_id", "cache_spec",
                                             "view"))
def _generate_paged_jit(model, params, input_ids, mask, rng, *, max_new_tokens, sampling, eos, pad_id, cache_spec,
                        view):
    from iva_jax.inference.generate import generate_with_cache

    cache = PagedKVCache.init(model.config, input_ids.shape[0], **dict(cache_spec))
    return generate_with_cache(model, params, input_ids, mask, rng, cache, max_new_tokens=max_new_tokens,
                               sampling=sampling, eos=eos, pad_id=pad_id, view=view)


def generate_paged(model, params, input_ids, max_new_tokens: int, *, attention_mask=None, page_size: int = 16,
                   kv_dtype: Any = "auto", n_sink: int = 0, window: Optional[int] = None,
                   kernel_impl: Optional[str] = None, interpret: bool = False,
                   blocks: Optional[decode_kernels.DecodeBlocks] = None, temperature: float = 0.0,
                   top_k: Optional[int] = None, top_p: Optional[float] = None, min_p: Optional[float] = None,
                   repetition_penalty: Optional[float] = None, eos_token_id=None, pad_token_id: Optional[int] = None,
                   seed: Union[int, jax.Array] = 0, fuse_projections: bool = True) -> jnp.ndarray:
    """`generate` with a paged KV cache (one jit, decode loop on device): new ids [batch, max_new_tokens].

    Each row gets pages for its own prompt + max_new_tokens (padding stores nothing); `n_sink` +
    `window` switch to the bounded sink/window ring (see module docstring); `kv_dtype="fp8"` stores
    float8_e4m3fn KV with per-vector scales.  `fuse_projections`: as in `generate`.
    """
    from iva_jax.inference.generate import _check_inputs, _eos_tuple, _key, _pad_id
    from iva_jax.inference.sampling import SamplingConfig

    input_ids, mask = _check_inputs(model, input_ids, attention_mask, max_new_tokens)
    sampling = SamplingConfig(temperature=float(temperature), top_k=top_k, top_p=top_p, min_p=min_p,
                              repetition_penalty=repetition_penalty)
    eos = _eos_tuple(model, eos_token_id)
    longest = int(np.asarray(mask).sum(axis=1).max()) + max_new_tokens
    max_pages = pages_needed(longest, page_size, n_sink, window)
    if window is not None:
        max_pages = max(max_pages, pages_needed(n_sink + window, page_size))
    kv_dtype = kv_dtype_of(kv_dtype, model.config).name
    spec = (("max_pages", max_pages), ("page_size", page_size), ("kv_dtype", kv_dtype), ("n_sink", n_sink),
            ("window", window), ("kernel_impl", kernel_impl), ("interpret", interpret), ("blocks", blocks))
    return _generate_paged_jit(model, params, input_ids, mask, _key(seed), max_new_tokens=int(max_new_tokens),
                               sampling=sampling, eos=eos, pad_id=_pad_id(model, pad_token_id, eos), cache_spec=spec,
                               view=bool(fuse_projections))
