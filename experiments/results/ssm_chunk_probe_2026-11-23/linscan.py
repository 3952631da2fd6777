"""prototype: a 2-operand first-order linear scan primitive with a Pallas Triton lowering (tt.scan)."""
import functools
import jax, jax.numpy as jnp
from jax import lax
from jax.interpreters import mlir

try:
    from jax.extend.core import Primitive
except Exception:  # pragma: no cover
    from jax.core import Primitive


def combine(x, y):
    a1, b1 = x
    a2, b2 = y
    return a1 * a2, a2 * b1 + b2


def _impl(a, b, *, axis):
    return lax.associative_scan(combine, (a, b), axis=axis)


linear_scan_p = Primitive("iva_linear_scan")
linear_scan_p.multiple_results = True
linear_scan_p.def_impl(functools.partial(jax.jit, static_argnames="axis")(_impl) if False else _impl)
linear_scan_p.def_abstract_eval(lambda a, b, *, axis: (a, b))
mlir.register_lowering(linear_scan_p, mlir.lower_fun(_impl, multiple_results=True))


def linear_scan(a, b, axis):
    return linear_scan_p.bind(a, b, axis=axis)


def _register_triton():
    from jax._src.pallas.triton import lowering as tl
    from jax._src import core as jax_core
    from jax._src import api_util
    from jax._src import linear_util as lu
    from jax._src.interpreters import partial_eval as pe
    from jax._src.lib.mlir import ir
    from jax._src.lib.triton import dialect as tt_dialect

    def rule(ctx, a, b, *, axis):
        avals = [jax_core.ShapedArray((), v.dtype) for v in ctx.avals_in]
        def body(a1, b1, a2, b2):
            return list(combine((a1, b1), (a2, b2)))
        jaxpr, _, consts = pe.trace_to_jaxpr_dynamic(
            lu.wrap_init(body, debug_info=api_util.debug_info("linear_scan", body, (0, 0, 0, 0), {})), avals * 2)
        assert not consts
        ets = [tl._element_type(x.type) for x in (a, b)]
        op = tt_dialect.ScanOp([a, b], axis)
        entry = op.regions[0].blocks.append(*(ets * 2))
        with ir.InsertionPoint.at_block_begin(entry):
            res = tl.lower_jaxpr_to_triton_ir(ctx.context, jaxpr, None, *entry.arguments)
            tt_dialect.scan_return(res)
        op.verify()
        return list(op.result)

    tl.triton_lowering_rules[linear_scan_p] = rule

_register_triton()
