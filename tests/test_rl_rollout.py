"""Rollouts: left padding, the response mask to the first EOS (pad == EOS), preference pairs, and
the teacher-forced log-prob recomputation against the KV-cache decode path and the sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from iva_jax.config import ModelConfig
from iva_jax.inference.kv_cache import KVCache
from iva_jax.models.transformer import Transformer
from iva_jax.rl import Policy, PromptBatch, left_pad, preference_batch, response_forward, response_mask, sample_rollout
from iva_jax.rl.policy import last_token_index, sequence_logprobs

EOS = 1
TEMP = 0.7


def tiny_model(seed=0, std=0.25, vocab=29):
    """A 2-layer GQA decoder with host-made random weights (no init compile); pad == EOS as in SmolLM2."""
    mc = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                     eos_token_id=(EOS,), pad_token_id=EOS, attn_impl="xla", norm_impl="xla", mlp_impl="xla")
    model = Transformer(mc)
    abstract = meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
    rng = np.random.default_rng(seed)

    def one(path, s):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            return np.ones(s.shape, np.float32)
        return (std * rng.standard_normal(s.shape)).astype(np.float32)

    return model, jax.tree_util.tree_map_with_path(one, abstract)


@pytest.fixture(scope="module")
def tiny():
    model, params = tiny_model()
    rng = np.random.default_rng(1)
    seqs = [rng.integers(2, 29, size=n).tolist() for n in (3, 7, 5, 1, 6)]
    return model, params, PromptBatch.from_tokens(seqs, EOS, length=7)


def test_left_pad_layout_and_errors():
    ids, mask = left_pad([[5, 6], [7, 8, 9]], pad_id=0, length=4)
    np.testing.assert_array_equal(ids, [[0, 0, 5, 6], [0, 7, 8, 9]])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [0, 1, 1, 1]])
    with pytest.raises(ValueError, match="does not fit"):
        left_pad([[1, 2, 3]], 0, length=2)
    with pytest.raises(ValueError, match="empty"):
        left_pad([[1], []], 0)
    with pytest.raises(ValueError, match="left-padded"):
        PromptBatch(np.ones((1, 3), np.int32), np.array([[1, 0, 1]], np.int32))


@pytest.mark.parametrize("pad", [EOS, 0])
def test_response_mask_stops_at_first_eos(pad):
    r = np.array([[4, 5, EOS, pad, pad],      # EOS then padding (pad may be EOS itself)
                  [EOS, pad, pad, pad, pad],  # EOS first: one valid token (the EOS)
                  [4, 5, 6, 7, 8],            # truncated: all valid
                  [4, EOS, 9, EOS, 3]])       # only the first EOS counts
    m = np.asarray(response_mask(r, EOS))
    np.testing.assert_array_equal(m.sum(1), [3, 1, 5, 2])
    np.testing.assert_array_equal(m[0], [1, 1, 1, 0, 0])
    # several stop ids, and no EOS at all
    np.testing.assert_array_equal(np.asarray(response_mask(r, (EOS, 6))).sum(1), [3, 1, 3, 2])
    assert np.asarray(response_mask(r, None)).all()
    with pytest.raises(ValueError, match="batch, T"):
        response_mask(r[0], EOS)


def test_preference_batch_and_sequence_logprobs(tiny):
    model, params, _ = tiny
    b = preference_batch([[3, 4], [5]], [[6, 7], [8, 9, 10]], [[11], [12, 13]], pad_id=0, length=6)
    np.testing.assert_array_equal(b["chosen_ids"], [[3, 4, 6, 7, 0, 0], [5, 8, 9, 10, 0, 0]])
    np.testing.assert_array_equal(b["chosen_loss_mask"], [[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(b["rejected_mask"], [[1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(last_token_index(b["chosen_mask"]), [3, 3])
    # summed response log-probs against a float64 softmax of the full forward
    both = jax.jit(lambda ids, mask, lm: (sequence_logprobs(Policy(model), params, ids, mask, lm),
                                          model.apply({"params": params}, ids, mask)))  # one compile
    lp, logits = both(b["chosen_ids"], b["chosen_mask"], b["chosen_loss_mask"])
    logits = np.asarray(logits, np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ids, lm = b["chosen_ids"], b["chosen_loss_mask"]
    ref = [sum(logp[i, t - 1, ids[i, t]] for t in range(6) if lm[i, t]) for i in range(2)]
    np.testing.assert_allclose(lp, ref, rtol=1e-5)
    with pytest.raises(ValueError, match="at least one"):
        preference_batch([], [], [], 0)


def cached_logprobs(model, params, prompts, responses, temperature):
    """Reference: prefill + one-token decode steps through the KV cache, float64 log-softmax(logits / T)."""
    b, p = prompts.ids.shape
    t_new = responses.shape[1]
    step = jax.jit(lambda prm, ids, mask, cache: model.apply({"params": prm}, ids, mask, cache=cache,
                                                             last_logits_only=True))
    cache = KVCache.init(model.config, b, p + t_new)
    logits, cache = step(params, jnp.asarray(prompts.ids), jnp.asarray(prompts.mask), cache)
    out = []
    for t in range(t_new):
        x = np.asarray(logits[:, -1], np.float64) / temperature
        lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
        out.append(x[np.arange(b), responses[:, t]] - lse)
        logits, cache = step(params, jnp.asarray(responses[:, t:t + 1]), jnp.ones((b, 1), jnp.int32), cache)
    return np.stack(out, 1)


@pytest.fixture(scope="module")
def sampled(tiny):
    """G samples per prompt at temperature TEMP, and one jitted teacher-forced forward (reused for greedy)."""
    model, params, prompts = tiny
    fwd = jax.jit(lambda ro_ids, mask, resp, temp: response_forward(Policy(model), params, ro_ids, mask,
                                                                    prompts.ids.shape[1], resp, temp))
    ro = sample_rollout(model, params, prompts, group_size=G, max_new_tokens=9, temperature=TEMP,
                        key=jax.random.PRNGKey(3))
    return ro, fwd, fwd(ro.input_ids, ro.attention_mask, ro.responses, TEMP)


G = 1024


def test_rollout_mask_and_logprob_recomputation(tiny, sampled):
    """Sampled rollout (pad == EOS): the mask stops at the first EOS, and the one-forward log-probs of the
    sampled tokens equal the KV-cache decode path's log-softmax(logits / T), for left-padded prompts."""
    model, params, prompts = tiny
    ro, _, out = sampled
    r, m = np.asarray(ro.responses), np.asarray(ro.response_mask)
    assert r.shape == (5 * G, 9) and (np.asarray(ro.prompt_ids)[::G] == prompts.ids).all()
    first = np.array([list(row).index(EOS) if EOS in row else 9 for row in r])
    np.testing.assert_array_equal(m.sum(1), np.minimum(first + 1, 9))
    assert (first < 8).mean() > 0.1, "few rows stopped early: the test would not exercise pad == EOS"
    rows = np.arange(0, 5 * G, 97)  # a spread-out subset for the (slow, float64 host) reference
    ref = cached_logprobs(model, params, PromptBatch(np.asarray(ro.prompt_ids)[rows], np.asarray(ro.prompt_mask)[rows]),
                          r[rows], TEMP)
    np.testing.assert_allclose(np.where(m[rows], out["logp"][rows], 0), np.where(m[rows], ref, 0), atol=2e-5)
    # entropy of the same tempered distribution
    x = np.asarray(out["logits"][rows], np.float64)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(out["entropy"][rows], -(p * np.log(p)).sum(-1), rtol=1e-4, atol=1e-5)


