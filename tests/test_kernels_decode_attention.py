"""Decode attention: Pallas kernel (interpret mode) and XLA reference vs a float64 numpy definition.

Paged (page size 8, shuffled page table, GQA 3:1, head_dim 40, rows of length 0 / 5 / 29 with a window
start), split-K 1 and 3, bf16 with fp8 pages and per-slot scales, the dense [L, B, S, Hkv, D] layout
with a validity mask and a traced layer index, VJPs, and the Pallas -> Triton lowering for CUDA.
"""

import importlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

da = importlib.import_module("kernels.decode_attention")


def numpy_attention(q, keys, values, visible, scale):
    """q [B, Hq, D], keys/values [B, S, Hkv, D] float64, visible [B, S] -> [B, Hq, D] (rows with no key: 0)."""
    b, hq, d = q.shape
    hkv = keys.shape[2]
    out = np.zeros((b, hq, d))
    for i in range(b):
        for h in range(hq):
            idx = np.nonzero(visible[i])[0]
            if idx.size == 0:
                continue
            s = keys[i, idx, h // (hq // hkv)] @ q[i, h] * scale
            p = np.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ values[i, idx, h // (hq // hkv)]
    return out


def paged_case(seed, dtype=np.float32, fp8=False):
    rng = np.random.default_rng(seed)
    L, P, ps, hkv, d, b, hq, maxp = 2, 13, 8, 2, 40, 3, 6, 4
    kp = rng.standard_normal((L, P, ps, hkv, d))
    vp = rng.standard_normal((L, P, ps, hkv, d))
    ks = vs = None
    if fp8:
        ks = rng.uniform(0.5, 2.0, (L, P, ps, hkv))
        vs = rng.uniform(0.5, 2.0, (L, P, ps, hkv))
        kp = np.asarray(kp.astype(ml_dtypes.float8_e4m3fn))
        vp = np.asarray(vp.astype(ml_dtypes.float8_e4m3fn))
    q = rng.standard_normal((b, hq, d))
    table = rng.permutation(P)[: b * maxp].reshape(b, maxp).astype(np.int32)
    lengths = np.array([5, 29, 0], np.int32)
    starts = np.array([0, 12, 0], np.int32)
    return dict(q=q, kp=kp, vp=vp, ks=ks, vs=vs, table=table, lengths=lengths, starts=starts, layer=1)


def paged_expected(c):
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    kp, vp = f64(c["kp"][c["layer"]]), f64(c["vp"][c["layer"]])
    if c["ks"] is not None:
        kp = kp * c["ks"][c["layer"]][..., None]
        vp = vp * c["vs"][c["layer"]][..., None]
    b, maxp = c["table"].shape
    ps = kp.shape[1]
    keys = kp[c["table"]].reshape(b, maxp * ps, *kp.shape[2:])
    vals = vp[c["table"]].reshape(b, maxp * ps, *vp.shape[2:])
    j = np.arange(maxp * ps)[None]
    vis = (j >= c["starts"][:, None]) & (j < c["lengths"][:, None])
    return numpy_attention(f64(c["q"]), keys, vals, vis, c["q"].shape[-1] ** -0.5)


def run_paged(c, impl, dtype, **kw):
    kd = jnp.float8_e4m3fn if c["ks"] is not None else dtype
    sc = {} if c["ks"] is None else dict(k_scale=jnp.asarray(c["ks"], jnp.float32),
                                         v_scale=jnp.asarray(c["vs"], jnp.float32))
    arrays = (jnp.asarray(c["q"], dtype), jnp.asarray(c["kp"], kd), jnp.asarray(c["vp"], kd), jnp.asarray(c["table"]),
              jnp.asarray(c["lengths"]))
    return da.paged_decode_attention(*arrays, starts=jnp.asarray(c["starts"]), layer=c["layer"], impl=impl,
                                     interpret=True, **sc, **kw)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("impl,splits", [("xla", None), ("triton", 1), ("triton", 3)])
def test_paged_f32_matches_float64(impl, splits):
    c = paged_case(0)
    out = run_paged(c, impl, jnp.float32, blocks=da.DecodeBlocks(num_splits=splits))
    exp = paged_expected(c)
    assert out.shape == exp.shape and out.dtype == jnp.float32
    assert rel(out, exp) < 2e-6
    np.testing.assert_array_equal(np.asarray(out[2]), 0.0)  # empty row -> zeros


def test_paged_bf16_fp8_pages():
    c = paged_case(1, fp8=True)
    exp = paged_expected(c)
    for impl in ("xla", "triton"):
        out = run_paged(c, impl, jnp.bfloat16)
        assert out.dtype == jnp.bfloat16
        assert rel(out, exp) < 2e-2, impl


def test_dense_layout_valid_mask_traced_layer():
    rng = np.random.default_rng(2)
    L, b, s, hkv, d, hq = 3, 2, 37, 1, 64, 3
    k = rng.standard_normal((L, b, s, hkv, d))
    v = rng.standard_normal((L, b, s, hkv, d))
    q = rng.standard_normal((b, hq, d))
    valid = rng.random((b, s)) > 0.25
    lengths, starts = np.array([37, 20], np.int32), np.array([3, 0], np.int32)
    j = np.arange(s)[None]
    exp = numpy_attention(q, k[2], v[2], valid & (j >= starts[:, None]) & (j < lengths[:, None]), d ** -0.5)

    @jax.jit
    def f(q, k, v, layer):
        kw = dict(starts=jnp.asarray(starts), kv_valid=jnp.asarray(valid), layer=layer, interpret=True,
                  blocks=da.DecodeBlocks(num_splits=2))
        return [da.decode_attention(q, k, v, jnp.asarray(lengths), impl=impl, **kw) for impl in ("xla", "triton")]

    for out in f(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), jnp.asarray(2)):
        assert rel(out, exp) < 2e-6


def test_vjp_equals_reference_vjp():
    c = paged_case(3)
    c["lengths"] = np.array([5, 29, 17], np.int32)
    q, kp, vp = (jnp.asarray(c[n], jnp.float32) for n in ("q", "kp", "vp"))
    ct = jnp.asarray(np.random.default_rng(4).standard_normal(q.shape), jnp.float32)

    def loss(impl):
        def f(q, kp, vp):
            o = da.paged_decode_attention(q, kp, vp, jnp.asarray(c["table"]), jnp.asarray(c["lengths"]),
                                          starts=jnp.asarray(c["starts"]), layer=1, impl=impl, interpret=True)
            return jnp.sum(o * ct)
        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, kp, vp)

    for a, b in zip(loss("triton"), loss("xla")):
        assert float(jnp.max(jnp.abs(b))) > 0
        assert rel(a, b) < 1e-6


