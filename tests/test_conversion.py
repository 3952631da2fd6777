"""HF -> orbax -> HF round trip (torch_bridge.hf_to_orbax / orbax_to_torch): tensors bit-identical, config and
tokenizer files carried, dtype option, model-source resolution, and clear errors."""

import json

import jax
import numpy as np
import pytest

pytest.importorskip("torch", reason="conversion tests build their HF models with torch")

from hf_tiny import tiny_hf  # noqa: E402
from iva_jax.train.checkpoint import Checkpointer, save_params  # noqa: E402
from torch_bridge import hf_to_orbax, orbax_to_torch  # noqa: E402
from torch_bridge.hf_config import config_from_hf  # noqa: E402


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "qwen3"
    tiny_hf("qwen3", d, seed=5, tie_word_embeddings=False)
    (d / "tokenizer.json").write_text('{"version": "1.0", "fake": true}')
    (d / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    return d


def test_hf_orbax_hf_round_trip_is_bit_exact(qwen3, tmp_path):
    from safetensors.numpy import load_file

    ck = hf_to_orbax.main([str(qwen3), str(tmp_path / "ckpt")])
    assert (ck / "model_config.yaml").exists() and (ck / "tokenizer" / "tokenizer.json").exists()
    assert Checkpointer(ck).all_steps() == [0]
    out = orbax_to_torch.main([str(ck), str(tmp_path / "back")])
    src, back = load_file(qwen3 / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(src) == sorted(back)
    for k in src:
        assert back[k].dtype == np.float32
        np.testing.assert_array_equal(back[k], src[k], err_msg=k)
    c_src = json.loads((qwen3 / "config.json").read_text())
    c_back = json.loads((out / "config.json").read_text())
    assert config_from_hf(c_back) == config_from_hf(c_src)  # same architecture (qk_norm, GQA, rope theta ...)
    assert (out / "tokenizer.json").read_text() == (qwen3 / "tokenizer.json").read_text()
    # the orbax directory is a model source like any other
    lm = hf_to_orbax.load_model(ck)
    assert lm.config.qk_norm and lm.tokenizer == str(ck / "tokenizer")
    ref = hf_to_orbax.load_model(qwen3)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(lm.params), jax.device_get(ref.params))


def test_dtype_options_and_errors(qwen3, tmp_path):
    from safetensors.numpy import load_file

    ck = hf_to_orbax.convert(qwen3, tmp_path / "bf16", dtype="bfloat16")
    stored = Checkpointer(ck).restore_params()
    assert {x.dtype.name for x in jax.tree_util.tree_leaves(stored)} == {"bfloat16"}
    out = orbax_to_torch.convert(tmp_path / "bf16", tmp_path / "hf16", dtype="float16")
    t = load_file(out / "model.safetensors")
    assert {v.dtype for v in t.values()} == {np.dtype("float16")}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    with pytest.raises(FileExistsError, match="not empty"):
        hf_to_orbax.convert(qwen3, tmp_path / "bf16")
    with pytest.raises(FileNotFoundError, match="not an orbax checkpoint directory"):
        orbax_to_torch.convert(qwen3, tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="model source not found"):
        hf_to_orbax.load_model(tmp_path / "nowhere")
    # adapters without lora.yaml cannot be merged: say so instead of exporting garbage
    lm = hf_to_orbax.load_model(qwen3)
    adapters = {"layers": {"self_attn": {"q_proj": {"lora_a": np.zeros((2, 48, 2), np.float32),
                                                    "lora_b": np.zeros((2, 2, 48), np.float32)}}}}
    save_params(tmp_path / "lora_ck", adapters, model_config=lm.config)
    with pytest.raises(ValueError, match="only LoRA adapters but has no lora.yaml"):
        orbax_to_torch.convert(tmp_path / "lora_ck", tmp_path / "y")
