"""The overlapped Mosaic GPU attention forward (`Tiles.fwd_overlap`) lowers for CUDA on this CPU machine.

FA3's intra-warpgroup overlap: each compute warpgroup issues S_j = Q K_j^T and O += P_{j-1} V_{j-1} together
and runs tile j's softmax while P V is in flight.  `jax.export(..., platforms=["cuda"])` runs the whole
Pallas -> Mosaic GPU lowering, which checks layouts, the barrier/accumulator plumbing and the SMEM budget
(227 KiB); register pressure (S_j f32 + P_{j-1} bf16 + O f32 per thread) and numerics need the GPU:
`CHECK_ATTN_IMPLS=mosaic,mosaic:ov python experiments/check_kernels_gpu.py --only attention`.
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

_MOSAIC = "custom_call @mosaic_gpu"
_OVERLAP_MARK = "ov_step"  # the overlapped loop body's name, kept in the Mosaic module's locations


@pytest.fixture(autouse=True)
def _fake_h100(monkeypatch):
    """The dispatcher sees an sm90 device, so impl="mosaic" traces the Mosaic kernels."""
    monkeypatch.setattr(dispatch, "device_info", lambda: dispatch.DeviceInfo("cuda", "NVIDIA H100 (lowering test)",
                                                                           (9, 0), 132))


def _spec(b, sq, skv, hq, hkv, d, segments):
    s = jax.ShapeDtypeStruct
    args = [s((b, sq, hq, d), jnp.bfloat16), s((b, skv, hkv, d), jnp.bfloat16), s((b, skv, hkv, d), jnp.bfloat16)]
    return args + ([s((b, sq), jnp.int32), s((b, skv), jnp.int32)] if segments else [])


def _export(tiles, *, grad, b, sq, skv, hq, hkv, d, window=None, q_offset=0, segments=False) -> str:
    """StableHLO text of jit(flash_attention) (or of its grad) exported for CUDA, fam.TILES = tiles."""
    def attend(q, k, v, *ids):
        seg = dict(q_segment_ids=ids[0], kv_segment_ids=ids[1]) if ids else {}
        return fa.flash_attention(q, k, v, causal=True, sliding_window=window, q_offset=q_offset, impl="mosaic", **seg)

    fn = attend
    if grad:
        fn = jax.grad(lambda *a: jnp.sum(attend(*a).astype(jnp.float32)), argnums=(0, 1, 2))
    saved, fam.TILES = fam.TILES, tiles  # forward(tiles=None) and backward(tiles=None) read it at trace time
    try:
        return jax.export.export(jax.jit(fn), platforms=["cuda"])(*_spec(b, sq, skv, hq, hkv, d, segments)).mlir_module()
    finally:
        fam.TILES = saved


OV = dataclasses.replace(fam.Tiles(), fwd_overlap=True)
CASES = [
    # GQA 4:1, head_dim 128, 128-key tiles (the main shape's tiles), lengths not tile multiples; fwd + VJP
    dict(tiles=OV, grad=True, b=1, sq=200, skv=200, hq=4, hkv=1, d=128),
    # head_dim 64, sliding window, q_offset, q_len != kv_len, 64-key tiles with a 3-deep K/V ring
    dict(tiles=dataclasses.replace(OV, block_kv=64, fwd_stages=3), grad=False, b=1, sq=96, skv=250, hq=4, hkv=2,
         d=64, window=37, q_offset=154),
    # segment ids (every step masked), MHA, head_dim 128, 64-key tiles
    dict(tiles=dataclasses.replace(OV, block_kv=64), grad=False, b=2, sq=136, skv=136, hq=2, hkv=2, d=128,
         segments=True),
]


@pytest.mark.parametrize("case", CASES, ids=["gqa4_d128_bk128_grad", "d64_window_offset_bk64_st3", "segments_bk64"])
def test_overlapped_forward_lowers(case):
    case = dict(case)
    grad = case["grad"]
    txt = _export(**case)
    assert txt.count(_MOSAIC) == (3 if grad else 1)  # forward (+ dQ and dK/dV kernels)
    assert _OVERLAP_MARK in txt


def test_default_forward_is_not_overlapped():
    assert not fam.TILES.fwd_overlap
    txt = _export(fam.Tiles(), grad=False, b=1, sq=72, skv=72, hq=2, hkv=1, d=64)
    assert txt.count(_MOSAIC) == 1 and _OVERLAP_MARK not in txt


def test_overlap_registers_and_smem_budget():
    """240/24 registers with overlap (3 x 168 per CTA at launch), 232/40 without; a 3-stage ring of 128-key
    tiles at head_dim 128 exceeds SMEM (Q/O 32 KiB + K, V 3 x 64 KiB) and the lowering says so."""
    assert OV.forward_regs() == (240, 24) and fam.Tiles().forward_regs() == (232, 40)
    with pytest.raises(ValueError, match="fwd_regs"):
        dataclasses.replace(OV, fwd_regs=252).forward_regs()
    with pytest.raises(ValueError, match="shared memory"):
        _export(dataclasses.replace(OV, fwd_stages=3), grad=False, b=1, sq=128, skv=128, hq=1, hkv=1, d=128)
