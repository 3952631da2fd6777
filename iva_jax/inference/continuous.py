"""Continuous batching over a paged KV cache: requests join and leave between decode steps.

A fixed decode batch of `max_batch` slots shares one page pool.  Each `step()`:
  1. admits queued requests into free slots while the pool has pages for their prompt: one jitted
     prefill per request (prompt left-padded to a multiple of `prefill_bucket`, so few shapes compile)
     writes its KV into freshly allocated pages and samples its first token;
  2. gives every running sequence the page its next token needs; when the pool is empty the most
     recently admitted other sequence is preempted (its pages freed, it is re-queued first with
     prompt + tokens so far, and recomputed on re-admission: vLLM's recompute preemption);
  3. runs one jitted decode step for all slots at once (free slots are masked out and write nothing);
  4. retires sequences that hit EOS or their max_new_tokens, returning their pages.
Greedy decoding gives each request exactly the tokens `generate` gives it alone.  Each request may
set its own temperature (0 = greedy); top-k / top-p / min-p come from the batcher's SamplingConfig.
`cancel(rid)` drops a request (e.g. a client that went away) and returns its pages.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from iva_jax.inference.generate import as_variables, decode_view
from iva_jax.inference.paged import PageAllocator, PagedKVCache, pages_needed
from iva_jax.inference.sampling import SamplingConfig, process_logits


@dataclasses.dataclass
class _Request:
    rid: int
    prompt: List[int]
    max_new_tokens: int
    eos: Tuple[int, ...]
    out: List[int] = dataclasses.field(default_factory=list)
    slot: Optional[int] = None
    pages: List[int] = dataclasses.field(default_factory=list)
    length: int = 0  # tokens in this slot's cache (ring mode: tokens seen)
    order: int = 0  # admission counter (preemption picks the youngest)
    temperature: float = 0.0
    prior: List[int] = dataclasses.field(default_factory=list)  # tokens generated before a preemption


def _pools(cache: PagedKVCache) -> Dict[str, Any]:
    return dict(k_pages=cache.k_pages, v_pages=cache.v_pages, k_scale=cache.k_scale, v_scale=cache.v_scale)


def _sample_rows(logits, rng, temps, sampling: SamplingConfig):
    """Per-row temperature (0 = greedy); the batch-wide top-k / top-p / min-p filters of `sampling`."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    t = jnp.where(temps > 0, temps, 1.0)[:, None]
    x = process_logits(logits.astype(jnp.float32) / t, None, sampling.replace(temperature=1.0))
    drawn = jax.random.categorical(rng, x, axis=-1).astype(jnp.int32)
    return jnp.where(temps > 0, drawn, greedy)


@functools.partial(jax.jit, static_argnames=("model", "sampling"), donate_argnames=("cache",))
def _prefill_row(model, params, cache, ids, mask, row_table, rng, temp, *, sampling):
    view = cache.replace(page_table=row_table, lengths=jnp.zeros((1,), jnp.int32), next_pos=jnp.zeros((1,), jnp.int32))
    logits, new = model.apply(as_variables(params), ids, mask, cache=view, last_logits_only=True)
    tok = _sample_rows(logits[:, -1], rng, temp[None], sampling)
    return tok[0], cache.replace(**_pools(new))


@functools.partial(jax.jit, static_argnames=("model", "sampling"), donate_argnames=("cache",))
def _decode_rows(model, params, cache, tok, active, rng, temps, *, sampling):
    logits, cache = model.apply(as_variables(params), tok[:, None], active[:, None], cache=cache)
    return _sample_rows(logits[:, -1], rng, temps, sampling), cache


