"""Heterogeneous decoder layers: config pattern + validation + YAML, the three layer layouts (scan / periodic
block / unrolled) and their parameter locations, block scan == unrolled (values and gradients), and the HRM
controller hooks (router temperature, attention-sink bias, per-layer hidden states) against independent
references (a rescaled router, transformers with an additive 4D mask, transformers' hidden states)."""

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iva_jax.config import ModelConfig
from iva_jax.inference.kv_cache import KVCache
from iva_jax.models.transformer import Transformer, layer_layout, layer_param_location
from iva_jax.moe import MoEConfig
from iva_jax.ssm import SSMConfig

ROOT = Path(__file__).resolve().parents[1]
BASE = dict(vocab_size=53, hidden_size=24, intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
MOE = MoEConfig(num_experts=5, num_experts_per_tok=2, moe_intermediate_size=12, z_loss_coef=1e-3)
SSM = SSMConfig(d_state=4, expand=2)


def _cfg(**kw):
    return ModelConfig(**{**BASE, **kw})


def _params(config, seed=0, std=0.1):
    """Random params from numpy (a jitted flax init compiles the whole model: slow on CPU); scales 1 + noise."""
    model = Transformer(config)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    rng = np.random.default_rng(seed)
    fill = lambda path, s: jnp.asarray(rng.normal(size=s.shape) * std + ("scale" in jax.tree_util.keystr(path)),  # noqa
                                       jnp.float32)
    return model, jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(shapes))


# ------------------------------------------------------------------------------------------------
# config and layout
# ------------------------------------------------------------------------------------------------
def test_layouts_and_param_locations():
    assert layer_layout(_cfg()) == "scan"
    assert layer_layout(_cfg(moe=MOE)) == "scan"
    every_other = _cfg(moe=MOE.replace(decoder_sparse_step=2))
    assert every_other.layer_ffns() == ("dense", "moe", "dense", "moe")
    assert layer_layout(every_other) == "block"
    assert [layer_param_location(every_other, i) for i in range(4)] == [
        ("layers/layer_0", 0), ("layers/layer_1", 0), ("layers/layer_0", 1), ("layers/layer_1", 1)]
    hybrid = _cfg(num_hidden_layers=6, mixer_types=("mamba", "mamba", "attention") * 2, ssm=SSM)
    assert layer_layout(hybrid) == "block" and layer_param_location(hybrid, 5) == ("layers/layer_2", 1)
    assert hybrid.attention_layers == (2, 5) and hybrid.num_attention_layers == 2
    assert layer_layout(_cfg(moe=MOE.replace(mlp_only_layers=(0,)))) == "unrolled"  # no period
    assert layer_layout(every_other.replace(scan_layers=False)) == "unrolled"
    assert layer_param_location(every_other.replace(scan_layers=False), 3) == ("layers_3", None)

    shapes = jax.eval_shape(Transformer(hybrid.replace(moe=MOE.replace(moe_layers=(1, 4)))).init,
                            jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    blk = nn.meta.unbox(shapes)["layers"]
    assert blk["layer_1"]["mlp"]["experts"]["gate_proj"].shape == (2, 5, 24, 12)  # [blocks, E, D, F]
    assert blk["layer_0"]["mixer"]["A_log"].shape == (2, 48, 4)
    assert blk["layer_2"]["self_attn"]["q_proj"]["kernel"].shape == (2, 24, 24)
    assert "self_attn" not in blk["layer_0"] and "gate_proj" in blk["layer_0"]["mlp"]


def test_config_validation_names_fields_and_yaml_round_trip(tmp_path):
    bad = [(dict(mixer_types=("attention",) * 3), "mixer_types"),
           (dict(mixer_types=("attention", "lstm", "attention", "attention")), "mixer_types"),
           (dict(mixer_types=("mamba",) * 4), "ssm"),
           (dict(mixer_types=("retnet",) * 4, ssm=SSMConfig(num_heads=5)), "num_heads"),
           (dict(moe=MOE.replace(moe_layers=(4,))), "moe.moe_layers"),
           (dict(moe=MOE.replace(mlp_only_layers=(9,))), "moe.mlp_only_layers"),
           (dict(moe=MOE.replace(decoder_sparse_step=5)), "moe"),
           (dict(moe={"num_experts": 2, "num_experts_per_tok": 3}), "num_experts_per_tok"),
           (dict(n_sink=-1), "n_sink")]
    for kw, field in bad:
        with pytest.raises(ValueError, match=field):
            _cfg(**kw)
    c = _cfg(mixer_types=["mamba", "attention"] * 2, ssm={"d_state": 4}, moe=MOE.replace(decoder_sparse_step=2))
    assert isinstance(c.moe, MoEConfig) and isinstance(c.ssm, SSMConfig) and c.mixer_types[0] == "mamba"
    c.to_yaml(tmp_path / "m.yaml")
    assert ModelConfig.from_yaml(tmp_path / "m.yaml") == c
    m = ModelConfig.from_yaml(ROOT / "configs" / "model_moe.yaml")
    assert m.moe.num_experts == 8 and m.layer_ffns() == ("moe",) * m.num_hidden_layers
    assert m.num_params() > _cfg().replace(**{k: getattr(m, k) for k in BASE}).num_params()


def test_num_params_counts_moe_and_ssm_layers():
    c = _cfg(mixer_types=("mamba", "attention") * 2, ssm=SSM,
             moe=MOE.replace(decoder_sparse_step=2, shared_expert_intermediate_size=8))
    shapes = jax.eval_shape(Transformer(c).init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    assert c.num_params() == sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nn.meta.unbox(shapes)))


