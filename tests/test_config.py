"""ModelConfig: validation, YAML round trip, unknown keys."""

import pytest

from iva_jax.config import ModelConfig, RopeScaling, parse_overrides


def test_yaml_round_trip(tmp_path):
    c = ModelConfig(vocab_size=101, hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                    rope_scaling=RopeScaling(rope_type="llama3", factor=8.0, original_max_position_embeddings=64),
                    layer_types=("full_attention", "sliding_attention", "full_attention", "full_attention"),
                    sliding_window=5, eos_token_id=(2, 7))
    path = tmp_path / "c.yaml"
    c.to_yaml(path)
    back = ModelConfig.from_yaml(path)
    assert back == c
    assert back.layer_windows() == (None, 5, None, None)


def test_model_dense_yaml_loads():
    c = ModelConfig.from_yaml("configs/model_dense.yaml")
    assert (c.hidden_size, c.num_hidden_layers, c.resolved_head_dim) == (576, 30, 64)
    assert c.num_params() == 134_515_008  # SmolLM2-135M


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(hidden_size=50, num_attention_heads=8), "hidden_size"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(rms_norm_eps=-1.0), "rms_norm_eps"),
    (dict(dtype="float64"), "dtype"),
    (dict(head_dim=7), "head_dim"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(layer_types=("full_attention",)), "layer_types"),
    (dict(attn_impl="cuda"), "attn_impl"),
    (dict(partial_rotary_factor=1.5), "partial_rotary_factor"),
    (dict(eos_token_id=(99999,)), "eos_token_id"),
])
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**kwargs)


def test_rope_scaling_validation():
    with pytest.raises(ValueError, match="rope_type"):
        RopeScaling(rope_type="ntk-by-parts")
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        RopeScaling(rope_type="llama3", factor=8.0)


def test_unknown_keys_listed():
    with pytest.raises(ValueError) as e:
        ModelConfig.from_dict({"hiden_size": 3})
    assert "hiden_size" in str(e.value) and "hidden_size" in str(e.value)


def test_missing_yaml_file():
    with pytest.raises(FileNotFoundError):
        ModelConfig.from_yaml("configs/does_not_exist.yaml")


def test_overrides():
    assert parse_overrides(["a=1", "b.c=0.5", "d=[1, 2]", "e=xla"]) == {"a": 1, "b": {"c": 0.5}, "d": [1, 2],
                                                                         "e": "xla"}
    assert parse_overrides(["lr=1e-3", "n=null", "name=exp1"]) == {"lr": 1e-3, "n": None, "name": "exp1"}
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["novalue"])
