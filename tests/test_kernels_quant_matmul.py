"""Weight-only quantized matmul: Pallas kernel (interpret mode) and XLA vs a float64 numpy dequant-matmul.

int8 / int4, symmetric / asymmetric, 3 rows, K = 192 (three groups of 64), N = 72 (not a multiple of
the column block), split-K 1 and 3; every kernel path (int8 multiply-reduce GEMV and 16-row tl.dot, int4
word GEMV, integer-dot GEMV and tensor-core path) at M = 1, 2, 3, 16, groups 32 / 64 / 128, odd N (a partial
last word), partial loop steps; bf16 / f16 activations; NaN activations; the integer-dot GEMV's PTX run by a small
emulator of its instructions; the VJP w.r.t. x; CUDA lowering of every path; bad input.
The int4 words are built here with numpy's little-endian int32 view of the byte layout (independent of
the library's packing).
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

qm = importlib.import_module("kernels.quant_matmul")

M, K, N, G = 3, 192, 72, 64


def np_words(packed_bytes):
    """uint8 [K/2, N] -> int32 words [K/2, ceil(N/4)]: byte j of word c is column 4c + j (little-endian)."""
    b = np.asarray(packed_bytes, np.uint8)
    b = np.pad(b, [(0, 0), (0, -b.shape[1] % 4)])
    return np.ascontiguousarray(b).view("<i4")


def numpy_dequant(codes, scale, zero, bits, g):
    """Independent float64 decode of the documented format (int4 words -> bytes -> nibble by nibble)."""
    codes = np.asarray(codes)
    if bits == 4:
        n = np.asarray(scale).shape[1]
        codes = np.ascontiguousarray(codes.astype("<i4")).view(np.uint8).reshape(codes.shape[0], -1)[:, :n]
        k2 = codes.shape[0]
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


def weights(seed, bits, sym, k=K, n=N, g=G):
    rng = np.random.default_rng(seed)
    if bits == 8:  # the full code range, -128 included (the kernel's integer decode must get it right)
        q = rng.integers(-128, 128, (k, n)).astype(np.int8) if sym else rng.integers(0, 256, (k, n)).astype(np.uint8)
    else:
        q = np_words(rng.integers(0, 256, (k // 2, n)))
    s = (rng.random((k // g, n)) * 0.05 + 0.01).astype(np.float16)
    z = None if sym else (rng.standard_normal((k // g, n)) * 0.1).astype(np.float16)
    return q, s, z


@pytest.mark.parametrize("bits,sym,splits", [(8, True, 1), (8, False, 3), (4, True, 3), (4, False, 1)])
def test_kernel_matches_float64(bits, sym, splits):
    q, s, z = weights(bits + sym, bits, sym)
    x = np.random.default_rng(7).standard_normal((M, K))
    exp = x @ numpy_dequant(q, s, z, bits, G)
    args = (jnp.asarray(x, jnp.float32), jnp.asarray(q), jnp.asarray(s), None if z is None else jnp.asarray(z))
    kw = dict(bits=bits, group_size=G)
    blocks = qm.QuantBlocks(num_splits=splits, int4=qm.Int4Blocks(gemv_rows=M))  # f32 x: the int4 GEMV
    out = qm.quant_matmul(*args, impl="triton", interpret=True, blocks=blocks, **kw)
    assert out.shape == (M, N) and out.dtype == jnp.float32
    for got in (out, qm.quant_matmul(*args, impl="xla", **kw), qm.reference(*args, **kw)):
        np.testing.assert_allclose(np.asarray(got), exp, rtol=2e-6, atol=2e-6 * np.abs(exp).max())


I4 = qm.Int4Blocks
# (bits, sym, group, M, K, N, x dtype, blocks, path): int8 GEMV at M = 1, tl.dot at M = 16 (k-splits with a
# partial last step); int4 word GEMV at M = 1 / 2 (one and two programs per group, with and without the
# prefetch, 3 rows per program by gemv_rows), the int4 tl.dot path at M = 16 / 3 (bf16 / f32, a partial last
# step) and the tensor-core path at M = 16 / 3 (bf16 / f16, steps of 16 rows, two groups per program with a
# partial last split); odd N; groups 32 / 64 / 128
PATH_CASES = [
    (4, True, 128, 1, 384, 45, "float32", qm.QuantBlocks(), "w4_gemv"),
    (4, False, 32, 2, 160, 72, "float32", qm.QuantBlocks(int4=I4(parts=1, prefetch=False, unroll=2)), "w4_gemv"),
    (4, False, 64, 3, 256, 20, "float32", qm.QuantBlocks(int4=I4(gemv_rows=4, parts=4, unroll=8)), "w4_gemv"),
    (4, True, 128, 1, 384, 45, "bfloat16", qm.QuantBlocks(), "w4_idot"),
    (4, False, 64, 2, 320, 72, "float16", qm.QuantBlocks(int4=I4(idot_unroll=4, idot_parts=2)), "w4_idot"),
    (4, False, 32, 1, 160, 130, "bfloat16", qm.QuantBlocks(int4=I4(idot_unroll=8)), "w4_idot"),
    (4, True, 64, 2, 768, 128, "bfloat16", qm.QuantBlocks(int4=I4(idot_groups=4)), "w4_idot"),
    (4, False, 32, 1, 224, 256, "float16", qm.QuantBlocks(int4=I4(idot_groups=2, idot_parts=2, idot_unroll=4)),
     "w4_idot"),
    (4, False, 64, 2, 576, 72, "bfloat16", qm.QuantBlocks(int4=I4(idot_groups=2)), "w4_idot"),
    (8, True, 64, 1, 192, 33, "float32", qm.QuantBlocks(num_splits=2), "gemv"),
    (8, False, 32, 16, 160, 40, "float32", qm.QuantBlocks(block_k=64, num_splits=3), "dot"),
    (4, True, 32, 16, 96, 72, "bfloat16", qm.QuantBlocks(), "w4_dot"),
    (4, False, 128, 3, 640, 45, "float32", qm.QuantBlocks(block_k=256, num_splits=2), "w4_dot"),
    (4, True, 32, 16, 96, 72, "bfloat16", qm.QuantBlocks(int4=I4(dot_tiles=False)), "w4_mma"),
    (4, False, 64, 3, 320, 20, "float16", qm.QuantBlocks(int4=I4(dot_tiles=False, mma_rows=16, mma_groups=2)), "w4_mma"),
]


@pytest.mark.parametrize("case", range(len(PATH_CASES)))
def test_kernel_paths_match_float64(case):
    bits, sym, g, m, k, n, dt, blocks, path = PATH_CASES[case]
    q, s, z = weights(100 + case, bits, sym, k, n, g)
    x = jnp.asarray(np.random.default_rng(case).standard_normal((m, k)), dt)
    exp = np.asarray(x, np.float64) @ numpy_dequant(q, s, z, bits, g)
    out = qm.quant_matmul(x, jnp.asarray(q), jnp.asarray(s), None if z is None else jnp.asarray(z), bits=bits,
                          group_size=g, impl="triton", interpret=True, blocks=blocks, out_dtype=jnp.float32)
    assert qm.plan(m, k, n, g, blocks, bits=bits, x_dtype=dt)["path"] == path
    # f32 / exact 16-bit products with f32 sums; the tensor-core path carries an offset (2^7 or 2^10) * sum(x);
    # the integer-dot GEMV rounds each activation to 1/65534 of its program's max|x|
    tol = 1e-4 if path == "w4_idot" else {"float32": 2e-6, "bfloat16": 1e-5, "float16": 4e-5}[dt]
    np.testing.assert_allclose(np.asarray(out), exp, rtol=tol, atol=tol * np.abs(exp).max())


def test_plan_fills_the_gpu_without_partial_steps():
    p = qm.plan(1, 4096, 14336, 128)  # the decode shape of the benchmark
    assert p["path"] == "gemv" and p["per"] % p["gps"] == 0 and p["splits"] * p["per"] >= 32
    assert p["grid"][0] * p["grid"][1] >= 2 * 132
    assert qm.plan(16, 4096, 14336, 128)["path"] == "dot"
    p = qm.plan(1, 4096, 14336, 128, bits=4)  # int4: one warp per (512 columns, half a group): 1792 programs
    assert p["path"] == "w4_gemv" and p["grid"] == (28, 64) and p["splits"] == 64
    # one warp per (512 columns, group): 896 warps, 8 groups per program (4 partials)
    p = qm.plan(1, 4096, 14336, 128, bits=4, x_dtype=jnp.bfloat16)
    assert p["path"] == "w4_idot" and p["unroll"] == 16 and p["plen"] == 64
    assert p["gw"] == 8 and p["warps"] == 8 and p["grid"] == (28, 4) and p["splits"] == 4
    b1 = qm.QuantBlocks(int4=qm.Int4Blocks(idot_groups=1))
    p = qm.plan(1, 4096, 14336, 128, b1, bits=4, x_dtype=jnp.bfloat16)
    assert p["gw"] == 1 and p["warps"] == 1 and p["grid"] == (28, 32) and p["splits"] == 32
    assert qm.plan(1, 4096, 14000, 128, bits=4, x_dtype=jnp.bfloat16)["gw"] == 1  # a partial word block
    assert qm.plan(1, 576, 1536, 64, bits=4, x_dtype=jnp.bfloat16)["gw"] == 1  # 9 groups: gcd(8, 9)
    assert qm.plan(16, 4096, 14336, 128, bits=4)["path"] == "w4_dot"
    p = qm.plan(1, 4096, 14336, 128, qm.QuantBlocks(num_splits=5, block_k=256))  # 7 groups per split
    assert p["splits"] == 5 and p["per"] == 7 and p["gps"] == 1
    with pytest.raises(ValueError, match="block_k"):
        qm.QuantBlocks(block_k=96)


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
    blk = qm.QuantBlocks(int4=qm.Int4Blocks(gemv_rows=M))  # f32 x: the int4 GEMV
    grads = [jax.jit(jax.grad(lambda x, impl=impl: jnp.sum(qm.quant_matmul(
        x, *args, bits=4, group_size=G, impl=impl, interpret=True, blocks=blk) * ct)))(xf) for impl in ("triton", "xla")]
    exp_dx = np.asarray(ct, np.float64) @ numpy_dequant(q, s, z, 4, G).T
    for g in grads:
        np.testing.assert_allclose(np.asarray(g), exp_dx, rtol=1e-5, atol=1e-5 * np.abs(exp_dx).max())


def test_pack_roundtrip_and_dequantize_matches_numpy():
    codes = np.random.default_rng(1).integers(0, 16, (2, 128, 5)).astype(np.uint8)
    packed = qm.pack_int4(jnp.asarray(codes), 64)
    assert packed.shape == (2, 64, 2) and packed.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(qm.unpack_int4(packed, 64, 5)), codes)
    byte_view = codes[:, :32] | (codes[:, 32:64] << 4)  # first group of each layer: rows r and r + 32
    np.testing.assert_array_equal(np.asarray(packed[0, :32]), np_words(byte_view[0]))
    with pytest.raises(ValueError, match="do not hold"):
        qm.int4_bytes(packed, 9)
    q, s, z = weights(3, 4, False)
    np.testing.assert_allclose(np.asarray(qm.dequantize(jnp.asarray(q), jnp.asarray(s), jnp.asarray(z), bits=4,
                                                        group_size=G)), numpy_dequant(q, s, z, 4, G), rtol=1e-6)


def test_triton_lowering_for_cuda():
    sd = jax.ShapeDtypeStruct
    texts = []
    bf, f32 = jnp.bfloat16, jnp.float32
    for bits, zero, splits, m, xdt in ((4, True, 1, 1, bf), (4, False, 4, 2, bf), (8, False, 2, 3, bf), (4, True, 2, 16, bf),
                                       (8, False, 1, 9, bf), (4, False, 1, 5, bf), (4, True, 1, 7, bf), (4, False, 1, 1, f32)):
        k, n = 576, 1536
        wq = sd((k // 2, n // 4), jnp.int32) if bits == 4 else sd((k, n), jnp.uint8 if zero else jnp.int8)
        sc = sd((k // 64, n), jnp.float16)
        z = sc if zero else None

        def f(x, w, s, zz=None, bits=bits, splits=splits, m=m):  # M = 7: the int4 tensor-core path
            blk = qm.QuantBlocks(num_splits=splits, int4=qm.Int4Blocks(dot_tiles=m != 7))
            return qm._triton(x, w, s, zz, bits, 64, jnp.bfloat16, blk, False)
        args = (sd((m, k), xdt), wq, sc) + ((z,) if zero else ())
        texts.append(jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text())
    assert all(t.count("__gpu$xla.gpu.triton") == 1 for t in texts)


def test_idot_gemv_nan_activations_stay_nan():
    q, s, z = weights(21, 4, False, 256, 40, 64)
    x = np.random.default_rng(22).standard_normal((2, 256))
    x[1, 100] = np.nan
    out = np.asarray(qm.quant_matmul(jnp.asarray(x, jnp.bfloat16), jnp.asarray(q), jnp.asarray(s), jnp.asarray(z),
                                     bits=4, group_size=64, impl="triton", interpret=True, out_dtype=jnp.float32))
    assert np.isnan(out[1]).all()  # not the finite sum of the other activations
    exp = np.asarray(jnp.asarray(x[:1], jnp.bfloat16), np.float64) @ numpy_dequant(q, s, z, 4, 64)
    np.testing.assert_allclose(out[:1], exp, rtol=1e-4, atol=1e-4 * np.abs(exp).max())


def _run_ptx(text, operands):
    """A minimal emulator of the integer-dot GEMV's PTX (cvt.rni.s32.f32, prmt.b32, and.b32, shr.u32,
    dp2a.{lo,hi}.s32.u32), on Python ints; `operands` maps "$i" to input values; returns the register file."""
    regs = dict(operands)
    u32 = lambda v: v & 0xFFFFFFFF  # noqa: E731
    s16 = lambda v: ((v & 0xFFFF) ^ 0x8000) - 0x8000  # noqa: E731
    val = lambda t: int(t, 0) if t[0].isdigit() else regs[t]  # noqa: E731
    for line in text.splitlines():
        line = line.strip().rstrip(";")
        if not line or line[0] in "{}." or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        d, *src = [t.strip() for t in rest.split(",")]
        if op == "cvt.rni.s32.f32":
            regs[d] = u32(int(np.rint(np.float32(regs[src[0]]))))
        elif op == "prmt.b32":
            a, b, sel = val(src[0]), val(src[1]), val(src[2])
            pool = a | (b << 32)
            regs[d] = sum(((pool >> (8 * ((sel >> (4 * i)) & 7))) & 255) << (8 * i) for i in range(4))
        elif op == "and.b32":
            regs[d] = val(src[0]) & val(src[1])
        elif op == "shr.u32":
            regs[d] = val(src[0]) >> val(src[1])
        elif op.startswith("dp2a."):
            a, b, c = val(src[0]), val(src[1]), val(src[2])
            lo = 0 if ".lo." in op else 2
            acc = (c ^ 0x80000000) - 0x80000000
            acc += s16(a) * ((b >> (8 * lo)) & 255) + s16(a >> 16) * ((b >> (8 * lo + 8)) & 255)
            regs[d] = u32(acc)
        else:
            raise AssertionError(f"unexpected instruction {op}")
    return regs


def test_idot_ptx_matches_the_interpret_path():
    """The inline PTX of one thread's [4 rows, 4 words] step (operand e = 4 * row + word) against the jnp path
    the interpret-mode tests run: same accumulators, bit for bit."""
    rng = np.random.default_rng(5)
    w = rng.integers(-2**31, 2**31, (4, 4)).astype(np.int32)
    xl, xh = (rng.uniform(-32767, 32767, 4).astype(np.float32) for _ in range(2))
    acc = rng.integers(-2**20, 2**20, (4, 4)).astype(np.int32)
    ops = {f"${16 + e}": int(w.flat[e]) & 0xFFFFFFFF for e in range(16)}
    ops.update({f"${32 + 4 * r + c}": float(xl[r]) for r in range(4) for c in range(4)})
    ops.update({f"${48 + 4 * r + c}": float(xh[r]) for r in range(4) for c in range(4)})
    ops.update({f"${64 + e}": int(acc.flat[e]) & 0xFFFFFFFF for e in range(16)})
    regs = _run_ptx(qm._idot_asm_text(), ops)
    got = np.array([regs[f"${e}"] for e in range(16)], np.uint32).view(np.int32).reshape(4, 4)
    want = np.asarray(qm._idot_step(jnp.asarray(w)[:, None], jnp.asarray(xl)[:, None], jnp.asarray(xh)[:, None],
                                    jnp.asarray(acc)[:, None], True))[:, 0]
    np.testing.assert_array_equal(got, want)
    # and against plain arithmetic: element (j, c) sums rows r of column byte j of word c
    v = lambda x: np.rint(x).astype(np.int64)  # noqa: E731
    byte = (w.astype(np.int64)[None] >> (8 * np.arange(4))[:, None, None]) & 255  # [j, r, c]
    ref = acc + np.einsum("r,jrc->jc", v(xl), byte & 15) + np.einsum("r,jrc->jc", v(xh), byte >> 4)
    np.testing.assert_array_equal(got, ref)


def test_dispatch_and_bad_inputs():
    assert qm.choose_impl("auto", 1, jnp.bfloat16, 128) == "xla"  # CPU
    assert qm.choose_impl("auto", 1, jnp.float32, 64, interpret=True) == "triton"
    assert qm.choose_impl("auto", 500, jnp.float32, 64, interpret=True) == "xla"  # not a decode shape
    with pytest.raises(ValueError, match="cannot run"):
        qm.choose_impl("triton", 500, jnp.float32, 64, interpret=True)
    assert qm.choose_impl("auto", 3, jnp.bfloat16, 64, bits=4, interpret=True) == "triton"
    assert qm.choose_impl("auto", 3, jnp.float32, 64, bits=4, interpret=True) == "triton"  # int4 tl.dot path
    with pytest.raises(ValueError, match="f32 activations"):  # the int4 tensor-core path takes 16-bit x
        qm.choose_impl("triton", 3, jnp.float32, 64, bits=4, interpret=True,
                       blocks=qm.QuantBlocks(int4=qm.Int4Blocks(dot_tiles=False)))
    with pytest.raises(ValueError, match="power of 2"):
        qm.Int4Blocks(unroll=3)
    q, s, z = weights(0, 8, True)
    x = jnp.ones((M, K), jnp.float32)
    q4, s4, _ = weights(1, 4, True)
    with pytest.raises(ValueError, match="int4_words"):  # codes not in int32 words
        qm.quant_matmul(x, jnp.asarray(q4).astype(jnp.uint8), jnp.asarray(s4), bits=4, group_size=G)
    with pytest.raises(ValueError, match="bits"):
        qm.quant_matmul(x, jnp.asarray(q), jnp.asarray(s), bits=3, group_size=G)
    with pytest.raises(ValueError, match="even divisor"):
        qm.quant_matmul(x, jnp.asarray(q), jnp.asarray(s), bits=8, group_size=80)
    with pytest.raises(ValueError, match="must be int8"):
        qm.quant_matmul(x, jnp.asarray(q).astype(jnp.uint8), jnp.asarray(s), bits=8, group_size=G)
    with pytest.raises(ValueError, match="needs qweight"):
        qm.quant_matmul(x[:, :128], jnp.asarray(q), jnp.asarray(s), bits=8, group_size=G)
