"""SwiGLU kernels (interpret mode) vs a float64 reference: values and VJPs."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sw = importlib.import_module("kernels.swiglu")

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.isfinite(a).all(), "non-finite output (unwritten element?)"
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


@pytest.mark.parametrize("impl", ["xla", "triton"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_swiglu_values_and_vjp(impl, dtype):
    rng = np.random.default_rng(0)
    # 3*23 = 69 tokens, K = 72, N = 100: none a multiple of the 32-wide interpret tiles
    x = jnp.asarray(rng.standard_normal((3, 23, 72)), dtype)
    wg = jnp.asarray(rng.standard_normal((72, 100)) / np.sqrt(72), dtype)
    wu = jnp.asarray(rng.standard_normal((72, 100)) / np.sqrt(72), dtype)
    dh = jnp.asarray(rng.standard_normal((3, 23, 100)), dtype)
    y, vjp = jax.vjp(lambda x, a, b: sw.swiglu(x, a, b, impl=impl, interpret=True), x, wg, wu)
    grads = vjp(dh)
    assert y.shape == (3, 23, 100) and y.dtype == dtype
    with jax.enable_x64(True):
        f64 = lambda a: jnp.asarray(np.asarray(a, np.float64))  # noqa: E731
        ry, rvjp = jax.vjp(sw.reference, f64(x), f64(wg), f64(wu))
        rgrads = rvjp(f64(dh))
    tol = TOL[dtype]
    assert _rel(y, ry) < tol
    for a, b in zip(grads, rgrads):
        assert a.dtype == dtype and _rel(a, b) < tol


def test_bad_inputs_raise():
    x = jnp.ones((4, 8))
    with pytest.raises(ValueError, match="w_gate/w_up"):
        sw.swiglu(x, jnp.ones((8, 5)), jnp.ones((8, 6)), impl="xla")
    with pytest.raises(ValueError, match="cannot run"):
        sw.swiglu(x, jnp.ones((8, 5)), jnp.ones((8, 5)), impl="mosaic", interpret=True)
