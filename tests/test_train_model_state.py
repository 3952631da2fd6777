"""TrainState.model_state through the real train step: the bias-balanced MoE router's expert bias (DeepSeek-V3
aux-loss-free balancing) is carried and updated in training mode (deterministic=False), exactly one
sign step per step on that step's expert counts; microbatches update it in order; models without
state keep model_state None and the same results; checkpoints save and restore it."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iva_jax.config import ModelConfig
from iva_jax.models.transformer import Transformer
from iva_jax.moe import MoEConfig, MoeBlock
from iva_jax.train.checkpoint import CheckpointMismatchError, Checkpointer
from iva_jax.train.config import TrainConfig
from iva_jax.train.sft import train_deterministic
from iva_jax.train.step import (TrainState, create_train_state, init_train_state, make_eval_step, make_train_step,
                                make_tx_and_schedule, model_state_of)

E, RATE, SEQ = 5, 0.01, 12


def _config(scan: bool, moe: bool = True) -> ModelConfig:
    m = MoEConfig(num_experts=E, num_experts_per_tok=2, moe_intermediate_size=16, router="bias_balanced",
                  bias_update_rate=RATE) if moe else None
    return ModelConfig(vocab_size=61, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, moe=m,
                       scan_layers=scan)


def _params(model, seed=0, std=0.3):
    """N(0, std) params from numpy (norm scales 1); a large std makes routing uneven."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    rng = np.random.default_rng(seed)
    fill = lambda path, s: (jnp.ones(s.shape) if "scale" in jax.tree_util.keystr(path)  # noqa: E731
                            else jnp.asarray(rng.normal(size=s.shape) * std, jnp.float32))
    params = jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(shapes["params"]))
    ms = model_state_of(shapes)
    return params, None if ms is None else jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), ms)


def _tcfg(**kw):
    base = dict(steps=10, batch_size=4, seq_len=SEQ, lr=1e-2, warmup_steps=1, compute_dtype="float32",
                weight_decay=0.0, schedule="constant")
    return TrainConfig(**{**base, **kw})


def _batches(n, seed=1):
    rng = np.random.default_rng(seed)
    return [{"input_ids": jnp.asarray(rng.integers(0, 61, (4, SEQ)), jnp.int32)} for _ in range(n)]


def _counter(model):
    """jitted (params, ms, ids) -> per-layer expert counts [L, E] (captured MoeBlock outputs, bias from `ms`)."""
    @jax.jit
    def run(params, ms, ids):
        _, cols = model.apply({"params": params, **ms}, ids, mutable=["intermediates"],
                              capture_intermediates=lambda mdl, _: isinstance(mdl, MoeBlock))
        inter = cols["intermediates"]
        return jnp.stack([inter[f"layers_{i}"]["mlp"]["__call__"][0][1]["expert_counts"] for i in range(2)])
    return lambda *a: np.asarray(run(*a))


def _bias(ms):
    """expert_bias of every layer [L, E] from an unrolled or a scanned model state."""
    st = ms["moe_stats"]
    if "layers" in st:
        return np.asarray(st["layers"]["mlp"]["expert_bias"])
    return np.stack([np.asarray(st[f"layers_{i}"]["mlp"]["expert_bias"]) for i in range(2)])


def test_bias_router_bias_moves_against_load_each_step():
    model = Transformer(_config(scan=False))
    params, ms = _params(model)
    cfg = _tcfg()
    tx, sched = make_tx_and_schedule(cfg)
    state, _ = create_train_state(params, tx, jax.random.PRNGKey(0), model_state=ms)
    assert _bias(state.model_state).shape == (2, E) and not _bias(state.model_state).any()
    step = make_train_step(model.apply, tx, cfg, schedule=sched, deterministic=False, donate=False)
    counts_of = _counter(model)
    for t, batch in enumerate(_batches(3)):
        counts = counts_of( state.params, state.model_state, batch["input_ids"])  # [L, E]
        assert counts.sum() == 2 * 4 * SEQ * 2  # 2 layers x tokens x top-2
        before = _bias(state.model_state)
        state, m = step(state, batch)
        after = _bias(state.model_state)
        expect = before + RATE * np.sign(counts.mean(axis=1, keepdims=True) - counts)  # numpy update_expert_bias
        np.testing.assert_allclose(after, expect, rtol=0, atol=1e-7)
        if t == 0:  # overloaded experts go down, underloaded up
            for layer in range(2):
                assert after[layer, counts[layer].argmax()] == pytest.approx(-RATE)
                assert after[layer, counts[layer].argmin()] == pytest.approx(RATE)
        assert np.isfinite(float(m["loss"]))
    assert np.abs(_bias(state.model_state)).max() > 0
    sums = make_eval_step(model.apply, cfg)(state, _batches(1, seed=6)[0])
    assert np.isfinite(float(sums["nll"])) and float(sums["tokens"]) == 4 * (SEQ - 1)


def test_microbatches_update_model_state_in_order():
    model = Transformer(_config(scan=True))
    params, ms = _params(model, seed=3)
    cfg = _tcfg(microbatches=2)
    tx, sched = make_tx_and_schedule(cfg)
    state, _ = create_train_state(params, tx, jax.random.PRNGKey(0), model_state=ms)
    assert _bias(state.model_state).shape == (2, E)  # stacked over the scanned layers
    batch = _batches(1, seed=2)[0]
    new, _ = make_train_step(model.apply, tx, cfg, schedule=sched, deterministic=False, donate=False)(state, batch)
    fwd = jax.jit(lambda ms, ids: model.apply({"params": params, **ms}, ids, deterministic=False,
                                              mutable=["moe_stats"], rngs={"dropout": jax.random.PRNGKey(9)})[1])
    ref = ms
    for half in (batch["input_ids"][0::2], batch["input_ids"][1::2]):  # microbatch j holds rows j, j + 2
        ref = {"moe_stats": fwd(ref, half)["moe_stats"]}
    assert np.abs(_bias(ref)).max() > 0
    np.testing.assert_array_equal(_bias(new.model_state), _bias(ref))


