"""AdamATan2 against a float64 numpy implementation of the sapientinc kernel / the paper's rule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from iva_jax.train.adam_atan2 import adam_atan2, scale_by_adam_atan2


def numpy_adam_atan2(p, grads, lrs, b1, b2, wd, a, b):
    """float64: p <- p * (1 - lr * wd) - lr * a * atan2(m / bc1, b * sqrt(v / bc2)) per step."""
    p = p.astype(np.float64).copy()
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    out = []
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        g = g.astype(np.float64)
        p *= 1 - lr * wd
        m = m + (1 - b1) * (g - m)  # lerp, as the CUDA kernel
        v = v + (1 - b2) * (g * g - v)
        p -= lr * a * np.arctan2(m / (1 - b1 ** t), b * np.sqrt(v / (1 - b2 ** t)))
        out.append(p.copy())
    return out


@pytest.mark.parametrize("a,b,wd", [(1.0, 1.0, 0.1), (1.27, 1.0, 0.0), (1.27, 0.5, 0.3)])
def test_matches_float64_numpy(a, b, wd):
    rng = np.random.default_rng(0)
    shapes = {"w": (5, 3), "bias": (7,)}
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    steps = 6
    grads = [{k: (rng.normal(size=s) * 10.0 ** rng.integers(-3, 2)).astype(np.float32) for k, s in shapes.items()}
             for _ in range(steps)]
    grads[2]["w"][0, 0] = 0.0  # a zero gradient after nonzero ones
    sched = lambda c: 1e-2 * (c + 1) / steps  # noqa: E731  (a schedule, to check its count)
    b1, b2 = 0.9, 0.95
    tx = adam_atan2(sched, b1=b1, b2=b2, weight_decay=wd, a=a, b=b)
    state = tx.init(params)
    p = {k: jnp.asarray(v) for k, v in params.items()}
    upd = jax.jit(tx.update)
    got = []
    for g in grads:
        u, state = upd({k: jnp.asarray(v) for k, v in g.items()}, state, p)
        p = optax.apply_updates(p, u)
        got.append(p)
    for k in shapes:
        want = numpy_adam_atan2(params[k], [g[k] for g in grads], [sched(i) for i in range(steps)], b1, b2, wd, a, b)
        for t in range(steps):
            np.testing.assert_allclose(np.asarray(got[t][k]), want[t], rtol=1e-5, atol=1e-6)


def test_no_epsilon_and_bounded():
    tx = scale_by_adam_atan2(b1=0.9, b2=0.99, a=1.27, b=1.0)
    params = jnp.zeros((4,))
    state = tx.init(params)
    u, _ = tx.update(jnp.array([0.0, 1e-8, -1e8, 3.0]), state, params)
    u = np.asarray(u)
    assert u[0] == 0.0  # atan2(0, 0) = 0: no epsilon, no NaN
    # the first step is a * atan2(g, |g|) = a * pi/4 * sign(g), whatever the gradient's scale
    np.testing.assert_allclose(u[1:], 1.27 * np.pi / 4 * np.array([1, -1, 1]), rtol=1e-6)
    assert np.all(np.abs(u) <= 1.27 * np.pi / 2)


def test_bad_hyperparameters_raise():
    with pytest.raises(ValueError, match="betas"):
        scale_by_adam_atan2(b1=1.0)
    with pytest.raises(ValueError, match="a and b"):
        scale_by_adam_atan2(a=0.0)
    with pytest.raises(ValueError, match="weight_decay"):
        adam_atan2(1e-3, weight_decay=-1.0)
