"""Stablemax cross-entropy and the ACT loss head against float64 numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iva_jax.hrm.losses import (IGNORE_LABEL_ID, act_loss, eval_metrics, log_stablemax, reduce_metrics,
                                softmax_cross_entropy, stablemax_cross_entropy)


def np_s(x):
    return np.where(x >= 0, x + 1.0, 1.0 / (1.0 - np.minimum(x, 0.0)))


def np_ds(x):
    return np.where(x >= 0, 1.0, 1.0 / (1.0 - np.minimum(x, 0.0)) ** 2)


def np_stablemax_ce(x, y, ignore=IGNORE_LABEL_ID):
    """Loss [...] and d(sum loss)/dx in float64: loss = -log s(x_y) + log sum_j s(x_j)."""
    x = x.astype(np.float64)
    s, ds = np_s(x), np_ds(x)
    S = s.sum(-1, keepdims=True)
    valid = y != ignore
    yy = np.where(valid, y, 0)
    onehot = np.eye(x.shape[-1])[yy]
    loss = -np.log((s * onehot).sum(-1) / S[..., 0])
    grad = ds / S - onehot * ds / s
    return np.where(valid, loss, 0.0), np.where(valid[..., None], grad, 0.0)


@jax.jit
def _loss_and_grad(x, y):
    loss = stablemax_cross_entropy(x, y)
    return loss, jax.grad(lambda z: stablemax_cross_entropy(z, y).sum())(x)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(3, 7, 11)) * 4).astype(np.float32)
    x[0, 0, :3] = [0.0, -0.0, 1e-7]  # the branch point
    y = rng.integers(0, 11, size=(3, 7))
    y[1, 2] = IGNORE_LABEL_ID
    y[2, :] = IGNORE_LABEL_ID
    return x, y


def test_stablemax_float64_values_and_grads(data):
    x, y = data
    want, want_g = np_stablemax_ce(x, y)
    with jax.enable_x64(True):
        xs = jnp.asarray(x, jnp.float64)
        got, g = _loss_and_grad(xs, jnp.asarray(y))
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(g), want_g, rtol=1e-12, atol=1e-12)
        # float32 input is widened to float64 when x64 is on (as the reference's .to(float64))
        assert jax.eval_shape(stablemax_cross_entropy, jnp.asarray(x), jnp.asarray(y)).dtype == jnp.float64


def test_stablemax_float32_fallback(data):
    x, y = data
    want, want_g = np_stablemax_ce(x, y)
    got, g = _loss_and_grad(jnp.asarray(x), jnp.asarray(y))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(np.asarray(g), want_g, rtol=2e-5, atol=2e-6)
    assert np.all(np.asarray(got)[2] == 0) and np.asarray(got)[1, 2] == 0
    # large logits stay finite (linear growth, no exp overflow)
    big = jnp.asarray([[1e5, -1e5, 3.0]], jnp.float32)
    assert np.isfinite(np.asarray(jax.jit(stablemax_cross_entropy)(big, jnp.asarray([1])))).all()
    np.testing.assert_allclose(np.exp(np.asarray(jax.jit(log_stablemax)(jnp.asarray(x)))).sum(-1), 1.0, rtol=1e-5)


def test_softmax_ce_matches_numpy(data):
    x, y = data
    xd = x.astype(np.float64)
    lse = np.log(np.exp(xd - xd.max(-1, keepdims=True)).sum(-1)) + xd.max(-1)
    want = lse - np.take_along_axis(xd, np.where(y == IGNORE_LABEL_ID, 0, y)[..., None], -1)[..., 0]
    want = np.where(y == IGNORE_LABEL_ID, 0, want)
    got = jax.jit(softmax_cross_entropy)(jnp.asarray(x), jnp.asarray(y))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def np_bce(x, t):
    return np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))


def test_act_loss_matches_reference_formula():
    rng = np.random.default_rng(1)
    B, S, V = 5, 6, 4
    logits = rng.normal(size=(B, S, V)).astype(np.float32)
    labels = logits.argmax(-1)
    labels[1, 3] = (labels[1, 3] + 1) % V  # sample 1 not exactly right
    labels[2, :] = IGNORE_LABEL_ID  # no labels
    labels[3, 0] = IGNORE_LABEL_ID
    q_halt = np.array([0.5, -1.0, 2.0, -0.2, 0.0], np.float32)
    q_cont = rng.normal(size=B).astype(np.float32)
    target = rng.uniform(size=B).astype(np.float32)
    halted = np.array([True, True, False, True, True])
    steps = np.array([3, 2, 1, 4, 5], np.int32)
    outputs = {k: jnp.asarray(v) for k, v in dict(logits=logits, q_halt_logits=q_halt, q_continue_logits=q_cont,
                                                    target_q_continue=target).items()}
    act = jax.jit(act_loss, static_argnums=4)
    loss, m = act(outputs, jnp.asarray(labels), jnp.asarray(halted), jnp.asarray(steps), "softmax")

    mask = labels != IGNORE_LABEL_ID
    counts = mask.sum(-1)
    xd = logits.astype(np.float64)
    lse = np.log(np.exp(xd).sum(-1))
    tok = np.where(mask, lse - np.take_along_axis(xd, np.where(mask, labels, 0)[..., None], -1)[..., 0], 0)
    lm = (tok / np.maximum(counts, 1)[:, None]).sum()
    seq_correct = ((logits.argmax(-1) == labels) & mask).sum(-1) == counts
    qh = np_bce(q_halt.astype(np.float64), seq_correct).sum()
    qc = np_bce(q_cont.astype(np.float64), target.astype(np.float64)).sum()
    np.testing.assert_allclose(float(loss), lm + 0.5 * (qh + qc), rtol=1e-5)
    valid = halted & (counts > 0)  # samples 0, 1, 3, 4
    assert float(m["count"]) == valid.sum() == 4
    assert float(m["exact_accuracy"]) == (valid & seq_correct).sum() == 3
    np.testing.assert_allclose(float(m["accuracy"]), 1 + 5 / 6 + 1 + 1, rtol=1e-6)
    assert float(m["q_halt_accuracy"]) == (valid & ((q_halt >= 0) == seq_correct)).sum()
    assert float(m["steps"]) == steps[valid].sum()
    r = reduce_metrics(jax.device_get(m), B)
    assert r["halt_rate"] == halted.mean() and r["exact_accuracy"] == 3 / 4
    # without a bootstrapped target there is no q_continue term
    no_t = {k: v for k, v in outputs.items() if k != "target_q_continue"}
    loss2, m2 = act(no_t, jnp.asarray(labels), jnp.asarray(halted), jnp.asarray(steps), "softmax")
    np.testing.assert_allclose(float(loss2), lm + 0.5 * qh, rtol=1e-5)
    assert float(m2["q_continue_loss"]) == 0.0
    with pytest.raises(ValueError, match="loss_type"):
        act_loss(outputs, jnp.asarray(labels), jnp.asarray(halted), jnp.asarray(steps), "mse")


def test_eval_metrics_counts():
    labels = np.array([[2, 3], [4, IGNORE_LABEL_ID], [IGNORE_LABEL_ID, IGNORE_LABEL_ID]])
    preds = np.array([[2, 3], [5, 0], [0, 0]])
    m = jax.jit(eval_metrics, static_argnums=4)(jnp.asarray(preds), jnp.asarray(labels), jnp.asarray([3, 8, 8]),
                                                jnp.asarray([1.0, -1.0, 0.0]), 8)
    assert float(m["count"]) == 2 and float(m["exact_accuracy"]) == 1 and float(m["accuracy"]) == 1.0
    assert float(m["q_halt_accuracy"]) == 2 and float(m["halted_early"]) == 1 and float(m["steps"]) == 11
