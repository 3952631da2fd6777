"""The HF <-> iva-jax parameter table for the dense decoder families.

Each row: HF tensor name pattern -> (iva-jax param path, transform).  `{i}` is the layer index;
per-layer tensors are stacked on a leading axis when the model scans its layers.  Transforms:
`T` transposes a torch Linear weight [out, in] into a Flax kernel [in, out]; `I` keeps the tensor.
"""

from __future__ import annotations

import re
import warnings
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np

from iva_jax.config import ModelConfig

TABLE: Tuple[Tuple[str, str, str], ...] = (
    ("model.embed_tokens.weight", "embed_tokens/embedding", "I"),
    ("model.norm.weight", "norm/scale", "I"),
    ("lm_head.weight", "lm_head/kernel", "T"),
    ("model.layers.{i}.input_layernorm.weight", "input_layernorm/scale", "I"),
    ("model.layers.{i}.post_attention_layernorm.weight", "post_attention_layernorm/scale", "I"),
    ("model.layers.{i}.self_attn.q_proj.weight", "self_attn/q_proj/kernel", "T"),
    ("model.layers.{i}.self_attn.k_proj.weight", "self_attn/k_proj/kernel", "T"),
    ("model.layers.{i}.self_attn.v_proj.weight", "self_attn/v_proj/kernel", "T"),
    ("model.layers.{i}.self_attn.o_proj.weight", "self_attn/o_proj/kernel", "T"),
    ("model.layers.{i}.self_attn.q_proj.bias", "self_attn/q_proj/bias", "I"),
    ("model.layers.{i}.self_attn.k_proj.bias", "self_attn/k_proj/bias", "I"),
    ("model.layers.{i}.self_attn.v_proj.bias", "self_attn/v_proj/bias", "I"),
    ("model.layers.{i}.self_attn.o_proj.bias", "self_attn/o_proj/bias", "I"),
    ("model.layers.{i}.self_attn.q_norm.weight", "self_attn/q_norm/scale", "I"),
    ("model.layers.{i}.self_attn.k_norm.weight", "self_attn/k_norm/scale", "I"),
    ("model.layers.{i}.mlp.gate_proj.weight", "mlp/gate_proj/kernel", "T"),
    ("model.layers.{i}.mlp.up_proj.weight", "mlp/up_proj/kernel", "T"),
    ("model.layers.{i}.mlp.down_proj.weight", "mlp/down_proj/kernel", "T"),
    ("model.layers.{i}.mlp.gate_proj.bias", "mlp/gate_proj/bias", "I"),
    ("model.layers.{i}.mlp.up_proj.bias", "mlp/up_proj/bias", "I"),
    ("model.layers.{i}.mlp.down_proj.bias", "mlp/down_proj/bias", "I"),
)

# Buffers some checkpoints carry that hold no parameters.
IGNORABLE = (re.compile(r".*rotary_emb\.inv_freq$"),)


class UnusedWeightsWarning(UserWarning):
    """Tensors in a checkpoint that the model does not use."""


def _compile() -> List[Tuple[re.Pattern, str, str, bool]]:
    rows = []
    for hf, ours, tr in TABLE:
        per_layer = "{i}" in hf
        pat = re.escape(hf).replace(re.escape("{i}"), r"(\d+)")
        rows.append((re.compile(f"^{pat}$"), ours, tr, per_layer))
    return rows


_ROWS = _compile()


def _set(tree: dict, path: str, value) -> None:
    node = tree
    parts = path.split("/")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def _get(tree: Mapping, path: str):
    node = tree
    for p in path.split("/"):
        node = node[p]
    return node


def _flatten(tree: Mapping, prefix: str = "") -> Dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def hf_to_params(names: Iterable[str], get: Callable[[str], np.ndarray], config: ModelConfig,
                 expected: Mapping, scan_layers: bool = True, dtype=np.float32) -> dict:
    """Build the param tree from HF-named tensors (`get(name)` returns an array).

    `expected` is the model's abstract param tree (shapes); missing or misshaped tensors raise
    ValueError naming them; unused tensors raise an `UnusedWeightsWarning` listing them.
    """
    L = config.num_hidden_layers
    flat_expected = {k: tuple(v.shape) for k, v in _flatten(expected).items()}
    layer_parts: Dict[str, List[Optional[np.ndarray]]] = {}
    params: dict = {}
    unused, problems = [], []
    for name in names:
        for pat, ours, tr, per_layer in _ROWS:
            m = pat.match(name)
            if not m:
                continue
            arr = np.asarray(get(name))
            arr = arr.T if tr == "T" else arr
            if per_layer:
                i = int(m.group(1))
                if i >= L:
                    unused.append(name)
                    break
                if scan_layers:
                    key = "layers/" + ours
                    want = flat_expected.get(key)
                    if want is None:
                        unused.append(name)
                    elif tuple(arr.shape) != want[1:]:
                        problems.append(f"{name}: shape {tuple(arr.shape)} (as {key}[{i}]) but the config "
                                        f"expects {want[1:]}")
                    else:
                        layer_parts.setdefault(key, [None] * L)[i] = arr
                else:
                    _place(params, f"layers_{i}/" + ours, arr, flat_expected, name, problems, unused, dtype)
            else:
                _place(params, ours, arr, flat_expected, name, problems, unused, dtype)
            break
        else:
            if not any(p.match(name) for p in IGNORABLE):
                unused.append(name)
    for ours, parts in layer_parts.items():
        missing = [i for i, a in enumerate(parts) if a is None]
        if missing:
            problems.append(f"{ours}: layers {missing} missing")
            continue
        _place(params, ours, np.stack(parts), flat_expected, ours, problems, unused, dtype)
    have = set(_flatten(params))
    missing = sorted(set(flat_expected) - have)
    if missing:
        problems.append(f"missing tensors for params {missing}")
    if problems:
        raise ValueError("checkpoint does not match the model config:\n  " + "\n  ".join(problems))
    if unused:
        warnings.warn(f"{len(unused)} checkpoint tensors are not used by the model: {unused[:20]}"
                      f"{' ...' if len(unused) > 20 else ''}", UnusedWeightsWarning, stacklevel=3)
    return params


def _place(params, path, arr, flat_expected, name, problems, unused, dtype) -> None:
    if path not in flat_expected:
        unused.append(name)
        return
    if tuple(arr.shape) != flat_expected[path]:
        problems.append(f"{name}: shape {tuple(arr.shape)} (as {path}) but the config expects {flat_expected[path]}")
        return
    _set(params, path, arr.astype(dtype))


def params_to_hf(params: Mapping, config: ModelConfig) -> Dict[str, np.ndarray]:
    """HF-named tensors (torch layout) from an iva-jax param tree (scanned or not)."""
    flat = _flatten(params)
    out: Dict[str, np.ndarray] = {}
    used = set()
    for hf, ours, tr in TABLE:
        if "{i}" in hf:
            for i in range(config.num_hidden_layers):
                key = f"layers/{ours}" if f"layers/{ours}" in flat else f"layers_{i}/{ours}"
                if key not in flat:
                    break
                used.add(key)
                arr = np.asarray(flat[key])
                arr = arr[i] if key.startswith("layers/") else arr
                out[hf.replace("{i}", str(i))] = np.ascontiguousarray(arr.T if tr == "T" else arr)
        elif ours in flat:
            used.add(ours)
            arr = np.asarray(flat[ours])
            out[hf] = np.ascontiguousarray(arr.T if tr == "T" else arr)
    leftover = sorted(set(flat) - used)
    if leftover:
        raise ValueError(f"params without an HF mapping: {leftover}")
    return out
