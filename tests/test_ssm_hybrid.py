"""SSM + attention hybrid LMs generating from recurrent states (issue 6).

* Every recurrent mixer (Mamba, Mamba-2, RetNet, RWKV) in one hybrid with attention and a MoE layer: the cached
  path (left-padded prefill, a further multi-token chunk from the states, one-token steps) gives the no-cache
  forward's logits; greedy `generate` is the no-cache forward's argmax chain; a left-padded row generates what
  its unpadded prompt generates.
* configs/model_hybrid.yaml in miniature ("block" layout, MoE on the Mamba layers) trains on the embedded
  corpus (loss falls) and then generates: again the argmax chain of the no-cache forward.
* A model without attention layers ("scan" layout) decodes in O(1) memory: its cache's size does not depend on
  max length; `generate_stream` == `generate`.
"""

import functools
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iva_jax.config import ModelConfig
from iva_jax.inference import KVCache, generate, generate_stream
from iva_jax.models.transformer import Transformer, init_ssm_states, layer_layout
from iva_jax.moe import MoEConfig
from iva_jax.ssm import SSMConfig
from iva_jax.train.config import TrainConfig
from iva_jax.train.data import ByteTokenizer, PackedBatches, default_corpus_path
from iva_jax.train.step import create_train_state, make_train_step, make_tx_and_schedule
from test_ssm_reference import FAST_COMPILE

ROOT = Path(__file__).resolve().parents[1]
V = 61
BASE = dict(vocab_size=V, hidden_size=24, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64)
SSM = SSMConfig(d_state=4, expand=2, headdim=8, num_heads=2, chunk_size=4)


def _params(config, seed=0, std=0.3):
    """Random params from numpy (no jitted flax init: that compiles the whole model); norm scales 1 + noise."""
    shapes = jax.eval_shape(Transformer(config).init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    rng = np.random.default_rng(seed)
    fill = lambda path, s: jnp.asarray(rng.normal(size=s.shape) * std + ("scale" in jax.tree_util.keystr(path)),  # noqa
                                       jnp.float32)
    return jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(shapes["params"]))


def _prompts(seed, batch=2, length=7, pad=3, vocab=V):
    ids = np.random.default_rng(seed).integers(0, vocab, (batch, length))
    mask = np.ones_like(ids)
    mask[1, :pad] = 0  # row 1 is left-padded
    return ids, mask


def _argmax_chain(model, params, ids, mask, new):
    """Greedy next tokens of the no-cache forward over prompt + generated, at the positions that produced the
    generated tokens: [B, new] (equal to `new` when generation is the forward's argmax chain)."""
    full = np.concatenate([ids, np.asarray(new)], 1)
    fmask = np.concatenate([mask, np.ones_like(np.asarray(new))], 1)
    logits = jax.jit(model.apply, compiler_options=FAST_COMPILE)({"params": params}, jnp.asarray(full),
                                                                  jnp.asarray(fmask))
    return np.asarray(jnp.argmax(logits[:, ids.shape[1] - 1:-1], -1)), logits


# ------------------------------------------------------------------------------------------------
# every recurrent mixer in one hybrid
# ------------------------------------------------------------------------------------------------
ALL4 = ModelConfig(**BASE, num_hidden_layers=5, mixer_types=("mamba", "attention", "mamba2", "retnet", "rwkv"),
                   ssm=SSM, moe=MoEConfig(num_experts=3, num_experts_per_tok=2, moe_intermediate_size=16,
                                          moe_layers=(2,)))


def test_cached_path_equals_no_cache_forward_for_every_recurrent_mixer():
    c = ALL4
    assert layer_layout(c) == "unrolled" and c.num_attention_layers == 1
    model, params = Transformer(c), _params(c, seed=1)
    ids, mask = _prompts(0, batch=3, length=8)
    ids[2], mask[2] = ids[1], mask[1]
    ids[2, :3] = (ids[1, :3] + 7) % V  # row 2 = row 1 with other padding tokens
    new = 6
    out = np.asarray(generate(model, params, ids, new, attention_mask=mask))
    chain, full = _argmax_chain(model, params, ids, mask, out)
    np.testing.assert_array_equal(out, chain)
    np.testing.assert_array_equal(out[2], out[1])  # the padding's content never reaches the states
    assert float(jnp.std(full)) > 0.5  # decisive logits: the argmax checks are meaningful

    # teacher-forced through the cache: a left-padded prefill of 5, a 3-token chunk from the states, then steps
    seq = np.concatenate([ids, out], 1)
    smask = np.concatenate([mask, np.ones_like(out)], 1)
    P, K = 5, 3

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def cached(params, ids, mask):
        apply = lambda x, m, cache: model.apply({"params": params}, x, m, cache=cache)  # noqa: E731
        cache = KVCache.init(c, 3, ids.shape[1])
        l1, cache = apply(ids[:, :P], mask[:, :P], cache)
        l2, cache = apply(ids[:, P:P + K], mask[:, P:P + K], cache)

        def step(cache, tok):
            logits, cache = apply(tok[:, None], jnp.ones((3, 1), jnp.int32), cache)
            return cache, logits[:, 0]

        cache, l3 = jax.lax.scan(step, cache, ids[:, P + K:].T)
        return jnp.concatenate([l1, l2, jnp.swapaxes(l3, 0, 1)], 1), cache

    logits, cache = cached(params, jnp.asarray(seq), jnp.asarray(smask))
    err = np.abs(np.asarray(logits) - np.asarray(full))[smask.astype(bool)].max()
    assert err < 1e-4, err
    # the cache: KV for the 1 attention layer, one recurrent state per SSM layer (unrolled: not stacked)
    assert cache.k.shape == (1, 3, 14, 2, 6) and set(cache.ssm) == {"layers_0", "layers_2", "layers_3", "layers_4"}
    assert cache.ssm["layers_0"].ssm.shape == (3, 48, 4) and int(cache.ssm["layers_3"].pos) == 14


