"""Selective scan (iva_jax.ssm.scan): every XLA implementation, values and VJPs, vs a float64 reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iva_jax.ssm import scan as S
from test_ssm_reference import ARG_NAMES, FAST_COMPILE, make_inputs, rel_err, scan_ref_np, scan_ref_vjp

# name -> (make_inputs kwargs, delta_softplus)
CASES = {
    "full": (dict(dim=5, groups=None), True),  # D, z, delta_bias, softplus, 3-D B/C
    "bare": (dict(dim=6, groups=2, D=False, z=False, bias=False), False),  # grouped, nothing optional
    "mixed": (dict(dim=6, groups=3, D=True, z=False, bias=True), True),
    "bare_l12": (dict(dim=6, groups=2, D=False, z=False, bias=False, seqlen=12), False),  # kernel: full chunks
}
LOW = ("u", "delta", "B", "C", "z")  # activations cast to bf16 in the bf16 runs (A, D, bias stay f32)


@functools.lru_cache(maxsize=None)
def case(name: str, dtype: str = "float32"):
    """(jax args, softplus, ref out, ref last, cotangents, ref grads) for one case, cached per module."""
    kw, sp = CASES[name]
    args = make_inputs(np.random.default_rng(hash(name) % 2**32), **kw)
    jargs = {}
    for k, v in args.items():
        if v is None:
            continue
        dt = jnp.bfloat16 if (dtype == "bfloat16" and k in LOW) else jnp.float32
        jargs[k] = jnp.asarray(v, dt)
    np_args = {k: (np.asarray(jargs[k], np.float64) if k in jargs else None) for k in ARG_NAMES}
    out, last = scan_ref_np(**np_args, delta_softplus=sp, return_last_state=True)
    rng = np.random.default_rng(7)
    g_out, g_last = rng.standard_normal(out.shape), rng.standard_normal(last.shape)
    if dtype == "bfloat16":
        g_out = np.asarray(jnp.asarray(g_out, jnp.bfloat16), np.float64)
    _, grads = scan_ref_vjp(np_args, sp, g_out, g_last)
    return jargs, sp, out, last, (g_out, g_last), grads


def run(jargs, sp, impl, ct, **kw):
    """(out, last, {name: grad}) of one implementation, forward and VJP in a single jit."""
    names = tuple(jargs)

    def f(*vals):
        a = dict(zip(names, vals))
        return S.selective_scan(**a, delta_softplus=sp, return_last_state=True, impl=impl, **kw)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def fwd_bwd(vals, g_out, g_last):
        (out, last), vjp = jax.vjp(f, *vals)
        return out, last, vjp((g_out.astype(out.dtype), g_last))

    out, last, grads = fwd_bwd(tuple(jargs.values()), jnp.asarray(ct[0], jnp.float32), jnp.asarray(ct[1], jnp.float32))
    return out, last, dict(zip(names, grads))


def assert_matches_reference(got, jargs, out_ref, last_ref, g_ref, dtype: str = "float32"):
    """(out, last, grads) of `run` against the float64 references: f32 to 2e-5 (out, last) and 5e-5 (grads);
    bf16 activations to 1e-2 (out, grads) and 1e-4 (last: the state stays f32, only the inputs were rounded)."""
    out, last, grads = got
    f32 = dtype == "float32"
    assert out.dtype == jnp.dtype(dtype) and last.dtype == jnp.float32
    assert out.shape == out_ref.shape and last.shape == last_ref.shape
    assert rel_err(out, out_ref) < (2e-5 if f32 else 1e-2)
    assert rel_err(last, last_ref) < (2e-5 if f32 else 1e-4)
    assert set(grads) == set(g_ref)
    for k in grads:
        assert grads[k].shape == jargs[k].shape and grads[k].dtype == jargs[k].dtype, k
        assert rel_err(grads[k], g_ref[k]) < (5e-5 if f32 else 1e-2), (k, rel_err(grads[k], g_ref[k]))


IMPL_KW = {"sequential": {}, "associative": {}, "chunked": {"chunk_size": 8}}


F32_RUNS = [("sequential", "full"), ("sequential", "bare"), ("sequential", "mixed"), ("associative", "full"),
            ("associative", "bare"), ("chunked", "full"), ("chunked", "bare")]


@pytest.mark.parametrize("impl,name", F32_RUNS)
def test_values_and_vjps_f32(impl, name):
    jargs, sp, out_ref, last_ref, ct, g_ref = case(name)
    assert_matches_reference(run(jargs, sp, impl, ct, **IMPL_KW[impl]), jargs, out_ref, last_ref, g_ref)


@pytest.mark.parametrize("impl", list(IMPL_KW))
def test_values_and_vjps_bf16(impl):
    jargs, sp, out_ref, last_ref, ct, g_ref = case("full", "bfloat16")
    assert_matches_reference(run(jargs, sp, impl, ct, **IMPL_KW[impl]), jargs, out_ref, last_ref, g_ref, "bfloat16")


def test_without_last_state_and_chunk_larger_than_seq():
    jargs, sp, out_ref, _, _, _ = case("full")
    f = jax.jit(lambda a: S.selective_scan(**a, delta_softplus=sp, impl="chunked", chunk_size=1000),
                compiler_options=FAST_COMPILE)
    out = f(jargs)
    assert not isinstance(out, tuple)
    assert rel_err(out, out_ref) < 2e-5


def test_auto_resolves_to_sequential_on_cpu():
    assert S.resolve_impl("auto") == S.AUTO_CPU == "sequential"


def test_bad_inputs_raise():
    jargs, *_ = case("full")
    a = dict(jargs)
    with pytest.raises(ValueError, match="impl"):
        S.selective_scan(**a, impl="fast")
    with pytest.raises(ValueError, match="delta shape"):
        S.selective_scan(**{**a, "delta": a["delta"][:, :, :-1]})
    with pytest.raises(ValueError, match="time-invariant"):
        S.selective_scan(**{**a, "B": jnp.ones((5, 3))})
    with pytest.raises(ValueError, match="A must be"):
        S.selective_scan(**{**a, "A": a["A"][:-1]})
    with pytest.raises(ValueError, match="groups"):
        S.selective_scan(**{**a, "B": jnp.ones((2, 2, 3, 37)), "C": jnp.ones((2, 2, 3, 37))})
    with pytest.raises(ValueError, match="D must be"):
        S.selective_scan(**{**a, "D": jnp.ones(4)})
    with pytest.raises(ValueError, match="chunk_size"):
        S.selective_scan(**a, impl="chunked", chunk_size=0)


@pytest.mark.parametrize("impl", ["sequential", "associative", "chunked", "pallas"])
def test_initial_state_continues_a_split_scan(impl):
    """Scanning [0, 16) and then [16, 37) from the first part's last state (`initial_state`) is the scan of the
    whole sequence: values and VJPs (through the carried state too) against the float64 reference."""
    jargs, sp, out_ref, last_ref, ct, g_ref = case("full")
    names = tuple(jargs)
    kw = {"chunked": dict(chunk_size=8), "pallas": dict(interpret=True)}.get(impl, {})
    cut = 16

    def f(*vals):
        a = dict(zip(names, vals))
        b, d, l = a["u"].shape
        t = lambda x: jnp.transpose(x, (0, 2, 1))  # noqa: E731
        u, dt, z = t(a["u"]), t(a["delta"]), t(a["z"])
        Bl, Cl = (S._bc_to_bld(a[k], k, b, l, a["A"].shape[1]) for k in ("B", "C"))
        part = lambda s, h0: S.selective_scan_bld(  # noqa: E731
            u[:, s], dt[:, s], a["A"], Bl[:, s], Cl[:, s], a["D"], z[:, s], a["delta_bias"], sp, impl=impl,
            initial_state=h0, **kw)
        o1, h1 = part(slice(0, cut), None)
        o2, h2 = part(slice(cut, l), h1)
        return t(jnp.concatenate([o1, o2], 1)), h2

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def fwd_bwd(vals, g_out, g_last):
        (out, last), vjp = jax.vjp(f, *vals)
        return out, last, vjp((g_out, g_last))

    out, last, grads = fwd_bwd(tuple(jargs.values()), jnp.asarray(ct[0], jnp.float32), jnp.asarray(ct[1], jnp.float32))
    assert rel_err(out, out_ref) < 2e-5 and rel_err(last, last_ref) < 2e-5
    for k, g in zip(names, grads):
        assert rel_err(g, g_ref[k]) < 5e-5, (k, rel_err(g, g_ref[k]))
    with pytest.raises(ValueError, match="initial_state shape"):
        S.selective_scan_bld(jnp.ones((2, 4, 5)), jnp.ones((2, 4, 5)), jnp.ones((5, 3)), jnp.ones((2, 4, 1, 3)),
                             jnp.ones((2, 4, 1, 3)), initial_state=jnp.ones((2, 3, 5)))
