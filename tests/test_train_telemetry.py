"""Telemetry schema / JSONL writer, and the text-quality metrics (perplexity, distinct-2, repetition)."""

import json
import logging
import math

import numpy as np
import pytest

from iva_jax.train.eval import distinct_n, generation_metrics, perplexity, repetition_rate
from iva_jax.train.telemetry import Telemetry, make_record, memory_gb, read_jsonl, validate_record

METRICS = {"loss": np.float32(2.0), "ce": 1.9, "nll": 1.9, "ppl": math.exp(1.9), "grad_norm": 0.7, "lr": 1e-4,
           "skipped": np.int32(1), "tokens": 512.0, "grad_spike": np.bool_(False), "lr_scale": 1.0,
           "model/layers/act_rms": 1.2}


def test_record_follows_schema(tmp_path):
    t = Telemetry(tmp_path / "run" / "telemetry.jsonl")
    rec = t.log(10, METRICS, step_time_s=0.25, blocks={"moe": {"load_std_over_mean": 0.4, "overflow_pct": 1.5},
                                                       "hrm": {"halt_rate": 0.5}, "quant": {}})
    t.log(11, {**METRICS, "loss": float("nan")}, step_time_s=0.5)
    recs = read_jsonl(tmp_path / "run" / "telemetry.jsonl")
    assert len(recs) == 2 and recs[0] == json.loads(json.dumps(rec))
    r0, r1 = recs
    assert r0["step"] == 10
    assert r0["speed"] == {"tokens_per_sec": 2048.0, "step_time_ms": 250.0}
    assert r0["memory"]["source"] == "host_rss" and r0["memory"]["vram_gb"] > 0  # CPU: no device stats
    q = r0["quality"]
    assert q["loss"] == 2.0 and q["skipped"] == 1 and q["lr"] == 1e-4 and abs(q["ppl"] - math.exp(1.9)) < 1e-9
    assert q["model/layers/act_rms"] == 1.2
    assert r0["health"] == {"grad_spike": False, "lr_scale": 1.0}
    assert r0["moe"] == {"load_std_over_mean": 0.4, "overflow_pct": 1.5} and r0["hrm"] == {"halt_rate": 0.5}
    assert "quant" not in r0 and "moe" not in r1  # empty / absent blocks are left out
    assert r1["quality"]["loss"] is None  # NaN is written as null (valid JSON)
    for r in recs:
        validate_record(r)


def test_validate_rejects_broken_records():
    good = make_record(1, METRICS, step_time_s=0.1)
    validate_record(good)
    bad = json.loads(json.dumps(good))
    del bad["speed"]["tokens_per_sec"]
    with pytest.raises(ValueError, match="speed.tokens_per_sec"):
        validate_record(bad)
    bad = json.loads(json.dumps(good))
    bad["memory"]["source"] = "guess"
    with pytest.raises(ValueError, match="memory.source='guess'"):
        validate_record(bad)
    with pytest.raises(ValueError, match="'step'"):
        validate_record({**good, "step": "1"})


def test_memory_reports_its_source():
    m = memory_gb()
    assert m["source"] in ("device", "host_rss") and m["vram_gb"] > 0.01


def test_tensorboard_is_optional(tmp_path, caplog):
    try:
        import tensorboardX  # noqa: F401
        have = True
    except ImportError:
        have = False
    with caplog.at_level(logging.WARNING):
        t = Telemetry(tmp_path / "t.jsonl", tensorboard_dir=str(tmp_path / "tb"))
    t.log(1, METRICS, step_time_s=0.1)
    t.close()
    assert t.tensorboard_active == have
    if have:
        assert any((tmp_path / "tb").iterdir())
    else:
        assert "tensorboardX is not installed" in caplog.text


def test_text_quality_metrics_match_hand_counts():
    seqs = [[1, 2, 3, 1, 2, 3, 1, 2], [4, 4, 4, 4]]
    # bigrams: seq0 (1,2)(2,3)(3,1)(1,2)(2,3)(3,1)(1,2) -> 7 total; seq1 (4,4)x3 -> 3 total
    # unique over both: {(1,2),(2,3),(3,1),(4,4)} = 4 -> 4 / 10
    assert distinct_n(seqs, 2) == pytest.approx(0.4)
    # seq-rep-2: seq0 1 - 3/7, seq1 1 - 1/3; mean
    assert repetition_rate(seqs, 2) == pytest.approx(((1 - 3 / 7) + (1 - 1 / 3)) / 2)
    assert repetition_rate([[1, 2, 3, 4, 5]], 4) == 0.0
    assert distinct_n(["the cat sat on the mat", "the cat"], 2) == pytest.approx(5 / 6)
    assert perplexity(2 * math.log(7), 2) == pytest.approx(7.0)
    g = generation_metrics([[1, 2, 3, 4, 5, 1, 2, 3, 4, 5]])
    assert g["distinct_2"] == pytest.approx(5 / 9) and g["rep_4"] == pytest.approx(1 - 5 / 7) and g["mean_len"] == 10
    with pytest.raises(ValueError, match="tokens > 0"):
        perplexity(1.0, 0)
    with pytest.raises(ValueError, match="n=0"):
        distinct_n(seqs, 0)
