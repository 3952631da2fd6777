"""Training on the fused-projection view (`make_train_step(fuse_projections=True)`): the decode view of the
HF-layout params is built inside the differentiated function, so loss, every gradient leaf (w.r.t. the
HF-named q/k/v, gate/up params) and the AdamW-updated params equal the unfused step's, in float32; also
sharded over data x fsdp x tensor with gradient accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from inference_tiny import tiny_model
from iva_jax.config import ModelConfig
from iva_jax.moe import MoEConfig
from iva_jax.parallel import make_mesh
from iva_jax.train.config import TrainConfig
from iva_jax.train.step import create_train_state, fused_view_apply, make_train_step

B, S = 3, 13
LLAMA = ModelConfig(vocab_size=83, hidden_size=36, intermediate_size=60, num_hidden_layers=3, num_attention_heads=6,
                    num_key_value_heads=2, max_position_embeddings=64)  # GQA 6/2, head_dim 6, scanned layers
QWEN_MOE = LLAMA.replace(  # qkv bias (Qwen2), a dense and an MoE layer (unrolled layout), shared expert
    num_hidden_layers=2, attention_bias=True,
    moe=MoEConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=14, decoder_sparse_step=2,
                  shared_expert_intermediate_size=22))
CASES = {"llama_gqa": LLAMA, "qwen2_moe": QWEN_MOE}


def record_grads() -> optax.GradientTransformation:
    """Passes updates through and keeps the last ones in its state (the step's exact gradients)."""
    return optax.GradientTransformation(lambda p: jax.tree_util.tree_map(jnp.zeros_like, p),
                                        lambda g, s, p=None: (g, g))


def _batch(vocab, B=B):
    rng = np.random.default_rng(7)
    ids = rng.integers(0, vocab, (B, S)).astype(np.int32)
    labels = np.where(rng.random((B, S)) < 0.2, -100, ids).astype(np.int32)
    seg = np.ones((B, S), np.int32)
    seg[1, 6:] = 2  # packed row
    pos = np.tile(np.arange(S), (B, 1)).astype(np.int32)
    pos[1, 6:] = np.arange(S - 6)
    return {"input_ids": ids, "labels": labels, "segment_ids": seg, "positions": pos}


def _dots(step, state, batch) -> int:
    return str(jax.make_jaxpr(step.jitted)(state, batch)).count("dot_general")


@pytest.fixture(scope="module", params=list(CASES))
def runs(request):
    cfg = CASES[request.param]
    model, params = tiny_model(cfg, seed=11, std=0.15)
    tc = TrainConfig(steps=10, batch_size=B, seq_len=S, compute_dtype="float32", lr=1e-3, warmup_steps=0,
                     z_loss_coef=1e-3, aux_loss_coef=1.0)
    tx = optax.chain(record_grads(), optax.adamw(1e-3, weight_decay=0.1))
    batch = _batch(cfg.vocab_size)
    out = {}
    for fused in (False, True):
        step = make_train_step(model.apply, tx, tc, donate=False, fuse_projections=fused)
        state, _ = create_train_state(params, tx, jax.random.PRNGKey(0))
        new, metrics = step(state, batch)
        out[fused] = dict(state=new, metrics=jax.device_get(metrics), dots=_dots(step, state, batch))
    return {"cfg": cfg, "model": model, "params": params, **out}


def _close(a, b, what):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.abs(b).max(), 1e-30)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale, err_msg=what)


