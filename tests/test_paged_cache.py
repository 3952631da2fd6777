"""Paged KV cache: paged decode == dense decode (XLA and the Pallas kernel in interpret mode), left
padding, sliding-window models, chunked prefill, fp8 KV, the page allocator, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iva_jax.inference import generate
from iva_jax.inference.paged import PageAllocator, PagedKVCache, generate_paged, pages_needed, quantize_kv
from iva_jax.layers.attention import masked_attention
from iva_jax.models.transformer import Transformer
from inference_tiny import CFG, tiny_model
from kernels.decode_attention import DecodeBlocks, dense_cache_step


@pytest.fixture(scope="module")
def tiny():
    model, params = tiny_model(std=0.1)  # peaked logits: greedy tokens have no near-ties
    rng = np.random.default_rng(0)
    ids = np.zeros((3, 11), np.int32)
    mask = np.zeros((3, 11), np.int32)
    for i, n in enumerate((5, 11, 8)):
        ids[i, 11 - n:] = rng.integers(0, 89, n)
        mask[i, 11 - n:] = 1
    return model, params, ids, mask


def test_paged_generate_equals_dense_left_padded(tiny):
    model, params, ids, mask = tiny
    dense = np.asarray(generate(model, params, ids, 14, attention_mask=mask, eos_token_id=[]))
    paged = np.asarray(generate_paged(model, params, ids, 14, attention_mask=mask, page_size=4, eos_token_id=[]))
    np.testing.assert_array_equal(paged, dense)
    assert len(set(dense[:, -1])) > 1  # rows really differ


def test_pallas_kernel_interpret_equals_dense(tiny):
    model, params, ids, mask = tiny
    dense = np.asarray(generate(model, params, ids, 14, attention_mask=mask, eos_token_id=[]))
    out = generate_paged(model, params, ids, 14, attention_mask=mask, page_size=4, eos_token_id=[],
                         kernel_impl="triton", interpret=True, blocks=DecodeBlocks(num_splits=2))
    np.testing.assert_array_equal(np.asarray(out), dense)


def test_sliding_window_model_chunked_prefill_and_decode(tiny):
    _, params, ids, _ = tiny
    model = Transformer(CFG.replace(sliding_window=5))
    full = jnp.asarray(np.concatenate([ids[1:2], ids[2:3, -1:]], axis=1))  # 12 real tokens
    ref = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, full)
    fwd = jax.jit(lambda p, x, c: model.apply({"params": p}, x, cache=c))
    cache = PagedKVCache.init(CFG, 1, 6, page_size=3)
    logits = []
    for lo, hi in ((0, 4), (4, 11), (11, 12)):  # two prompt chunks (window crosses them), then a decode step
        lg, cache = fwd(params, full[:, lo:hi], cache)
        logits.append(np.asarray(lg))
    np.testing.assert_allclose(np.concatenate(logits, 1), np.asarray(ref), atol=2e-5)
    assert int(cache.lengths[0]) == 12 and int(cache.next_pos[0]) == 12


def test_fp8_kv_close_to_float_kv(tiny):
    model, _, ids, mask = tiny
    params = tiny_model(std=0.02)[1]  # the usual init scale

    @jax.jit
    def prefill_then_decode(cache):
        _, cache = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), cache=cache)
        return model.apply({"params": params}, jnp.asarray(ids[:, -1:]), jnp.ones((3, 1), jnp.int32), cache=cache)

    outs = []
    for kv in ("float32", "fp8"):
        lg, cache = prefill_then_decode(PagedKVCache.init(CFG, 3, 5, page_size=4, kv_dtype=kv))
        outs.append(np.asarray(lg))
    assert cache.k_pages.dtype == jnp.float8_e4m3fn and cache.k_scale.shape == (2, 15, 4, 2)
    rel = np.abs(outs[1] - outs[0]).max() / np.abs(outs[0]).max()
    assert 0 < rel < 0.05, rel
    x = jnp.asarray(np.random.default_rng(1).standard_normal((7, 3, 16)) * 10, jnp.float32)
    q, s = quantize_kv(x)
    err = np.abs(np.asarray(q, np.float32) * np.asarray(s)[..., None] - np.asarray(x))
    assert np.all(err <= 2 ** -4 * np.abs(np.asarray(x)) + 1e-6)  # e4m3: 3 mantissa bits


def test_dense_decode_wrapper_matches_masked_attention():
    rng = np.random.default_rng(5)
    L, b, s, hkv, hq, d = 2, 2, 13, 2, 4, 16
    q = jnp.asarray(rng.standard_normal((b, 1, hq, d)), jnp.float32)
    ck, cv = (jnp.asarray(rng.standard_normal((L, b, s, hkv, d)), jnp.float32) for _ in range(2))
    valid = jnp.asarray(rng.random((b, s)) > 0.2)

    @jax.jit
    def both(window):
        got = dense_cache_step(q, ck, cv, layer=1, cache_index=9, kv_valid=valid, window=window, attn_impl="xla")
        return got, masked_attention(q, ck[1], cv[1], q_offset=9, window=window, kv_valid=valid)

    for window in (0, 4, 3, 100):  # traced: 0 = no window
        got, exp = both(jnp.asarray(window))
        np.testing.assert_allclose(np.asarray(got), np.asarray(exp), atol=1e-6)


def test_allocator_and_bad_input(tiny):
    model, params, ids, _ = tiny
    a = PageAllocator(5)
    pages = a.alloc(3)
    assert len(set(pages)) == 3 and a.num_free == 2
    with pytest.raises(ValueError, match="cannot allocate 3 pages, 2 free"):
        a.alloc(3)
    a.free(pages)
    assert a.num_free == 5
    with pytest.raises(ValueError, match="not allocated"):
        a.free([pages[0]])
    assert pages_needed(33, 16) == 3 and pages_needed(1000, 16, n_sink=4, window=28) == 2
    with pytest.raises(ValueError, match="n_sink needs a window"):
        PagedKVCache.init(CFG, 1, 4, n_sink=2)
    with pytest.raises(ValueError, match="exceed"):
        PagedKVCache.init(CFG, 1, 2, page_size=4, window=8, n_sink=1)
    with pytest.raises(ValueError, match="pass a page_table"):
        PagedKVCache.init(CFG, 2, 4, num_pages=5)
    with pytest.raises(ValueError, match="kv dtype"):
        PagedKVCache.init(CFG, 1, 4, kv_dtype="int8")
    cache = PagedKVCache.init(CFG, 2, 4)
    with pytest.raises(ValueError, match="paged cache batch 2 != input batch 3"):
        model.apply({"params": params}, jnp.asarray(ids), cache=cache)
    windowed = Transformer(CFG.replace(sliding_window=5))
    ring = PagedKVCache.init(CFG, 3, 4, page_size=4, n_sink=2, window=6)
    with pytest.raises(ValueError, match="only n_sink=0 with window equal"):
        windowed.apply({"params": params}, jnp.asarray(ids), cache=ring)
