"""kernels.grouped_matmul: Pallas (Triton, interpret mode) and XLA (ragged_dot) against a float64 numpy
loop, values and VJPs, f32 and bf16, empty groups, rows past sum(group_sizes), poisoned output,
and the Triton lowering for CUDA (cross-platform lowering runs on CPU)."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gm = importlib.import_module("kernels.grouped_matmul")  # the module (kernels/__init__ exports the function)

BLOCKS = dict(block_m=16, block_n=16, block_k=16)
M, K, N = 45, 40, 37
GS = np.array([7, 0, 20, 3, 9])  # an empty group, a group inside one tile, sum 39 < 45 (a zero tail)


def np_gmm(lhs, rhs, gs):
    out = np.zeros((lhs.shape[0], rhs.shape[2]))
    start = 0
    for g, size in enumerate(gs):
        out[start:start + size] = lhs[start:start + size] @ rhs[g]
        start += size
    return out


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    return rng.normal(size=(M, K)), rng.normal(size=(len(GS), K, N)), rng.normal(size=(M, N))


@pytest.mark.parametrize("impl", ["triton", "xla"])
def test_values_and_vjp_f32(case, impl):
    lhs, rhs, cot = case
    gs = jnp.asarray(GS, jnp.int32)
    f = jax.jit(lambda a, b: gm.grouped_matmul(a, b, gs, impl=impl, interpret=True, **BLOCKS))
    a, b = jnp.asarray(lhs, jnp.float32), jnp.asarray(rhs, jnp.float32)
    out, vjp = jax.vjp(f, a, b)
    np.testing.assert_allclose(out, np_gmm(lhs, rhs, GS), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[GS.sum():], 0.0)
    da, db = jax.jit(vjp)(jnp.asarray(cot, jnp.float32))
    _, vjp_ref = jax.vjp(lambda a, b: gm.reference(a, b, gs), a, b)
    da_ref, db_ref = vjp_ref(jnp.asarray(cot, jnp.float32))
    # float64 closed forms: d lhs rows of g = cot @ rhs[g].T ; d rhs[g] = lhs_g.T @ cot_g ; tail rows 0
    np.testing.assert_allclose(da, np_gmm(cot, rhs.transpose(0, 2, 1), GS), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(da, da_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(db, db_ref, rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(db[1]))) == 0.0  # empty group: zero gradient


def test_bf16(case):
    lhs, rhs, cot = case
    gs = jnp.asarray(GS, jnp.int32)
    a, b = jnp.asarray(lhs, jnp.bfloat16), jnp.asarray(rhs, jnp.bfloat16)
    f = jax.jit(lambda a, b: gm.grouped_matmul(a, b, gs, impl="triton", interpret=True, **BLOCKS))
    out, vjp = jax.vjp(f, a, b)
    assert out.dtype == jnp.bfloat16
    want = np_gmm(np.asarray(a, np.float64), np.asarray(b, np.float64), GS)
    np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=1e-2, atol=1e-2 * np.abs(want).max())
    da, db = vjp(jnp.asarray(cot, jnp.bfloat16))
    assert da.dtype == jnp.bfloat16 and db.dtype == jnp.bfloat16
    c64 = np.asarray(jnp.asarray(cot, jnp.bfloat16), np.float64)
    want_da = np_gmm(c64, np.asarray(b, np.float64).transpose(0, 2, 1), GS)
    np.testing.assert_allclose(np.asarray(da, np.float32), want_da, rtol=1e-2, atol=1e-2 * np.abs(want_da).max())


def test_every_output_row_written_and_one_group_many_tiles():
    """Poisoned (NaN) output buffer: every element must be written (groups, tile overlaps, zero tail)."""
    rng = np.random.default_rng(1)
    lhs, rhs = rng.normal(size=(70, 24)), rng.normal(size=(3, 24, 20))
    run = jax.jit(functools.partial(gm._gmm_pallas, out_dtype=jnp.float32, transpose_rhs=False, num_warps=4,
                                    num_stages=2, interpret=True, poison=True, **BLOCKS))
    for gs in ([70, 0, 0], [1, 1, 60], [0, 33, 30]):
        out = run(jnp.asarray(lhs, jnp.float32), jnp.asarray(rhs, jnp.float32), jnp.asarray(gs, jnp.int32))
        assert not np.isnan(np.asarray(out)).any(), gs
        np.testing.assert_allclose(out, np_gmm(lhs, rhs, np.array(gs)), rtol=1e-5, atol=1e-5)


def test_bad_input():
    a, b, gs = jnp.zeros((8, 4)), jnp.zeros((2, 4, 3)), jnp.array([4, 4], jnp.int32)
    with pytest.raises(ValueError, match=r"lhs \[M, K\] and rhs \[G, K, N\]"):
        gm.grouped_matmul(a, jnp.zeros((2, 5, 3)), gs)
    with pytest.raises(ValueError, match="group_sizes must be an integer array of shape"):
        gm.grouped_matmul(a, b, jnp.array([4.0, 4.0]))
    with pytest.raises(ValueError, match="block_n=24"):
        gm.grouped_matmul(a, b, gs, impl="triton", interpret=True, block_n=24)
    with pytest.raises(ValueError, match="impl=.cuda. must be one of"):
        gm.grouped_matmul(a, b, gs, impl="cuda")
    with pytest.raises(ValueError, match="cannot run"):  # no silent fallback for an explicit impl
        gm.grouped_matmul(a, b, gs, impl="triton", interpret=False)


def test_auto_on_cpu_is_xla_and_interpret_is_triton():
    assert gm._pick_impl("auto", False) == "xla"
    assert gm._pick_impl("auto", True) == "triton"
    assert gm._pick_impl("pallas", True) == "triton"


def test_triton_lowering_for_cuda():
    """The Pallas->Triton lowering (fwd and both backward kernels) succeeds for a bf16 MoE-like shape."""
    lhs = jax.ShapeDtypeStruct((300, 128), jnp.bfloat16)
    rhs = jax.ShapeDtypeStruct((5, 128, 256), jnp.bfloat16)
    gs = jax.ShapeDtypeStruct((5,), jnp.int32)
    fwd = lambda a, b, g: gm._gmm_triton(a, b, g, jnp.bfloat16, gm._Cfg(64, 128, 32, 4, 3, False))
    loss = lambda a, b, g: jnp.sum(fwd(a, b, g).astype(jnp.float32) ** 2)
    try:
        text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).trace(lhs, rhs, gs).lower(
            lowering_platforms=("cuda",)).as_text()
    except Exception as e:  # pragma: no cover - only if this jaxlib lacks the Triton dialect
        pytest.skip(f"cross-platform Triton lowering unavailable in this jaxlib: {e}")
    assert text.count("__gpu$xla.gpu.triton") == 3
