"""Decoder parity with transformers (fp32) for each family, and export -> transformers reload."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch", reason="parity tests need the torch extra")

from hf_tiny import hf_logits, tiny_hf  # noqa: E402
from torch_bridge import load_pretrained, save_pretrained  # noqa: E402

TOL = 1e-4

CASES = {
    "llama_llama3_untied": ("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 16})),
    "llama_tied_bias": ("llama", dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
    "llama_linear": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.5})),
    "llama_dynamic": ("llama", dict(max_position_embeddings=16, rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    "llama_yarn": ("llama", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                               "original_max_position_embeddings": 16})),
    "mistral_window": ("mistral", dict(sliding_window=7)),
    "qwen2_bias": ("qwen2", dict()),
    "qwen3_qknorm": ("qwen3", dict(head_dim=16)),
    "qwen3_mixed_window": ("qwen3", dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=5,
                                         max_window_layers=1)),
}


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(0, 97, (2, 23))


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, ids, tmp_path):
    family, kw = CASES[case]
    hf = tiny_hf(family, tmp_path / "hf", **kw)
    ref = hf_logits(hf, ids)
    model, params = load_pretrained(tmp_path / "hf")
    assert model.config.model_type == family
    out = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
    assert out.shape == ref.shape
    err = np.abs(out - ref).max()
    assert err <= TOL, f"{case}: max |logit diff| {err:.2e}"

    save_pretrained(model, params, tmp_path / "export", max_shard_size=20_000 if case == "llama_tied_bias" else "5GB")
    import transformers

    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
    err2 = np.abs(hf_logits(back, ids) - ref).max()
    assert err2 <= 1e-6, f"{case}: export round trip differs by {err2:.2e}"


def test_sharded_export_writes_an_index(tmp_path):
    hf = tiny_hf("llama", tmp_path / "hf")
    model, params = load_pretrained(tmp_path / "hf")
    save_pretrained(model, params, tmp_path / "out", max_shard_size=30_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) > 1
    model2, params2 = load_pretrained(tmp_path / "out")
    leaves = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), params,
                                                              params2))
    assert max(leaves) == 0.0
    del hf


def test_padded_batch_masks_padding(ids, tmp_path):
    """Left-padded rows give the same logits (on real tokens) as the rows run alone."""
    hf = tiny_hf("qwen2", tmp_path / "hf")
    model, params = load_pretrained(tmp_path / "hf")
    mask = np.ones_like(ids)
    mask[0, :9] = 0
    out = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    alone = np.asarray(model.apply({"params": params}, jnp.asarray(ids[:1, 9:])))
    np.testing.assert_allclose(out[0, 9:], alone[0], atol=1e-5)
    ref = hf_logits(hf, ids[:1, 9:])
    assert np.abs(alone - ref).max() <= TOL


def test_unscanned_and_sharded_load_agree(ids, tmp_path):
    """scan_layers=False and a params placement on an 8-device mesh give the same logits."""
    from iva_jax.parallel import make_mesh

    tiny_hf("mistral", tmp_path / "hf", sliding_window=7)
    model, params = load_pretrained(tmp_path / "hf")
    ref = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
    m2, p2 = load_pretrained(tmp_path / "hf", scan_layers=False)
    assert "layers_1" in p2
    np.testing.assert_allclose(np.asarray(m2.apply({"params": p2}, jnp.asarray(ids))), ref, atol=1e-5)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    m3, p3 = load_pretrained(tmp_path / "hf", mesh=mesh)
    assert len(p3["layers"]["self_attn"]["q_proj"]["kernel"].sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(jax.jit(m3.apply)({"params": p3}, jnp.asarray(ids))), ref, atol=1e-5)


def test_bf16_load_runs_in_bf16(ids, tmp_path):
    hf = tiny_hf("llama", tmp_path / "hf")
    model, params = load_pretrained(tmp_path / "hf", dtype=jnp.bfloat16)
    assert params["layers"]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16
    out = np.asarray(model.apply({"params": params}, jnp.asarray(ids))).astype(np.float32)
    ref = hf_logits(hf, ids)
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert rel < 3e-2, rel