def test_sampler_frequencies_match_recomputed_probs(sampled):
    """Empirical first-token frequencies of the jitted sampler at temperature T match exp(recomputed logp)."""
    ro, _, out = sampled
    r = np.asarray(ro.responses)
    tv = {"T": [], "untempered": []}
    for i in range(5):
        x = np.asarray(out["logits"][i * G, 0], np.float64)  # already divided by T; same for the whole group
        freq = np.bincount(r[i * G:(i + 1) * G, 0], minlength=x.size) / G
        for name, y in (("T", x), ("untempered", x * TEMP)):
            probs = np.exp(y - y.max())
            tv[name].append(0.5 * np.abs(freq - probs / probs.sum()).sum())
    tv = {k: float(np.mean(v)) for k, v in tv.items()}
    assert tv["T"] < 0.07, tv  # total variation; ~0.05 expected from 1024 samples per prompt
    assert tv["untempered"] > 2 * tv["T"], tv  # the temperature is visibly part of the distribution


def test_greedy_tokens_are_argmax_of_recomputed_logits(tiny, sampled):
    model, params, prompts = tiny
    _, fwd, _ = sampled
    ro = sample_rollout(model, params, prompts, group_size=G, max_new_tokens=9, temperature=0.0,
                        key=jax.random.PRNGKey(0))
    out = fwd(ro.input_ids, ro.attention_mask, ro.responses, 1.0)
    m = np.asarray(ro.response_mask)
    np.testing.assert_array_equal(np.where(m, np.argmax(out["logits"], -1), -1), np.where(m, ro.responses, -1))
    np.testing.assert_array_less(np.where(m, out["logp"], 0), 1e-6)  # log-probs are <= 0 ...
    assert np.all(np.where(m, out["logp"], 0) >= np.log(1.0 / model.config.vocab_size))  # ... and argmax >= 1/V