# ------------------------------------------------------------------------------------------------
# block scan == unrolled
# ------------------------------------------------------------------------------------------------
def _unroll(params, config):
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(config.num_hidden_layers):
        prefix, idx = layer_param_location(config, i)
        sub = params
        for part in prefix.split("/"):
            sub = sub[part]
        out[f"layers_{i}"] = jax.tree_util.tree_map(lambda a: a[idx], sub)
    return out


def test_block_scan_equals_unrolled_values_and_grads():
    """(mamba, attention) x 2 with MoE every other layer and a window only on layer 1 (a traced window)."""
    c = _cfg(mixer_types=("mamba", "attention") * 2, ssm=SSM, moe=MOE.replace(decoder_sparse_step=2),
             sliding_window=3, layer_types=("full_attention", "sliding_attention", "full_attention",
                                            "full_attention"))
    assert layer_layout(c) == "block"
    model, params = _params(c, seed=1)
    flat = Transformer(c.replace(scan_layers=False))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 53, (2, 9)))
    mask = jnp.asarray(np.r_[np.ones((1, 9)), [[0, 0] + [1] * 7]], jnp.int32)

    def run(m):
        def loss(p):
            (logits, lh), cols = m.apply({"params": p}, ids, mask, return_layer_hidden=True, mutable=["losses"])
            aux = sum(jax.tree_util.tree_leaves(cols))
            return jnp.sum(logits * jnp.cos(logits)) + 10.0 * aux, (logits, lh, aux)
        return jax.jit(jax.value_and_grad(loss, has_aux=True))

    (_, (l1, h1, a1)), g1 = run(model)(params)
    (_, (l2, h2, a2)), g2 = run(flat)(_unroll(params, c))
    np.testing.assert_allclose(l1, l2, atol=1e-5)
    np.testing.assert_allclose(h1, h2, atol=1e-5)
    assert h1.shape == (4, 2, 9, 24)
    np.testing.assert_allclose(a1, a2, rtol=1e-6)
    assert float(a1) > 0
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(_unroll(g1, c)), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(x, y, atol=2e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))
    # the window on layer 1 matters (so the block's traced window, equal to the static one, is not a no-op)
    l3 = Transformer(c.replace(scan_layers=False, layer_types=None, sliding_window=None)).apply(
        {"params": _unroll(params, c)}, ids, mask)
    assert float(jnp.max(jnp.abs(l3 - l1))) > 1e-4


