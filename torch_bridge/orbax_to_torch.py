"""An orbax checkpoint directory -> a Hugging Face directory that transformers loads.

    python -m torch_bridge.orbax_to_torch CKPT_DIR OUT_DIR [--step N] [--dtype bfloat16] [--base SRC]

The architecture comes from `CKPT_DIR/model_config.yaml` (written by every `Checkpointer`), the
weights from `Checkpointer.restore_params` (the latest step unless `--step`; no optimizer state is
read, and any mesh the run used is fine).  A LoRA run's checkpoint holds only adapters: they are
merged into the base named in `CKPT_DIR/lora.yaml` (or `--base`).  Tokenizer files saved with the
run (`CKPT_DIR/tokenizer/`, or the base's) are copied along.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional, Sequence

from torch_bridge.hf_to_orbax import export_tokenizer, is_orbax_dir, load_model


def convert(ckpt_dir: str | Path, out_dir: str | Path, *, step: Optional[int] = None, dtype: Optional[Any] = None,
            base: Optional[str] = None) -> Path:
    """Write `ckpt_dir`'s params (LoRA merged) as config.json + safetensors (+ tokenizer) in `out_dir`."""
    from iva_jax.models.transformer import Transformer
    from torch_bridge.loader import save_pretrained

    if not is_orbax_dir(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir} is not an orbax checkpoint directory (no model_config.yaml)")
    lm = load_model(ckpt_dir, step=step, base=base)
    out = save_pretrained(Transformer(lm.config), lm.params, out_dir, dtype=dtype)
    export_tokenizer(lm.tokenizer, out)
    return out


def main(argv: Optional[Sequence[str]] = None) -> Path:
    p = argparse.ArgumentParser(description="orbax checkpoint directory -> Hugging Face directory")
    p.add_argument("ckpt_dir", help="checkpoint directory (holds model_config.yaml and step subdirectories)")
    p.add_argument("out_dir", help="Hugging Face output directory")
    p.add_argument("--step", type=int, default=None, help="step to convert (default: the latest)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="tensor dtype written (default: the checkpoint's)")
    p.add_argument("--base", default=None, help="base model of a LoRA checkpoint (default: from lora.yaml)")
    args = p.parse_args(argv)
    out = convert(args.ckpt_dir, args.out_dir, step=args.step, dtype=args.dtype, base=args.base)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
