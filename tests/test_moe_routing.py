"""Routers (softmax top-k, switch, hash, Sinkhorn, bias-balanced), balancing losses and routing metrics
against float64 numpy (and transformers' load_balancing_loss_func)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iva_jax.moe import losses as L
from iva_jax.moe import routing as R

T, E, K = 37, 6, 2


@pytest.fixture(scope="module")
def logits():
    return np.random.default_rng(0).normal(size=(T, E)) * 2.0


def np_softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def np_topk(p, k):
    idx = np.argsort(-p, axis=-1, kind="stable")[:, :k]
    return idx, np.take_along_axis(p, idx, -1)


# ---------------------------------------------------------------------------------------------
# routers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau,norm", [(1.0, True), (0.6, True), (2.5, False)])
def test_softmax_topk_matches_numpy(logits, tau, norm):
    r = R.route(jnp.asarray(logits, jnp.float32), top_k=K, temperature=tau, norm_topk_prob=norm)
    p = np_softmax(logits / tau)
    idx, w = np_topk(p, K)
    if norm:
        w = w / w.sum(-1, keepdims=True)
    np.testing.assert_array_equal(r.expert_index, idx)
    np.testing.assert_allclose(r.gate_weights, w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(r.probs, p, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(r.logits, logits, rtol=1e-6)


def test_temperature_per_token_and_errors(logits):
    tau = np.linspace(0.3, 3.0, T)
    r = R.route(jnp.asarray(logits, jnp.float32), top_k=K, temperature=jnp.asarray(tau), norm_topk_prob=False)
    p = np_softmax(logits / tau[:, None])
    np.testing.assert_allclose(r.probs, p, rtol=1e-5, atol=1e-7)
    base = R.route(jnp.asarray(logits, jnp.float32), top_k=K)
    np.testing.assert_array_equal(r.expert_index, base.expert_index)  # tau > 0 never changes the top-k
    with pytest.raises(ValueError, match="temperature must be > 0"):
        R.route(jnp.asarray(logits), top_k=K, temperature=0.0)
    with pytest.raises(ValueError, match=r"temperature of shape \(5,\)"):
        R.route(jnp.asarray(logits), top_k=K, temperature=jnp.ones(5))
    with pytest.raises(ValueError, match="top_k=7"):
        R.route(jnp.asarray(logits), top_k=7)


def test_switch_is_top1_with_raw_probability(logits):
    r = R.route(jnp.asarray(logits, jnp.float32), router="switch", top_k=1, norm_topk_prob=True)
    p = np_softmax(logits)
    np.testing.assert_array_equal(r.expert_index[:, 0], p.argmax(-1))
    np.testing.assert_allclose(r.gate_weights[:, 0], p.max(-1), rtol=1e-5)  # not renormalized to 1
    with pytest.raises(ValueError, match="top-1"):
        R.route(jnp.asarray(logits), router="switch", top_k=2)


def test_jitter_is_bounded_multiplicative_noise():
    x = jnp.ones((50, 8)) * 3.0
    y = R.jitter(x, jax.random.PRNGKey(0), 0.1)
    ratio = np.asarray(y) / 3.0
    assert ratio.min() >= 0.9 - 1e-6 and ratio.max() <= 1.1 + 1e-6 and ratio.std() > 0.02


def test_hash_router_deterministic_distinct_and_spread(logits):
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 50000, size=T))
    a = R.route(jnp.asarray(logits, jnp.float32), router="hash", top_k=K, token_ids=ids)
    b = R.route(jnp.asarray(-logits, jnp.float32), router="hash", top_k=K, token_ids=ids)
    np.testing.assert_array_equal(a.expert_index, b.expert_index)  # depends on the id only
    assert np.all(a.expert_index[:, 0] != a.expert_index[:, 1])
    p = np_softmax(logits)
    w = np.take_along_axis(p, np.asarray(a.expert_index), -1)
    np.testing.assert_allclose(a.gate_weights, w / w.sum(-1, keepdims=True), rtol=1e-5)
    many = R.hash_experts(jnp.arange(6000), E, 1)
    counts = np.bincount(np.asarray(many[:, 0]), minlength=E)
    assert counts.min() > 0.8 * 1000 and counts.max() < 1.2 * 1000
    with pytest.raises(ValueError, match="needs token_ids"):
        R.route(jnp.asarray(logits), router="hash", top_k=K)


def test_sinkhorn_balances(logits):
    skew = logits + np.array([3.0, 1.5, 0, 0, 0, 0])  # experts 0 and 1 are popular
    lp = np.asarray(R.sinkhorn_log(jnp.asarray(skew, jnp.float32), 50), np.float64)
    P = np.exp(lp)
    np.testing.assert_allclose(P.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(P.sum(0), T / E, rtol=2e-3)
    x = jnp.asarray(skew, jnp.float32)
    tr = R.route(x, router="sinkhorn", top_k=K, training=True, sinkhorn_iters=8)
    ev = R.route(x, router="sinkhorn", top_k=K, training=False)
    plain = R.route(x, top_k=K)
    np.testing.assert_array_equal(ev.expert_index, plain.expert_index)  # eval: plain top-k
    cv = lambda r: np.std(np.bincount(np.asarray(r.expert_index).ravel(), minlength=E)) / (T * K / E)
    assert cv(tr) < 0.5 * cv(plain)
    sel = np.asarray(tr.expert_index)
    np.testing.assert_allclose(tr.gate_weights, _renorm(np.take_along_axis(np_softmax(skew), sel, -1)), rtol=1e-5)


def _renorm(w):
    return w / w.sum(-1, keepdims=True)


def test_bias_balanced_selection_weights_and_update(logits):
    x = jnp.asarray(logits, jnp.float32)
    bias = jnp.zeros(E).at[3].set(10.0)
    r = R.route(x, router="bias_balanced", top_k=K, expert_bias=bias)
    assert np.all(np.any(np.asarray(r.expert_index) == 3, axis=-1))  # bias moves the selection ...
    p = np_softmax(logits)
    np.testing.assert_allclose(r.gate_weights, _renorm(np.take_along_axis(p, np.asarray(r.expert_index), -1)),
                               rtol=1e-5)  # ... but not the gate weights
    g = jax.grad(lambda b: jnp.sum(R.route(x, router="bias_balanced", top_k=K, expert_bias=b).gate_weights
                                   * jnp.arange(K)))(bias)
    np.testing.assert_array_equal(g, np.zeros(E))  # no gradient into the bias
    load = jnp.array([10.0, 2, 6, 6, 0, 6])
    new = R.update_expert_bias(jnp.zeros(E), load, 0.01)
    np.testing.assert_allclose(new, [-0.01, 0.01, -0.01, -0.01, 0.01, -0.01])  # mean load 5
    assert new[0] < 0 and new[4] > 0  # overloaded down, underloaded up
    # iterating the update on skewed logits balances the load
    skew = x + jnp.array([2.0, 1.0, 0, 0, 0, -1.0])
    b = jnp.zeros(E)
    cv0 = None
    for _ in range(300):
        rr = R.route(skew, router="bias_balanced", top_k=K, expert_bias=b)
        c = L.expert_counts(rr.expert_index, E)
        cv0 = float(jnp.std(c) / jnp.mean(c)) if cv0 is None else cv0
        b = R.update_expert_bias(b, c, 0.02)
    assert float(jnp.std(c) / jnp.mean(c)) < 0.5 * cv0
    with pytest.raises(ValueError, match="needs expert_bias"):
        R.route(x, router="bias_balanced", top_k=K)


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------
def np_lb(logits, k, mask=None):
    p = np_softmax(logits)
    idx, _ = np_topk(p, k)
    m = np.ones(len(p)) if mask is None else mask.astype(np.float64)
    counts = np.zeros(p.shape[1])
    for t in range(len(p)):
        for e in idx[t]:
            counts[e] += m[t]
    f = counts / m.sum()
    P = (p * m[:, None]).sum(0) / m.sum()
    return p.shape[1] * np.sum(f * P), f, P


def test_load_balancing_loss_vs_numpy_and_transformers(logits):
    torch = pytest.importorskip("torch")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    r = R.route(jnp.asarray(logits, jnp.float32), top_k=K)
    want, f, P = np_lb(logits, K)
    np.testing.assert_allclose(L.load_balancing_loss(r.probs, r.expert_index), want, rtol=1e-5)
    hf = load_balancing_loss_func((torch.tensor(logits, dtype=torch.float64),), E, K).item()
    np.testing.assert_allclose(L.load_balancing_loss(r.probs, r.expert_index), hf, rtol=1e-5)
    mask = np.arange(T) % 3 != 0
    want_m, _, _ = np_lb(logits, K, mask)
    hf_m = load_balancing_loss_func((torch.tensor(logits),), E, K, torch.tensor(mask[None, :])).item()
    got_m = L.load_balancing_loss(r.probs, r.expert_index, jnp.asarray(mask))
    np.testing.assert_allclose(got_m, want_m, rtol=1e-5)
    np.testing.assert_allclose(got_m, hf_m, rtol=1e-5)
    # importance form = lb / (E k): sum_e p_e l_e with shares summing to 1
    imp = L.importance_loss(r.probs, r.expert_index)
    np.testing.assert_allclose(imp, np.sum(P * f / K), rtol=1e-5)
    np.testing.assert_allclose(imp, want / (E * K), rtol=1e-5)


def test_load_balancing_loss_gradient_vs_finite_differences(logits):
    """d loss / d logits with f held fixed (it is a count): central differences in float64."""
    x = jnp.asarray(logits, jnp.float32)
    idx = R.route(x, top_k=K).expert_index
    g = jax.grad(lambda l: L.load_balancing_loss(jax.nn.softmax(l), idx))(x)
    _, f, _ = np_lb(logits, K)
    fn = lambda l: E * np.sum(f * np_softmax(l).mean(0))
    eps = 1e-6
    num = np.zeros_like(logits)
    for t in range(0, T, 5):
        for e in range(E):
            d = np.zeros_like(logits)
            d[t, e] = eps
            num[t, e] = (fn(logits + d) - fn(logits - d)) / (2 * eps)
    np.testing.assert_allclose(np.asarray(g)[::5], num[::5], rtol=1e-3, atol=1e-7)


def test_z_loss_vs_numpy(logits):
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(L.router_z_loss(jnp.asarray(logits, jnp.float32)), np.mean(lse ** 2), rtol=1e-5)
    mask = np.arange(T) < 20
    np.testing.assert_allclose(L.router_z_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(mask)),
                               np.mean(lse[:20] ** 2), rtol=1e-5)
    g = jax.grad(lambda l: L.router_z_loss(l))(jnp.asarray(logits, jnp.float32))
    np.testing.assert_allclose(g, 2 * lse[:, None] * np_softmax(logits) / T, rtol=1e-4, atol=1e-7)


def test_balance_extremes():
    """Uniform routing gives k (HF normalization) and 1/E (importance); collapse gives E*k and 1."""
    e, k, t = 4, 2, 8
    idx = jnp.array([[i % e, (i + 1) % e] for i in range(t)])
    probs = jnp.full((t, e), 1.0 / e)
    np.testing.assert_allclose(L.load_balancing_loss(probs, idx), k, rtol=1e-6)
    np.testing.assert_allclose(L.importance_loss(probs, idx), 1.0 / e, rtol=1e-6)
    collapsed = jnp.zeros((t, e)).at[:, 0].set(1.0)
    idx1 = jnp.zeros((t, 1), jnp.int32)
    np.testing.assert_allclose(L.load_balancing_loss(collapsed, idx1), e * 1, rtol=1e-6)
    np.testing.assert_allclose(L.importance_loss(collapsed, idx1), 1.0, rtol=1e-6)


def test_routing_metrics_hand_built():
    idx = jnp.array([[0, 1], [0, 2], [0, 1], [3, 0]])
    keep = jnp.array([[True, True], [True, True], [False, True], [True, False]])
    probs = jnp.array([[0.25] * 4, [1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.7, 0.1, 0.1, 0.1]])
    m = L.routing_metrics(probs, idx, keep)
    counts = np.array([4, 2, 1, 1.0])
    np.testing.assert_allclose(m["expert_counts"], counts)
    np.testing.assert_allclose(m["load_per_expert"], counts / 8)
    np.testing.assert_allclose(m["overflow_pct"], 100 * 2 / 8)
    np.testing.assert_allclose(m["load_std_over_mean"], counts.std() / counts.mean(), rtol=1e-6)
    ent = [np.log(4), 0.0, np.log(2), -(0.7 * np.log(0.7) + 3 * 0.1 * np.log(0.1))]
    np.testing.assert_allclose(m["route_entropy"], np.mean(ent), rtol=1e-6)
    m2 = L.routing_metrics(probs, idx, keep, mask=jnp.array([True, True, False, False]))
    np.testing.assert_allclose(m2["expert_counts"], [2, 1, 1, 0])
    np.testing.assert_allclose(m2["overflow_pct"], 0.0)
    np.testing.assert_allclose(m2["route_entropy"], np.mean(ent[:2]), rtol=1e-6)
