"""The HF <-> iva-jax parameter table for the decoder families (dense and MoE).

Each row: HF tensor name pattern -> (iva-jax param path, transform).  `{i}` is the layer index;
per-layer paths are relative to the layer, whose place in the param tree comes from
`iva_jax.models.transformer.layer_param_location` (stacked on a leading axis when the model scans its
layers, per layer or per periodic block).  Transforms: `T` transposes a torch Linear weight [out, in]
into a Flax kernel [in, out]; `I` keeps the tensor.

MoE layers (Mixtral, Qwen2-MoE, Qwen3-MoE) go through `iva_jax.moe.hf`: HF's per-expert tensors
(`model.layers.{i}.block_sparse_moe.*` for Mixtral, `model.layers.{i}.mlp.*` for the Qwen families) are
stacked into `mlp/experts/{gate,up,down}_proj [E, ...]` on load and split per expert on export; the router
`gate`, `shared_expert` and `shared_expert_gate` map one to one.
"""

from __future__ import annotations

import re
import warnings
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import numpy as np

from iva_jax.config import ModelConfig
from iva_jax.models.transformer import layer_param_location
from iva_jax.moe.hf import moe_block_from_hf, moe_block_to_hf

MOE_PREFIX = {"mixtral": "block_sparse_moe", "qwen2_moe": "mlp", "qwen3_moe": "mlp"}  # HF module of the MoE FFN

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


class _LazyTensors(Mapping):
    """A read-only mapping over checkpoint names that loads a tensor only when it is looked up."""

    def __init__(self, names: Iterable[str], get: Callable[[str], np.ndarray]):
        self._names = set(names)
        self._get = get

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._names:
            raise KeyError(key)
        return self._get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _moe_prefix(config: ModelConfig) -> str:
    if config.model_type not in MOE_PREFIX:
        raise ValueError(f"MoE layers need an MoE model_type {sorted(MOE_PREFIX)}, got {config.model_type!r}")
    return MOE_PREFIX[config.model_type]


def hf_to_params(names: Iterable[str], get: Callable[[str], np.ndarray], config: ModelConfig,
                 expected: Mapping, scan_layers: Optional[bool] = None, dtype=np.float32) -> dict:
    """Build the param tree from HF-named tensors (`get(name)` returns an array).

    `expected` is the model's abstract param tree (shapes); the layer layout follows the config
    (`scan_layers` is accepted for compatibility and must agree with it).  Missing or misshaped tensors
    raise ValueError naming them; unused tensors raise an `UnusedWeightsWarning` listing them.
    """
    if scan_layers is not None and scan_layers != config.scan_layers:
        raise ValueError(f"scan_layers={scan_layers} disagrees with config.scan_layers={config.scan_layers}")
    names = list(names)
    L = config.num_hidden_layers
    flat_expected = {k: tuple(v.shape) for k, v in _flatten(expected).items()}
    per_layer: List[Dict[str, Tuple[str, np.ndarray]]] = [{} for _ in range(L)]  # rel path -> (hf name, array)
    params: dict = {}
    unused, problems = [], []
    consumed: set = set()
    ffns = config.layer_ffns()
    if "moe" in ffns:
        lazy = _LazyTensors(names, get)
        prefix = _moe_prefix(config)
        for i in range(L):
            if ffns[i] != "moe":
                continue
            hf_prefix = f"model.layers.{i}.{prefix}"
            try:
                sub, used = moe_block_from_hf(lazy, hf_prefix, config.model_type, config.moe.num_experts)
            except ValueError as e:
                problems.append(str(e))
                continue
            consumed |= used
            for rel, arr in _flatten(sub, "mlp/").items():
                per_layer[i][rel] = (f"{hf_prefix}.{rel[4:].replace('/', '.')}", np.asarray(arr))
    for name in names:
        if name in consumed:
            continue
        for pat, ours, tr, is_layer in _ROWS:
            m = pat.match(name)
            if not m:
                continue
            arr = np.asarray(get(name))
            arr = arr.T if tr == "T" else arr
            if is_layer:
                i = int(m.group(1))
                if i >= L:
                    unused.append(name)
                else:
                    per_layer[i][ours] = (name, arr)
            else:
                _place(params, ours, arr, flat_expected, name, problems, unused, dtype)
            break
        else:
            if not any(p.match(name) for p in IGNORABLE):
                unused.append(name)
    stacks: Dict[str, List[Optional[np.ndarray]]] = {}
    stack_prefix: Dict[str, str] = {}
    for i, parts in enumerate(per_layer):
        prefix, idx = layer_param_location(config, i)
        for rel, (name, arr) in parts.items():
            key = f"{prefix}/{rel}"
            if idx is None:
                _place(params, key, arr, flat_expected, name, problems, unused, dtype)
                continue
            want = flat_expected.get(key)
            if want is None:
                unused.append(name)
            elif tuple(arr.shape) != want[1:]:
                problems.append(f"{name}: shape {tuple(arr.shape)} (as {key}[{idx}]) but the config expects {want[1:]}")
            else:
                stacks.setdefault(key, [None] * want[0])[idx] = arr
                stack_prefix[key] = prefix
    for key, parts in stacks.items():
        if any(a is None for a in parts):
            locs = [(i, layer_param_location(config, i)) for i in range(L)]
            missing = [i for i, (p, idx) in locs if p == stack_prefix[key] and parts[idx] is None]
            problems.append(f"{key}: layers {missing} missing")
            continue
        _place(params, key, np.stack(parts), flat_expected, key, problems, unused, dtype)
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
    """HF-named tensors (torch layout) from an iva-jax param tree (any layer layout; MoE experts split)."""
    ssm = sorted(set(config.layer_mixers()) - {"attention"})
    if ssm:
        raise ValueError(f"SSM mixer layers {ssm} have no Hugging Face family to export to")
    flat = _flatten(params)
    out: Dict[str, np.ndarray] = {}
    used = set()
    for hf, ours, tr in TABLE:
        if "{i}" not in hf and ours in flat:
            used.add(ours)
            arr = np.asarray(flat[ours])
            out[hf] = np.ascontiguousarray(arr.T if tr == "T" else arr)
    layer_rows = [(hf, ours, tr) for hf, ours, tr in TABLE if "{i}" in hf]
    ffns = config.layer_ffns()
    for i in range(config.num_hidden_layers):
        prefix, idx = layer_param_location(config, i)
        keys = [k for k in flat if k.startswith(prefix + "/")]
        layer = {k[len(prefix) + 1:]: (np.asarray(flat[k]) if idx is None else np.asarray(flat[k])[idx]) for k in keys}
        done = set()
        for hf, ours, tr in layer_rows:
            if ours in layer and not (ffns[i] == "moe" and ours.startswith("mlp/")):
                arr = layer[ours]
                out[hf.replace("{i}", str(i))] = np.ascontiguousarray(arr.T if tr == "T" else arr)
                done.add(ours)
        if ffns[i] == "moe":
            sub: dict = {}
            for rel, arr in layer.items():
                if rel.startswith("mlp/"):
                    _set(sub, rel[4:], arr)
                    done.add(rel)
            hf_prefix = f"model.layers.{i}.{_moe_prefix(config)}"
            moe_tensors = moe_block_to_hf(sub, hf_prefix, config.model_type)
            out.update({k: np.ascontiguousarray(v) for k, v in moe_tensors.items()})
        used.update(f"{prefix}/{rel}" for rel in done)
    leftover = sorted(set(flat) - used)
    if leftover:
        raise ValueError(f"params without an HF mapping: {leftover}")
    return out
