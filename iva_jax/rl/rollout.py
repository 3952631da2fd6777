"""Rollouts: left-padded prompt batches, group sampling from the jitted `generate`, and the
response mask that stops at the first EOS (the EOS itself is a response token; what follows is
padding, which may be the same id as EOS, as in SmolLM2).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jnp.ndarray


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, length: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(ids, mask) int32 [n, length]: each sequence right-aligned, padding (mask 0) on the left.

    `length` defaults to the longest sequence; a longer or an empty sequence raises ValueError.
    """
    if not len(seqs):
        raise ValueError("left_pad needs at least one sequence")
    lens = [len(s) for s in seqs]
    if min(lens) == 0:
        raise ValueError(f"sequence {lens.index(0)} is empty")
    length = max(lens) if length is None else int(length)
    if max(lens) > length:
        raise ValueError(f"sequence of length {max(lens)} does not fit length={length}")
    ids = np.full((len(seqs), length), pad_id, np.int32)
    mask = np.zeros((len(seqs), length), np.int32)
    for i, s in enumerate(seqs):
        ids[i, length - len(s):] = np.asarray(s, np.int32)
        mask[i, length - len(s):] = 1
    return ids, mask


def response_mask(responses: Array, eos_token_id: Any) -> Array:
    """bool [B, T]: True up to and including the first EOS of each row (all True without an EOS).

    Works whether the padding after EOS is EOS itself or another id.  `eos_token_id`: int,
    sequence of ints, or None/() (then every position is valid).
    """
    responses = jnp.asarray(responses)
    if responses.ndim != 2:
        raise ValueError(f"responses must be [batch, T], got shape {responses.shape}")
    eos = () if eos_token_id is None else (
        (int(eos_token_id),) if np.ndim(eos_token_id) == 0 else tuple(int(e) for e in eos_token_id))
    if not eos:
        return jnp.ones(responses.shape, bool)
    is_eos = jnp.isin(responses, jnp.asarray(eos, responses.dtype)).astype(jnp.int32)
    before = jnp.cumsum(is_eos, axis=-1) - is_eos  # EOS tokens strictly before t
    return before == 0


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """Prompts ready to sample from: ids/mask int32 [n, P] left-padded, one metadata item per prompt."""

    ids: np.ndarray
    mask: np.ndarray
    metas: Tuple[Any, ...] = ()

    def __post_init__(self):
        ids, mask = np.asarray(self.ids), np.asarray(self.mask)
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise ValueError(f"prompt ids {ids.shape} and mask {mask.shape} must be the same [n, P]")
        if not (mask.sum(axis=1) > 0).all() or (np.diff(mask, axis=1) < 0).any():
            raise ValueError("prompt masks must be left-padded with at least one real token per row")
        if self.metas and len(self.metas) != ids.shape[0]:
            raise ValueError(f"{len(self.metas)} metas for {ids.shape[0]} prompts")
        object.__setattr__(self, "metas", tuple(self.metas))

    @classmethod
    def from_tokens(cls, seqs: Sequence[Sequence[int]], pad_id: int, length: Optional[int] = None,
                    metas: Sequence[Any] = ()) -> "PromptBatch":
        ids, mask = left_pad(seqs, pad_id, length)
        return cls(ids, mask, tuple(metas))

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def take(self, idx: Sequence[int]) -> "PromptBatch":
        """The prompts at `idx` (a list of indices), metadata included."""
        idx = np.asarray(idx)
        return PromptBatch(self.ids[idx], self.mask[idx], tuple(self.metas[i] for i in idx) if self.metas else ())


@dataclasses.dataclass(frozen=True)
class Rollout:
    """Sampled responses and everything the update needs; rows of a group are contiguous.

    prompt_ids/prompt_mask [N, P], responses/response_mask [N, T], metas (one per row),
    then the scored fields (old_logp, ref_logp, entropy, values [N, T]; rewards [N] the task's;
    scores [N] what the advantages see (rewards after shaping / KL-in-reward); advantages [N] or
    [N, T]; returns [N, T]).
    """

    prompt_ids: Array
    prompt_mask: Array
    responses: Array
    response_mask: Array
    metas: Tuple[Any, ...] = ()
    group_size: int = 1
    old_logp: Optional[Array] = None
    ref_logp: Optional[Array] = None
    entropy: Optional[Array] = None
    values: Optional[Array] = None
    rewards: Optional[Array] = None
    scores: Optional[Array] = None
    advantages: Optional[Array] = None
    returns: Optional[Array] = None

    def replace(self, **kw) -> "Rollout":
        return dataclasses.replace(self, **kw)

    @property
    def prompt_len(self) -> int:
        return int(self.prompt_ids.shape[1])

    @property
    def input_ids(self) -> Array:
        return jnp.concatenate([jnp.asarray(self.prompt_ids), jnp.asarray(self.responses)], axis=1)

    @property
    def attention_mask(self) -> Array:
        return jnp.concatenate([jnp.asarray(self.prompt_mask), jnp.asarray(self.response_mask).astype(jnp.int32)],
                               axis=1)

    def texts(self, decode: Callable[[List[int]], str]) -> List[str]:
        """Decoded responses (valid tokens only)."""
        r, m = np.asarray(self.responses), np.asarray(self.response_mask).astype(bool)
        return [decode(r[i][m[i]].tolist()) for i in range(r.shape[0])]


