"""int8 / int4 weight-only quantization with group-wise scales, and the weight leaf that multiplies itself.

Scheme (per group of `group_size` consecutive input rows of a kernel [in, out], per output column):
  * symmetric (default for int8):   s = amax / qmax (qmax 127 or 7), q = round(w / s) in [-qmax, qmax],
                                    w ~= q * s.
  * asymmetric (default for int4):  z = min(w), s = (max(w) - z) / (2^bits - 1), u = round((w - z) / s)
                                    in [0, 2^bits - 1], w ~= u * s + z  (z is a float offset, not an
                                    integer zero point, so the kernel adds z * sum(x) once per group).
Scales / offsets are stored in float16 (rounded so that |w - w_hat| <= s / 2 still holds for every
element); int4 codes are packed two per byte within each group, four bytes (columns) per int32 word
(see `kernels.quant_matmul`).
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Tuple

import flax.struct
import jax
import jax.numpy as jnp
from flax.core import meta

from kernels import quant_matmul as qmm

SCALE_DTYPES = ("float16", "float32")


def _round_away(x32: jnp.ndarray, dtype: Any, up: bool) -> jnp.ndarray:
    """x rounded to `dtype`, nudged one ulp so that the stored value is >= x (up) or <= x (down)."""
    y = x32.astype(dtype)
    yf = y.astype(jnp.float32)
    bad = (yf < x32) if up else (yf > x32)
    return jnp.where(bad, jnp.nextafter(y, jnp.asarray(jnp.inf if up else -jnp.inf, dtype)), y)


def quantize_groupwise(w: jnp.ndarray, *, bits: int, group_size: int, symmetric: bool,
                       scale_dtype: str = "float16") -> Tuple[jnp.ndarray, jnp.ndarray, Optional[jnp.ndarray]]:
    """w [..., K, N] float -> (codes, scale [..., K/G, N], zero or None) in the `kernels.quant_matmul` format."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype {scale_dtype!r} not in {SCALE_DTYPES}")
    *lead, k, n = w.shape
    if not isinstance(group_size, int) or group_size < 2 or group_size % 2 or k % group_size:
        raise ValueError(f"group_size {group_size!r} must be an even divisor of in_features {k} (weight {w.shape})")
    codes, s, zero = _quantize_jit(w, bits=bits, group_size=group_size, symmetric=bool(symmetric),
                                   scale_dtype=scale_dtype)
    if not bool(jnp.all(jnp.isfinite(s.astype(jnp.float32)))):
        raise ValueError(f"weight {w.shape}: a group scale overflows {scale_dtype}; use scale_dtype='float32'")
    return codes, s, zero


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "symmetric", "scale_dtype"))
def _quantize_jit(w, *, bits, group_size, symmetric, scale_dtype):
    *lead, k, n = w.shape
    sdt = jnp.dtype(scale_dtype)
    wg = w.astype(jnp.float32).reshape(*lead, k // group_size, group_size, n)
    if symmetric:
        qmax = 127 if bits == 8 else 7
        s = jnp.max(jnp.abs(wg), axis=-2) / qmax
        s = jnp.where(s > 0, s, 1.0)
        s = _round_away(s, sdt, up=True)
        q = jnp.clip(jnp.round(wg / s.astype(jnp.float32)[..., None, :]), -qmax, qmax)
        zero = None
        codes = q.astype(jnp.int8) if bits == 8 else (q + 8).astype(jnp.uint8)
    else:
        qmax = 2 ** bits - 1
        zero = _round_away(jnp.min(wg, axis=-2), sdt, up=False)
        s = (jnp.max(wg, axis=-2) - zero.astype(jnp.float32)) / qmax
        s = _round_away(jnp.where(s > 0, s, 1.0), sdt, up=True)
        u = jnp.round((wg - zero.astype(jnp.float32)[..., None, :]) / s.astype(jnp.float32)[..., None, :])
        codes = jnp.clip(u, 0, qmax).astype(jnp.uint8)
    codes = codes.reshape(*lead, k, n)
    if bits == 4:
        codes = qmm.pack_int4(codes, group_size)
    return codes, s, zero


class QuantView:
    """What a `Linear` sees in place of its kernel (flax unboxes a quantized leaf to this): the float
    kernel's shape, so flax's parameter shape check passes for packed storage, and `matmul`."""

    __slots__ = ("box",)

    def __init__(self, box: Any):
        self.box = box

    @property
    def shape(self) -> Tuple[int, ...]:
        return self.box.shape

    @property
    def ndim(self) -> int:
        return len(self.box.shape)

    def matmul(self, x: jnp.ndarray, dtype: Any) -> jnp.ndarray:
        return self.box.matmul(x, dtype)

    def dequantize(self, dtype: Any = jnp.float32) -> jnp.ndarray:
        return self.box.dequantize(dtype)


class BoxedLeaf(meta.AxisMetadata):
    """Mixin for quantized leaves: stored as a pytree (arrays stacked on the scanned layer axis like any
    parameter); `unbox` (done by `Module.param`) hands the module a `QuantView`."""

    def unbox(self) -> QuantView:
        return QuantView(self)

    def replace_boxed(self, val: Any) -> Any:
        return val.box if isinstance(val, QuantView) else val

    def add_axis(self, index: int, params: dict) -> Any:
        return self

    def remove_axis(self, index: int, params: dict) -> Any:
        return self


@flax.struct.dataclass
class QuantizedWeight(BoxedLeaf):
    """A quantized Linear kernel [in, out] (leading axes allowed: scanned layers), usable wherever a
    `Linear` kernel is: `linear_apply` calls `matmul`, which runs `kernels.quant_matmul`."""

    qweight: jnp.ndarray
    scale: jnp.ndarray
    zero: Optional[jnp.ndarray]
    bits: int = flax.struct.field(pytree_node=False, default=8)
    group_size: int = flax.struct.field(pytree_node=False, default=128)
    impl: str = flax.struct.field(pytree_node=False, default="auto")

    @classmethod
    def from_float(cls, w: jnp.ndarray, *, bits: int, group_size: int, symmetric: Optional[bool] = None,
                   scale_dtype: str = "float16", impl: str = "auto") -> "QuantizedWeight":
        """Quantize a float kernel [..., in, out] (symmetric default: True for int8, False for int4)."""
        sym = (bits == 8) if symmetric is None else bool(symmetric)
        q, s, z = quantize_groupwise(w, bits=bits, group_size=group_size, symmetric=sym, scale_dtype=scale_dtype)
        return cls(qweight=q, scale=s, zero=z, bits=bits, group_size=group_size, impl=impl)

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    @property
    def shape(self) -> Tuple[int, ...]:
        """The float kernel's shape [..., in, out]."""
        *lead, kq, _ = self.qweight.shape
        return (*lead, kq * 2 if self.bits == 4 else kq, self.scale.shape[-1])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def nbytes(self) -> int:
        return int(sum(a.size * a.dtype.itemsize for a in (self.qweight, self.scale, self.zero) if a is not None))

    def dequantize(self, dtype: Any = jnp.float32) -> jnp.ndarray:
        return qmm.dequantize(self.qweight, self.scale, self.zero, bits=self.bits, group_size=self.group_size,
                              dtype=dtype)

    def matmul(self, x: jnp.ndarray, dtype: Any) -> jnp.ndarray:
        """x [..., in] @ W -> [..., out] in `dtype` (f32 accumulation)."""
        if self.qweight.ndim != 2:
            raise ValueError(f"QuantizedWeight.matmul needs one layer's [in, out] weight, got stacked {self.shape}")
        k, n = self.shape
        if x.shape[-1] != k:
            raise ValueError(f"QuantizedWeight.matmul: input last dim {x.shape[-1]} != in_features {k}")
        lead = x.shape[:-1]
        y = qmm.quant_matmul(x.reshape(-1, k).astype(dtype), self.qweight, self.scale, self.zero, bits=self.bits,
                             group_size=self.group_size, out_dtype=dtype, impl=self.impl)
        return y.reshape(*lead, n)


def is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedWeight)
