"""Decode attention over a KV cache (one query token per row): paged and dense, GQA, split-K, fp8 KV.

Definition (what every implementation computes; `reference` is it in plain jnp).  For row b and query
head h (kv head h // G, G = Hq // Hkv), the visible key slots are j in [starts[b], lengths[b]) (and
kv_valid[b, j] where given); out = softmax(q . k_j * sm_scale) @ v_j over them, softmax in f32.  A
row with no visible key returns zeros.  Slots are the sequence's logical positions in the cache:

  * paged:  slot j lives in page page_table[b, j // page_size] at offset j % page_size of a page pool
            k_pages [(L,) P, page_size, Hkv, D].  fp8 pools (float8_e4m3fn) carry per-(page, offset,
            kv head) f32 scales k_scale / v_scale [(L,) P, page_size, Hkv]: k = k_fp8 * k_scale.
  * dense:  slot j is k[(layer,) b, j], k [(L,) B, S, Hkv, D] (the decoder's preallocated cache).

`layer` (int or traced scalar) selects a layer of a stacked [L, ...] cache inside the kernel, so the
decoder's layer scan never materialises a per-layer copy of the cache.

Implementations:
  * "xla":    `reference` (gathers the pages, masked softmax); CPU / fallback; differentiable.
  * "triton": one Pallas-Triton kernel, grid (batch, kv head, split): each program holds the G query
              heads of one kv head as a [16+, D] tile, streams its share of the row's key blocks
              (block_k tokens gathered through the page table, any page size) with an online
              softmax, and writes either the final output (one split) or (acc, m, l) partials that a
              small XLA epilogue combines by logsumexp (split-K, for short batches over long caches).
              Inference-only kernel: its VJP is the reference's (tested), so gradients are correct
              but not fast.
The decoder calls `dense_cache_step` (its dense cache) through `use_for_step` / `impl_for_model`, and
`paged_decode_attention` from `iva_jax.inference.paged`.
There is no Mosaic kernel (the op is a memory-bound gather; Triton is the Pallas path).  Until the
kernel has passed `experiments/bench_inference.py --check` on a GPU, `auto` keeps XLA
(`_GPU_VALIDATED`; `IVA_KERNELS_ALLOW_UNVALIDATED=1` lifts that).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import dispatch

try:  # Triton-lowered Pallas helpers (present on CPU jaxlib too, for interpret mode)
    from jax.experimental.pallas import triton as plt
except ImportError:  # pragma: no cover
    plt = None

_F32 = jnp.float32
_LOG2E = math.log2(math.e)
_M_INIT = -1e30
_FP8 = jnp.dtype(jnp.float8_e4m3fn)
_FLOATS = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
_GPU_VALIDATED = True  # H100 check passed 2026-11-22 (experiments/results/inference_kernels_h100_2026-11-22.json)


@dataclasses.dataclass(frozen=True)
class DecodeBlocks:
    """Kernel tiling: tokens per inner block, k-splits per row (None = heuristic), warps, stages."""

    block_k: int = 64
    num_splits: Optional[int] = None
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        if self.block_k < 16 or self.block_k & (self.block_k - 1):
            raise ValueError(f"DecodeBlocks.block_k must be a power of 2 >= 16, got {self.block_k}")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"DecodeBlocks.num_splits must be >= 1, got {self.num_splits}")


# ----------------------------------------------------------------------------- reference

def _visible(s: int, starts, lengths, kv_valid):
    j = jnp.arange(s)[None, :]
    vis = (j >= starts[:, None]) & (j < lengths[:, None])
    if kv_valid is not None:
        vis = vis & kv_valid.astype(bool)
    return vis


def _attend(q, k, v, vis, sm_scale):
    """q [B, Hq, D], k/v [B, S, Hkv, D] (already dequantised), vis [B, S] -> [B, Hq, D] in q.dtype."""
    b, hq, d = q.shape
    hkv = k.shape[2]
    acc = jnp.promote_types(q.dtype, _F32)
    prec = lax.Precision.HIGHEST
    qg = q.astype(acc).reshape(b, hkv, hq // hkv, d)
    s = jnp.einsum("bhgd,bshd->bhgs", qg, k.astype(acc), precision=prec) * sm_scale
    s = jnp.where(vis[:, None, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bhgs,bshd->bhgd", p, v.astype(acc), precision=prec) / jnp.where(l == 0, 1.0, l)
    return o.reshape(b, hq, d).astype(q.dtype)


def _layer(x, layer, ndim):
    if x is None or x.ndim == ndim:
        return x
    return lax.dynamic_index_in_dim(x, layer, 0, keepdims=False)


def gather_pages(pages: jax.Array, page_table: jax.Array, scale: Optional[jax.Array] = None,
                 dtype: Any = None) -> jax.Array:
    """[P, ps, Hkv, D] pages -> [B, max_pages * ps, Hkv, D] per-row logical cache (dequantised with
    `scale` [P, ps, Hkv] when given, in `dtype`)."""
    g = pages[page_table]  # [B, maxp, ps, Hkv, D]
    b, mp, ps = g.shape[:3]
    g = g.reshape(b, mp * ps, *g.shape[3:])
    if scale is not None:
        sc = scale[page_table].reshape(b, mp * ps, -1)
        g = (g.astype(_F32) * sc[..., None]).astype(dtype or _F32)
    elif dtype is not None:
        g = g.astype(dtype)
    return g


def reference_paged(q, k_pages, v_pages, page_table, lengths, *, starts=None, layer=0, k_scale=None,
                    v_scale=None, sm_scale=None):
    """Paged decode attention in plain jnp (f32 softmax; f64 for f64 input): [B, Hq, D]."""
    k_pages, v_pages = _layer(k_pages, layer, 4), _layer(v_pages, layer, 4)
    k_scale, v_scale = _layer(k_scale, layer, 3), _layer(v_scale, layer, 3)
    acc = jnp.promote_types(q.dtype, _F32)
    k = gather_pages(k_pages, page_table, k_scale, acc)
    v = gather_pages(v_pages, page_table, v_scale, acc)
    starts = jnp.zeros_like(lengths) if starts is None else starts
    sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    return _attend(q, k, v, _visible(k.shape[1], starts, lengths, None), sm_scale)


def reference_dense(q, k, v, lengths, *, starts=None, kv_valid=None, layer=0, sm_scale=None):
    """Dense decode attention in plain jnp: q [B, Hq, D], k/v [(L,) B, S, Hkv, D] -> [B, Hq, D]."""
    k, v = _layer(k, layer, 4), _layer(v, layer, 4)
    starts = jnp.zeros_like(lengths) if starts is None else starts
    sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    return _attend(q, k, v, _visible(k.shape[1], starts, lengths, kv_valid), sm_scale)


# ----------------------------------------------------------------------------- checks and dispatch

def _unsupported(q_dtype, d: int) -> dict[str, str | None]:
    triton = None
    if jnp.dtype(q_dtype) not in _FLOATS:
        triton = f"query dtype {jnp.dtype(q_dtype)} not in bf16/f16/f32"
    elif d > 256:
        triton = f"head_dim {d} > 256"
    elif not _GPU_VALIDATED and not dispatch.allow_unvalidated() and dispatch.device_info().platform == "cuda":
        triton = "decode-attention kernel not yet validated on a GPU (experiments/bench_inference.py --check)"
    return {"triton": triton, "mosaic": "no Mosaic decode kernel (memory-bound gather; Triton is the Pallas path)"}


def choose_impl(impl: str, q_dtype: Any, head_dim: int, *, interpret: bool = False, log: bool = True) -> str:
    """The implementation `impl` resolves to for this device and shape ("xla" or "triton")."""
    return dispatch.select_impl("decode_attention", impl, interpret=interpret, log=log,
                                unsupported=_unsupported(q_dtype, head_dim), preference=("triton",))


def explain_auto() -> dict[str, tuple[str, str]]:
    """What `impl="auto"` picks here for bf16 head_dim 128, and why."""
    return {"bf16 d128": dispatch.explain("decode_attention", unsupported=_unsupported(jnp.bfloat16, 128),
                                          preference=("triton",))}


def _check_common(q, k, v, lengths, starts, name):
    if q.ndim != 3:
        raise ValueError(f"{name}: q must be [batch, q_heads, head_dim], got {q.shape}")
    if jnp.dtype(q.dtype) not in _FLOATS + (jnp.dtype(jnp.float64),):
        raise ValueError(f"{name}: q dtype {q.dtype} is not a float type")
    if k.shape != v.shape or k.dtype != v.dtype:
        raise ValueError(f"{name}: k {k.shape} {k.dtype} and v {v.shape} {v.dtype} must match")
    hkv, d = k.shape[-2], k.shape[-1]
    if d != q.shape[2] or q.shape[1] % hkv:
        raise ValueError(f"{name}: q {q.shape} incompatible with kv heads {hkv} / head_dim {d} (k {k.shape})")
    b = q.shape[0]
    for nm, a in (("lengths", lengths), ("starts", starts)):
        if a is not None and (a.shape != (b,) or not jnp.issubdtype(a.dtype, jnp.integer)):
            raise ValueError(f"{name}: {nm} must be int [batch={b}], got {a.shape} {a.dtype}")


def _layer_arg(layer, ndim, want):
    if ndim == want + 1:
        return jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(1)
    if layer is not None:
        raise ValueError(f"layer={layer!r} given but the cache has no layer axis")
    return None


# ----------------------------------------------------------------------------- Triton kernel

def _kernel(layer_ref, rng_ref, pt_ref, valid_ref, q_ref, k_ref, v_ref, ks_ref, vs_ref, *out_refs,
            paged, g, gp, d, dp, bk, ps, splits, scale2):
    b = pl.program_id(0)
    h = pl.program_id(1)
    s = pl.program_id(2)
    layer = layer_ref[0]
    lo = rng_ref[b, 0]
    hi = jnp.maximum(rng_ref[b, 1], lo)
    n_blk = pl.cdiv(hi - lo, bk)
    per = pl.cdiv(n_blk, splits)
    first = lo + s * per * bk
    end = jnp.minimum(hi, first + per * bk)
    gi = jnp.arange(gp)
    di = jnp.arange(dp)
    g_ok = gi < g
    d_ok = di < d
    qm = g_ok[:, None] & d_ok[None, :]
    q = plt.load(q_ref.at[b, h * g + gi[:, None], di[None, :]], mask=qm, other=0.0)
    kv_dtype = q.dtype

    def body(j, carry):
        acc, m_i, l_i = carry
        pos = first + j * bk + jnp.arange(bk)
        ok = pos < end
        if paged:
            page = plt.load(pt_ref.at[b, pos // ps], mask=ok, other=0)
            off = pos % ps
            idx = (layer, page[:, None], off[:, None], h, di[None, :])
            sidx = (layer, page, off, h)
        else:
            valid = plt.load(valid_ref.at[b, pos], mask=ok, other=0)
            ok = ok & (valid != 0)
            idx = (layer, b, pos[:, None], h, di[None, :])
        kvm = ok[:, None] & d_ok[None, :]
        k = plt.load(k_ref.at[idx], mask=kvm, other=0.0).astype(kv_dtype)
        v = plt.load(v_ref.at[idx], mask=kvm, other=0.0).astype(kv_dtype)
        sc = _dot(q, k, tb=True) * scale2  # [gp, bk], log2 domain
        if ks_ref is not None:
            sc = sc * plt.load(ks_ref.at[sidx], mask=ok, other=0.0)[None, :]
        sc = jnp.where(ok[None, :], sc, -jnp.inf)
        m_new = jnp.maximum(m_i, jnp.max(sc, axis=1))
        alpha = jnp.exp2(m_i - m_new)
        p = jnp.exp2(sc - m_new[:, None])
        l_i = l_i * alpha + jnp.sum(p, axis=1)
        if vs_ref is not None:
            p = p * plt.load(vs_ref.at[sidx], mask=ok, other=0.0)[None, :]
        acc = acc * alpha[:, None] + _dot(p.astype(kv_dtype), v)
        return acc, m_new, l_i

    init = (jnp.zeros((gp, dp), _F32), jnp.full((gp,), _M_INIT, _F32), jnp.zeros((gp,), _F32))
    acc, m_i, l_i = lax.fori_loop(0, pl.cdiv(jnp.maximum(end - first, 0), bk), body, init)
    if splits == 1:
        (o_ref,) = out_refs
        out = acc / jnp.where(l_i == 0.0, 1.0, l_i)[:, None]
        plt.store(o_ref.at[b, h * g + gi[:, None], di[None, :]], out.astype(o_ref.dtype), mask=qm)
    else:
        acc_ref, m_ref, l_ref = out_refs
        acc_ref[...] = acc
        m_ref[...] = m_i
        l_ref[...] = l_i


def _dot(a, b, tb=False):
    prec = lax.Precision.HIGHEST if a.dtype == _F32 else None
    return lax.dot_general(a, b, (((1,), (1 if tb else 0,)), ((), ())), preferred_element_type=_F32,
                           precision=prec)


def _compiler_params(num_warps: int, num_stages: int):
    cls = getattr(plt, "CompilerParams", None) or getattr(plt, "TritonCompilerParams")
    return cls(num_warps=num_warps, num_stages=num_stages)


def _heuristic_splits(b: int, hkv: int, max_slots: int, bk: int) -> int:
    cores = dispatch.device_info().core_count or 132
    programs = b * hkv
    blocks = pl.cdiv(max_slots, bk)
    if programs >= 2 * cores or blocks < 16:
        return 1
    return int(max(1, min(pl.cdiv(4 * cores, programs), blocks // 8)))


def _triton(q, k, v, ks, vs, page_table, kv_valid, ranges, layer, *, paged, sm_scale, blocks, interpret):
    b, hq, d = q.shape
    hkv = k.shape[-2]
    g = hq // hkv
    gp = max(16, pl.next_power_of_2(g))
    dp = pl.next_power_of_2(d)
    if paged:
        ps = k.shape[-3]
        max_slots = page_table.shape[1] * ps
    else:
        ps = 1
        max_slots = k.shape[-3]
    bk = blocks.block_k if not interpret else min(blocks.block_k, 16)
    splits = blocks.num_splits or _heuristic_splits(b, hkv, max_slots, bk)
    if layer is None:  # add a unit layer axis (a free reshape) so one kernel serves both layouts
        k, v = k[None], v[None]
        ks = None if ks is None else ks[None]
        vs = None if vs is None else vs[None]
        layer = jnp.zeros((1,), jnp.int32)
    kern = functools.partial(_kernel, paged=paged, g=g, gp=gp, d=d, dp=dp, bk=bk, ps=ps, splits=splits,
                             scale2=float(sm_scale * _LOG2E))
    args = [layer, ranges, page_table, kv_valid, q, k, v, ks, vs]
    present = [a is not None for a in args]
    kern_in = [a for a in args if a is not None]

    def kernel(*refs):
        it = iter(refs[:len(kern_in)])
        full = [next(it) if p else None for p in present]
        return kern(*full, *refs[len(kern_in):])

    anyspec = pl.BlockSpec(memory_space=pl.ANY) if hasattr(pl, "ANY") else None
    in_specs = [anyspec] * len(kern_in)
    if splits == 1:
        out_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
        out_specs = anyspec
    else:
        part = (b, hkv, splits)
        out_shape = [jax.ShapeDtypeStruct(part + (gp, dp), _F32), jax.ShapeDtypeStruct(part + (gp,), _F32),
                     jax.ShapeDtypeStruct(part + (gp,), _F32)]
        out_specs = [pl.BlockSpec((None, None, None, gp, dp), lambda i, j, s: (i, j, s, 0, 0)),
                     pl.BlockSpec((None, None, None, gp), lambda i, j, s: (i, j, s, 0)),
                     pl.BlockSpec((None, None, None, gp), lambda i, j, s: (i, j, s, 0))]
    out = pl.pallas_call(
        kernel, grid=(b, hkv, splits), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=_compiler_params(blocks.num_warps, blocks.num_stages), interpret=interpret,
        name="paged_decode_attention" if paged else "dense_decode_attention",
    )(*kern_in)
    if splits == 1:
        return out
    acc, m, l = out  # combine the splits by logsumexp (log2 domain)
    mx = jnp.max(m, axis=2, keepdims=True)
    w = jnp.exp2(m - mx)
    num = jnp.sum(acc * w[..., None], axis=2)
    den = jnp.sum(l * w, axis=2)
    o = num / jnp.where(den == 0.0, 1.0, den)[..., None]
    return o[:, :, :g, :d].reshape(b, hq, d).astype(q.dtype)


# ----------------------------------------------------------------------------- custom_vjp wrapper

@functools.partial(jax.custom_vjp, nondiff_argnums=(9,))
def _kernel_call(q, k, v, ks, vs, page_table, kv_valid, ranges, layer, cfg):
    paged, sm_scale, blocks, interpret = cfg
    return _triton(q, k, v, ks, vs, page_table, kv_valid, ranges, layer, paged=paged, sm_scale=sm_scale,
                   blocks=blocks, interpret=interpret)


def _ref_call(q, k, v, ks, vs, page_table, kv_valid, ranges, layer, cfg):
    paged, sm_scale = cfg[:2]
    lay = 0 if layer is None else layer[0]
    if paged:
        return reference_paged(q, k, v, page_table, ranges[:, 1], starts=ranges[:, 0], layer=lay, k_scale=ks,
                               v_scale=vs, sm_scale=sm_scale)
    return reference_dense(q, k, v, ranges[:, 1], starts=ranges[:, 0], kv_valid=kv_valid, layer=lay,
                           sm_scale=sm_scale)


def _kernel_fwd(q, k, v, ks, vs, page_table, kv_valid, ranges, layer, cfg):
    out = _kernel_call(q, k, v, ks, vs, page_table, kv_valid, ranges, layer, cfg)
    return out, (q, k, v, ks, vs, page_table, kv_valid, ranges, layer)


def _kernel_bwd(cfg, res, ct):
    q, k, v, ks, vs, page_table, kv_valid, ranges, layer = res
    _, vjp = jax.vjp(lambda q, k, v: _ref_call(q, k, v, ks, vs, page_table, kv_valid, ranges, layer, cfg), q, k, v)
    return (*vjp(ct), None, None, None, None, None, None)


_kernel_call.defvjp(_kernel_fwd, _kernel_bwd)


# ----------------------------------------------------------------------------- public API

def paged_decode_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
                           lengths: jax.Array, *, starts: Optional[jax.Array] = None, layer: Any = None,
                           k_scale: Optional[jax.Array] = None, v_scale: Optional[jax.Array] = None,
                           sm_scale: Optional[float] = None, impl: str = "auto", interpret: bool = False,
                           blocks: DecodeBlocks = DecodeBlocks()) -> jax.Array:
    """q [B, Hq, D] over pages k/v [(L,) P, page_size, Hkv, D] -> [B, Hq, D]; slots [starts, lengths) visible."""
    _check_common(q, k_pages, v_pages, lengths, starts, "paged_decode_attention")
    if k_pages.ndim not in (4, 5):
        raise ValueError(f"paged_decode_attention: k_pages must be [(L,) P, page_size, Hkv, D], got {k_pages.shape}")
    if page_table.ndim != 2 or page_table.shape[0] != q.shape[0] or not jnp.issubdtype(page_table.dtype, jnp.integer):
        raise ValueError(f"paged_decode_attention: page_table must be int [batch={q.shape[0]}, max_pages], "
                         f"got {page_table.shape} {page_table.dtype}")
    fp8 = jnp.dtype(k_pages.dtype) == _FP8
    if fp8 != (k_scale is not None) or (k_scale is None) != (v_scale is None):
        raise ValueError("paged_decode_attention: float8 pages need k_scale and v_scale (and only they do)")
    if fp8 and (k_scale.shape != k_pages.shape[:-1] or v_scale.shape != v_pages.shape[:-1]):
        raise ValueError(f"paged_decode_attention: scales {k_scale.shape}/{v_scale.shape} must be "
                         f"{k_pages.shape[:-1]} (one per page slot and kv head)")
    if not fp8 and k_pages.dtype != q.dtype:
        raise ValueError(f"paged_decode_attention: pages dtype {k_pages.dtype} != q dtype {q.dtype} (or fp8)")
    sm_scale = float(q.shape[-1] ** -0.5 if sm_scale is None else sm_scale)
    starts = jnp.zeros_like(lengths) if starts is None else starts
    chosen = choose_impl(impl, q.dtype, q.shape[-1], interpret=interpret)
    lay = _layer_arg(layer, k_pages.ndim, 4)
    ranges = jnp.stack([starts, lengths], axis=1).astype(jnp.int32)
    pt = page_table.astype(jnp.int32)
    if chosen == "xla":
        return _ref_call(q, k_pages, v_pages, k_scale, v_scale, pt, None, ranges, lay, (True, sm_scale))
    return _kernel_call(q, k_pages, v_pages, k_scale, v_scale, pt, None, ranges, lay,
                        (True, sm_scale, blocks, bool(interpret)))


def impl_for_model(attn_impl: str) -> str:
    """The decode impl for a model's `attn_impl`: "xla" stays XLA; any other setting (auto / pallas / triton /
    mosaic, which name the flash-attention kernel) lets the dispatcher pick, so decoding never raises."""
    return "xla" if attn_impl == "xla" else "auto"


def use_for_step(attn_impl: str, q: jax.Array, bias: Any = None) -> bool:
    """True when a one-token step q [B, 1, Hq, D] (no additive bias) should run the Pallas decode kernel."""
    if q.shape[1] != 1 or bias is not None:
        return False
    return choose_impl(impl_for_model(attn_impl), q.dtype, q.shape[-1], log=False) != "xla"


def dense_cache_step(q: jax.Array, ck: jax.Array, cv: jax.Array, *, layer: Any, cache_index: Any,
                     kv_valid: Optional[jax.Array], window: Any, attn_impl: str = "auto") -> jax.Array:
    """One decode step q [B, 1, Hq, D] over the decoder's dense cache [L, B, S, Hkv, D] -> [B, 1, Hq, D].

    The masked-attention visibility at query slot `cache_index`: slots <= cache_index, inside `window`
    (int, None, or traced with 0 = none) and `kv_valid`.
    """
    b = q.shape[0]
    hi = jnp.full((b,), jnp.asarray(cache_index, jnp.int32) + 1)
    lo = jnp.zeros((b,), jnp.int32)
    if window is not None:
        w = jnp.asarray(window, jnp.int32)
        lo = jnp.where(w > 0, jnp.maximum(hi - w, 0), 0)
    out = decode_attention(q[:, 0], ck, cv, hi, starts=lo, kv_valid=kv_valid, layer=layer,
                           impl=impl_for_model(attn_impl))
    return out[:, None]


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, *,
                     starts: Optional[jax.Array] = None, kv_valid: Optional[jax.Array] = None, layer: Any = None,
                     sm_scale: Optional[float] = None, impl: str = "auto", interpret: bool = False,
                     blocks: DecodeBlocks = DecodeBlocks()) -> jax.Array:
    """q [B, Hq, D] over a dense cache k/v [(L,) B, S, Hkv, D] -> [B, Hq, D]; slots [starts, lengths)
    (and `kv_valid` [B, S] where given) visible."""
    _check_common(q, k, v, lengths, starts, "decode_attention")
    if k.ndim not in (4, 5) or k.shape[-4] != q.shape[0]:
        raise ValueError(f"decode_attention: k must be [(L,) batch={q.shape[0]}, S, Hkv, D], got {k.shape}")
    if k.dtype != q.dtype:
        raise ValueError(f"decode_attention: cache dtype {k.dtype} != q dtype {q.dtype}")
    if kv_valid is not None and kv_valid.shape != (q.shape[0], k.shape[-3]):
        raise ValueError(f"decode_attention: kv_valid must be [batch, S] = {(q.shape[0], k.shape[-3])}, "
                         f"got {kv_valid.shape}")
    sm_scale = float(q.shape[-1] ** -0.5 if sm_scale is None else sm_scale)
    starts = jnp.zeros_like(lengths) if starts is None else starts
    chosen = choose_impl(impl, q.dtype, q.shape[-1], interpret=interpret)
    lay = _layer_arg(layer, k.ndim, 4)
    ranges = jnp.stack([starts, lengths], axis=1).astype(jnp.int32)
    if chosen == "xla":
        return _ref_call(q, k, v, None, None, None, kv_valid, ranges, lay, (False, sm_scale))
    valid = jnp.ones((q.shape[0], k.shape[-3]), jnp.int8) if kv_valid is None else kv_valid.astype(jnp.int8)
    return _kernel_call(q, k, v, None, None, None, valid, ranges, lay, (False, sm_scale, blocks, bool(interpret)))