def repeat_prompts(prompts: PromptBatch, group_size: int) -> PromptBatch:
    """Each prompt `group_size` times in a row (GRPO groups are contiguous)."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    idx = np.repeat(np.arange(len(prompts)), group_size)
    return prompts.take(idx)


def sample_rollout(model: Any, dec_params: Any, prompts: PromptBatch, *, group_size: int, max_new_tokens: int,
                   temperature: float, key: jax.Array, top_k: Optional[int] = None, top_p: Optional[float] = None,
                   eos_token_id: Any = None, pad_token_id: Optional[int] = None) -> Rollout:
    """G samples per prompt from the jitted `generate`; the response mask stops at the first EOS."""
    from iva_jax.inference.generate import generate

    rep = repeat_prompts(prompts, group_size)
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    responses = generate(model, dec_params, rep.ids, max_new_tokens, attention_mask=rep.mask,
                         temperature=temperature, top_k=top_k or None,
                         top_p=None if top_p is None or top_p >= 1.0 else top_p,
                         eos_token_id=eos, pad_token_id=pad_token_id, seed=key)
    return Rollout(jnp.asarray(rep.ids), jnp.asarray(rep.mask), responses, response_mask(responses, eos),
                   rep.metas, group_size)


def preference_batch(prompts: Sequence[Sequence[int]], chosen: Sequence[Sequence[int]],
                     rejected: Sequence[Sequence[int]], pad_id: int,
                     length: Optional[int] = None) -> Dict[str, np.ndarray]:
    """Pairs for DPO / the reward model: prompt + chosen and prompt + rejected, right-padded to `length`.

    Returns int32 [B, length] arrays chosen_/rejected_ ids, mask (attention) and loss_mask (1 on
    the response tokens, aligned with the ids).
    """
    if not (len(prompts) == len(chosen) == len(rejected)) or not len(prompts):
        raise ValueError(f"need equally many prompts ({len(prompts)}), chosen ({len(chosen)}) and rejected "
                         f"({len(rejected)}), at least one")
    total = [len(p) + max(len(c), len(r)) for p, c, r in zip(prompts, chosen, rejected)]
    length = max(total) if length is None else int(length)
    if max(total) > length:
        raise ValueError(f"a pair needs {max(total)} tokens, length={length}")
    out = {}
    for name, resp in (("chosen", chosen), ("rejected", rejected)):
        ids = np.full((len(prompts), length), pad_id, np.int32)
        mask, loss = np.zeros_like(ids), np.zeros_like(ids)
        for i, (p, r) in enumerate(zip(prompts, resp)):
            if not len(p) or not len(r):
                raise ValueError(f"pair {i}: empty prompt or {name} response")
            seq = list(p) + list(r)
            ids[i, :len(seq)] = seq
            mask[i, :len(seq)] = 1
            loss[i, len(p):len(seq)] = 1
        out.update({f"{name}_ids": ids, f"{name}_mask": mask, f"{name}_loss_mask": loss})
    return out


RewardFn = Callable[[Rollout], np.ndarray]


def text_reward_fn(decode: Callable[[List[int]], str],
                   score: Callable[[List[str], Sequence[Any]], np.ndarray]) -> RewardFn:
    """A reward function on decoded responses: `score(texts, metas) -> [N]` (e.g. AdditionTask.rewards)."""

    def reward(rollout: Rollout) -> np.ndarray:
        return np.asarray(score(rollout.texts(decode), rollout.metas), np.float32)

    return reward


def rollout_stats(rollout: Rollout) -> Dict[str, float]:
    """Response-length and score statistics of a rollout (host floats)."""
    lens = np.asarray(rollout.response_mask).sum(axis=1)
    out = {"response_length": float(lens.mean()), "response_length_max": float(lens.max())}
    if rollout.rewards is not None:
        s = np.asarray(rollout.rewards, np.float64)
        out.update(reward_mean=float(s.mean()), reward_std=float(s.std()))
    return out
