"""Continuous batching: requests join and leave between steps, each gets exactly its tokens alone (greedy),
with EOS, per-request max tokens, a pool small enough to force preemption, and pages returned."""

import numpy as np
import pytest

from iva_jax.inference import generate
from iva_jax.inference.continuous import ContinuousBatcher
from inference_tiny import tiny_model

EOS = 7


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(std=0.1)


def alone(model, params, prompts, n):
    """Each prompt generated on its own by the dense-cache `generate` on the plain (unfused) params
    (same-length prompts share a call); the batcher decodes on the fused decode view."""
    out = {}
    for length in sorted({len(p) for p in prompts}):
        idx = [i for i, p in enumerate(prompts) if len(p) == length]
        toks = np.asarray(generate(model, params, np.stack([prompts[i] for i in idx]), n, eos_token_id=EOS,
                                   fuse_projections=False))
        out.update({i: list(t) for i, t in zip(idx, toks)})
    return [out[i] for i in range(len(prompts))]


def trim(tokens, max_new):
    tokens = tokens[:max_new]
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


def test_each_request_gets_its_tokens_alone(tiny):
    model, params = tiny
    rng = np.random.default_rng(0)
    lengths = (5, 9, 5, 9, 9, 5, 9)
    max_new = (12, 7, 20, 15, 6, 11, 18)
    prompts = [rng.integers(0, 89, n) for n in lengths]
    # 3 slots, pages of 4, 12 pages: fewer than 3 long sequences need -> preemption
    b = ContinuousBatcher(model, params, max_batch=3, max_seq_len=32, page_size=4, num_pages=12, prefill_bucket=16,
                          eos_token_id=EOS)
    assert b.decode_model.fused_qkv and b.decode_model.fused_gate_up  # decode steps run on the fused view
    first = [b.submit(p, m) for p, m in zip(prompts[:4], max_new[:4])]
    events = []
    for _ in range(3):  # requests join while others are running
        events += b.step()
    later = [b.submit(p, m) for p, m in zip(prompts[4:], max_new[4:])]
    events += list(b.stream())
    res = b.results
    exp = alone(model, params, prompts, max(max_new))
    for rid, p_exp, m in zip(first + later, exp, max_new):
        assert res[rid] == trim(p_exp, m), rid
    assert any(r[-1] == EOS and len(r) < m for r, m in zip((res[i] for i in first + later), max_new))  # EOS hit
    assert b.stats["preemptions"] > 0 and b.stats["decode_steps"] < sum(max_new)
    assert b.alloc.num_free == b.alloc.num_pages and b.idle
    # events stream every token exactly once, finished once per request
    assert sorted(rid for rid, _, done in events if done) == sorted(first + later)
    for rid in first + later:
        assert [t for r, t, _ in events if r == rid] == res[rid]


def test_bad_requests(tiny):
    model, params = tiny
    b = ContinuousBatcher(model, params, max_batch=2, max_seq_len=16, page_size=4, num_pages=3)
    with pytest.raises(ValueError, match="max_seq_len"):
        b.submit(np.arange(10), 10)
    with pytest.raises(ValueError, match="needs more pages"):
        b.submit(np.arange(10), 5)
    with pytest.raises(ValueError, match="ids in"):
        b.submit([100], 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        b.submit([1, 2], 0)
    with pytest.raises(ValueError, match="repetition_penalty"):
        from iva_jax.inference.sampling import SamplingConfig
        ContinuousBatcher(model, params, sampling=SamplingConfig(repetition_penalty=1.2))
