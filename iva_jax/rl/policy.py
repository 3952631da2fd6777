"""The decoder as an RL policy: full fine-tuning or LoRA, an optional scalar head, and the
teacher-forced forward that recomputes response log-probs (TRL / verl: one forward over
prompt + response, logits / temperature, log-softmax at the sampled tokens).

Trainable params are a dict {"lm": decoder params (or LoRA adapters), "head": ScalarHead params
(value head / reward-model score, when `head=True`)}; under LoRA the base decoder rides along as
the frozen tree and doubles as the frozen reference (no second copy).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from iva_jax.config import dtype_of
from iva_jax.rl.policy_losses import entropy_from_logits, logprobs_from_logits
from iva_jax.train.lora import LoRAConfig, init_lora, merge_lora

Array = jnp.ndarray


class ScalarHead(nn.Module):
    """hidden [..., D] -> scalar [...] in float32 (TRL's ValueHead / a reward model's score layer)."""

    init_std: float = 0.02

    @nn.compact
    def __call__(self, hidden: Array) -> Array:
        d = hidden.shape[-1]
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(self.init_std),
                                                                   ("embed", None)), (d, 1))
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (None,)), (1,))
        return (jnp.dot(hidden.astype(jnp.float32), kernel.astype(jnp.float32)) + bias.astype(jnp.float32))[..., 0]


def cast_floating(tree: Any, dtype) -> Any:
    """Floating leaves of `tree` cast to `dtype` (integers untouched)."""
    return jax.tree_util.tree_map(
        lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree)


def last_token_index(attention_mask: Array) -> Array:
    """Index of the last real token in each row of a [B, S] mask (left or right padding)."""
    m = jnp.asarray(attention_mask).astype(bool)
    t = jnp.arange(m.shape[-1])
    return jnp.max(jnp.where(m, t, -1), axis=-1).clip(0)


@dataclasses.dataclass(frozen=True)
class Policy:
    """A `Transformer` (anything with `apply(..., return_hidden=True)` and an `unembed` method) as a policy.

    Hashable, so it can be a static argument of jitted functions.  `lora` trains adapters only;
    `head` adds a ScalarHead on the final normed hidden state.
    """

    model: Any
    lora: Optional[LoRAConfig] = None
    head: bool = False
    head_init_std: float = 0.02

    @property
    def compute_dtype(self):
        return dtype_of(self.model.config.dtype)

    def init_params(self, lm_params: Any, rng: jax.Array) -> Tuple[Dict[str, Any], Any]:
        """(trainable params, frozen) from pretrained decoder params: {"lm", ["head"]}, LoRA base or None."""
        k_lora, k_head = jax.random.split(rng)
        lm_params = nn.meta.unbox(lm_params)
        params: Dict[str, Any] = {"lm": init_lora(lm_params, self.lora, k_lora) if self.lora else lm_params}
        if self.head:
            d = self.model.config.hidden_size
            params["head"] = nn.meta.unbox(ScalarHead(self.head_init_std).init(k_head, jnp.zeros((1, d)))["params"])
        return nn.meta.unbox(params), (lm_params if self.lora else None)

    def decoder_params(self, params: Dict[str, Any], frozen: Any) -> Any:
        """The decoder params the forward uses (LoRA merged into the frozen base when enabled)."""
        if self.lora is None:
            return params["lm"]
        if frozen is None:
            raise ValueError("a LoRA policy needs the frozen base params")
        return merge_lora(frozen, params["lm"], self.lora)

    def hidden(self, dec_params: Any, input_ids: Array, attention_mask: Array) -> Array:
        """Final normed hidden states [B, S, D] (the logits of the full forward are dead code under jit)."""
        _, h = self.model.apply({"params": dec_params}, input_ids, attention_mask, return_hidden=True)
        return h

    def unembed(self, dec_params: Any, hidden: Array) -> Array:
        return self.model.apply({"params": dec_params}, hidden, method="unembed")

    def head_apply(self, params: Dict[str, Any], hidden: Array) -> Array:
        if "head" not in params:
            raise ValueError("this policy has no scalar head (Policy(head=True))")
        return ScalarHead(self.head_init_std).apply({"params": params["head"]}, hidden)


def response_forward(policy: Policy, dec_params: Any, input_ids: Array, attention_mask: Array, prompt_len: int,
                     responses: Array, temperature: float = 1.0) -> Dict[str, Array]:
    """One teacher-forced forward over prompt + response: per response token t (predicted at
    position prompt_len - 1 + t) the log-prob of `responses[:, t]` under softmax(logits / temperature),
    the entropy of that distribution, the hidden state that emitted it and the scaled logits.

    input_ids [B, P + T] (prompt left-padded, then the T response slots); responses [B, T].
    Equals the sampler's log-probs when top-k / top-p / repetition penalty are off.
    """
    b, s = input_ids.shape
    t = responses.shape[-1]
    if responses.shape[0] != b or prompt_len + t != s or prompt_len < 1:
        raise ValueError(f"input_ids {input_ids.shape} must be prompt ({prompt_len}) + responses {responses.shape}")
    h = policy.hidden(dec_params, input_ids, attention_mask)
    h = jax.lax.dynamic_slice_in_dim(h, prompt_len - 1, t, axis=1)
    logits = policy.unembed(dec_params, h).astype(jnp.float32) / temperature
    return {"logp": logprobs_from_logits(logits, responses), "entropy": entropy_from_logits(logits),
            "hidden": h, "logits": logits}


def sequence_logprobs(policy: Policy, dec_params: Any, input_ids: Array, attention_mask: Array,
                      loss_mask: Array, average: bool = False) -> Array:
    """Sum (or mean) over positions t with loss_mask[t] of log p(input_ids[t] | input_ids[:t]): [B].

    loss_mask [B, S] is aligned with input_ids (1 on the response tokens, as DPO's labels).
    """
    if input_ids.shape != loss_mask.shape or input_ids.shape != attention_mask.shape:
        raise ValueError(f"input_ids {input_ids.shape}, attention_mask {attention_mask.shape}, loss_mask "
                         f"{loss_mask.shape} must match")
    h = policy.hidden(dec_params, input_ids, attention_mask)[:, :-1]
    logits = policy.unembed(dec_params, h).astype(jnp.float32)
    m = loss_mask[:, 1:].astype(jnp.float32)
    logp = logprobs_from_logits(logits, input_ids[:, 1:]) * m
    total = jnp.sum(logp, axis=-1)
    return total / jnp.maximum(jnp.sum(m, axis=-1), 1.0) if average else total


def sequence_scores(policy: Policy, params: Dict[str, Any], dec_params: Any, input_ids: Array,
                    attention_mask: Array) -> Array:
    """Scalar head on the hidden state of each row's last real token: [B] (reward model / value of a sequence)."""
    h = policy.hidden(dec_params, input_ids, attention_mask)
    idx = last_token_index(attention_mask)
    last = jnp.take_along_axis(h, idx[:, None, None], axis=1)[:, 0]
    return policy.head_apply(params, last)
