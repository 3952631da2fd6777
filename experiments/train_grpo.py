"""GRPO on SmolLM2-135M-Instruct with the built-in addition task: held-out accuracy before and after,
a curve, tokens/s of rollout and update; `--study` repeats it over seeds and writes a results table;
`--compare` runs plain GRPO against HRM-RPO on the same seeds and the same training-time budget.

    python experiments/train_grpo.py --out runs/grpo [--config configs/train_grpo.yaml] [key=value ...]
    python experiments/train_grpo.py --study --seeds 0,1,2 --budget_s 420 --out runs/grpo_study
    python experiments/train_grpo.py --tiny --out /tmp/grpo_tiny        # CPU smoke: tiny random model
    python experiments/train_grpo.py --config configs/train_ppo.yaml ...  # PPO with a value head (same loop)
    python experiments/train_grpo.py --config configs/train_hrm_rpo.yaml --out runs/hrm_rpo   # HRM-RPO
    python experiments/train_grpo.py --config configs/train_hrm_rpo.yaml --compare --seeds 0,1,2 \
        --budget_s 470 --out runs/grpo_vs_hrm_rpo                      # GRPO vs HRM-RPO, one results table

HRM-RPO (algorithm hrm_rpo): the reward hook is an RPOController (iva_jax.hrm.controller_rpo) pondering
over the frozen base LM (the KL reference / LoRA base, in compute dtype) inside HRMRPOShaping, so
R' = R + b_halt r_halt + b_entropy r_entropy + b_mem r_mem feeds the group advantages, and the controller
takes one Adam step per RL step.  Its metrics (hook/r_halt, hook/shaped_mean, hook/controller_avg_steps,
hook/controller_halt_rate, ...) go to the telemetry `rl` block.  The held-out evaluation never uses the
hook: it measures the policy exactly as for GRPO.

--compare: the GRPO arm is the same trainer (same config, same compiled programs) with the hook
detached, so the arms differ only by the shaping and the controller.  Both start from the same model
and seeds; every program is compiled by two warm-up steps per arm before any clock starts; then each
run gets the same training time (sum of step times; evaluations excluded), sized so that all runs,
their evaluations (at 1/3, 2/3 of the run and the end) and the warm-ups fit in --budget_s (counted
after model load).  Writes <out>/seed<k>/<method>/..., <out>/results.json, results.md, curves.png.

Overrides are RLConfig keys, dotted for nested configs (train.lr=2e-5 task.max_digits=3 lora.rank=16).
Held-out evaluation: greedy accuracy and mean reward on task.n_eval problems never seen in training,
plus accuracy of one sample per problem at the training temperature (fixed sampling key).  All
seeds (and, with --compare, both methods) start from the same model, so "before" is measured once.
Writes <out>/[seed<k>/]telemetry.jsonl, curve.png, final.json; a study adds <out>/results.json,
results.md and curves.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import yaml  # noqa: E402

TINY = ["model=tiny-random", "train.steps=4", "prompts_per_step=4", "group_size=4", "max_new_tokens=6",
        "task.n_train=64", "task.n_eval=12", "task.max_digits=2", "eval_every=2", "train.lr=0.003",
        "train.warmup_steps=0", "train.compute_dtype=float32"]
EVAL_SEED = 1234
METHODS = ("grpo", "hrm_rpo")
HOOK_COLS = (("controller_expected_steps", "E[ponder steps]"), ("controller_avg_steps", "ACT N"),
             ("controller_halt_rate", "halt rate"), ("r_halt", "r_halt"), ("r_entropy", "r_entropy"),
             ("r_mem", "r_mem"), ("shaped_mean", "shaped reward"), ("controller_ce", "controller CE"))


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


def build_hrm_rpo_hook(cfg, model, params, seed: int = 0):
    """HRM-RPO's reward hook from an RLConfig: HRMRPOShaping with an RPOController pondering over the
    frozen base LM `params` (cast to the model's compute dtype) when b_halt / b_mem or a controller is set."""
    from iva_jax.config import dtype_of
    from iva_jax.hrm.controller import ControllerConfig
    from iva_jax.hrm.controller_rpo import ControllerShaping, RPOController
    from iva_jax.rl import HRMRPOShaping
    from iva_jax.rl.policy import cast_floating

    if not (cfg.b_halt or cfg.b_mem or cfg.controller is not None):
        return HRMRPOShaping.from_config(cfg)  # entropy shaping only: no controller
    base = cast_floating(params, dtype_of(model.config.dtype))
    ctrl = RPOController(model, base, cfg.controller or ControllerConfig(), seed=seed, lr=cfg.controller_lr,
                         read=cfg.controller_read, mem_coef=cfg.controller_mem_coef,
                         mem_temperature=cfg.mem_temperature)
    return ControllerShaping.from_config(cfg, ctrl)


def reset_controller(hook, seed: int, cache: Dict[int, Any]) -> None:
    """Fresh controller parameters (seeded; `cache` keeps each seed's initial params) and Adam state for a
    new run; the controller's compiled programs are kept."""
    from iva_jax.hrm.controller import init_controller

    ctrl = getattr(hook, "controller", None)
    if ctrl is not None:
        if seed not in cache:
            cache[seed] = init_controller(ctrl.ctrl, ctrl.lm.config.hidden_size, seed)
        ctrl.params = cache[seed]
        ctrl.opt_state = ctrl.tx.init(ctrl.params)


def hook_line(m: Dict[str, float]) -> str:
    """The per-step progress suffix for HRM-RPO's hook metrics ('' without them)."""
    if "hook/shaped_mean" not in m:
        return ""
    out = f" | shaped {m['hook/shaped_mean']:.3f} r_halt {m['hook/r_halt']:.3f}"
    if "hook/controller_expected_steps" in m:
        out += (f" ponder {m['hook/controller_expected_steps']:.2f} (N {m['hook/controller_avg_steps']:.2f}, "
                f"halt {m['hook/controller_halt_rate']:.2f})")
    return out


class Experiment:
    """Model, task, prompts and one compiled trainer, shared by every seed (and, with --compare, both
    methods: `use("grpo")` detaches the HRM-RPO hook, `use("hrm_rpo")` attaches it)."""

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
        self.hook = build_hrm_rpo_hook(cfg, self.model, self.params, cfg.seed) if cfg.algorithm == "hrm_rpo" else None
        ctrl = getattr(self.hook, "controller", None)
        self.controller_init = {} if ctrl is None else {cfg.seed: ctrl.params}  # seed -> initial params
        self.trainer = PolicyGradientTrainer(policy, cfg, reward, reward_hook=self.hook, eos_token_id=eos,
                                             pad_token_id=pad)
        self.load_s = time.perf_counter() - t0
        print(f"[setup] {cfg.algorithm}: {len(self.task.train)} train / {len(self.task.held_out)} held-out problems, "
              f"prompt length {length}, rollout batch {cfg.rollout_batch}, load {self.load_s:.1f}s"
              + (f"; HRM controller {ctrl.config.hidden_size} wide, <= {ctrl.max_steps} ponder steps"
                 if ctrl is not None else ""), flush=True)

    def use(self, method: str) -> None:
        """Run `method` from now on: "hrm_rpo" (the hook attached) or "grpo" (the same trainer without it)."""
        if method not in METHODS or (method == "hrm_rpo" and self.hook is None):
            raise ValueError(f"method {method!r}: need one of {METHODS} ('hrm_rpo' needs an hrm_rpo config)")
        self.trainer.reward_hook = self.hook if method == "hrm_rpo" else None

    def warm_up(self, methods, steps: int = 2) -> Dict[str, float]:
        """Compile every program of each method with throwaway steps; {method: last (compiled) step's seconds}."""
        out = {}
        for method in methods:
            self.use(method)
            state = self.trainer.init_state(self.params, seed=0)
            t0 = time.perf_counter()
            for i in range(steps):
                k = self.cfg.prompts_per_step
                state, m = self.trainer.step(state, self.train.take([j % len(self.train)
                                                                     for j in range(i * k, (i + 1) * k)]))
            out[method] = m["t_step_s"]
            print(f"[warm-up] {method}: {steps} steps in {time.perf_counter() - t0:.1f}s (compile included), "
                  f"then {m['t_step_s']:.3f}s per step", flush=True)
            del state
        return out

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

    def run_seed(self, seed: int, out: Path, before: Dict[str, float], deadline: float = float("inf"),
                 budget_s: Optional[float] = None, eval_every_s: Optional[float] = None,
                 method: Optional[str] = None) -> Dict[str, Any]:
        """Train one seed for train.steps steps, stopping early at the wall-clock `deadline` or before a
        step that would take the summed step time past `budget_s`; held-out evaluations every eval_every
        steps (or every `eval_every_s` of step time) and at the end; telemetry + curve."""
        from iva_jax.rl import telemetry_record
        from iva_jax.train.telemetry import Telemetry

        cfg = self.cfg
        tag = f"seed {seed}" + (f" {method}" if method else "")
        if method is not None:
            self.use(method)
        reset_controller(self.trainer.reward_hook, seed, self.controller_init)
        out.mkdir(parents=True, exist_ok=True)
        tpath = out / "telemetry.jsonl"
        tpath.unlink(missing_ok=True)
        tel = Telemetry(tpath)
        state = self.trainer.init_state(self.params, seed=seed)
        rng = np.random.default_rng(seed)
        order: List[int] = []
        hist, evals = [], {0: dict(before, train_s=0.0)}
        clock = 0.0  # summed step time (evaluations excluded)
        t0 = time.perf_counter()
        for step in range(1, cfg.train.steps + 1):
            if budget_s is not None and hist and clock + hist[-1]["t_step_s"] > budget_s:
                print(f"[{tag}] training budget {budget_s:.1f}s reached after {len(hist)} steps", flush=True)
                break
            if len(order) < cfg.prompts_per_step:
                order += rng.permutation(len(self.train)).tolist()
            idx, order = order[:cfg.prompts_per_step], order[cfg.prompts_per_step:]
            state, m = self.trainer.step(state, self.train.take(idx))
            prev, clock = clock, clock + m["t_step_s"]
            m["train_s"] = clock
            hist.append(m)
            ev = None
            due = (eval_every_s is not None and int(clock / eval_every_s) > int(prev / eval_every_s)) or (
                eval_every_s is None and cfg.eval_every and step % cfg.eval_every == 0)
            if due and step < cfg.train.steps and (budget_s is None or clock + m["t_step_s"] <= budget_s):
                ev = evals[step] = dict(self.evaluate(state, sampled=False), train_s=clock)
            telemetry_record(tel, step, m, ev)
            print(f"[{tag} step {step}] reward {m['reward_mean']:.3f} kl {m['kl']:.4f} clip {m['clipfrac']:.3f} "
                  f"ent {m['rollout_entropy']:.2f} len {m['response_length']:.1f} "
                  f"rollout {m['rollout_tokens_per_s']:.0f} tok/s update {m['update_tokens_per_s']:.0f} tok/s "
                  f"step {m['t_step_s']:.2f}s" + hook_line(m)
                  + (f" | held-out acc {ev['accuracy']:.3f}" if ev else ""), flush=True)
            if time.perf_counter() > deadline:
                print(f"[{tag}] time budget reached after {step} steps", flush=True)
                break
        train_s = time.perf_counter() - t0
        after = self.evaluate(state)
        evals[len(hist)] = dict(after, train_s=clock)
        telemetry_record(tel, len(hist) + 1, hist[-1], {f"final_{k}": v for k, v in after.items()})
        tel.close()
        steady = hist[1:] or hist  # the first step includes compilation (unless warmed up)

        def avg(key, fn=np.mean):
            return float(fn([m[key] for m in steady]))

        step_s = avg("t_step_s", np.median)
        res = {"seed": seed, "method": method or cfg.algorithm, "steps": len(hist), "train_s": train_s,
               "step_time_s": clock, "compile_s": hist[0]["t_step_s"] - step_s, "step_s": step_s,
               "rollout_tokens_per_s": avg("rollout_tokens_per_s"), "update_tokens_per_s": avg("update_tokens_per_s"),
               "step_new_tokens_per_s": float(sum(m["rollout_new_tokens"] for m in steady)
                                              / max(sum(m["t_step_s"] for m in steady), 1e-9)),
               "t_generate_s": avg("t_generate_s", np.median), "t_score_s": avg("t_score_s", np.median),
               "t_update_s": avg("t_update_s", np.median),
               "t_other_s": float(np.median([m["t_step_s"] - m["t_generate_s"] - m["t_score_s"] - m["t_update_s"]
                                             for m in steady])),  # reward, shaping, controller update
               "before": before, "after": after,
               "train_reward_first5": float(np.mean([m["reward_mean"] for m in hist[:5]])),
               "train_reward_last5": float(np.mean([m["reward_mean"] for m in hist[-5:]])),
               "train_reward_mean": float(np.mean([m["reward_mean"] for m in hist])),
               "hook": {k[5:]: avg(k) for k in sorted(hist[0]) if k.startswith("hook/")},
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
    hook = {k: float(np.mean([r["hook"][k] for r in results])) for k, _ in HOOK_COLS if k in results[0]["hook"]}
    if hook:
        summary["hook"] = hook
        rows.append("HRM-RPO hook (means over steps and seeds): "
                    + ", ".join(f"{name} {hook[k]:.3f}" for k, name in HOOK_COLS if k in hook) + "\n")
    return summary, "\n".join(rows)


def _ms(values) -> Tuple[float, float]:
    """(mean, sample std; 0 for one value)."""
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def plot_compare(runs: Dict[str, List[Dict[str, Any]]], paths: Dict[str, List[Path]], png: Path) -> None:
    """GRPO vs HRM-RPO against training time: train reward, held-out greedy accuracy, KL, controller ponder steps."""
    try:
        import matplotlib
    except ImportError:
        print(f"[plot] matplotlib is not installed (pip install -e .[plots]); {png} not written", flush=True)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from iva_jax.train.telemetry import read_jsonl

    colors = {"grpo": "tab:blue", "hrm_rpo": "tab:red"}
    fig, ax = plt.subplots(1, 4, figsize=(20, 4))
    for method, rs in runs.items():
        for i, (res, path) in enumerate(zip(rs, paths[method])):
            recs = [r["rl"] for r in read_jsonl(path) if r["step"] <= res["steps"]]
            t = np.array([r["train_s"] for r in recs])
            rew = np.array([r["reward_mean"] for r in recs])
            k = min(5, len(rew))
            lab = (lambda s: f"{method} {s}" if i == 0 else None)
            ax[0].plot(t[k - 1:], np.convolve(rew, np.ones(k) / k, mode="valid"), color=colors[method], alpha=0.8,
                       label=lab(f"(avg {k} steps)"))
            ev = sorted((v["train_s"], v["accuracy"]) for v in res["evals"].values())
            ax[1].plot([e[0] for e in ev], [e[1] for e in ev], "o-", color=colors[method], alpha=0.8,
                       label=lab("(one line per seed)"))
            ax[2].plot(t, [r["kl"] for r in recs], color=colors[method], alpha=0.8, label=lab(""))
            if "hook/controller_expected_steps" in recs[0]:
                ax[3].plot(t, [r["hook/controller_expected_steps"] for r in recs], color=colors[method],
                           label="E[ponder steps]" if i == 0 else None)
                ax[3].plot(t, [r["hook/controller_avg_steps"] for r in recs], "--", color="tab:orange",
                           label="ACT N" if i == 0 else None)
    ax[0].set(xlabel="training time (s, steps only)", ylabel="task reward (sampled)", title="train reward")
    ax[1].set(xlabel="training time (s)", ylabel="accuracy", title="held-out greedy accuracy")
    ax[2].set(xlabel="training time (s)", ylabel="KL per token", title="KL(policy || reference)")
    ax[3].set(xlabel="training time (s)", ylabel="steps", title="HRM controller pondering (HRM-RPO)")
    for a in ax:
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def summarize_compare(runs: Dict[str, List[Dict[str, Any]]], before: Dict[str, float], cfg, exp: Experiment,
                      budget_s: float, run_budget_s: float) -> Tuple[Dict[str, Any], str]:
    """The comparison's JSON summary and markdown table (mean ± std over seeds per method, paired differences)."""
    import jax

    methods: Dict[str, Any] = {}
    for method, rs in runs.items():
        m = {"seeds": [r["seed"] for r in rs]}
        for key in ("accuracy", "reward", "sampled_accuracy"):
            m[f"after_{key}_mean"], m[f"after_{key}_std"] = _ms([r["after"][key] for r in rs])
        m["gain_mean"], m["gain_std"] = _ms([r["after"]["accuracy"] - before["accuracy"] for r in rs])
        for key in ("steps", "step_s", "rollout_tokens_per_s", "update_tokens_per_s", "step_new_tokens_per_s",
                    "t_generate_s", "t_score_s", "t_update_s", "t_other_s", "train_reward_first5",
                    "train_reward_last5"):
            m[key] = _ms([r[key] for r in rs])[0]
        m["hook"] = {k: _ms([r["hook"][k] for r in rs])[0] for k in (rs[0]["hook"] if rs else {})}
        methods[method] = m
    g, h = runs["grpo"], runs["hrm_rpo"]
    n = min(len(g), len(h))
    diff = _ms([h[i]["after"]["accuracy"] - g[i]["after"]["accuracy"] for i in range(n)])
    summary = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(), "config": cfg.to_dict(),
               "budget_s": budget_s, "run_budget_s": run_budget_s, "load_s": exp.load_s, "before": before,
               "methods": methods, "hrm_minus_grpo_accuracy_mean": diff[0], "hrm_minus_grpo_accuracy_std": diff[1],
               "per_run": runs}
    t, ctrl = cfg.task, getattr(exp.hook, "controller", None)
    rows = [f"# GRPO vs HRM-RPO on {cfg.model}: {t.min_digits}-{t.max_digits} digit addition, {t.n_eval} held-out "
            f"problems, a budget of {run_budget_s:.0f}s of training steps per run\n",
            f"device {summary['device']}; both: {cfg.prompts_per_step} prompts x {cfg.group_size} samples per step, "
            f"lr {cfg.train.lr}, kl_coef {cfg.kl_coef} ({cfg.kl_estimator}), temperature {cfg.temperature}, "
            f"{cfg.mini_batches} minibatches x {cfg.ppo_epochs} epochs, loss {cfg.loss_agg_mode}, "
            f"{'LoRA r=%d' % cfg.lora.rank if cfg.lora else 'full fine-tuning'}.  "
            f"HRM-RPO: R' = R + {cfg.b_halt} r_halt + {cfg.b_entropy} r_entropy + {cfg.b_mem} r_mem"
            + (f"; controller width {ctrl.config.hidden_size}, <= {ctrl.max_steps} ponder steps over the frozen base "
               f"LM, ponder weight {ctrl.config.ponder_weight}, lr {cfg.controller_lr}, reads {cfg.controller_read}, "
               f"L_mem coef {cfg.controller_mem_coef}" if ctrl is not None else "") + "\n",
            "| method | seeds | steps | held-out greedy acc before -> after | gain (points) | greedy reward after "
            "| sampled acc after | train reward first5 -> last5 | step s (gen / score / update / shaping+ctrl) "
            "| rollout tok/s | update tok/s | new tok/s end-to-end |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, m in methods.items():
        rows.append(
            f"| {method} | {len(m['seeds'])} | {m['steps']:.0f} | {100 * before['accuracy']:.1f} -> "
            f"{100 * m['after_accuracy_mean']:.1f} ± {100 * m['after_accuracy_std']:.1f} | "
            f"{100 * m['gain_mean']:+.1f} ± {100 * m['gain_std']:.1f} | {m['after_reward_mean']:.3f} ± "
            f"{m['after_reward_std']:.3f} | {100 * m['after_sampled_accuracy_mean']:.1f} ± "
            f"{100 * m['after_sampled_accuracy_std']:.1f} | {m['train_reward_first5']:.3f} -> "
            f"{m['train_reward_last5']:.3f} | {m['step_s']:.2f} ({m['t_generate_s']:.2f} / {m['t_score_s']:.2f} / "
            f"{m['t_update_s']:.2f} / {m['t_other_s']:.2f}) | {m['rollout_tokens_per_s']:.0f} | "
            f"{m['update_tokens_per_s']:.0f} | {m['step_new_tokens_per_s']:.0f} |")
    hook = methods["hrm_rpo"]["hook"]
    cols = [(k, name) for k, name in HOOK_COLS if k in hook]
    if cols:
        rows += ["\nHRM-RPO shaping and controller (means over steps and seeds):\n",
                 "| " + " | ".join(name for _, name in cols) + " | raw task reward |",
                 "|" + "---|" * (len(cols) + 1),
                 "| " + " | ".join(f"{hook[k]:.3f}" for k, _ in cols)
                 + f" | {_ms([r['train_reward_mean'] for r in h])[0]:.3f} |"]
    rows += ["\n| seed | method | steps | greedy acc after | greedy reward after | sampled acc after | step s |",
             "|---|---|---|---|---|---|---|"]
    for i in range(n):
        for r in (g[i], h[i]):
            a = r["after"]
            rows.append(f"| {r['seed']} | {r['method']} | {r['steps']} | {100 * a['accuracy']:.1f} | "
                        f"{a['reward']:.3f} | {100 * a['sampled_accuracy']:.1f} | {r['step_s']:.2f} |")
    rows.append(f"\nheld-out greedy accuracy before {100 * before['accuracy']:.1f}%; HRM-RPO - GRPO after the same "
                f"training time: {100 * diff[0]:+.1f} ± {100 * diff[1]:.1f} points (paired by seed, mean ± std over "
                f"{n} seeds)\n")
    return summary, "\n".join(rows)


def compare(args, cfg, out: Path) -> Dict[str, Any]:
    """Plain GRPO vs HRM-RPO on the same seeds and the same training time per run (see the module docstring)."""
    if cfg.algorithm != "hrm_rpo":
        raise SystemExit(f"--compare needs an hrm_rpo config (e.g. configs/train_hrm_rpo.yaml), got algorithm "
                         f"{cfg.algorithm!r}; the GRPO arm is the same config without the hook")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [0, 1, 2]
    exp = Experiment(cfg, args.tiny)
    t_start = time.perf_counter()
    state = exp.trainer.init_state(exp.params, seed=seeds[0], reference=False)
    before = exp.evaluate(state)
    print(f"[before] held-out {before} ({time.perf_counter() - t_start:.1f}s incl. compile)", flush=True)
    t0 = time.perf_counter()
    exp.evaluate(state, sampled=False)
    t_eval = time.perf_counter() - t0
    del state
    step_s = exp.warm_up(METHODS)
    # each run: 2 evaluations mid-run + greedy and sampled at the end, its state / telemetry / curve
    overhead = 4 * t_eval + args.run_overhead_s

    def run_budget(k):
        return 0.95 * (args.budget_s - (time.perf_counter() - t_start)) / (len(METHODS) * k) - overhead

    while args.run_s is None and len(seeds) > 2 and run_budget(len(seeds)) < args.min_run_steps * max(step_s.values()):
        print(f"[compare] dropping seed {seeds[-1]}: {run_budget(len(seeds)):.0f}s per run is under "
              f"{args.min_run_steps} HRM-RPO steps", flush=True)
        seeds = seeds[:-1]
    per_run = run_budget(len(seeds)) if args.run_s is None else args.run_s
    if per_run <= 0:
        raise SystemExit(f"--budget_s {args.budget_s} leaves no training time after "
                         f"{time.perf_counter() - t_start:.0f}s of evaluation and warm-up")
    print(f"[compare] seeds {seeds} x {list(METHODS)}: {per_run:.1f}s of training steps per run (~"
          + ", ".join(f"{m} {per_run / s:.0f}" for m, s in step_s.items()) + " steps), evaluations every "
          f"{per_run / 3:.1f}s; greedy eval {t_eval:.1f}s; {time.perf_counter() - t_start:.0f}s used of "
          f"{args.budget_s:.0f}", flush=True)
    runs: Dict[str, List[Dict[str, Any]]] = {m: [] for m in METHODS}
    paths: Dict[str, List[Path]] = {m: [] for m in METHODS}
    for seed in seeds:
        for method in METHODS:
            d = out / f"seed{seed}" / method
            res = exp.run_seed(seed, d, before, budget_s=per_run, eval_every_s=per_run / 3, method=method)
            runs[method].append(res)
            paths[method].append(d / "telemetry.jsonl")
            print(f"[seed {seed} {method}] held-out accuracy {before['accuracy']:.3f} -> {res['after']['accuracy']:.3f}"
                  f", reward {before['reward']:.3f} -> {res['after']['reward']:.3f} ({res['steps']} steps, "
                  f"{res['step_time_s']:.0f}s of steps; {time.perf_counter() - t_start:.0f}s used)", flush=True)
    summary, md = summarize_compare(runs, before, cfg, exp, args.budget_s, per_run)
    summary["wall_s"] = time.perf_counter() - t_start
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    (out / "results.md").write_text(md)
    plot_compare(runs, paths, out / "curves.png")
    print(md, flush=True)
    print(f"[compare] done in {summary['wall_s']:.0f}s after a {exp.load_s:.0f}s load", flush=True)
    return summary


def main(argv=None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs/train_grpo.yaml"))
    ap.add_argument("--out", default="runs/grpo")
    ap.add_argument("--tiny", action="store_true", help="tiny random model + character tokenizer (CPU smoke)")
    ap.add_argument("--study", action="store_true", help="several seeds within --budget_s; results table")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default: the config's seed; study 0,1,2)")
    ap.add_argument("--compare", action="store_true",
                    help="GRPO vs HRM-RPO (an hrm_rpo --config) on the same seeds and training time; one table")
    ap.add_argument("--budget_s", type=float, default=420.0,
                    help="study / compare: wall-clock budget after model load")
    ap.add_argument("--run_s", type=float, default=None,
                    help="compare: seconds of training steps per run (default: what --budget_s leaves, split evenly)")
    ap.add_argument("--min_run_steps", type=int, default=30,
                    help="compare: drop seeds (down to 2) until each run gets about this many HRM-RPO steps")
    ap.add_argument("--run_overhead_s", type=float, default=3.0,
                    help="compare: per-run allowance besides steps and evaluations (state init, curve)")
    ap.add_argument("overrides", nargs="*", help="key=value RLConfig overrides (dotted for nested)")
    args = ap.parse_args(argv)
    if args.study and args.compare:
        ap.error("--study and --compare are exclusive (--compare runs several seeds itself)")
    cfg = load_config(args.config, (TINY if args.tiny else []) + args.overrides)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else ([0, 1, 2] if args.study else [cfg.seed])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(cfg.to_yaml())
    if args.compare:
        return compare(args, cfg, out)

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