def test_stateless_model_unchanged():
    model = Transformer(_config(scan=True, moe=False))
    cfg = _tcfg()
    tx, sched = make_tx_and_schedule(cfg)
    ids = jnp.zeros((1, 2), jnp.int32)
    b, _ = init_train_state(lambda k: model.init(k, ids), tx, jax.random.PRNGKey(0))  # full variables
    a, _ = create_train_state(jax.tree_util.tree_map(jnp.copy, b.params), tx, b.rng)  # params only
    assert a.model_state is None and b.model_state is None
    batch = _batches(1)[0]
    step = make_train_step(model.apply, tx, cfg, schedule=sched, donate=False)
    sa, ma = step(a, batch)
    sb, mb = step(b, batch)
    assert sa.model_state is None and sb.model_state is None
    assert float(ma["loss"]) == float(mb["loss"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, sa.params, sb.params)
    with pytest.raises(ValueError, match="deterministic"):
        make_train_step(model.apply, tx, cfg, apply_kwargs={"deterministic": True}, deterministic=False)


def test_init_train_state_takes_model_state_from_variables():
    model = Transformer(_config(scan=True))
    tx, _ = make_tx_and_schedule(_tcfg())
    init = lambda k: model.init(k, jnp.zeros((1, 2), jnp.int32))  # noqa: E731
    state, _ = init_train_state(init, tx, jax.random.PRNGKey(0))
    assert set(state.model_state) == {"moe_stats"} and _bias(state.model_state).shape == (2, E)
    assert "losses" not in state.model_state and "params" not in state.model_state
    with pytest.raises(ValueError, match="model_state"):
        init_train_state(init, tx, jax.random.PRNGKey(0), model_state=state.model_state)


def test_checkpoint_round_trips_model_state(tmp_path):
    ms = {"moe_stats": {"layers": {"mlp": {"expert_bias": jnp.asarray(np.arange(10.0).reshape(2, 5) / 7,
                                                                        jnp.float32)}}}}
    params = {"w": jnp.ones((3,), jnp.float32)}
    mk = lambda m: TrainState(step=jnp.asarray(4, jnp.int32), params=params, opt_state={},  # noqa: E731
                              rng=jnp.zeros(2, jnp.uint32), model_state=m)
    target = mk(jax.tree_util.tree_map(jnp.zeros_like, ms))
    with Checkpointer(tmp_path / "new", async_save=False) as ck:
        ck.save(4, mk(ms))
        got = ck.restore(target).state
    np.testing.assert_array_equal(_bias(got.model_state), _bias(ms))
    with Checkpointer(tmp_path / "old", async_save=False) as ck:  # saved without model state
        ck.save(4, mk(None))
        assert ck.restore(mk(None)).state.model_state is None
        with pytest.raises(CheckpointMismatchError, match="model_state"):
            ck.restore(target)


def test_sft_trains_in_training_mode_only_when_the_router_needs_it():
    moe = MoEConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8)
    c = _config(scan=True, moe=False)
    assert train_deterministic(c) is None
    assert train_deterministic(c.replace(moe=moe)) is None
    assert train_deterministic(c.replace(moe=moe.replace(jitter_noise=0.1))) is False
    assert train_deterministic(c.replace(moe=moe.replace(router="bias_balanced"))) is False


def test_generation_reads_the_model_state():
    """A bias_balanced MoE decoder generates from {"params", "moe_stats"} (dense, fused or not, streamed,
    paged and continuous batching alike, all token-equal); the bias steers routing."""
    from flax.core import meta

    from iva_jax.config import ModelConfig
    from iva_jax.inference import generate, generate_stream
    from iva_jax.inference.continuous import ContinuousBatcher
    from iva_jax.inference.paged import generate_paged
    from iva_jax.models.transformer import Transformer
    from iva_jax.moe import MoEConfig

    c = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64,
                    moe=MoEConfig(num_experts=4, num_experts_per_tok=1, moe_intermediate_size=32,
                                  router="bias_balanced"))
    model = Transformer(c)
    v = meta.unbox(model.init(jax.random.key(3), jnp.zeros((1, 4), jnp.int32)))
    variables = {"params": v["params"], "moe_stats": v["moe_stats"]}
    prompt = jnp.array([[1, 5, 9, 2, 7]])
    dense = np.asarray(generate(model, variables, prompt, 8))
    assert np.array_equal(dense, np.asarray(generate(model, variables, prompt, 8, fuse_projections=False)))
    assert np.array_equal(dense[0], np.stack(list(generate_stream(model, variables, prompt, 8)))[:, 0])
    assert np.array_equal(dense, np.asarray(generate_paged(model, variables, prompt, 8, page_size=4)))
    b = ContinuousBatcher(model, variables, max_batch=2, max_seq_len=32, page_size=4)
    rid = b.submit(prompt[0], 8)
    assert b.run()[rid] == list(dense[0])
    # the state is used: a strongly biased router sends every token to expert 0, which changes the logits
    biased = jax.tree_util.tree_map(lambda x: x.at[..., 0].set(100.0), variables["moe_stats"])
    logits = lambda st: np.asarray(model.apply({"params": variables["params"], "moe_stats": st}, prompt))  # noqa: E731
    assert np.abs(logits(biased) - logits(variables["moe_stats"])).max() > 1e-4
