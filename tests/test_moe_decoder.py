"""The MoE decoder in training and across devices: the seed's check on the real decoder (a tiny MoE LM trained
on the embedded corpus with capacity_factor 1.25 ends with per-expert load std/mean <= 1.0 and overflow <= 5%),
an SSM:attention hybrid with MoE every other layer that trains, and expert parallelism through the decoder
(8 fake devices, data x expert) equal to one device in values and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iva_jax.config import ModelConfig
from iva_jax.models.transformer import Transformer, layer_layout
from iva_jax.moe import MoEConfig
from iva_jax.parallel import make_mesh
from iva_jax.ssm import SSMConfig
from iva_jax.train.config import TrainConfig
from iva_jax.train.data import ByteTokenizer, PackedBatches, default_corpus_path
from iva_jax.train.step import create_train_state, make_train_step, make_tx_and_schedule


def _params(model, seed=0, std=0.02):
    """N(0, std) params from numpy (norm scales 1): a jitted flax init compiles the whole model on CPU."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    rng = np.random.default_rng(seed)
    fill = lambda path, s: (jnp.ones(s.shape) if "scale" in jax.tree_util.keystr(path)  # noqa: E731
                            else jnp.asarray(rng.normal(size=s.shape) * std, jnp.float32))
    return jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(shapes))


def _train(config: ModelConfig, steps: int, *, seq_len: int, batch_size: int, lr: float):
    """Train on the embedded corpus with the real train step; returns the per-step metrics (host floats)."""
    model = Transformer(config)
    tcfg = TrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, warmup_steps=5,
                       compute_dtype="float32", weight_decay=0.0, schedule="constant")
    tx, sched = make_tx_and_schedule(tcfg)
    state, _ = create_train_state(_params(model), tx, jax.random.PRNGKey(0))
    step = make_train_step(model.apply, tx, tcfg, schedule=sched)
    data = PackedBatches([default_corpus_path()], ByteTokenizer(), seq_len=seq_len, batch_size=batch_size, seed=0)
    history = []
    for _ in range(steps):
        state, m = step(state, next(data))
        history.append({k: float(v) for k, v in jax.device_get(m).items() if np.ndim(v) == 0})
    return history


def test_tiny_moe_lm_balances_at_capacity_1_25():
    """configs/model_moe.yaml in miniature: 8 experts, top-2, every layer MoE, capacity factor 1.25, the
    balancing loss per layer (a stronger coefficient than the yaml's: byte tokens route very unevenly)."""
    yaml_cfg = ModelConfig.from_yaml("configs/model_moe.yaml")
    moe = yaml_cfg.moe.replace(moe_intermediate_size=48, aux_loss_coef=0.2)
    c = yaml_cfg.replace(vocab_size=258, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, moe=moe)
    assert c.moe.capacity_factor == 1.25 and c.moe.resolved_dispatch == "capacity"
    assert c.moe_aux_loss_layers == "per_layer"
    hist = _train(c, 200, seq_len=64, batch_size=8, lr=3e-3)
    mean = lambda k, sl: float(np.mean([h[k] for h in hist[sl]]))  # noqa: E731
    last = slice(-10, None)
    assert mean("ce", last) < 0.8 * mean("ce", slice(0, 3)), [round(h["ce"], 2) for h in hist[::10]]
    assert mean("model/moe/load_std_over_mean", last) <= 1.0, [h["model/moe/load_std_over_mean"] for h in hist[::10]]
    assert mean("model/moe/overflow_pct", last) <= 5.0, [h["model/moe/overflow_pct"] for h in hist[::10]]
    assert mean("model/moe/overflow_pct", slice(0, 30)) > 10.0  # the capacity limit bit early on
    assert all(np.isfinite(h["loss"]) and h["aux_loss"] > 0 for h in hist)


def test_periodic_ssm_attention_moe_hybrid_trains():
    """(mamba, attention) x 2 with MoE on every other layer: a 2-layer period scanned twice ("block" layout)."""
    c = ModelConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                    mixer_types=("mamba", "attention") * 2, ssm=SSMConfig(d_state=4, expand=2),
                    moe=MoEConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                  decoder_sparse_step=2, aux_loss_coef=0.01))
    assert layer_layout(c) == "block" and c.layer_kinds()[:2] == (("mamba", "dense"), ("attention", "moe"))
    hist = _train(c, 30, seq_len=32, batch_size=4, lr=3e-3)
    ce = [h["ce"] for h in hist]
    assert all(np.isfinite(ce)) and np.isfinite(hist[-1]["grad_norm"]) and hist[-1]["grad_norm"] > 0
    assert np.mean(ce[-5:]) < 0.85 * np.mean(ce[:3]), [round(x, 2) for x in ce]
    assert all(h["aux_loss"] > 0 for h in hist)


def test_expert_parallel_decoder_equals_single_device():
    """Dropless MoE decoder on a (data=2, expert=4) mesh: logits, aux loss and every gradient as on one device."""
    c = ModelConfig(vocab_size=61, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, moe=MoEConfig(num_experts=8, num_experts_per_tok=2,
                                                         moe_intermediate_size=16, z_loss_coef=1e-3))
    mesh = make_mesh(data=2, expert=4)
    single, parallel = Transformer(c), Transformer(c, mesh=mesh)
    params = _params(single, seed=1, std=0.2)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 61, (4, 6)))  # 24 tokens over 8 token shards

    def run(model):
        def loss(p):
            logits, cols = model.apply({"params": p}, ids, mutable=["losses"])
            aux = sum(jax.tree_util.tree_leaves(cols))
            return jnp.sum(jnp.sin(logits)) + 100.0 * aux, (logits, aux)
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (_, (l1, a1)), g1 = run(single)
    (_, (l2, a2)), g2 = run(parallel)
    np.testing.assert_allclose(l2, l1, atol=1e-5)
    np.testing.assert_allclose(a2, a1, rtol=1e-5)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(y, x, atol=1e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))
    with pytest.raises(ValueError, match="not divisible"):
        Transformer(c.replace(moe=c.moe.replace(num_experts=6)), mesh=mesh).init(jax.random.PRNGKey(0), ids)
