"""Quantized inference: int8 / int4 weight-only (group-wise), fp8 with delayed scaling, checkpoints.

    model, qparams = iva_jax.quant.quantize(model, params, "int4", group_size=64)
    logits = model.apply({"params": qparams}, ids)           # as before
    ids = iva_jax.inference.generate(model, qparams, prompt, 64)
    save_quantized(model, qparams, "out/"); model, qparams = load_quantized("out/")

Quantized kernels are pytree leaves (`QuantizedWeight`, `Fp8Weight`) standing where a `Linear`'s
`kernel` array stood, stacked along the scanned layer axis like any parameter; `linear_apply` calls
their `matmul`.  Embeddings, norms, biases and (by default) lm_head stay in float.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from iva_jax.quant.config import DEFAULT_MODULES, GROUP_SIZES, PRECISIONS, QuantConfig  # noqa: F401
from iva_jax.quant.fp8 import Fp8Weight, check_fp8, fp8_unsupported_reason, fp8_update  # noqa: F401
from iva_jax.quant.int_quant import QuantizedWeight, is_quantized, quantize_groupwise  # noqa: F401
from kernels import quant_matmul as qmm

FORMAT = "iva_jax.quant/1"
_LEAVES = (QuantizedWeight, Fp8Weight)


def _is_qleaf(x) -> bool:
    return isinstance(x, _LEAVES)


def _walk(tree: Any, fn, path: Tuple[str, ...] = ()):
    """Rebuild a nested dict, replacing each {'kernel': w} under a chosen module name by fn(path, w)."""
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            if k == "kernel" and not isinstance(v, dict):
                out[k] = fn(path + (k,), v)
            else:
                out[k] = _walk(v, fn, path + (k,))
        return out
    return tree


def quantize(model, params, precision: str, group_size: int = 128, *, symmetric: Optional[bool] = None,
             modules: Sequence[str] = DEFAULT_MODULES, scale_dtype: str = "float16", impl: str = "auto",
             fp8_history: int = 16, allow_emulation: bool = False, calibration_ids: Any = None):
    """(model, params) with every `kernel` of the named Linear modules quantized to `precision`.

    "int8" / "int4": weight-only, group-wise scales over `group_size` input rows (int8 symmetric,
    int4 asymmetric unless `symmetric` says otherwise).  "fp8": e4m3 with delayed scaling; refused
    below sm89 (and on CPU without `allow_emulation`); `calibration_ids` [B, T] fills the amax
    history with one forward.  "bf16" returns the inputs unchanged.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    if precision == "bf16":
        return model, params
    if precision in ("int8", "int4") and group_size not in GROUP_SIZES:
        raise ValueError(f"group_size {group_size!r} not in {GROUP_SIZES}")
    emulated = check_fp8(allow_emulation) if precision == "fp8" else False
    wanted = set(modules)
    count = [0]

    def fn(path, w):
        if len(path) < 2 or path[-2] not in wanted:
            return w
        if _is_qleaf(w):
            raise ValueError(f"{'/'.join(path)} is already quantized")
        w = jnp.asarray(w)
        if w.ndim < 2:
            raise ValueError(f"{'/'.join(path)}: kernel of shape {w.shape} is not a matrix")
        count[0] += 1
        if precision == "fp8":
            return Fp8Weight.from_float(w, history=fp8_history, emulated=emulated)
        if w.shape[-2] % group_size:
            raise ValueError(f"{'/'.join(path)}: group_size {group_size} does not divide in_features "
                             f"{w.shape[-2]} (kernel {w.shape}); try one of "
                             f"{[g for g in GROUP_SIZES if w.shape[-2] % g == 0] or 'none'}")
        return QuantizedWeight.from_float(w, bits=8 if precision == "int8" else 4, group_size=group_size,
                                          symmetric=symmetric, scale_dtype=scale_dtype, impl=impl)

    qparams = _walk(params, fn)
    if count[0] == 0:
        raise ValueError(f"no kernel of the modules {sorted(wanted)} found in params")
    if precision == "fp8" and calibration_ids is not None:
        qparams, _ = fp8_update(model, qparams, calibration_ids)
    return model, qparams


def quantize_from_config(model, params, config: QuantConfig, calibration_ids: Any = None):
    """`quantize` with the settings of a `QuantConfig`."""
    return quantize(model, params, config.precision, config.group_size, symmetric=config.symmetric,
                    modules=config.modules, scale_dtype=config.scale_dtype, impl=config.kernel_impl,
                    fp8_history=config.fp8_amax_history, allow_emulation=config.allow_fp8_emulation,
                    calibration_ids=calibration_ids)


