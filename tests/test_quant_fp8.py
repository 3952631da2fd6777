"""fp8 (e4m3) with delayed scaling: the device guard, emulated numerics vs numpy, amax history and drift."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from iva_jax import quant
from iva_jax.config import ModelConfig
from iva_jax.quant import Fp8Weight, fp8
from inference_tiny import tiny_model
from kernels import dispatch


def fake_device(monkeypatch, platform, kind, cc):
    monkeypatch.setattr(dispatch, "device_info", lambda: dispatch.DeviceInfo(platform, kind, cc, 100))


@pytest.mark.parametrize("kind,cc", [("Tesla T4", (7, 5)), ("NVIDIA A100-SXM4-40GB", (8, 0))])
def test_guard_refuses_below_sm89_even_with_emulation(monkeypatch, kind, cc):
    fake_device(monkeypatch, "cuda", kind, cc)
    for allow in (False, True):
        with pytest.raises(ValueError, match=f"sm89.*sm{cc[0]}{cc[1]}.*int8"):
            fp8.check_fp8(allow)


def test_guard_allows_sm89_and_sm90(monkeypatch):
    for cc in ((8, 9), (9, 0)):
        fake_device(monkeypatch, "cuda", "NVIDIA H100", cc)
        assert fp8.fp8_unsupported_reason() is None
        assert fp8.check_fp8(False) is False  # native, not emulated


def test_cpu_needs_explicit_emulation(tiny):
    model, params, _ = tiny
    with pytest.raises(ValueError, match="allow_emulation=True"):
        quant.quantize(model, params, "fp8")
    w = Fp8Weight.from_float(jnp.ones((8, 4)))  # not emulated: refuses to multiply here
    with pytest.raises(ValueError, match="sm89"):
        w.matmul(jnp.ones((2, 8)), jnp.float32)


def test_emulated_matmul_matches_numpy_e4m3():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 24)).astype(np.float32)
    x = (rng.standard_normal((5, 48)) * 3).astype(np.float32)
    fw = Fp8Weight.from_float(jnp.asarray(w), history=4, emulated=True)
    ws = np.abs(w).max() / 448.0
    np.testing.assert_allclose(float(fw.w_scale), ws, rtol=1e-6)
    e4m3 = lambda a: np.asarray(a.astype(ml_dtypes.float8_e4m3fn), np.float64)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(fw.w, np.float64), e4m3(w / np.float32(ws)))
    # before calibration: current scaling from x's own amax
    xs = np.abs(x).max() / 448.0
    exp = (e4m3(x / np.float32(xs)) * xs) @ (e4m3(w / np.float32(ws)) * ws)
    np.testing.assert_allclose(np.asarray(fw.matmul(jnp.asarray(x), jnp.float32)), exp, rtol=1e-5, atol=1e-5)
    # delayed scaling: history amax 2.0 -> x clipped to +-2.0 before the cast
    fw = fw.replace(x_amax_history=jnp.asarray([2.0, 0.5, 0.0, 0.0], jnp.float32))
    xs = 2.0 / 448.0
    exp = (e4m3(np.clip(x / np.float32(xs), -448, 448)) * xs) @ (e4m3(w / np.float32(ws)) * ws)
    np.testing.assert_allclose(np.asarray(fw.matmul(jnp.asarray(x), jnp.float32)), exp, rtol=1e-5, atol=1e-5)
    assert np.abs(x).max() > 2.0  # the clipping mattered


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model, params = tiny_model(cfg, seed=3, std=0.05)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 97, (2, 9)))
    return model, params, ids


def test_fp8_model_delayed_scaling_and_drift(tiny, tmp_path):
    model, params, ids = tiny
    m, qp = quant.quantize(model, params, "fp8", allow_emulation=True, calibration_ids=ids)
    q = qp["layers"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(q, Fp8Weight) and q.w.dtype == jnp.float8_e4m3fn and q.x_amax_history.shape == (2, 16)
    hist = np.asarray(q.x_amax_history)
    assert np.all(hist[:, 0] > 0) and np.all(hist[:, 1:] == 0)
    fwd = jax.jit(lambda p: m.apply({"params": p}, ids))
    ref, out = fwd(params), fwd(qp)
    rel = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
    assert 0 < rel < 0.1, rel
    # the same inputs again: amaxes equal the history -> no drift; history rolls
    qp2, met = quant.fp8_update(m, qp, ids)
    assert met["fp8_tensors"] == 7 and met["fp8_amax_drift"] == pytest.approx(0.0, abs=1e-6)
    h2 = np.asarray(qp2["layers"]["self_attn"]["q_proj"]["kernel"].x_amax_history)
    np.testing.assert_allclose(h2[:, :2], np.stack([hist[:, 0], hist[:, 0]], 1), rtol=1e-6)
    # embeddings scaled x3 -> layer-0 q_proj input (an RMSNorm output) barely moves, but o_proj etc. do
    big = jax.tree_util.tree_map(lambda a: a, params)
    big["embed_tokens"]["embedding"] = params["embed_tokens"]["embedding"] * 3.0
    _, met3 = quant.fp8_update(m, {**qp2, "embed_tokens": big["embed_tokens"]}, ids)
    assert met3["fp8_amax_drift"] > 0.05
    # checkpoints keep the history; loading fp8 needs the same guard
    quant.save_quantized(m, qp2, tmp_path / "f8")
    with pytest.raises(ValueError, match="allow_emulation"):
        quant.load_quantized(tmp_path / "f8")
    m3, qp3 = quant.load_quantized(tmp_path / "f8", allow_emulation=True)
    np.testing.assert_array_equal(np.asarray(qp3["layers"]["mlp"]["up_proj"]["kernel"].x_amax_history),
                                  np.asarray(qp2["layers"]["mlp"]["up_proj"]["kernel"].x_amax_history))
    with pytest.raises(ValueError, match="no Fp8Weight"):
        quant.fp8_update(m, params, ids)
