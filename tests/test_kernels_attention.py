"""Flash attention (interpret mode) vs a float64 reference: outputs, logsumexp and VJPs.

Covers seq 100 / q_len != kv_len with q_offset, GQA 3:1, sliding window 17, head_dim 64, 80 and 128,
segment ids with left padding, rows that see no key, and the lse cotangent.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

fa = importlib.import_module("kernels.flash_attention")

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1.5e-2}


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    fin = np.isfinite(b)
    np.testing.assert_array_equal(np.isfinite(a), fin)  # NaN = unwritten (interpret mode poisons outputs)
    if not fin.any():
        return 0.0
    return float(np.max(np.abs(a[fin] - b[fin])) / (np.max(np.abs(b[fin])) + 1e-30))


def _inputs(seed, b, sq, skv, hq, hkv, d, dtype):
    rng = np.random.default_rng(seed)
    mk = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)  # noqa: E731
    return mk(b, sq, hq, d), mk(b, skv, hkv, d), mk(b, skv, hkv, d), mk(b, sq, hq, d), \
        jnp.asarray(rng.standard_normal((b, hq, sq)), jnp.float32)


def _check(impl, dtype, q, k, v, do, dlse, **kw):
    (o, lse), vjp = jax.vjp(lambda q, k, v: fa.flash_attention_with_lse(q, k, v, impl=impl, interpret=True, **kw),
                            q, k, v)
    grads = vjp((do, dlse))
    assert o.dtype == dtype and all(g.dtype == dtype for g in grads)
    seg = {n: kw.pop(n) for n in ("q_segment_ids", "kv_segment_ids") if n in kw}
    with jax.enable_x64(True):
        f64 = lambda a: jnp.asarray(np.asarray(a, np.float64))  # noqa: E731
        (ro, rl), rvjp = jax.vjp(lambda q, k, v: fa.reference(q, k, v, return_lse=True, **kw, **seg),
                                 f64(q), f64(k), f64(v))
        rgrads = rvjp((f64(do), f64(dlse)))
    tol = TOL[dtype]
    errs = [_rel(o, ro), _rel(lse, rl)] + [_rel(a, b) for a, b in zip(grads, rgrads)]
    assert max(errs) < tol, errs
    return o, lse, grads


@pytest.mark.parametrize("impl", ["xla", "triton"])
def test_causal_gqa_seq100_f32(impl):
    q, k, v, do, dlse = _inputs(0, 1, 100, 100, 3, 1, 64, jnp.float32)
    _check(impl, jnp.float32, q, k, v, do, dlse, causal=True)


def test_offset_window_qlen_ne_kvlen_d128_f32():
    # 37 new queries after 63 cached keys: positions 63..99; window 17; GQA 3:1
    q, k, v, do, dlse = _inputs(1, 1, 37, 100, 3, 1, 128, jnp.float32)
    _check("triton", jnp.float32, q, k, v, do, dlse, causal=True, sliding_window=17, q_offset=63)


def test_segments_left_padding_window_bf16():
    b, s = 2, 50
    q, k, v, do, dlse = _inputs(2, b, s, s, 2, 1, 64, jnp.bfloat16)
    seg = np.ones((b, s), np.int32)
    seg[0, :9] = 0  # left padding of row 0 (pad tokens attend only to pad tokens)
    seg[1, 23:] = 2  # two packed sequences in row 1
    seg = jnp.asarray(seg)
    _check("triton", jnp.bfloat16, q, k, v, do, dlse, causal=True, sliding_window=17, q_segment_ids=seg,
           kv_segment_ids=seg)


def test_rows_that_see_no_key_are_zero():
    # q_offset -20: queries 0..19 sit before every key, so they see nothing
    q, k, v, do, dlse = _inputs(3, 1, 40, 48, 1, 1, 64, jnp.float32)
    o, lse, grads = _check("triton", jnp.float32, q, k, v, do, dlse, causal=True, q_offset=-20)
    np.testing.assert_array_equal(np.asarray(o[:, :20]), 0.0)
    assert np.isneginf(np.asarray(lse[:, :, :20])).all() and np.isfinite(np.asarray(lse[:, :, 20:])).all()
    np.testing.assert_array_equal(np.asarray(grads[0][:, :20]), 0.0)


def test_noncausal_head_dim_80_bf16():
    q, k, v, do, dlse = _inputs(4, 1, 33, 70, 1, 1, 80, jnp.bfloat16)
    _check("triton", jnp.bfloat16, q, k, v, do, dlse, causal=False)


def test_traced_q_offset_uses_xla_and_matches():
    q, k, v, _, _ = _inputs(5, 1, 8, 24, 2, 2, 16, jnp.float32)
    f = jax.jit(lambda q, k, v, off: fa.flash_attention(q, k, v, q_offset=off, impl="auto"))
    np.testing.assert_allclose(np.asarray(f(q, k, v, 16)), np.asarray(fa.reference(q, k, v, q_offset=16)),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="q_offset is traced"):
        jax.jit(lambda q, k, v, off: fa.flash_attention(q, k, v, q_offset=off, impl="triton", interpret=True))(
            q, k, v, 16)


def test_bad_inputs_raise():
    q = jnp.ones((1, 8, 4, 16))
    with pytest.raises(ValueError, match="not a multiple"):
        fa.flash_attention(q, jnp.ones((1, 8, 3, 16)), jnp.ones((1, 8, 3, 16)), impl="xla")
    with pytest.raises(ValueError, match="sliding_window"):
        fa.flash_attention(q, q, q, sliding_window=0, impl="xla")
    with pytest.raises(ValueError, match="segment ids"):
        fa.flash_attention(q, q, q, q_segment_ids=jnp.ones((1, 7), jnp.int32), impl="xla")
    with pytest.raises(ValueError, match="cannot run"):
        fa.flash_attention(q, q, q, impl="mosaic", interpret=True)