def test_ssm_layer_cache_checks():
    """A hybrid's cache must carry its SSM states (KVCache.init does); mixers without a recurrent state raise.
    (Cached hybrid generation itself: tests/test_ssm_hybrid.py.)"""
    c = _cfg(mixer_types=("mamba", "attention") * 2, ssm=SSM)
    model = Transformer(c)
    cache = KVCache.init(c.replace(num_hidden_layers=2, mixer_types=None), 1, 8)  # the 2 attention layers only
    ids = jnp.zeros((1, 3), jnp.int32)
    with pytest.raises(ValueError, match="SSM states"):
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids, cache=cache))
    assert KVCache.init(c, 1, 8).k.shape[0] == 2 and set(KVCache.init(c, 1, 8).ssm) == {"layers/layer_0"}
    with pytest.raises(NotImplementedError, match="hyena"):
        KVCache.init(c.replace(mixer_types=("hyena", "attention") * 2), 1, 8)


# ------------------------------------------------------------------------------------------------
# HRM controller hooks
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def moe_model():
    return _params(_cfg(num_hidden_layers=2, moe=MOE), seed=2, std=0.3)  # std 0.3: decisive routing


def test_router_temperature_equals_rescaled_router(moe_model):
    """softmax(x W / tau) == softmax(x (W / tau)): a temperature equals a router kernel divided by it."""
    model, params = moe_model
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 53, (2, 7)))
    fwd = jax.jit(lambda p, tau: model.apply({"params": p}, ids, router_temperature=tau))  # tau [B]
    scaled = lambda tau: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, a: a / tau if "gate" in jax.tree_util.keystr(path) and "gate_proj" not in
        jax.tree_util.keystr(path) else a, params)
    one = jnp.ones((2,))
    base = fwd(params, one)
    per_row = fwd(params, jnp.asarray([0.5, 2.5]))  # one temperature per row, broadcast over the sequence
    for row, tau in enumerate((0.5, 2.5)):
        got = fwd(params, tau * one)
        np.testing.assert_allclose(got, fwd(scaled(tau), one), atol=1e-5)
        np.testing.assert_allclose(per_row[row], got[row], atol=1e-5)
        assert float(jnp.max(jnp.abs(got - base))) > 1e-3
    # differentiable: the gradient matches a central difference
    f = lambda tau: jnp.sum(jnp.sin(fwd(params, tau * one)))  # noqa: E731
    g = float(jax.grad(f)(jnp.float32(1.3)))
    fd = (float(f(jnp.float32(1.3 + 1e-2))) - float(f(jnp.float32(1.3 - 1e-2)))) / 2e-2
    assert abs(g) > 1e-3 and abs(g - fd) <= 2e-2 * abs(fd) + 1e-3


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    torch = pytest.importorskip("torch", reason="the sink-bias reference is transformers")
    from hf_tiny import tiny_hf
    from torch_bridge import load_pretrained

    d = tmp_path_factory.mktemp("llama")
    hf = tiny_hf("llama", d, num_hidden_layers=2)
    hf.set_attn_implementation("eager")
    return torch, hf, *load_pretrained(d)


