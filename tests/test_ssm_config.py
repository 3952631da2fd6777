"""SSMConfig validation, YAML round trip, configs/model_hybrid.yaml, and make_mixer."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from iva_jax import ssm
from iva_jax.ssm.config import SSMConfig

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_round_trip_and_derived_sizes(tmp_path):
    c = SSMConfig(type="mamba2", d_state=64, headdim=32, ngroups=2, dt_limit_max=5.0)
    p = tmp_path / "ssm.yaml"
    c.to_yaml(p)
    assert SSMConfig.from_yaml(p) == c
    assert c.d_inner(256) == 512 and c.mamba2_heads(256) == 16
    assert SSMConfig().resolved_dt_rank(768) == 48 and SSMConfig(dt_rank=7).resolved_dt_rank(768) == 7
    with pytest.raises(ValueError, match="headdim"):
        SSMConfig(headdim=48).mamba2_heads(256)
    with pytest.raises(ValueError, match="num_heads"):
        SSMConfig(num_heads=5).head_dim(256)


@pytest.mark.parametrize("bad", [dict(type="lstm"), dict(d_state=0), dict(scan_impl="fast"), dict(dt_min=0.2),
                                 dict(expand=1.5), dict(dt_rank=0), dict(retention_form="x"), dict(A_init_min=20.0),
                                 dict(dt_limit_min=1.0, dt_limit_max=0.5)])
def test_invalid_values_raise_naming_the_field(bad):
    field = next(iter(bad))
    with pytest.raises(ValueError, match=field):
        SSMConfig(**bad)


def test_hybrid_yaml_is_a_model_config():
    from iva_jax.config import ModelConfig
    from iva_jax.models.transformer import layer_layout

    data = yaml.safe_load((ROOT / "configs" / "model_hybrid.yaml").read_text())
    c = SSMConfig.from_dict(data["ssm"])
    assert c.type == "mamba" and c.d_state == 16 and c.dt_rank is None
    with pytest.raises(ValueError, match="unknown SSMConfig keys"):
        SSMConfig.from_dict({**data["ssm"], "d_stat": 3})
    m = ModelConfig.from_yaml(ROOT / "configs" / "model_hybrid.yaml")
    assert m.ssm == c and m.layer_kinds()[:3] == (("mamba", "moe"), ("mamba", "moe"), ("attention", "dense"))
    assert layer_layout(m) == "block" and m.num_attention_layers == 2 and m.moe.capacity_factor is None


def test_make_mixer_builds_every_type():
    for t in ssm.MIXER_TYPES:
        m = ssm.make_mixer(SSMConfig(type=t), 64, name=f"mixer_{t}")
        assert isinstance(m, ssm.MIXERS[t]) and m.hidden_size == 64
        assert hasattr(m, "step") and (t in ssm.RECURRENT) == (t not in ("hyena", "topk_attention"))
    with pytest.raises(ValueError, match="hidden_size"):
        ssm.make_mixer(SSMConfig(), 0)
