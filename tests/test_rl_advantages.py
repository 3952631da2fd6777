"""GAE (RLax fixtures + float64 loops, masks, padding), GRPO advantages, KL-penalized rewards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iva_jax.rl import (
    gae_advantages_and_returns,
    grpo_advantages,
    kl_penalized_rewards,
    truncated_generalized_advantage_estimation as gae,
)

# RLax multistep_test.py fixture (TruncatedGeneralizedAdvantageEstimationTest).
R_T = np.array([[0.0, 0.0, 1.0, 0.0, -0.5], [0.0, 0.0, 0.0, 0.0, 1.0]], np.float32)
V_T = np.array([[1.0, 4.0, -3.0, -2.0, -1.0, -1.0], [-3.0, -2.0, -1.0, 0.0, 5.0, -1.0]], np.float32)
DISCOUNT_T = np.array([[0.99, 0.99, 0.99, 0.99, 0.99], [0.9, 0.9, 0.9, 0.0, 0.9]], np.float32)
EXPECTED = {
    1.0: [[-1.45118, -4.4557, 2.5396, 0.5249, -0.49], [3.0, 2.0, 1.0, 0.0, -4.9]],
    0.7: [[-0.676979, -5.248167, 2.4846, 0.6704, -0.49], [2.2899, 1.73, 1.0, 0.0, -4.9]],
    0.4: [[0.56731, -6.042, 2.3431, 0.815, -0.49], [1.725, 1.46, 1.0, 0.0, -4.9]],
}


def np_gae(r, d, lam, v):
    """float64 loop: A_t = delta_t + d_t lam_t A_{t+1}, delta_t = r_t + d_t v_{t+1} - v_t."""
    r, d, v = (np.asarray(x, np.float64) for x in (r, d, v))
    lam = np.broadcast_to(np.asarray(lam, np.float64), r.shape)
    adv, acc = np.zeros_like(r), 0.0
    for t in reversed(range(len(r))):
        acc = r[t] + d[t] * v[t + 1] - v[t] + d[t] * lam[t] * acc
        adv[t] = acc
    return adv


def np_masked_gae(r, d, lam, v, m):
    """Reference for masked GAE: run the loop on the valid steps only (bootstrap v[T])."""
    idx = np.flatnonzero(m)
    out = np.zeros(len(r))
    if len(idx):
        vv = np.concatenate([np.asarray(v, np.float64)[idx], [v[-1]]])
        out[idx] = np_gae(np.asarray(r)[idx], np.asarray(d)[idx], np.broadcast_to(lam, np.shape(r))[idx], vv)
    return out


@pytest.mark.parametrize("lambda_", [1.0, 0.7, 0.4])
def test_rlax_fixture_vmap_and_batched(lambda_):
    vmapped = jax.vmap(gae, in_axes=(0, 0, None, 0))(R_T, DISCOUNT_T, lambda_, V_T)
    batched = gae(R_T, DISCOUNT_T, lambda_, V_T)
    np.testing.assert_allclose(vmapped, EXPECTED[lambda_], atol=1e-3)  # fixture has 4-5 digits
    np.testing.assert_allclose(batched, vmapped, rtol=1e-6, atol=1e-6)
    for b in range(2):
        np.testing.assert_allclose(batched[b], np_gae(R_T[b], DISCOUNT_T[b], lambda_, V_T[b]), rtol=1e-5, atol=1e-5)


def test_issue_fixture_and_array_lambda():
    r, v = R_T[0], V_T[0]
    out = gae(r, 0.99 * np.ones(5, np.float32), 1.0, v)
    np.testing.assert_allclose(out, [-1.45118, -4.4557, 2.5396, 0.5249, -0.49], atol=1e-4)
    lam_arr = np.full((2, 5), 0.9, np.float32)
    np.testing.assert_allclose(gae(R_T, DISCOUNT_T, lam_arr, V_T), gae(R_T, DISCOUNT_T, 0.9, V_T), rtol=1e-6)
    # per-step lambda really is per step
    lam_var = np.array([0.1, 0.9, 0.5, 1.0, 0.3], np.float32)
    np.testing.assert_allclose(gae(r, DISCOUNT_T[0], lam_var, v), np_gae(r, DISCOUNT_T[0], lam_var, v), rtol=1e-5)


def test_terminal_discount_cuts_episode():
    # cross-episode case: discount 0 at t=1 ends an episode (published in the torch RLax port).
    out = gae(np.ones(4, np.float32), np.array([0.9, 0.0, 0.9, 0.9], np.float32), 0.95, np.full(5, 0.5, np.float32))
    np.testing.assert_allclose(out, [1.3775, 0.5, 1.76225, 0.95], rtol=1e-5)


def test_random_against_float64_loop():
    rng = np.random.default_rng(0)
    r, v = rng.normal(size=(3, 13)), rng.normal(size=(3, 14))
    d = rng.uniform(0.5, 1.0, size=(3, 13)) * (rng.uniform(size=(3, 13)) > 0.2)
    out = gae(r.astype(np.float32), d.astype(np.float32), 0.83, v.astype(np.float32))
    for b in range(3):
        np.testing.assert_allclose(out[b], np_gae(r[b], d[b], 0.83, v[b]), rtol=2e-5, atol=2e-5)


def test_masks_padding_and_middle_gaps_do_not_leak():
    rng = np.random.default_rng(1)
    B, T = 4, 11
    r, v = rng.normal(size=(B, T)), rng.normal(size=(B, T + 1))
    d = rng.uniform(0.8, 1.0, size=(B, T))
    lengths = [11, 7, 1, 0]
    m = np.arange(T)[None, :] < np.array(lengths)[:, None]
    m[0, 3:5] = False  # a gap in the middle (e.g. tool-observation tokens)
    r_pad, v_pad, d_pad = r.copy(), v.copy(), d.copy()
    r_pad[~m] = np.nan
    v_pad[:, :-1][~m] = np.inf
    d_pad[~m] = np.nan
    out = np.asarray(gae(r_pad.astype(np.float32), d_pad.astype(np.float32), 0.9, v_pad.astype(np.float32), mask_t=m))
    assert np.all(np.isfinite(out))
    for b in range(B):
        np.testing.assert_allclose(out[b], np_masked_gae(r[b], d[b], 0.9, v[b], m[b]), rtol=2e-5, atol=2e-5)
    assert np.all(out[~m] == 0)

    # gradients: finite, exactly zero on padded inputs
    def f(r_, v_):
        return jnp.sum(gae(r_, jnp.asarray(d_pad, jnp.float32), 0.9, v_, mask_t=m) ** 2)

    gr, gv = jax.grad(f, argnums=(0, 1))(jnp.asarray(r_pad, jnp.float32), jnp.asarray(v_pad, jnp.float32))
    assert np.all(np.isfinite(gr)) and np.all(np.isfinite(gv))
    assert np.all(np.asarray(gr)[~m] == 0) and np.all(np.asarray(gv)[:, :-1][~m] == 0)
    assert np.any(np.asarray(gr)[m] != 0)


def test_stop_target_gradients():
    r, v = jnp.asarray(R_T[0]), jnp.asarray(V_T[0])
    g = jax.grad(lambda v_: jnp.sum(gae(r, 0.99, 0.9, v_, stop_target_gradients=True)))(v)
    np.testing.assert_array_equal(g, 0)
    g2 = jax.grad(lambda v_: jnp.sum(gae(r, 0.99, 0.9, v_)))(v)
    assert np.any(np.asarray(g2) != 0)


def test_gae_validation():
    with pytest.raises(ValueError, match="values shape"):
        gae(R_T, DISCOUNT_T, 1.0, V_T[:, :-1])
    with pytest.raises(ValueError, match="discount_t"):
        gae(R_T, DISCOUNT_T[:, :3], 1.0, V_T)


def np_trl_gae(rewards, values, lengths, gamma, lam):
    """TRL PPOTrainer's loop on right-padded responses: values/rewards zeroed after the end."""
    B, T = rewards.shape
    adv = np.zeros((B, T))
    for b in range(B):
        rr, vv = np.zeros(T), np.zeros(T)
        rr[:lengths[b]], vv[:lengths[b]] = rewards[b, :lengths[b]], values[b, :lengths[b]]
        last = 0.0
        for t in reversed(range(T)):
            nv = vv[t + 1] if t < T - 1 else 0.0
            last = rr[t] + gamma * nv - vv[t] + gamma * lam * last
            adv[b, t] = last
    return adv


