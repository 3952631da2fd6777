"""Tokenizers for loaded models (transformers' tokenizers; needs the `torch` extra's transformers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch_bridge.loader import DEFAULT_MODEL, embedded_model_dir, embedded_model_path


def load_tokenizer(path: str | Path) -> Any:
    """An HF tokenizer for an HF directory, a .gguf file, or "smollm2-135m" (cached after first use)."""
    from transformers import AutoTokenizer

    if str(path) == DEFAULT_MODEL:
        d = embedded_model_dir()
        if not (d / "tokenizer_config.json").exists():
            src = embedded_model_path()
            tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
            tok.save_pretrained(str(d))
            return tok
        return AutoTokenizer.from_pretrained(str(d))
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    if not p.exists():
        raise FileNotFoundError(f"tokenizer path not found: {p}")
    return AutoTokenizer.from_pretrained(str(p))
