"""Supervised fine-tuning of a decoder (default: the embedded SmolLM2-135M-Instruct), with HF export.

    python experiments/train_sft.py [--config configs/train_sft.yaml] [key=value ...]

    # full fine-tuning of SmolLM2-135M on your JSONL (prompt/completion or text records)
    python experiments/train_sft.py data.paths=[my_sft.jsonl] steps=500 export_dir=runs/sft/hf
    # LoRA (adapters only; merged into the exported model)
    python experiments/train_sft.py lora.rank=16 lora.targets='q_proj|k_proj|v_proj|o_proj' lr=2e-4
    # a random model from a ModelConfig YAML with the byte tokenizer
    python experiments/train_sft.py model=configs/model_dense.yaml tokenizer=bytes \\
        model_overrides.vocab_size=258 lr=1e-3

Writes telemetry JSONL (`telemetry_path`), orbax checkpoints (`checkpoint_dir`; rerunning resumes
from the latest) and, at the end, a Hugging Face directory (`export_dir`).  Convert any checkpoint
later with `python -m torch_bridge.orbax_to_torch CKPT_DIR OUT_DIR`.  The loop lives in
iva_jax.train.sft / iva_jax.train.loop; this script only resolves the model and tokenizer and exports.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "train_sft.yaml"))
    p.add_argument("--stop_after", type=int, default=None,
                   help="stop (after checkpointing) at this step, as if interrupted; the schedule is unchanged")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (dotted keys for nested sections)")
    return p.parse_args(argv)


def load_tokenizer_for(name):
    """ByteTokenizer for "bytes", else an HF tokenizer (HF dir, .gguf, smollm2-135m, or a saved tokenizer dir)."""
    from iva_jax.train.data import ByteTokenizer
    from torch_bridge.tokenizer import load_tokenizer

    return ByteTokenizer() if name == "bytes" else load_tokenizer(name)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from iva_jax.parallel import initialize_distributed

    initialize_distributed()
    from iva_jax.train.config import load_config
    from iva_jax.train.sft import SFTConfig, run_sft
    from torch_bridge.hf_to_orbax import load_model
    from torch_bridge.loader import save_pretrained

    cfg = load_config(SFTConfig, args.config, args.overrides)
    lm = load_model(cfg.model)
    tok_name = cfg.tokenizer or lm.tokenizer
    if tok_name is None:
        raise ValueError(f"model source {cfg.model!r} has no tokenizer: set tokenizer=<HF dir | .gguf | "
                         "smollm2-135m | bytes>")
    tokenizer = load_tokenizer_for(tok_name)
    result = run_sft(cfg, lm.config, lm.params, tokenizer, base_source=lm.source if lm.params is not None else None,
                     stop_after=args.stop_after, progress=not args.no_progress)
    last = result.fit.records[-1] if result.fit.records else {}
    summary = {"step": result.fit.step, "resumed_from": result.resumed_from, "skipped": result.fit.skipped,
               "trainable_params": result.trainable_params, "loss": last.get("quality", {}).get("loss"),
               "tokens_per_sec": last.get("speed", {}).get("tokens_per_sec"), **result.fit.last_eval}
    if cfg.export_dir and not result.fit.stopped_early:
        out = save_pretrained(result.model, result.full_params(), cfg.export_dir, dtype=cfg.export_dtype,
                              tokenizer=tokenizer if hasattr(tokenizer, "save_pretrained") else None)
        summary["export_dir"] = str(out)
    print(json.dumps(summary))
    return result


if __name__ == "__main__":
    main()