def test_token_level_gae_matches_trl_loop():
    rng = np.random.default_rng(2)
    B, T, lengths = 3, 9, [9, 5, 2]
    m = np.arange(T)[None] < np.array(lengths)[:, None]
    rewards, values = rng.normal(size=(B, T)), rng.normal(size=(B, T))
    rewards_pad = np.where(m, rewards, 123.0)
    adv, ret = gae_advantages_and_returns(rewards_pad.astype(np.float32), values.astype(np.float32), m, 0.97, 0.9)
    ref = np_trl_gae(rewards, values, lengths, 0.97, 0.9)
    np.testing.assert_allclose(np.where(m, adv, 0), np.where(m, ref, 0), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(ret, np.where(m, ref + values, 0), rtol=2e-5, atol=2e-5)
    assert np.all(np.asarray(adv)[~m] == 0)
    g = jax.grad(lambda v_: jnp.sum(gae_advantages_and_returns(rewards_pad, v_, m, 0.97, 0.9)[1]))(jnp.asarray(values))
    np.testing.assert_array_equal(g, 0)  # targets carry no gradient


def np_grpo(rewards, G, scale, eps):
    g = rewards.reshape(-1, G).astype(np.float64)
    c = g - g.mean(1, keepdims=True)
    if scale == "none":
        return c.reshape(-1)
    std = np.repeat(g.std(1, ddof=1), G) if scale == "group" else np.full(rewards.size, rewards.std(ddof=1))
    return c.reshape(-1) / (std + eps)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_advantages_vs_numpy(scale):
    rng = np.random.default_rng(3)
    rewards = rng.normal(size=15).astype(np.float32)
    rewards[5:10] = 0.7  # a group of identical rewards: std 0 -> eps
    out = np.asarray(grpo_advantages(rewards, 5, scale, epsilon=1e-6))
    np.testing.assert_allclose(out, np_grpo(rewards, 5, scale, 1e-6), rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[5:10], 0.0)
    np.testing.assert_allclose(out.reshape(3, 5).sum(1), 0, atol=1e-5)  # group-centred


def test_grpo_binary_rewards_and_edge_cases():
    r = np.array([1, 0, 0, 0, 1, 1, 1, 1], np.float32)  # groups of 4: one right; all right
    out = np.asarray(grpo_advantages(r, 4))
    s = np.std([1, 0, 0, 0], ddof=1)
    np.testing.assert_allclose(out[:4], (np.array([1, 0, 0, 0]) - 0.25) / (s + 1e-6), rtol=1e-5)
    np.testing.assert_array_equal(out[4:], 0)
    np.testing.assert_array_equal(grpo_advantages(r, 1), r)
    with pytest.raises(ValueError, match="divide"):
        grpo_advantages(r, 3)
    with pytest.raises(ValueError, match="scale_rewards"):
        grpo_advantages(r, 4, "sequence")
    with pytest.raises(ValueError, match="1-D"):
        grpo_advantages(r.reshape(2, 4), 4)


def test_kl_penalized_rewards():
    rng = np.random.default_rng(4)
    B, T, lengths = 3, 6, [6, 3, 0]
    m = np.arange(T)[None] < np.array(lengths)[:, None]
    lp, ref = rng.normal(size=(B, T)) - 2, rng.normal(size=(B, T)) - 2
    scores = np.array([1.5, -0.5, 2.0])
    rewards, kl = kl_penalized_rewards(scores, lp.astype(np.float32), ref.astype(np.float32), m, 0.1)
    expect = np.where(m, -0.1 * (lp - ref), 0.0)
    for b, L in enumerate(lengths):
        if L:
            expect[b, L - 1] += scores[b]
    np.testing.assert_allclose(rewards, expect, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kl, np.where(m, lp - ref, 0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="scores"):
        kl_penalized_rewards(scores[:2], lp, ref, m, 0.1)
