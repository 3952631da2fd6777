"""MoeBlock: fp32 parity with transformers' Mixtral / Qwen2-MoE / Qwen3-MoE sparse blocks, the HF key
tables (per-expert on-disk names and the fused in-memory form), block features and config validation."""

import os
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iva_jax.moe import MoEConfig, MoeBlock
from iva_jax.moe.hf import moe_block_from_hf, moe_block_to_hf, moe_config_kwargs_from_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

D, F, FS, E, K = 20, 12, 28, 6, 2
B, S = 3, 7


def rand_params(blk, x, seed=0, scale=0.5, **kw):
    """Random params of `blk` from numpy (jitted flax init is slow to compile on CPU): shapes from eval_shape."""
    rng = np.random.default_rng(seed)
    shapes = nn.unbox(jax.eval_shape(lambda: blk.init(jax.random.PRNGKey(0), x, **kw)))
    return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(size=s.shape) * scale, s.dtype), shapes)


def _hf_block(family: str, norm_topk_prob: bool):
    torch.manual_seed(0)
    common = dict(hidden_size=D, num_experts_per_tok=K, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, vocab_size=50)
    if family == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralConfig, MixtralSparseMoeBlock
        block = MixtralSparseMoeBlock(MixtralConfig(intermediate_size=F, num_local_experts=E, **common))
    elif family == "qwen2_moe":
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeConfig, Qwen2MoeSparseMoeBlock
        block = Qwen2MoeSparseMoeBlock(Qwen2MoeConfig(moe_intermediate_size=F, num_experts=E,
                                                      norm_topk_prob=norm_topk_prob,
                                                      shared_expert_intermediate_size=FS, **common))
    else:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeConfig, Qwen3MoeSparseMoeBlock
        block = Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(moe_intermediate_size=F, num_experts=E,
                                                      norm_topk_prob=norm_topk_prob, **common))
    with torch.no_grad():  # expert tensors are created with torch.empty: give everything defined values
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return block.eval()


def _moe_config(family: str, norm_topk_prob: bool, **kw) -> MoEConfig:
    shared = FS if family == "qwen2_moe" else None
    return MoEConfig(num_experts=E, num_experts_per_tok=K, moe_intermediate_size=F,
                     norm_topk_prob=norm_topk_prob, shared_expert_intermediate_size=shared, **kw)


