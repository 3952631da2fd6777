"""int8 / int4 weight-only quantization: error bounds against float64 numpy, the quantized model through
`model.apply` / `generate`, checkpoints, QuantConfig, and bad input."""

import importlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iva_jax import quant
from iva_jax.config import ModelConfig
from iva_jax.inference import generate
from iva_jax.quant import QuantConfig, QuantizedWeight
from inference_tiny import tiny_model

qm = importlib.import_module("kernels.quant_matmul")
ROOT = Path(__file__).resolve().parents[1]


def numpy_codes(qw: QuantizedWeight) -> np.ndarray:
    """Integer codes [..., K, N] decoded in numpy (int4: nibble by nibble, as the format documents)."""
    c = np.asarray(qw.qweight)
    if qw.bits == 8:
        return c.astype(np.int64)
    n = qw.scale.shape[-1]  # int4: little-endian int32 words of 4 columns' bytes -> bytes [..., K/2, N]
    c = np.ascontiguousarray(c.astype("<i4")).view(np.uint8).reshape(*c.shape[:-1], -1)[..., :n].astype(np.int64)
    *lead, k2, n = c.shape
    g = qw.group_size
    c = c.reshape(*lead, 2 * k2 // g, g // 2, n)
    return np.concatenate([c & 15, c >> 4], axis=-2).reshape(*lead, 2 * k2, n)


def weight(seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((2, 192, 40)) * rng.uniform(0.01, 1.0, (2, 1, 40))
    w[0, 64:128, 3] = 0.0  # an all-zero group
    w[1, :64, 5] = 0.37  # a constant group
    w[1, 70, 7] = 25.0  # an outlier
    return w.astype(np.float32)


@pytest.mark.parametrize("bits,sym", [(8, True), (8, False), (4, True), (4, False)])
def test_dequantize_error_within_half_step(bits, sym):
    w = weight(bits)
    g = 64
    qw = QuantizedWeight.from_float(jnp.asarray(w), bits=bits, group_size=g, symmetric=sym)
    assert qw.shape == w.shape and qw.symmetric == sym and qw.scale.dtype == jnp.float16
    codes = numpy_codes(qw)
    s = np.repeat(np.asarray(qw.scale, np.float64), g, axis=-2)
    if sym:
        qmax = 127 if bits == 8 else 7
        vals = codes - (8 if bits == 4 else 0)
        assert np.abs(vals).max() <= qmax
        w_hat = vals * s
        wg = np.abs(w.astype(np.float64)).reshape(2, 3, g, 40).max(axis=2)
        smin = np.where(wg > 0, wg / qmax, 1.0)
    else:
        qmax = 2 ** bits - 1
        assert codes.min() >= 0 and codes.max() <= qmax
        w_hat = codes * s + np.repeat(np.asarray(qw.zero, np.float64), g, axis=-2)
        wg = w.astype(np.float64).reshape(2, 3, g, 40)
        zero = np.asarray(qw.zero, np.float64)
        assert np.all(zero <= wg.min(axis=2)) and np.all(zero >= wg.min(axis=2) - 1e-3 * np.abs(wg.min(axis=2)))
        span = wg.max(axis=2) - zero
        smin = np.where(span > 0, span / qmax, 1.0)
    err = np.abs(w - w_hat)
    assert np.all(err <= 0.5 * s * (1 + 1e-6) + 1e-12)  # round to nearest, nothing clipped
    # the scale is the smallest that covers the group (up to one float16 ulp)
    sc = np.asarray(qw.scale, np.float64)
    assert np.all(sc >= smin * (1 - 1e-3)) and np.all(sc <= smin * (1 + 2e-3) + 1e-7)
    # rounding error of a real quantizer: about s/4 on average, exact on zero / constant groups
    mean_rel = np.mean(err[0, :64] / s[0, :64])
    assert 0.15 < mean_rel < 0.35, mean_rel
    assert np.all(err[0, 64:128, 3] == 0)
    assert np.max(err[1, :64, 5]) <= 0.37 * 2e-3
    np.testing.assert_allclose(np.asarray(qw.dequantize(jnp.float32)), w_hat, rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attention_bias=True)
    model, params = tiny_model(cfg, seed=1, std=0.05)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 11)))
    fwd = jax.jit(lambda p, x: model.apply({"params": p}, x))
    _, q4 = quant.quantize(model, params, "int4", 32)
    return model, params, ids, fwd, fwd(params, ids), q4


