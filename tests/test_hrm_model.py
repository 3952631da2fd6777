"""HRM-ACT-v1: the one-step gradient, carry replacement, halting (training / eval modes), Q targets."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iva_jax.hrm.config import HRMConfig, load_train_config
from iva_jax.hrm.model import (HRMACT, HRMCarry, HRMInner, InnerCarry, act_halt, attention, q_continue_target,
                               rope_cos_sin)
from iva_jax.hrm.sparse_embedding import signsgd_update

B, S = 6, 5
CFG = HRMConfig(batch_size=B, seq_len=S, vocab_size=7, num_puzzle_identifiers=4, puzzle_emb_ndim=20,
                H_cycles=2, L_cycles=2, H_layers=1, L_layers=1, hidden_size=16, num_heads=2, mlp_multiple_of=8,
                halt_max_steps=3, halt_exploration_prob=0.0, forward_dtype="float32")


@pytest.fixture(scope="module")
def setup():
    model = HRMACT(CFG)
    variables, _ = model.init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.normal(size=(4, 20)), jnp.float32)
    batch = {"inputs": jnp.asarray(rng.integers(1, 7, (B, S)), jnp.int32),
             "labels": jnp.asarray(rng.integers(1, 7, (B, S)), jnp.int32),
             "puzzle_identifiers": jnp.asarray([0, 3, 1, 3, 2, 0], jnp.int32)}
    # a q_head that reads the state (the reference's zero init would make every q equal)
    params = variables["params"]
    params = dict(params, q_head={"kernel": jnp.asarray(rng.normal(size=(16, 2)), jnp.float32),
                                  "bias": jnp.zeros(2)})
    return model, {"params": params, "buffers": variables["buffers"]}, table, batch


def with_q_bias(variables, bias):
    p = dict(variables["params"], q_head={"kernel": jnp.zeros((16, 2)), "bias": jnp.asarray(bias, jnp.float32)})
    return {"params": p, "buffers": variables["buffers"]}


def test_init_matches_reference_conventions(setup):
    model, variables, _, _ = setup
    v, table = model.init(jax.random.PRNGKey(0))
    assert np.all(np.asarray(v["params"]["q_head"]["kernel"]) == 0)
    assert np.all(np.asarray(v["params"]["q_head"]["bias"]) == -5)
    assert table.shape == (4, 20) and np.all(np.asarray(table) == 0)
    h0 = np.asarray(v["buffers"]["H_init"])
    assert h0.shape == (16,) and np.all(np.abs(h0) <= 2.0 / 0.8796 + 1e-6) and h0.std() > 0.3
    assert set(v) == {"params", "buffers"} and set(v["buffers"]) == {"H_init", "L_init"}
    assert sum(x.size for x in jax.tree.leaves(v["params"])) == CFG.num_params()
    # the plain-transformer baseline has the same parameter count (same blocks, no recurrence)
    tf = HRMACT(CFG.variant("transformer"))
    shapes = jax.eval_shape(lambda: tf.init(jax.random.PRNGKey(0))[0]["params"])
    assert sum(x.size for x in jax.tree.leaves(shapes)) == CFG.num_params()
    specs = model.logical_axes()  # logical names for the sharding rules; scanned layers get "layers"
    assert tuple(specs["H_level"]["layers"]["self_attn"]["q_proj"]["kernel"]) == ("layers", "embed", "q_heads")
    assert tuple(specs["embed_tokens"]["embedding"]) == ("vocab", "embed")
    one = CFG.variant("hrm_1cycle")
    assert (one.H_cycles, one.L_cycles, one.halt_max_steps) == (1, 1, 1)


def _sub(variables, name):
    return lambda z, inj, cs: HRMInner(CFG).apply(variables, z, inj, cs,
                                                  method=lambda m, *a: getattr(m, name)(*a))


def test_one_step_gradient(setup):
    """Gradients equal those of running only the last L and H updates on a detached state, and differ
    from full backprop through all cycles; nothing reaches the incoming carry."""
    model, variables, table, batch = setup
    inner = HRMInner(CFG)
    rows = table[batch["puzzle_identifiers"]]
    H0, L0 = variables["buffers"]["H_init"], variables["buffers"]["L_init"]
    T = CFG.total_len
    zH0 = jnp.broadcast_to(H0, (B, T, 16)) + 0.1 * jnp.sin(jnp.arange(B * T * 16.0).reshape(B, T, 16))
    zL0 = jnp.broadcast_to(L0, (B, T, 16))
    w = jnp.asarray(np.random.default_rng(1).normal(size=(B, S, 7)), jnp.float32)
    cs = rope_cos_sin(T, CFG.head_dim, CFG.rope_theta)

    def objective(logits, qh, qc):
        return jnp.sum(logits * w) + jnp.sum(qh * jnp.arange(B)) - jnp.sum(qc)

    def model_loss(params, rows, zH, zL):
        v = {"params": params, "buffers": variables["buffers"]}
        _, logits, qh, qc = inner.apply(v, InnerCarry(zH, zL), batch["inputs"], rows)
        return objective(logits, qh, qc)

    def manual_loss(params, rows, zH, zL, truncate):
        v = {"params": params, "buffers": variables["buffers"]}
        L, H = _sub(v, "L_level"), _sub(v, "H_level")
        x = inner.apply(v, batch["inputs"], rows, method=HRMInner.embed)
        order = (["L"] * CFG.L_cycles + ["H"]) * CFG.H_cycles  # the reference's update order
        for i, u in enumerate(order):
            if truncate and i == len(order) - 2:  # before the last L and H updates
                zH, zL = jax.lax.stop_gradient(zH), jax.lax.stop_gradient(zL)
            if u == "L":
                zL = L(zL, zH + x, cs)
            else:
                zH = H(zH, zL, cs)
        logits = inner.apply(v, zH, method=lambda m, z: m.lm_head(z))[:, CFG.puzzle_emb_len:]
        q = inner.apply(v, zH[:, 0], method=lambda m, z: m.q_head(z))
        return objective(logits, q[:, 0], q[:, 1])

    @jax.jit
    def all_grads(params, rows, zH, zL):
        g_model = jax.grad(model_loss, argnums=(0, 1, 2, 3))(params, rows, zH, zL)
        g_trunc = jax.grad(manual_loss, argnums=(0, 1))(params, rows, zH, zL, True)
        g_full = jax.grad(manual_loss, argnums=(0, 1))(params, rows, zH, zL, False)
        return g_model, g_trunc, g_full

    (gp, grow, gzH, gzL), (tp, trow), (fp, frow) = all_grads(variables["params"], rows, zH0, zL0)
    assert np.all(np.asarray(gzH) == 0) and np.all(np.asarray(gzL) == 0)
    np.testing.assert_allclose(np.asarray(grow), np.asarray(trow), rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(tp)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(grow)).max() > 1e-3
    # full backprop through time is a different gradient (the test can tell them apart)
    assert np.abs(np.asarray(grow) - np.asarray(frow)).max() > 1e-3 * np.abs(np.asarray(frow)).max()
    l_kernel = lambda g: np.asarray(g["L_level"]["layers"]["mlp"]["down_proj"]["kernel"])  # noqa: E731
    assert np.abs(l_kernel(gp) - l_kernel(fp)).max() > 1e-4


def test_carry_replacement_for_halted_slots(setup):
    model, variables, table, batch = setup
    rng = np.random.default_rng(2)
    old = HRMCarry(inner=InnerCarry(z_H=jnp.asarray(rng.normal(size=(B, CFG.total_len, 16)), jnp.float32),
                                    z_L=jnp.asarray(rng.normal(size=(B, CFG.total_len, 16)), jnp.float32)),
                   steps=jnp.asarray([2, 1, 2, 0, 1, 2], jnp.int32),
                   halted=jnp.asarray([True, False, True, False, False, True]),
                   current_data={k: v[::-1] for k, v in batch.items()})
    new = jax.jit(model.reset)(variables, old, batch)
    h = np.asarray(old.halted)
    H0, L0 = np.asarray(variables["buffers"]["H_init"]), np.asarray(variables["buffers"]["L_init"])
    assert np.all(np.asarray(new.inner.z_H)[h] == H0) and np.all(np.asarray(new.inner.z_L)[h] == L0)
    assert np.array_equal(np.asarray(new.inner.z_H)[~h], np.asarray(old.inner.z_H)[~h])
    assert np.array_equal(np.asarray(new.steps), np.where(h, 0, np.asarray(old.steps)))
    for k in batch:
        want = np.where(h.reshape((-1,) + (1,) * (batch[k].ndim - 1)), batch[k], old.current_data[k])
        assert np.array_equal(np.asarray(new.current_data[k]), want)
    with pytest.raises(ValueError, match="seq_len"):
        model.reset(variables, old, dict(batch, inputs=batch["inputs"][:, :3]))


def test_act_halt_semantics():
    steps = jnp.asarray([1, 1, 2, 3, 2, 3], jnp.int32)
    qh = jnp.asarray([1.0, -1.0, 1.0, -1.0, -1.0, -1.0])
    qc = jnp.zeros(6)
    f = jax.jit(act_halt, static_argnames=("halt_max_steps", "exploration_prob", "training", "adaptive_eval"))
    key = jax.random.PRNGKey(0)
    # evaluation, reference rule: only the step limit
    h, last = f(steps, qh, qc, halt_max_steps=3, exploration_prob=0.0, training=False, rng=key)
    assert list(np.asarray(h)) == [False, False, False, True, False, True] and np.array_equal(h, last)
    # evaluation, adaptive: also q_halt > q_continue
    h, _ = f(steps, qh, qc, halt_max_steps=3, exploration_prob=0.0, training=False, adaptive_eval=True, rng=key)
    assert list(np.asarray(h)) == [True, False, True, True, False, True]
    # training without exploration: the same rule
    h, _ = f(steps, qh, qc, halt_max_steps=3, exploration_prob=0.0, training=True, rng=key)
    assert list(np.asarray(h)) == [True, False, True, True, False, True]
    # training, always exploring: never before a random minimum in [2, max]; the limit still halts
    n = 4000
    keys = jax.random.split(key, 1)[0]
    s = jnp.tile(jnp.arange(1, 6, dtype=jnp.int32), n)
    h, _ = f(s, jnp.ones(5 * n), jnp.zeros(5 * n), halt_max_steps=5, exploration_prob=1.0, training=True, rng=keys)
    rate = np.asarray(h).reshape(n, 5).mean(0)  # P(halt at step k) = P(min_halt <= k), min_halt ~ U{2..5}
    np.testing.assert_allclose(rate, [0.0, 0.25, 0.5, 0.75, 1.0], atol=0.03)
    h, _ = f(s, jnp.ones(5 * n), jnp.zeros(5 * n), halt_max_steps=5, exploration_prob=0.3, training=True, rng=keys)
    np.testing.assert_allclose(np.asarray(h).reshape(n, 5).mean(0)[0], 0.7, atol=0.03)
    # one step allowed: always halt, no exploration
    h, _ = f(steps, qh, qc, halt_max_steps=1, exploration_prob=1.0, training=True, rng=key)
    assert np.all(np.asarray(h))


def test_segment_q_target_and_training_halting(setup):
    model, variables, table, batch = setup
    rows = table[batch["puzzle_identifiers"]]
    H0, L0 = variables["buffers"]["H_init"], variables["buffers"]["L_init"]
    T = CFG.total_len
    carry = HRMCarry(inner=InnerCarry(z_H=jnp.broadcast_to(H0, (B, T, 16)), z_L=jnp.broadcast_to(L0, (B, T, 16))),
                     steps=jnp.asarray([0, 1, 2, 0, 1, 2], jnp.int32), halted=jnp.zeros(B, bool),
                     current_data=batch)
    seg = jax.jit(lambda v, c, r, k: model.segment(v, c, r, rng=k, training=True))
    new, out = seg(variables, carry, rows, jax.random.PRNGKey(3))
    assert np.array_equal(np.asarray(new.steps), [1, 2, 3, 1, 2, 3])
    # the target comes from a separate pass of the inner model over the *new* carry
    _, _, nqh, nqc = jax.jit(model.inner.apply)(variables, new.inner, batch["inputs"], rows)
    is_last = np.asarray(new.steps) >= CFG.halt_max_steps
    nqh, nqc = np.asarray(nqh, np.float64), np.asarray(nqc, np.float64)
    want = 1 / (1 + np.exp(-np.where(is_last, nqh, np.maximum(nqh, nqc))))
    np.testing.assert_allclose(np.asarray(out["target_q_continue"]), want, rtol=1e-5)
    assert len(set(np.round(want, 4))) > 2  # a q_head that distinguishes samples
    qh, qc = np.asarray(out["q_halt_logits"]), np.asarray(out["q_continue_logits"])
    assert np.array_equal(np.asarray(new.halted), is_last | (qh > qc))  # exploration_prob = 0
    np.testing.assert_allclose(np.asarray(q_continue_target(jnp.asarray(is_last), jnp.asarray(nqh),
                                                            jnp.asarray(nqc))), want, rtol=1e-6)


def test_evaluate_modes(setup):
    model, variables, table, batch = setup
    ev = jax.jit(model.evaluate, static_argnums=3)
    halt = with_q_bias(variables, [5.0, -5.0])
    cont = with_q_bias(variables, [-5.0, 5.0])
    out = ev(halt, table, batch, "adaptive")
    assert int(out["segments_run"]) == 1 and np.all(np.asarray(out["steps"]) == 1)
    # the answer of a sample that halts after one segment is the one-segment prediction
    one = jax.jit(lambda v, t, b: model(v, t, model.initial_carry(b), b)[1]["logits"].argmax(-1))
    assert np.array_equal(np.asarray(out["preds"]), np.asarray(one(halt, table, batch)))
    out = ev(cont, table, batch, "adaptive")
    assert int(out["segments_run"]) == 3 and np.all(np.asarray(out["steps"]) == 3)
    out = ev(halt, table, batch, "max_steps")
    assert int(out["segments_run"]) == 3 and np.all(np.asarray(out["steps"]) == 3)
    assert np.all(np.asarray(out["steps_adaptive"]) == 1)
    # mixed: a q_head reading the state halts different samples at different steps; answers freeze
    out = ev(variables, table, batch, "max_steps")
    ad = ev(variables, table, batch, "adaptive")
    assert np.array_equal(np.asarray(out["steps_adaptive"]), np.asarray(ad["steps"]))
    assert np.array_equal(np.asarray(out["preds_adaptive"]), np.asarray(ad["preds"]))
    with pytest.raises(ValueError, match="eval_mode"):
        model.evaluate(variables, table, batch, "sometimes")


def test_signsgd_matches_numpy():
    rng = np.random.default_rng(4)
    table = rng.normal(size=(7, 5)).astype(np.float32)
    ids = np.array([3, 1, 3, 6, 1, 3], np.int32)
    g = rng.normal(size=(6, 5)).astype(np.float32)
    g[3] = 0.0  # id 6: zero gradient, still decayed
    lr, wd = 0.01, 0.1
    got = np.asarray(jax.jit(signsgd_update)(jnp.asarray(table), jnp.asarray(ids), jnp.asarray(g), lr, wd))
    want = table.astype(np.float64).copy()
    for i in np.unique(ids):
        gs = g[ids == i].astype(np.float64).sum(0)
        want[i] = want[i] * (1 - lr * wd) - lr * np.sign(gs)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert np.array_equal(got[[0, 2, 4, 5]], table[[0, 2, 4, 5]])  # absent ids untouched


def test_config_validation():
    with pytest.raises(ValueError, match="hidden_size"):
        HRMConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="eval_mode"):
        HRMConfig(eval_mode="sometimes")
    with pytest.raises(ValueError, match="halt_exploration_prob"):
        HRMConfig(halt_exploration_prob=1.5)
    with pytest.raises(ValueError, match="halt_max_steps"):
        HRMConfig(arch="transformer", halt_max_steps=4)
    with pytest.raises(ValueError, match="variant"):
        CFG.variant("rnn")
    assert HRMConfig.from_yaml(CFG.to_yaml()) == CFG
    assert CFG.puzzle_emb_len == 2 and CFG.total_len == 7 and CFG.intermediate_size == 48
    tc = load_train_config(Path(__file__).parents[1] / "configs" / "hrm.yaml",
                           ["model.hidden_size=128", "lr=0.002", "task_size=4"])
    assert tc.model.hidden_size == 128 and tc.model.H_cycles == 2 and tc.lr == 0.002 and tc.task_size == 4
    with pytest.raises(ValueError, match="unknown HRMConfig keys"):
        load_train_config(Path(__file__).parents[1] / "configs" / "hrm.yaml", ["model.hiden_size=128"])


def test_attention_matches_numpy_and_kernels():
    rng = np.random.default_rng(5)
    q, k, v = (rng.normal(size=(2, 7, 3, 8)).astype(np.float32) for _ in range(3))
    logits = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), k) / np.sqrt(8)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    want = np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)
    for impl in ("xla", "auto"):  # non-causal: every position sees every other
        got = jax.jit(attention, static_argnums=3)(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), impl)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
