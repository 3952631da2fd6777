"""fp8 (e4m3) matmuls with delayed per-tensor scaling, and the device guard.

`Fp8Weight` holds a Linear kernel as float8_e4m3fn with one f32 scale (amax / 448), plus the input's
amax history.  Its matmul quantises the input with the DELAYED scale max(history) / 448 (the scale
learnt from earlier calls, as Transformer Engine does), clipping to the e4m3 range, then computes
dot(x_fp8 * x_scale, w_fp8 * w_scale) with f32 accumulation: on an sm89+ GPU XLA rewrites that
pattern into one cuBLASLt fp8 GEMM.  Until a history exists (no calibration yet) the input is
scaled by its current amax ("current scaling").

`fp8_update(model, params, input_ids)` runs one forward, records every fp8 matmul's input amax,
rolls it into the histories and returns (params, {"fp8_amax_drift": ...}) for telemetry's "quant"
block; drift = max over tensors of |amax_now / max(history) - 1| (0 = the scales still fit; > 0 with
amax above the history = clipping happened).

Guard: fp8 needs an sm89+ GPU (Ada / Hopper / Blackwell); T4 (sm75) and A100 (sm80) are refused with
a message.  On CPU (and other platforms) fp8 is refused unless `allow_emulation=True`: then XLA
emulates it (values rounded to e4m3 exactly, arithmetic in f32: right numerics, no speed), which is
what the CPU tests use.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, List, Optional, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from iva_jax.quant.int_quant import BoxedLeaf
from kernels import dispatch

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0


def fp8_unsupported_reason() -> Optional[str]:
    """Why fp8 matmuls cannot run natively on the default device (None when they can)."""
    info = dispatch.device_info()
    cc = info.compute_capability
    if info.platform == "cuda" and cc is not None:
        if cc >= (8, 9):
            return None
        return (f"fp8 matmuls need an sm89+ GPU (Ada / Hopper); this is sm{cc[0]}{cc[1]} ({info.kind}), "
                "e.g. T4 = sm75 and A100 = sm80 have no fp8 tensor cores: use precision 'int8' or 'int4'")
    return (f"fp8 matmuls need an sm89+ GPU (Ada / Hopper); found {info.platform} ({info.kind}). "
            "Pass allow_emulation=True to emulate fp8 numerics with XLA (tests; no speedup)")


def check_fp8(allow_emulation: bool = False) -> bool:
    """Raise ValueError when fp8 cannot run here; returns True when it will be emulated."""
    why = fp8_unsupported_reason()
    if why is None:
        return False
    info = dispatch.device_info()
    if allow_emulation and info.platform != "cuda":
        return True
    raise ValueError(why)


def _scale_from_amax(amax: jnp.ndarray) -> jnp.ndarray:
    return jnp.where(amax > 0, amax / E4M3_MAX, 1.0).astype(jnp.float32)


@flax.struct.dataclass
class Fp8Weight(BoxedLeaf):
    """Linear kernel in e4m3 with a per-tensor scale; the input uses delayed scaling from `x_amax_history`."""

    w: jnp.ndarray  # float8_e4m3fn [..., in, out]
    w_scale: jnp.ndarray  # f32 [...]
    x_amax_history: jnp.ndarray  # f32 [..., H] (zeros = not calibrated yet)
    emulated: bool = flax.struct.field(pytree_node=False, default=False)

    @classmethod
    def from_float(cls, w: jnp.ndarray, *, history: int = 16, emulated: bool = False) -> "Fp8Weight":
        if history < 1:
            raise ValueError(f"fp8 amax history length must be >= 1, got {history}")
        w32 = w.astype(jnp.float32)
        scale = _scale_from_amax(jnp.max(jnp.abs(w32), axis=(-2, -1)))
        wq = jnp.clip(w32 / scale[..., None, None], -E4M3_MAX, E4M3_MAX).astype(E4M3)
        return cls(w=wq, w_scale=scale, x_amax_history=jnp.zeros((*w.shape[:-2], history), jnp.float32),
                   emulated=emulated)

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.w.shape)

    @property
    def ndim(self) -> int:
        return self.w.ndim

    def nbytes(self) -> int:
        return int(self.w.size + 4 * (self.w_scale.size + self.x_amax_history.size))

    def dequantize(self, dtype: Any = jnp.float32) -> jnp.ndarray:
        return (self.w.astype(jnp.float32) * self.w_scale[..., None, None]).astype(dtype)

    def x_scale(self, x: Optional[jnp.ndarray] = None) -> jnp.ndarray:
        """The input scale: delayed (max of history) / 448, or the current amax of `x` before calibration."""
        hist = jnp.max(self.x_amax_history, axis=-1)
        if x is None:
            return _scale_from_amax(hist)
        now = jnp.max(jnp.abs(x.astype(jnp.float32)))
        return _scale_from_amax(jnp.where(hist > 0, hist, now))

    def matmul(self, x: jnp.ndarray, dtype: Any) -> jnp.ndarray:
        """x [..., in] @ W in `dtype`: x quantised to e4m3 with the delayed scale, f32 accumulation."""
        if self.w.ndim != 2:
            raise ValueError(f"Fp8Weight.matmul needs one layer's [in, out] weight, got stacked {self.w.shape}")
        if not self.emulated:
            check_fp8(False)
        xs = self.x_scale(x)
        xq = jnp.clip(x.astype(jnp.float32) / xs, -E4M3_MAX, E4M3_MAX).astype(E4M3)
        cdt = jnp.float32 if self.emulated else dtype
        a = xq.astype(cdt) * xs.astype(cdt)
        b = self.w.astype(cdt) * self.w_scale.astype(cdt)
        prec = jax.lax.Precision.HIGHEST if cdt == jnp.float32 else None
        y = jnp.dot(a, b, preferred_element_type=jnp.float32, precision=prec)
        return y.astype(dtype)


# ------------------------------------------------------------------------------------------------
# delayed-scaling update (amax capture through a probe leaf)
# ------------------------------------------------------------------------------------------------
@flax.struct.dataclass
class _AmaxProbe:
    """Stands in for an Fp8Weight during `fp8_update`: records the input amax, then multiplies as usual."""

    inner: Fp8Weight
    layer_id: jnp.ndarray  # [...] (sliced to a scalar inside the layer scan)
    key: str = flax.struct.field(pytree_node=False, default="")

    def matmul(self, x: jnp.ndarray, dtype: Any) -> jnp.ndarray:
        amax = jnp.max(jnp.abs(x.astype(jnp.float32)))
        jax.debug.callback(_record, self.key, self.layer_id, amax)
        return self.inner.matmul(x, dtype)


_RECORDS: Dict[str, Dict[int, float]] = {}


def _record(key, layer_id, amax) -> None:
    slot = _RECORDS.setdefault(str(key), {})
    i = int(np.asarray(layer_id))
    slot[i] = max(slot.get(i, 0.0), float(amax))


def _is_fp8(x) -> bool:
    return isinstance(x, Fp8Weight)


def _paths(params) -> List[Tuple[str, Fp8Weight]]:
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_fp8)[0]
    return [(jax.tree_util.keystr(p), leaf) for p, leaf in flat if _is_fp8(leaf)]


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, input_ids, attention_mask):
    return model.apply({"params": params}, input_ids, attention_mask)


def fp8_update(model, params, input_ids, attention_mask=None) -> Tuple[Any, Dict[str, float]]:
    """One forward on `input_ids`: roll each fp8 input's amax into its history (delayed scaling).

    Returns (new params, {"fp8_amax_drift": float, "fp8_tensors": int}); see the module docstring.
    """
    found = _paths(params)
    if not found:
        raise ValueError("fp8_update: params hold no Fp8Weight (quantize with precision='fp8' first)")

    def probe(path, leaf):
        if not _is_fp8(leaf):
            return leaf
        lead = leaf.w.shape[:-2]
        ids = jnp.arange(int(np.prod(lead)), dtype=jnp.int32).reshape(lead)
        return _AmaxProbe(inner=leaf, layer_id=ids, key=jax.tree_util.keystr(path))

    probed = jax.tree_util.tree_map_with_path(probe, params, is_leaf=_is_fp8)
    _RECORDS.clear()
    out = _forward(model, probed, jnp.asarray(input_ids), attention_mask)
    jax.block_until_ready(out)
    jax.effects_barrier()
    drift = 0.0

    def update(path, leaf):
        nonlocal drift
        if not _is_fp8(leaf):
            return leaf
        key = jax.tree_util.keystr(path)
        rec = _RECORDS.get(key, {})
        lead = leaf.w.shape[:-2]
        now = np.zeros(int(np.prod(lead)), np.float32)
        for i, a in rec.items():
            now[i] = a
        now = now.reshape(lead)
        hist = np.asarray(leaf.x_amax_history)
        hmax = hist.max(axis=-1)
        ok = hmax > 0
        if ok.any():
            drift = max(drift, float(np.max(np.abs(now[ok] / hmax[ok] - 1.0))))
        new_hist = np.concatenate([now[..., None], hist[..., :-1]], axis=-1)
        return leaf.replace(x_amax_history=jnp.asarray(new_hist))

    new = jax.tree_util.tree_map_with_path(update, params, is_leaf=_is_fp8)
    _RECORDS.clear()
    return new, {"fp8_amax_drift": drift, "fp8_tensors": len(found)}
