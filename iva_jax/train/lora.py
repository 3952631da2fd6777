"""LoRA adapters on any Dense kernel, selected by a regex on the parameter path; the base stays frozen.

Adapters live in their own tree mirroring the base: for a kernel at `.../q_proj/kernel` of shape
`[..., in, out]` (leading dims are stacked layers from `nn.scan`) the adapter holds
`.../q_proj/lora_a [..., in, r]` (normal, std 1/sqrt(in)) and `.../q_proj/lora_b [..., r, out]` (zeros), so
training starts exactly at the base model.  The adapted kernel is

    W' = W + (alpha / r) * A @ B

formed functionally at apply time (`lora_apply`): the train state's params are the adapters and its
`frozen` field is the base (see `TrainState`), so the optimizer only ever sees adapter params.  The
sum is formed in float32 and cast to the base kernel's dtype; under bf16 compute a small delta thus
enters the forward pass with bf16 granularity, exactly as bf16 compute over f32 master weights does
in full fine-tuning.  `merge_lora` gives the merged tree for export (e.g. to the HF bridge).

QLoRA hook: `dequantize(path, leaf) -> float kernel` turns a quantized base kernel into a dense one
before the adapter is added (identity by default); quantized storage itself is iva_jax.quant's job.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Dict, List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import meta, unfreeze

from iva_jax.config import ConfigBase, check, check_positive

Dequantize = Callable[[Tuple[str, ...], Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class LoRAConfig(ConfigBase):
    """rank r, alpha (scale = alpha / r), and the regex selecting Dense kernels by path ("a/b/q_proj/kernel")."""

    rank: int = 8
    alpha: float = 16.0
    targets: str = "q_proj|v_proj"

    def validate(self) -> None:
        check_positive(self, "rank", "alpha")
        check(isinstance(self.rank, int), "rank", self.rank, "must be an integer")
        try:
            re.compile(self.targets)
        except re.error as e:
            check(False, "targets", self.targets, f"is not a valid regex: {e}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _flat(params: Any) -> Dict[Tuple[str, ...], Any]:
    return traverse_util.flatten_dict(unfreeze(params))


def lora_targets(params: Any, cfg: LoRAConfig) -> List[Tuple[str, ...]]:
    """Paths of the `kernel` leaves (ndim >= 2) whose "/"-joined path matches `cfg.targets`."""
    pat = re.compile(cfg.targets)
    flat = _flat(params)
    kernels = [p for p, v in flat.items() if p[-1] == "kernel" and len(np.shape(meta.unbox(v))) >= 2]
    hits = [p for p in kernels if pat.search("/".join(p))]
    if not hits:
        raise ValueError(f"LoRA targets {cfg.targets!r} match no Dense kernel; kernels are "
                         f"{['/'.join(p) for p in kernels][:12]}")
    return hits


def init_lora(params: Any, cfg: LoRAConfig, rng: jax.Array) -> Dict[str, Any]:
    """Adapter tree for `params` (arrays, ShapeDtypeStructs or logically boxed; boxes are carried over)."""
    out: Dict[Tuple[str, ...], Any] = {}
    flat = _flat(params)
    for i, path in enumerate(lora_targets(params, cfg)):
        leaf = flat[path]
        shape = np.shape(meta.unbox(leaf))
        lead, d_in, d_out = shape[:-2], shape[-2], shape[-1]
        a = jax.random.normal(jax.random.fold_in(rng, i), lead + (d_in, cfg.rank), jnp.float32) / np.sqrt(d_in)
        b = jnp.zeros(lead + (cfg.rank, d_out), jnp.float32)
        names = getattr(leaf, "names", None)
        if names is not None:
            a = nn.LogicallyPartitioned(a, tuple(names[:-1]) + (None,))
            b = nn.LogicallyPartitioned(b, tuple(names[:-2]) + (None, names[-1]))
        out[path[:-1] + ("lora_a",)] = a
        out[path[:-1] + ("lora_b",)] = b
    return traverse_util.unflatten_dict(out)


def merge_lora(base: Any, adapters: Any, cfg: LoRAConfig, dequantize: Optional[Dequantize] = None) -> Any:
    """Base params with every adapted kernel replaced by W + scale * A @ B (in the kernel's dtype)."""
    flat = _flat(base)
    ad = _flat(adapters)
    mods = sorted({p[:-1] for p in ad})
    for mod in mods:
        kpath = mod + ("kernel",)
        if kpath not in flat or mod + ("lora_a",) not in ad or mod + ("lora_b",) not in ad:
            raise ValueError(f"adapter {'/'.join(mod)} has no base kernel or lacks lora_a/lora_b")
        w = flat[kpath] if dequantize is None else dequantize(kpath, flat[kpath])
        a, b = ad[mod + ("lora_a",)], ad[mod + ("lora_b",)]
        if a.shape[:-2] != w.shape[:-2] or a.shape[-2] != w.shape[-2] or b.shape[-1] != w.shape[-1]:
            raise ValueError(f"adapter {'/'.join(mod)}: lora_a {a.shape} / lora_b {b.shape} do not fit kernel {w.shape}")
        delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
        flat[kpath] = (w.astype(jnp.float32) + cfg.scale * delta).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)


def lora_apply(apply_fn: Callable, cfg: LoRAConfig, dequantize: Optional[Dequantize] = None) -> Callable:
    """Wrap `apply_fn`: called with `{"params": adapters, "frozen": base}` it runs the adapted model."""

    def apply(variables, *args, **kwargs):
        if "frozen" not in variables:
            raise ValueError("lora_apply expects variables {'params': adapters, 'frozen': base params}")
        merged = merge_lora(variables["frozen"], variables["params"], cfg, dequantize)
        rest = {k: v for k, v in variables.items() if k not in ("params", "frozen")}
        return apply_fn({"params": merged, **rest}, *args, **kwargs)

    return apply


def lora_param_count(adapters: Any) -> int:
    """Number of trainable adapter parameters."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(meta.unbox(adapters))))
