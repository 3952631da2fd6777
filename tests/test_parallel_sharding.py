"""iva_jax.parallel: mesh config, logical shardings with divisibility fallback, sharded == single-device step."""

import logging

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from iva_jax.parallel import (MeshConfig, batch_sharding, initialize_distributed, make_mesh, put_batch,
                              shard_params, single_device_mesh, spec_for_names, tree_shardings)
from iva_jax.train.config import TrainConfig
from iva_jax.train.step import create_train_state, init_train_state, make_train_step, make_tx_and_schedule
from iva_jax.train.tiny import TinyConfig, tiny_host_params, tiny_init_fn


def test_mesh_config_builds_and_checks_device_count():
    assert jax.device_count() == 8
    mesh = MeshConfig(data=-1, fsdp=2, tensor=2).build()
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}
    with pytest.raises(ValueError, match="multiply to 12, but 8 devices"):
        MeshConfig(data=3, fsdp=2, tensor=2).build()
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="tensor=0"):
        MeshConfig(tensor=0)
    with pytest.raises(ValueError, match=r"unknown MeshConfig keys \['pipeline'\]; valid keys"):
        MeshConfig.from_dict({"pipeline": 2})
    assert MeshConfig.from_yaml(MeshConfig(data=2, fsdp=4).to_yaml()) == MeshConfig(data=2, fsdp=4)
    assert dict(single_device_mesh().shape) == {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}


def test_initialize_distributed_single_process_is_noop():
    assert initialize_distributed() == (0, 1)


def test_spec_divisibility_fallback_replicates_and_logs(caplog):
    mesh = make_mesh(2, 2, 2, 1)
    assert spec_for_names(("embed", "mlp"), (24, 40), mesh) == P("fsdp", "tensor")
    with caplog.at_level(logging.WARNING, logger="iva_jax.parallel.sharding"):
        spec = spec_for_names(("vocab", "embed"), (61, 24), mesh, what="test/odd_vocab")
    assert spec == P(None, "fsdp")
    assert "size 61 is not divisible" in caplog.text and "test/odd_vocab" in caplog.text
    # batch over (data, fsdp): 6 rows do not split 4 ways -> keep data only (2 ways)
    assert batch_sharding(mesh, batch_size=6).spec == P("data")
    assert batch_sharding(mesh, batch_size=8).spec == P(("data", "fsdp"))
    # a mesh axis name used directly (nn.with_partitioning style) passes through
    assert spec_for_names(("tensor", None), (4, 3), mesh) == P("tensor")
    with pytest.raises(ValueError, match="2 axis names"):
        spec_for_names(("embed", "mlp"), (3,), mesh)


def test_tree_shardings_follow_logical_axes():
    model, init = tiny_init_fn(TinyConfig())
    mesh = make_mesh(2, 2, 2, 1)
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    sh = tree_shardings(abstract, mesh)
    assert sh["layers"]["q_proj"]["kernel"].spec == P(None, "fsdp", "tensor")  # (layers, embed, q_heads)
    assert sh["layers"]["down_proj"]["kernel"].spec == P(None, "tensor", "fsdp")
    assert sh["layers"]["input_layernorm"]["scale"].spec == P()
    assert sh["embed_tokens"].spec == P(None, "fsdp")  # vocab 67 does not divide by tensor=2
    # init_train_state builds params and optimizer state directly in that layout
    tx, _ = make_tx_and_schedule(TrainConfig(steps=10))
    state, state_sh = init_train_state(init, tx, jax.random.PRNGKey(0), mesh=mesh)
    assert state.params["layers"]["up_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    assert state_sh.params["layers"]["up_proj"]["kernel"].spec == P(None, "fsdp", "tensor")
    nu = state.opt_state.inner_state[2][0].nu
    assert nu["layers"]["o_proj"]["kernel"].sharding.spec == P(None, "tensor", "fsdp")
    host = jax.device_get(state.params)
    again = shard_params(host, sh)
    assert again["lm_head"]["kernel"].sharding.spec == P("fsdp")
    np.testing.assert_array_equal(jax.device_get(again["lm_head"]["kernel"]), host["lm_head"]["kernel"])
    x = put_batch({"input_ids": np.zeros((8, 5), np.int32)}, batch_sharding(mesh, batch_size=8))
    assert x["input_ids"].sharding.spec == P(("data", "fsdp"))


@pytest.fixture(scope="module")
def sharded_vs_single():
    """Three steps of the same run on one device and on a data x fsdp x tensor = 2x2x2 mesh."""
    tcfg = TinyConfig(aux_loss_coef=0.01)
    model, logical, params = tiny_host_params(tcfg, seed=1)
    cfg = TrainConfig(steps=10, batch_size=8, seq_len=12, microbatches=2, lr=3e-3, warmup_steps=1, eps=1e-6,
                      compute_dtype="float32")
    tx, sched = make_tx_and_schedule(cfg)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(3):
        ids = rng.integers(0, tcfg.vocab_size, (8, 12)).astype(np.int32)
        seg = np.repeat(np.array([[1] * 7 + [2] * 5]), 8, 0).astype(np.int32)
        pos = np.concatenate([np.arange(7), np.arange(5)])[None].repeat(8, 0).astype(np.int32)
        labels = np.where(rng.random((8, 12)) < 0.2, -100, ids).astype(np.int32)
        batches.append({"input_ids": ids, "labels": labels, "segment_ids": seg, "positions": pos})
    out = {}
    for name, mesh in (("single", None), ("sharded", make_mesh(2, 2, 2, 1))):
        state, shardings = create_train_state(params, tx, jax.random.PRNGKey(1), mesh=mesh, logical=logical)
        step = make_train_step(model.apply, tx, cfg, schedule=sched, mesh=mesh, state_shardings=shardings)
        metrics = []
        for b in batches:
            state, m = step(state, b)
            metrics.append(jax.device_get(m))
        out[name] = (state, metrics)
    return out


def test_sharded_step_equals_single_device(sharded_vs_single):
    s1, m1 = sharded_vs_single["single"]
    s8, m8 = sharded_vs_single["sharded"]
    for a, b in zip(m1, m8):
        for k in ("loss", "ce", "aux_loss", "grad_norm", "tokens", "lr"):
            np.testing.assert_allclose(b[k], a[k], rtol=2e-6, atol=1e-7, err_msg=k)
    leaves1 = jax.tree_util.tree_leaves_with_path(jax.device_get(s1.params))
    leaves8 = dict(jax.tree_util.tree_leaves_with_path(jax.device_get(s8.params)))
    for path, v in leaves1:
        # Adam divides by sqrt(v): a coordinate whose gradient is at roundoff level moves by up to ~lr
        # on sign noise, so params are compared at 1% of one step (lr = 3e-3); gradients agree at 2e-6.
        np.testing.assert_allclose(leaves8[path], v, rtol=1e-5, atol=3e-5, err_msg=jax.tree_util.keystr(path))
    # the sharded run really was sharded: parameters and Adam moments split over fsdp x tensor
    assert s8.params["layers"]["q_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    mu = s8.opt_state.inner_state[2][0].mu
    assert mu["layers"]["q_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    assert int(s8.step) == 3 and int(s1.step) == 3
    assert m1[-1]["loss"] < m1[0]["loss"]  # it trains