class ContinuousBatcher:
    """Slot scheduler over a fixed decode batch and a shared page pool (see module docstring).

    Usage: `rid = b.submit(prompt_ids, max_new_tokens)`; then `b.run()` -> {rid: tokens}, or iterate
    `b.stream()` for (rid, token, finished) events as they happen.
    """

    def __init__(self, model, params, *, max_batch: int = 8, max_seq_len: int = 512, page_size: int = 16,
                 num_pages: Optional[int] = None, kv_dtype: Any = "auto", n_sink: int = 0,
                 window: Optional[int] = None, sampling: Optional[SamplingConfig] = None,
                 eos_token_id: Any = None, prefill_bucket: int = 32, seed: int = 0,
                 kernel_impl: Optional[str] = None, interpret: bool = False, fuse_projections: bool = True):
        """`fuse_projections`: decode steps run on `model.decode_view(params)` (fused q/k/v and gate/up
        matmuls, as `generate` does), which keeps a second copy of those weights for the batcher's life."""
        from iva_jax.inference.generate import _eos_tuple

        self.sampling = sampling or SamplingConfig()
        if self.sampling.repetition_penalty not in (None, 1.0):
            raise ValueError("repetition_penalty is not supported by continuous batching")
        if max_batch < 1 or max_seq_len < 1 or prefill_bucket < 1:
            raise ValueError(f"max_batch, max_seq_len, prefill_bucket must be >= 1, got {max_batch}, "
                             f"{max_seq_len}, {prefill_bucket}")
        self.model, self.params = model, params
        self.decode_model, self.decode_params = decode_view(model, params, max_batch, fuse_projections)
        self.max_batch, self.max_seq_len, self.page_size = max_batch, max_seq_len, page_size
        self.n_sink, self.window, self.prefill_bucket = n_sink, window, prefill_bucket
        self.max_pages = pages_needed(max_seq_len if window is None else n_sink + window, page_size)
        num_pages = max_batch * self.max_pages if num_pages is None else num_pages
        self.alloc = PageAllocator(num_pages)
        self.table = np.zeros((max_batch, self.max_pages), np.int32)
        self.cache = PagedKVCache.init(model.config, max_batch, self.max_pages, page_size=page_size,
                                       num_pages=num_pages, kv_dtype=kv_dtype, n_sink=n_sink, window=window,
                                       page_table=self.table, kernel_impl=kernel_impl, interpret=interpret)
        self.default_eos = _eos_tuple(model, eos_token_id)
        self.queue: Deque[_Request] = collections.deque()
        self.slots: List[Optional[_Request]] = [None] * max_batch
        self.results: Dict[int, List[int]] = {}
        self._tok = np.zeros(max_batch, np.int32)
        self._rng = jax.random.PRNGKey(seed)
        self._next_id = 0
        self._order = 0
        self.stats = collections.Counter()

    # ---- public API -----------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], max_new_tokens: int, eos_token_id: Any = None,
               temperature: Optional[float] = None) -> int:
        """Queue a request (temperature None = the batcher's; 0 = greedy); returns its id."""
        prompt = [int(t) for t in np.asarray(prompt).reshape(-1)]
        vocab = self.model.config.vocab_size
        if not prompt or min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt must be a non-empty list of ids in [0, {vocab})")
        if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if self.window is None and len(prompt) + max_new_tokens > self.max_seq_len:
            raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) > max_seq_len "
                             f"{self.max_seq_len}")
        if pages_needed(len(prompt) + max_new_tokens, self.page_size, self.n_sink, self.window) > self.alloc.num_pages:
            raise ValueError(f"a request of {len(prompt) + max_new_tokens} tokens needs more pages than the pool "
                             f"holds ({self.alloc.num_pages})")
        if eos_token_id is None:
            eos = self.default_eos
        elif isinstance(eos_token_id, (int, np.integer)):
            eos = (int(eos_token_id),)
        else:
            eos = tuple(int(e) for e in eos_token_id)
        temperature = self.sampling.temperature if temperature is None else float(temperature)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        rid = self._next_id
        self._next_id += 1
        self.queue.append(_Request(rid, prompt, int(max_new_tokens), eos, temperature=temperature))
        return rid

    def cancel(self, rid: int) -> bool:
        """Drop a queued or running request (its pages return to the pool); False if it is unknown or done."""
        for req in list(self.queue):
            if req.rid == rid:
                self.queue.remove(req)
                return True
        for req in self.slots:
            if req is not None and req.rid == rid:
                self._retire(req)
                return True
        return False

    @property
    def idle(self) -> bool:
        return not self.queue and all(s is None for s in self.slots)

    def step(self) -> List[Tuple[int, int, bool]]:
        """Admit, decode one token for every running sequence, retire; returns (rid, token, finished) events."""
        events: List[Tuple[int, int, bool]] = []
        self._admit(events)
        if any(s is not None for s in self.slots):
            self._grow()
            self._decode(events)
        return events

    def stream(self) -> Iterator[Tuple[int, int, bool]]:
        """(rid, token, finished) events until every submitted request is done."""
        while not self.idle:
            yield from self.step()

    def run(self) -> Dict[int, List[int]]:
        """Run until idle; {rid: generated tokens (EOS included when hit)} for the requests finished."""
        for _ in self.stream():
            pass
        return dict(self.results)

    # ---- internals ------------------------------------------------------------------------
    def _push_state(self) -> None:
        lengths = np.zeros(self.max_batch, np.int32)
        for i, s in enumerate(self.slots):
            if s is not None:
                lengths[i] = s.length
        self.cache = self.cache.replace(page_table=jnp.asarray(self.table), lengths=jnp.asarray(lengths),
                                        next_pos=jnp.asarray(lengths))

    def _key(self):
        self._rng, sub = jax.random.split(self._rng)
        return sub

    def _admit(self, events) -> None:
        while self.queue and None in self.slots:
            req = self.queue[0]
            need = pages_needed(len(req.prompt), self.page_size, self.n_sink, self.window)
            if need > self.alloc.num_free:
                if all(s is None for s in self.slots):
                    raise ValueError(f"request {req.rid} needs {need} pages, pool has {self.alloc.num_free} free")
                return
            self.queue.popleft()
            slot = self.slots.index(None)
            req.slot, req.pages = slot, self.alloc.alloc(need)
            req.order, self._order = self._order, self._order + 1
            self.table[slot] = 0
            self.table[slot, :need] = req.pages
            t = len(req.prompt)
            tb = -(-t // self.prefill_bucket) * self.prefill_bucket
            ids = np.zeros((1, tb), np.int32)
            mask = np.zeros((1, tb), np.int32)
            ids[0, tb - t:] = req.prompt
            mask[0, tb - t:] = 1
            tok, self.cache = _prefill_row(self.model, self.params, self.cache, jnp.asarray(ids), jnp.asarray(mask),
                                           jnp.asarray(self.table[slot:slot + 1]), self._key(),
                                           jnp.asarray(req.temperature, jnp.float32), sampling=self.sampling)
            self.stats["prefills"] += 1
            req.length = t
            self.slots[slot] = req
            self._emit(req, int(tok), events)

    def _grow(self) -> None:
        for req in sorted((s for s in self.slots if s is not None), key=lambda r: r.order):
            if req.slot is None:  # preempted during this loop
                continue
            need = pages_needed(req.length + 1, self.page_size, self.n_sink, self.window)
            while need > len(req.pages):
                if self.alloc.num_free == 0:
                    victims = [s for s in self.slots if s is not None and s is not req]
                    if not victims:
                        raise ValueError(f"request {req.rid} alone needs more pages than the pool holds")
                    self._preempt(max(victims, key=lambda r: r.order))
                    continue
                page = self.alloc.alloc(1)[0]
                self.table[req.slot, len(req.pages)] = page
                req.pages.append(page)

    def _preempt(self, req: _Request) -> None:
        self.alloc.free(req.pages)
        self.slots[req.slot] = None
        self.table[req.slot] = 0
        req.pages, req.slot = [], None
        req.prompt = req.prompt + req.out  # recompute on re-admission
        req.max_new_tokens -= len(req.out)
        req.length = 0
        req.prior = req.prior + req.out
        req.out = []
        self.queue.appendleft(req)
        self.stats["preemptions"] += 1

    def _decode(self, events) -> None:
        self._push_state()
        active = np.array([s is not None for s in self.slots], np.int32)
        temps = np.array([0.0 if s is None else s.temperature for s in self.slots], np.float32)
        nxt, self.cache = _decode_rows(self.decode_model, self.decode_params, self.cache, jnp.asarray(self._tok),
                                       jnp.asarray(active), self._key(), jnp.asarray(temps), sampling=self.sampling)
        nxt = np.asarray(nxt)
        self.stats["decode_steps"] += 1
        for i, req in enumerate(self.slots):
            if req is not None:
                req.length += 1
                self._emit(req, int(nxt[i]), events)

    def _emit(self, req: _Request, tok: int, events) -> None:
        req.out.append(tok)
        self._tok[req.slot] = tok
        finished = tok in req.eos or len(req.out) >= req.max_new_tokens
        events.append((req.rid, tok, finished))
        if finished:
            self.results[req.rid] = req.prior + req.out
            self._retire(req)

    def _retire(self, req: _Request) -> None:
        self.alloc.free(req.pages)
        self.slots[req.slot] = None
        self.table[req.slot] = 0
        req.pages, req.slot = [], None
