"""LoRA: only adapters train (base bit-identical), merge == adapted forward == float64 formula, sharding names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from iva_jax.parallel import make_mesh, tree_shardings
from iva_jax.train.config import TrainConfig
from iva_jax.train.lora import LoRAConfig, init_lora, lora_apply, lora_param_count, lora_targets, merge_lora
from iva_jax.train.step import create_train_state, make_train_step, make_tx_and_schedule
from iva_jax.train.tiny import TinyConfig, tiny_host_params

LCFG = LoRAConfig(rank=3, alpha=6.0, targets="q_proj|v_proj")


@pytest.fixture(scope="module")
def trained():
    tcfg = TinyConfig()
    model, logical, base = tiny_host_params(tcfg, seed=11)
    adapters = init_lora(base, LCFG, jax.random.PRNGKey(0))
    adapters0 = jax.device_get(adapters)  # the state takes ownership; the step donates its buffers
    cfg = TrainConfig(steps=10, batch_size=4, seq_len=9, lr=1e-2, warmup_steps=0, compute_dtype="float32",
                      weight_decay=0.0)
    tx, sched = make_tx_and_schedule(cfg)
    apply = lora_apply(model.apply, LCFG)
    state, _ = create_train_state(adapters, tx, jax.random.PRNGKey(1), frozen=jax.device_put(base))
    step = make_train_step(apply, tx, cfg, schedule=sched)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(3):
        state, m = step(state, {"input_ids": rng.integers(0, tcfg.vocab_size, (4, 9)).astype(np.int32)})
        losses.append(float(m["loss"]))
    return dict(model=model, logical=logical, base=base, adapters0=adapters0, state=state,
                losses=losses, apply=apply)


def test_only_adapters_train(trained):
    t = trained
    st = t["state"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(st.frozen), t["base"])  # base untouched
    ad = jax.device_get(st.params)
    assert set(ad["layers"]) == {"q_proj", "v_proj"}
    for mod in ("q_proj", "v_proj"):
        a0, b0 = t["adapters0"]["layers"][mod]["lora_a"], t["adapters0"]["layers"][mod]["lora_b"]
        assert not np.any(b0) and np.abs(ad["layers"][mod]["lora_b"]).max() > 1e-4  # B starts at 0 and moves
        assert np.abs(ad["layers"][mod]["lora_a"] - a0).max() > 1e-6
    assert lora_param_count(ad) == 2 * 2 * (24 * 3 + 3 * 24)  # 2 modules x 2 layers x (A + B)
    assert all(np.isfinite(t["losses"]))


def test_merge_equals_adapted_forward_and_float64_formula(trained):
    t = trained
    ad = jax.device_get(t["state"].params)
    merged = jax.device_get(merge_lora(t["base"], ad, LCFG))
    for mod in ("q_proj", "v_proj"):
        w = t["base"]["layers"][mod]["kernel"].astype(np.float64)
        a, b = ad["layers"][mod]["lora_a"].astype(np.float64), ad["layers"][mod]["lora_b"].astype(np.float64)
        want = w + (6.0 / 3) * np.einsum("lir,lro->lio", a, b)
        np.testing.assert_allclose(merged["layers"][mod]["kernel"], want, rtol=1e-6, atol=1e-7)
    for mod in ("k_proj", "o_proj", "up_proj", "down_proj"):
        np.testing.assert_array_equal(merged["layers"][mod]["kernel"], t["base"]["layers"][mod]["kernel"])
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 67, (2, 9)), jnp.int32)
    fwd = jax.jit(lambda v: t["model"].apply(v, ids))
    adapted = jax.jit(lambda p, f: t["apply"]({"params": p, "frozen": f}, ids))
    np.testing.assert_allclose(fwd({"params": merged}), adapted(ad, t["base"]), rtol=1e-6, atol=1e-6)
    # at initialisation (B = 0) the adapted model is exactly the base model
    np.testing.assert_allclose(adapted(t["adapters0"], t["base"]), fwd({"params": t["base"]}), rtol=1e-6, atol=1e-6)


def test_qlora_dequantize_hook_and_errors(trained):
    t = trained
    ad = jax.device_get(t["state"].params)
    halved = jax.tree_util.tree_map(lambda x: x / 2, t["base"])
    seen = []

    def dequant(path, w):
        seen.append("/".join(path))
        return w * 2

    m1 = merge_lora(halved, ad, LCFG, dequantize=dequant)
    m2 = merge_lora(t["base"], ad, LCFG)
    np.testing.assert_allclose(m1["layers"]["q_proj"]["kernel"], m2["layers"]["q_proj"]["kernel"], rtol=1e-6)
    assert sorted(seen) == ["layers/q_proj/kernel", "layers/v_proj/kernel"]
    with pytest.raises(ValueError, match=r"match no Dense kernel; kernels are \[.*layers/q_proj/kernel"):
        lora_targets(t["base"], LCFG.replace(targets="gate_proj"))
    with pytest.raises(ValueError, match="targets='\\('"):
        LoRAConfig(targets="(")
    with pytest.raises(ValueError, match="expects variables"):
        t["apply"]({"params": ad}, jnp.zeros((1, 3), jnp.int32))


def test_adapters_inherit_logical_axes_for_sharding(trained):
    boxed = init_lora(trained["logical"], LCFG, jax.random.PRNGKey(0))
    a = boxed["layers"]["q_proj"]["lora_a"]
    b = boxed["layers"]["q_proj"]["lora_b"]
    assert a.names == ("layers", "embed", None) and b.names == ("layers", None, "q_heads")
    sh = tree_shardings(boxed, make_mesh(2, 2, 2, 1))
    assert sh["layers"]["q_proj"]["lora_a"].spec == P(None, "fsdp")
    assert sh["layers"]["q_proj"]["lora_b"].spec == P(None, None, "tensor")