@pytest.mark.parametrize("family,norm,dispatch", [
    ("mixtral", True, "dropless_ragged"),
    ("qwen2_moe", False, "dropless_ragged"),
    ("qwen3_moe", True, "dropless_ragged"),
    ("qwen3_moe", False, "capacity"),  # capacity large enough that nothing drops
])
def test_parity_with_transformers(family, norm, dispatch):
    block = _hf_block(family, norm)
    x = np.random.default_rng(1).normal(size=(B, S, D)).astype(np.float32)
    with torch.no_grad():
        want = block(torch.from_numpy(x.copy())).numpy()
    sd = {f"mlp.{k}": v.numpy() for k, v in block.state_dict().items()}
    params, used = moe_block_from_hf(sd, "mlp", family, E)
    assert used == set(sd)  # every HF tensor consumed
    cf = float(E) if dispatch == "capacity" else None
    cfg = _moe_config(family, norm, dispatch=dispatch, capacity_factor=cf)
    y, aux = jax.jit(MoeBlock(cfg, hidden_size=D).apply)({"params": params}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
    assert float(aux["overflow_pct"]) == 0.0


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_hf_checkpoint_keys_round_trip(family):
    """Export writes the per-expert names transformers saves; loading them back gives the same params."""
    from safetensors.numpy import load_file
    if family == "mixtral":
        from transformers import MixtralConfig as C, MixtralForCausalLM as M
        kw, prefix = dict(num_local_experts=E, intermediate_size=F), "model.layers.0.block_sparse_moe"
    else:
        from transformers import Qwen2MoeConfig as C, Qwen2MoeForCausalLM as M
        kw = dict(num_experts=E, moe_intermediate_size=F, shared_expert_intermediate_size=FS, intermediate_size=F)
        prefix = "model.layers.0.mlp"
    torch.manual_seed(0)
    hf_cfg = C(vocab_size=40, hidden_size=D, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
               num_experts_per_tok=K, **kw)
    model = M(hf_cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        disk = load_file(os.path.join(d, "model.safetensors"))
    disk_moe = {k: v for k, v in disk.items() if k.startswith(prefix + ".")}
    params, used = moe_block_from_hf(disk_moe, prefix, family, E)
    assert used == set(disk_moe)
    # the on-disk per-expert tensors and the fused in-memory ones give the same params
    mem = {k.replace(".mlp.", ".block_sparse_moe.") if family == "mixtral" else k: v.numpy()
           for k, v in model.state_dict().items()}
    params_mem, _ = moe_block_from_hf(mem, prefix, family, E)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, params_mem)
    back = moe_block_to_hf(params, prefix, family)
    assert set(back) == set(disk_moe)
    for k, v in back.items():
        np.testing.assert_array_equal(v, disk_moe[k])
    kwargs = moe_config_kwargs_from_hf(hf_cfg.to_dict())
    assert kwargs["num_experts"] == E and kwargs["moe_intermediate_size"] == F
    MoEConfig(**kwargs)


def test_hf_key_errors():
    with pytest.raises(ValueError, match="missing HF tensor 'p.experts.0.w1.weight'"):
        moe_block_from_hf({"p.gate.weight": np.zeros((E, D))}, "p", "mixtral", E)
    with pytest.raises(ValueError, match=r"p.gate.weight has shape \(4, 20\)"):
        moe_block_from_hf({"p.gate.weight": np.zeros((4, D))}, "p", "mixtral", E)
    with pytest.raises(ValueError, match="model_type='llama'"):
        moe_block_from_hf({}, "p", "llama", E)


# ---------------------------------------------------------------------------------------------
# block features
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def block_and_params():
    cfg = MoEConfig(num_experts=5, num_experts_per_tok=2, moe_intermediate_size=9, norm_topk_prob=False,
                    shared_expert_intermediate_size=11, z_loss_coef=1e-3, aux_loss_coef=0.01)
    blk = MoeBlock(cfg, hidden_size=8)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 6, 8)), jnp.float32)
    params = rand_params(blk, x)["params"]
    return blk, params, x


def test_param_names_and_logical_axes(block_and_params):
    blk, _, x = block_and_params
    boxed = jax.eval_shape(blk.init, jax.random.PRNGKey(0), x)["params"]
    axes = jax.tree_util.tree_map(lambda p: p.names, boxed, is_leaf=lambda p: isinstance(p, nn.Partitioned))
    assert axes["experts"]["gate_proj"] == ("expert", "embed", "mlp")
    assert axes["experts"]["down_proj"] == ("expert", "mlp", "embed")
    assert axes["gate"]["kernel"] == ("embed", None)
    assert boxed["shared_expert_gate"]["kernel"].value.shape == (8, 1)
    assert set(boxed["shared_expert"]) == {"gate_proj", "up_proj", "down_proj"}


def test_temperature_per_call_traced_and_per_token(block_and_params):
    """tau enters as a traced scalar or a per-token array; with norm_topk_prob=False it changes the
    output, a per-token tau equal everywhere matches the scalar, and d output / d tau exists."""
    blk, params, x = block_and_params
    f = lambda tau: blk.apply({"params": params}, x, router_temperature=tau)

    @jax.jit
    def run(t1, t2):
        g = jax.grad(lambda tau: jnp.sum(f(tau)[0]))(0.7 * t1)
        return f(t1), f(t2), f(jnp.full((2, 6), t2)), g

    (y1, a1), (y2, a2), (y3, _), g = run(1.0, 0.5)
    assert float(jnp.max(jnp.abs(y1 - y2))) > 1e-4
    np.testing.assert_allclose(y2, y3, rtol=1e-6, atol=1e-6)
    assert float(a2["route_entropy"]) < float(a1["route_entropy"])  # sharper distribution
    assert np.isfinite(g) and abs(float(g)) > 0  # a controller can learn tau


