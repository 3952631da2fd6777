"""Train the HRM controller (iva_jax.hrm.controller) over SmolLM2-135M-Instruct, frozen or with LoRA, on the
embedded corpus; report held-out perplexity with and without pondering and the halting statistics.

    python experiments/train_hrm_controller.py --out runs/hrm_controller [--config configs/hrm.yaml] [key=value ...]
    python experiments/train_hrm_controller.py --out runs/hrm_controller_lora lora.rank=8 lora.alpha=16
    python experiments/train_hrm_controller.py --tiny --out /tmp/hrm_controller_tiny   # CPU smoke (random tiny LM)

Overrides are keys of the `controller:` section of the config, dotted for nested ones (model.max_steps=3
model.ponder_weight=0.02 train.steps=600 train.lr=3e-4 context_len=64 lora.rank=8).

Evaluation (before and after training, on the held-out documents): every row's first `context_len` tokens
are what the controller reads; perplexity is over the predictions of the later tokens only, for the plain
LM (`ppl_plain`; `ppl_base` is the LM without its LoRA adapters), adaptive pondering (`ppl_ponder`: ACT
halting, stopping once every row halted) and the fixed step limit (`ppl_fixed`: the last of max_steps
passes), with halt_rate / avg_steps / ponder_cost of the adaptive run.  Writes <out>/telemetry.jsonl
(the `hrm` block per logged step, `eval` blocks), <out>/final.json, <out>/controller.npz (+ lora.npz)
and <out>/config.yaml.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import yaml  # noqa: E402

TINY = ["lm=tiny-random", "tokenizer=bytes", "context_len=24", "train.steps=12", "train.batch_size=4",
        "train.seq_len=48", "train.log_every=4", "train.eval_every=6", "train.eval_batches=2",
        "train.compute_dtype=float32", "train.warmup_steps=2", "train.lr=3e-3", "model.hidden_size=32",
        "model.max_steps=3", "model.ponder_weight=0.02"]
FAST_CPU = {"xla_backend_optimization_level": 0}  # --tiny: compile time dominates


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "hrm.yaml"), help="YAML with a `controller:` section")
    p.add_argument("--out", default=None, help="output directory (default: the config's out_dir)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke: a tiny random LM, the byte tokenizer, a few steps")
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the controller section")
    return p.parse_args(argv)


def load_cfg(path: str, overrides):
    """ControllerTrainConfig from the `controller:` section of `path` plus key=value overrides."""
    from iva_jax.hrm.controller_train import ControllerTrainConfig
    from iva_jax.train.config import load_config

    raw = yaml.safe_load(Path(path).read_text()) or {}
    section = raw.get("controller", raw)  # a file holding only the section works too
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(section, f)
    try:
        return load_config(ControllerTrainConfig, f.name, overrides)
    finally:
        Path(f.name).unlink()


def build_lm(cfg):
    """(model, params, tokenizer): the pretrained LM in the compute dtype, or the --tiny random one."""
    import jax.numpy as jnp

    from iva_jax.config import ModelConfig, dtype_of
    from iva_jax.train.data import ByteTokenizer

    if cfg.lm == "tiny-random":
        from iva_jax.hrm.controller_task import TINY_LM, random_lm

        model, params = random_lm(ModelConfig(**dict(TINY_LM, vocab_size=258, max_position_embeddings=256,
                                                     dtype=cfg.train.compute_dtype,
                                                     param_dtype=cfg.train.compute_dtype)), seed=0)
        return model, params, ByteTokenizer()
    from torch_bridge import load_pretrained
    from torch_bridge.tokenizer import load_tokenizer

    model, params = load_pretrained(cfg.lm, dtype=jnp.dtype(dtype_of(cfg.train.compute_dtype)))
    tok_name = cfg.tokenizer or cfg.lm
    return model, params, (ByteTokenizer() if tok_name == "bytes" else load_tokenizer(tok_name))


def _flat_npz(path: Path, tree) -> None:
    import jax
    from flax import traverse_util

    flat = traverse_util.flatten_dict(jax.device_get(tree), sep="/")
    np.savez(path, **{k: np.asarray(v, np.float32) for k, v in flat.items()})


def main(argv=None):
    args = parse_args(argv)
    import jax

    from iva_jax.hrm.controller_train import ControllerTrainer, lm_batch
    from iva_jax.train.data import batches_from_config
    from iva_jax.train.telemetry import Telemetry

    cfg = load_cfg(args.config, (TINY if args.tiny else []) + list(args.overrides))
    out = Path(args.out or cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg.to_yaml(out / "config.yaml")
    t0 = time.perf_counter()
    lm, lm_params, tokenizer = build_lm(cfg)
    trainer = ControllerTrainer(cfg, lm, compiler_options=FAST_CPU if args.tiny else None)
    state = trainer.init_state(lm_params)
    n_ctrl = int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(state.params["ctrl"])))
    n_lora = int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(state.params.get("lora", {}))))
    held = list(itertools.islice(batches_from_config(cfg.train, tokenizer, "eval", loop=False), cfg.train.eval_batches))
    if not held:
        raise SystemExit(f"no held-out batches: raise train.data.eval_fraction (={cfg.train.data.eval_fraction}) or "
                         "set train.data.eval_paths")
    held_rows = [lm_batch(b, cfg.context_len) for b in held]
    before = trainer.evaluate(state, held_rows)
    print(f"before: {json.dumps({k: round(v, 4) for k, v in before.items()})}", flush=True)
    tel_path = Path(cfg.train.telemetry_path) if cfg.train.telemetry_path else out / "telemetry.jsonl"
    if tel_path.exists():
        tel_path.unlink()
    tel = Telemetry(tel_path)
    res = trainer.fit(state, batches_from_config(cfg.train, tokenizer, "train"), eval_batches=lambda: held,
                      telemetry=tel, progress=not args.no_progress)
    tel.close()
    after = trainer.evaluate(res.state, held_rows)
    _flat_npz(out / "controller.npz", res.state.params["ctrl"])
    if "lora" in res.state.params:
        _flat_npz(out / "lora.npz", res.state.params["lora"])
    recs = [r for r in res.records if not r["speed"].get("includes_compile")]
    final = {"lm": cfg.lm, "lora": cfg.lora.to_dict() if cfg.lora else None, "steps": res.step,
             "controller_params": n_ctrl, "lora_params": n_lora, "context_len": cfg.context_len,
             "max_steps": cfg.model.max_steps, "ponder_weight": cfg.model.ponder_weight,
             "held_out_rows": int(sum(np.asarray(b["input_ids"]).shape[0] for b in held)),
             "held_out_tokens": after["tokens"], "before": before, "after": after,
             "train_last": {**res.records[-1]["quality"], **res.records[-1].get("hrm", {})} if res.records else {},
             "tokens_per_sec": float(np.median([r["speed"]["tokens_per_sec"] for r in recs])) if recs else None,
             "skipped": res.skipped, "seconds": time.perf_counter() - t0, "device": str(jax.devices()[0].device_kind)}
    (out / "final.json").write_text(json.dumps(final, indent=2))
    fixed = f"ppl fixed ({cfg.model.eval_steps or cfg.model.max_steps} steps)"
    rows = [("ppl plain LM", "ppl_plain"), ("ppl ponder (adaptive)", "ppl_ponder"), (fixed, "ppl_fixed"),
            ("halt_rate", "halt_rate"), ("avg_steps", "avg_steps"), ("ponder_cost (N+R)", "ponder_cost")]
    if cfg.lora is not None:
        rows.insert(0, ("ppl base LM (no LoRA)", "ppl_base"))
    print(f"{'held-out':28s} {'before':>10s} {'after':>10s}")
    for name, key in rows:
        print(f"{name:28s} {before[key]:10.4f} {after[key]:10.4f}")
    print(json.dumps({"out": str(out), "steps": res.step, "seconds": round(final["seconds"], 1),
                      "tokens_per_sec": final["tokens_per_sec"]}))
    return final


if __name__ == "__main__":
    main()
