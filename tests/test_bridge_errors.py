"""Bad input to the bridge: missing files, unknown families, misshaped tensors, unsupported GGUF, unused tensors."""

import json

import numpy as np
import pytest

from torch_bridge import UnusedWeightsWarning, load_pretrained
from torch_bridge.safetensors_io import read_checkpoint, write_checkpoint

torch = pytest.importorskip("torch", reason="needs the torch extra")
from hf_tiny import tiny_hf  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    tiny_hf("llama", d)
    return d


def _copy(src, dst, mutate=None, config=None):
    dst.mkdir()
    names, get = read_checkpoint(src)
    tensors = {n: get(n) for n in names}
    if mutate:
        mutate(tensors)
    write_checkpoint(tensors, dst)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(config or {})
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_pretrained(tmp_path / "nope")


def test_missing_config_and_weights(tmp_path, hf_dir):
    (tmp_path / "a").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text((hf_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained(tmp_path / "a")


def test_unknown_model_type(tmp_path, hf_dir):
    d = _copy(hf_dir, tmp_path / "x", config={"model_type": "gpt_neox"})
    with pytest.raises(ValueError, match="unsupported model_type 'gpt_neox'"):
        load_pretrained(d)


def test_wrong_shape_names_the_tensor(tmp_path, hf_dir):
    def bad(t):
        t["model.layers.1.mlp.up_proj.weight"] = np.zeros((81, 48), np.float32)
    d = _copy(hf_dir, tmp_path / "x", bad)
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight: shape \(48, 81\)"):
        load_pretrained(d)


def test_missing_tensor_is_named(tmp_path, hf_dir):
    d = _copy(hf_dir, tmp_path / "x", lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"self_attn/k_proj/kernel: layers \[0\] missing"):
        load_pretrained(d)


def test_unused_tensors_are_reported(tmp_path, hf_dir):
    def extra(t):
        t["model.layers.0.self_attn.mystery.weight"] = np.ones((3,), np.float32)
    d = _copy(hf_dir, tmp_path / "x", extra)
    with pytest.warns(UnusedWeightsWarning, match="mystery"):
        load_pretrained(d)


def test_invalid_config_value(tmp_path, hf_dir):
    d = _copy(hf_dir, tmp_path / "x", config={"num_key_value_heads": 4})
    with pytest.raises(ValueError, match="num_key_value_heads=4"):
        load_pretrained(d)


def test_unsupported_rope_type(tmp_path, hf_dir):
    d = _copy(hf_dir, tmp_path / "x", config={"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}})
    with pytest.raises(ValueError, match="longrope"):
        load_pretrained(d)


def test_missing_shard(tmp_path, hf_dir):
    d = tmp_path / "s"
    names, get = read_checkpoint(hf_dir)
    write_checkpoint({n: get(n) for n in names}, d, max_shard_size=20_000)
    (d / "config.json").write_text((hf_dir / "config.json").read_text())
    next(d.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="shards listed"):
        load_pretrained(d)


def test_unsupported_gguf_architecture(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'"):
        load_pretrained(path)


def test_not_a_model_file(tmp_path):
    p = tmp_path / "weights.bin"
    p.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match=".gguf"):
        load_pretrained(p)
