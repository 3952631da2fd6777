"""The Pallas selective-scan kernel (kernels/selective_scan.py) in interpret mode: values and VJPs vs float64."""

from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import pytest

from test_ssm_reference import rel_err
from test_ssm_scan import assert_matches_reference, case, run

K = importlib.import_module("kernels.selective_scan")  # the module (kernels/__init__ exports the function)

# Tiny blocks so that one test crosses several dim blocks (atomic sums of dB/dC), padded dims
# (dim 5 -> 6, group of 3 -> 4), padded dstate (3 -> 4), several checkpoint chunks (37 = 4 * 8 + 5)
# and a partial last step chunk (5 = 2 * 2 + 1); the chunked forward (the default) then runs 8-step chunks with a
# masked last one, unrolled two per loop trip (2 trips and 1 chunk left over; bare_l12 keeps the default unroll).
CFG = K.ScanBlockConfig(block_d=2, chunk=2, ckpt_chunk=8, bwd_chunk=2, block_d_bwd=2, scan_unroll=2)


CFG_L12 = K.ScanBlockConfig(block_d=4, chunk=4, ckpt_chunk=8, bwd_chunk=4, block_d_bwd=2)  # no partial chunks


@pytest.mark.parametrize("name,cfg", [("full", CFG), ("bare_l12", CFG_L12),
                                      ("full", dataclasses.replace(CFG, scan_chunk=0))],  # the per-step forward
                         ids=["full", "bare_l12", "full_per_step"])
def test_kernel_values_and_vjps_f32(name, cfg):
    jargs, sp, out_ref, last_ref, ct, g_ref = case(name)
    assert_matches_reference(run(jargs, sp, "pallas", ct, interpret=True, config=cfg), jargs, out_ref, last_ref, g_ref)


def test_kernel_values_and_vjps_bf16():
    jargs, sp, out_ref, last_ref, ct, g_ref = case("full", "bfloat16")
    assert_matches_reference(run(jargs, sp, "pallas", ct, interpret=True, config=CFG), jargs, out_ref, last_ref,
                             g_ref, "bfloat16")


def test_dispatch_and_config_errors():
    jargs, sp, out_ref, *_ = case("full")
    bld = {k: (jnp.swapaxes(v, 1, -1) if k in ("u", "delta", "z") else v) for k, v in jargs.items()}
    bld["B"] = jnp.transpose(jargs["B"], (0, 2, 1))[:, :, None]
    bld["C"] = jnp.transpose(jargs["C"], (0, 2, 1))[:, :, None]
    out, last = jax.jit(lambda a: K.selective_scan(**a, delta_softplus=sp, impl="auto"))(bld)  # CPU: reference
    assert rel_err(jnp.swapaxes(out, 1, 2), out_ref) < 2e-5 and last.shape == (2, 5, 3)
    assert not K.triton_supported()
    with pytest.raises(ValueError, match="Mosaic"):
        K.selective_scan(**bld, impl="mosaic")
    with pytest.raises(ValueError, match="interpret=True"):
        K.selective_scan(**bld, impl="triton")  # no GPU here: says how to emulate it
    assert K.explain_auto()["any shape"][0] == "xla"
    if not K.VALIDATED_ON_GPU:  # the dispatcher never picks an unvalidated kernel on a GPU
        assert "not yet validated" in K.unsupported()["triton"] and "triton" not in K.unsupported(interpret=True)
    with pytest.raises(ValueError, match="block_d"):
        K.ScanBlockConfig(block_d=3)
    with pytest.raises(ValueError, match="scan_unroll"):
        K.ScanBlockConfig(scan_unroll=5)
    with pytest.raises(ValueError, match="scan_pipeline"):
        K.ScanBlockConfig(scan_pipeline="ahead")
    with pytest.raises(ValueError, match="B must be"):
        K.selective_scan(**{**bld, "B": bld["B"][:, :-1]}, impl="triton", interpret=True)


def test_package_exports_and_describe():
    """`from kernels import selective_scan, grouped_matmul` are the ops (functions); the modules stay reachable;
    `dispatch.describe()` lists selective_scan's auto choice (XLA on CPU, with the Triton reason)."""
    import kernels
    from kernels import dispatch, grouped_matmul, rms_norm, selective_scan

    assert callable(selective_scan) and selective_scan is K.selective_scan and kernels.selective_scan is selective_scan
    assert grouped_matmul is importlib.import_module("kernels.grouped_matmul").grouped_matmul
    assert rms_norm is importlib.import_module("kernels.rms_norm").rms_norm
    row = dispatch.describe()["selective_scan[any shape]"]
    assert row["impl"] == "xla" and "triton:" in row["why"]


def test_in_kernel_softplus_and_sigmoid_vs_float64():
    """The kernels' softplus (log1p as an atanh series) and sigmoid match float64 over the whole range: relative
    error ~2e-7 (1 + |x|), the f32 rounding of the exponent x log2 e being the one that grows with |x|; both sides of
    torch's threshold 20, where the f32 values are x and 1 exactly; NaN in, NaN out."""
    import numpy as np

    x = np.concatenate([np.linspace(-30, 30, 6001), [-100.0, -0.0, 0.0, 1e-8, 17.5, 19.99, 20.0, 20.01, 88.0]])
    x32 = jnp.asarray(x, jnp.float32)
    x64 = np.asarray(x32, np.float64)
    sp = np.asarray(jax.jit(lambda v: K._softplus_k(v, True))(x32), np.float64)
    sg = np.asarray(jax.jit(lambda v: K._sigmoid_k(v, True))(x32), np.float64)
    sp_ref = np.where(x64 > 20, x64, np.log1p(np.exp(np.minimum(x64, 20))))
    sg_ref = 1 / (1 + np.exp(-x64))
    tol = 2e-7 * (1 + np.abs(x64))
    assert np.all(np.abs(sp - sp_ref) <= tol * sp_ref + 1e-37)  # 1e-37: exp(-100) is below f32's normal range
    assert np.all(np.abs(sg - sg_ref) <= tol * sg_ref + 1e-37)
    assert np.max((np.abs(sp - sp_ref) / sp_ref)[np.abs(x64) < 10]) < 1e-6
    assert np.all(sp[x64 > 20] == np.float32(x64[x64 > 20])) and np.all(sg[x64 > 17.4] == 1.0)
    assert np.isnan(K._softplus_k(jnp.float32(np.nan), True)) and np.isnan(K._sigmoid_k(jnp.float32(np.nan), True))