def test_aux_losses_and_gradients_flow_to_router(block_and_params):
    blk, params, x = block_and_params

    def loss(p):
        y, aux = blk.apply({"params": p}, x)
        return jnp.mean(y ** 2) + aux["loss"], aux

    g, aux = jax.jit(jax.grad(loss, has_aux=True))(params)
    for path in (("gate", "kernel"), ("experts", "gate_proj"), ("shared_expert_gate", "kernel")):
        leaf = g[path[0]][path[1]]
        assert float(jnp.max(jnp.abs(leaf))) > 0, path
    np.testing.assert_allclose(aux["loss"], 0.01 * aux["load_balancing_loss"] + 1e-3 * aux["z_loss"], rtol=1e-6)
    np.testing.assert_allclose(np.sum(aux["load_per_expert"]), 1.0, rtol=1e-6)


def test_dispatch_variants_agree():
    """dropless ragged == dropless pallas (interpret) == capacity without drops; a token mask only
    changes losses/metrics; capacity 0.5 drops at least the assignments that cannot fit."""
    base = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 9, 16)), jnp.float32)
    blk = MoeBlock(MoEConfig(**base), hidden_size=16)
    params = rand_params(blk, x, seed=1)["params"]
    kw = dict(interpret=True, block_m=16, block_n=16, block_k=16)
    mask = jnp.arange(9)[None, :] < jnp.array([[9], [4]])

    @jax.jit
    def run(p):
        v = {"params": p}
        return dict(
            ragged=blk.apply(v, x),
            pallas=MoeBlock(MoEConfig(**base, dispatch="dropless_pallas"), hidden_size=16, gmm_kw=kw).apply(v, x),
            cap=MoeBlock(MoEConfig(**base, capacity_factor=2.0), hidden_size=16).apply(v, x),
            small=MoeBlock(MoEConfig(**base, capacity_factor=0.5), hidden_size=16).apply(v, x),
            masked=blk.apply(v, x, mask=mask))

    out = run(params)
    y_r = out["ragged"][0]
    np.testing.assert_allclose(out["pallas"][0], y_r, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["cap"][0], y_r, rtol=1e-5, atol=1e-5)
    assert float(out["cap"][1]["overflow_pct"]) == 0.0
    # 18 tokens x 2 = 36 assignments, capacity ceil(36 * 0.5 / 4) = 5 per expert: >= 16 dropped
    assert float(out["small"][1]["overflow_pct"]) >= 100 * 16 / 36 - 1e-4
    np.testing.assert_allclose(out["masked"][0], y_r, rtol=1e-6)
    assert float(jnp.sum(out["masked"][1]["expert_counts"])) == 2 * 13


def test_bias_balanced_updates_in_training_only():
    cfg = MoEConfig(num_experts=4, num_experts_per_tok=1, moe_intermediate_size=8, router="bias_balanced",
                    bias_update_rate=0.1)
    blk = MoeBlock(cfg, hidden_size=6)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 10, 6)), jnp.float32)
    v = rand_params(blk, x, seed=4)
    v["moe_stats"]["expert_bias"] = jnp.zeros((4,))
    run = jax.jit(lambda v: (blk.apply(v, x, deterministic=False, mutable=["moe_stats"]),
                             blk.apply(v, x, deterministic=True, mutable=["moe_stats"])))
    ((_, aux), st), ((_, _), st_eval) = run(v)
    counts = np.asarray(aux["expert_counts"])
    want = 0.1 * np.sign(counts.mean() - counts)
    np.testing.assert_allclose(st["moe_stats"]["expert_bias"], want, atol=1e-7)
    np.testing.assert_array_equal(st_eval["moe_stats"]["expert_bias"], np.zeros(4))