def dequantize_params(params):
    """Float params (f32) from quantized ones (to compare, or to export)."""
    return jax.tree_util.tree_map(lambda x: x.dequantize(jnp.float32) if _is_qleaf(x) else x, params,
                                  is_leaf=_is_qleaf)


def params_nbytes(params) -> int:
    """Bytes held by the params (quantized leaves at their packed size)."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(params, is_leaf=_is_qleaf):
        total += leaf.nbytes() if _is_qleaf(leaf) else int(leaf.size * leaf.dtype.itemsize)
    return total


# ------------------------------------------------------------------------------------------------
# checkpoints: model.safetensors + iva_quant.json (model config, leaf formats)
# ------------------------------------------------------------------------------------------------
_VIEW = {"bfloat16": np.uint16, "float8_e4m3fn": np.uint8}


def _to_np(a) -> Tuple[np.ndarray, str]:
    a = np.asarray(jax.device_get(a))
    name = a.dtype.name
    return (a.view(_VIEW[name]) if name in _VIEW else a), name


def _from_np(a: np.ndarray, name: str) -> np.ndarray:
    return a.view(getattr(ml_dtypes, name)) if name in _VIEW else a


def save_quantized(model, params, out_dir: str | Path) -> Path:
    """Write params (quantized or not) and the model config to `out_dir`; `load_quantized` reads them."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors, dtypes, leaves = {}, {}, {}
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_qleaf)[0]
    for path, leaf in flat:
        key = "/".join(str(getattr(p, "key", p)) for p in path)
        if isinstance(leaf, QuantizedWeight):
            leaves[key] = {"type": "int", "bits": leaf.bits, "group_size": leaf.group_size, "impl": leaf.impl}
            parts = {"qweight": leaf.qweight, "scale": leaf.scale, "zero": leaf.zero}
        elif isinstance(leaf, Fp8Weight):
            leaves[key] = {"type": "fp8"}
            parts = {"w": leaf.w, "w_scale": leaf.w_scale, "x_amax_history": leaf.x_amax_history}
        else:
            parts = {"": leaf}
        for suffix, arr in parts.items():
            if arr is None:
                continue
            name = key + ("." + suffix if suffix else "")
            tensors[name], dtypes[name] = _to_np(arr)
    meta = {"format": FORMAT, "model_config": model.config.to_dict(), "leaves": leaves, "dtypes": dtypes}
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": FORMAT})
    tmp.replace(out / "model.safetensors")
    (out / "iva_quant.json").write_text(json.dumps(meta, indent=1))
    return out


def load_quantized(path: str | Path, *, allow_emulation: bool = False):
    """(model, params) saved by `save_quantized`; fp8 checkpoints pass the same device guard as `quantize`."""
    from safetensors.numpy import load_file

    from iva_jax.config import ModelConfig
    from iva_jax.models.transformer import Transformer

    p = Path(path)
    meta_path, st_path = p / "iva_quant.json", p / "model.safetensors"
    if not meta_path.exists() or not st_path.exists():
        raise ValueError(f"{p} is not a quantized checkpoint (needs iva_quant.json and model.safetensors)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r} != {FORMAT!r}")
    raw = load_file(str(st_path))
    arrays = {k: jnp.asarray(_from_np(v, meta["dtypes"][k])) for k, v in raw.items()}
    emulated = None
    params: dict = {}

    def put(key, value):
        node = params
        *parents, last = key.split("/")
        for q in parents:
            node = node.setdefault(q, {})
        node[last] = value

    for key, spec in meta["leaves"].items():
        if spec["type"] == "int":
            qweight = arrays.pop(key + ".qweight")
            if spec["bits"] == 4 and qweight.dtype == jnp.uint8:  # written before int4 codes became int32 words
                qweight = qmm.int4_words(qweight)
            put(key, QuantizedWeight(qweight=qweight, scale=arrays.pop(key + ".scale"),
                                     zero=arrays.pop(key + ".zero", None), bits=spec["bits"],
                                     group_size=spec["group_size"], impl=spec.get("impl", "auto")))
        else:
            if emulated is None:
                emulated = check_fp8(allow_emulation)
            put(key, Fp8Weight(w=arrays.pop(key + ".w"), w_scale=arrays.pop(key + ".w_scale"),
                               x_amax_history=arrays.pop(key + ".x_amax_history"), emulated=emulated))
    for key, arr in arrays.items():
        put(key, arr)
    return Transformer(ModelConfig.from_dict(meta["model_config"])), params
