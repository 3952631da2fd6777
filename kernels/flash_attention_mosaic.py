"""Mosaic GPU (Hopper, sm90) flash attention: forward, dQ and dK/dV kernels.

Shape of every kernel (after jax's `attention_mgpu.py`, extended with causal/window/offset/segment
masks, GQA inside the kernel and a causal backward, which that file lacks):
  * one CTA = 3 warpgroups: two compute warpgroups (wgmma, registers raised to 232) and one memory
    warpgroup (registers lowered to 40) streaming tiles with TMA into a `stages`-deep ring of SMEM
    slots guarded by mbarriers ("loaded" barriers, one arrival each; "consumed" barriers, one
    arrival per compute warpgroup);
  * the stream covers exactly the blocks some row of the CTA can see ([lo, hi) from causal /
    sliding window / q_offset); both compute warpgroups walk the same steps (so the barrier
    protocol is identical for both) and apply the element mask only on steps that need it:
    masked prologue, unmasked middle, masked epilogue; with segment ids every step is masked;
  * the running max starts at -1e30 (finite), so rows that see no key give p = 0, l = 0, output
    exactly 0 and logsumexp -inf without NaNs;
  * lengths need not be multiples of the tiles: TMA zero-fills out-of-bounds loads and clips
    out-of-bounds stores; keys beyond kv_len are masked; rows beyond q_len are discarded.
Forward: two warpgroups x `block_q` query rows ping-pong on a schedule barrier (one does softmax
while the other issues wgmma).  dQ: like the forward over kv tiles.  dK/dV: each warpgroup owns
`block_kv` keys and streams (q, dO, lse, delta) tiles over every q head of its GQA group, so dK/dV
need no reduction afterwards.  Scores are scaled in log2 units (scale2 = sm_scale * log2(e)).
Fused dQ (`Tiles.fused_dq`, FA3's scheme): the dK/dV kernel also forms dQ = dS @ K for every q tile it
visits (dS^T through SMEM as a transposed wgmma A operand) and adds the f32 partial into a zeroed
[B, Sq, Hq, D] buffer with a TMA reduce-add (`cp.reduce.async.bulk.tensor ... add`), so S and P are
computed once (5 matmul passes, not 7); XLA then scales and casts dQ.  The order of the f32 additions
varies from run to run (dQ is not bitwise deterministic; dK, dV are).  With `dq_split` the two
warpgroups meet on a barrier each step, share dS^T [2 * bwd_block_kv, bq] and each computes half of
dQ's columns over all keys of the CTA (one reduce-add per q tile); otherwise each warpgroup adds its
own keys' [bq, d] partial.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

_F32 = jnp.float32
_M_INIT = -1e30
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class Tiles:
    block_q: int = 64  # rows per compute warpgroup (forward, dQ)
    block_kv: int = 128  # keys per streamed tile (forward, dQ)
    stages: int = 2
    bwd_block_q: int = 64  # streamed q rows per tile (dK/dV)
    bwd_block_kv: int = 64  # keys per compute warpgroup (dK/dV)
    dq_block_kv: int = 64  # streamed keys per tile (dQ)
    # backward in one kernel: the dK/dV kernel also emits dQ partials (dS @ K, f32) and adds them into a
    # zeroed f32 buffer with TMA reduce-add (5 matmul passes instead of 7; summation order of dQ varies).
    # Off by default: slower on the H100 (B4 S4096 H16 D128 bwd: 1.93 ms split / 1.84 ms per-warpgroup vs
    # 1.63 ms for the two kernels; GPU parity 24/24 for all three, BENCHMARKS.md)
    fused_dq: bool = False
    # fused: both warpgroups share dS through SMEM and each computes half of dQ's columns over all
    # 2 * bwd_block_kv keys (one reduce-add of [bq, d] per q tile, FA3's split; at D=64 the backward's
    # SMEM tiles then use a 64-byte swizzle); False: each warpgroup reduce-adds the [bq, d] partial of
    # its own keys (twice the traffic, no barrier between the warpgroups)
    dq_split: bool = True
    # causal forward and dQ: launch each batch's q tiles from the last (the most keys) to the first, so that the
    # light tiles fill the tail of the last wave (dK/dV's kv tiles already go from the most queries down).  H100,
    # B4 S4096 H16 D128, kernel time: forward 479 vs 476 us, forward+backward 1956 vs 1977 us (BENCHMARKS.md).
    # The grid keeps (heads, tiles, batch), so the CTAs in flight share their batch's K/V (or Q/dO) in L2: the
    # tiles as the slowest axis (heavy first over all batches) ran the backward 8% slower (session 10)
    heavy_first: bool = True
    # SMEM of the fused dK/dV/dQ kernel at D=128, bq = bk = 64 (sm90 allows 227 KiB): K, V 2 x 32 KiB,
    # Q/dO ring stages x 32 KiB, dS^T 2 x 16 KiB, f32 dQ staging 2 x 16 KiB (split; 2 x 32 per-warpgroup),
    # lse/delta stages x 0.5 KiB: 193 KiB at 2 stages, ~226 KiB at 3 (at the limit)


TILES = Tiles()
# What experiments/check_kernels_gpu.py has validated on an H100 (jax 0.11.2), forward and backward
# (two-kernel and fused-dQ backward, split and per-warpgroup: 24/24 on 2026-11-22, session 4):
# bf16; head_dim 64 and 128; causal, with or without sliding window, q_offset >= 0 and < 0 (empty rows),
# q_len != kv_len, GQA 1-4, MQA non-causal, segment ids (packing, left padding).  Not yet run there: f16.
VALIDATED_DTYPES = (jnp.dtype(jnp.bfloat16),)
VALIDATED_HEAD_DIMS = (64, 128)


def unsupported_reason(dtype, head_dim: int, *, causal: bool = True, q_offset: int = 0,
                       backward: bool = False) -> str | None:
    """Why the Mosaic kernels may not take this input (None if they can)."""
    del backward  # forward and backward are validated on the same set
    from kernels import dispatch
    if jnp.dtype(dtype) not in _HALF:
        return f"dtype {jnp.dtype(dtype)} (Mosaic kernels take bf16/f16)"
    if head_dim % 64 or head_dim > 256:
        return f"head_dim {head_dim} is not a multiple of 64 up to 256"
    if dispatch.allow_unvalidated():
        return None
    if jnp.dtype(dtype) not in VALIDATED_DTYPES:
        return f"dtype {jnp.dtype(dtype)} not yet validated on GPU (bf16 is)"
    if head_dim not in VALIDATED_HEAD_DIMS:
        return f"head_dim {head_dim} not in the GPU-validated set {VALIDATED_HEAD_DIMS}"
    # non-causal and q_offset < 0 (rows with no key) passed on the H100 on 2026-11-22
    # (experiments/results/kernels_h100_2026-11-22_check2.json)
    del causal, q_offset
    return None


def _plgpu():
    from jax.experimental.pallas import mosaic_gpu as plgpu
    return plgpu


def _load(ref, layout):
    """plgpu.load of a whole SMEM ref (index argument required on jax 0.10, deprecated on 0.11)."""
    plgpu = _plgpu()
    if inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty:
        return plgpu.load(ref, (), layout=layout)
    return plgpu.load(ref, layout=layout)


def _T(ref):
    return ref.transpose((1, 0))


def _idiv(a, b):
    """a // b for a >= 0 (Python ints stay static; traced ints use lax.div)."""
    if isinstance(a, int):
        return a // b
    return lax.div(jnp.asarray(a, jnp.int32), jnp.int32(b))


