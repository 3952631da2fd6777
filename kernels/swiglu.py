"""SwiGLU gate: silu(x @ w_gate) * (x @ w_up) with the elementwise work in the matmul epilogue.

x [..., K], w_gate / w_up [K, N] -> [..., N] in x.dtype.  Definition (`reference`): both products
accumulated in f32, silu(g) * u in f32, one rounding to x.dtype.

Implementations:
  * "xla":    `silu(x @ w_gate) * (x @ w_up)` with the products rounded to x.dtype (the common
              unfused expression; XLA fuses the elementwise part into one pass);
  * "triton": Pallas-Triton kernel with two f32 accumulators over K and a fused epilogue;
  * "mosaic": Hopper warp-specialised persistent kernel (`kernels/swiglu_mosaic.py`), forward only;
              1.12x XLA on an H100 but gated off until its GPU parity check passes (see BENCHMARKS.md).
On Hopper `auto` prefers Mosaic and otherwise XLA (the Triton matmul is slower than cuBLAS there);
on sm80 it picks Triton.
Backward (custom_vjp, residual x only): a kernel recomputes g and u tile by tile and its epilogue
writes dg = dh * u * silu'(g) and du = dh * silu(g) (Triton; XLA otherwise), then four XLA/cuBLAS
products give dx = dg w_gate^T + du w_up^T, dw_gate = x^T dg, dw_up = x^T du.
`save_products=True` trades memory for those two recomputed products: when differentiated, the forward
runs as XLA's two products (rounded to x.dtype, as impl "xla") and keeps g and u (2 x rows x N values of
x.dtype) for the backward, which then runs only the four products above.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import dispatch

_F32 = jnp.float32
_FLOATS = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def _dot(a, b):
    acc = jnp.promote_types(a.dtype, _F32)
    prec = lax.Precision.HIGHEST if a.dtype == acc else None
    return jnp.dot(a, b, preferred_element_type=acc, precision=prec)


def _silu(g):
    return g * jax.nn.sigmoid(g)


def reference(x: jax.Array, w_gate: jax.Array, w_up: jax.Array) -> jax.Array:
    """silu(x @ w_gate) * (x @ w_up) with f32 (f64 for f64 input) accumulation; output x.dtype."""
    return (_silu(_dot(x, w_gate)) * _dot(x, w_up)).astype(x.dtype)


# ----------------------------------------------------------------------------- checks and dispatch

def _check(x, w_gate, w_up):
    if x.ndim < 1 or w_gate.ndim != 2 or w_up.shape != w_gate.shape or w_gate.shape[0] != x.shape[-1]:
        raise ValueError(f"swiglu: need x [..., K] and w_gate/w_up [K, N]; got {x.shape}, {w_gate.shape}, {w_up.shape}")
    if jnp.dtype(x.dtype) not in _FLOATS or w_gate.dtype != x.dtype or w_up.dtype != x.dtype:
        raise ValueError(f"swiglu: x/w_gate/w_up must share a bf16/f16/f32 dtype, got {x.dtype} {w_gate.dtype} {w_up.dtype}")


def _unsupported(m, k, n, dtype, backward=False):
    from kernels import swiglu_mosaic
    mosaic = "no Mosaic backward kernel (epilogue kernel runs on Triton)" if backward else \
        swiglu_mosaic.unsupported_reason(m, k, n, dtype)
    return {"triton": None, "mosaic": mosaic}


def _preference(backward: bool):
    cc = dispatch.compute_capability()
    if cc is not None and cc[0] >= 9:
        # Hopper: cuBLAS products beat the Triton matmul; the Triton epilogue kernel is not used by auto.
        return () if backward else ("mosaic",)
    return ("triton",)


def _choose(impl, m, k, n, dtype, interpret, backward=False, log=True):
    op = "swiglu_bwd" if backward else "swiglu"
    pref = ("triton",) if interpret else _preference(backward)
    return dispatch.select_impl(op, impl, interpret=interpret, log=log, preference=pref,
                                unsupported=_unsupported(m, k, n, dtype, backward))


def choose_impl(impl: str, m: int, k: int, n: int, dtype: Any, *, interpret: bool = False,
                backward: bool = False) -> str:
    """The implementation `swiglu(impl=impl)` runs for x [m, k] @ W [k, n] of `dtype` (no log line)."""
    return _choose(impl, m, k, n, dtype, interpret, backward=backward, log=False)


def explain_auto() -> dict[str, tuple[str, str]]:
    """What `impl="auto"` picks here for an 8192x4096 -> 14336 bf16 SwiGLU, and why."""
    return {f"8192x4096x14336 {'bwd' if b else 'fwd'}": dispatch.explain(
        "swiglu", unsupported=_unsupported(8192, 4096, 14336, jnp.bfloat16, b), preference=_preference(b))
        for b in (False, True)}


# ----------------------------------------------------------------------------- Triton kernels

def _blocks(m, k, n, dtype, interpret):
    if interpret:
        bm, bn, bk = 32, 32, 32
    elif dtype == _F32:
        bm, bn, bk = 64, 64, 32
    else:
        bm, bn, bk = 128, 64, 64
    bm = max(16, min(bm, pl.next_power_of_2(m)))
    bn = max(16, min(bn, pl.next_power_of_2(n)))
    bk = max(16, min(bk, pl.next_power_of_2(k)))
    return bm, bn, bk


def _kernel(x_ref, g_ref, u_ref, *refs, m, k, n, bm, bn, bk, backward):
    from jax.experimental.pallas import triton as plt
    i, j = pl.program_id(0), pl.program_id(1)
    rows = i * bm + jnp.arange(bm)
    cols = j * bn + jnp.arange(bn)
    r_ok, c_ok = rows < m, cols < n

    def body(kk, carry):
        acc_g, acc_u = carry
        ks = kk * bk + jnp.arange(bk)
        k_ok = ks < k
        xb = plt.load(x_ref.at[:, pl.ds(kk * bk, bk)], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        wm = k_ok[:, None] & c_ok[None, :]
        gb = plt.load(g_ref.at[pl.ds(kk * bk, bk), :], mask=wm, other=0.0)
        ub = plt.load(u_ref.at[pl.ds(kk * bk, bk), :], mask=wm, other=0.0)
        return acc_g + _dot(xb, gb), acc_u + _dot(xb, ub)

    zero = jnp.zeros((bm, bn), _F32)
    g, u = lax.fori_loop(0, pl.cdiv(k, bk), body, (zero, zero))
    om = r_ok[:, None] & c_ok[None, :]
    sig = jax.nn.sigmoid(g)
    if not backward:
        (o_ref,) = refs
        plt.store(o_ref, (g * sig * u).astype(o_ref.dtype), mask=om)
    else:
        dh_ref, dg_ref, du_ref = refs
        dh = plt.load(dh_ref, mask=om, other=0.0).astype(_F32)
        plt.store(dg_ref, (dh * u * sig * (1.0 + g * (1.0 - sig))).astype(dg_ref.dtype), mask=om)
        plt.store(du_ref, (dh * g * sig).astype(du_ref.dtype), mask=om)


def _triton(x2, wg, wu, dh=None, *, interpret):
    from jax.experimental.pallas import triton as plt
    m, k = x2.shape
    n = wg.shape[1]
    bm, bn, bk = _blocks(m, k, n, x2.dtype, interpret)
    backward = dh is not None
    tile = pl.BlockSpec((bm, bn), lambda i, j: (i, j))
    in_specs = [pl.BlockSpec((bm, k), lambda i, j: (i, 0)), pl.BlockSpec((k, bn), lambda i, j: (0, j)),
                pl.BlockSpec((k, bn), lambda i, j: (0, j))] + ([tile] if backward else [])
    out_shape = [jax.ShapeDtypeStruct((m, n), x2.dtype)] * (2 if backward else 1)
    outs = pl.pallas_call(
        functools.partial(_kernel, m=m, k=k, n=n, bm=bm, bn=bn, bk=bk, backward=backward),
        grid=(pl.cdiv(m, bm), pl.cdiv(n, bn)),
        in_specs=in_specs,
        out_specs=[tile] * len(out_shape),
        out_shape=out_shape,
        compiler_params=plt.CompilerParams(num_warps=4 if bm * bn <= 64 * 64 else 8, num_stages=3),
        interpret=interpret,
        name="swiglu_bwd_epilogue" if backward else "swiglu_fwd",
    )(*([x2, wg, wu] + ([dh] if backward else [])))
    return tuple(outs) if backward else outs[0]


# ----------------------------------------------------------------------------- custom_vjp

def _fwd_impl(x2, wg, wu, impl, interpret):
    if impl == "xla":
        prec = lax.Precision.HIGHEST if x2.dtype == _F32 else None
        g, u = jnp.dot(x2, wg, precision=prec), jnp.dot(x2, wu, precision=prec)
        return (_silu(g.astype(_F32)) * u.astype(_F32)).astype(x2.dtype)
    if impl == "mosaic":
        from kernels import swiglu_mosaic
        return swiglu_mosaic.swiglu(x2, wg, wu)
    return _triton(x2, wg, wu, interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _swiglu(x2, wg, wu, cfg):
    return _fwd_impl(x2, wg, wu, cfg[0], cfg[2])


def _swiglu_f(x2, wg, wu, cfg):
    if cfg[3]:  # save_products: the products themselves are the residuals
        prec = lax.Precision.HIGHEST if x2.dtype == _F32 else None
        g, u = jnp.dot(x2, wg, precision=prec), jnp.dot(x2, wu, precision=prec)
        return (_silu(g.astype(_F32)) * u.astype(_F32)).astype(x2.dtype), (x2, wg, wu, g, u)
    return _fwd_impl(x2, wg, wu, cfg[0], cfg[2]), (x2, wg, wu)


def _swiglu_b(cfg, res, dh):
    bwd_impl, interpret = cfg[1], cfg[2]
    x2, wg, wu = res[:3]
    dh = dh.astype(x2.dtype)
    if len(res) == 5 or bwd_impl == "xla":
        g, u = (res[3].astype(_F32), res[4].astype(_F32)) if len(res) == 5 else (_dot(x2, wg), _dot(x2, wu))
        sig = jax.nn.sigmoid(g)
        dhf = dh.astype(_F32)
        dg = (dhf * u * sig * (1.0 + g * (1.0 - sig))).astype(x2.dtype)
        du = (dhf * g * sig).astype(x2.dtype)
    else:
        dg, du = _triton(x2, wg, wu, dh, interpret=interpret)
    dx = (_dot(dg, wg.T) + _dot(du, wu.T)).astype(x2.dtype)
    return dx, _dot(x2.T, dg).astype(wg.dtype), _dot(x2.T, du).astype(wu.dtype)


_swiglu.defvjp(_swiglu_f, _swiglu_b)


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, *, impl: str = "auto",
           interpret: bool = False, save_products: bool = False) -> jax.Array:
    """silu(x @ w_gate) * (x @ w_up) over the last axis of x; output x.dtype; custom VJP.

    save_products: keep x@w_gate and x@w_up for the backward instead of recomputing them (module docstring).
    """
    _check(x, w_gate, w_up)
    k, n = w_gate.shape
    m = max(1, x.size // max(k, 1))
    fwd = _choose(impl, m, k, n, x.dtype, interpret)
    if impl in ("auto", "pallas"):
        bwd = _choose("auto", m, k, n, x.dtype, interpret, backward=True)
    else:
        bwd = "triton" if impl == "mosaic" else impl
    if x.size == 0:
        return reference(x, w_gate, w_up)
    y = _swiglu(x.reshape(-1, k), w_gate, w_up, (fwd, bwd, bool(interpret), bool(save_products)))
    return y.reshape(*x.shape[:-1], n)
