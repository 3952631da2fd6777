"""RMSNorm (HF LlamaRMSNorm semantics), with a fused residual-add variant.

Definition (what every implementation computes; `reference` is it in plain jnp):

    n = x.f32 * rsqrt(mean(x.f32 ** 2, -1) + eps)          # f32 statistics
    y = (n.astype(x.dtype).f32 * weight.f32).astype(x.dtype)

i.e. HF's `weight * hidden_states.to(input_dtype)`: the normalised value is rounded to the input
dtype BEFORE the weight multiply, exactly as HF does.  The product of two bf16/f16 numbers is
exact in f32, so one final rounding reproduces HF's bf16*bf16 multiply bit for bit; the output
is always x.dtype (HF would promote to f32 for an f32 weight on bf16 activations).

`rms_norm_residual(x, residual, w)` returns `(rms_norm(h), h)` with `h = (x + residual)` rounded to
x.dtype (the decoder's "add then norm"), in one pass over memory.

Backward (custom_vjp, both impls use the same formulas): with r = rsqrt(mean(x^2)+eps), n = x r,
dn = g * w (f32), dx = r (dn - n mean(dn n)) [+ g_h], dw = sum_rows g * n.astype(x.dtype).
The rounding of n is treated as the identity in dx (straight-through), as autodiff of the
reference does up to one bf16 rounding of dn.

Implementations: "xla" (jnp, XLA fuses it) and "triton" (Pallas, row blocks held in registers:
one read of x, one write of y; the backward reads x, g once and writes dx plus per-program dw
partials).  No Mosaic kernel: the op is memory-bound and the Triton kernel is the Pallas path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import dispatch

_F32 = jnp.float32
_MAX_TRITON_HIDDEN = 16384  # a (rows, next_pow2(hidden)) f32 block must stay in registers
_FLOATS = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def reference(x: jax.Array, weight: jax.Array, *, eps: float) -> jax.Array:
    """HF LlamaRMSNorm in plain jnp (differentiable; f32 statistics, f64 for f64 input)."""
    acc = jnp.promote_types(x.dtype, _F32)
    xf = x.astype(acc)
    n = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (n.astype(x.dtype).astype(acc) * weight.astype(acc)).astype(x.dtype)


def reference_residual(x: jax.Array, residual: jax.Array, weight: jax.Array, *, eps: float):
    """(reference(x + residual), x + residual), the sum rounded to x.dtype."""
    acc = jnp.promote_types(x.dtype, _F32)
    h = (x.astype(acc) + residual.astype(acc)).astype(x.dtype)
    return reference(h, weight, eps=eps), h


# ----------------------------------------------------------------------------- checks / dispatch

def _check(x, weight, residual=None):
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"rms_norm: x must have a non-empty last axis, got shape {x.shape}")
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight shape {weight.shape} must be ({x.shape[-1]},) for x {x.shape}")
    if jnp.dtype(x.dtype) not in _FLOATS:
        raise ValueError(f"rms_norm: x dtype {x.dtype} not in bf16/f16/f32")
    if not jnp.issubdtype(weight.dtype, jnp.floating):
        raise ValueError(f"rms_norm: weight dtype {weight.dtype} is not floating")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"rms_norm_residual: residual shape {residual.shape} != x shape {x.shape}")
        if not jnp.issubdtype(residual.dtype, jnp.floating):
            raise ValueError(f"rms_norm_residual: residual dtype {residual.dtype} is not floating")


def _unsupported(hidden: int) -> dict[str, str | None]:
    triton = None
    if pl.next_power_of_2(hidden) > _MAX_TRITON_HIDDEN:
        triton = f"hidden {hidden} > {_MAX_TRITON_HIDDEN} (row block would spill registers)"
    return {"triton": triton, "mosaic": "no Mosaic RMSNorm kernel (memory-bound op; Triton is the Pallas path)"}


def _choose(impl: str, hidden: int, interpret: bool, log: bool = True) -> str:
    return dispatch.select_impl("rms_norm", impl, interpret=interpret, unsupported=_unsupported(hidden),
                                preference=("triton",), log=log)


def explain_auto() -> dict[str, tuple[str, str]]:
    """What `impl="auto"` picks here for typical hidden sizes, and why."""
    return {f"hidden={h}": dispatch.explain("rms_norm", unsupported=_unsupported(h), preference=("triton",))
            for h in (576, 4096)}


# ----------------------------------------------------------------------------- XLA implementation

def _xla_fwd(x2, w, res2, eps):
    h = x2 if res2 is None else (x2.astype(_F32) + res2.astype(_F32)).astype(x2.dtype)
    return reference(h, w, eps=eps), h


def _xla_bwd(h2, w, g, gh, eps):
    xf = h2.astype(_F32)
    r = lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    n = xf * r
    gf = g.astype(_F32)
    dn = gf * w.astype(_F32)
    dx = r * (dn - n * jnp.mean(dn * n, axis=-1, keepdims=True))
    if gh is not None:
        dx = dx + gh.astype(_F32)
    dw = jnp.sum(gf * n.astype(h2.dtype).astype(_F32), axis=0)
    return dx, dw


# ----------------------------------------------------------------------------- Triton implementation

def _fit_rows(block_rows: int, n_rows: int) -> int:
    """block_rows, but no more than the (power-of-2 rounded) rows there are."""
    return max(1, min(block_rows, pl.next_power_of_2(max(n_rows, 1))))


def _config(n_rows: int, hidden: int):
    """Forward: (padded hidden, rows per program, warps), from a sweep on an H100 (BENCHMARKS.md, Kernels)."""
    hp = pl.next_power_of_2(hidden)
    if hp <= 1024:
        block_rows, num_warps = 2, 4  # sweep best at hidden 576
    elif hp == 4096:
        block_rows, num_warps = 2, 8  # sweep best at hidden 4096
    else:
        block_rows, num_warps = max(1, 16384 // hp), 8  # measured at 2048 (8 rows) and 8192 (2 rows)
    return hp, _fit_rows(block_rows, n_rows), num_warps


def _bwd_config(n_rows: int, hidden: int):
    """Backward: (padded hidden, rows per block, warps), from a kernel-time sweep on an H100 (2026-11-23,
    experiments/results/rms_bwd_sweep_h100_2026-11-23.json): one row per block above 1024 columns."""
    hp = pl.next_power_of_2(hidden)
    block_rows, num_warps = (2, 4) if hp <= 1024 else (1, 4) if hp == 2048 else (1, 8) if hp == 4096 else (1, 16)
    return hp, _fit_rows(block_rows, n_rows), num_warps


def _triton_params(num_warps):
    from jax.experimental.pallas import triton as plt
    return plt.CompilerParams(num_warps=num_warps, num_stages=1)


def _fwd_kernel(*refs, n_rows, hidden, block_rows, eps, has_res):
    from jax.experimental.pallas import triton as plt
    if has_res:
        x_ref, r_ref, w_ref, y_ref, h_ref = refs
    else:
        x_ref, w_ref, y_ref = refs
    hp = x_ref.shape[-1]
    row0 = pl.program_id(0) * block_rows
    cmask = jnp.arange(hp) < hidden
    mask = ((row0 + jnp.arange(block_rows)) < n_rows)[:, None] & cmask[None, :]
    x = plt.load(x_ref, mask=mask, other=0.0)
    if has_res:
        res = plt.load(r_ref, mask=mask, other=0.0)
        x = (x.astype(_F32) + res.astype(_F32)).astype(x_ref.dtype)
        plt.store(h_ref, x, mask=mask)
    xf = x.astype(_F32)
    r = lax.rsqrt(jnp.sum(xf * xf, axis=1) * (1.0 / hidden) + eps)
    n = (xf * r[:, None]).astype(x_ref.dtype).astype(_F32)
    w = plt.load(w_ref, mask=cmask, other=0.0).astype(_F32)
    plt.store(y_ref, (n * w[None, :]).astype(y_ref.dtype), mask=mask)


def _triton_fwd(x2, w, res2, eps, interpret):
    n_rows, hidden = x2.shape
    hp, br, nw = _config(n_rows, hidden)
    has_res = res2 is not None
    row_spec = pl.BlockSpec((br, hp), lambda i: (i, 0))
    in_specs = [row_spec] + ([row_spec] if has_res else []) + [pl.BlockSpec((hp,), lambda i: (0,))]
    out_shape = [jax.ShapeDtypeStruct(x2.shape, x2.dtype)] * (2 if has_res else 1)
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, n_rows=n_rows, hidden=hidden, block_rows=br, eps=eps, has_res=has_res),
        grid=(pl.cdiv(n_rows, br),),
        in_specs=in_specs,
        out_specs=[row_spec] * len(out_shape),
        out_shape=out_shape,
        compiler_params=_triton_params(nw),
        interpret=interpret,
        name="rms_norm_fwd",
    )(*([x2, res2, w] if has_res else [x2, w]))
    return (outs[0], outs[1]) if has_res else (outs[0], x2)


def _bwd_kernel(*refs, n_rows, hidden, block_rows, rows_per_prog, eps, has_gh):
    from jax.experimental.pallas import triton as plt
    if has_gh:
        x_ref, w_ref, g_ref, gh_ref, dx_ref, dw_ref = refs
    else:
        x_ref, w_ref, g_ref, dx_ref, dw_ref = refs
    hp = x_ref.shape[-1]
    cmask = jnp.arange(hp) < hidden
    w = plt.load(w_ref, mask=cmask, other=0.0).astype(_F32)
    base = pl.program_id(0) * (block_rows * rows_per_prog)

    def body(j, acc):
        sl = (pl.ds(j * block_rows, block_rows), slice(None))
        mask = ((base + j * block_rows + jnp.arange(block_rows)) < n_rows)[:, None] & cmask[None, :]
        x = plt.load(x_ref.at[sl], mask=mask, other=0.0).astype(_F32)
        g = plt.load(g_ref.at[sl], mask=mask, other=0.0).astype(_F32)
        r = lax.rsqrt(jnp.sum(x * x, axis=1) * (1.0 / hidden) + eps)
        n = x * r[:, None]
        dn = g * w[None, :]
        c = jnp.sum(dn * n, axis=1) * (1.0 / hidden)
        dx = r[:, None] * (dn - n * c[:, None])
        if has_gh:
            dx = dx + plt.load(gh_ref.at[sl], mask=mask, other=0.0).astype(_F32)
        plt.store(dx_ref.at[sl], dx.astype(dx_ref.dtype), mask=mask)
        return acc + g * n.astype(x_ref.dtype).astype(_F32)

    acc = lax.fori_loop(0, rows_per_prog, body, jnp.zeros((block_rows, hp), _F32))
    dw_ref[...] = jnp.sum(acc, axis=0)


def _triton_bwd(h2, w, g, gh, eps, interpret):
    n_rows, hidden = h2.shape
    hp, br, nw = _bwd_config(n_rows, hidden)
    cores = dispatch.device_info().core_count or 132
    target_progs = 4 * cores if not interpret else 4
    rpp = max(1, pl.cdiv(pl.cdiv(n_rows, br), target_progs))
    rows_per_block = br * rpp
    n_prog = pl.cdiv(n_rows, rows_per_block)
    has_gh = gh is not None
    row_spec = pl.BlockSpec((rows_per_block, hp), lambda i: (i, 0))
    in_specs = [row_spec, pl.BlockSpec((hp,), lambda i: (0,)), row_spec] + ([row_spec] if has_gh else [])
    dx, dw = pl.pallas_call(
        functools.partial(_bwd_kernel, n_rows=n_rows, hidden=hidden, block_rows=br, rows_per_prog=rpp, eps=eps,
                          has_gh=has_gh),
        grid=(n_prog,),
        in_specs=in_specs,
        out_specs=[row_spec, pl.BlockSpec((None, hp), lambda i: (i, 0))],
        out_shape=[jax.ShapeDtypeStruct(h2.shape, h2.dtype), jax.ShapeDtypeStruct((n_prog, hp), _F32)],
        compiler_params=_triton_params(nw),
        interpret=interpret,
        name="rms_norm_bwd",
    )(*([h2, w, g, gh] if has_gh else [h2, w, g]))
    return dx, jnp.sum(dw, axis=0)[:hidden]


# ----------------------------------------------------------------------------- custom_vjp plumbing

def _fwd(x2, w, res2, eps, impl, interpret):
    if impl == "xla":
        return _xla_fwd(x2, w, res2, eps)
    return _triton_fwd(x2, w, res2, eps, interpret)


def _bwd(h2, w, g, gh, eps, impl, interpret):
    if impl == "xla":
        dx, dw = _xla_bwd(h2, w, g, gh, eps)
        return dx.astype(h2.dtype), dw
    if gh is not None:
        gh = gh.astype(h2.dtype)
    return _triton_bwd(h2, w, g.astype(h2.dtype), gh, eps, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _rms(x2, w, eps, impl, interpret):
    return _fwd(x2, w, None, eps, impl, interpret)[0]


def _rms_f(x2, w, eps, impl, interpret):
    y, _ = _fwd(x2, w, None, eps, impl, interpret)
    return y, (x2, w)


def _rms_b(eps, impl, interpret, res, g):
    x2, w = res
    dx, dw = _bwd(x2, w, g, None, eps, impl, interpret)
    return dx.astype(x2.dtype), dw.astype(w.dtype)


_rms.defvjp(_rms_f, _rms_b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _rms_res(x2, res2, w, eps, impl, interpret):
    return _fwd(x2, w, res2, eps, impl, interpret)


def _rms_res_f(x2, res2, w, eps, impl, interpret):
    y, h = _fwd(x2, w, res2, eps, impl, interpret)
    return (y, h), (h, w, jnp.zeros((0,), res2.dtype))


def _rms_res_b(eps, impl, interpret, res, cts):
    h, w, res_dtype_probe = res
    g, gh = cts
    dx, dw = _bwd(h, w, g, gh, eps, impl, interpret)
    return dx.astype(h.dtype), dx.astype(res_dtype_probe.dtype), dw.astype(w.dtype)


_rms_res.defvjp(_rms_res_f, _rms_res_b)


# ----------------------------------------------------------------------------- public API

def rms_norm(x: jax.Array, weight: jax.Array, *, eps: float, impl: str = "auto",
             interpret: bool = False) -> jax.Array:
    """HF LlamaRMSNorm over the last axis (any leading shape); output in x.dtype; custom VJP."""
    _check(x, weight)
    impl = _choose(impl, x.shape[-1], interpret)
    if x.size == 0:
        return reference(x, weight, eps=eps)
    x2 = x.reshape(-1, x.shape[-1])
    return _rms(x2, weight, float(eps), impl, interpret).reshape(x.shape)


def rms_norm_residual(x: jax.Array, residual: jax.Array, weight: jax.Array, *, eps: float,
                      impl: str = "auto", interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """(rms_norm(x + residual), x + residual) fused; the sum is rounded to x.dtype."""
    _check(x, weight, residual)
    impl = _choose(impl, x.shape[-1], interpret)
    if x.size == 0:
        return reference_residual(x, residual, weight, eps=eps)
    shape = x.shape
    x2, r2 = x.reshape(-1, shape[-1]), residual.reshape(-1, shape[-1])
    y, h = _rms_res(x2, r2, weight, float(eps), impl, interpret)
    return y.reshape(shape), h.reshape(shape)