def _cdiv(a, b):
    return _idiv(a + b - 1, b)


def _rem(t, n):
    return lax.rem(t, jnp.int32(n))


def _clamp(x, lo, hi):
    return jnp.minimum(jnp.maximum(x, lo), hi)


def _tile_index(name, n_tiles, reverse):
    """This CTA's tile along `name`; reverse walks the tiles from the last one."""
    i = lax.axis_index(name)
    return n_tiles - 1 - i if reverse else i


def _pad_rows(x, mult):
    """Pad the last axis to a multiple of `mult` (1-D TMA rows need 16-byte strides)."""
    n = x.shape[-1]
    pad = (-n) % mult
    return x if pad == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])


def _pad_seq(x, mult=8):
    """Pad axis 1 (sequence) to a multiple of 8: tiled TMA needs it; the pad is masked/discarded."""
    if x is None or x.shape[1] % mult == 0:
        return x
    return jnp.pad(x, [(0, 0), (0, (-x.shape[1]) % mult)] + [(0, 0)] * (x.ndim - 2))


def _mask(rows_pos, cols_pos, shape, *, q_dim, causal, window, kv_len, q_len_pos_end, qseg=None, kseg=None):
    """Visibility mask in WGMMA layout; `q_dim` says which dim holds queries (0: [q, k], 1: [k, q])."""
    plgpu = _plgpu()
    r = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA) + rows_pos
    c = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA) + cols_pos
    qp, kp = (r, c) if q_dim == 0 else (c, r)
    m = kp < kv_len
    if q_len_pos_end is not None:
        m &= qp < q_len_pos_end
    if causal:
        m &= kp <= qp
    if window is not None:
        m &= (qp - kp) < window
    if qseg is not None:
        qb = lax.broadcast_in_dim(qseg, shape, [q_dim])
        kb = lax.broadcast_in_dim(kseg, shape, [1 - q_dim])
        m &= qb == kb
    return m


def _kv_range(p_first, p_last, kv_len, bk, causal, window):
    """[lo, hi) key tiles that query positions [p_first, p_last] can see."""
    hi = _cdiv(jnp.maximum(jnp.minimum(kv_len, p_last + 1), 0), bk) if causal else _cdiv(kv_len, bk)
    lo = _idiv(jnp.maximum(p_first - window + 1, 0), bk) if window is not None else 0
    hi = jnp.asarray(hi, jnp.int32)
    lo = jnp.minimum(jnp.asarray(lo, jnp.int32), hi)
    return lo, hi


def _full_kv_range(p_first, p_last, kv_len, bk, lo, hi, causal, window, segmented):
    """[a, b) within [lo, hi): key tiles fully visible to every query position in [p_first, p_last]."""
    if segmented:
        return lo, lo
    a = _cdiv(jnp.maximum(p_last - window + 1, 0), bk) if window is not None else lo
    b = kv_len // bk
    if causal:
        b = jnp.minimum(b, _idiv(jnp.maximum(p_first + 1, 0), bk))
    a = _clamp(jnp.asarray(a, jnp.int32), lo, hi)
    b = _clamp(jnp.asarray(b, jnp.int32), a, hi)
    return a, b


