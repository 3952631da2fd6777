"""GRPO on SmolLM2-135M-Instruct with the built-in addition task: held-out accuracy before and after,
a curve, tokens/s of rollout and update; `--study` repeats it over seeds and writes a results table.

    python experiments/train_grpo.py --out runs/grpo [--config configs/train_grpo.yaml] [key=value ...]
    python experiments/train_grpo.py --study --seeds 0,1,2 --budget_s 420 --out runs/grpo_study
    python experiments/train_grpo.py --tiny --out /tmp/grpo_tiny        # CPU smoke: tiny random model
    python experiments/train_grpo.py --config configs/train_ppo.yaml ...  # PPO with a value head (same loop)

Overrides are RLConfig keys, dotted for nested configs (train.lr=2e-5 task.max_digits=3 lora.rank=16).
Held-out evaluation: greedy accuracy and mean reward on task.n_eval problems never seen in training,
plus accuracy of one sample per problem at the training temperature (fixed sampling key).  All
seeds start from the same model, so "before" is measured once.  Writes <out>/[seed<k>/]telemetry.jsonl,
curve.png, final.json; a study adds <out>/results.json, results.md and curves.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import yaml  # noqa: E402

TINY = ["model=tiny-random", "train.steps=4", "prompts_per_step=4", "group_size=4", "max_new_tokens=6",
        "task.n_train=64", "task.n_eval=12", "task.max_digits=2", "eval_every=2", "train.lr=0.003",
        "train.warmup_steps=0", "train.compute_dtype=float32"]
EVAL_SEED = 1234


def parse_overrides(pairs: List[str]) -> Dict[str, Any]:
    """key=value strings (dotted keys for nested configs, YAML values) -> a nested dict."""
    out: Dict[str, Any] = {}
    for p in pairs:
        if "=" not in p:
            raise SystemExit(f"override {p!r} is not key=value")
        key, value = p.split("=", 1)
        node = out
        *parents, leaf = key.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = yaml.safe_load(value)
    return out


def merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    """Recursive dict update (a nested override of a null entry, e.g. lora.rank with lora: null, builds it)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out.get(k) or {}, v) if isinstance(v, dict) and isinstance(out.get(k), (dict, type(None))) else v
    return out


def load_config(path: str, overrides: List[str]):
    from iva_jax.rl.config import RLConfig

    data = yaml.safe_load(Path(path).read_text()) or {}
    return RLConfig.from_dict(merge(data, parse_overrides(overrides)))


class CharTokenizer:
    """The --tiny smoke's tokenizer: one id per character of "0123456789+= ", then pad/EOS = 0."""

    chars = "0123456789+= "
    eos_token_id = pad_token_id = 0

    def encode(self, text: str) -> List[int]:
        return [self.chars.index(c) + 1 for c in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[i - 1] for i in ids if 0 < i <= len(self.chars))


