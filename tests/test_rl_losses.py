"""Policy/value losses (RLax fixtures, verl formulas in float64 numpy, gradients per clip region),
masked statistics (TRL masked_whiten) and loss aggregation modes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iva_jax.rl import (
    agg_loss,
    clipped_surrogate_pg_loss,
    clipped_value_loss,
    entropy_from_logits,
    entropy_loss,
    logprobs_from_logits,
    masked_entropy,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_gradient_loss,
    ppo_policy_loss,
)

def jitted(fn, **static):
    """jit with keyword hyper-parameters bound (one compile instead of many eager op compiles)."""
    return jax.jit(functools.partial(fn, **static))


LOGITS = np.array([[1.0, 1.0, 1.0], [2.0, 0.0, 0.0], [-1.0, -2.0, -3.0]], np.float32)


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


# ---------------------------------------------------------------- RLax published fixtures
def test_rlax_clipped_surrogate_fixture():
    old_logits = np.array([[1.0, 1.0, 1.0], [2.0, 0.0, 0.0], [-3.0, -2.0, -1.0]], np.float32)
    actions = np.array([0, 1, 2])
    adv = np.array([0.3, 0.2, 0.1], np.float32)
    lp = jax.jit(logprobs_from_logits)
    ratios = np.exp(lp(LOGITS, actions) - lp(old_logits, actions))
    fn = jax.jit(jax.vmap(functools.partial(clipped_surrogate_pg_loss, epsilon=0.2)))
    out = fn(np.stack([ratios, ratios]), np.stack([adv, -adv]))
    np.testing.assert_allclose(out, [-0.17117467, 0.19333333], atol=1e-4)


def test_rlax_policy_gradient_and_entropy_fixtures():
    logits = np.stack([LOGITS, LOGITS + 1.0])
    w = np.array([-2.0, 2.0, 0.0], np.float32)
    weights = np.stack([w, w - 1.0])
    adv = np.array([0.3, 0.2, 0.1], np.float32)
    actions = np.array([[0, 1, 2], [0, 0, 0]])
    pg = jax.jit(jax.vmap(policy_gradient_loss))(logits, actions, np.stack([adv, -adv]), weights)
    np.testing.assert_allclose(pg, [0.0788835088, 0.327200909], atol=1e-4)
    ent = jax.jit(jax.vmap(entropy_loss))(logits, weights)
    np.testing.assert_allclose(ent, [0.288693, 1.15422], atol=1e-4)


# ---------------------------------------------------------------- logits helpers
def test_logprobs_and_entropy_vs_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)) * 3
    labels = rng.integers(0, 7, size=(2, 5))
    ref_lp = np.take_along_axis(np_log_softmax(logits), labels[..., None], -1)[..., 0]
    np.testing.assert_allclose(logprobs_from_logits(logits.astype(np.float32), labels), ref_lp, rtol=1e-5, atol=1e-5)
    p = np.exp(np_log_softmax(logits))
    ref_h = -(p * np_log_softmax(logits)).sum(-1)
    np.testing.assert_allclose(entropy_from_logits(logits.astype(np.float32)), ref_h, rtol=1e-5, atol=1e-5)
    m = np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], bool)
    np.testing.assert_allclose(masked_entropy(logits.astype(np.float32), m), ref_h[m].mean(), rtol=1e-5)
    with pytest.raises(ValueError, match="labels"):
        logprobs_from_logits(logits, labels[:, :3])


def test_entropy_with_masked_vocab_is_finite():
    logits = jnp.array([[0.3, -jnp.inf, 1.2, -jnp.inf]])
    h = entropy_from_logits(logits)
    p = np.exp(np_log_softmax([0.3, 1.2]))
    np.testing.assert_allclose(h, [-(p * np.log(p)).sum()], rtol=1e-6)
    g = jax.jit(jax.grad(lambda x: entropy_from_logits(x).sum()))(logits)
    assert np.all(np.isfinite(g))


# ---------------------------------------------------------------- PPO policy loss (verl)
def np_policy_loss(lp, old, adv, mask, el, eh, c, mode, norm_len=None):
    """verl compute_policy_loss in float64, element by element."""
    B, T = lp.shape
    adv = np.broadcast_to(adv[:, None] if adv.ndim == 1 else adv, (B, T))
    loss = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            r = np.exp(np.clip(lp[b, t] - old[b, t], -20, 20))
            a = adv[b, t]
            l1, l2 = -a * r, -a * min(max(r, 1 - el), 1 + eh)
            v = max(l1, l2)
            if c is not None and a < 0:
                v = min(v, -a * c)
            loss[b, t] = v
    return np_agg(loss, mask, mode, norm_len)


def np_agg(loss, mask, mode, norm_len=None):
    mask = mask.astype(bool)
    if mode == "token-mean":
        return loss[mask].sum() / max(mask.sum(), 1)
    sums = np.array([loss[b][mask[b]].sum() for b in range(loss.shape[0])])
    if mode == "seq-mean-token-sum":
        return sums.mean()
    if mode == "seq-mean-token-mean":
        return np.mean([s / max(mask[b].sum(), 1) for b, s in enumerate(sums)])
    return sums.sum() / (loss.shape[0] * (norm_len or loss.shape[1]))


@pytest.fixture(scope="module")
def ppo_batch():
    rng = np.random.default_rng(1)
    B, T = 3, 7
    old = rng.normal(size=(B, T)) - 1.5
    lp = old + rng.normal(size=(B, T)) * 0.6  # ratios spread well beyond the clip range
    adv = rng.normal(size=(B, T))
    mask = np.arange(T)[None] < np.array([7, 4, 5])[:, None]
    return lp, old, adv, mask


@pytest.mark.parametrize("mode,clip", [
    ("token-mean", (0.2, None, None)),               # symmetric PPO
    ("seq-mean-token-mean", (0.2, 0.28, None)),      # DAPO clip-higher, GRPO aggregation
    ("token-mean", (0.2, 0.28, 3.0)),                # + dual clip
    ("seq-mean-token-sum", (0.15, 0.28, 3.0)),
    ("seq-mean-token-sum-norm", (0.2, 0.28, 2.0)),   # Dr. GRPO normalizer
])
def test_ppo_policy_loss_vs_numpy(ppo_batch, mode, clip):
    lp, old, adv, mask = ppo_batch
    el, eh, c = clip
    f32 = lambda x: np.asarray(x, np.float32)
    f = jitted(ppo_policy_loss, clip_ratio_low=el, clip_ratio_high=eh, clip_ratio_c=c, loss_agg_mode=mode)
    loss, metrics = f(f32(lp), f32(old), f32(adv), mask)
    ref = np_policy_loss(lp, old, adv, mask, el, eh if eh is not None else el, c, mode)
    np.testing.assert_allclose(loss, ref, rtol=2e-5, atol=1e-6)
    assert 0 < float(metrics["clipfrac"]) < 1
    np.testing.assert_allclose(metrics["ppo_kl"], np.mean((old - lp)[mask]), rtol=1e-5)
    # sequence-level advantages ([batch], GRPO) broadcast over tokens
    loss_seq, _ = f(f32(lp), f32(old), f32(adv[:, 0]), mask)
    ref_seq = np_policy_loss(lp, old, adv[:, 0], mask, el, eh or el, c, mode)
    np.testing.assert_allclose(loss_seq, ref_seq, rtol=2e-5, atol=1e-6)


def test_ppo_gradient_per_clip_region():
    """d loss / d log_prob is -A r / N on active tokens and exactly 0 on the clipped side."""
    el, eh, c = 0.2, 0.28, 3.0
    # (ratio, advantage): region
    cases = [
        (1.05, 1.0),   # inside: active
        (1.5, 1.0),    # A > 0, r > 1 + eh: clipped, no gradient
        (0.5, 1.0),    # A > 0, r < 1 - el: unclipped min -> active
        (0.5, -1.0),   # A < 0, r < 1 - el: clipped, no gradient
        (2.0, -1.0),   # A < 0, 1 + eh < r < c: active (standard PPO keeps it)
        (4.0, -1.0),   # A < 0, r > c: dual-clipped, no gradient
        (0.9, -0.5),   # inside: active
    ]
    ratio = np.array([[r for r, _ in cases]])
    adv = np.array([[a for _, a in cases]], np.float32)
    old = np.full_like(ratio, -2.0)
    lp = jnp.asarray(old + np.log(ratio), jnp.float32)
    pad = np.zeros((1, 2))  # two padded tokens holding garbage
    lp_full = jnp.concatenate([lp, jnp.asarray([[jnp.nan, 50.0]])], axis=1)
    old_full = np.concatenate([old, pad], 1).astype(np.float32)
    adv_full = np.concatenate([adv, [[jnp.nan, 7.0]]], 1).astype(np.float32)
    mask = np.concatenate([np.ones_like(ratio), pad], 1).astype(bool)

    def f(x, c):
        return ppo_policy_loss(x, old_full, adv_full, mask, el, eh, c, "token-mean")

    (loss, m), g = jax.jit(jax.value_and_grad(f, has_aux=True), static_argnums=1)(lp_full, c)
    active = np.array([1, 0, 1, 0, 1, 0, 1], bool)
    expect = np.where(active, -adv[0] * ratio[0], 0.0) / len(cases)
    assert np.isfinite(loss)
    np.testing.assert_allclose(np.asarray(g)[0, :7], expect, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(g)[0, 7:], 0)
    np.testing.assert_allclose(m["clipfrac"], 2 / 7, rtol=1e-6)  # cases 1 and 3
    np.testing.assert_allclose(m["clipfrac_lower"], 1 / 7, rtol=1e-6)  # case 5
    # without dual clip the A<0, r>c token is active again
    g2, _ = jax.jit(jax.grad(f, has_aux=True), static_argnums=1)(lp_full, None)
    np.testing.assert_allclose(np.asarray(g2)[0, 5], 1.0 * 4.0 / 7, rtol=1e-5)


def test_rlax_surrogate_gradient_zero_on_clipped_side():
    ratios = jnp.array([1.5, 0.5, 1.1])
    adv = jnp.array([1.0, -1.0, 1.0])
    g = jax.jit(jax.grad(lambda r: clipped_surrogate_pg_loss(r, adv, 0.2)))(ratios)
    np.testing.assert_allclose(g, [0.0, 0.0, -1.0 / 3], atol=1e-7)
    ga = jax.jit(jax.grad(lambda a: clipped_surrogate_pg_loss(ratios, a, 0.2)))(adv)
    np.testing.assert_array_equal(ga, 0)  # advantages are stop-gradient by default


def test_ppo_validation():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="old_log_prob"):
        ppo_policy_loss(x, x[:, :2], x, None)
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_policy_loss(x, x, x, None, clip_ratio_c=0.9)
    with pytest.raises(ValueError, match="advantages"):
        ppo_policy_loss(x, x, np.zeros(3), None)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        ppo_policy_loss(x, x, x, None, loss_agg_mode="mean")


# ---------------------------------------------------------------- value loss
def test_clipped_value_loss_vs_numpy_and_gradient():
    rng = np.random.default_rng(2)
    B, T = 2, 6
    v, old, ret = rng.normal(size=(B, T)), rng.normal(size=(B, T)), rng.normal(size=(B, T))
    mask = np.arange(T)[None] < np.array([6, 3])[:, None]
    vc = old + np.clip(v - old, -0.2, 0.2)
    l1, l2 = (v - ret) ** 2, (vc - ret) ** 2
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    f = jax.jit(jax.value_and_grad(lambda x: clipped_value_loss(x, f32(old), f32(ret), mask, 0.2), has_aux=True))
    (loss, m), g = f(f32(v))
    np.testing.assert_allclose(loss, 0.5 * np.maximum(l1, l2)[mask].mean(), rtol=1e-5)
    np.testing.assert_allclose(m["vf_clipfrac"], (l2 > l1)[mask].mean(), rtol=1e-6)
    expect = np.where(mask & (l1 >= l2), (v - ret), 0.0) / mask.sum()
    np.testing.assert_allclose(np.asarray(g), expect, rtol=1e-5, atol=1e-7)
    assert np.any((l2 > l1) & mask)  # the clipped side was exercised
    plain, _ = jitted(clipped_value_loss, clip_range_value=None, loss_agg_mode="seq-mean-token-mean")(
        f32(v), f32(old), f32(ret), mask)
    np.testing.assert_allclose(plain, 0.5 * np.mean([l1[b][mask[b]].mean() for b in range(B)]), rtol=1e-5)


# ---------------------------------------------------------------- masked stats and aggregation
def np_whiten(x, m, shift_mean):
    vals = x[m]
    mean, var = vals.mean(), vals.var(ddof=1)
    w = (x - mean) / np.sqrt(var + 1e-8)
    return w + mean if not shift_mean else w


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_trl(shift_mean):
    rng = np.random.default_rng(3)
    x = rng.normal(2.0, 3.0, size=(3, 9))
    m = rng.uniform(size=(3, 9)) > 0.3
    x_pad = np.where(m, x, np.nan).astype(np.float32)
    out = np.asarray(jitted(masked_whiten, shift_mean=shift_mean)(x_pad, m))
    np.testing.assert_allclose(out[m], np_whiten(x, m, shift_mean)[m], rtol=1e-5, atol=1e-5)
    assert np.all(out[~m] == 0)
    if shift_mean:
        np.testing.assert_allclose(out[m].mean(), 0, atol=1e-5)
        np.testing.assert_allclose(out[m].std(ddof=1), 1, rtol=1e-4)


def test_masked_mean_var_and_padding():
    x = np.array([[1.0, 2.0, np.nan], [4.0, np.inf, 6.0]], np.float32)
    m = np.isfinite(x)
    np.testing.assert_allclose(masked_mean(x, m), np.mean([1, 2, 4, 6]), rtol=1e-6)
    np.testing.assert_allclose(masked_mean(x, m, axis=1), [1.5, 5.0], rtol=1e-6)
    np.testing.assert_allclose(masked_var(x, m), np.var([1, 2, 4, 6], ddof=1), rtol=1e-6)
    np.testing.assert_allclose(masked_var(x, m, unbiased=False), np.var([1, 2, 4, 6]), rtol=1e-6)
    assert float(masked_mean(x, np.zeros_like(m))) == 0.0  # empty mask: 0, not NaN
    assert float(masked_var(np.array([3.0]), np.array([True]))) == 0.0
    g = jax.grad(lambda v: masked_mean(v, m))(jnp.asarray(x))
    np.testing.assert_allclose(g, np.where(m, 0.25, 0.0))


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_agg_loss_modes(mode):
    rng = np.random.default_rng(4)
    loss = rng.normal(size=(4, 5))
    m = np.arange(5)[None] < np.array([5, 2, 0, 3])[:, None]  # incl. an empty sequence
    out = jitted(agg_loss, loss_agg_mode=mode)(np.where(m, loss, np.nan).astype(np.float32), m)
    np.testing.assert_allclose(out, np_agg(loss, m, mode), rtol=1e-5, atol=1e-7)
    if mode == "seq-mean-token-sum-norm":  # Dr. GRPO constant: independent of response lengths
        np.testing.assert_allclose(agg_loss(loss.astype(np.float32), m, mode, norm_len=16),
                                   np.where(m, loss, 0).sum() / (4 * 16), rtol=1e-5)
