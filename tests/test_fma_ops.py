"""kernels.fma_ops: fma and dot_sum vs float64 numpy, outside and inside a Pallas kernel (interpret mode), their
Triton lowering for CUDA (math.fma; one tt.reduce over the pair whose combine is an fma), and bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import fma_ops as F


def _x(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_values_against_float64():
    a, b, c = _x((7, 5), 0), _x((7, 5), 1), _x((7, 5), 2)
    np.testing.assert_allclose(jax.jit(F.fma)(a, b, c), np.float64(a) * np.float64(b) + np.float64(c),
                               rtol=1e-6, atol=1e-6)
    x, y = _x((6, 9, 4), 3), _x((6, 9, 4), 4)
    for axis in (0, 1, -1):
        ref = np.sum(np.float64(x) * np.float64(y), axis=axis)
        np.testing.assert_allclose(jax.jit(lambda x, y, axis=axis: F.dot_sum(x, y, axis))(x, y), ref,
                                   rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # broadcasting operands, as the scan uses them (a row broadcast over a tile)
    np.testing.assert_allclose(F.dot_sum(x, y[:, :1, :], 1), np.sum(np.float64(x) * np.float64(y[:, :1]), 1),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(F.fma(a, 2.0, c), np.float64(a) * 2 + np.float64(c), rtol=1e-6, atol=1e-6)


def test_inside_a_pallas_kernel_interpret():
    from jax.experimental import pallas as pl

    x, y, c = _x((8, 16, 4), 5), _x((8, 16, 4), 6), _x((8, 4), 7)

    def kernel(x_ref, y_ref, c_ref, o_ref):
        o_ref[...] = F.fma(c_ref[...], c_ref[...], F.dot_sum(x_ref[...], y_ref[...], 1))

    out = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((8, 4), jnp.float32), interpret=True)(x, y, c)
    ref = np.sum(np.float64(x) * np.float64(y), 1) + np.float64(c) ** 2
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_lowers_to_math_fma_for_cuda():
    """The rules are registered on this jax: fma is one math.fma, dot_sum one tt.reduce over (x, y) whose combine
    is mulf + math.fma returning (sum, 1.0)."""
    from jax.experimental import pallas as pl

    from kernels.selective_scan import _compiler_params
    from triton_ttir import cuda_ttir

    assert F.TRITON_ERROR is None

    def kernel(x_ref, y_ref, o_ref):
        o_ref[...] = F.fma(x_ref[:, 1, :], x_ref[:, 0, :], F.dot_sum(x_ref[...], y_ref[...], 1))

    sd = jax.ShapeDtypeStruct((8, 16, 32), jnp.float32)
    call = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((8, 32), jnp.float32),
                          compiler_params=_compiler_params(1, 1))
    captured = cuda_ttir(call, sd, sd)
    assert len(captured) == 1
    ir = captured[0]
    assert ir.count('"tt.reduce"') == 1 and ir.count("math.fma") == 2 and "tt.reduce.return" in ir


def test_bad_input():
    a = _x((4, 3), 0)
    with pytest.raises(ValueError, match="out of range"):
        F.dot_sum(a, a, 2)
    with pytest.raises(ValueError, match="floating"):
        F.fma(jnp.ones(3, jnp.int32), jnp.ones(3, jnp.int32), jnp.ones(3, jnp.int32))
    with pytest.raises(ValueError, match="floating"):
        F.dot_sum(jnp.ones((2, 3), jnp.int32), jnp.ones((2, 3), jnp.int32), 0)


def test_plain_expressions_without_the_triton_rules(monkeypatch):
    """On a jax whose Pallas lowering table moved (TRITON_ERROR set), both are the plain jnp expressions, so a
    kernel using them still lowers; values unchanged."""
    a, b, c = _x((4, 3), 0), _x((4, 3), 1), _x((4, 3), 2)
    monkeypatch.setattr(F, "TRITON_ERROR", "moved")
    jaxpr = str(jax.make_jaxpr(lambda a, b, c: F.dot_sum(F.fma(a, b, c), b, 1))(a, b, c))
    assert "iva_fma" not in jaxpr and "iva_dot_sum" not in jaxpr
    np.testing.assert_allclose(F.dot_sum(F.fma(a, b, c), b, 1),
                               np.sum((np.float64(a) * np.float64(b) + np.float64(c)) * np.float64(b), 1),
                               rtol=1e-5, atol=1e-5)
