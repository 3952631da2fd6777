"""The decode view (`Transformer.decode_view`): fused q/k/v and gate/up projections and weights pre-cast to the
compute dtype compute the same numbers as the HF-named params, and `generate` / `generate_paged` (which decode
on it by default) give the same tokens with and without it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inference_tiny import CFG, tiny_model
from iva_jax.inference import generate, generate_paged
from iva_jax.models.transformer import layer_layout
from iva_jax.moe import MoEConfig

CASES = {  # llama / qwen2 (qkv bias) / qwen3 (qk-norm), GQA 6/2, scanned, unrolled and block layouts
    "llama-scan": CFG,
    "qwen2-scan": CFG.replace(attention_bias=True),
    "qwen3-unrolled": CFG.replace(qk_norm=True, scan_layers=False),
    "moe-block": CFG.replace(num_hidden_layers=4, moe=MoEConfig(num_experts=4, num_experts_per_tok=2,
                                                                moe_intermediate_size=16, decoder_sparse_step=2)),
}


def _prompt(seed=1):
    ids = np.random.default_rng(seed).integers(0, CFG.vocab_size, (2, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # row 1 left-padded
    return ids, mask


@pytest.mark.parametrize("case", list(CASES))
def test_view_layout_logits_and_generate(case):
    cfg = CASES[case]
    model, params = tiny_model(cfg, seed=3, std=0.2)
    view, vparams = model.decode_view(params, rows=2)
    assert view.fused_qkv and view.fused_gate_up
    for i, (mixer, ffn) in enumerate(cfg.layer_kinds()):
        sub = vparams[f"layers_{i}"] if layer_layout(cfg) == "unrolled" else vparams["layers"]
        orig = params[f"layers_{i}"] if layer_layout(cfg) == "unrolled" else params["layers"]
        if layer_layout(cfg) == "block":
            sub, orig = sub[f"layer_{i % 2}"], orig[f"layer_{i % 2}"]
        attn, o_attn = sub["self_attn"], orig["self_attn"]
        assert not {"q_proj", "k_proj", "v_proj"} & set(attn)
        want = np.concatenate([o_attn[n]["kernel"] for n in ("q_proj", "k_proj", "v_proj")], axis=-1)
        np.testing.assert_array_equal(attn["qkv_proj"]["kernel"], want)  # stacked layer axis kept
        if cfg.attention_bias:
            want = np.concatenate([o_attn[n]["bias"] for n in ("q_proj", "k_proj", "v_proj")], axis=-1)
            np.testing.assert_array_equal(attn["qkv_proj"]["bias"], want)
        if ffn == "dense":
            want = np.concatenate([orig["mlp"][n]["kernel"] for n in ("gate_proj", "up_proj")], axis=-1)
            np.testing.assert_array_equal(sub["mlp"]["gate_up_proj"]["kernel"], want)
        else:  # MoE FFN untouched
            assert jax.tree_util.tree_structure(sub["mlp"]) == jax.tree_util.tree_structure(orig["mlp"])
    ids, mask = _prompt()
    both = jax.jit(lambda p, q: (model.apply({"params": p}, ids, mask), view.apply({"params": q}, ids, mask)))
    a, b = both(params, vparams)
    np.testing.assert_allclose(b, a, rtol=0, atol=2e-5)  # f32: equal up to matmul summation order
    kw = dict(attention_mask=mask, eos_token_id=[])
    fused = np.asarray(generate(model, params, ids, 12, **kw))
    plain = np.asarray(generate(model, params, ids, 12, fuse_projections=False, **kw))
    np.testing.assert_array_equal(fused, plain)


def test_one_decode_step_logits_bf16_and_paged():
    """bf16 compute over f32 params: the view's pre-cast weights give the same step logits; paged generate too."""
    from iva_jax.inference import KVCache

    cfg = CFG.replace(dtype="bfloat16")
    model, params = tiny_model(cfg, seed=5, std=0.2)
    view, vparams = model.decode_view(params, rows=2)
    assert vparams["layers"]["self_attn"]["qkv_proj"]["kernel"].dtype == jnp.bfloat16
    assert vparams["layers"]["input_layernorm"]["scale"].dtype == jnp.float32  # norms keep theirs
    ids, mask = _prompt(3)

    @jax.jit
    def steps(params, vparams):
        cache = KVCache.init(cfg, 2, 16)
        _, cache = model.apply({"params": params}, ids, mask, cache=cache)
        tok = jnp.asarray([[5], [7]], jnp.int32)
        one = jnp.ones_like(tok)
        return (model.apply({"params": params}, tok, one, cache=cache)[0],
                view.apply({"params": vparams}, tok, one, cache=cache)[0])

    a, b = steps(params, vparams)
    np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32), rtol=0, atol=0.04)
    model32, params32 = tiny_model(CFG, seed=5, std=0.2)
    kw = dict(attention_mask=mask, eos_token_id=[])
    np.testing.assert_array_equal(np.asarray(generate_paged(model32, params32, ids, 10, page_size=4, **kw)),
                                  np.asarray(generate_paged(model32, params32, ids, 10, page_size=4,
                                                            fuse_projections=False, **kw)))


def test_view_gradients_flow_to_the_hf_params():
    """The view is a reparametrisation: gradients through it equal the gradients of the HF-named params."""
    model, params = tiny_model(CFG.replace(attention_bias=True, qk_norm=True), seed=6)
    ids, mask = _prompt(4)

    def loss(p, fused):
        m, q = model.decode_view(p) if fused else (model, p)
        lg = m.apply({"params": q}, ids, mask)
        return jnp.mean(jax.nn.log_softmax(lg)[..., 3] * mask)

    g_plain, g_fused = jax.jit(lambda p: (jax.grad(loss)(p, False), jax.grad(loss)(p, True)))(params)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), g_fused, g_plain)
    assert float(jnp.max(jnp.abs(g_plain["layers"]["self_attn"]["k_proj"]["bias"]))) > 0


def test_unfusable_params_fall_back():
    """Quantized kernels, adapter leaves and an already-fused view are left alone (no error)."""
    from iva_jax.quant import quantize

    model, params = tiny_model(CFG.replace(hidden_size=64, intermediate_size=96, num_attention_heads=4, head_dim=16),
                               seed=7)
    qmodel, qparams = quantize(model, params, "int8", group_size=32)
    view, vparams = qmodel.decode_view(qparams, rows=2)
    assert view == qmodel and not view.fused_qkv and not view.fused_gate_up  # the unfused decoder, unchanged
    assert vparams["layers"]["self_attn"]["q_proj"]["kernel"] is qparams["layers"]["self_attn"]["q_proj"]["kernel"]
    ids, mask = _prompt(5)
    out = np.asarray(generate(qmodel, qparams, ids, 4, attention_mask=mask, eos_token_id=[]))
    assert out.shape == (2, 4) and (out >= 0).all() and (out < CFG.vocab_size).all()

    lora = jax.tree_util.tree_map(lambda x: x, params)
    lora["layers"]["self_attn"]["q_proj"] = {**lora["layers"]["self_attn"]["q_proj"], "lora_a": jnp.zeros((2, 64, 4))}
    view, vparams = model.decode_view(lora)
    assert not view.fused_qkv and view.fused_gate_up and "q_proj" in vparams["layers"]["self_attn"]

    view, vparams = model.decode_view(params)
    again, vparams2 = view.decode_view(vparams)
    assert again.fused_qkv and again.fused_gate_up
    assert jax.tree_util.tree_structure(vparams2) == jax.tree_util.tree_structure(vparams)
