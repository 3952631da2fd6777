"""The selective-scan kernel's forward variants in interpret mode: the chunked forward (scan_chunk, the default)
and the per-step forward's options (group_loads, prefetch, time_splits): values and VJPs vs float64 references,
the time-split plan, and Triton lowering of the kernels for CUDA."""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_ssm_reference import ARG_NAMES, make_inputs, scan_ref_np, scan_ref_vjp
from test_ssm_scan import LOW, S, assert_matches_reference, rel_err, run

K = importlib.import_module("kernels.selective_scan")  # the module (kernels/__init__ exports the function)

# dim 24 in 2 groups of 12 (padded to 16 per group with block_d 8), dstate 4; D, z, delta_bias, softplus all on.
# seqlen 100 = 12 * 8 + 4: a masked last sub-chunk (and, with prefetch, a clamped load past the end).
# seqlen 96 = 3 * 32: time splits need seqlen to be a multiple of time_splits * ckpt_chunk.
SHAPE = dict(batch=2, dim=24, dstate=4, groups=2)
BASE = dict(block_d=8, chunk=8, ckpt_chunk=16, bwd_chunk=4, scan_chunk=0)  # the per-step forward
SPLIT = dict(block_d=8, chunk=4, ckpt_chunk=8, bwd_chunk=4, scan_chunk=0)
CONFIGS = {  # name -> (seqlen, config)
    # the chunked forward: 100 = 12 * 8 + 4 (a masked last chunk), 2 chunks per checkpoint
    "chunked": (100, K.ScanBlockConfig(block_d=8, ckpt_chunk=16, bwd_chunk=4, scan_chunk=8)),
    # 4-step chunks, block_d from the default rule (2048 / (4 * 4) = 128 -> the padded group of 16), 96 = 24 * 4
    "chunked4": (96, K.ScanBlockConfig(ckpt_chunk=8, bwd_chunk=4, scan_chunk=4)),
    # the chunked forward's load pipelines, 3 chunks per trip: 13 chunks = 4 trips + 1 left over
    "rotate3": (100, K.ScanBlockConfig(block_d=8, ckpt_chunk=16, bwd_chunk=4, scan_pipeline="rotate",
                                       scan_unroll=3)),
    "slots3": (100, K.ScanBlockConfig(block_d=8, ckpt_chunk=16, bwd_chunk=4, scan_pipeline="slots", scan_unroll=3)),
    "group_loads": (100, K.ScanBlockConfig(**BASE, group_loads=True)),
    "prefetch": (100, K.ScanBlockConfig(**BASE, prefetch=True)),
    # 4 segments of 24 steps = 3 checkpoint chunks of 8 each
    "splits4": (96, K.ScanBlockConfig(**SPLIT, time_splits=4)),
    # time_splits 8 -> 4 (96 is not a multiple of 8 * 8); prefetch's flat loop saves every other trip's state
    "splits8_prefetch": (96, K.ScanBlockConfig(**{**SPLIT, "block_d": 4}, time_splits=8, prefetch=True)),
}


@functools.lru_cache(maxsize=None)
def _case(seqlen: int, dtype: str = "float32"):
    """(jax args, ref out, ref last, cotangents, ref grads): float64 numpy values and torch float64 VJPs of the
    inputs as the kernel sees them (activations rounded to `dtype`; A, D, delta_bias f32)."""
    args = make_inputs(np.random.default_rng(6), seqlen=seqlen, **SHAPE)
    args["delta_bias"] = args["delta_bias"] - 3.0  # dt ~ 0.05 (Mamba's range): a segment's start state matters
    act = jnp.dtype(dtype)
    jargs = {k: jnp.asarray(v, act if k in LOW else jnp.float32) for k, v in args.items() if v is not None}
    np_args = {k: (np.asarray(jargs[k], np.float64) if k in jargs else None) for k in ARG_NAMES}
    out, last = scan_ref_np(**np_args, delta_softplus=True, return_last_state=True)
    rng = np.random.default_rng(8)
    ct = (np.asarray(jnp.asarray(rng.standard_normal(out.shape), act), np.float64), rng.standard_normal(last.shape))
    _, grads = scan_ref_vjp(np_args, True, *ct)
    return jargs, out, last, ct, grads


