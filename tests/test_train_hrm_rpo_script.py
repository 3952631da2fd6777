"""experiments/train_grpo.py with HRM-RPO on CPU (--tiny: a tiny random decoder, character tokenizer).

A single hrm_rpo run files the hook's metrics (shaping terms, controller halting) into telemetry, finite
and consistent with R' = R + b_halt r_halt + b_entropy r_entropy + b_mem r_mem; --compare runs GRPO and
HRM-RPO on the same seeds and the same step-time budget and writes one results table and a curves PNG.
The two script runs are subprocesses with XLA's fast-compile flags sharing a persistent compilation
cache, so the comparison reuses the single run's programs.  configs/train_hrm_rpo.yaml is checked too.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from iva_jax.rl.config import CONTROLLER_READS, RLConfig
from iva_jax.train.telemetry import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "train_grpo.py"
CONFIG = ROOT / "configs" / "train_hrm_rpo.yaml"
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
SMALL_CONTROLLER = ["controller.hidden_size=16", "controller.max_steps=2"]
MAX_STEPS = 2
HOOK_KEYS = ("r_halt", "r_entropy", "r_mem", "shaped_mean", "controller_loss", "controller_ce",
             "controller_mem_loss", "controller_expected_steps", "controller_avg_steps", "controller_halt_rate")


def _run(args, cache: Path) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_XLA, TOKENIZERS_PARALLELISM="false",
               JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--config", str(CONFIG), *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"train_grpo.py {args} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("hrm_rpo_script")
    cache = base / "jax_cache"
    single = _run(["--out", base / "single", *SMALL_CONTROLLER, "train.steps=3"], cache)
    compare = _run(["--compare", "--seeds", "0,1", "--run_s", "0.5", "--out", base / "compare", *SMALL_CONTROLLER,
                    "train.steps=200"], cache)
    return base, single, compare


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_single_hrm_rpo_run_logs_consistent_hook_metrics(runs):
    base, stdout, _ = runs
    out = base / "single"
    cfg = RLConfig.from_yaml(out / "config.yaml")
    assert cfg.algorithm == "hrm_rpo" and cfg.controller.max_steps == MAX_STEPS
    recs = read_jsonl(out / "telemetry.jsonl")
    steps = [r for r in recs if r["step"] <= 3]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        rl = r["rl"]
        for k in HOOK_KEYS:
            assert _finite(rl.get(f"hook/{k}")), (r["step"], k, rl.get(f"hook/{k}"))
        # the controller that scored the rollout is the one it trains: r_halt = -E[ponder steps] / max_steps
        assert rl["hook/r_halt"] == pytest.approx(-rl["hook/controller_expected_steps"] / MAX_STEPS, rel=1e-4)
        assert 1.0 <= rl["hook/controller_expected_steps"] <= MAX_STEPS
        assert 0.0 <= rl["hook/controller_halt_rate"] <= 1.0
        # the shaped reward is R' = R + b . terms (means are linear), and it is what the advantages saw
        shaped = (rl["reward_mean"] + cfg.b_halt * rl["hook/r_halt"] + cfg.b_entropy * rl["hook/r_entropy"]
                  + cfg.b_mem * rl["hook/r_mem"])
        assert rl["hook/shaped_mean"] == pytest.approx(shaped, abs=1e-5)
        assert rl["score_mean"] == pytest.approx(rl["hook/shaped_mean"], abs=1e-5)
        assert rl["hook/r_mem"] < 0 and rl["hook/r_entropy"] > 0
    assert "accuracy" in steps[1]["eval"]  # eval_every=2 in --tiny
    final = json.loads((out / "final.json").read_text())
    assert final["method"] == "hrm_rpo" and final["steps"] == 3
    assert set(HOOK_KEYS) <= set(final["hook"]) and all(_finite(v) for v in final["hook"].values())
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "HRM-RPO hook" in (out / "results.md").read_text() and "ponder" in stdout


def test_compare_same_seeds_same_budget_one_table(runs):
    base, _, stdout = runs
    out = base / "compare"
    res = json.loads((out / "results.json").read_text())
    budget = res["run_budget_s"]
    assert budget == 0.5 and set(res["methods"]) == {"grpo", "hrm_rpo"}
    per_run = res["per_run"]
    for method, rs in per_run.items():
        assert [r["seed"] for r in rs] == [0, 1] and all(r["method"] == method for r in rs)
        for r in rs:
            assert 1 <= r["steps"] < 200  # the budget, not the step cap, ended the run
            tel = [x["rl"] for x in read_jsonl(out / f"seed{r['seed']}" / method / "telemetry.jsonl")][:r["steps"]]
            assert tel[-1]["train_s"] == pytest.approx(r["step_time_s"])
            # the rule: start a step only if the summed step time plus the last step's fits the budget
            assert all(a["train_s"] + a["t_step_s"] <= budget for a in tel[:-1])
            assert tel[-1]["train_s"] + tel[-1]["t_step_s"] > budget
            assert r["before"] == res["before"]  # one "before" for every run
            assert len(r["evals"]) >= 2 and _finite(r["after"]["accuracy"]) and _finite(r["rollout_tokens_per_s"])
            assert (set(HOOK_KEYS) <= set(r["hook"])) == (method == "hrm_rpo")
            assert method == "grpo" or all(_finite(v) for v in r["hook"].values())
    for seed in (0, 1):
        g, h = (read_jsonl(out / f"seed{seed}" / m / "telemetry.jsonl")[0]["rl"] for m in ("grpo", "hrm_rpo"))
        # same seed, same start: step 1 samples the same responses; only HRM-RPO's advantages see R' != R
        assert g["reward_mean"] == h["reward_mean"] and g["response_length"] == h["response_length"]
        assert g["score_mean"] == pytest.approx(g["reward_mean"], abs=1e-6)
        assert h["score_mean"] != pytest.approx(h["reward_mean"], abs=1e-6)
        assert not any(k.startswith("hook/") for k in g)
    md = (out / "results.md").read_text()
    assert "| grpo | 2 |" in md and "| hrm_rpo | 2 |" in md and "HRM-RPO - GRPO" in md and "E[ponder steps]" in md
    assert _finite(res["hrm_minus_grpo_accuracy_mean"]) and _finite(res["methods"]["hrm_rpo"]["hook"]["r_halt"])
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "[warm-up] hrm_rpo" in stdout and "training budget" in stdout


def test_hrm_rpo_config_and_compare_guard(tmp_path):
    cfg = RLConfig.from_yaml(CONFIG)
    grpo = RLConfig.from_yaml(ROOT / "configs" / "train_grpo.yaml")
    assert RLConfig.from_yaml(cfg.to_yaml()) == cfg
    diff = {k for k, v in cfg.to_dict().items() if grpo.to_dict()[k] != v}
    assert {"algorithm", "b_halt", "controller"} <= diff <= {"algorithm", "b_halt", "b_entropy", "b_mem",
                                                                "mem_temperature", "controller", "controller_lr",
                                                                "controller_read", "controller_mem_coef"}
    assert cfg.controller.max_steps >= 2 and cfg.b_halt > 0
    from iva_jax.hrm.controller_rpo import READS

    assert CONTROLLER_READS == READS
    for kw, field in ((dict(controller_read="tokens"), "controller_read"), (dict(controller_lr=0.0), "controller_lr"),
                      (dict(controller_mem_coef=-0.1), "controller_mem_coef"),
                      (dict(controller={"max_steps": 0}), "max_steps")):
        with pytest.raises(ValueError, match=field):
            RLConfig.from_dict(dict(cfg.to_dict(), **kw))
    spec = importlib.util.spec_from_file_location("train_grpo_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit, match="hrm_rpo config"):
        mod.main(["--tiny", "--compare", "--config", str(ROOT / "configs" / "train_grpo.yaml"), "--out", str(tmp_path)])
