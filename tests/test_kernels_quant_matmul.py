"""Weight-only quantized matmul: Pallas kernel (interpret mode) and XLA vs a float64 numpy dequant-matmul.

int8 / int4, symmetric / asymmetric, 3 rows, K = 192 (three groups of 64), N = 72 (not a multiple of
the column block), split-K 1 and 3; bf16 activations; the VJP w.r.t. x; CUDA lowering; bad input.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

qm = importlib.import_module("kernels.quant_matmul")

M, K, N, G = 3, 192, 72, 64


def numpy_dequant(codes, scale, zero, bits, g):
    """Independent float64 decode of the documented format (int4 unpacked nibble by nibble)."""
    codes = np.asarray(codes)
    if bits == 4:
        k2, n = codes.shape
        u = np.zeros((2 * k2, n), np.int64)
        for grp in range(2 * k2 // g):
            for r in range(g // 2):
                byte = codes[grp * g // 2 + r].astype(np.int64)
                u[grp * g + r] = byte & 15
                u[grp * g + g // 2 + r] = byte >> 4
        vals = u - (8 if zero is None else 0)
    else:
        vals = codes.astype(np.int64)
    s = np.repeat(np.asarray(scale, np.float64), g, axis=0)
    w = vals * s
    if zero is not None:
        w = w + np.repeat(np.asarray(zero, np.float64), g, axis=0)
    return w


def weights(seed, bits, sym):
    rng = np.random.default_rng(seed)
    if bits == 8:
        q = rng.integers(-127, 128, (K, N)).astype(np.int8) if sym else rng.integers(0, 256, (K, N)).astype(np.uint8)
    else:
        q = rng.integers(0, 256, (K // 2, N)).astype(np.uint8)
    s = (rng.random((K // G, N)) * 0.05 + 0.01).astype(np.float16)
    z = None if sym else (rng.standard_normal((K // G, N)) * 0.1).astype(np.float16)
    return q, s, z


@pytest.mark.parametrize("bits,sym,splits", [(8, True, 1), (8, False, 3), (4, True, 3), (4, False, 1)])
def test_kernel_matches_float64(bits, sym, splits):
    q, s, z = weights(bits + sym, bits, sym)
    x = np.random.default_rng(7).standard_normal((M, K))
    exp = x @ numpy_dequant(q, s, z, bits, G)
    args = (jnp.asarray(x, jnp.float32), jnp.asarray(q), jnp.asarray(s), None if z is None else jnp.asarray(z))
    kw = dict(bits=bits, group_size=G)
    out = qm.quant_matmul(*args, impl="triton", interpret=True, blocks=qm.QuantBlocks(num_splits=splits), **kw)
    assert out.shape == (M, N) and out.dtype == jnp.float32
    for got in (out, qm.quant_matmul(*args, impl="xla", **kw), qm.reference(*args, **kw)):
        np.testing.assert_allclose(np.asarray(got), exp, rtol=2e-6, atol=2e-6 * np.abs(exp).max())


def test_xla_prefill_rows_use_the_dequantised_gemm():
    q, s, z = weights(5, 4, True)
    x = np.random.default_rng(6).standard_normal((40, K))  # > 16 rows: dequantise + one GEMM
    out = qm.quant_matmul(jnp.asarray(x, jnp.float32), jnp.asarray(q), jnp.asarray(s), bits=4, group_size=G, impl="xla")
    exp = x @ numpy_dequant(q, s, None, 4, G)
    np.testing.assert_allclose(np.asarray(out), exp, rtol=2e-6, atol=2e-6 * np.abs(exp).max())


def test_bf16_activations_and_vjp():
    q, s, z = weights(11, 4, False)
    x = jnp.asarray(np.random.default_rng(8).standard_normal((M, K)), jnp.bfloat16)
    exp = np.asarray(x, np.float64) @ numpy_dequant(q, s, z, 4, G)
    args = (jnp.asarray(q), jnp.asarray(s), jnp.asarray(z))
    out = qm.quant_matmul(x, *args, bits=4, group_size=G, impl="triton", interpret=True)
    assert out.dtype == jnp.bfloat16
    assert np.max(np.abs(np.asarray(out, np.float64) - exp)) < 1e-2 * np.abs(exp).max()

    ct = jnp.asarray(np.random.default_rng(9).standard_normal((M, N)), jnp.float32)
    xf = x.astype(jnp.float32)
    grads = [jax.jit(jax.grad(lambda x, impl=impl: jnp.sum(qm.quant_matmul(
        x, *args, bits=4, group_size=G, impl=impl, interpret=True) * ct)))(xf) for impl in ("triton", "xla")]
    exp_dx = np.asarray(ct, np.float64) @ numpy_dequant(q, s, z, 4, G).T
    for g in grads:
        np.testing.assert_allclose(np.asarray(g), exp_dx, rtol=1e-5, atol=1e-5 * np.abs(exp_dx).max())


def test_pack_roundtrip_and_dequantize_matches_numpy():
    codes = jnp.asarray(np.random.default_rng(1).integers(0, 16, (2, 128, 5)), jnp.uint8)
    packed = qm.pack_int4(codes, 64)
    assert packed.shape == (2, 64, 5) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(qm.unpack_int4(packed, 64)), np.asarray(codes))
    q, s, z = weights(3, 4, False)
    np.testing.assert_allclose(np.asarray(qm.dequantize(jnp.asarray(q), jnp.asarray(s), jnp.asarray(z), bits=4,
                                                        group_size=G)), numpy_dequant(q, s, z, 4, G), rtol=1e-6)


def test_triton_lowering_for_cuda():
    sd = jax.ShapeDtypeStruct
    texts = []
    for bits, zero, splits in ((4, True, 1), (4, False, 4), (8, False, 2)):
        k, n = 576, 1536
        wq = sd((k // 2 if bits == 4 else k, n), jnp.uint8 if (bits == 4 or zero) else jnp.int8)
        sc = sd((k // 64, n), jnp.float16)
        z = sc if zero else None

        def f(x, w, s, zz=None, bits=bits, splits=splits):
            return qm._triton(x, w, s, zz, bits, 64, jnp.bfloat16, qm.QuantBlocks(num_splits=splits), False)
        args = (sd((1, k), jnp.bfloat16), wq, sc) + ((z,) if zero else ())
        texts.append(jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text())
    assert all(t.count("__gpu$xla.gpu.triton") == 1 for t in texts)


def test_dispatch_and_bad_inputs():
    assert qm.choose_impl("auto", 1, jnp.bfloat16, 128) == "xla"  # CPU
    assert qm.choose_impl("auto", 1, jnp.float32, 64, interpret=True) == "triton"
    assert qm.choose_impl("auto", 500, jnp.float32, 64, interpret=True) == "xla"  # not a decode shape
    with pytest.raises(ValueError, match="cannot run"):
        qm.choose_impl("triton", 500, jnp.float32, 64, interpret=True)
    q, s, z = weights(0, 8, True)
    x = jnp.ones((M, K), jnp.float32)
    with pytest.raises(ValueError, match="bits"):
        qm.quant_matmul(x, jnp.asarray(q), jnp.asarray(s), bits=3, group_size=G)
    with pytest.raises(ValueError, match="even divisor"):
        qm.quant_matmul(x, jnp.asarray(q), jnp.asarray(s), bits=8, group_size=80)
    with pytest.raises(ValueError, match="must be int8"):
        qm.quant_matmul(x, jnp.asarray(q).astype(jnp.uint8), jnp.asarray(s), bits=8, group_size=G)
    with pytest.raises(ValueError, match="needs qweight"):
        qm.quant_matmul(x[:, :128], jnp.asarray(q), jnp.asarray(s), bits=8, group_size=G)