@functools.lru_cache(maxsize=None)
def _kernel(name: str):
    seqlen, cfg = CONFIGS[name]
    jargs, _, _, ct, _ = _case(seqlen)
    return run(jargs, True, "pallas", ct, interpret=True, config=cfg)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_option_values_and_vjps_f32(name):
    jargs, out_ref, last_ref, _, g_ref = _case(CONFIGS[name][0])
    got = _kernel(name)
    assert set(g_ref) == set(jargs)
    assert_matches_reference(got, jargs, out_ref, last_ref, g_ref)


def test_options_values_and_vjps_bf16():
    """bf16 activations through time splits and prefetch at once (the prefetched rows are carried in bf16), and
    through the chunked forward (its carried rows are bf16 too)."""
    for name in ("splits8_prefetch", "chunked"):
        seqlen, cfg = CONFIGS[name]
        jargs, out_ref, last_ref, ct, g_ref = _case(seqlen, "bfloat16")
        assert_matches_reference(run(jargs, True, "pallas", ct, interpret=True, config=cfg), jargs, out_ref,
                                 last_ref, g_ref, "bfloat16")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chunked_pipelines_forward_only(dtype):
    """The forward without checkpoints (inference) through each load pipeline at its default unroll (f32 slots 4,
    bf16 rotate 2: 13 chunks leave 1 over) and slots with 1 and 2 chunks per trip, against float64 numpy."""
    jargs, out_ref, last_ref, _, _ = _case(100, dtype)
    tol = 2e-5 if dtype == "float32" else 2e-2
    for pipe, unroll in ((None, None), ("rotate", None), ("slots", None), ("slots", 1), ("slots", 2)):
        cfg = K.ScanBlockConfig(block_d=8, ckpt_chunk=16, scan_pipeline=pipe, scan_unroll=unroll)
        out, last = jax.jit(lambda a, cfg=cfg: S.selective_scan(**a, delta_softplus=True, return_last_state=True,
                                                              impl="pallas", interpret=True, config=cfg))(jargs)
        assert out.dtype == jnp.dtype(dtype)
        assert rel_err(out, out_ref) < tol and rel_err(last, last_ref) < tol, (pipe, unroll)


def test_load_schedules_are_the_same_arithmetic():
    """group_loads and prefetch only move loads: values and gradients are bit-identical to the default's."""
    jargs, _, _, ct, _ = _case(100)
    out0, last0, grads0 = run(jargs, True, "pallas", ct, interpret=True, config=K.ScanBlockConfig(**BASE))
    for name in ("group_loads", "prefetch"):
        out, last, grads = _kernel(name)
        np.testing.assert_array_equal(out, out0, err_msg=name)
        np.testing.assert_array_equal(last, last0, err_msg=name)
        for k in grads:
            np.testing.assert_array_equal(grads[k], grads0[k], err_msg=f"{name} d{k}")


def test_time_split_plan():
    """Segments are whole checkpoint chunks: time_splits drops to the largest power of two that allows it."""
    def splits(l, **kw):
        st = K._make_static(l, 1, 8, 4, K.ScanBlockConfig(scan_chunk=0, **kw), softplus=False, has_D=False, has_z=False,
                            has_bias=False, interpret=True)
        assert st.P == 1 or l % (st.P * st.K1) == 0
        return st.P

    assert splits(4096, ckpt_chunk=64) == 1
    assert splits(4096, ckpt_chunk=64, time_splits=4) == 4
    assert splits(4096, ckpt_chunk=64, time_splits=128) == 64
    assert splits(96, ckpt_chunk=8, time_splits=8) == 4
    assert splits(100, ckpt_chunk=16, time_splits=4) == 1  # 100 is no multiple of 2 * 16
    assert splits(10, ckpt_chunk=64, time_splits=8) == 1
    with pytest.raises(ValueError, match="time_splits"):
        K.ScanBlockConfig(time_splits=3)
    for flag in ("prefetch", "group_loads"):
        with pytest.raises(ValueError, match=flag):
            K.ScanBlockConfig(**{flag: 1})
    with pytest.raises(ValueError, match="scan_chunk=0"):
        K.ScanBlockConfig(time_splits=2)  # the chunked forward (the default) has no time splits
    with pytest.raises(ValueError, match="scan_chunk"):
        K.ScanBlockConfig(scan_chunk=6)


