"""kernels.linear_scan: the first-order linear recurrence primitive, vs a float64 loop, outside and inside a Pallas
kernel (interpret mode), its Triton lowering for CUDA (tt.scan), and bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import linear_scan as LS


def _loop(a, b, axis, reverse=False):
    a, b = np.moveaxis(np.asarray(a, np.float64), axis, 0), np.moveaxis(np.asarray(b, np.float64), axis, 0)
    if reverse:
        p, h = _loop(a[::-1], b[::-1], 0)
        return np.moveaxis(p[::-1], 0, axis), np.moveaxis(h[::-1], 0, axis)
    p, h = np.empty_like(a), np.empty_like(b)
    p_prev, h_prev = np.ones_like(a[0]), np.zeros_like(b[0])
    for t in range(a.shape[0]):
        p_prev, h_prev = p_prev * a[t], a[t] * h_prev + b[t]
        p[t], h[t] = p_prev, h_prev
    return np.moveaxis(p, 0, axis), np.moveaxis(h, 0, axis)


def _inputs(shape, seed=0):
    r = np.random.default_rng(seed)
    return (jnp.asarray(r.uniform(0.5, 1.0, shape), jnp.float32), jnp.asarray(r.standard_normal(shape), jnp.float32))


@pytest.mark.parametrize("axis,reverse", [(0, False), (1, False), (-1, False), (0, True), (1, True)])
def test_values_against_a_float64_loop(axis, reverse):
    a, b = _inputs((13, 7, 5))
    p, h = jax.jit(lambda a, b: LS.linear_scan(a, b, axis=axis, reverse=reverse))(a, b)
    p_ref, h_ref = _loop(a, b, axis % 3, reverse)
    np.testing.assert_allclose(p, p_ref, rtol=2e-6, atol=0)
    np.testing.assert_allclose(h, h_ref, rtol=2e-5, atol=2e-6 * np.abs(h_ref).max())


def test_inside_a_pallas_kernel_interpret():
    from jax.experimental import pallas as pl

    a, b = _inputs((8, 4, 16), seed=1)

    for reverse in (False, True):
        def kernel(a_ref, b_ref, p_ref, h_ref, reverse=reverse):
            p_ref[...], h_ref[...] = LS.linear_scan(a_ref[...], b_ref[...], axis=0, reverse=reverse)

        sd = jax.ShapeDtypeStruct(a.shape, a.dtype)
        p, h = pl.pallas_call(kernel, out_shape=(sd, sd), interpret=True)(a, b)
        p_ref, h_ref = _loop(a, b, 0, reverse)
        np.testing.assert_allclose(p, p_ref, rtol=2e-6)
        np.testing.assert_allclose(h, h_ref, rtol=2e-5, atol=2e-6 * np.abs(h_ref).max())


def test_lowers_to_tt_scan_for_cuda():
    """The Triton rule is registered on this jax and emits one tt.scan over both operands."""
    from jax.experimental import pallas as pl

    from kernels.selective_scan import _compiler_params
    from triton_ttir import cuda_ttir

    assert LS.TRITON_ERROR is None

    def kernel(a_ref, b_ref, h_ref):
        h = LS.linear_scan(a_ref[...], b_ref[...], axis=0)[1]
        h_ref[...] = LS.linear_scan(a_ref[...], h, axis=0, reverse=True)[1]

    sd = jax.ShapeDtypeStruct((8, 16, 32), jnp.float32)
    captured = cuda_ttir(pl.pallas_call(kernel, out_shape=sd, compiler_params=_compiler_params(4, 1)), sd, sd)
    assert len(captured) == 1 and captured[0].count('"tt.scan"') == 2
    assert captured[0].count("reverse = true") == 1 and captured[0].count("reverse = false") == 1


def test_bad_input():
    a, b = _inputs((4, 3))
    with pytest.raises(ValueError, match="must match"):
        LS.linear_scan(a, b[:, :2])
    with pytest.raises(ValueError, match="must match"):
        LS.linear_scan(a, b.astype(jnp.bfloat16))