def test_triton_lowering_for_cuda(monkeypatch):
    """The Pallas -> Triton lowering succeeds for SmolLM2-like decode shapes (bf16 / fp8 pages, split-K, dense)."""
    sd = jax.ShapeDtypeStruct
    L, P, ps, hkv, d, b, hq = 4, 64, 16, 3, 64, 2, 9
    texts = []
    for kd, splits in ((jnp.bfloat16, 1), (jnp.float8_e4m3fn, 4)):
        sc = (sd((L, P, ps, hkv), jnp.float32),) * 2 if kd == jnp.float8_e4m3fn else ()

        def f(q, kp, vp, table, lengths, *scales, splits=splits):
            ks, vs = scales if scales else (None, None)
            return da._triton(q, kp, vp, ks, vs, table, None, jnp.stack([lengths * 0, lengths], 1),
                              jnp.zeros((1,), jnp.int32), paged=True, sm_scale=0.125,
                              blocks=da.DecodeBlocks(num_splits=splits), interpret=False)
        args = (sd((b, hq, d), jnp.bfloat16), sd((L, P, ps, hkv, d), kd), sd((L, P, ps, hkv, d), kd),
                sd((b, 8), jnp.int32), sd((b,), jnp.int32), *sc)
        texts.append(jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text())

    def g(q, k, v, valid, lengths):
        return da._triton(q, k, v, None, None, None, valid, jnp.stack([lengths * 0, lengths], 1),
                          jnp.zeros((1,), jnp.int32), paged=False, sm_scale=0.1, blocks=da.DecodeBlocks(),
                          interpret=False)
    texts.append(jax.jit(g).trace(sd((b, hq, 80), jnp.bfloat16), sd((L, b, 100, hkv, 80), jnp.bfloat16),
                                  sd((L, b, 100, hkv, 80), jnp.bfloat16), sd((b, 100), jnp.int8),
                                  sd((b,), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text())
    assert all(t.count("__gpu$xla.gpu.triton") == 1 for t in texts)


def test_dispatch_and_bad_inputs():
    assert da.choose_impl("auto", jnp.bfloat16, 64) == "xla"  # CPU: XLA
    assert da.choose_impl("auto", jnp.float32, 64, interpret=True) == "triton"
    with pytest.raises(ValueError, match="mosaic"):
        da.choose_impl("mosaic", jnp.bfloat16, 64)
    c = paged_case(0)
    q, kp = jnp.asarray(c["q"], jnp.float32), jnp.asarray(c["kp"], jnp.float32)
    table, lengths = jnp.asarray(c["table"]), jnp.asarray(c["lengths"])
    with pytest.raises(ValueError, match="q must be"):
        da.paged_decode_attention(q[0], kp, kp, table, lengths)
    with pytest.raises(ValueError, match="page_table"):
        da.paged_decode_attention(q, kp, kp, table[:2], lengths)
    with pytest.raises(ValueError, match="k_scale"):
        da.paged_decode_attention(q, kp.astype(jnp.float8_e4m3fn), kp.astype(jnp.float8_e4m3fn), table, lengths)
    with pytest.raises(ValueError, match="incompatible"):
        da.paged_decode_attention(q[:, :5], kp, kp, table, lengths)
    with pytest.raises(ValueError, match="block_k"):
        da.DecodeBlocks(block_k=24)


def test_auto_selects_the_kernel_on_a_gpu(monkeypatch):
    """On a (faked) H100, impl="auto" traces the Pallas kernel for paged decode (bf16 / fp8 pages, page
    16 / 64, stacked layers, split-K) and through the paged cache's decoder step with attn_impl "auto";
    "xla" and the model's attn_impl "xla" keep the reference."""
    from kernels import dispatch
    from iva_jax.config import ModelConfig
    from iva_jax.inference.paged import PagedKVCache

    info = dispatch.DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0), 132)
    monkeypatch.setattr(dispatch, "device_info", lambda: info)
    sd = jax.ShapeDtypeStruct

    def n_kernels(f, *args):
        return str(jax.make_jaxpr(f)(*args)).count("pallas_call")
    b, hq, hkv, d, L = 2, 8, 2, 64, 3
    for ps, kd in ((16, jnp.bfloat16), (64, jnp.float8_e4m3fn)):
        pages = sd((L, 8, ps, hkv, d), kd)
        sc = dict(k_scale=jnp.ones((L, 8, ps, hkv)), v_scale=jnp.ones((L, 8, ps, hkv))) if kd != jnp.bfloat16 else {}
        for impl, want in (("auto", 1), ("xla", 0)):
            f = jax.jit(lambda q, kp, vp, impl=impl, sc=sc: da.paged_decode_attention(
                q, kp, vp, jnp.zeros((b, 4), jnp.int32), jnp.full((b,), 3 * ps, jnp.int32), layer=1, impl=impl,
                blocks=da.DecodeBlocks(num_splits=3), **sc))
            assert n_kernels(f, sd((b, hq, d), jnp.bfloat16), pages, pages) == want, (ps, kd, impl)

    cfg = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, dtype="bfloat16")
    for attn_impl, want in (("auto", 2), ("xla", 0)):
        cache = PagedKVCache.init(cfg, b, 4, page_size=16)
        _, step = cache.begin(jnp.ones((b, 1), jnp.int32), None, cfg)
        q = jnp.zeros((b, 1, 4, 16), jnp.bfloat16)
        kv = jnp.zeros((b, 1, 2, 16), jnp.bfloat16)

        def two_layers(q, k, v, step=step, attn_impl=attn_impl):
            for layer in range(2):
                out, step = step.attend(q, k, v, layer=layer, impl=attn_impl)
            return out
        assert n_kernels(two_layers, q, kv, kv) == want, attn_impl
