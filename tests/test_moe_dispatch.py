"""Capacity dispatch (hand-built dropping cases, choice-major priority, einsum == gather) and dropless
dispatch (ragged_dot / Pallas interpret == float64 reference), values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iva_jax.moe import dispatch as dp

D, F = 10, 14


def np_expert(x, wg, wu, wd):
    h = x @ wg
    return ((h / (1 + np.exp(-h))) * (x @ wu)) @ wd


def np_moe(x, idx, w, keep, wg, wu, wd):
    """float64 reference: y[t] = sum over kept choices of w * expert(x[t])."""
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            if keep[t, j]:
                e = idx[t, j]
                y[t] += w[t, j] * np_expert(x[t], wg[e], wu[e], wd[e])
    return y


@pytest.fixture(scope="module")
def weights():
    rng = np.random.default_rng(0)
    e = 3
    return (rng.normal(size=(e, D, F)) * 0.4, rng.normal(size=(e, D, F)) * 0.4, rng.normal(size=(e, F, D)) * 0.4)


def f32(*a):
    return [jnp.asarray(v, jnp.float32) for v in a]


def test_expert_capacity_formula():
    assert dp.expert_capacity(5, 2, 0.6, 3) == 2  # ceil(2.0)
    assert dp.expert_capacity(1000, 2, 1.25, 8) == 313  # ceil(312.5)
    assert dp.expert_capacity(7, 1, 0.01, 4) == 1
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        dp.expert_capacity(8, 2, 0.0, 4)


# token:       0       1       2       3       4
IDX = np.array([[0, 1], [0, 2], [0, 1], [1, 0], [2, 0]])
# capacity 2.  First choices: 0->e0 s0, 1->e0 s1, 2->e0 (full: dropped), 3->e1 s0, 4->e2 s0.
# Then second choices: 0->e1 s1, 1->e2 s1, 2->e1 (full), 3->e0 (full), 4->e0 (full).
KEEP = np.array([[1, 1], [1, 1], [0, 0], [1, 0], [1, 0]], bool)
POS = np.array([[0, 1], [1, 1], [2, 2], [0, 3], [0, 4]])


def test_capacity_positions_choice_major_priority():
    pos, keep = dp.capacity_positions(jnp.asarray(IDX), 3, 2)
    np.testing.assert_array_equal(pos, POS)
    np.testing.assert_array_equal(keep, KEEP)
    # token 3's FIRST choice (e1) beat token 0's earlier SECOND choice for slot 0 of e1
    assert pos[3, 0] == 0 and pos[0, 1] == 1
    # an invalid (padding) token claims nothing: with token 0 masked, token 2's first choice fits
    pos_v, keep_v = dp.capacity_positions(jnp.asarray(IDX), 3, 2, valid=jnp.array([0, 1, 1, 1, 1], bool))
    np.testing.assert_array_equal(keep_v, [[0, 0], [1, 1], [1, 1], [1, 0], [1, 0]])


@pytest.mark.parametrize("combine", ["gather", "einsum"])
def test_capacity_moe_drops_known_tokens(weights, combine):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, D))
    w = rng.uniform(0.2, 1.0, size=(5, 2))
    cf = 2 * 3 / (5 * 2)  # capacity = ceil(5 * 2 * 0.6 / 3) = 2
    y, keep = dp.capacity_moe(*f32(x), jnp.asarray(IDX), *f32(w, *weights), cf, combine=combine)
    np.testing.assert_array_equal(keep, KEEP)
    np.testing.assert_allclose(y, np_moe(x, IDX, w, KEEP, *weights), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(y[2], np.zeros(D))  # every choice dropped: zero, rides the residual


def test_capacity_einsum_equals_gather_with_gradients(weights):
    rng = np.random.default_rng(2)
    t, k = 22, 2
    x = jnp.asarray(rng.normal(size=(t, D)), jnp.float32)
    idx = jnp.asarray(rng.integers(0, 3, size=(t, k)))
    idx = idx.at[:, 1].set((idx[:, 0] + 1 + (idx[:, 1] % 2)) % 3)  # two distinct experts per token
    w = jnp.asarray(rng.uniform(size=(t, k)), jnp.float32)
    args = f32(*weights)

    def run(combine, groups):
        def loss(x, w, wg, wu, wd):
            y, _ = dp.capacity_moe(x, idx, w, wg, wu, wd, 0.8, num_groups=groups, combine=combine)
            return jnp.sum(y * jnp.cos(jnp.arange(D)))
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))(x, w, *args)

    (v1, g1), (v2, g2) = run("gather", 2), run("einsum", 2)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # groups: each half of the tokens has its own capacity ceil(11 * 2 * 0.8 / 3) = 6
    _, keep = dp.capacity_moe(x, idx, w, *args, 0.8, num_groups=2)
    for half in (slice(0, 11), slice(11, 22)):
        _, kh = dp.capacity_positions(idx[half], 3, 6)
        np.testing.assert_array_equal(keep[half], kh)
    with pytest.raises(ValueError, match="num_groups=3"):
        dp.capacity_moe(x, idx, w, *args, 0.8, num_groups=3)


@pytest.fixture(scope="module")
def dropless_case():
    rng = np.random.default_rng(3)
    t, k, e = 19, 2, 5
    x = rng.normal(size=(t, D))
    logits = rng.normal(size=(t, e))
    logits[:, 3] = -1e9  # expert 3 gets no tokens: an empty group
    idx = np.argsort(-logits, axis=-1)[:, :k]
    w = rng.uniform(0.1, 1.0, size=(t, k))
    ws = (rng.normal(size=(e, D, F)) * 0.4, rng.normal(size=(e, D, F)) * 0.4, rng.normal(size=(e, F, D)) * 0.4)
    return x, idx, w, ws


@pytest.mark.parametrize("impl", ["ragged"])  # the Pallas path: test_kernels_grouped_matmul + test_moe_layer
def test_dropless_matches_float64_reference_with_gradients(dropless_case, impl):
    x, idx, w, ws = dropless_case
    kw = dict(interpret=True, block_m=16, block_n=16, block_k=16) if impl == "pallas" else {}
    want = np_moe(x, idx, w, np.ones_like(idx, bool), *ws)
    cot = np.cos(np.arange(D))

    def loss(fn):
        return lambda x, w, wg, wu, wd: jnp.sum(fn(x, jnp.asarray(idx), w, wg, wu, wd) * cot)

    fn = lambda *a: dp.dropless_moe(*a, impl=impl, **kw)
    got = jax.jit(fn)(*f32(x), jnp.asarray(idx), *f32(w, *ws))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    g = jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2, 3, 4)))(*f32(x, w, *ws))
    g_ref = jax.jit(jax.grad(loss(dp.dense_reference), argnums=(0, 1, 2, 3, 4)))(*f32(x, w, *ws))
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert float(jnp.max(jnp.abs(g[2][3]))) == 0.0  # the empty expert gets no gradient


def test_dropless_bf16(dropless_case):
    x, idx, w, ws = dropless_case
    want = np_moe(x, idx, w, np.ones_like(idx, bool), *ws)
    got = jax.jit(lambda *a: dp.dropless_moe(*a, dtype=jnp.bfloat16))(
        jnp.asarray(x, jnp.bfloat16), jnp.asarray(idx), *f32(w), *[jnp.asarray(v, jnp.bfloat16) for v in ws])
    np.testing.assert_allclose(got, want, rtol=3e-2, atol=3e-2 * np.abs(want).max())


def test_sort_by_expert():
    order, sizes = dp.sort_by_expert(jnp.asarray([[2, 0], [1, 2], [0, 1]]), 4)
    np.testing.assert_array_equal(sizes, [2, 2, 2, 0])
    np.testing.assert_array_equal(np.asarray([[2, 0], [1, 2], [0, 1]]).ravel()[np.asarray(order)],
                                  [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(order, [1, 4, 2, 5, 0, 3])  # stable within an expert


def test_gather_rows_gradient_is_the_scatter_add():
    """gather_rows' gather-based backward equals autodiff of jnp.take (a scatter-add), in f32 and bf16:
    sources used twice (top-2), once, never, and fill rows (index out of range)."""
    rng = np.random.default_rng(5)
    s, d = 7, 5
    idx = np.array([3, 0, 9, 3, 5, 0, 1, 9, 6])  # 9: out of range -> a zero row
    inv = np.full((s, 2), idx.size)  # the positions reading each source row (idx.size = none)
    for j, i in enumerate(idx):
        if i < s:
            inv[i, np.argmax(inv[i] == idx.size)] = j
    src = rng.normal(size=(s, d))
    dy = rng.normal(size=(idx.size, d))
    for dt, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)):
        x = jnp.asarray(src, dt)
        y, vjp = jax.vjp(lambda a: dp.gather_rows(a, jnp.asarray(idx), jnp.asarray(inv)), x)
        y_ref, vjp_ref = jax.vjp(lambda a: jnp.take(a, jnp.asarray(idx), axis=0, mode="fill", fill_value=0), x)
        np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
        assert not np.any(np.asarray(y, np.float32)[idx >= s])
        (g,), (g_ref,) = vjp(jnp.asarray(dy, dt)), vjp_ref(jnp.asarray(dy, dt))
        assert g.dtype == dt
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref, np.float32), rtol=tol, atol=tol)
    want = np.zeros((s, d))
    np.add.at(want, idx[idx < s], dy[idx < s])
    np.testing.assert_allclose(np.asarray(g_ref, np.float32), want, rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="inv"):  # inv must have a row per source row
        dp.gather_rows(jnp.asarray(src), jnp.asarray(idx), jnp.asarray(inv[:-1]))


def test_dropless_ragged_keeps_forward_mode_autodiff(dropless_case):
    """The ragged (CPU default) dropless path gathers with jnp.take, so jvp works (gather_rows is a
    custom_vjp, used only around the kernel impls); the jvp equals a finite difference."""
    x, idx, w, ws = dropless_case
    args = f32(x, w, *ws)
    fn = lambda x_: dp.dropless_moe(x_, jnp.asarray(idx), *args[1:], impl="ragged")  # noqa: E731
    dx = jnp.asarray(np.random.default_rng(9).normal(size=x.shape), jnp.float32)
    _, tangent = jax.jvp(fn, (args[0],), (dx,))
    eps = 1e-3
    fd = (fn(args[0] + eps * dx) - fn(args[0] - eps * dx)) / (2 * eps)
    np.testing.assert_allclose(tangent, fd, rtol=2e-3, atol=2e-3 * float(jnp.abs(fd).max()))
