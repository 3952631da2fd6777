"""A first-order linear recurrence as one primitive that Pallas' Triton lowering turns into `tt.scan`.

`linear_scan(a, b, axis)` returns (P, H) with, along `axis`,
    P_t = a_0 a_1 ... a_t        H_t = a_t H_{t-1} + b_t   (H_{-1} = 0)
i.e. the inclusive scan of the affine maps h -> a h + b under composition; with reverse=True the same from the
end, H_t = a_t H_{t+1} + b_t (H_n = 0), the recurrence of an adjoint.  Outside a kernel, and in Pallas
interpret mode, it is `lax.associative_scan`.  Inside a Pallas Triton kernel it lowers to one `tt.scan` over both
operands, which Triton runs in registers: sequentially over the elements a thread holds along the axis, then
across lanes and warps.  Pallas registers a `tt.scan` rule only for `cumsum`; this module adds one for this
primitive through the same private lowering table (`jax._src.pallas.triton.lowering`), so `TRITON_ERROR` says
why when a jax version has moved it.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
from jax import lax
from jax.interpreters import mlir

try:  # jax >= 0.4.36
    from jax.extend.core import Primitive
except ImportError:  # pragma: no cover
    from jax.core import Primitive


def _compose(x, y):
    """(a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2."""
    a1, b1 = x
    a2, b2 = y
    return a1 * a2, a2 * b1 + b2


def _impl(a, b, *, axis: int, reverse: bool = False):
    return lax.associative_scan(_compose, (a, b), axis=axis, reverse=reverse)


def _abstract(a, b, *, axis: int, reverse: bool = False):
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"linear_scan: a and b must match, got {a.shape} {a.dtype} and {b.shape} {b.dtype}")
    if not -a.ndim <= axis < a.ndim:
        raise ValueError(f"linear_scan: axis {axis} out of range for rank {a.ndim}")
    return a, b


linear_scan_p = Primitive("iva_linear_scan")
linear_scan_p.multiple_results = True
linear_scan_p.def_impl(_impl)
linear_scan_p.def_abstract_eval(_abstract)
mlir.register_lowering(linear_scan_p, mlir.lower_fun(_impl, multiple_results=True))


def linear_scan(a: jax.Array, b: jax.Array, axis: int = 0, reverse: bool = False) -> Tuple[jax.Array, jax.Array]:
    """(prod of a up to t, h_t) along `axis` for h_t = a_t h_{t-1} + b_t from h = 0; reverse: from the end,
    h_t = a_t h_{t+1} + b_t (see the module docstring)."""
    _abstract(a, b, axis=axis)
    return tuple(linear_scan_p.bind(a, b, axis=axis % a.ndim, reverse=bool(reverse)))


def _register_triton_rule() -> Optional[str]:
    """Add the `tt.scan` rule to Pallas' Triton lowering table; returns None, or why it could not."""
    try:
        from jax._src import api_util
        from jax._src import core as jax_core
        from jax._src import linear_util as lu
        from jax._src.interpreters import partial_eval as pe
        from jax._src.lib.mlir import ir
        from jax._src.lib.mlir.dialects import arith as arith_dialect
        from jax._src.lib.mlir.dialects import math as math_dialect
        from jax._src.lib.triton import dialect as tt_dialect
        from jax._src.pallas.triton import lowering as tl
    except Exception as e:  # pragma: no cover - depends on the jax build
        return f"Pallas Triton lowering not importable: {e!r}"

    def body(a1, b1, a2, b2):
        return list(_compose((a1, b1), (a2, b2)))

    def rule(ctx, a, b, *, axis, reverse=False):
        scalars = [jax_core.ShapedArray((), v.dtype) for v in ctx.avals_in]
        fun = lu.wrap_init(body, debug_info=api_util.debug_info("linear_scan", body, (0, 0, 0, 0), {}))
        jaxpr, _, consts = pe.trace_to_jaxpr_dynamic(fun, scalars * 2)
        if consts:  # pragma: no cover
            raise NotImplementedError("linear_scan: the combine function closed over constants")
        types = [tl._element_type(x.type) for x in (a, b)]
        op = tt_dialect.ScanOp([a, b], axis, reverse)  # reverse: flip, scan, flip (as lax's)
        entry = op.regions[0].blocks.append(*(types * 2))
        with ir.InsertionPoint.at_block_begin(entry):
            if all(jax.numpy.issubdtype(v.dtype, jax.numpy.floating) for v in ctx.avals_in):
                # a2 b1 + b2 as one `math.fma`: XLA's Triton path does not contract a multiply and an add
                # (Nsight Compute, H100: no FFMA in the scan kernels), so the lowered jaxpr costs two instructions
                a1, b1, a2, b2 = entry.arguments
                tt_dialect.scan_return([arith_dialect.mulf(a1, a2), math_dialect.fma(a2, b1, b2)])
            else:
                tt_dialect.scan_return(tl.lower_jaxpr_to_triton_ir(ctx.context, jaxpr, None, *entry.arguments))
        op.verify()
        return list(op.result)

    try:
        tl.triton_lowering_rules[linear_scan_p] = rule
    except Exception as e:  # pragma: no cover
        return f"Pallas Triton lowering table not found: {e!r}"
    return None


TRITON_ERROR: Optional[str] = _register_triton_rule()

__all__ = ["linear_scan", "linear_scan_p", "TRITON_ERROR"]
