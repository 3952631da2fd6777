"""MoE decoder parity with transformers (fp32, dropless): random tiny Mixtral, Qwen2-MoE (every layer, every
other layer, mlp_only_layers) and Qwen3-MoE; logits within 1e-4, the HF-exact balancing loss, export ->
transformers reload, and greedy generation with the KV cache equal to transformers' generate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need the torch extra")

from hf_tiny import hf_logits, tiny_hf  # noqa: E402
from iva_jax.inference import generate  # noqa: E402
from iva_jax.layers.rotary import positions_from_mask  # noqa: E402
from iva_jax.models.transformer import layer_layout  # noqa: E402
from torch_bridge import load_pretrained, save_pretrained  # noqa: E402

TOL = 1e-4
MOE = dict(num_experts=5, num_experts_per_tok=2, moe_intermediate_size=24)
CASES = {  # name: (family, HF config overrides, expected layer layout)
    "mixtral": ("mixtral", dict(num_local_experts=5, num_experts_per_tok=2, intermediate_size=24), "scan"),
    "qwen2_moe_sparse_step_2": ("qwen2_moe", dict(num_hidden_layers=4, decoder_sparse_step=2,
                                                  shared_expert_intermediate_size=20, **MOE), "block"),
    "qwen2_moe_mlp_only": ("qwen2_moe", dict(num_hidden_layers=3, mlp_only_layers=[1], norm_topk_prob=True,
                                             shared_expert_intermediate_size=20, **MOE), "unrolled"),
    "qwen3_moe": ("qwen3_moe", dict(head_dim=16, norm_topk_prob=True, **MOE), "scan"),
}


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 97, (2, 13))
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row: padding is left out of the balancing loss
    return ids, mask


@pytest.mark.parametrize("case", list(CASES))
def test_moe_logits_aux_loss_and_export_match_transformers(case, batch, tmp_path):
    family, kw, layout = CASES[case]
    ids, mask = batch
    hf = tiny_hf(family, tmp_path / "hf", **kw)
    model, params = load_pretrained(tmp_path / "hf")
    c = model.config
    assert c.model_type == family and c.moe is not None and c.moe.capacity_factor is None
    assert layer_layout(c) == layout

    pos = np.asarray(positions_from_mask(jnp.asarray(mask)))
    fwd = jax.jit(lambda p, x, m: model.apply({"params": p}, x, m, mutable=["losses", "metrics"]))
    logits, cols = fwd(params, jnp.asarray(ids), jnp.asarray(mask))
    with torch.no_grad():
        out = hf(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos),
                 output_router_logits=True)
    ref = out.logits.numpy()
    real = mask.astype(bool)
    err = np.abs(np.asarray(logits) - ref)[real].max()
    assert err <= TOL, f"{case}: max |logit diff| {err:.2e}"
    # HF averages tokens-per-expert and router probs over the MoE layers (and real tokens) before the product
    ours = float(cols["losses"]["moe"]["load_balancing"][0]) / c.moe.aux_loss_coef
    np.testing.assert_allclose(ours, float(out.aux_loss), rtol=1e-5)
    n_moe = sum(f == "moe" for f in c.layer_ffns())
    assert len(out.router_logits) == n_moe
    assert float(cols["metrics"]["moe"]["overflow_pct"][0]) == 0.0  # dropless

    save_pretrained(model, params, tmp_path / "export")
    import transformers

    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
    err2 = np.abs(hf_logits(back, ids[:1]) - hf_logits(hf, ids[:1])).max()
    assert err2 <= 1e-6, f"{case}: export round trip differs by {err2:.2e}"
    assert back.config.to_dict().get("decoder_sparse_step") == hf.config.to_dict().get("decoder_sparse_step")


def test_greedy_generation_matches_transformers(tmp_path):
    """KV-cache decoding through MoE layers in the periodic block layout (dense, MoE, dense, MoE)."""
    _, kw, _ = CASES["qwen2_moe_sparse_step_2"]
    hf = tiny_hf("qwen2_moe", tmp_path, std=0.3, max_position_embeddings=64, **kw)
    model, params = load_pretrained(tmp_path)
    ids = np.random.default_rng(1).integers(0, 97, (1, 9))
    with torch.no_grad():
        ref = hf.generate(torch.tensor(ids), max_new_tokens=16, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[:, 9:].numpy()
    out = np.asarray(generate(model, params, ids, 16, eos_token_id=[]))
    np.testing.assert_array_equal(out, ref)


def test_export_rejects_what_hf_cannot_express(tmp_path):
    from iva_jax.config import ModelConfig
    from iva_jax.moe import MoEConfig
    from torch_bridge.hf_config import config_to_hf

    base = dict(vocab_size=31, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1)
    moe = MoEConfig(num_experts=4, moe_intermediate_size=8)
    with pytest.raises(ValueError, match="every layer"):
        config_to_hf(ModelConfig(**base, model_type="mixtral", moe=moe.replace(decoder_sparse_step=2)))
    with pytest.raises(ValueError, match="shared expert"):
        config_to_hf(ModelConfig(**base, model_type="qwen2_moe", attention_bias=True, moe=moe))
    with pytest.raises(ValueError, match="router='hash'"):
        config_to_hf(ModelConfig(**base, model_type="mixtral", moe=moe.replace(router="hash")))
    with pytest.raises(ValueError, match="needs MoE layers"):
        config_to_hf(ModelConfig(**base, model_type="qwen3_moe", qk_norm=True))
    hf = config_to_hf(ModelConfig(**{**base, "num_hidden_layers": 4}, model_type="qwen3_moe", qk_norm=True,
                                  moe=moe.replace(moe_layers=(1, 2))))
    assert hf["decoder_sparse_step"] == 1 and hf["mlp_only_layers"] == [0, 3]  # explicit list -> HF's rule