# ------------------------------------------------------------------------------------------------
# configs/model_hybrid.yaml in miniature: trains, then generates
# ------------------------------------------------------------------------------------------------
def _train(config, steps, seq_len=32, batch_size=4, lr=3e-3):
    model = Transformer(config)
    tcfg = TrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, warmup_steps=3,
                       compute_dtype="float32", weight_decay=0.0, schedule="constant")
    tx, sched = make_tx_and_schedule(tcfg)
    state, _ = create_train_state(_params(config, std=0.05), tx, jax.random.PRNGKey(0))
    step = make_train_step(model.apply, tx, tcfg, schedule=sched)
    data = PackedBatches([default_corpus_path()], ByteTokenizer(), seq_len=seq_len, batch_size=batch_size, seed=0)
    ce = []
    for _ in range(steps):
        state, m = step(state, next(data))
        ce.append(float(m["ce"]))
    return model, state.params, ce


def test_hybrid_yaml_trains_on_the_corpus_and_generates():
    y = ModelConfig.from_yaml(ROOT / "configs" / "model_hybrid.yaml")
    c = y.replace(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, moe=y.moe.replace(moe_intermediate_size=32),
                  ssm=y.ssm.replace(d_state=4, chunk_size=16))
    assert c.mixer_types == y.mixer_types and layer_layout(c) == "block" and c.vocab_size == 258
    model, params, ce = _train(c, 20)
    assert all(np.isfinite(ce)) and np.mean(ce[-5:]) < 0.85 * np.mean(ce[:3]), [round(x, 2) for x in ce]

    tok = ByteTokenizer()
    texts = ["The river", "Many writers"]
    L = max(len(tok(t)) for t in texts)
    ids = np.asarray([[tok.eos_token_id] * (L - len(tok(t))) + tok(t) for t in texts])
    mask = np.asarray([[0] * (L - len(tok(t))) + [1] * len(tok(t)) for t in texts])
    out = np.asarray(generate(model, params, ids, 8, attention_mask=mask, eos_token_id=()))
    chain, logits = _argmax_chain(model, params, ids, mask, out)
    np.testing.assert_array_equal(out, chain)
    assert out.shape == (2, 8) and out.max() < 258
    # states live with the params' layout: layer_{j} of the 3-layer period, stacked over the 2 blocks
    states = init_ssm_states(c, 2)
    assert set(states) == {"layers/layer_0", "layers/layer_1"} and states["layers/layer_0"].ssm.shape == (2, 2, 64, 4)


# ------------------------------------------------------------------------------------------------
# no attention layers: O(1) decode memory
# ------------------------------------------------------------------------------------------------
def test_pure_ssm_decode_memory_is_independent_of_length():
    c = ModelConfig(**BASE, num_hidden_layers=3, mixer_types=("mamba2",) * 3, ssm=SSM)
    assert layer_layout(c) == "scan" and c.num_attention_layers == 0
    shape = lambda cfg, n: jax.eval_shape(lambda: KVCache.init(cfg, 2, n))  # noqa: E731  (no allocation)
    short, long = shape(c, 16), shape(c, 1 << 20)
    assert jax.tree_util.tree_structure(short) == jax.tree_util.tree_structure(long)
    assert [a.shape for a in jax.tree_util.tree_leaves(short)] == [a.shape for a in jax.tree_util.tree_leaves(long)]
    assert short.nbytes() == long.nbytes() > 0 and short.ssm["layers"].ssm.shape == (3, 2, 6, 8, 4)
    # a hybrid's cache grows by the attention layers' KV only
    h = c.replace(mixer_types=("mamba2", "attention", "mamba2"))
    grow = shape(h, 1016).nbytes() - shape(h, 16).nbytes()
    assert grow == 1000 * 2 * (2 * 1 * 2 * 6 * 4 + 1)  # rows x (k and v: 1 layer x 2 heads x 6 dims x f32 + valid)

    model, params = Transformer(c), _params(c, seed=3)
    ids, mask = _prompts(5)
    out = np.asarray(generate(model, params, ids, 5, attention_mask=mask))
    chain, _ = _argmax_chain(model, params, ids, mask, out)
    np.testing.assert_array_equal(out, chain)
    streamed = np.stack(list(generate_stream(model, params, ids, 5, attention_mask=mask)), 1)
    np.testing.assert_array_equal(streamed, out)


def test_unsupported_cache_uses_raise():
    c = ModelConfig(**BASE, num_hidden_layers=2, mixer_types=("hyena", "attention"), ssm=SSM)
    with pytest.raises(NotImplementedError, match="hyena"):
        KVCache.init(c, 1, 8)
    from iva_jax.inference.paged import PagedKVCache

    h = c.replace(mixer_types=("mamba", "attention"))
    paged = PagedKVCache.init(h, 1, 2, page_size=4)
    with pytest.raises(NotImplementedError, match="paged"):
        jax.eval_shape(lambda: Transformer(h).init(jax.random.PRNGKey(0), jnp.zeros((1, 3), jnp.int32), cache=paged))