def _smem_transforms(head_dim, dtype):
    plgpu = _plgpu()
    swizzle = plgpu.find_swizzle(head_dim * jnp.dtype(dtype).itemsize * 8)
    elems = swizzle // jnp.dtype(dtype).itemsize
    return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle))


# ============================================================================ forward

def forward(q, k, v, qs, ks, *, scale2, causal, window, q_offset, tiles: Tiles = TILES):
    """(out [B, Sq, Hq, D], lse2 [B, Hq, Sq] in log2 units)."""
    sq, skv = q.shape[1], k.shape[1]
    if sq % 8 or skv % 8:
        o, lse2 = _forward(_pad_seq(q), _pad_seq(k), _pad_seq(v), qs, ks, scale2=scale2, causal=causal,
                           window=window, q_offset=q_offset, tiles=tiles, sq=sq, skv=skv)
        return o[:, :sq], lse2
    return _forward(q, k, v, qs, ks, scale2=scale2, causal=causal, window=window, q_offset=q_offset, tiles=tiles,
                    sq=sq, skv=skv)


def _forward(q, k, v, qs, ks, *, scale2, causal, window, q_offset, tiles, sq, skv):
    plgpu = _plgpu()
    b, _, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    dtype = q.dtype
    bq, bk, stages = tiles.block_q, tiles.block_kv, tiles.stages
    seg = qs is not None
    n_q_tiles = _cdiv(sq, 2 * bq)
    sq_pad = n_q_tiles * 2 * bq
    transforms = _smem_transforms(d, dtype)
    log = dict(causal=causal, window=window)

    def kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, scoped):
        bi = lax.axis_index("batch")
        h = lax.axis_index("heads")
        wg = lax.axis_index("wg")
        (qo_smem2, k_smem, v_smem, lse_smem2, qseg_smem2, kseg_smem), bars = scoped
        k_bar, v_bar, q_bar, kseg_bar, k_cons, v_cons, sched = bars
        cta_q0 = _tile_index("q_seq", n_q_tiles, causal and tiles.heavy_first) * (2 * bq)
        p_first = q_offset + cta_q0
        p_last = q_offset + jnp.minimum(cta_q0 + 2 * bq, sq) - 1
        lo, hi = _kv_range(p_first, p_last, skv, bk, **log)
        n = hi - lo

        def sched_sync():
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(sched)

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            qo_smem = qo_smem2.at[wg]
            q0 = cta_q0 + wg * bq
            plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(q0, bq), h], qo_smem, q_bar.at[wg])
            if seg:
                plgpu.copy_gmem_to_smem(qs_ref.at[bi, pl.ds(q0, bq)], qseg_smem2.at[wg], q_bar.at[2 + wg])
                plgpu.barrier_wait(q_bar.at[2 + wg])
                qseg = _load(qseg_smem2.at[wg], plgpu.Layout.WGMMA.reduce(1))
            plgpu.barrier_wait(q_bar.at[wg])
            wf, wl = q_offset + q0, q_offset + q0 + bq - 1
            a, c = _full_kv_range(wf, wl, skv, bk, lo, hi, segmented=seg, **log)

            m_i = plgpu.layout_cast(jnp.full((bq,), _M_INIT, _F32), plgpu.Layout.WGMMA.reduce(1))
            l_i = plgpu.layout_cast(jnp.full((bq,), 0.0, _F32), plgpu.Layout.WGMMA.reduce(1))
            acc = plgpu.layout_cast(jnp.full((bq, d), 0.0, _F32), plgpu.Layout.WGMMA)

            @pl.when(n > 0)
            def _():
                plgpu.barrier_wait(k_bar.at[0])

            pl.when(wg == 1)(sched_sync)

            def step(kb, carry, masked):
                acc, m_i, l_i = carry
                t = kb - lo
                slot = _rem(t, stages)

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, qo_smem, _T(k_smem.at[slot]))
                    sched_sync()
                    return acc_ref[...]

                s = pl.run_scoped(qk, plgpu.ACC((bq, bk), _F32))
                s = s * scale2
                if masked:
                    kseg = None
                    if seg:
                        plgpu.barrier_wait(kseg_bar.at[slot])
                        kseg = _load(kseg_smem.at[slot], plgpu.Layout.WGMMA.reduce(0))
                    mask = _mask(q_offset + q0, kb * bk, (bq, bk), q_dim=0, kv_len=skv, q_len_pos_end=None,
                                 qseg=qseg if seg else None, kseg=kseg, **log)
                    s = jnp.where(mask, s, -jnp.inf)
                plgpu.barrier_arrive(k_cons.at[slot])
                m_new = jnp.maximum(m_i, s.max(axis=1))
                alpha = jnp.exp2(m_i - m_new)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                l_i = l_i * alpha
                p16 = p.astype(dtype)
                l_i = l_i + p.sum(axis=1)
                acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
                plgpu.barrier_arrive(sched)
                plgpu.barrier_wait(v_bar.at[slot])
                plgpu.barrier_wait(sched)

                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                    nxt = t + 1

                    @pl.when(nxt < n)
                    def _():
                        plgpu.barrier_wait(k_bar.at[_rem(nxt, stages)])

                acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_cons.at[slot])
                return acc, m_new, l_i

            carry = (acc, m_i, l_i)
            carry = lax.fori_loop(lo, a, functools.partial(step, masked=True), carry)
            carry = lax.fori_loop(a, c, functools.partial(step, masked=False), carry)
            acc, m_i, l_i = lax.fori_loop(c, hi, functools.partial(step, masked=True), carry)
            pl.when(wg == 0)(sched_sync)

            empty = l_i == 0.0
            l_safe = jnp.where(empty, 1.0, l_i)
            acc = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
            qo_smem[...] = acc.astype(dtype)
            lse_smem2.at[wg][...] = jnp.where(empty, -jnp.inf, m_i + jnp.log2(l_safe))
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[bi, pl.ds(q0, bq), h])
            plgpu.copy_smem_to_gmem(lse_smem2.at[wg], lse_ref.at[bi, h, pl.ds(q0, bq)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")
            hk = lax.div(h, jnp.array(g, h.dtype))

            def load(t, wait):
                slot = _rem(t, stages)
                sl = (bi, pl.ds((lo + t) * bk, bk), hk)
                if wait:
                    plgpu.barrier_wait(k_cons.at[slot])
                plgpu.copy_gmem_to_smem(k_ref.at[sl], k_smem.at[slot], k_bar.at[slot])
                if seg:
                    plgpu.copy_gmem_to_smem(ks_ref.at[bi, pl.ds((lo + t) * bk, bk)], kseg_smem.at[slot],
                                            kseg_bar.at[slot])
                if wait:
                    plgpu.barrier_wait(v_cons.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[sl], v_smem.at[slot], v_bar.at[slot])

            for t in range(stages):
                pl.when(t < n)(functools.partial(load, t, False))

            @pl.loop(stages, jnp.maximum(n, stages))
            def _(t):
                load(t, True)

    def entry(*refs):
        if seg:
            q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref = refs
        else:
            (q_ref, k_ref, v_ref, o_ref, lse_ref), qs_ref, ks_ref = refs, None, None
        smem = (
            plgpu.SMEM((2, bq, d), dtype, transforms=transforms),
            plgpu.SMEM((stages, bk, d), dtype, transforms=transforms),
            plgpu.SMEM((stages, bk, d), dtype, transforms=transforms),
            plgpu.SMEM((2, bq), _F32),
            plgpu.SMEM((2, bq), jnp.int32) if seg else None,
            plgpu.SMEM((stages, bk), jnp.int32) if seg else None,
        )
        bars = (
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=4),
            plgpu.Barrier(num_barriers=stages) if seg else None,
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),
            plgpu.Barrier(num_arrivals=2),
        )
        pl.run_scoped(lambda *scoped: kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref,
                                             (scoped[:6], scoped[6:])),
                      *smem, *bars, collective_axes="wg")

    args = [q, k, v]
    if seg:
        args += [_pad_rows(qs, 2 * bq), _pad_rows(ks, 4)]
    o, lse2 = plgpu.kernel(
        entry,
        out_type=[jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((b, hq, sq_pad), _F32)],
        grid=(hq, n_q_tiles, b),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(*args)
    return o, lse2[..., :sq]


# ============================================================================ backward

def backward(q, k, v, qs, ks, do, lse2, delta, *, scale2, causal, window, q_offset, tiles: Tiles | None = None):
    """(dq, dk, dv) from the log2-unit logsumexp and delta = rowsum(dO * O) [B, Hq, Sq].

    `tiles=None` reads the module's `TILES` at call time (experiments switch the fused dQ path there)."""
    tiles = TILES if tiles is None else tiles
    sq, skv = q.shape[1], k.shape[1]
    q, k, v, do = _pad_seq(q), _pad_seq(k), _pad_seq(v), _pad_seq(do)
    pad = 2 * max(tiles.block_q, tiles.bwd_block_q)
    lse2 = _pad_rows(lse2.astype(_F32), pad)
    delta = _pad_rows(delta.astype(_F32), pad)
    qs_p = None if qs is None else _pad_rows(qs, pad)
    ks_p = None if ks is None else _pad_rows(ks, 2 * max(tiles.dq_block_kv, tiles.bwd_block_kv))
    kw = dict(scale2=scale2, causal=causal, window=window, q_offset=q_offset, tiles=tiles, sq=sq, skv=skv)
    if tiles.fused_dq:
        return _fused_backward(q, k, v, qs_p, ks_p, do, lse2, delta, kw)
    dq = _dq(q, k, v, qs_p, ks_p, do, lse2, delta, **kw)
    dk, dv = _dkv(q, k, v, qs_p, ks_p, do, lse2, delta, **kw)
    return dq[:, :sq], dk[:, :skv], dv[:, :skv]


def _fused_backward(q, k, v, qs, ks, do, lse2, delta, kw):
    """(dq, dk, dv) cut to sq / skv rows, from the fused kernel; batch leads every operand (vmap folds into it)."""

    @jax.custom_batching.custom_vmap  # the kernel with a Ref does not batch: fold vmapped axes into batch
    @jax.jit
    def fused(q, k, v, qs, ks, do, lse2, delta):
        def stateful(refs):  # pl.run_state: the Refs start as these values and never leave this function
            dq_ref, dk_ref, dv_ref = refs
            dk_ref[...], dv_ref[...] = _dkv(q, k, v, qs, ks, do, lse2, delta, dq_acc=dq_ref, **kw)

        dq32, dk, dv = pl.run_state(stateful)((jnp.zeros(q.shape, _F32), jnp.zeros_like(k), jnp.zeros_like(v)))
        dq = (dq32[:, :kw["sq"]] * (kw["scale2"] / 1.4426950408889634)).astype(q.dtype)
        return dq, dk[:, :kw["skv"]], dv[:, :kw["skv"]]

    @fused.def_vmap
    def _(axis_size, in_batched, *args):
        def fold(x, batched):
            if x is None:
                return None
            x = x if batched else jnp.broadcast_to(x, (axis_size,) + x.shape)
            return x.reshape((axis_size * x.shape[1],) + x.shape[2:])
        outs = fused(*map(fold, args, in_batched))
        return tuple(o.reshape((axis_size, o.shape[0] // axis_size) + o.shape[1:]) for o in outs), (True,) * 3

    return fused(q, k, v, qs, ks, do, lse2, delta)


def _dq(q, k, v, qs, ks, do, lse2, delta, *, scale2, causal, window, q_offset, tiles, sq, skv):
    plgpu = _plgpu()
    b, _, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    dtype = q.dtype
    bq, bk, stages = tiles.block_q, tiles.dq_block_kv, tiles.stages
    seg = qs is not None
    transforms = _smem_transforms(d, dtype)
    log = dict(causal=causal, window=window)
    sm_scale = scale2 / 1.4426950408889634
    n_q_tiles = _cdiv(sq, 2 * bq)

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qs_ref, ks_ref, dq_ref, scoped):
        bi = lax.axis_index("batch")
        h = lax.axis_index("heads")
        wg = lax.axis_index("wg")
        (q_smem2, do_smem2, lse_smem2, dl_smem2, qseg_smem2, k_smem, v_smem, kseg_smem), (own_bar, ld_bar, cons) = scoped
        cta_q0 = _tile_index("q_seq", n_q_tiles, causal and tiles.heavy_first) * (2 * bq)
        p_first = q_offset + cta_q0
        p_last = q_offset + jnp.minimum(cta_q0 + 2 * bq, sq) - 1
        lo, hi = _kv_range(p_first, p_last, skv, bk, **log)
        n = hi - lo

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
            q0 = cta_q0 + wg * bq
            rows = (bi, pl.ds(q0, bq), h)
            plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem, own_bar.at[wg * 5 + 0])
            plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem, own_bar.at[wg * 5 + 1])
            plgpu.copy_gmem_to_smem(lse_ref.at[bi, h, pl.ds(q0, bq)], lse_smem2.at[wg], own_bar.at[wg * 5 + 2])
            plgpu.copy_gmem_to_smem(dl_ref.at[bi, h, pl.ds(q0, bq)], dl_smem2.at[wg], own_bar.at[wg * 5 + 3])
            if seg:
                plgpu.copy_gmem_to_smem(qs_ref.at[bi, pl.ds(q0, bq)], qseg_smem2.at[wg], own_bar.at[wg * 5 + 4])
                plgpu.barrier_wait(own_bar.at[wg * 5 + 4])
                qseg = _load(qseg_smem2.at[wg], plgpu.Layout.WGMMA.reduce(1))
            for i in range(4):
                plgpu.barrier_wait(own_bar.at[wg * 5 + i])
            lse = _load(lse_smem2.at[wg], plgpu.Layout.WGMMA.reduce(1))
            dl = _load(dl_smem2.at[wg], plgpu.Layout.WGMMA.reduce(1))
            wf, wl = q_offset + q0, q_offset + q0 + bq - 1
            a, c = _full_kv_range(wf, wl, skv, bk, lo, hi, segmented=seg, **log)

            def step(kb, dq_acc, masked):
                t = kb - lo
                slot = _rem(t, stages)
                for i in range(3 if seg else 2):
                    plgpu.barrier_wait(ld_bar.at[slot * 3 + i])

                def sp(s_ref, dp_ref):
                    plgpu.wgmma(s_ref, q_smem, _T(k_smem.at[slot]))
                    plgpu.wgmma(dp_ref, do_smem, _T(v_smem.at[slot]))
                    return s_ref[...], dp_ref[...]

                s, dp = pl.run_scoped(sp, plgpu.ACC((bq, bk), _F32), plgpu.ACC((bq, bk), _F32))
                p = jnp.exp2(s * scale2 - lax.broadcast_in_dim(lse, s.shape, [0]))
                if masked:
                    kseg = _load(kseg_smem.at[slot], plgpu.Layout.WGMMA.reduce(0)) if seg else None
                    mask = _mask(q_offset + q0, kb * bk, (bq, bk), q_dim=0, kv_len=skv, q_len_pos_end=None,
                                 qseg=qseg if seg else None, kseg=kseg, **log)
                    p = jnp.where(mask, p, 0.0)
                ds = p * (dp - lax.broadcast_in_dim(dl, dp.shape, [0]))

                def mm(acc_ref):
                    plgpu.wgmma(acc_ref, ds.astype(dtype), k_smem.at[slot])

                dq_acc = pl.run_state(mm)(plgpu.ACC.init(dq_acc))
                plgpu.barrier_arrive(cons.at[slot])
                return dq_acc

            dq_acc = plgpu.layout_cast(jnp.full((bq, d), 0.0, _F32), plgpu.Layout.WGMMA)
            dq_acc = lax.fori_loop(lo, a, functools.partial(step, masked=True), dq_acc)
            dq_acc = lax.fori_loop(a, c, functools.partial(step, masked=False), dq_acc)
            dq_acc = lax.fori_loop(c, hi, functools.partial(step, masked=True), dq_acc)
            q_smem[...] = (dq_acc * sm_scale).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[rows])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")
            hk = lax.div(h, jnp.array(g, h.dtype))

            def load(t):
                slot = _rem(t, stages)
                sl = (bi, pl.ds((lo + t) * bk, bk), hk)
                plgpu.copy_gmem_to_smem(k_ref.at[sl], k_smem.at[slot], ld_bar.at[slot * 3 + 0])
                plgpu.copy_gmem_to_smem(v_ref.at[sl], v_smem.at[slot], ld_bar.at[slot * 3 + 1])
                if seg:
                    plgpu.copy_gmem_to_smem(ks_ref.at[bi, pl.ds((lo + t) * bk, bk)], kseg_smem.at[slot],
                                            ld_bar.at[slot * 3 + 2])

            for t in range(stages):
                pl.when(t < n)(functools.partial(load, t))

            @pl.loop(stages, jnp.maximum(n, stages))
            def _(t):
                plgpu.barrier_wait(cons.at[_rem(t, stages)])
                load(t)

    def entry(*refs):
        if seg:
            q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, dl_ref, dq_ref = refs
        else:
            (q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dq_ref), qs_ref, ks_ref = refs, None, None
        smem = (
            plgpu.SMEM((2, bq, d), dtype, transforms=transforms),
            plgpu.SMEM((2, bq, d), dtype, transforms=transforms),
            plgpu.SMEM((2, bq), _F32),
            plgpu.SMEM((2, bq), _F32),
            plgpu.SMEM((2, bq), jnp.int32) if seg else None,
            plgpu.SMEM((stages, bk, d), dtype, transforms=transforms),
            plgpu.SMEM((stages, bk, d), dtype, transforms=transforms),
            plgpu.SMEM((stages, bk), jnp.int32) if seg else None,
        )
        bars = (plgpu.Barrier(num_barriers=10), plgpu.Barrier(num_barriers=3 * stages),
                plgpu.Barrier(num_arrivals=2, num_barriers=stages))
        pl.run_scoped(lambda *sc: kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qs_ref, ks_ref, dq_ref,
                                         (sc[:8], sc[8:])),
                      *smem, *bars, collective_axes="wg")

    args = [q, k, v] + ([qs, ks] if seg else []) + [do, lse2, delta]
    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        grid=(hq, n_q_tiles, b),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(*args)