def test_attn_sink_bias_matches_transformers_additive_mask(llama):
    """A' = A + alpha[b, h] on the first n_sink keys == transformers given that additive 4D mask."""
    torch, hf, model, params = llama
    B, T, H, n = 2, 10, 6, 2
    ids = np.random.default_rng(0).integers(0, 97, (B, T))
    alpha = (np.random.default_rng(1).normal(size=(B, H)) * 2).astype(np.float32)
    causal = np.tril(np.ones((T, T), bool))
    m = np.broadcast_to(np.where(causal, 0.0, np.finfo(np.float32).min), (B, H, T, T)).astype(np.float32).copy()
    m[..., :n] += alpha[:, :, None, None] * causal[None, None, :, :n]
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(m), output_hidden_states=True)
    fwd = jax.jit(lambda p, a: model.apply({"params": p}, jnp.asarray(ids), attn_sink_bias=a, n_sink=n,
                                           return_hidden=True, return_layer_hidden=True))
    logits, hidden, layer_h = fwd(params, jnp.asarray(alpha))
    assert np.abs(np.asarray(logits) - ref.logits.numpy()).max() <= 1e-4
    # per-layer hidden states: HF's hidden_states = (embeddings, layer outputs..., final normed)
    hs = [h.numpy() for h in ref.hidden_states]
    np.testing.assert_allclose(np.asarray(layer_h[0]), hs[1], atol=1e-4)
    np.testing.assert_allclose(np.asarray(hidden), hs[-1], atol=1e-4)
    # per-layer form: the same bias on every layer is the [B, H] call
    same = fwd(params, jnp.broadcast_to(jnp.asarray(alpha), (2, B, H)))[0]
    np.testing.assert_allclose(same, logits, atol=1e-6)
    # differentiable in alpha (central difference along a random direction)
    dirn = jnp.asarray(np.random.default_rng(2).normal(size=(B, H)), jnp.float32)
    f = lambda a: jnp.sum(jnp.sin(fwd(params, a)[0]))  # noqa: E731
    g = float(jnp.vdot(jax.grad(f)(jnp.asarray(alpha)), dirn))
    eps = 1e-2
    fd = (float(f(jnp.asarray(alpha) + eps * dirn)) - float(f(jnp.asarray(alpha) - eps * dirn))) / (2 * eps)
    assert abs(g) > 1e-3 and abs(g - fd) <= 2e-2 * abs(fd) + 1e-3


def test_attn_sink_bias_with_kv_cache_equals_full_forward(llama):
    """Prefill + one decode step with the dense cache sees the same sink keys as the no-cache forward."""
    _, _, model, params = llama
    ids = np.random.default_rng(4).integers(0, 97, (2, 8))
    mask = np.ones_like(ids)
    mask[0, :3] = 0  # left padding: the sinks are the first real tokens
    alpha = jnp.asarray([[3.0] * 6, [-2.0] * 6])
    full = jax.jit(lambda a: model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), attn_sink_bias=a,
                                         n_sink=2))
    cached = jax.jit(lambda x, m, cache: model.apply({"params": params}, x, m, cache=cache, attn_sink_bias=alpha,
                                                     n_sink=2))
    _, cache = cached(jnp.asarray(ids[:, :7]), jnp.asarray(mask[:, :7]), KVCache.init(model.config, 2, 12))
    step, _ = cached(jnp.asarray(ids[:, 7:]), jnp.ones((2, 1), jnp.int32), cache)
    np.testing.assert_allclose(step[:, 0], full(alpha)[:, -1], atol=1e-4)
    assert float(jnp.max(jnp.abs(full(alpha * 0)[:, -1] - full(alpha)[:, -1]))) > 1e-3


def test_hook_inputs_are_checked(moe_model, llama):
    model, params = moe_model
    ids = jnp.zeros((2, 5), jnp.int32)
    with pytest.raises(ValueError, match="router_temperature shape"):
        model.apply({"params": params}, ids, router_temperature=jnp.ones((3,)))
    with pytest.raises(ValueError, match="router_temperature must be > 0"):
        model.apply({"params": params}, ids, router_temperature=0.0)
    with pytest.raises(ValueError, match="attn_sink_bias shape"):
        model.apply({"params": params}, ids, attn_sink_bias=jnp.ones((2, 3)))
    _, _, dense, dense_params = llama
    with pytest.raises(ValueError, match="no MoE layers"):
        dense.apply({"params": dense_params}, ids, router_temperature=2.0)
