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
# masked last one.
CFG = K.ScanBlockConfig(block_d=2, chunk=2, ckpt_chunk=8, bwd_chunk=2, block_d_bwd=2)


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
