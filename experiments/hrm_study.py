"""HRM vs its two baselines under one training-time budget: results JSON + markdown table.

    python experiments/hrm_study.py --config configs/hrm.yaml --budget_per_model_s 150 --seeds 0,1,2 \
        --out runs/hrm_study [--models hrm,hrm_1cycle,transformer] [--tiny] [key=value ...]
    python experiments/hrm_study.py --out runs/hrm_study --collect      # only re-aggregate finished runs

Each model trains in its own process (experiments/train_hrm.py, seeds vmapped together) for
`budget_per_model_s` seconds of training (compile excluded, reported separately), then is evaluated
on the whole held-out test set.  Per-model runs (telemetry, config, final.json) go to --runs_dir;
--out gets only results.json (every final.json plus train-loss curves) and results.md.  The dataset is built once, before any clock starts.  --tiny swaps
in a 4x4-Sudoku, CPU-sized configuration (a smoke test of the whole pipeline).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ("hrm", "hrm_1cycle", "transformer")
TINY = ["task_size=4", "num_train=200", "num_test=48", "num_aug=8", "model.batch_size=64", "model.hidden_size=64",
        "model.num_heads=2", "model.H_layers=2", "model.L_layers=2", "model.mlp_multiple_of=16",
        "model.puzzle_emb_ndim=64", "model.halt_max_steps=4", "model.forward_dtype=float32", "lr=0.001",
        "lr_warmup_steps=50", "min_givens=0", "eval_interval=100000", "log_interval=50", "checkpoint_interval=0",
        "data_path=runs/data/sudoku4_tiny"]


def fmt(mean, std, pct=True):
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if pct else f"{mean:.2f} ± {std:.2f}"


def table(results: list[dict]) -> str:
    rows = ["| model | cycles HxL, max steps | params | train s | steps | steps/s | compile s | exact acc % | cell acc % | "
            "avg steps | adaptive exact % | adaptive avg steps |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        m, s = r["mean"], r["std"]
        ad = fmt(m["adaptive_exact_accuracy"], s["adaptive_exact_accuracy"]) if "adaptive_exact_accuracy" in m else "-"
        ad_steps = fmt(m["adaptive_avg_steps"], s["adaptive_avg_steps"], False) if "adaptive_avg_steps" in m else "-"
        mc = r["config"]["model"]
        shape = f"{mc['H_cycles']}x{mc['L_cycles']}, {mc['halt_max_steps']}" if mc["arch"] == "hrm" else "-, 1"
        rows.append(f"| {r['model']} | {shape} | {r['params']:,} | {r['train_s']:.0f} | {r['steps']} | {r['steps_per_s']:.1f} | "
                    f"{r['compile_s'] or 0:.0f} | {fmt(m['exact_accuracy'], s['exact_accuracy'])} | "
                    f"{fmt(m['accuracy'], s['accuracy'])} | {fmt(m['avg_steps'], s['avg_steps'], False)} | "
                    f"{ad} | {ad_steps} |")
    return "\n".join(rows)


def curve(telemetry: Path) -> list:
    """[[step, mean train loss, mean train exact accuracy] ...] over seeds, from a telemetry file."""
    by_step = {}
    if telemetry.exists():
        for line in telemetry.read_text().splitlines():
            r = json.loads(line)
            if r.get("event") == "train":
                by_step.setdefault(r["step"], []).append((r["loss"], r["exact_accuracy"]))
    return [[k, round(sum(v[0] for v in vs) / len(vs), 4), round(sum(v[1] for v in vs) / len(vs), 4)]
            for k, vs in sorted(by_step.items())]


def collect(runs: Path, out: Path, models) -> dict:
    results, curves = [], {}
    out.mkdir(parents=True, exist_ok=True)
    for name in models:
        f = runs / name / "final.json"
        if f.exists():
            results.append(json.loads(f.read_text()))
            curves[name] = curve(runs / name / "telemetry.jsonl")
    if not results:
        raise SystemExit(f"no finished runs under {runs}")
    cfg = next((r["config"] for r in results if r["model"] == "hrm"), results[0]["config"])
    per_seed = {r["model"]: [p["exact_accuracy"] for p in r["per_seed"]] for r in results}
    summary = {"results": results, "config": cfg, "exact_accuracy_per_seed": per_seed,
               "train_curves [step, loss, exact acc]": curves}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    mc = cfg["model"]
    head = (f"# HRM study: {cfg['task']} {cfg['task_size']}x{cfg['task_size']}, {cfg['num_train']} train grids "
            f"(x{1 + cfg['num_aug']} with augmentations), {results[0]['test_examples']} held-out puzzles "
            f"(mean givens {results[0].get('test_mean_givens')})\n\n"
            f"device: {results[0]['device']}; seeds {results[0]['seeds']}; hidden {mc['hidden_size']}, "
            f"H/L layers {mc['H_layers']}/{mc['L_layers']}, batch {mc['batch_size']} per seed, lr {cfg['lr']}; "
            f"train s excludes compilation and evaluation\n\n")
    md = head + table(results) + "\n\nexact accuracy per seed: " + json.dumps(per_seed) + "\n"
    (out / "results.md").write_text(md)
    print(md)
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/hrm.yaml")
    p.add_argument("--budget_per_model_s", type=float, default=150.0)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--out", default="runs/hrm_study")
    p.add_argument("--runs_dir", default="runs/hrm_study_runs", help="per-model run directories (telemetry...)")
    p.add_argument("--ckpt_root", default="runs/hrm_ckpt", help="checkpoints (kept out of --out: they are large)")
    p.add_argument("--tiny", action="store_true", help="4x4 Sudoku, CPU-sized model")
    p.add_argument("--collect", action="store_true", help="only aggregate finished runs")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    out = Path(args.out)
    models = [m for m in args.models.split(",") if m]
    bad = [m for m in models if m not in MODELS]
    if bad:
        raise SystemExit(f"unknown models {bad}; choose from {MODELS}")
    if args.collect:
        return collect(Path(args.runs_dir), out, MODELS)
    overrides = (TINY if args.tiny else []) + list(args.overrides)
    out.mkdir(parents=True, exist_ok=True)

    # build (or load) the dataset once, before any clock starts
    from iva_jax.hrm import tasks
    from iva_jax.hrm.config import load_train_config

    tc = load_train_config(args.config, overrides)
    t = time.time()
    tasks.load_or_build(tc.data_path, tc.task, tc.task_size, tc.num_train, tc.num_test, tc.num_aug, tc.min_givens,
                        tc.data_seed)
    print(f"dataset ready in {time.time() - t:.1f}s at {tc.data_path}")

    for name in models:
        cmd = [sys.executable, str(ROOT / "experiments" / "train_hrm.py"), "--config", args.config, "--model", name,
               "--seeds", args.seeds, "--out", str(Path(args.runs_dir) / name), *overrides,
               f"time_budget_s={args.budget_per_model_s}", f"checkpoint_dir={Path(args.ckpt_root) / name}"]
        print("+", " ".join(cmd), flush=True)
        for stale in (Path(args.runs_dir) / name, Path(args.ckpt_root) / name):  # a fresh run, not a resume
            shutil.rmtree(stale, ignore_errors=True)
        subprocess.run(cmd, check=True)
    return collect(Path(args.runs_dir), out, MODELS)


if __name__ == "__main__":
    main()
