"""Train HRM-ACT-v1 (or a baseline) on a generated reasoning task; evaluate; checkpoint; resume.

    python experiments/train_hrm.py --config configs/hrm.yaml --model hrm --seeds 0,1,2 \
        --out runs/hrm_sudoku6 [--resume] [key=value ...]      # e.g. total_steps=2000 model.hidden_size=128

--model: hrm | hrm_1cycle (H_cycles = L_cycles = halt_max_steps = 1) | transformer (same blocks, no
recurrence).  Several seeds train together, vmapped over a leading seed axis (one compile; the GPU
sees one wide batch).  `time_budget_s` counts training time after the first (compiling) step.  Writes <out>/telemetry.jsonl (train/eval records; the `hrm` block holds
halt_rate and avg_steps), <out>/final.json, and orbax checkpoints in <out>/ckpt (latest kept).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/hrm.yaml")
    p.add_argument("--model", default="hrm", choices=["hrm", "hrm_1cycle", "transformer"])
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the config's seed)")
    p.add_argument("--out", default=None, help="output directory (default runs/hrm_<model>)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in <out>/ckpt")
    p.add_argument("--stop_after", type=int, default=None, help="stop (after checkpointing) at this step; for tests")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (dotted keys for model.*)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from iva_jax.hrm.config import load_train_config

    tc = load_train_config(args.config, args.overrides)

    import jax
    if tc.stablemax_x64:
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np

    from iva_jax.hrm import tasks
    from iva_jax.hrm import train as T
    from iva_jax.hrm.data import PuzzleBatcher
    from iva_jax.hrm.model import HRMACT

    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [tc.seed]
    out = Path(args.out or f"runs/hrm_{args.model}")
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    splits = tasks.load_or_build(tc.data_path, tc.task, tc.task_size, tc.num_train, tc.num_test, tc.num_aug,
                                 tc.min_givens, tc.data_seed)
    (train_arr, train_meta), (test_arr, test_meta) = splits["train"], splits["test"]
    data_s = time.time() - t0
    mc = tc.model.replace(seq_len=train_meta["seq_len"], vocab_size=train_meta["vocab_size"],
                          num_puzzle_identifiers=train_meta["num_puzzle_identifiers"]).variant(args.model)
    tc = tc.replace(model=mc)
    (out / "config.yaml").write_text(tc.to_yaml())
    model = HRMACT(mc)
    B = mc.batch_size

    template = [T.init_train_state(model, tc, jax.random.PRNGKey(s)) for s in seeds]
    state = jax.tree.map(lambda *xs: jnp.stack(xs), *template)
    start = 0
    mngr = T.checkpoint_manager(tc.checkpoint_dir or (out / "ckpt"))
    if args.resume and mngr.latest_step() is not None:
        state, extra, start = T.restore_checkpoint(mngr, state)
        if extra.get("seeds") != seeds or extra.get("model") != args.model:
            raise ValueError(f"checkpoint is for model={extra.get('model')} seeds={extra.get('seeds')}, "
                             f"not {args.model} {seeds}")
        print(f"resumed from step {start}")

    batchers = [PuzzleBatcher(train_arr, train_meta, B, seed=1000 * s + tc.data_seed) for s in seeds]
    test_batcher = PuzzleBatcher(test_arr, test_meta, B)
    donate = (0,) if jax.default_backend() != "cpu" else ()
    train_step = jax.jit(jax.vmap(T.make_train_step(model, tc)), donate_argnums=donate)
    eval_step = jax.jit(jax.vmap(T.make_eval_step(model), in_axes=(0, None)))
    accumulate = jax.jit(lambda a, s: jax.tree.map(jnp.add, a, s), donate_argnums=donate)  # one dispatch
    tele = open(out / "telemetry.jsonl", "a")

    def log(rec):
        tele.write(json.dumps(rec) + "\n")
        tele.flush()

    def run_eval(step):
        t = time.time()
        total = None
        for b in test_batcher.eval_batches(tc.eval_batches):
            sums = jax.device_get(eval_step(state, b))
            total = sums if total is None else {k: total[k] + sums[k] for k in total}
        per_seed = [T.finalize_eval({k: float(v[i]) for k, v in total.items()}) for i in range(len(seeds))]
        for s, m in zip(seeds, per_seed):
            log({"event": "eval", "model": args.model, "seed": s, "step": step, **m,
                 "hrm": {"halt_rate": m["halt_rate"], "avg_steps": m["avg_steps"]}, "eval_s": time.time() - t})
        ex = [m["exact_accuracy"] for m in per_seed]
        print(f"[eval step {step}] exact_accuracy {np.mean(ex):.4f} +- {np.std(ex):.4f} "
              f"avg_steps {np.mean([m['avg_steps'] for m in per_seed]):.2f} ({time.time() - t:.1f}s)")
        return per_seed

    stacked = lambda step: {k: np.stack([b.train_batch(step)[k] for b in batchers]) for k in  # noqa: E731
                            ("inputs", "labels", "puzzle_identifiers")}
    step = start
    t_train = time.time()
    t_after_compile, steps_after_compile, compile_s = None, 0, None  # the first step compiles
    acc, n_acc = None, 0
    stop_at = min(tc.total_steps, args.stop_after) if args.stop_after else tc.total_steps
    while step < stop_at:
        if tc.time_budget_s is not None and t_after_compile is not None \
                and time.time() - t_after_compile > tc.time_budget_s:  # compile time not counted
            print(f"time budget {tc.time_budget_s}s reached at step {step}")
            break
        state, sums = train_step(state, stacked(step))
        acc = sums if acc is None else accumulate(acc, sums)
        n_acc += 1
        step += 1
        if t_after_compile is None:
            jax.block_until_ready(sums)
            t_after_compile, compile_s = time.time(), time.time() - t_train
        else:
            steps_after_compile += 1
        if step % tc.log_interval == 0 or step == stop_at:  # metrics averaged over the interval
            sums = jax.device_get(acc)
            n_log = n_acc
            sums = dict(sums, lr=sums["lr"] / n_log)
            acc, n_acc = None, 0
            rate = steps_after_compile / max(time.time() - t_after_compile, 1e-9)
            for i, s in enumerate(seeds):
                m = T.train_metrics({k: v[i] for k, v in sums.items()}, B * n_log)
                log({"event": "train", "model": args.model, "seed": s, "step": step, **m, "steps_per_s": rate,
                     "hrm": {"halt_rate": m["halt_rate"], "avg_steps": m["steps"]}})
            print(f"step {step} loss {np.mean(sums['loss']) / (B * n_log):.4f} "
                  f"lm {np.mean(sums['lm_loss']) / (B * n_log):.4f} "
                  f"halt_rate {np.mean(sums['halted']) / (B * n_log):.3f} {rate:.2f} steps/s")
        t_pause = time.time()  # evaluation and checkpoints do not count as training time
        if step % tc.eval_interval == 0 and step < stop_at:
            run_eval(step)
        if tc.checkpoint_interval and step % tc.checkpoint_interval == 0:
            T.save_checkpoint(mngr, state, step, {"model": args.model, "seeds": seeds})
        if t_after_compile is not None:
            t_after_compile += time.time() - t_pause
    jax.block_until_ready(state)
    train_s = (time.time() - t_after_compile) if t_after_compile else 0.0  # after the compiling step
    rate = steps_after_compile / max(train_s, 1e-9)
    T.save_checkpoint(mngr, state, step, {"model": args.model, "seeds": seeds})
    if args.stop_after is not None and step < tc.total_steps:
        tele.close()
        return {"stopped_at": step}
    per_seed = run_eval(step)
    keys = ("exact_accuracy", "accuracy", "avg_steps", "halt_rate", "adaptive_exact_accuracy", "adaptive_avg_steps")
    summary = {
        "model": args.model, "seeds": seeds, "steps": step, "train_s": train_s, "data_s": data_s,
        "compile_s": compile_s, "steps_per_s": rate,
        "samples_per_s": rate * B * len(seeds), "params": T.param_count(template[0].params),
        "config": tc.to_dict(), "per_seed": per_seed,
        "mean": {k: float(np.mean([m[k] for m in per_seed])) for k in keys if k in per_seed[0]},
        "std": {k: float(np.std([m[k] for m in per_seed])) for k in keys if k in per_seed[0]},
        "device": str(jax.devices()[0].device_kind), "test_examples": int(test_meta["num_examples"]),
        "test_mean_givens": test_meta.get("mean_givens"),
    }
    (out / "final.json").write_text(json.dumps(summary, indent=1))
    log({"event": "final", **{k: v for k, v in summary.items() if k != "config"}})
    tele.close()
    return summary


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
