"""Autoregressive generation with a preallocated KV cache: one jitted prefill, one jitted decode step.

`generate` runs the whole decode loop on device (a `lax.while_loop` inside one jit, no Python per
token).  `generate_stream` yields each step's tokens for interactive use, calling the same jitted
step functions (one dispatch per token, the cache donated so it is updated in place).
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from iva_jax.inference.kv_cache import KVCache
from iva_jax.inference.sampling import SamplingConfig, sample

EosArg = Union[None, int, Sequence[int]]


def _eos_tuple(model, eos_token_id: EosArg) -> Tuple[int, ...]:
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id
    if eos_token_id is None:
        return ()
    return (int(eos_token_id),) if isinstance(eos_token_id, (int, np.integer)) else tuple(int(e) for e in eos_token_id)


def _pad_id(model, pad_token_id: Optional[int], eos: Tuple[int, ...]) -> int:
    if pad_token_id is not None:
        return int(pad_token_id)
    if model.config.pad_token_id is not None:
        return int(model.config.pad_token_id)
    return eos[0] if eos else 0


def _key(seed: Union[int, jax.Array]) -> jax.Array:
    if isinstance(seed, (int, np.integer)):
        return jax.random.PRNGKey(int(seed))
    return jnp.asarray(seed)


def _check_inputs(model, input_ids, attention_mask, max_new_tokens: int):
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integers, got {input_ids.dtype}")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    vocab = model.config.vocab_size
    ids_np = np.asarray(input_ids)
    if ids_np.size and (ids_np.min() < 0 or ids_np.max() >= vocab):
        raise ValueError(f"input_ids out of range [0, {vocab}): min {ids_np.min()}, max {ids_np.max()}")
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    attention_mask = jnp.asarray(attention_mask).astype(jnp.int32)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}")
    m = np.asarray(attention_mask)
    if not (m.sum(axis=1) > 0).all():
        raise ValueError("every row needs at least one real token (attention_mask all zero in some row)")
    if (np.diff(m, axis=1) < 0).any():
        raise ValueError("attention_mask must be left-padded (zeros before ones in each row)")
    return input_ids.astype(jnp.int32), attention_mask


def _seen_init(input_ids, mask, vocab: int) -> jnp.ndarray:
    b = input_ids.shape[0]
    seen = jnp.zeros((b, vocab), bool)
    return seen.at[jnp.arange(b)[:, None], input_ids].max(mask.astype(bool))


def as_variables(params: Any) -> Dict[str, Any]:
    """The variables dict for `model.apply`: `params` itself when it already is one (a "params" entry plus
    model state such as an aux-loss-free router's "moe_stats", e.g. `{"params": p, **state.model_state}`),
    else {"params": params}."""
    if isinstance(params, Mapping) and "params" in params:
        return dict(params)
    return {"params": params}


def _prefill(model, params, input_ids, mask, rng, cache, sampling: SamplingConfig, use_seen: bool):
    logits, cache = model.apply(as_variables(params), input_ids, mask, cache=cache, last_logits_only=True)
    seen = _seen_init(input_ids, mask, model.config.vocab_size) if use_seen else None
    tok = sample(logits[:, -1], rng, seen, sampling)
    if use_seen:
        seen = seen.at[jnp.arange(tok.shape[0]), tok].set(True)
    return tok, cache, seen


def _decode(model, params, tok, rng, cache, seen, sampling: SamplingConfig):
    logits, cache = model.apply(as_variables(params), tok[:, None], jnp.ones_like(tok)[:, None], cache=cache)
    nxt = sample(logits[:, -1], rng, seen, sampling)
    if seen is not None:
        seen = seen.at[jnp.arange(nxt.shape[0]), nxt].set(True)
    return nxt, cache, seen


def decode_view(model, params, rows: int, enabled: bool = True):
    """(model, params) for the decode steps: `model.decode_view` (fused q/k/v and gate/up projections, weights
    in the compute dtype; the same numbers up to matmul rounding) where the model has one and `enabled`."""
    if enabled and hasattr(model, "decode_view"):
        variables = as_variables(params)
        view_model, view_params = model.decode_view(variables["params"], rows=rows)
        return view_model, (view_params if variables.keys() == {"params"} else {**variables, "params": view_params})
    return model, params


def generate_with_cache(model, params, input_ids, mask, rng, cache, *, max_new_tokens: int,
                        sampling: SamplingConfig, eos: Tuple[int, ...], pad_id: int, view: bool = True):
    """Prefill into `cache` (dense `KVCache` or paged), then the on-device decode loop (one `lax.while_loop`;
    EOS stops a row, all rows done stops the loop) on the decode view: new ids [B, max_new_tokens].

    Traced inside the callers' jit (`generate`, `generate_paged`), which own the cache construction.
    """
    b = input_ids.shape[0]
    use_seen = sampling.repetition_penalty not in (None, 1.0)
    rng, sub = jax.random.split(rng)
    tok, cache, seen = _prefill(model, params, input_ids, mask, sub, cache, sampling, use_seen)
    model, params = decode_view(model, params, b, view)  # once per call, outside the loop
    eos_arr = jnp.asarray(eos if eos else (-1,), jnp.int32)
    done = jnp.isin(tok, eos_arr)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)

    def cond(state):
        i, _, _, _, done, _, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, tok, cache, seen, done, out, rng = state
        sub = rng
        if not sampling.greedy:  # greedy draws nothing: no key split per step
            rng, sub = jax.random.split(rng)
        nxt, cache, seen = _decode(model, params, tok, sub, cache, seen, sampling)
        nxt = jnp.where(done, pad_id, nxt)
        out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], i, axis=1)
        done = done | jnp.isin(nxt, eos_arr)
        return i + 1, nxt, cache, seen, done, out, rng

    state = (jnp.asarray(1, jnp.int32), tok, cache, seen, done, out, rng)
    return jax.lax.while_loop(cond, body, state)[5]


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "sampling", "eos", "pad_id", "cache_len",
                                             "view"))
def _generate_jit(model, params, input_ids, mask, rng, *, max_new_tokens: int, sampling: SamplingConfig,
                  eos: Tuple[int, ...], pad_id: int, cache_len: int, view: bool):
    cache = KVCache.init(model.config, input_ids.shape[0], cache_len)
    return generate_with_cache(model, params, input_ids, mask, rng, cache, max_new_tokens=max_new_tokens,
                               sampling=sampling, eos=eos, pad_id=pad_id, view=view)


def generate(model, params, input_ids, max_new_tokens: int, *, attention_mask=None, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, min_p: Optional[float] = None,
             repetition_penalty: Optional[float] = None, eos_token_id: EosArg = None,
             pad_token_id: Optional[int] = None, seed: Union[int, jax.Array] = 0,
             cache_len: Optional[int] = None, fuse_projections: bool = True) -> jnp.ndarray:
    """New token ids [batch, max_new_tokens]; after a row's EOS (included) the row holds `pad_token_id`.

    `input_ids` [batch, seq] may be left-padded (`attention_mask` 0 on padding).  Temperature 0 is
    greedy.  `seed` is an int or a PRNG key (for fresh samples per step inside RL loops).  Everything
    runs in one jitted call (compiled once per shape and sampling settings).  `fuse_projections`: decode
    on `Transformer.decode_view` (fewer kernels per step; holds a fused copy of q/k/v and gate/up weights
    during the call; matmul rounding may differ from the unfused product in the last bit).
    """
    input_ids, mask = _check_inputs(model, input_ids, attention_mask, max_new_tokens)
    sampling = SamplingConfig(temperature=float(temperature), top_k=top_k, top_p=top_p, min_p=min_p,
                              repetition_penalty=repetition_penalty)
    eos = _eos_tuple(model, eos_token_id)
    need = input_ids.shape[1] + max_new_tokens
    cache_len = need if cache_len is None else cache_len
    if cache_len < need:
        raise ValueError(f"cache_len {cache_len} < prompt length + max_new_tokens = {need}")
    return _generate_jit(model, params, input_ids, mask, _key(seed), max_new_tokens=int(max_new_tokens),
                         sampling=sampling, eos=eos, pad_id=_pad_id(model, pad_token_id, eos), cache_len=cache_len,
                         view=bool(fuse_projections))


@functools.partial(jax.jit, static_argnames=("model", "sampling", "use_seen", "cache_len"))
def _prefill_jit(model, params, input_ids, mask, rng, *, sampling, use_seen, cache_len):
    cache = KVCache.init(model.config, input_ids.shape[0], cache_len)
    return _prefill(model, params, input_ids, mask, rng, cache, sampling, use_seen)


@functools.partial(jax.jit, static_argnames=("model", "sampling"), donate_argnames=("cache", "seen"))
def _decode_jit(model, params, tok, rng, cache, seen, *, sampling):
    return _decode(model, params, tok, rng, cache, seen, sampling)


def generate_stream(model, params, input_ids, max_new_tokens: int, *, attention_mask=None,
                    temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                    min_p: Optional[float] = None, repetition_penalty: Optional[float] = None,
                    eos_token_id: EosArg = None, pad_token_id: Optional[int] = None,
                    seed: Union[int, jax.Array] = 0, cache_len: Optional[int] = None,
                    fuse_projections: bool = True) -> Iterator[np.ndarray]:
    """Yield each step's tokens [batch] (numpy) as they are produced; stops when all rows hit EOS.

    Same semantics (and, for a given seed, the same tokens) as `generate`.
    """
    input_ids, mask = _check_inputs(model, input_ids, attention_mask, max_new_tokens)
    sampling = SamplingConfig(temperature=float(temperature), top_k=top_k, top_p=top_p, min_p=min_p,
                              repetition_penalty=repetition_penalty)
    eos = _eos_tuple(model, eos_token_id)
    pad = _pad_id(model, pad_token_id, eos)
    use_seen = sampling.repetition_penalty not in (None, 1.0)
    need = input_ids.shape[1] + max_new_tokens
    cache_len = need if cache_len is None else cache_len
    if cache_len < need:
        raise ValueError(f"cache_len {cache_len} < prompt length + max_new_tokens = {need}")
    rng, sub = jax.random.split(_key(seed))
    tok, cache, seen = _prefill_jit(model, params, input_ids, mask, sub, sampling=sampling, use_seen=use_seen,
                                    cache_len=cache_len)
    done = np.zeros(input_ids.shape[0], bool)
    eos_np = np.asarray(eos if eos else (-1,))
    for i in range(max_new_tokens):
        if i == 1:  # after the first token is out
            model, params = decode_view(model, params, input_ids.shape[0], fuse_projections)
        if i > 0:
            rng, sub = jax.random.split(rng)
            tok, cache, seen = _decode_jit(model, params, tok, sub, cache, seen, sampling=sampling)
        t = np.asarray(tok)
        t = np.where(done, pad, t)
        yield t
        done |= np.isin(t, eos_np)
        if done.all():
            return
        tok = jnp.asarray(t)