def build_model(cfg, tiny: bool):
    """(model, params, encode(problem) -> ids, decode(ids) -> str, pad_id, eos)."""
    import jax.numpy as jnp

    from iva_jax.models.transformer import Transformer

    if tiny:
        from iva_jax.config import ModelConfig
        from iva_jax.models.transformer import init_params

        tok = CharTokenizer()
        mc = ModelConfig(vocab_size=len(tok.chars) + 1, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         eos_token_id=(0,), pad_token_id=0, attn_impl="xla", dtype=cfg.train.compute_dtype)
        model, params = init_params(mc, seed=cfg.seed)
        return (model, params, lambda p: tok.encode(f"{p.a}+{p.b}="), tok.decode, 0, (0,))
    from torch_bridge import load_pretrained
    from torch_bridge.tokenizer import load_tokenizer

    tok = load_tokenizer(cfg.model)
    model, params = load_pretrained(cfg.model, dtype=jnp.float32)  # f32 master weights
    model = Transformer(model.config.replace(dtype=cfg.train.compute_dtype))

    def encode(problem):
        ids = tok.apply_chat_template(problem.messages(), add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    eos = tuple(model.config.eos_token_id or (tok.eos_token_id,))
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    return model, params, encode, lambda ids: tok.decode(ids, skip_special_tokens=True), pad, eos


class Experiment:
    """Model, task, prompts and one compiled trainer, shared by every seed."""

    def __init__(self, cfg, tiny: bool):
        from iva_jax.rl import Policy, PolicyGradientTrainer, PromptBatch, text_reward_fn
        from iva_jax.rl.tasks import AdditionTask, correctness_reward

        self.cfg = cfg
        t0 = time.perf_counter()
        self.model, self.params, encode, self.decode, pad, eos = build_model(cfg, tiny)
        self.task = AdditionTask.from_config(cfg.task)
        train_ids = [encode(p) for p in self.task.train]
        held_ids = [encode(p) for p in self.task.held_out]
        length = max(len(x) for x in train_ids + held_ids)
        self.train = PromptBatch.from_tokens(train_ids, pad, length, self.task.train)
        self.held = PromptBatch.from_tokens(held_ids, pad, length, self.task.held_out)
        reward = text_reward_fn(self.decode, lambda texts, probs: self.task.rewards(texts, probs))
        self.accuracy = text_reward_fn(self.decode,
                                       lambda texts, probs: correctness_reward(texts, [p.answer for p in probs]))
        policy = Policy(self.model, lora=cfg.lora, head=cfg.algorithm == "ppo")
        self.trainer = PolicyGradientTrainer(policy, cfg, reward, eos_token_id=eos, pad_token_id=pad)
        self.load_s = time.perf_counter() - t0
        print(f"[setup] {len(self.task.train)} train / {len(self.task.held_out)} held-out problems, prompt length "
              f"{length}, rollout batch {cfg.rollout_batch}, load {self.load_s:.1f}s", flush=True)

    def evaluate(self, state, sampled: bool = True) -> Dict[str, float]:
        """Held-out greedy accuracy / reward (and accuracy of one sample at the training temperature)."""
        metrics = {"accuracy": self.accuracy, "reward": self.trainer.reward_fn}
        g = self.trainer.evaluate(state, self.held, temperature=0.0, metrics=metrics)
        out = {"accuracy": g["accuracy_mean"], "reward": g["reward_mean"], "response_length": g["response_length"]}
        if sampled:
            s = self.trainer.evaluate(state, self.held, temperature=self.cfg.temperature, seed=EVAL_SEED,
                                      metrics=metrics)
            out.update(sampled_accuracy=s["accuracy_mean"], sampled_reward=s["reward_mean"])
        return out

    def run_seed(self, seed: int, out: Path, before: Dict[str, float],
                 deadline: float = float("inf")) -> Dict[str, Any]:
        """Train one seed for train.steps steps (or until `deadline`); evaluate; telemetry + curve."""
        from iva_jax.rl import telemetry_record
        from iva_jax.train.telemetry import Telemetry

        cfg = self.cfg
        out.mkdir(parents=True, exist_ok=True)
        tpath = out / "telemetry.jsonl"
        tpath.unlink(missing_ok=True)
        tel = Telemetry(tpath)
        state = self.trainer.init_state(self.params, seed=seed)
        rng = np.random.default_rng(seed)
        order: List[int] = []
        hist, evals = [], {0: before}
        t0 = time.perf_counter()
        for step in range(1, cfg.train.steps + 1):
            if len(order) < cfg.prompts_per_step:
                order += rng.permutation(len(self.train)).tolist()
            idx, order = order[:cfg.prompts_per_step], order[cfg.prompts_per_step:]
            state, m = self.trainer.step(state, self.train.take(idx))
            hist.append(m)
            ev = None
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.train.steps:
                ev = evals[step] = self.evaluate(state, sampled=False)
            telemetry_record(tel, step, m, ev)
            print(f"[seed {seed} step {step}] reward {m['reward_mean']:.3f} kl {m['kl']:.4f} clip {m['clipfrac']:.3f} "
                  f"ent {m['rollout_entropy']:.2f} len {m['response_length']:.1f} "
                  f"rollout {m['rollout_tokens_per_s']:.0f} tok/s update {m['update_tokens_per_s']:.0f} tok/s "
                  f"step {m['t_step_s']:.2f}s" + (f" | held-out acc {ev['accuracy']:.3f}" if ev else ""), flush=True)
            if time.perf_counter() > deadline:
                print(f"[seed {seed}] time budget reached after {step} steps", flush=True)
                break
        train_s = time.perf_counter() - t0
        after = evals[len(hist)] = self.evaluate(state)
        telemetry_record(tel, len(hist) + 1, hist[-1], {f"final_{k}": v for k, v in after.items()})
        tel.close()
        steady = hist[1:] or hist  # the first step includes compilation
        res = {"seed": seed, "steps": len(hist), "train_s": train_s, "compile_s": hist[0]["t_step_s"] - float(
                   np.median([m["t_step_s"] for m in steady])),
               "step_s": float(np.median([m["t_step_s"] for m in steady])),
               "rollout_tokens_per_s": float(np.mean([m["rollout_tokens_per_s"] for m in steady])),
               "update_tokens_per_s": float(np.mean([m["update_tokens_per_s"] for m in steady])),
               "before": before, "after": after,
               "train_reward_first5": float(np.mean([m["reward_mean"] for m in hist[:5]])),
               "train_reward_last5": float(np.mean([m["reward_mean"] for m in hist[-5:]])),
               "evals": {str(k): v for k, v in evals.items()}}
        (out / "final.json").write_text(json.dumps(res, indent=1))
        plot([tpath], out / "curve.png", [res])
        return res


def plot(paths: List[Path], png: Path, results: List[Dict[str, Any]]) -> None:
    """Train reward (sampled) per step and held-out greedy accuracy per evaluation; KL; response length."""
    try:
        import matplotlib
    except ImportError:
        print(f"[plot] matplotlib is not installed (pip install -e .[plots]); {png} not written", flush=True)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from iva_jax.train.telemetry import read_jsonl

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for path, res in zip(paths, results):
        recs = [r for r in read_jsonl(path) if r["step"] <= res["steps"]]
        steps = [r["step"] for r in recs]
        rew = np.array([r["rl"]["reward_mean"] for r in recs])
        k = min(5, len(rew))
        smooth = np.convolve(rew, np.ones(k) / k, mode="valid")
        line, = ax[0].plot(steps[k - 1:], smooth, label=f"seed {res['seed']} train reward (avg {k})")
        ev = sorted((int(s), v["accuracy"]) for s, v in res["evals"].items())
        ax[0].plot([s for s, _ in ev], [a for _, a in ev], "o--", color=line.get_color(),
                   label=f"seed {res['seed']} held-out greedy acc")
        ax[1].plot(steps, [r["rl"]["kl"] for r in recs], color=line.get_color())
        ax[2].plot(steps, [r["rl"]["response_length"] for r in recs], color=line.get_color())
    ax[0].set(xlabel="step", ylabel="reward / accuracy", title="train reward and held-out accuracy")
    ax[1].set(xlabel="step", ylabel="KL(policy || reference) per token", title="KL")
    ax[2].set(xlabel="step", ylabel="tokens", title="response length")
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def summarize(results: List[Dict[str, Any]], before: Dict[str, float], cfg, exp: Experiment, budget_s: float):
    import jax

    def ms(key, which="after"):
        v = np.array([r[which][key] for r in results])
        return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0

    acc_m, acc_s = ms("accuracy")
    gains = np.array([r["after"]["accuracy"] - before["accuracy"] for r in results])
    clear = bool(len(results) >= 2 and (gains > 0).all() and gains.mean() > 3 * max(acc_s, 0.01))
    summary = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
               "config": cfg.to_dict(), "budget_s": budget_s, "load_s": exp.load_s, "before": before,
               "after_accuracy_mean": acc_m, "after_accuracy_std": acc_s,
               "after_reward_mean": ms("reward")[0], "after_sampled_accuracy_mean": ms("sampled_accuracy")[0],
               "improvement_mean": float(gains.mean()),
               "improvement_std": float(gains.std(ddof=1)) if len(gains) > 1 else 0.0,
               "clear_improvement": clear, "per_seed": results}
    t = cfg.task
    rows = [f"# {cfg.algorithm.upper()} on {cfg.model}: {t.min_digits}-{t.max_digits} digit addition, "
            f"{t.n_eval} held-out problems\n",
            f"device {summary['device']}; {cfg.prompts_per_step} prompts x {cfg.group_size} samples per step, "
            f"lr {cfg.train.lr}, kl_coef {cfg.kl_coef} ({cfg.kl_estimator}), temperature {cfg.temperature}, "
            f"{cfg.mini_batches} minibatches x {cfg.ppo_epochs} epochs, loss {cfg.loss_agg_mode}, "
            f"{'LoRA r=%d' % cfg.lora.rank if cfg.lora else 'full fine-tuning'}\n",
            "| seed | steps | held-out greedy acc before -> after | greedy reward after | sampled acc before -> after "
            "| train reward first5 -> last5 | step s | rollout tok/s | update tok/s | compile s |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        a, b = r["after"], before
        rows.append(f"| {r['seed']} | {r['steps']} | {100 * b['accuracy']:.1f} -> {100 * a['accuracy']:.1f} | "
                    f"{a['reward']:.3f} | {100 * b['sampled_accuracy']:.1f} -> {100 * a['sampled_accuracy']:.1f} | "
                    f"{r['train_reward_first5']:.3f} -> {r['train_reward_last5']:.3f} | {r['step_s']:.2f} | "
                    f"{r['rollout_tokens_per_s']:.0f} | {r['update_tokens_per_s']:.0f} | {r['compile_s']:.0f} |")
    rows.append(f"\nheld-out greedy accuracy: before {100 * before['accuracy']:.1f}%, after "
                f"{100 * acc_m:.1f} ± {100 * acc_s:.1f}% (mean ± std over {len(results)} seeds); improvement "
                f"{100 * gains.mean():.1f} ± {100 * summary['improvement_std']:.1f} points; "
                f"clearly above the seed spread (every seed improves, mean gain > 3 x std): {clear}\n")
    return summary, "\n".join(rows)


def main(argv=None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs/train_grpo.yaml"))
    ap.add_argument("--out", default="runs/grpo")
    ap.add_argument("--tiny", action="store_true", help="tiny random model + character tokenizer (CPU smoke)")
    ap.add_argument("--study", action="store_true", help="several seeds within --budget_s; results table")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default: the config's seed; study 0,1,2)")
    ap.add_argument("--budget_s", type=float, default=420.0, help="study: wall-clock budget after model load")
    ap.add_argument("overrides", nargs="*", help="key=value RLConfig overrides (dotted for nested)")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, (TINY if args.tiny else []) + args.overrides)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else ([0, 1, 2] if args.study else [cfg.seed])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(cfg.to_yaml())

    exp = Experiment(cfg, args.tiny)
    t_start = time.perf_counter()
    deadline = t_start + args.budget_s if args.study else float("inf")
    before = exp.evaluate(exp.trainer.init_state(exp.params, seed=seeds[0], reference=False))
    print(f"[before] held-out {before}", flush=True)
    results: List[Dict[str, Any]] = []
    for i, seed in enumerate(seeds):
        elapsed = time.perf_counter() - t_start
        if results and args.study:
            per_seed = max(r["train_s"] - r["compile_s"] for r in results) + 15.0  # compiled once, in seed 1
            if elapsed + per_seed > args.budget_s:
                print(f"[study] stopping before seed {seed}: {elapsed:.0f}s used, a seed takes ~{per_seed:.0f}s",
                      flush=True)
                break
        d = out / f"seed{seed}" if len(seeds) > 1 else out
        res = exp.run_seed(seed, d, before, deadline)
        results.append(res)
        print(f"[seed {seed}] held-out accuracy {before['accuracy']:.3f} -> {res['after']['accuracy']:.3f}, "
              f"reward {before['reward']:.3f} -> {res['after']['reward']:.3f} ({res['steps']} steps, "
              f"{res['train_s']:.0f}s)", flush=True)
    summary, md = summarize(results, before, cfg, exp, args.budget_s)
    summary["wall_s"] = time.perf_counter() - t_start
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    (out / "results.md").write_text(md)
    if len(results) > 1:
        plot([out / f"seed{r['seed']}" / "telemetry.jsonl" for r in results], out / "curves.png", results)
    print(md, flush=True)
    return summary


if __name__ == "__main__":
    main()
