"""Any model source -> an orbax params checkpoint, and the one loader of model sources.

    python -m torch_bridge.hf_to_orbax HF_DIR_OR_GGUF CKPT_DIR [--dtype float32|bfloat16|float16]

writes `CKPT_DIR/0/` (params only, readable by `Checkpointer.restore_params`), `CKPT_DIR/model_config.yaml`
and, when the source has one, `CKPT_DIR/tokenizer/`.  Such a directory is itself a model source for
`experiments/train_sft.py model=CKPT_DIR` and for `python -m torch_bridge.orbax_to_torch`.

`load_model(source)` understands every source the SFT script accepts:
  "smollm2-135m"            the embedded SmolLM2-135M-Instruct GGUF
  an HF directory / .gguf   through `load_pretrained`
  an orbax checkpoint dir   (has model_config.yaml): params of the latest (or given) step; a LoRA run's
                            adapters are merged into its base (from lora.yaml, or `base=`; a QLoRA
                            run's base is quantized as in training, then dequantized)
  a ModelConfig YAML        config only (params None: the caller initializes randomly)
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from iva_jax.config import ModelConfig
from iva_jax.parallel import unbox
from torch_bridge.loader import TOKENIZER_FILES, DEFAULT_MODEL, embedded_model_dir, load_pretrained

MODEL_CONFIG_FILE = "model_config.yaml"
TOKENIZER_DIR = "tokenizer"


@dataclasses.dataclass
class LoadedModel:
    """A model source resolved: config, params (None = random init), where its tokenizer is, the source."""

    config: ModelConfig
    params: Any
    tokenizer: Optional[str]
    source: str


def is_orbax_dir(path: str | Path) -> bool:
    """True for a directory written by `Checkpointer` / `save_params` (it holds model_config.yaml)."""
    p = Path(path)
    return p.is_dir() and (p / MODEL_CONFIG_FILE).exists() and not (p / "config.json").exists()


def _has_tokenizer(d: Path) -> bool:
    return d.is_dir() and any((d / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def _is_lora(params: Any) -> bool:
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return bool(leaves) and all(str(getattr(p[-1], "key", p[-1])) in ("lora_a", "lora_b") for p, _ in leaves)


def _load_orbax(path: Path, step: Optional[int], base: Optional[str]) -> LoadedModel:
    from iva_jax.train.checkpoint import Checkpointer
    from iva_jax.train.lora import merge_lora
    from iva_jax.train.sft import read_lora_file

    config = ModelConfig.from_yaml(path / MODEL_CONFIG_FILE)
    with Checkpointer(path, async_save=False) as ck:
        params = ck.restore_params(step)
    tok = str(path / TOKENIZER_DIR) if _has_tokenizer(path / TOKENIZER_DIR) else None
    if not _is_lora(params):
        return LoadedModel(config, params, tok, str(path))
    info = read_lora_file(path)
    if info is None:
        raise ValueError(f"{path}: the checkpoint holds only LoRA adapters but has no lora.yaml "
                         "saying how to merge them")
    base = base or info["base"]
    if not base:
        raise ValueError(f"{path}: LoRA adapters need their base model; pass base=... (--base)")
    b = load_model(base)
    if b.params is None:
        raise ValueError(f"LoRA base {base!r} has no weights (a config-only source)")
    _check_shapes(b.params, config, f"LoRA base {base!r} vs {path / MODEL_CONFIG_FILE}")
    base_params = b.params
    if info["base_quant"]:  # QLoRA: the adapters were trained against the quantized base; merge into that
        from iva_jax.models.transformer import Transformer
        from iva_jax.quant import dequantize_params
        from iva_jax.train.sft import quantize_base

        q = quantize_base(Transformer(config), base_params, info["base_quant"], info["base_quant_group_size"])
        base_params = jax.jit(dequantize_params)(q)
    merged = jax.jit(lambda p, a: merge_lora(p, a, info["lora"]))(base_params, params)
    return LoadedModel(config, merged, tok or b.tokenizer, str(path))


def _check_shapes(params: Any, config: ModelConfig, what: str) -> None:
    from iva_jax.models.transformer import Transformer
    from iva_jax.train.checkpoint import shape_differences

    abstract = jax.eval_shape(Transformer(config).init, jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
    diff = shape_differences(params, unbox(abstract["params"]))
    if diff:
        raise ValueError(f"{what}: parameter shapes differ:\n" + "\n".join(diff))


def load_model(source: str | Path, *, step: Optional[int] = None, base: Optional[str] = None,
               dtype: Any = jnp.float32) -> LoadedModel:
    """Resolve a model source (see the module docstring); `step` / `base` apply to orbax directories."""
    src = str(source)
    if src == DEFAULT_MODEL:
        model, params = load_pretrained(src, dtype=dtype)
        return LoadedModel(model.config, params, DEFAULT_MODEL, DEFAULT_MODEL)
    p = Path(src)
    if not p.exists():
        raise FileNotFoundError(f"model source not found: {p} (expected {DEFAULT_MODEL!r}, an HF directory, a .gguf, "
                                "an orbax checkpoint directory or a ModelConfig YAML)")
    if p.suffix in (".yaml", ".yml"):
        return LoadedModel(ModelConfig.from_yaml(p), None, None, str(p.absolute()))
    if is_orbax_dir(p):
        return _load_orbax(p.absolute(), step, base)
    model, params = load_pretrained(p, dtype=dtype)
    tok = str(p.absolute()) if (p.suffix == ".gguf" or _has_tokenizer(p)) else None
    return LoadedModel(model.config, params, tok, str(p.absolute()))


def export_tokenizer(tokenizer: Optional[str], out_dir: str | Path) -> bool:
    """Copy (or, for a GGUF / the embedded model, write) a model source's tokenizer files into `out_dir`."""
    if not tokenizer:
        return False
    out = Path(out_dir)
    src = embedded_model_dir() if tokenizer == DEFAULT_MODEL else Path(tokenizer)
    if src.is_dir() and _has_tokenizer(src):
        out.mkdir(parents=True, exist_ok=True)
        for f in TOKENIZER_FILES:
            if (src / f).exists() and f != "generation_config.json":
                shutil.copy2(src / f, out / f)
        return True
    from torch_bridge.tokenizer import load_tokenizer  # a GGUF: parse it with transformers

    load_tokenizer(tokenizer).save_pretrained(str(out))
    return True


def convert(source: str | Path, ckpt_dir: str | Path, dtype: Any = jnp.float32) -> Path:
    """Write `source` as a params-only orbax checkpoint (step 0) with its model config and tokenizer."""
    from iva_jax.train.checkpoint import save_params

    lm = load_model(source, dtype=dtype)
    if lm.params is None:
        raise ValueError(f"{source}: a ModelConfig YAML has no weights to convert")
    out = Path(ckpt_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    save_params(out, jax.tree_util.tree_map(np.asarray, jax.device_get(lm.params)), model_config=lm.config)
    export_tokenizer(lm.tokenizer, out / TOKENIZER_DIR)
    return out


def main(argv: Optional[Sequence[str]] = None) -> Path:
    p = argparse.ArgumentParser(description="HF directory / GGUF / smollm2-135m -> orbax params checkpoint")
    p.add_argument("source", help=f"HF directory, .gguf file, or {DEFAULT_MODEL!r}")
    p.add_argument("ckpt_dir", help="output orbax checkpoint directory (must be new or empty)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args(argv)
    out = convert(args.source, args.ckpt_dir, dtype=jnp.dtype(args.dtype))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
