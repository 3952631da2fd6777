"""experiments/validate_end_to_end.py on CPU (--quick): every check passes or says why it does not apply;
the JSON holds the checks and the telemetry blocks; a failing or crashing check makes the exit code 1."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OK = {"PASS", "not applicable", "not available"}


def _script():
    path = ROOT / "experiments" / "validate_end_to_end.py"
    spec = importlib.util.spec_from_file_location("validate_end_to_end", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The CLI as a user runs it (own process, one CPU device; XLA's fast-compile flags keep CI short)."""
    out = tmp_path_factory.mktemp("validate") / "v.json"
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "validate_end_to_end.py"), "--device", "cpu",
                           "--quick", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert "| check | status |" in proc.stdout, proc.stderr[-3000:]
    return _script(), proc.returncode, json.loads(out.read_text())


def test_quick_cpu_run_passes_or_explains(run):
    _, code, rep = run
    checks = {c["name"]: c for c in rep["checks"]}
    assert code == 0 and rep["passed"] and rep["failed"] == [], [(c["name"], c["status"], c["note"]) for c in
                                                                  rep["checks"] if c["status"] not in OK]
    assert set(checks) == {"rmsnorm_speed", "attention_speed", "hrm_halt_rate", "hrm_no_nan", "moe_balance",
                           "quant_int8_ppl", "quant_int4_ppl", "quant_int4_generate", "fp8_t4_guard"}
    for c in rep["checks"]:
        assert c["status"] in OK, c
        if c["status"] != "PASS":
            assert len(c["note"]) > 20, c  # a reason a user can act on
    for name in ("rmsnorm_speed", "attention_speed"):
        assert checks[name]["status"] == "not applicable" and "GPU" in checks[name]["note"]
    assert rep["device"]["platform"] == "cpu" and rep["versions"]["jax"]


def test_measurements_are_real(run):
    _, _, rep = run
    m = {c["name"]: c["measured"] for c in rep["checks"]}
    moe = m["moe_balance"]
    assert moe["load_std_over_mean"] <= 1.0 and moe["overflow_pct"] <= 5.0 and moe["ce_last"] < moe["ce_first"]
    assert moe["overflow_pct_first30"] > moe["overflow_pct"]  # the capacity limit bit early, balancing fixed it
    assert m["hrm_no_nan"]["no_nan"] and m["hrm_no_nan"]["loss_last"] < m["hrm_no_nan"]["loss_first"]
    hrm = m["hrm_halt_rate"]
    assert 0.3 <= hrm["halt_rate"] <= 0.7 and 1.0 < hrm["avg_steps"] < hrm["max_steps"]
    assert hrm["halt_rate_easy"] > hrm["halt_rate_hard"]  # halting follows difficulty
    for prec in ("int8", "int4"):
        q = m[f"quant_{prec}_ppl"]
        assert q["drift_pct"] <= 5.0 and q["ppl"] > 1.0 and q["bytes_ratio"] < 0.6
    assert m["quant_int8_ppl"]["drift_pct"] < m["quant_int4_ppl"]["drift_pct"]  # 8 bits beat 4
    assert m["quant_int4_generate"]["new_tokens"] == 64 and m["quant_int4_generate"]["valid_ids"]
    fp8 = m["fp8_t4_guard"]
    assert fp8["t4_refused"] and fp8["a100_refused"] and not fp8["h100_refused"] and "T4" in fp8["t4_reason"]
    tel = rep["telemetry"]
    assert tel["moe"]["overflow_pct"] == moe["overflow_pct"] and tel["quant"]["int4_new_tokens"] == 64
    assert tel["quant"]["fp8_enabled_on_t4"] is False and tel["hrm"]["halt_rate"] == hrm["halt_rate"]


def test_failures_set_the_exit_code(run, tmp_path, monkeypatch, capsys):
    mod, _, _ = run

    def failing(ctx):
        return [mod.Result("made_up", mod.FAIL, {"x": 1}, "x == 0")]

    def crashing(ctx):
        raise RuntimeError("boom")

    monkeypatch.setattr(mod, "CHECKS", {"fp8": mod.CHECKS["fp8"], "bad": failing, "crash": crashing})
    out = tmp_path / "v.json"
    assert mod.main(["--device", "cpu", "--out", str(out)]) == 1
    rep = json.loads(out.read_text())
    assert rep["failed"] == ["made_up", "crash"] and not rep["passed"]
    crash = [c for c in rep["checks"] if c["name"] == "crash"][0]
    assert crash["status"] == "ERROR" and "boom" in crash["note"]
    assert "| made_up | FAIL |" in capsys.readouterr().out
    assert mod.main(["--device", "cpu", "--only", "nope", "--out", str(out)]) == 2
