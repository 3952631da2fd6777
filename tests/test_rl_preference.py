"""DPO variants and the reward-model loss vs float64 numpy (values and gradients), KD with
temperature, NT-Xent (SimCLR), and the HRM-RPO shaping terms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iva_jax.rl import (
    distillation_loss,
    dpo_loss,
    expected_ponder_steps,
    halting_reward,
    hrm_rpo_reward,
    memory_reward,
    nt_xent_loss,
    pairwise_reward_loss,
)


def logsig(x):
    return -np.logaddexp(0.0, -x)


def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_dpo(h, beta, kind, ls):
    """TRL DPOTrainer formulas and their derivative w.r.t. h, float64."""
    if kind == "sigmoid":
        return (-(1 - ls) * logsig(beta * h) - ls * logsig(-beta * h),
                -(1 - ls) * beta * sig(-beta * h) + ls * beta * sig(beta * h))
    if kind == "robust":
        return ((-(1 - ls) * logsig(beta * h) + ls * logsig(-beta * h)) / (1 - 2 * ls),
                (-(1 - ls) * beta * sig(-beta * h) - ls * beta * sig(beta * h)) / (1 - 2 * ls))
    if kind == "hinge":
        return np.maximum(0, 1 - beta * h), -beta * (1 - beta * h > 0)
    return (h - 1 / (2 * beta)) ** 2, 2 * (h - 1 / (2 * beta))


@pytest.fixture(scope="module")
def logps():
    rng = np.random.default_rng(0)
    return tuple(rng.normal(-30, 6, size=9) for _ in range(4))  # pi_c, pi_r, ref_c, ref_r


@pytest.mark.parametrize("kind,ls", [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.1), ("hinge", 0.0), ("ipo", 0.0)])
def test_dpo_variants_values_and_gradients(logps, kind, ls):
    pc, pr, rc, rr = logps
    beta = 0.3
    h = (pc - pr) - (rc - rr)
    ref_loss, ref_dh = np_dpo(h, beta, kind, ls)
    f32 = [jnp.asarray(x, jnp.float32) for x in logps]
    f = jax.jit(lambda *a: dpo_loss(*a, beta=beta, loss_type=kind, label_smoothing=ls))
    losses, cr, rj = f(*f32)
    np.testing.assert_allclose(losses, ref_loss, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cr, beta * (pc - rc), rtol=1e-5, atol=1e-5)  # f32 cancellation of ~-30 logps
    np.testing.assert_allclose(rj, beta * (pr - rr), rtol=1e-5, atol=1e-5)
    grads = jax.jit(jax.grad(lambda *a: f(*a)[0].sum(), argnums=(0, 1, 2, 3)))(*f32)
    np.testing.assert_allclose(grads[0], ref_dh, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grads[1], -ref_dh, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(grads[2], 0)  # the reference is frozen
    np.testing.assert_array_equal(grads[3], 0)


def test_dpo_reference_free_robust_reduction_and_validation(logps):
    pc, pr, rc, rr = (jnp.asarray(x, jnp.float32) for x in logps)
    free, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, reference_free=True)
    np.testing.assert_allclose(free, -logsig(0.1 * (logps[0] - logps[1])), rtol=1e-4)
    np.testing.assert_allclose(dpo_loss(pc, pr, rc, rr, loss_type="robust")[0], dpo_loss(pc, pr, rc, rr)[0], rtol=1e-6)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(pc, pr, rc, rr, loss_type="kto")
    with pytest.raises(ValueError, match="reference_rejected_logps"):
        dpo_loss(pc, pr, rc, rr[:3])


def test_pairwise_reward_loss():
    rng = np.random.default_rng(1)
    c, r, m = rng.normal(size=7), rng.normal(size=7), rng.uniform(0, 1, size=7)
    np.testing.assert_allclose(pairwise_reward_loss(c, r), -logsig(c - r).mean(), rtol=1e-5)
    np.testing.assert_allclose(pairwise_reward_loss(c, r, m), -logsig(c - r - m).mean(), rtol=1e-5)
    g = jax.jit(jax.grad(lambda x: pairwise_reward_loss(x, jnp.asarray(r, jnp.float32))))(jnp.asarray(c, jnp.float32))
    np.testing.assert_allclose(g, -sig(-(c - r)) / 7, rtol=1e-4)


# ---------------------------------------------------------------- knowledge distillation
def np_softmax(x, t):
    z = x / t - (x / t).max(-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_distillation_loss_vs_numpy_and_gradient(tau):
    rng = np.random.default_rng(2)
    s, t = rng.normal(size=(2, 5, 13)) * 2, rng.normal(size=(2, 5, 13)) * 2
    m = np.arange(5)[None] < np.array([5, 2])[:, None]
    ps, pt = np_softmax(s, tau), np_softmax(t, tau)
    kl = (pt * (np.log(pt) - np.log(ps))).sum(-1)
    s_pad = np.where(m[..., None], s, np.nan).astype(np.float32)
    t_pad = np.where(m[..., None], t, np.nan).astype(np.float32)
    loss, g = jax.jit(jax.value_and_grad(lambda x: distillation_loss(x, t_pad, tau, m)))(jnp.asarray(s_pad))
    np.testing.assert_allclose(loss, tau ** 2 * kl[m].mean(), rtol=1e-5)
    # d/ds tau^2 KL(p_t || softmax(s/tau)) = tau (p_s - p_t), averaged over valid positions
    np.testing.assert_allclose(g, np.where(m[..., None], tau * (ps - pt) / m.sum(), 0), rtol=1e-4, atol=1e-6)
    gt = jax.jit(jax.grad(lambda y: distillation_loss(jnp.asarray(s_pad), y, tau, m)))(jnp.asarray(t_pad))
    np.testing.assert_array_equal(gt, 0)  # teacher is frozen
    assert float(jax.jit(distillation_loss, static_argnums=2)(t.astype(np.float32), t.astype(np.float32), tau)) < 1e-6


# ---------------------------------------------------------------- NT-Xent
def np_nt_xent(zi, zj, tau):
    z = np.concatenate([zi, zj]).astype(np.float64)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n2, n = len(z), len(zi)
    per = np.zeros(n2)
    for k in range(n2):
        p = (k + n) % n2
        denom = sum(np.exp(z[k] @ z[m] / tau) for m in range(n2) if m != k)
        per[k] = -np.log(np.exp(z[k] @ z[p] / tau) / denom)
    return per


def test_nt_xent_vs_loop_and_gradient():
    rng = np.random.default_rng(3)
    zi, zj = rng.normal(size=(5, 6)), rng.normal(size=(5, 6))
    per = np_nt_xent(zi, zj, 0.3)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    nt = jax.jit(nt_xent_loss, static_argnums=(2, 3))
    np.testing.assert_allclose(nt(f32(zi), f32(zj), 0.3), per.mean(), rtol=1e-5)
    np.testing.assert_allclose(nt(f32(zi), f32(zj), 0.3, "none"), 0.5 * (per[:5] + per[5:]), rtol=1e-5)
    np.testing.assert_allclose(nt(f32(3 * zi), f32(0.5 * zj), 0.3), per.mean(), rtol=1e-5)  # scale-free
    g = np.asarray(jax.jit(jax.grad(lambda a: nt_xent_loss(a, f32(zj), 0.3)))(f32(zi)), np.float64)
    num, eps = np.zeros_like(zi), 1e-5
    for idx in np.ndindex(zi.shape):
        d = np.zeros_like(zi)
        d[idx] = eps
        num[idx] = (np_nt_xent(zi + d, zj, 0.3).mean() - np_nt_xent(zi - d, zj, 0.3).mean()) / (2 * eps)
    np.testing.assert_allclose(g, num, rtol=2e-3, atol=2e-4)


def test_nt_xent_aligned_views_score_lower():
    rng = np.random.default_rng(4)
    z = rng.normal(size=(6, 8))
    nt = jax.jit(nt_xent_loss, static_argnums=(2, 3))
    aligned = nt(z, z + 0.01 * rng.normal(size=z.shape), 0.1)
    shuffled = nt(z, z[::-1] + 0.01 * rng.normal(size=z.shape), 0.1)
    assert float(aligned) < 0.1 < float(shuffled)
    with pytest.raises(ValueError, match="same"):
        nt_xent_loss(z, z[:3])


# ---------------------------------------------------------------- HRM-RPO shaping
def test_expected_ponder_steps_by_enumeration():
    rng = np.random.default_rng(5)
    p = rng.uniform(size=(3, 6))
    expect = []
    for row in p:
        probs, alive = [], 1.0
        for n in range(6):
            h = 1.0 if n == 5 else row[n]  # the last step always halts
            probs.append(alive * h)
            alive *= 1 - row[n]
        expect.append(np.dot(np.arange(1, 7), probs))
    np.testing.assert_allclose(expected_ponder_steps(p.astype(np.float32)), expect, rtol=1e-5)
    np.testing.assert_allclose(expected_ponder_steps(np.ones((1, 4))), [1.0])
    np.testing.assert_allclose(expected_ponder_steps(np.zeros((1, 4))), [4.0])


def test_hrm_rpo_reward_terms():
    rng = np.random.default_rng(6)
    r_halt = halting_reward(np.array([1.0, 4.0, 8.0]), 8)
    np.testing.assert_allclose(r_halt, [-0.125, -0.5, -1.0])
    zi, zj = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    r_mem = jax.jit(memory_reward, static_argnums=2)(zi, zj, 0.2)
    np.testing.assert_allclose(r_mem, -0.5 * (lambda p: p[:3] + p[3:])(np_nt_xent(zi, zj, 0.2)), rtol=1e-5)
    g = jax.jit(jax.grad(lambda a: memory_reward(a, jnp.asarray(zj, jnp.float32)).sum()))(jnp.asarray(zi, jnp.float32))
    np.testing.assert_array_equal(g, 0)  # a reward, not a loss
    R, ent = np.array([1.0, 0.0, 1.0]), np.array([0.5, 1.5, 2.0])
    out = hrm_rpo_reward(R, r_halt, ent, r_mem, 0.1, 0.01, 0.05)
    np.testing.assert_allclose(out, R + 0.1 * np.asarray(r_halt) + 0.01 * ent + 0.05 * np.asarray(r_mem), rtol=1e-6)
    tok = hrm_rpo_reward(np.zeros((3, 4)), np.asarray(r_halt)[:, None], 0.0, 0.0, 1.0, 0.0, 0.0)
    np.testing.assert_allclose(tok, np.repeat(np.asarray(r_halt)[:, None], 4, 1))
    with pytest.raises(ValueError, match="broadcast"):
        hrm_rpo_reward(R, np.zeros((2, 3)), 0.0, 0.0, 1.0, 0.0, 0.0)