def _dkv(q, k, v, qs, ks, do, lse2, delta, *, scale2, causal, window, q_offset, tiles, sq, skv, dq_acc=None):
    """dK, dV (and, with `dq_acc`, a Ref of zeros [B, Sq, Hq, D] f32: dQ / sm_scale added into it)."""
    plgpu = _plgpu()
    b, _, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    dtype = q.dtype
    bq, bk, stages = tiles.bwd_block_q, tiles.bwd_block_kv, tiles.stages
    seg = qs is not None
    fused = dq_acc is not None
    split = fused and tiles.dq_split
    dh = d // 2 if split else d  # dQ columns per warpgroup
    # split: swizzle by dh (64 B at D=64, 128 B from D=128) so that half of K's columns is whole swizzle
    # tiles; every wgmma operand pair then shares it (dS^T and K; K and Q; V and dO)
    transforms = _smem_transforms(dh, dtype)
    log = dict(causal=causal, window=window)
    sm_scale = scale2 / 1.4426950408889634
    n_qb_all = _cdiv(sq, bq)

    def q_range(k_first, k_last):
        """[lo, hi) q tiles whose rows can see keys [k_first, k_last]."""
        lo = _idiv(jnp.maximum(k_first - q_offset, 0), bq) if causal else 0
        if window is not None:
            hi = _cdiv(_clamp(k_last + window - q_offset, 0, sq), bq)
        else:
            hi = n_qb_all
        hi = jnp.asarray(hi, jnp.int32)
        return jnp.minimum(jnp.asarray(lo, jnp.int32), hi), hi

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qs_ref, ks_ref, dq_ref, dk_ref, dv_ref, scoped):
        bi = lax.axis_index("batch")
        hk = lax.axis_index("heads")
        wg = lax.axis_index("wg")
        ((k_smem2, v_smem2, kseg_smem2, q_smem, do_smem, lse_smem, dl_smem, qseg_smem, ds_smem, dq_smem2),
         (own_bar, ld_bar, cons, ds_bar)) = scoped
        cta_k0 = lax.axis_index("kv_seq") * (2 * bk)
        lo, hi = q_range(cta_k0, jnp.minimum(cta_k0 + 2 * bk, skv) - 1)
        nqb = hi - lo
        n = g * nqb

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            # split: K of both warpgroups in one [2 * bk, d] tile (dQ's B operand spans all of it)
            k_smem = k_smem2.at[pl.ds(wg * bk, bk)] if split else k_smem2.at[wg]
            v_smem = v_smem2.at[wg]
            k0 = cta_k0 + wg * bk
            rows = (bi, pl.ds(k0, bk), hk)
            plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem, own_bar.at[wg * 3 + 0])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem, own_bar.at[wg * 3 + 1])
            if seg:
                plgpu.copy_gmem_to_smem(ks_ref.at[bi, pl.ds(k0, bk)], kseg_smem2.at[wg], own_bar.at[wg * 3 + 2])
                plgpu.barrier_wait(own_bar.at[wg * 3 + 2])
                kseg = _load(kseg_smem2.at[wg], plgpu.Layout.WGMMA.reduce(1))
            plgpu.barrier_wait(own_bar.at[wg * 3 + 0])
            plgpu.barrier_wait(own_bar.at[wg * 3 + 1])
            # q tiles fully visible to all of this warpgroup's keys [k0, k0 + bk - 1]
            fa, fb = lo, lo
            if not seg:
                k_last = k0 + bk - 1
                fa = _cdiv(jnp.maximum(k_last - q_offset, 0), bq) if causal else lo
                fb = sq // bq
                if window is not None:
                    fb = jnp.minimum(fb, _idiv(jnp.maximum(k0 + window - q_offset, 0), bq))
                fb = jnp.where(k_last < skv, fb, 0)
                fa = _clamp(jnp.asarray(fa, jnp.int32), lo, hi)
                fb = _clamp(jnp.asarray(fb, jnp.int32), fa, hi)

            def both_wgs_sync():
                plgpu.barrier_arrive(ds_bar)
                plgpu.barrier_wait(ds_bar)

            def step(gi, qb, carry, masked):
                dk_acc, dv_acc = carry
                t = gi * nqb + (qb - lo)
                slot = _rem(t, stages)
                for i in range(5 if seg else 4):
                    plgpu.barrier_wait(ld_bar.at[slot * 5 + i])

                def st(acc_ref):
                    plgpu.wgmma(acc_ref, k_smem, _T(q_smem.at[slot]))
                    return acc_ref[...]

                s_t = pl.run_scoped(st, plgpu.ACC((bk, bq), _F32))
                lse = _load(lse_smem.at[slot], plgpu.Layout.WGMMA.reduce(0))
                p_t = jnp.exp2(s_t * scale2 - lax.broadcast_in_dim(lse, s_t.shape, [1]))
                if masked:
                    qseg = _load(qseg_smem.at[slot], plgpu.Layout.WGMMA.reduce(0)) if seg else None
                    mask = _mask(k0, q_offset + qb * bq, (bk, bq), q_dim=1, kv_len=skv, q_len_pos_end=q_offset + sq,
                                 qseg=qseg, kseg=kseg if seg else None, **log)
                    p_t = jnp.where(mask, p_t, 0.0)

                def dv_dp(refs):
                    dv_ref, dp_ref = refs
                    plgpu.wgmma(dv_ref, p_t.astype(dtype), do_smem.at[slot])
                    plgpu.wgmma(dp_ref, v_smem, _T(do_smem.at[slot]))

                zeros = plgpu.layout_cast(jnp.full((bk, bq), 0.0, _F32), plgpu.Layout.WGMMA)
                dv_acc, dp_t = pl.run_state(dv_dp)((plgpu.ACC.init(dv_acc), plgpu.ACC.init(zeros)))
                dl = _load(dl_smem.at[slot], plgpu.Layout.WGMMA.reduce(0))
                ds_t = (p_t * (dp_t - lax.broadcast_in_dim(dl, dp_t.shape, [1]))).astype(dtype)
                if not fused:
                    def mm(acc_ref):
                        plgpu.wgmma(acc_ref, ds_t, q_smem.at[slot])

                    dk_acc = pl.run_state(mm)(plgpu.ACC.init(dk_acc))
                    plgpu.barrier_arrive(cons.at[slot])
                    return dk_acc, dv_acc

                def mm2(refs):
                    dk_ref, dq_acc_ref = refs
                    plgpu.wgmma(dk_ref, ds_t, q_smem.at[slot])  # runs while dS^T goes to SMEM
                    # dQ = dS @ K takes dS^T from SMEM as a transposed A operand
                    if split:  # both halves of [2 * bk, bq], double-buffered: the other warpgroup may lag a step
                        ds_all = ds_smem.at[_rem(t, 2)]
                        ds_all.at[pl.ds(wg * bk, bk)][...] = ds_t
                        plgpu.commit_smem()
                        both_wgs_sync()
                        plgpu.wgmma(dq_acc_ref, _T(ds_all), k_smem2.at[:, pl.ds(wg * dh, dh)])
                    else:  # own keys only; this warpgroup's previous dQ wgmma has completed
                        ds_smem.at[wg][...] = ds_t
                        plgpu.commit_smem()
                        plgpu.wgmma(dq_acc_ref, _T(ds_smem.at[wg]), k_smem)

                zq = plgpu.layout_cast(jnp.full((bq, dh), 0.0, _F32), plgpu.Layout.WGMMA)
                dk_acc, dq_part = pl.run_state(mm2)((plgpu.ACC.init(dk_acc), plgpu.ACC.init(zq)))
                plgpu.barrier_arrive(cons.at[slot])
                dq_smem = dq_smem2.at[wg]
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous reduce-add has read dq_smem
                dq_smem[...] = dq_part
                plgpu.commit_smem()
                cols = pl.ds(wg * dh, dh) if split else slice(None)
                plgpu.copy_smem_to_gmem(dq_smem, dq_ref.at[bi, pl.ds(qb * bq, bq), hk * g + gi, cols],
                                        reduction_op="add")
                return dk_acc, dv_acc

            def head(gi, carry):
                carry = lax.fori_loop(lo, fa, lambda qb, c: step(gi, qb, c, True), carry)
                carry = lax.fori_loop(fa, fb, lambda qb, c: step(gi, qb, c, False), carry)
                return lax.fori_loop(fb, hi, lambda qb, c: step(gi, qb, c, True), carry)

            zero = plgpu.layout_cast(jnp.full((bk, d), 0.0, _F32), plgpu.Layout.WGMMA)
            dk_acc, dv_acc = lax.fori_loop(0, g, head, (zero, zero))
            if split:  # the other warpgroup's last dQ wgmma may still read this warpgroup's K rows
                both_wgs_sync()
            k_smem[...] = (dk_acc * sm_scale).astype(dtype)
            v_smem[...] = dv_acc.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[rows], commit_group=False)
            plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[rows], commit_group=False)
            plgpu.commit_smem_to_gmem_group()
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            def load(t):
                slot = _rem(t, stages)
                nq1 = jnp.maximum(nqb, 1)
                hq_i = hk * g + lax.div(t, nq1)
                q0 = (lo + lax.rem(t, nq1)) * bq
                sl = (bi, pl.ds(q0, bq), hq_i)
                plgpu.copy_gmem_to_smem(q_ref.at[sl], q_smem.at[slot], ld_bar.at[slot * 5 + 0])
                plgpu.copy_gmem_to_smem(do_ref.at[sl], do_smem.at[slot], ld_bar.at[slot * 5 + 1])
                plgpu.copy_gmem_to_smem(lse_ref.at[bi, hq_i, pl.ds(q0, bq)], lse_smem.at[slot], ld_bar.at[slot * 5 + 2])
                plgpu.copy_gmem_to_smem(dl_ref.at[bi, hq_i, pl.ds(q0, bq)], dl_smem.at[slot], ld_bar.at[slot * 5 + 3])
                if seg:
                    plgpu.copy_gmem_to_smem(qs_ref.at[bi, pl.ds(q0, bq)], qseg_smem.at[slot], ld_bar.at[slot * 5 + 4])

            for t in range(stages):
                pl.when(t < n)(functools.partial(load, t))

            @pl.loop(stages, jnp.maximum(n, stages))
            def _(t):
                plgpu.barrier_wait(cons.at[_rem(t, stages)])
                load(t)

    def entry(*refs):
        refs = list(refs)
        q_ref, k_ref, v_ref = refs[:3]
        qs_ref, ks_ref = refs[3:5] if seg else (None, None)
        do_ref, lse_ref, dl_ref = refs[5 if seg else 3:][:3]
        dq_ref = refs[-3] if fused else None
        dk_ref, dv_ref = refs[-2:]
        smem = (
            plgpu.SMEM((2 * bk, d) if split else (2, bk, d), dtype, transforms=transforms),
            plgpu.SMEM((2, bk, d), dtype, transforms=transforms),
            plgpu.SMEM((2, bk), jnp.int32) if seg else None,
            plgpu.SMEM((stages, bq, d), dtype, transforms=transforms),
            plgpu.SMEM((stages, bq, d), dtype, transforms=transforms),
            plgpu.SMEM((stages, bq), _F32),
            plgpu.SMEM((stages, bq), _F32),
            plgpu.SMEM((stages, bq), jnp.int32) if seg else None,
            # dS^T (bf16): split: 2 buffers x [2 * bk, bq]; own: one [bk, bq] per warpgroup
            plgpu.SMEM((2, 2 * bk if split else bk, bq), dtype, transforms=transforms) if fused else None,
            # f32 staging of each warpgroup's dQ partial for the TMA reduce-add
            plgpu.SMEM((2, bq, dh), _F32, transforms=_smem_transforms(dh, _F32)) if fused else None,
        )
        bars = (plgpu.Barrier(num_barriers=6), plgpu.Barrier(num_barriers=5 * stages),
                plgpu.Barrier(num_arrivals=2, num_barriers=stages),
                plgpu.Barrier(num_arrivals=2) if split else None)
        pl.run_scoped(lambda *sc: kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qs_ref, ks_ref, dq_ref, dk_ref,
                                         dv_ref, (sc[:10], sc[10:])),
                      *smem, *bars, collective_axes="wg")

    args = [q, k, v] + ([qs, ks] if seg else []) + [do, lse2, delta]
    out_type = [jax.ShapeDtypeStruct(k.shape, dtype)] * 2
    launch = dict(grid=(hkv, _cdiv(skv, 2 * bk), b), grid_names=("heads", "kv_seq", "batch"), num_threads=3,
                  thread_name="wg")
    params = plgpu.CompilerParams(approx_math=True)
    if fused:  # pl.kernel (not plgpu.kernel, whose vmap wrapper rejects Refs) aliases the Ref in and out
        from jax._src import config as jax_config  # like plgpu.kernel: no vma check (kernels run inside shard_map)
        no_vma = getattr(jax_config, "_check_vma", None)
        with no_vma(False) if no_vma is not None else contextlib.nullcontext():
            dk, dv = pl.kernel(entry, out_type=out_type, mesh=plgpu.Mesh(**launch), compiler_params=params,
                               name="flash_attention_dkv_dq")(*args, dq_acc)
    else:
        dk, dv = plgpu.kernel(entry, out_type=out_type, compiler_params=params, **launch)(*args)
    return dk, dv
