"""RMSNorm kernels (interpret mode) vs a float64 reference: values and VJPs, plain and residual."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

rn = importlib.import_module("kernels.rms_norm")  # the module (kernels/__init__ re-exports the function)

EPS = 1e-6
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.isfinite(a).all(), "non-finite output (unwritten element?)"
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def _ref64(fn, args, cts):
    with jax.enable_x64(True):
        args64 = [jnp.asarray(np.asarray(a, np.float64)) for a in args]
        out, vjp = jax.vjp(fn, *args64)
        cts64 = jax.tree.map(lambda c: jnp.asarray(np.asarray(c, np.float64)), cts)
        return jax.tree.map(np.asarray, out), [np.asarray(g) for g in vjp(cts64)]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    shape = (2, 37, 576)  # 74 rows: not a multiple of the row block; hidden 576 not a power of two
    return dict(x=rng.standard_normal(shape), r=rng.standard_normal(shape),
                w=1 + 0.1 * rng.standard_normal(shape[-1]), g=rng.standard_normal(shape))


@pytest.mark.parametrize("impl", ["xla", "triton"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rms_norm_values_and_vjp(data, impl, dtype):
    x, w, g = (jnp.asarray(data[k], dtype) for k in ("x", "w", "g"))
    y, vjp = jax.vjp(lambda x, w: rn.rms_norm(x, w, eps=EPS, impl=impl, interpret=True), x, w)
    dx, dw = vjp(g)
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    ry, (rdx, rdw) = _ref64(lambda x, w: rn.reference(x, w, eps=EPS), [x, w], g)
    tol = TOL[dtype]
    assert _rel(y, ry) < tol
    assert _rel(dx, rdx) < tol
    assert _rel(dw, rdw) < tol


@pytest.mark.parametrize("impl", ["xla", "triton"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rms_norm_residual_values_and_vjp(data, impl, dtype):
    x, r, w, g = (jnp.asarray(data[k], dtype) for k in ("x", "r", "w", "g"))
    gh = 0.5 * g
    (y, h), vjp = jax.vjp(lambda x, r, w: rn.rms_norm_residual(x, r, w, eps=EPS, impl=impl, interpret=True), x, r, w)
    grads = vjp((g, gh))
    (ry, rh), rgrads = _ref64(lambda x, r, w: rn.reference_residual(x, r, w, eps=EPS), [x, r, w], (g, gh))
    tol = TOL[dtype]
    assert _rel(h, rh) < tol and _rel(y, ry) < tol
    for a, b in zip(grads, rgrads):
        assert _rel(a, b) < tol
    np.testing.assert_array_equal(np.asarray(grads[0], np.float32), np.asarray(grads[1], np.float32))


@pytest.mark.parametrize("rows,hidden", [(16, 100), (13, 1000), (8, 1536), (5, 5120)])
def test_other_hidden_sizes_match_float64(rows, hidden):
    """Hidden sizes padded in registers (100, 1000, 1536, 5120), rows a multiple of the row block or not:
    forward and the fused residual variant against float64, and the VJP (the backward's one-row blocks above
    1024 columns)."""
    rng = np.random.default_rng(hidden)
    x, r, g = (jnp.asarray(rng.standard_normal((rows, hidden)), jnp.float32) for _ in range(3))
    w = jnp.asarray(1 + 0.1 * rng.standard_normal(hidden), jnp.float32)
    y, vjp = jax.vjp(lambda x, w: rn.rms_norm(x, w, eps=EPS, impl="triton", interpret=True), x, w)
    dx, dw = vjp(g)
    y2, h = rn.rms_norm_residual(x, r, w, eps=EPS, impl="triton", interpret=True)
    ry, (rdx, rdw) = _ref64(lambda x, w: rn.reference(x, w, eps=EPS), [x, w], g)
    (ry2, rh), _ = _ref64(lambda x, r, w: rn.reference_residual(x, r, w, eps=EPS), [x, r, w], (x, x))
    assert _rel(y, ry) < 1e-5 and _rel(y2, ry2) < 1e-5 and _rel(h, rh) < 1e-6
    assert _rel(dx, rdx) < 1e-5 and _rel(dw, rdw) < 1e-5


def test_matches_hf_rounding_order():
    """HF rounds the normalised value to the input dtype before the weight multiply."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((5, 96)), jnp.bfloat16)
    w = jnp.asarray(1 + rng.standard_normal(96), jnp.bfloat16)
    xf = np.asarray(x, np.float32)
    n = xf / np.sqrt(np.mean(xf * xf, -1, keepdims=True) + EPS)
    hf = (jnp.asarray(n, jnp.bfloat16) * w)  # bf16 * bf16, as torch does it
    for impl in ("xla", "triton"):
        y = rn.rms_norm(x, w, eps=EPS, impl=impl, interpret=True)
        # equal up to the f32-vs-numpy rsqrt difference moving a rounding boundary: at most one ulp
        np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(hf, np.float32), rtol=2 ** -7, atol=0)


def test_interpret_mode_poisons_unwritten_outputs():
    """The guarantee the value tests rely on: interpret mode fills outputs with NaN before the kernel."""
    from jax.experimental import pallas as pl

    def kernel(x_ref, o_ref):
        del x_ref, o_ref  # writes nothing

    out = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((8, 16), jnp.float32), interpret=True)(
        jnp.ones((8, 16), jnp.float32))
    assert np.isnan(np.asarray(out)).all()


def test_bad_inputs_raise():
    x = jnp.ones((4, 8), jnp.float32)
    with pytest.raises(ValueError, match="weight shape"):
        rn.rms_norm(x, jnp.ones((7,)), eps=EPS, impl="xla")
    with pytest.raises(ValueError, match="residual shape"):
        rn.rms_norm_residual(x, jnp.ones((4, 7)), jnp.ones((8,)), eps=EPS, impl="xla")
    with pytest.raises(ValueError, match="cannot run"):
        rn.rms_norm(x, jnp.ones((8,)), eps=EPS, impl="mosaic")
