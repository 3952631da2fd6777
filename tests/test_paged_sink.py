"""Sink + sliding-window ring KV (StreamingLLM, original positions) against a plain reference: greedy
decoding by full recomputation of the uncached model with the streaming mask as an additive bias."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iva_jax.inference import generate
from iva_jax.inference.continuous import ContinuousBatcher
from iva_jax.inference.paged import generate_paged
from iva_jax.layers.attention import Attention
from iva_jax.models.transformer import Transformer
from inference_tiny import CFG, tiny_model

TOTAL = 28  # prompt 11 + 17 new tokens


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(std=0.1)


@functools.lru_cache(maxsize=None)
def _last_logits_fn(model, n_sink, window):
    @jax.jit
    def last_logits(params, ids, n):
        i = jnp.arange(TOTAL)[:, None]
        j = jnp.arange(TOTAL)[None, :]
        bias = jnp.where((j < n_sink) | (i - j < window), 0.0, -1e30)[None, None]

        def inject(next_fun, args, kwargs, context):
            if isinstance(context.module, Attention) and context.method_name == "__call__":
                kwargs = dict(kwargs, bias=bias)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(inject):
            logits = model.apply({"params": params}, ids[None])  # right padding never reaches earlier rows
        return logits[0, n - 1]
    return last_logits


def streaming_reference(model, params, prompt, n_new, n_sink, window):
    """Query i sees key j iff j <= i and (j < n_sink or i - j < window); positions are the original ones."""
    last_logits = _last_logits_fn(model, n_sink, window)
    seq = list(prompt)
    for _ in range(n_new):
        ids = jnp.asarray(seq + [0] * (TOTAL - len(seq)), jnp.int32)
        seq.append(int(jnp.argmax(last_logits(params, ids, len(seq)))))
    return seq[len(prompt):]


def test_ring_matches_streaming_reference(tiny):
    model, params = tiny
    prompt = np.random.default_rng(3).integers(0, 89, 11)  # longer than the ring: chunked ring prefill
    ref = streaming_reference(model, params, prompt, TOTAL - 11, 2, 5)
    got = np.asarray(generate_paged(model, params, prompt[None], TOTAL - 11, n_sink=2, window=5, page_size=4,
                                    eos_token_id=[]))[0]
    assert list(got) == ref
    full = np.asarray(generate(model, params, prompt[None], TOTAL - 11, eos_token_id=[]))
    assert list(full[0]) != ref  # the window really changed the result


def test_ring_without_sinks_is_the_models_sliding_window(tiny):
    _, params = tiny
    model = Transformer(CFG.replace(sliding_window=6))
    prompt = np.random.default_rng(4).integers(0, 89, (1, 9))
    dense = np.asarray(generate(model, params, prompt, 20, eos_token_id=[]))
    ring = generate_paged(model, params, prompt, 20, window=6, page_size=4, eos_token_id=[])
    np.testing.assert_array_equal(np.asarray(ring), dense)


def test_ring_in_continuous_batching_bounded_pages(tiny):
    model, params = tiny
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 89, 11), rng.integers(0, 89, 6)]
    b = ContinuousBatcher(model, params, max_batch=2, page_size=2, n_sink=2, window=5, prefill_bucket=12,
                          eos_token_id=[])
    assert b.max_pages == 4  # 7 ring slots in pages of 2, whatever the length
    rids = [b.submit(p, 17) for p in prompts]
    res = b.run()
    for p, rid in zip(prompts, rids):
        assert res[rid] == streaming_reference(model, params, p, 17, 2, 5)
    assert b.alloc.num_free == b.alloc.num_pages
