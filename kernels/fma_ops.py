"""Fused multiply-adds that survive XLA's Triton path: `fma(a, b, c)` and `dot_sum(x, y, axis)`.

XLA compiles Pallas Triton kernels without floating-point contraction, so `a * b + c` in a kernel costs an FMUL and
an FADD (Nsight Compute, H100: no FFMA at all in the selective-scan forward), and `jnp.sum(x * y, axis)` a multiply
per element plus an add per element.  These primitives lower to `math.fma` in a Pallas Triton kernel:
    fma(a, b, c)       = a * b + c, one FFMA per element;
    dot_sum(x, y, axis) = sum over `axis` of x * y, one `tt.reduce` over the pair (x, y) whose combine is
                          (s1, w1), (s2, w2) -> (fma(s2, w2, s1 * w1), 1): a running sum (s, 1) meets the next
                          pair as fma(x, y, s) once LLVM folds s * 1, so a thread's n values cost 1 FMUL and
                          n - 1 FFMA, and the cross-lane steps are plain adds.
Outside a kernel and in Pallas interpret mode they are the plain jnp expressions (`a * b + c`, `sum(x * y)`).
Their rules go into Pallas' private Triton lowering table, as `kernels.linear_scan`'s do; `TRITON_ERROR` says why
when a jax version has moved it, and then both functions are the plain expressions everywhere.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.interpreters import mlir

try:  # jax >= 0.4.36
    from jax.extend.core import Primitive
except ImportError:  # pragma: no cover
    from jax.core import Primitive


def _fma_impl(a, b, c):
    return a * b + c


def _fma_abstract(a, b, c):  # `fma` has broadcast and cast its operands
    return a


def _dot_sum_impl(x, y, *, axis: int):
    return jnp.sum(x * y, axis=axis)


def _dot_sum_abstract(x, y, *, axis: int):  # `dot_sum` has broadcast, cast and checked its operands
    return jax.core.ShapedArray(x.shape[:axis] + x.shape[axis + 1:], x.dtype)


fma_p = Primitive("iva_fma")
fma_p.def_impl(_fma_impl)
fma_p.def_abstract_eval(_fma_abstract)
mlir.register_lowering(fma_p, mlir.lower_fun(_fma_impl, multiple_results=False))

dot_sum_p = Primitive("iva_dot_sum")
dot_sum_p.def_impl(_dot_sum_impl)
dot_sum_p.def_abstract_eval(_dot_sum_abstract)
mlir.register_lowering(dot_sum_p, mlir.lower_fun(_dot_sum_impl, multiple_results=False))


def fma(a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
    """a * b + c, one rounding in a Pallas Triton kernel (broadcasts its operands to one shape and dtype)."""
    a, b, c = jnp.broadcast_arrays(a, b, c)
    dt = jnp.result_type(a, b, c)
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"fma: floating operands only, got {dt}")
    if TRITON_ERROR:  # no Triton rule on this jax: the plain expression lowers everywhere
        return _fma_impl(a.astype(dt), b.astype(dt), c.astype(dt))
    return fma_p.bind(a.astype(dt), b.astype(dt), c.astype(dt))


def dot_sum(x: jax.Array, y: jax.Array, axis: int) -> jax.Array:
    """sum(x * y, axis) with the products fused into the sum's adds in a Pallas Triton kernel."""
    x, y = jnp.broadcast_arrays(x, y)
    dt = jnp.result_type(x, y)
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"dot_sum: floating operands only, got {dt}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"dot_sum: axis {axis} out of range for rank {x.ndim}")
    if TRITON_ERROR:  # no Triton rule on this jax: the plain expression lowers everywhere
        return _dot_sum_impl(x.astype(dt), y.astype(dt), axis=axis % x.ndim)
    return dot_sum_p.bind(x.astype(dt), y.astype(dt), axis=axis % x.ndim)


def _register_triton_rules() -> Optional[str]:
    """Add the rules to Pallas' Triton lowering table; returns None, or why it could not."""
    try:
        from jax._src.lib.mlir import ir
        from jax._src.lib.mlir.dialects import arith as arith_dialect
        from jax._src.lib.mlir.dialects import math as math_dialect
        from jax._src.lib.triton import dialect as tt_dialect
        from jax._src.pallas.triton import lowering as tl
    except Exception as e:  # pragma: no cover - depends on the jax build
        return f"Pallas Triton lowering not importable: {e!r}"

    def fma_rule(ctx, a, b, c):
        return math_dialect.fma(a, b, c)

    def dot_sum_rule(ctx, x, y, *, axis):
        et = tl._element_type(x.type)
        op = tt_dialect.ReduceOp([x, y], axis)
        entry = op.regions[0].blocks.append(et, et, et, et)
        with ir.InsertionPoint.at_block_begin(entry):
            s1, w1, s2, w2 = entry.arguments  # Triton combines (running, next)
            one = arith_dialect.constant(et, ir.FloatAttr.get(et, 1.0))
            tt_dialect.reduce_return([math_dialect.fma(s2, w2, arith_dialect.mulf(s1, w1)), one])
        op.verify()
        return op.results[0]

    try:
        tl.triton_lowering_rules[fma_p] = fma_rule
        tl.triton_lowering_rules[dot_sum_p] = dot_sum_rule
    except Exception as e:  # pragma: no cover
        return f"Pallas Triton lowering table not found: {e!r}"
    return None


TRITON_ERROR: Optional[str] = _register_triton_rules()

__all__ = ["fma", "dot_sum", "fma_p", "dot_sum_p", "TRITON_ERROR"]
