"""HRM training: a resumed run equals the uninterrupted one; the train step's pieces fit together."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iva_jax.hrm import tasks
from iva_jax.hrm import train as T
from iva_jax.hrm.config import HRMConfig, HRMTrainConfig
from iva_jax.hrm.data import PuzzleBatcher
from iva_jax.hrm.model import HRMACT

B = 10
CFG = HRMConfig(batch_size=B, seq_len=16, vocab_size=6, num_puzzle_identifiers=1, puzzle_emb_ndim=16,
                H_cycles=1, L_cycles=2, H_layers=1, L_layers=1, hidden_size=16, num_heads=2, mlp_multiple_of=8,
                halt_max_steps=3, halt_exploration_prob=0.5, forward_dtype="float32")
TC = HRMTrainConfig(model=CFG, total_steps=6, lr=3e-3, lr_warmup_steps=2, lr_min_ratio=0.1,
                    puzzle_emb_lr=1e-2, weight_decay=0.1)


@pytest.fixture(scope="module")
def run():
    splits = tasks.build_sudoku(4, 24, 6, num_aug=2, seed=0)
    (tr, trm), (te, tem) = splits["train"], splits["test"]
    model = HRMACT(CFG)
    step = jax.jit(T.make_train_step(model, TC))
    batches = PuzzleBatcher(tr, trm, B, seed=3)
    return model, step, batches, PuzzleBatcher(te, tem, B)


def _train(step, state, batches, start, stop):
    losses = []
    for i in range(start, stop):
        state, sums = step(state, batches.train_batch(i))
        losses.append(float(sums["loss"]))
    return state, losses


def test_resume_equals_uninterrupted(run, tmp_path):
    model, step, batches, _ = run
    fresh = lambda: T.init_train_state(model, TC, jax.random.PRNGKey(0))  # noqa: E731
    full, full_losses = _train(step, fresh(), batches, 0, 6)

    half, first = _train(step, fresh(), batches, 0, 3)
    T.save_checkpoint(T.checkpoint_manager(tmp_path / "ckpt"), half, 3, {"note": "half"})
    # a new manager (as a new process would make) restores into a freshly initialised template
    restored, extra, k = T.restore_checkpoint(T.checkpoint_manager(tmp_path / "ckpt"), fresh())
    assert k == 3 and extra == {"note": "half"} and int(restored.step) == 3
    assert bool(jnp.any(restored.carry.steps != 0))  # the ACT carry travels with the checkpoint
    resumed, second = _train(step, restored, batches, 3, 6)

    assert first + second == full_losses  # bit-exact on CPU
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert len(set(full_losses)) == 6 and all(np.isfinite(full_losses))


def test_train_step_updates_everything_it_should(run):
    model, step, batches, test_batches = run
    s0 = T.init_train_state(model, TC, jax.random.PRNGKey(1))
    s1, sums = step(s0, batches.train_batch(0))
    m = T.train_metrics(jax.device_get(sums), B)
    assert int(s1.step) == 1 and m["lr"] == pytest.approx(3e-3 / 2)  # warmup at the 1-based step
    assert np.all(np.asarray(s1.carry.steps) == 1) and m["halt_rate"] == 0.0  # exploration min 2, limit 3
    # buffers are fixed; params move; the (single-id) puzzle row moves by sign-SGD: +-lr*emb_lr/2
    assert np.array_equal(np.asarray(s1.buffers["H_init"]), np.asarray(s0.buffers["H_init"]))
    assert not np.array_equal(np.asarray(s1.params["lm_head"]["kernel"]), np.asarray(s0.params["lm_head"]["kernel"]))
    np.testing.assert_allclose(np.abs(np.asarray(s1.puzzle_table)), 1e-2 / 2, rtol=1e-5)
    # evaluation runs every sample to the step limit and counts all labelled test examples
    ev = T.evaluate(jax.jit(T.make_eval_step(model)), s1, test_batches.eval_batches())
    assert ev["count"] == 6 and ev["avg_steps"] == 3 and 0 <= ev["accuracy"] <= 1
    assert {"adaptive_exact_accuracy", "adaptive_avg_steps", "halt_rate"} <= set(ev)


def _float_scatter_adds(jaxpr) -> list:
    """Floating-point scatter-adds anywhere in a (closed) jaxpr, sub-jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scatter-add" and jnp.issubdtype(eqn.outvars[0].aval.dtype, jnp.floating):
            found.append(str(eqn.outvars[0].aval))
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _float_scatter_adds(inner)
    return found


def test_train_step_has_no_float_scatter_add():
    # GPU float scatter-adds with many repeated indices (token embedding grads over a tiny vocab,
    # the single Sudoku puzzle id) are contended CAS loops: they made the H100 step ~20x slow.
    cfg = CFG.replace(forward_dtype="bfloat16", vocab_size=5)
    model = HRMACT(cfg)
    state = T.init_train_state(model, TC.replace(model=cfg), jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    batch = {"inputs": jnp.asarray(rng.integers(0, 5, (B, 16)), jnp.int32),
             "labels": jnp.asarray(rng.integers(0, 5, (B, 16)), jnp.int32),
             "puzzle_identifiers": jnp.zeros((B,), jnp.int32)}
    jaxpr = jax.make_jaxpr(T.make_train_step(model, TC.replace(model=cfg)))(state, batch)
    assert _float_scatter_adds(jaxpr.jaxpr) == []
    # the token-embedding gradient through the bf16 forward still accumulates in float32
    from iva_jax.hrm.model import embed_lookup

    ids = rng.integers(0, 5, (37, 29))
    ct = np.asarray(jnp.asarray(rng.normal(size=(37, 29, 16)), jnp.bfloat16).astype(jnp.float32))  # bf16-exact
    table = jnp.asarray(rng.normal(size=(5, 16)), jnp.float32)
    g = jax.grad(lambda t: jnp.sum(embed_lookup(t, jnp.asarray(ids)).astype(jnp.bfloat16).astype(jnp.float32)
                                   * jnp.asarray(ct)))(table)
    want = np.zeros((5, 16))
    np.add.at(want, ids, ct.astype(np.float64))
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5, atol=1e-5)