def test_hash_router_block_and_jitter_rng():
    cfg = MoEConfig(num_experts=4, num_experts_per_tok=1, moe_intermediate_size=8, router="hash")
    blk = MoeBlock(cfg, hidden_size=6)
    x = jnp.ones((1, 5, 6))
    ids = jnp.array([[3, 3, 9, 9, 3]])
    v = rand_params(blk, x, token_ids=ids)
    y, _ = jax.jit(lambda v: blk.apply(v, x, token_ids=ids))(v)
    np.testing.assert_allclose(y[0, 0], y[0, 1])  # same id and input, same expert
    np.testing.assert_allclose(y[0, 0], y[0, 4])
    with pytest.raises(ValueError, match="needs token_ids"):
        blk.apply(v, x)
    jit_cfg = MoEConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, jitter_noise=0.5)
    jb = MoeBlock(jit_cfg, hidden_size=6)
    xr = jnp.asarray(np.random.default_rng(5).normal(size=(1, 5, 6)), jnp.float32)
    pv = rand_params(jb, xr)
    y_eval, y_eval2, y_tr = jax.jit(lambda v: (
        jb.apply(v, xr)[0], jb.apply(v, xr, deterministic=True)[0],
        jb.apply(v, xr, deterministic=False, rngs={"dropout": jax.random.PRNGKey(7)})[0]))(pv)
    np.testing.assert_array_equal(y_eval, y_eval2)
    assert float(jnp.max(jnp.abs(y_tr - y_eval))) > 1e-6


def test_block_bad_input():
    blk = MoeBlock(MoEConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8), hidden_size=6)
    with pytest.raises(ValueError, match=r"expects x \[batch, seq, 6\]"):
        jax.eval_shape(blk.init, jax.random.PRNGKey(0), jnp.ones((2, 5, 7)))


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,field", [
    (dict(num_experts=4, num_experts_per_tok=5), "num_experts_per_tok"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(capacity_factor=-1.25), "capacity_factor"),
    (dict(router="topk"), "router"),
    (dict(dispatch="capacity"), "capacity_factor"),
    (dict(router="switch", num_experts_per_tok=2), "num_experts_per_tok"),
    (dict(router_temperature=0.0), "router_temperature"),
    (dict(jitter_noise=1.5), "jitter_noise"),
    (dict(num_experts=0), "num_experts"),
    (dict(mlp_only_layers=(-1,)), "mlp_only_layers"),
])
def test_config_validation(kw, field):
    with pytest.raises(ValueError, match=f"invalid config: {field}="):
        MoEConfig(**kw)


def test_config_layer_pattern_and_yaml(tmp_path):
    c = MoEConfig(decoder_sparse_step=2, mlp_only_layers=(3,))
    assert c.moe_layer_mask(6) == (False, True, False, False, False, True)  # HF Qwen2-MoE rule
    c2 = MoEConfig(moe_layers=(0, 4))
    assert c2.moe_layer_mask(5) == (True, False, False, False, True)
    with pytest.raises(ValueError, match="moe_layers"):
        c2.moe_layer_mask(4)
    assert MoEConfig(capacity_factor=1.25).resolved_dispatch == "capacity"
    assert MoEConfig().resolved_dispatch == "dropless_auto"
    p = tmp_path / "moe.yaml"
    c.to_yaml(p)
    assert MoEConfig.from_yaml(p) == c
    repo = os.path.join(os.path.dirname(__file__), "..", "configs", "model_moe.yaml")
    import yaml
    moe = yaml.safe_load(open(repo))["moe"]
    MoEConfig.from_dict(moe)


def test_moe_block_under_nn_scan():
    """The decoder will scan layers: params/moe_stats stacked on a leading axis, aux stacked per layer."""
    cfg = MoEConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, router="bias_balanced")

    class Layer(nn.Module):
        @nn.compact
        def __call__(self, h):
            y, aux = MoeBlock(cfg, hidden_size=6, name="mlp")(h, deterministic=False)
            return h + y, aux

    Scanned = nn.scan(Layer, variable_axes={"params": 0, "moe_stats": 0}, split_rngs={"params": True},
                      length=3, metadata_params={nn.PARTITION_NAME: "layers"})
    x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 5, 6)), jnp.float32)
    model = Scanned()
    v = rand_params(model, x)
    assert v["params"]["mlp"]["experts"]["gate_proj"].shape == (3, 4, 6, 8)
    v["moe_stats"]["mlp"]["expert_bias"] = jnp.zeros((3, 4))
    (h, aux), st = jax.jit(lambda v: model.apply(v, x, mutable=["moe_stats"]))(v)
    assert h.shape == x.shape and aux["load_per_expert"].shape == (3, 4)
    assert st["moe_stats"]["mlp"]["expert_bias"].shape == (3, 4)
    assert float(jnp.max(jnp.abs(st["moe_stats"]["mlp"]["expert_bias"]))) > 0  # updated per layer
