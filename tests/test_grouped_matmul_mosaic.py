"""kernels.grouped_matmul_mosaic: the tile-padded layout (against a numpy construction), the custom_vjp
expert FFN with its XLA stand-ins for the Mosaic kernels (interpret mode: padding, backward math, Triton
weight gradients) against float64 numpy, the dropless MoE / layer wiring of impl "mosaic", and the
Pallas -> Mosaic GPU lowering for CUDA (forward, grouped_matmul_nt with one and two pairs, and
forward+backward; the kernels cannot run on CPU, but they lower here)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import dispatch as kd
from kernels import grouped_matmul_mosaic as gm
from iva_jax.moe import dispatch as dp

TM = 16  # tile_m of the CPU tests
TILES = gm.Tiles(tile_m=TM)
KW = dict(interpret=True, gate_up_tiles=TILES, down_tiles=TILES, dh_tiles=TILES, dx_tiles=TILES,
          block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=2)


def np_layout(sizes, m, tm):
    """Independent construction: walk the groups, place each at the next multiple of tm."""
    e = len(sizes)
    p = max(1, (m + e * (tm - 1)) // tm) * tm
    row_index = np.full(m, p)
    source = np.full(p, m)
    tile_group = np.full(p // tm, e)
    r = q = 0
    for g, s in enumerate(sizes):
        for i in range(s):
            row_index[r + i] = q + i
            source[q + i] = r + i
        nt = -(-s // tm)
        tile_group[q // tm:q // tm + nt] = g
        r += s
        q += nt * tm
    return row_index, source, tile_group, np.array([-(-s // tm) * tm for s in sizes]), q // tm


@pytest.mark.parametrize("sizes,m,tm", [([0, 37, 3, 0, 70, 1], 120, 16), ([5, 0, 0, 9], 14, 8),
                                        ([0, 0, 0], 5, 4), ([64, 64], 128, 64)])
def test_padded_layout_matches_numpy(sizes, m, tm):
    lay = gm.padded_layout(jnp.asarray(sizes, jnp.int32), m, tm)
    want = np_layout(sizes, m, tm)
    for got, exp, name in zip((lay.row_index, lay.source, lay.tile_group, lay.group_sizes, lay.num_tiles), want,
                              ("row_index", "source", "tile_group", "group_sizes", "num_tiles")):
        np.testing.assert_array_equal(np.asarray(got), exp, err_msg=name)
    x = np.random.default_rng(0).normal(size=(m, 3)).astype(np.float32)
    xp = np.asarray(gm.pad_rows(jnp.asarray(x), lay))
    assert not np.any(xp[want[1] == m]), "pad rows must be zero"
    back = np.asarray(gm.unpad_rows(jnp.asarray(xp), lay))
    used = sum(sizes)
    np.testing.assert_array_equal(back[:used], x[:used])
    assert not np.any(back[used:]), "rows past sum(sizes) come back zero"


def test_padded_rows_is_the_worst_case():
    rng = np.random.default_rng(1)
    for _ in range(50):
        e, tm = int(rng.integers(1, 9)), int(rng.choice([4, 16, 128]))
        sizes = rng.multinomial(int(rng.integers(0, 600)), np.ones(e) / e)
        m = int(sizes.sum()) + int(rng.integers(0, 3))
        need = int(sum(-(-s // tm) * tm for s in sizes))
        assert need <= gm.padded_rows(m, e, tm)
    assert gm.padded_rows(32768, 8, 128) == 263 * 128  # the benchmark's shape: 7 spare tiles at most


# ---------------------------------------------------------------------------------------------
# custom_vjp FFN (interpret: XLA forward, Triton-interpret backward) against float64 numpy
# ---------------------------------------------------------------------------------------------
def np_grouped_ffn(xs, sizes, wg, wu, wd):
    """float64: per group rows -> silu(x wg) * (x wu) @ wd; rows past sum(sizes) zero."""
    out = np.zeros((xs.shape[0], wd.shape[2]))
    r = 0
    for e, s in enumerate(sizes):
        x = xs[r:r + s]
        g = x @ wg[e]
        out[r:r + s] = (g / (1 + np.exp(-g)) * (x @ wu[e])) @ wd[e]
        r += s
    return out


def np_grouped_ffn_vjp(xs, sizes, wg, wu, wd, dy):
    """float64 hand-written backward of np_grouped_ffn."""
    dx, dwg, dwu, dwd = np.zeros_like(xs), np.zeros_like(wg), np.zeros_like(wu), np.zeros_like(wd)
    r = 0
    for e, s in enumerate(sizes):
        x, d = xs[r:r + s], dy[r:r + s]
        g, u = x @ wg[e], x @ wu[e]
        sg = 1 / (1 + np.exp(-g))
        h = g * sg * u
        dh = d @ wd[e].T
        dg = dh * u * sg * (1 + g * (1 - sg))
        du = dh * g * sg
        dx[r:r + s] = dg @ wg[e].T + du @ wu[e].T
        dwg[e], dwu[e], dwd[e] = x.T @ dg, x.T @ du, h.T @ d
        r += s
    return dx, dwg, dwu, dwd


SIZES = [0, 37, 3, 0, 21]  # empty groups, a group over several tiles, and 3 rows past the sum
M, D, F = 64, 24, 40


@pytest.fixture(scope="module")
def ffn_case():
    rng = np.random.default_rng(2)
    e = len(SIZES)
    xs = rng.normal(size=(M, D))
    xs[sum(SIZES):] = 0.0
    wg, wu = rng.normal(size=(2, e, D, F)) * D ** -0.5
    wd = rng.normal(size=(e, F, D)) * F ** -0.5
    dy = rng.normal(size=(M, D))
    return xs, wg, wu, wd, dy


def _mosaic_grouped(xs, wg, wu, wd, dtype=jnp.float32, **kw):
    return dp.grouped_swiglu(xs, jnp.asarray(SIZES, jnp.int32), wg, wu, wd, impl="mosaic", dtype=dtype, **(KW | kw))


def test_nt_standin_matches_numpy():
    """The XLA stand-in of grouped_matmul_nt: per row tile sum_j lhs_j @ rhs_j[e].T, skipped tiles NaN."""
    rng = np.random.default_rng(4)
    sizes = jnp.asarray(SIZES, jnp.int32)
    lay = gm.padded_layout(sizes, M, TM)
    p, e = lay.tile_group.shape[0] * TM, len(SIZES)
    lhs = rng.normal(size=(2, p, F))
    rhs = rng.normal(size=(2, e, D, F))
    used = int(lay.num_tiles) * TM
    cfg = gm._Cfg(TILES, TILES, (16, 16, 16, 4, 2), True, TILES, TILES)
    for npair in (1, 2):
        got = gm._nt(tuple(jnp.asarray(lhs[:npair], jnp.float32)), tuple(jnp.asarray(rhs[:npair], jnp.float32)),
                     lay.tile_group, lay.group_sizes, TILES, cfg)
        want = np.zeros((used, D))
        for i in range(used):
            grp = int(lay.tile_group[i // TM])
            want[i] = sum(lhs[j, i] @ rhs[j, grp].T for j in range(npair))
        np.testing.assert_allclose(got[:used], want, rtol=1e-5, atol=1e-5)
        assert bool(jnp.all(jnp.isnan(got[used:]))), "rows of skipped tiles must read as undefined"


@pytest.mark.parametrize("bwd", [dict(fuse_silu_bwd=False), dict(fuse_silu_bwd=True), dict(mosaic_backward=False),
                                 dict(fuse_silu_bwd=True, dx_tiles=None)],
                         ids=["mosaic", "mosaic_fused", "triton", "mosaic_fused_dh_triton_dx"])
def test_ffn_values_and_vjp_f32(ffn_case, bwd):
    xs, wg, wu, wd, dy = ffn_case
    args = [jnp.asarray(v, jnp.float32) for v in (xs, wg, wu, wd)]
    out, vjp = jax.vjp(lambda *a: _mosaic_grouped(*a, **bwd), *args)
    np.testing.assert_allclose(out, np_grouped_ffn(xs, SIZES, wg, wu, wd), rtol=1e-5, atol=1e-5)
    grads = vjp(jnp.asarray(dy, jnp.float32))
    want = np_grouped_ffn_vjp(xs, SIZES, wg, wu, wd, dy)
    for name, got, exp in zip(("dx", "dw_gate", "dw_up", "dw_down"), grads, want):
        np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-5 * np.abs(exp).max(), err_msg=name)


def test_ffn_bf16_close_to_f64(ffn_case):
    xs, wg, wu, wd, dy = ffn_case
    f = lambda *a: _mosaic_grouped(*a, dtype=jnp.bfloat16)  # noqa: E731
    out, vjp = jax.vjp(f, *[jnp.asarray(v, jnp.bfloat16) for v in (xs, wg, wu, wd)])
    ref = np_grouped_ffn(xs, SIZES, wg, wu, wd)
    assert out.dtype == jnp.bfloat16
    assert np.abs(np.asarray(out, np.float64) - ref).max() <= 2e-2 * np.abs(ref).max()
    for got, exp in zip(vjp(jnp.asarray(dy, jnp.bfloat16)), np_grouped_ffn_vjp(xs, SIZES, wg, wu, wd, dy)):
        assert np.abs(np.asarray(got, np.float64) - exp).max() <= 3e-2 * np.abs(exp).max()


@pytest.mark.parametrize("fused,triton_dx", [(False, False), (True, False), (True, True)])
def test_backward_ignores_garbage_in_skipped_tiles(ffn_case, fused, triton_dx):
    """The Mosaic forward leaves rows of skipped tiles undefined: NaN there must not reach any weight gradient
    nor the used rows of dx (Mosaic backward, whose stand-in also leaves NaN in dx past the used tiles)."""
    xs, wg, wu, wd, dy = ffn_case
    sizes = jnp.asarray(SIZES, jnp.int32)
    lay = gm.padded_layout(sizes, M, TM)
    f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    xp = gm.pad_rows(f32(xs), lay)
    cfg = gm._Cfg(TILES, TILES, (16, 16, 16, 4, 2), True, TILES, None if triton_dx else TILES, fused)
    out, res = gm._ffn_fwd(xp, lay.tile_group, lay.group_sizes, f32(wg), f32(wu), f32(wd), cfg)
    dout = gm.pad_rows(f32(dy), lay)
    clean = gm._ffn_bwd(cfg, res, dout)
    used = int(lay.num_tiles) * TM
    assert used < xp.shape[0], "the case must have skipped tiles"
    poisoned = tuple(v.at[used:].set(jnp.nan) if v.ndim == 2 and i >= 6 else v for i, v in enumerate(res))
    dirty = gm._ffn_bwd(cfg, poisoned, dout)
    np.testing.assert_array_equal(clean[0][:used], dirty[0][:used])
    assert bool(jnp.all(jnp.isfinite(dirty[0][:used])))
    for a, b in zip(clean[3:], dirty[3:]):
        assert bool(jnp.all(jnp.isfinite(b)))
        np.testing.assert_array_equal(a, b)


def test_dropless_moe_mosaic_matches_float64():
    rng = np.random.default_rng(3)
    t, k, e = 13, 2, 4
    x = rng.normal(size=(t, D))
    # skewed (expert 1 takes 9 of 13 first choices), expert 3 empty
    idx = np.array([[1, 0], [1, 2]] * 4 + [[1, 0], [0, 2], [2, 0], [0, 1], [2, 1]])
    w = rng.uniform(0.1, 1.0, size=(t, k))
    wg, wu = rng.normal(size=(2, e, D, F)) * D ** -0.5
    wd = rng.normal(size=(e, F, D)) * F ** -0.5
    want = np.zeros((t, D))
    for i in range(t):
        for j in range(k):
            want[i] += w[i, j] * np_grouped_ffn(x[i:i + 1], [1], wg[idx[i, j]][None], wu[idx[i, j]][None],
                                                wd[idx[i, j]][None])[0]
    a32 = [jnp.asarray(v, jnp.float32) for v in (x, w, wg, wu, wd)]
    ei = jnp.asarray(idx, jnp.int32)

    def moe(impl, xx, ww, g, u, dd):
        return dp.dropless_moe(xx, ei, ww, g, u, dd, impl=impl, **(KW if impl == "mosaic" else {}))

    y = moe("mosaic", *a32)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    loss = lambda impl: lambda *a: jnp.sum(moe(impl, *a) * jnp.cos(jnp.arange(D)))  # noqa: E731
    g_mosaic = jax.grad(loss("mosaic"), argnums=range(5))(*a32)
    g_ref = jax.grad(lambda xx, ww, g, u, dd: jnp.sum(dp.dense_reference(xx, ei, ww, g, u, dd)
                                                      * jnp.cos(jnp.arange(D))), argnums=range(5))(*a32)
    for name, a, b in zip(("x", "gate_weights", "w_gate", "w_up", "w_down"), g_mosaic, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))), err_msg=name)
    assert float(jnp.max(jnp.abs(g_mosaic[2][3]))) == 0.0  # the empty expert gets no gradient


def test_layer_dropless_mosaic_equals_ragged():
    from iva_jax.moe.config import MoEConfig
    from iva_jax.moe.layer import MoeBlock
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, D))
    outs = []
    for disp in ("dropless_ragged", "dropless_mosaic"):
        cfg = MoEConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=F, dispatch=disp)
        blk = MoeBlock(cfg, D, gmm_kw=KW if disp == "dropless_mosaic" else None)
        params = blk.init(jax.random.PRNGKey(1), x)
        outs.append(blk.apply(params, x)[0])
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# errors and the lowering for CUDA
# ---------------------------------------------------------------------------------------------
def test_unsupported_reasons_and_bad_input(monkeypatch):
    monkeypatch.setenv("IVA_KERNELS_ALLOW_UNVALIDATED", "1")
    assert gm.unsupported_reason(33792, 2048, 5632, jnp.bfloat16) is None
    assert "dtype float32" in gm.unsupported_reason(256, 2048, 5632, jnp.float32)
    assert "not a multiple" in gm.unsupported_reason(256, 2048, 5600, jnp.bfloat16)
    assert "epilogue" in gm.unsupported_reason(256, 2048, 5632, jnp.bfloat16, gate_up=gm.Tiles(epi_m=32))
    assert "dx tile_m" in gm.unsupported_reason(256, 2048, 5632, jnp.bfloat16, backward=(gm.DH_TILES, TILES))
    assert "dh: shape" in gm.unsupported_reason(256, 2048, 5632, jnp.bfloat16, backward=(gm.Tiles(tile_k=96),
                                                                                         gm.DX_TILES))
    assert gm.unsupported_reason(256, 2048, 5632, jnp.bfloat16, backward=()) is None  # Triton backward
    # Triton dh, Mosaic dx: the dx tiles are checked against dx's shape (K=f, N=d), not dh's
    assert gm.unsupported_reason(256, 2304, 5632, jnp.bfloat16, backward=(None, gm.Tiles(tile_n=192))) is None
    assert "dx: shape" in gm.unsupported_reason(256, 5632, 2304, jnp.bfloat16, backward=(None, gm.Tiles(tile_n=192)))
    monkeypatch.delenv("IVA_KERNELS_ALLOW_UNVALIDATED")
    if not gm.VALIDATED:
        assert "not yet validated" in gm.unsupported_reason(256, 2048, 5632, jnp.bfloat16)
    x = jnp.zeros((256, 64), jnp.bfloat16)
    w = jnp.zeros((2, 64, 128), jnp.bfloat16)
    tg, gs = jnp.zeros((2,), jnp.int32), jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match="cannot run"):  # CPU: no Mosaic GPU outside interpret mode
        gm.grouped_swiglu_ffn(x, tg, gs, w, w, jnp.zeros((2, 128, 64), jnp.bfloat16))
    with pytest.raises(ValueError, match="w_down must have shape"):
        gm.grouped_swiglu_ffn(x, tg, gs, w, w, w, interpret=True)
    with pytest.raises(ValueError, match="padded layout mismatch"):
        gm.grouped_swiglu_ffn(x, jnp.zeros((3,), jnp.int32), gs, w, w, jnp.zeros((2, 128, 64), jnp.bfloat16),
                              interpret=True)
    with pytest.raises(ValueError, match="not a multiple of the tiles"):
        gm.grouped_swiglu_fwd(x[:200], w, w, tg)


def _custom_calls(text):
    return re.findall(r'custom_call_target\s*=\s*"([^"]+)"|stablehlo.custom_call @([\w$.]+)', text)


def test_mosaic_lowering_for_cuda(monkeypatch):
    """The full Pallas -> Mosaic GPU lowering (layouts, SMEM budget) of the forward and of jax.grad, for an H100."""
    monkeypatch.setenv("IVA_KERNELS_ALLOW_UNVALIDATED", "1")
    h100 = kd.DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0), 132)
    monkeypatch.setattr(kd, "device_info", lambda: h100)
    monkeypatch.setattr(gm, "device_info", lambda: h100)
    e, d, f, m = 3, 256, 384, 300
    p = gm.padded_rows(m, e, 128)
    s = jax.ShapeDtypeStruct
    args = (s((p, d), jnp.bfloat16), s((p // 128,), jnp.int32), s((e,), jnp.int32),
            s((e, d, f), jnp.bfloat16), s((e, d, f), jnp.bfloat16), s((e, f, d), jnp.bfloat16))
    fwd = gm.grouped_swiglu_ffn
    fwd_tbwd = lambda *a: gm.grouped_swiglu_ffn(*a, mosaic_backward=False)  # noqa: E731
    loss = lambda f: lambda x, tg, gs, *w: jnp.sum(f(x, tg, gs, *w).astype(jnp.float32) ** 2)  # noqa: E731
    grad = jax.grad(loss(lambda *a: gm.grouped_swiglu_ffn(*a, fuse_silu_bwd=False)), argnums=(0, 3, 4, 5))
    grad_tbwd = jax.grad(loss(fwd_tbwd), argnums=(0, 3, 4, 5))
    grad_fused = jax.grad(loss(lambda *a: gm.grouped_swiglu_ffn(*a, fuse_silu_bwd=True)), argnums=(0, 3, 4, 5))
    # grad: 2 forward + dh (fused: dh + silu backward) + dx Mosaic kernels, 3 Triton weight gradients;
    # Triton backward: 6 Triton
    for fn, n_mosaic, n_triton in ((fwd, 2, 0), (grad, 4, 3), (grad_fused, 4, 3), (grad_tbwd, 2, 6)):
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        calls = ["".join(c) for c in _custom_calls(text)]
        assert sum("mosaic_gpu" in c for c in calls) == n_mosaic, calls
        assert sum("triton" in c for c in calls) == n_triton, calls


@pytest.mark.parametrize("kind", ["dh", "dx", "dh_silu"])
def test_backward_kernels_lowering_for_cuda(monkeypatch, kind):
    """grouped_matmul_nt alone (dh: one pair, dx: two pairs; rhs [E, N, K]) and grouped_swiglu_bwd (dh with the
    silu backward in the epilogue) lower for an H100, within its SMEM."""
    h100 = kd.DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0), 132)
    monkeypatch.setattr(gm, "device_info", lambda: h100)
    e, k, n, p = 3, 640, 256, 5 * 128
    s = jax.ShapeDtypeStruct
    bf = jnp.bfloat16
    if kind == "dh_silu":
        args = (s((p, k), bf), s((e, n, k), bf), s((p, n), bf), s((p, n), bf), s((p // 128,), jnp.int32))
        fn = gm.grouped_swiglu_bwd
    else:
        pairs = 1 if kind == "dh" else 2
        args = ([s((p, k), bf)] * pairs, [s((e, n, k), bf)] * pairs, s((p // 128,), jnp.int32))
        fn = gm.grouped_matmul_nt
    lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    calls = ["".join(c) for c in _custom_calls(lowered.as_text())]
    assert sum("mosaic_gpu" in c for c in calls) == 1, calls
    outs = lowered.out_info if kind == "dh_silu" else (lowered.out_info,)
    assert [(o.shape, o.dtype) for o in outs] == [((p, n), bf)] * len(outs)
    # too many stages must trip the SMEM check of the lowering (i.e. the check really runs here)
    with pytest.raises(ValueError, match="shared memory"):
        jax.jit(lambda *a: fn(*a, tiles=gm.Tiles(stages=8))).trace(*args).lower(lowering_platforms=("cuda",))


def test_grouped_matmul_nt_bad_input():
    x = jnp.zeros((256, 128), jnp.bfloat16)
    w = jnp.zeros((2, 128, 128), jnp.bfloat16)
    tg = jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match="1 or 2"):
        gm.grouped_matmul_nt([x] * 3, [w] * 3, tg)
    with pytest.raises(ValueError, match=r"\[E, N, 128\]"):
        gm.grouped_matmul_nt([x], [jnp.zeros((2, 128, 64), jnp.bfloat16)], tg)
    with pytest.raises(ValueError, match="every lhs"):
        gm.grouped_matmul_nt([x, x[:, :64]], [w, w], tg)
    with pytest.raises(ValueError, match="tile_group"):
        gm.grouped_matmul_nt([x], [w], jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="g, u must be"):
        gm.grouped_swiglu_bwd(x, w, x, x[:, :64], tg)


def test_dropless_auto_picks_by_device_dtype_and_shape(monkeypatch):
    """dispatch "dropless_auto": Mosaic on Hopper for bf16 tile-aligned shapes, Pallas (Triton) on sm80+ or
    where Mosaic cannot take the input, ragged_dot on CPU; explicit impls pass through."""
    from iva_jax.moe.config import MoEConfig
    assert MoEConfig().resolved_dispatch == "dropless_auto"
    res = lambda dt, f=5632: dp.resolve_dropless_impl("auto", dt, 2048, f)  # noqa: E731
    assert res(jnp.bfloat16) == "ragged"  # this CPU
    assert dp.resolve_dropless_impl("pallas", jnp.bfloat16, 2048, 5632) == "pallas"
    for cc, kind, want_bf16 in (((9, 0), "NVIDIA H100 80GB HBM3", "mosaic"), ((8, 0), "NVIDIA A100", "pallas")):
        info = kd.DeviceInfo("cuda", kind, cc, 132)
        monkeypatch.setattr(kd, "device_info", lambda info=info: info)
        monkeypatch.setattr(gm, "device_info", lambda info=info: info)
        assert res(jnp.bfloat16) == want_bf16
        assert res(jnp.float32) == "pallas"  # Mosaic takes bf16 / f16 only
        assert res(jnp.bfloat16, f=5600) == "pallas"  # not a multiple of the Mosaic tiles
        # the backward tiles of kernel_kw count too (else auto would pick Mosaic and its backward would raise)
        bad_dh = dict(dh_tiles=gm.Tiles(tile_k=96))
        assert dp.resolve_dropless_impl("auto", jnp.bfloat16, 2048, 5632, bad_dh) == "pallas"
        assert dp.resolve_dropless_impl("auto", jnp.bfloat16, 2048, 5632,
                                        dict(bad_dh, mosaic_backward=False)) == want_bf16