@pytest.mark.parametrize("seqlen,kw,kernels", [
    (48, dict(), ("selective_scan_fwd", "selective_scan_bwd")),  # the default config (forward with checkpoints)
    (52, dict(), ("selective_scan_fwd", "selective_scan_bwd")),  # chunked, 52 = 6 * 8 + 4: masked loads and stores
    (52, dict(scan_pipeline="rotate"), ("selective_scan_fwd", "selective_scan_bwd")),
    (52, dict(scan_pipeline="slots", scan_unroll=3), ("selective_scan_fwd", "selective_scan_bwd")),
    (52, dict(prefetch=True, scan_chunk=0), ("selective_scan_fwd", "selective_scan_bwd")),  # per-step, masked tail
    (96, dict(prefetch=True, time_splits=4, scan_chunk=0),
     ("selective_scan_state", "selective_scan_fwd", "selective_scan_bwd")),
    (96, dict(group_loads=True, time_splits=2, scan_chunk=0),
     ("selective_scan_state", "selective_scan_fwd", "selective_scan_bwd")),
])
def test_options_lower_to_triton_for_cuda(seqlen, kw, kernels):
    """The options lowered for a CUDA target on this CPU box (forward with checkpoints, backward, and with time
    splits the state pass): interpret mode cannot see Triton-lowering errors."""
    from jax import export

    b, l, d, n = 1, seqlen, 24, 16
    sd = jax.ShapeDtypeStruct
    args = (sd((b, l, d), jnp.bfloat16), sd((b, l, d), jnp.bfloat16), sd((d, n), jnp.float32),
            sd((b, l, 2, n), jnp.bfloat16), sd((b, l, 2, n), jnp.bfloat16), sd((d,), jnp.float32),
            sd((b, l, d), jnp.bfloat16), sd((d,), jnp.float32))
    cfg = K.ScanBlockConfig(ckpt_chunk=16, **kw)

    def loss(*a):
        out, last = K.selective_scan_triton(*a, delta_softplus=True, config=cfg)
        return out.astype(jnp.float32).sum() + last.sum()

    exp = export.export(jax.jit(jax.grad(loss, argnums=tuple(range(8)))), platforms=("cuda",),
                        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    text = exp.mlir_module()
    assert text.count("__gpu$xla.gpu.triton") == len(kernels)
    assert all(k in text for k in kernels)


def test_falls_back_to_the_per_step_forward_without_the_scan_rule(monkeypatch):
    """If a jax version moved Pallas' lowering table (linear_scan.TRITON_ERROR set, no tt.scan rule), the kernel
    warns and lowers the per-step kernels instead of failing deep in the Triton lowering."""
    from jax import export
    from jax._src.pallas.triton import lowering as tl

    from kernels import linear_scan

    monkeypatch.setattr(linear_scan, "TRITON_ERROR", "test: lowering table moved")
    monkeypatch.delitem(tl.triton_lowering_rules, linear_scan.linear_scan_p)
    sd = jax.ShapeDtypeStruct
    b, l, d, n = 1, 40, 16, 4
    args = (sd((b, l, d), jnp.float32), sd((b, l, d), jnp.float32), sd((d, n), jnp.float32),
            sd((b, l, 1, n), jnp.float32), sd((b, l, 1, n), jnp.float32))

    def loss(*a):
        out, last = K.selective_scan_triton(*a, config=K.ScanBlockConfig(ckpt_chunk=8))
        return out.sum() + last.sum()

    with pytest.warns(RuntimeWarning, match="lowering table moved.*scan_chunk=0"):
        exp = export.export(jax.jit(jax.grad(loss, argnums=(0, 1))), platforms=("cuda",),
                            disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    assert exp.mlir_module().count("__gpu$xla.gpu.triton") == 2  # the per-step forward and backward