def test_quantized_model_apply_generate_and_size(tiny):
    model, params, ids, fwd, ref, q4 = tiny
    kernel = q4["layers"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(kernel, QuantizedWeight) and kernel.shape == (2, 64, 64) and kernel.bits == 4
    assert "bias" in q4["layers"]["self_attn"]["q_proj"]
    assert not isinstance(q4["embed_tokens"]["embedding"], QuantizedWeight)
    out = fwd(q4, ids)
    np.testing.assert_allclose(np.asarray(out), np.asarray(fwd(quant.dequantize_params(q4), ids)), atol=1e-4)
    err = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
    assert 0 < err < 0.25, err
    assert generate(model, q4, ids, 4, eos_token_id=[]).shape == (2, 4)
    _, q8 = quant.quantize(model, params, "int8", 32)
    assert quant.params_nbytes(params) > quant.params_nbytes(q8) > quant.params_nbytes(q4)


def test_checkpoint_roundtrip(tiny, tmp_path):
    model, params, ids, fwd, _, qp = tiny
    quant.save_quantized(model, qp, tmp_path / "q4")
    m2, qp2 = quant.load_quantized(tmp_path / "q4")
    assert m2.config == model.config
    a, b = qp["layers"]["mlp"]["down_proj"]["kernel"], qp2["layers"]["mlp"]["down_proj"]["kernel"]
    assert (b.bits, b.group_size) == (4, 32) and b.qweight.dtype == jnp.int32 and b.zero is not None
    np.testing.assert_array_equal(np.asarray(a.qweight), np.asarray(b.qweight))
    np.testing.assert_array_equal(np.asarray(fwd(qp2, ids)), np.asarray(fwd(qp, ids)))
    with pytest.raises(ValueError, match="not a quantized checkpoint"):
        quant.load_quantized(tmp_path)


def test_bad_input(tiny):
    model, params = tiny[:2]
    with pytest.raises(ValueError, match="unknown precision"):
        quant.quantize(model, params, "int3")
    with pytest.raises(ValueError, match="group_size 96 not in"):
        quant.quantize(model, params, "int8", 96)
    with pytest.raises(ValueError, match="group_size 256 does not divide in_features"):
        quant.quantize(model, params, "int4", 256)
    with pytest.raises(ValueError, match="no kernel of the modules"):
        quant.quantize(model, params, "int8", 32, modules=("nope",))
    _, qp = quant.quantize(model, params, "int8", 32)
    with pytest.raises(ValueError, match="already quantized"):
        quant.quantize(model, qp, "int8", 32)
    assert quant.quantize(model, params, "bf16") == (model, params)


def test_quant_config_yaml_and_validation():
    cfg = QuantConfig.from_yaml(ROOT / "configs" / "quant_infer.yaml")
    assert cfg.precision in ("int8", "int4") and cfg.paged_kv_cache
    assert QuantConfig.from_yaml(cfg.to_yaml()) == cfg
    for bad, match in ((dict(precision="int2"), "precision"), (dict(group_size=100), "group_size"),
                       (dict(kv_precision="int8"), "kv_precision"), (dict(n_sink=4), "n_sink"),
                       (dict(kv_window=64, paged_kv_cache=False), "kv_window")):
        with pytest.raises(ValueError, match=match):
            QuantConfig(**bad)


def test_moe_shared_expert_quantizes():
    """Qwen2-MoE style decoder: the shared expert's projections are quantized like any Linear and the
    int8 model's logits stay within 2% of the float model's (the routed experts' stacked weights stay float)."""
    from flax.core import meta

    from iva_jax.models.transformer import Transformer
    from iva_jax.moe import MoEConfig

    c = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64,
                    moe=MoEConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                  shared_expert_intermediate_size=96))
    model = Transformer(c)
    params = meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    qmodel, qparams = quant.quantize(model, params, "int8", 32)
    shared = qparams["layers"]["mlp"]["shared_expert"]
    assert all(isinstance(shared[n]["kernel"], QuantizedWeight) for n in ("gate_proj", "up_proj", "down_proj"))
    ids = jnp.array([[1, 7, 3, 9, 4, 2]])
    ref = np.asarray(model.apply({"params": params}, ids))
    out = np.asarray(qmodel.apply({"params": qparams}, ids))
    assert np.abs(out - ref).max() <= 0.02 * np.abs(ref).max()
    assert generate(qmodel, qparams, ids, 4).shape == (1, 4)
