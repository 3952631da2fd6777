"""KL estimators (Schulman's k1/k2/k3, verl names) and the adaptive / fixed KL controllers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iva_jax.rl import AdaptiveKLController, FixedKLController, adaptive_kl_update, kl_penalty


def test_estimators_vs_float64_formulas():
    rng = np.random.default_rng(0)
    lp, ref = rng.normal(size=(3, 7)) - 2, rng.normal(size=(3, 7)) - 2
    log_r = ref - lp
    expect = {
        "k1": -log_r, "kl": -log_r, "abs": np.abs(log_r),
        "k2": 0.5 * log_r ** 2, "mse": 0.5 * log_r ** 2,
        "k3": np.exp(log_r) - log_r - 1,
        # verl: log-ratio clamped to [-20, 20], the estimate to [-10, 10] (clamp active here)
        "low_var_kl": np.clip(np.exp(np.clip(log_r, -20, 20)) - np.clip(log_r, -20, 20) - 1, -10, 10),
    }
    assert np.any(expect["k3"] > 10)
    for name, ref_val in expect.items():
        out = kl_penalty(lp.astype(np.float32), ref.astype(np.float32), name)
        np.testing.assert_allclose(out, ref_val, rtol=2e-5, atol=2e-6, err_msg=name)


def test_k1_and_k3_are_unbiased_k3_nonnegative():
    """Under a ~ pi: E[k1] = E[k3] = KL(pi || ref) exactly (summing over a small vocabulary)."""
    rng = np.random.default_rng(1)
    logits_pi, logits_ref = rng.normal(size=11), rng.normal(size=11)
    lp = logits_pi - np.log(np.exp(logits_pi).sum())
    lr = logits_ref - np.log(np.exp(logits_ref).sum())
    p = np.exp(lp)
    true_kl = np.sum(p * (lp - lr))
    for name in ("k1", "k3"):
        est = np.asarray(kl_penalty(lp.astype(np.float32), lr.astype(np.float32), name), np.float64)
        np.testing.assert_allclose(np.sum(p * est), true_kl, rtol=1e-5, err_msg=name)
    k3 = np.asarray(kl_penalty(lp.astype(np.float32), lr.astype(np.float32), "k3"))
    assert np.all(k3 >= 0)
    k2_mean = np.sum(p * np.asarray(kl_penalty(lp, lr, "k2"), np.float64))
    assert abs(k2_mean - true_kl) > 1e-4  # k2 is biased (here visibly)


def test_gradients_clamps_and_straight_through():
    lp = jnp.array([-1.0, -2.5, -0.3, -40.0, -1.0])
    ref = jnp.array([-1.4, -2.0, -0.3, -1.0, -45.0])
    r = np.exp(np.asarray(ref - lp))
    g3 = jax.grad(lambda x: kl_penalty(x, ref, "k3").sum())(lp)
    np.testing.assert_allclose(g3[:3], 1 - r[:3], rtol=1e-5)  # d/dlogp [r - 1 - log r] = 1 - r
    low = np.asarray(kl_penalty(lp, ref, "low_var_kl"))
    np.testing.assert_allclose(low[:3], np.asarray(kl_penalty(lp, ref, "k3"))[:3], rtol=1e-6)
    np.testing.assert_array_equal(low[3:], 10.0)  # verl's clamp of the estimate
    # a log-ratio of 100 overflows float32 in plain k3; the clamped one stays finite
    assert np.isinf(kl_penalty(jnp.array([-100.0]), jnp.array([0.0]), "k3"))[0]
    assert float(kl_penalty(jnp.array([-100.0]), jnp.array([0.0]), "low_var_kl")[0]) == 10.0
    st = kl_penalty(lp, ref, "k3+")
    np.testing.assert_allclose(st, kl_penalty(lp, ref, "k3"), rtol=1e-6)  # value of k3
    gst = jax.grad(lambda x: kl_penalty(x, ref, "k3+").sum())(lp)
    np.testing.assert_allclose(gst, lp - ref, rtol=1e-6)  # gradient of k2
    g_ref = jax.grad(lambda y: kl_penalty(lp, y, "k1").sum())(ref)
    np.testing.assert_allclose(g_ref, -1.0)


def test_estimator_validation():
    with pytest.raises(ValueError, match="KL estimator"):
        kl_penalty(jnp.zeros(3), jnp.zeros(3), "k4")
    with pytest.raises(ValueError, match="shape"):
        kl_penalty(jnp.zeros(3), jnp.zeros(4), "k1")


def test_adaptive_controller_trajectory_by_hand():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    # step 1: e = clip(9/6 - 1, +-0.2) = 0.2, beta = 0.2 * (1 + 0.2 * 512/10000) = 0.202048
    # step 2: e = 6.6/6 - 1 = 0.1, beta *= 1 + 0.1 * 0.0512        -> 0.20308248576
    # step 3: e = clip(-1) = -0.2, beta *= 1 - 0.2 * 1000/10000 = 0.98 -> 0.1990208360448
    # step 4: e = 0, unchanged
    expected = [0.202048, 0.20308248576, 0.1990208360448, 0.1990208360448]
    got = [ctl.update(9.0, 512), ctl.update(6.6, 512), ctl.update(0.0, 1000), ctl.update(6.0, 100)]
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert ctl.value == got[-1]


def test_adaptive_update_under_jit_and_fixed_controller():
    f = jax.jit(lambda b, kl: adaptive_kl_update(b, kl, 512, 6.0, 10000.0))
    np.testing.assert_allclose(f(jnp.float32(0.2), jnp.float32(9.0)), 0.202048, rtol=1e-6)
    np.testing.assert_allclose(f(jnp.float32(0.2), jnp.float32(5.7)), 0.2 * (1 - 0.05 * 0.0512), rtol=1e-6)
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 512) == 0.05 and fixed.value == 0.05
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, 0.0, 10)
    with pytest.raises(ValueError, match="kl_coef"):
        FixedKLController(-1.0)
