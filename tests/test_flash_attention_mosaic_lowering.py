"""The Mosaic GPU attention backward lowers for CUDA on this CPU machine (no GPU needed).

`jax.export(..., platforms=["cuda"])` runs the whole Pallas -> Mosaic GPU lowering of the forward and
of the VJP; the serialized Mosaic module then names the PTX it will emit.  Checks that the fused-dQ
backward (one dK/dV kernel that adds dQ partials into an aliased f32 buffer with TMA reduce-add)
lowers for GQA / MHA, head_dim 64 / 128, window, q_offset and segment ids, and that the two-kernel
path (separate dQ kernel) still lowers.  Numerics need the GPU: experiments/check_kernels_gpu.py.
"""

from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import pytest

dispatch = importlib.import_module("kernels.dispatch")
fa = importlib.import_module("kernels.flash_attention")
fam = importlib.import_module("kernels.flash_attention_mosaic")

_REDUCE = "cp.reduce.async.bulk.tensor"  # the PTX of the f32 TMA reduce-add


@pytest.fixture(autouse=True)
def _fake_h100(monkeypatch):
    """The dispatcher sees an sm90 device, so impl="mosaic" traces the Mosaic kernels."""
    monkeypatch.setattr(dispatch, "device_info", lambda: dispatch.DeviceInfo("cuda", "NVIDIA H100 (lowering test)",
                                                                           (9, 0), 132))


def _export_grad(tiles, *, b, sq, skv, hq, hkv, d, window=None, q_offset=0, segments=False) -> str:
    """StableHLO text of jit(grad(sum(flash_attention))) exported for CUDA with the given backward tiles."""
    saved = fam.TILES
    fam.TILES = tiles  # backward(tiles=None) reads it at trace time
    try:
        def loss(q, k, v, *ids):
            seg = dict(q_segment_ids=ids[0], kv_segment_ids=ids[1]) if ids else {}
            o = fa.flash_attention(q, k, v, causal=True, sliding_window=window, q_offset=q_offset, impl="mosaic",
                                   **seg)
            return jnp.sum(o.astype(jnp.float32))

        spec = jax.ShapeDtypeStruct
        args = [spec((b, sq, hq, d), jnp.bfloat16), spec((b, skv, hkv, d), jnp.bfloat16),
                spec((b, skv, hkv, d), jnp.bfloat16)]
        if segments:
            args += [spec((b, sq), jnp.int32), spec((b, skv), jnp.int32)]
        exported = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=["cuda"])(*args)
        return exported.mlir_module()
    finally:
        fam.TILES = saved


FUSED = [
    # split dQ (head_dim 128: each warpgroup half of dQ's columns), GQA 4:1, length not a tile multiple
    dict(tiles=dict(dq_split=True), b=1, sq=200, skv=200, hq=4, hkv=1, d=128),
    # head_dim 64 (split over 32-column halves: 64-byte swizzle), window, q_offset, q_len != kv_len
    dict(tiles=dict(dq_split=True), b=1, sq=96, skv=250, hq=4, hkv=2, d=64, window=37, q_offset=154),
    # segment ids, MHA, the per-warpgroup variant at head_dim 128
    dict(tiles=dict(dq_split=False), b=2, sq=136, skv=136, hq=2, hkv=2, d=128, segments=True),
]


@pytest.mark.parametrize("case", FUSED, ids=["gqa4_d128_split", "d64_window_offset", "segments_d128_own"])
def test_fused_dq_backward_lowers(case):
    case = dict(case)
    tiles = dataclasses.replace(fam.Tiles(), fused_dq=True, **case.pop("tiles"))
    txt = _export_grad(tiles, **case)
    assert txt.count("custom_call @mosaic_gpu") == 2  # forward + the fused dK/dV/dQ kernel, no dQ kernel
    assert txt.count("flash_attention_dkv_dq") == 1
    assert txt.count(_REDUCE) == 1 and "add.tile" in txt  # dQ partials go out through f32 TMA reduce-add
    assert "output_operand_alias" in txt  # the zeroed f32 dQ buffer is aliased in and out of the kernel


def test_two_kernel_backward_still_lowers():
    tiles = dataclasses.replace(fam.Tiles(), fused_dq=False)
    txt = _export_grad(tiles, b=1, sq=200, skv=200, hq=4, hkv=2, d=128)
    assert txt.count("custom_call @mosaic_gpu") == 3  # forward, dQ, dK/dV
    assert _REDUCE not in txt


def test_fused_dq_backward_lowers_inside_shard_map():
    """The aliased f32 dQ buffer also works per shard (how iva_jax.parallel calls the kernels)."""
    import numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    from iva_jax.parallel.kernel_sharding import shard_map

    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    attend = shard_map(lambda q, k, v: fa.flash_attention(q, k, v, causal=True, impl="mosaic"), mesh=mesh,
                       in_specs=(P("data"),) * 3, out_specs=P("data"), check=False)
    spec = jax.ShapeDtypeStruct
    args = [spec((2, 136, 4, 128), jnp.bfloat16), spec((2, 136, 2, 128), jnp.bfloat16),
            spec((2, 136, 2, 128), jnp.bfloat16)]
    saved, fam.TILES = fam.TILES, dataclasses.replace(fam.Tiles(), fused_dq=True)
    try:
        grad = jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
        txt = jax.export.export(jax.jit(grad), platforms=["cuda"])(*args).mlir_module()
    finally:
        fam.TILES = saved
    assert txt.count("custom_call @mosaic_gpu") == 2 and txt.count(_REDUCE) == 1


def test_fused_dq_backward_lowers_under_vmap():
    """vmap folds into the batch axis (the kernel with its aliased dQ buffer cannot batch itself)."""
    spec = jax.ShapeDtypeStruct
    args = [spec((2, 1, 72, 4, 128), jnp.bfloat16), spec((2, 1, 72, 2, 128), jnp.bfloat16),
            spec((1, 72, 2, 128), jnp.bfloat16)]
    saved, fam.TILES = fam.TILES, dataclasses.replace(fam.Tiles(), fused_dq=True)
    try:
        grad = jax.grad(lambda q, k, v: jnp.sum(fa.flash_attention(q, k, v, impl="mosaic").astype(jnp.float32)),
                        argnums=(0, 1, 2))
        txt = jax.export.export(jax.jit(jax.vmap(grad, in_axes=(0, 0, None))), platforms=["cuda"])(*args).mlir_module()
    finally:
        fam.TILES = saved
    assert txt.count("custom_call @mosaic_gpu") == 2 and txt.count(_REDUCE) == 1