def _leaf(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


def test_fused_step_runs_fewer_matmuls(runs):
    """The fused step really uses the view: q/k/v (and dense gate/up) are one dot_general each."""
    view, vparams = runs["model"].decode_view(runs["params"], rows=B * S)
    assert view.fused_qkv and view.fused_gate_up
    assert runs[True]["dots"] < runs[False]["dots"], (runs[True]["dots"], runs[False]["dots"])


def test_loss_and_every_gradient_leaf_match(runs):
    f, u = runs[True], runs[False]
    for k in ("loss", "ce", "aux_loss", "z_loss", "grad_norm"):
        _close(f["metrics"][k], u["metrics"][k], k)
    assert f["metrics"]["aux_loss"] > 0 or runs["cfg"].moe is None
    gf, gu = f["state"].opt_state[0], u["state"].opt_state[0]  # record_grads' state: the step's gradients
    # the gradient stays in the HF layout (no qkv_proj / gate_up_proj leaves), every leaf nonzero and equal
    assert jax.tree_util.tree_structure(gf) == jax.tree_util.tree_structure(runs["params"])
    for path, a in jax.tree_util.tree_leaves_with_path(gf):
        b = _leaf(gu, path)
        assert np.abs(np.asarray(b)).max() > 0, jax.tree_util.keystr(path)
        _close(a, b, "grad " + jax.tree_util.keystr(path))


def test_adamw_step_updates_the_same_params(runs):
    """Params after one AdamW step agree where the step is well conditioned.  Adam's first step moves each
    param by lr * g / (|g| + eps): where 0 < |g| is within a few orders of eps (1e-8) the rounding differences of
    the two gradients (equal to ~1e-5 of the largest) are amplified, so there only the step's bound is checked."""
    f, u = runs[True]["state"], runs[False]["state"]
    grads = u.opt_state[0]  # record_grads' state: the unfused step's gradients
    assert jax.tree_util.tree_structure(f.params) == jax.tree_util.tree_structure(runs["params"])
    moved, ill = 0.0, 0
    for path, a in jax.tree_util.tree_leaves_with_path(f.params):
        b, p0 = np.asarray(_leaf(u.params, path), np.float64), np.asarray(_leaf(runs["params"], path), np.float64)
        g = np.asarray(_leaf(grads, path))
        well = (np.abs(g) > 1e-5) | (g == 0)  # |g| >= 1000 eps, or no gradient (weight decay alone)
        a = np.asarray(a, np.float64)
        _close(a[well], b[well], "param " + jax.tree_util.keystr(path))
        assert np.all(np.abs(a - p0) <= 1.01e-3 * (1 + 0.1 * np.abs(p0))), jax.tree_util.keystr(path)
        ill += int((~well).sum())
        moved = max(moved, float(np.abs(b - p0).max()))
    assert moved > 5e-4  # the step changed the params (lr 1e-3)
    assert ill < 0.02 * sum(x.size for x in jax.tree_util.tree_leaves(f.params))  # the check covers ~all params


def test_fuse_projections_needs_a_bound_model_apply():
    tc = TrainConfig(steps=1, batch_size=B, seq_len=S, compute_dtype="float32")
    with pytest.raises(ValueError, match="decode_view"):
        make_train_step(lambda v, x, **kw: None, optax.sgd(1.0), tc, fuse_projections=True)
    with pytest.raises(ValueError, match="decode_view"):
        fused_view_apply(object())


def test_sharded_fused_step_with_microbatches_equals_single_device_unfused():
    """data x fsdp x tensor = 2x2x2 (q/k/v kernels split over heads), 2 microbatches: same loss and gradients."""
    model, params = tiny_model(LLAMA, seed=5, std=0.15)
    params = jax.device_get(params)  # host copy: the steps donate the states built from it
    logical = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"]
    tc = TrainConfig(steps=10, batch_size=8, seq_len=S, microbatches=2, compute_dtype="float32")
    tx = optax.chain(record_grads(), optax.sgd(1e-3))
    batch = _batch(LLAMA.vocab_size, B=8)
    out = {}
    for fused, mesh in ((False, None), (True, make_mesh(2, 2, 2, 1))):
        state, sh = create_train_state(params, tx, jax.random.PRNGKey(0), mesh=mesh, logical=logical)
        step = make_train_step(model.apply, tx, tc, mesh=mesh, state_shardings=sh, fuse_projections=fused)
        new, metrics = step(state, batch)
        out[fused] = (jax.device_get(new.opt_state[0]), jax.device_get(metrics))
    q = new.params["layers"]["self_attn"]["q_proj"]["kernel"]  # HF layout, split over fsdp x tensor
    assert q.sharding.spec == P(None, "fsdp", "tensor")
    for k in ("loss", "ce", "grad_norm", "tokens"):
        _close(out[True][1][k], out[False][1][k], k)
    for path, a in jax.tree_util.tree_leaves_with_path(out[True][0]):
        _close(a, _leaf(out[False][0], path), "grad " + jax.tree_util.keystr(path))
