"""Decoder-only LM in flax.linen: Llama / Mistral / Qwen2 / Qwen3, the MoE families (Mixtral, Qwen2-MoE,
Qwen3-MoE) and SSM + attention hybrids, assembled from a `ModelConfig`.

Layers are heterogeneous: layer i is a pre-norm residual block
    h += mixer(input_layernorm(h));  h += ffn(post_attention_layernorm(h))
whose mixer is self-attention or an `iva_jax.ssm` mixer (`config.layer_mixers()`) and whose FFN is a dense
SwiGLU or an `iva_jax.moe.MoeBlock` (`config.layer_ffns()`, from `moe.moe_layer_mask`).

Parameter tree (HF names, `model.` prefix dropped).  Per layer (`<layer>` below):
  {input_layernorm,post_attention_layernorm}/scale [D]
  self_attn/{q,k,v,o}_proj/{kernel,bias} [in, out] (+ q_norm/k_norm/scale [hd])    attention layers
  mixer/...                                        SSM layers (iva_jax.ssm names, e.g. in_proj, conv1d, A_log)
  mlp/{gate,up,down}_proj/kernel [in, out]         dense FFN
  mlp/gate/kernel [D, E], mlp/experts/{gate,up}_proj [E, D, F], mlp/experts/down_proj [E, F, D],
  mlp/shared_expert/{gate,up,down}_proj/kernel, mlp/shared_expert_gate/kernel [D, 1]      MoE FFN
How layers are laid out (`layer_layout(config)`, `layer_param_location(config, i)`):
  * "scan" (all layers of one kind, e.g. every dense model): one `nn.scan` over `DecoderLayer`, every
    per-layer param stacked on a leading axis of L under `layers/<layer>`.
  * "block" (kinds repeat with a period 1 < P < L dividing L: MoE every other layer, mamba-mamba-attention):
    one `nn.scan` over a `DecoderBlock` of P sub-layers; layer i is sub-layer j = i % P of block i // P,
    params `layers/layer_{j}/<layer>` stacked over the L / P blocks.
  * "unrolled" (no period, or scan_layers=False): `layers_{i}/<layer>`.
  embed_tokens/embedding [V, D];  norm/scale [D];  lm_head/kernel [D, V] (absent when embeddings are tied)

Call contract: `model.apply({"params": p}, input_ids)` -> logits [B, S, V].  Optional arguments:
`attention_mask` [B, S] (1 = token, 0 = padding; left padding works), `positions` [B, S],
`segment_ids` [B, S] (packed sequences), `cache` (a `KVCache` or a paged `PagedKVCache`; then the result is
(logits, cache)), `return_hidden` (append the final normed hidden states), `return_layer_hidden` (append
every layer's output, the residual stream before the final norm, [L, B, S, D]: the scan's ys; HF's
`output_hidden_states` are (embeddings, layer_hidden[0], ..., layer_hidden[L-2], hidden)),
`last_logits_only` (logits of the last position only, [B, 1, V]), `inputs_embeds` (instead of input_ids),
`deterministic` (False = training: MoE router jitter from the "dropout" rng, Sinkhorn selection).
Outputs in this order: logits, cache, hidden, layer hidden.

Controller hooks (HRM, issue 5), explicit per-call inputs, differentiable, no module state:
  * `router_temperature`: scalar, [B] or [B, S]; every MoE layer routes with softmax(logits / tau).
  * `attn_sink_bias`: scalar, [B], [B, H] or per layer [L, B, H] (indexed by decoder layer; SSM layers
    ignore theirs): alpha added to the attention logits of the sink keys, A' = A + alpha * 1_sink.  Sink keys
    are the first `n_sink` (argument, default `config.n_sink`) tokens of each sequence: positions < n_sink
    without a cache (per packed segment when positions restart), the first n_sink valid slots with a dense
    cache.  A bias routes attention through the masked XLA path (`layers.attention.attend` falls back to
    it: the Pallas flash / decode kernels take no bias); a paged cache rejects it.

MoE losses and telemetry (the `iva_jax.train.step` model protocol): with the "losses" collection mutable
the model sows `moe/load_balancing` (aux_loss_coef * balancing loss) and `moe/z_loss` (z_loss_coef * mean
router z-loss over the MoE layers); with "metrics" mutable, `moe/{load_per_expert, overflow_pct,
route_entropy, load_std_over_mean}` (means over the MoE layers) and the unweighted losses.  The balancing
loss follows `config.moe_aux_loss_layers`: "hf" (default) is HF-exact (`load_balancing_loss_func`): f_e and
P_e are averaged over the MoE layers first and then combined, E * sum_e mean_l(f) * mean_l(P); "per_layer"
averages each layer's own E * sum_e f_e P_e (Switch / GShard), which balances every layer (under "hf" an
expert overloaded in one layer and idle in another looks balanced; prefer per_layer when training from
scratch).

Expert parallelism: `Transformer(config, mesh=mesh)` with a mesh whose `expert` axis is > 1 runs every MoE
layer through `iva_jax.moe.expert_parallel` (experts sharded over `expert`, tokens over data/fsdp/expert,
so batch * seq must divide by their product).  The mesh is a module attribute, not config (it is not YAML).

Decode cache (`KVCache`): KV for the attention layers only (leading axis = attention-layer ordinal, the
carry's counter, `config.num_attention_layers`) plus, for SSM layers, their recurrent states in `cache.ssm`
laid out like the params ({param prefix: state stacked over the scanned axis}, `init_ssm_states`), passed
through the layer scan as xs / ys since each layer reads and writes only its own.  With a cache an SSM layer
runs its parallel form from the cached state for a multi-token call (prefill, `return_state=True`; left
padding is masked out) and its recurrent `step` for a one-token call (decode; a row whose token has mask 0
keeps its state), so its memory per token is O(1).  Mixers without a recurrent state (hyena, topk_attention)
cannot run with a cache; the paged cache holds attention layers only.

Decode view (`Transformer.decode_view(params)`, what `generate` decodes on): the same decoder with
`self_attn/qkv_proj` (q, k, v kernels and biases concatenated on the output axis, [.., D, (Hq + 2 Hkv) hd])
and `mlp/gate_up_proj` ([.., D, 2F], gate first) instead of the HF-named projections, and projection /
embedding weights cast to the compute dtype once: fewer kernels per decode step.  A derived layout for
inference only; checkpoints, the bridge and training keep the HF names.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from iva_jax.config import ModelConfig, dtype_of
from iva_jax.inference.kv_cache import KVCache
from iva_jax.layers.attention import Attention
from iva_jax.layers.linear import Linear, default_kernel_init
from iva_jax.layers.mlp import MLP, swiglu_impl
from iva_jax.layers.norms import RMSNorm
from iva_jax.layers.remat import remat_policy
from iva_jax.layers.rotary import positions_from_mask, rope_cos_sin
from iva_jax.moe import MoeBlock
from iva_jax.moe import losses as moe_losses
from iva_jax.ssm import RECURRENT, make_mixer

MASKED_MIXERS = ("mamba", "mamba2", "retnet", "rwkv")  # SSM mixers taking mask=; the others get padding zeroed
MOE_LAYER_STATS = ("tokens_per_expert", "router_prob_per_expert", "z_loss", "load_per_expert", "overflow_pct",
                   "route_entropy", "load_std_over_mean", "expert_counts")


class LayerInputs(NamedTuple):
    """Per-call inputs every layer sees (broadcast over the scan); None where unused."""

    cos: jnp.ndarray
    sin: jnp.ndarray
    segment_ids: Optional[jnp.ndarray]
    cache_index: Optional[jnp.ndarray]
    kv_valid: Optional[jnp.ndarray]
    token_mask: Optional[jnp.ndarray]  # [B, T] bool: real tokens (MoE losses / capacity, SSM padding)
    token_ids: Optional[jnp.ndarray]  # [B, T] (hash router)
    router_temperature: Any  # None, scalar or [B, T]
    sink_keys: Optional[jnp.ndarray]  # [B, S] f32: 1 at attention-sink key slots


# ------------------------------------------------------------------------------------------------
# layers
# ------------------------------------------------------------------------------------------------
class DecoderLayer(nn.Module):
    """Pre-norm block: h += mixer(norm(h)); h += ffn(norm(h)).  Signature fits `nn.scan`.

    carry = (h, cache, attn_layer): the hidden states, the whole KV cache ((k, v) of [A, B, S, Hkv, hd], a
    paged step, or None) that each attention layer updates in place at its attention-layer ordinal
    `attn_layer`, and that ordinal.  layer_in = (window or None, sink bias [B, H] or None, SSM state or
    None): this layer's slice of the scanned inputs; a state (SSM layers with a cache) selects the cached
    path.  Returns (carry, (h or None, MoE stats or None, new SSM state or None)).
    """

    config: ModelConfig
    static_window: Optional[int] = None
    mixer: str = "attention"
    ffn: str = "dense"
    mesh: Optional[Mesh] = None
    fused_qkv: bool = False
    fused_gate_up: bool = False

    @nn.compact
    def __call__(self, carry, layer_in, ctx: LayerInputs, deterministic: bool = True, keep_hidden: bool = False):
        h, cache, attn_layer = carry
        layer_window, sink_bias, state = layer_in
        c = self.config
        dt, pdt = dtype_of(c.dtype), dtype_of(c.param_dtype)
        nkw = dict(eps=c.rms_norm_eps, dtype=dt, param_dtype=pdt, impl=c.norm_impl)
        x = RMSNorm(c.hidden_size, name="input_layernorm", **nkw)(h)
        if self.mixer == "attention":
            window = self.static_window if layer_window is None else layer_window
            bias = None
            if sink_bias is not None:  # [B, H] x [B, S] -> [B, H, 1, S]
                bias = sink_bias[:, :, None, None] * ctx.sink_keys[:, None, None, :]
            a, cache = Attention(c, self.fused_qkv, name="self_attn")(
                x, ctx.cos, ctx.sin, window=window, segment_ids=ctx.segment_ids, cache=cache, layer=attn_layer,
                cache_index=ctx.cache_index, kv_valid=ctx.kv_valid, bias=bias)
            attn_layer = attn_layer + 1
        else:
            mixer = make_mixer(c.ssm.replace(type=self.mixer), c.hidden_size, dtype=dt, param_dtype=pdt,
                               name="mixer")
            m = ctx.token_mask
            if state is not None and x.shape[1] == 1:  # decode: one recurrent step
                a, new = mixer.step(x[:, 0], state)
                a = a[:, None]
                if m is not None:  # a padded token leaves its row's state as it was
                    keep = lambda n, o: n if n.ndim == 0 else jnp.where(  # noqa: E731
                        m[:, 0].reshape((-1,) + (1,) * (n.ndim - 1)), n, o)
                    new = jax.tree_util.tree_map(keep, new, state)
                state = new
            elif state is not None:  # prefill (or a later chunk): parallel form from the cached state
                a, state = mixer(x, mask=m, state=state, return_state=True)
            elif self.mixer in MASKED_MIXERS:
                a = mixer(x, mask=m)
            else:
                a = mixer(x if m is None else x * m[..., None].astype(x.dtype))
        x, h = RMSNorm(c.hidden_size, name="post_attention_layernorm", **nkw).residual(a, h)
        stats = None
        if self.ffn == "moe":
            y, aux = MoeBlock(c.moe, c.hidden_size, dt, pdt, mesh=self.mesh, name="mlp")(
                x, router_temperature=ctx.router_temperature, deterministic=deterministic,
                token_ids=ctx.token_ids, mask=ctx.token_mask)
            stats = {k: aux[k] for k in MOE_LAYER_STATS}
        else:
            y = MLP(c.hidden_size, c.intermediate_size, c.mlp_bias, dt, pdt, impl=c.mlp_impl,
                    fused_gate_up=self.fused_gate_up, save_products=c.mlp_save_products, name="mlp")(x)
        h = h + y
        return (h, cache, attn_layer), (h if keep_hidden else None, stats, state)


def _layer_cls(config: ModelConfig, in_scan: bool):
    if config.remat == "none":
        return DecoderLayer
    # deterministic / keep_hidden (positions 4, 5 counting self) are Python bools
    return nn.remat(DecoderLayer, policy=remat_policy(config.remat), prevent_cse=not in_scan, static_argnums=(4, 5))


class DecoderBlock(nn.Module):
    """P consecutive layers `layer_{j}` of a periodic pattern: the body of the "block" layout's scan.

    layer_in = (windows [P] or None, sink bias [P, B, H] or None, SSM states: a P-tuple (None for attention
    sub-layers) or None); sub-layer j takes a traced window only where `dynamic_windows[j]` (its window
    differs across blocks), else its static window.
    """

    config: ModelConfig
    kinds: Tuple[Tuple[str, str], ...]
    static_windows: Tuple[Optional[int], ...]
    dynamic_windows: Tuple[bool, ...]
    mesh: Optional[Mesh] = None
    fused_qkv: bool = False
    fused_gate_up: bool = False

    @nn.compact
    def __call__(self, carry, layer_in, ctx: LayerInputs, deterministic: bool = True, keep_hidden: bool = False):
        windows, sinks, states = layer_in
        cls = _layer_cls(self.config, in_scan=True)
        ys = []
        for j, (mixer, ffn) in enumerate(self.kinds):
            w = windows[j] if windows is not None and self.dynamic_windows[j] else None
            s = None if sinks is None else sinks[j]
            st = None if states is None else states[j]
            carry, y = cls(self.config, self.static_windows[j], mixer, ffn, self.mesh, self.fused_qkv,
                           self.fused_gate_up, name=f"layer_{j}")(carry, (w, s, st), ctx, deterministic, keep_hidden)
            ys.append(y)
        return carry, tuple(ys)


class Telemetry(nn.Module):
    """Sows values into the "losses" and "metrics" collections under its own name (no-ops when immutable)."""

    @nn.compact
    def __call__(self, losses: Dict[str, jnp.ndarray], metrics: Dict[str, jnp.ndarray]) -> None:
        for k, v in losses.items():
            self.sow("losses", k, v)
        for k, v in metrics.items():
            self.sow("metrics", k, v)


# ------------------------------------------------------------------------------------------------
# layout
# ------------------------------------------------------------------------------------------------
def layer_period(config: ModelConfig) -> int:
    """Smallest P dividing num_hidden_layers with layer_kinds()[i] == layer_kinds()[i % P] for every i."""
    kinds = config.layer_kinds()
    n = len(kinds)
    for p in range(1, n + 1):
        if n % p == 0 and all(kinds[i] == kinds[i % p] for i in range(n)):
            return p
    return n


def layer_layout(config: ModelConfig) -> str:
    """"scan" (uniform layers), "block" (a periodic pattern, scanned in blocks) or "unrolled"."""
    if not config.scan_layers:
        return "unrolled"
    p = layer_period(config)
    return "scan" if p == 1 else "block" if p < config.num_hidden_layers else "unrolled"


def layer_param_location(config: ModelConfig, i: int) -> Tuple[str, Optional[int]]:
    """(param-tree prefix of layer i, index on its stacked axis or None): ("layers", i),
    ("layers/layer_{i % P}", i // P) or ("layers_{i}", None), per `layer_layout`."""
    if not 0 <= i < config.num_hidden_layers:
        raise ValueError(f"layer {i} out of range [0, {config.num_hidden_layers})")
    layout = layer_layout(config)
    if layout == "scan":
        return "layers", i
    if layout == "block":
        p = layer_period(config)
        return f"layers/layer_{i % p}", i // p
    return f"layers_{i}", None


# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------
class Transformer(nn.Module):
    """The decoder assembled from a `ModelConfig` (`mesh`: expert parallelism for the MoE layers).

    `fused_qkv` / `fused_gate_up`: the decode view's parameter layout (`decode_view`), not config.
    """

    config: ModelConfig
    mesh: Optional[Mesh] = None
    fused_qkv: bool = False
    fused_gate_up: bool = False

    def setup(self) -> None:
        c = self.config
        dt, pdt = dtype_of(c.dtype), dtype_of(c.param_dtype)
        self.embed_tokens = nn.Embed(
            c.vocab_size, c.hidden_size, dtype=dt, param_dtype=pdt,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
        L = c.num_hidden_layers
        kinds, windows = c.layer_kinds(), c.layer_windows()
        self._layout = layout = layer_layout(c)
        self._uniform_window = len(set(windows)) == 1
        fused = (self.fused_qkv, self.fused_gate_up)
        scan_kw = dict(variable_axes={"params": 0, "moe_stats": 0}, split_rngs={"params": True, "dropout": True},
                       in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                       metadata_params={nn.PARTITION_NAME: "layers"})
        if layout == "scan":
            static_window = windows[0] if self._uniform_window else None
            self.layers = nn.scan(_layer_cls(c, in_scan=True), length=L, unroll=min(c.scan_unroll, L), **scan_kw)(
                c, static_window, *kinds[0], self.mesh, *fused)
        elif layout == "block":
            p = layer_period(c)
            nb = L // p
            cols = [windows[j::p] for j in range(p)]
            dynamic = tuple(len(set(col)) > 1 for col in cols)
            static = tuple(None if d else col[0] for d, col in zip(dynamic, cols))
            self._dynamic_windows = any(dynamic)
            self.layers = nn.scan(DecoderBlock, length=nb, unroll=min(max(1, c.scan_unroll // p), nb), **scan_kw)(
                c, kinds[:p], static, dynamic, self.mesh, *fused)
        else:
            cls = _layer_cls(c, in_scan=False)
            self.layers = [cls(c, windows[i], *kinds[i], self.mesh, *fused, name=f"layers_{i}") for i in range(L)]
        self.norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=dt, param_dtype=pdt, impl=c.norm_impl)
        if not c.tie_word_embeddings:
            self.lm_head = Linear(c.hidden_size, c.vocab_size, ("embed", "vocab"), dtype=dt, param_dtype=pdt,
                                  kernel_init=default_kernel_init())
        if c.moe is not None:
            self.moe_telemetry = Telemetry(name="moe")

    def __call__(self, input_ids: Optional[jnp.ndarray] = None, attention_mask: Optional[jnp.ndarray] = None,
                 positions: Optional[jnp.ndarray] = None, cache: Optional[KVCache] = None, *,
                 segment_ids: Optional[jnp.ndarray] = None, inputs_embeds: Optional[jnp.ndarray] = None,
                 return_hidden: bool = False, last_logits_only: bool = False, deterministic: bool = True,
                 router_temperature: Any = None, attn_sink_bias: Any = None, n_sink: Optional[int] = None,
                 return_layer_hidden: bool = False):
        c = self.config
        h = self.embed(input_ids, inputs_embeds)
        b, t = h.shape[:2]
        if attention_mask is not None and attention_mask.shape != (b, t):
            raise ValueError(f"attention_mask shape {attention_mask.shape} != (batch, seq) {(b, t)}")
        if positions is not None and positions.shape != (b, t):
            raise ValueError(f"positions shape {positions.shape} != (batch, seq) {(b, t)}")
        if cache is not None and c.num_attention_layers != c.num_hidden_layers:
            _check_recurrent(c)
        mask = attention_mask if attention_mask is not None else jnp.ones((b, t), jnp.int32)
        paged = cache is not None and hasattr(cache, "begin")
        if attn_sink_bias is not None and paged:
            raise ValueError("attn_sink_bias is not supported with a paged KV cache (use the dense KVCache)")

        cache_index = kv_valid = None
        layer_caches = ssm_states = None
        if cache is None:
            if positions is None:
                positions = positions_from_mask(mask) if attention_mask is not None else \
                    jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            if attention_mask is not None:
                seg = mask.astype(jnp.int32)
                segment_ids = seg if segment_ids is None else segment_ids * seg
        elif paged:  # paged / ring KV cache (iva_jax.inference.paged) keeps its own bookkeeping
            if c.num_attention_layers != c.num_hidden_layers:
                raise NotImplementedError("the paged KV cache holds attention layers only; generate with SSM "
                                          "layers through the dense KVCache (it carries their recurrent states)")
            if segment_ids is not None:
                raise ValueError("segment_ids (packed sequences) cannot be combined with a KV cache")
            positions, layer_caches = cache.begin(mask, positions, c)
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids (packed sequences) cannot be combined with a KV cache")
            if cache.k.shape[1] != b:
                raise ValueError(f"cache batch {cache.k.shape[1]} != input batch {b}")
            if cache.k.shape[0] != c.num_attention_layers:
                raise ValueError(f"cache has {cache.k.shape[0]} layers, model has {c.num_attention_layers} "
                                 "attention layers")
            ssm_states = cache.ssm
            want = sorted(_ssm_prefixes(c))
            if sorted(ssm_states or {}) != want:
                raise ValueError(f"cache SSM states {sorted(ssm_states or {})} != the model's SSM layers {want}: "
                                 "build the cache with KVCache.init(config, ...)")
            if positions is None:
                positions = positions_from_mask(mask, cache.next_pos)
            cache_index = cache.index
            kv_valid = cache.valid  # no KV slots when the model has no attention layers
            if cache.valid.shape[1]:
                kv_valid = jax.lax.dynamic_update_slice_in_dim(kv_valid, mask.astype(bool), cache_index, axis=1)
            layer_caches = (cache.k, cache.v)

        if segment_ids is not None:
            token_mask = segment_ids != 0
        else:
            token_mask = None if attention_mask is None else attention_mask.astype(bool)
        sink_keys = sinks = None
        if attn_sink_bias is not None:
            sinks = self._sink_bias(attn_sink_bias, b)
            n = c.n_sink if n_sink is None else n_sink
            if not (isinstance(n, int) and n >= 0):
                raise ValueError(f"n_sink must be a non-negative int, got {n!r}")
            if cache is None:
                sink_keys = positions < n
                sink_keys = sink_keys if token_mask is None else sink_keys & token_mask
            else:
                sink_keys = kv_valid & (jnp.cumsum(kv_valid.astype(jnp.int32), axis=1) <= n)
            sink_keys = sink_keys.astype(jnp.float32)
        cos, sin = rope_cos_sin(c, positions)  # once per call, in the dtype q / k have (not once per layer)
        cos, sin = cos.astype(dtype_of(c.dtype)), sin.astype(dtype_of(c.dtype))
        ctx = LayerInputs(cos=cos, sin=sin, segment_ids=segment_ids, cache_index=cache_index, kv_valid=kv_valid,
                          token_mask=token_mask, token_ids=input_ids,
                          router_temperature=self._router_temperature(router_temperature, b, t),
                          sink_keys=sink_keys)
        carry = (h, layer_caches, jnp.zeros((), jnp.int32))
        (h, new_caches, _), (layer_hidden, moe_stats, ssm_states) = self._run_layers(
            carry, sinks, ssm_states, ctx, deterministic, return_layer_hidden)
        if moe_stats is not None:
            self._sow_moe(moe_stats)

        if last_logits_only:
            h = h[:, -1:]
        hidden = self.norm(h)
        logits = self.unembed(hidden)
        out: Tuple[Any, ...] = (logits,)
        if paged:
            out += (new_caches.finish(),)
        elif cache is not None:
            new_cache = KVCache(k=new_caches[0], v=new_caches[1], valid=kv_valid, index=cache_index + t,
                                next_pos=cache.next_pos + jnp.sum(mask, axis=1).astype(jnp.int32), ssm=ssm_states)
            out += (new_cache,)
        if return_hidden:
            out += (hidden,)
        if return_layer_hidden:
            out += (layer_hidden,)
        return out[0] if len(out) == 1 else out

    # ---- the layer stack ---------------------------------------------------------------------------
    def _run_layers(self, carry, sinks, ssm, ctx: LayerInputs, deterministic: bool, keep_hidden: bool):
        """ssm: the cache's SSM states {prefix: state} or None ->
        (carry, (layer hidden [L, B, T, D] or None, MoE stats {name: [n_moe_layers, ...]} or None, new ssm))."""
        c = self.config
        L = c.num_hidden_layers
        kinds = c.layer_kinds()
        get = lambda key: None if ssm is None else ssm.get(key)  # noqa: E731
        if self._layout == "scan":
            windows = None if self._uniform_window else jnp.asarray([w or 0 for w in c.layer_windows()], jnp.int32)
            carry, (hid, stats, st) = self.layers(carry, (windows, sinks, get("layers")), ctx, deterministic,
                                                  keep_hidden)
            return carry, (hid, stats, None if ssm is None else {k: st for k in ssm})
        if self._layout == "block":
            p = layer_period(c)
            nb = L // p
            windows = None
            if self._dynamic_windows:
                windows = jnp.asarray([w or 0 for w in c.layer_windows()], jnp.int32).reshape(nb, p)
            if sinks is not None:
                sinks = sinks.reshape((nb, p) + sinks.shape[1:])
            states = None if ssm is None else tuple(get(f"layers/layer_{j}") for j in range(p))
            carry, ys = self.layers(carry, (windows, sinks, states), ctx, deterministic, keep_hidden)
            # ys[j] holds sub-layer j of every block, [nb, ...]: interleave back into layer order
            inter = lambda xs: jax.tree_util.tree_map(  # noqa: E731
                lambda *a: jnp.stack(a, axis=1).reshape((-1,) + a[0].shape[1:]), *xs)
            hid = inter([y[0] for y in ys]) if keep_hidden else None
            moe = [y[1] for y, k in zip(ys, kinds[:p]) if k[1] == "moe"]
            new = None if ssm is None else {f"layers/layer_{j}": y[2] for j, y in enumerate(ys) if y[2] is not None}
            return carry, (hid, inter(moe) if moe else None, new)
        ys: List[Any] = []
        for i, layer in enumerate(self.layers):  # unrolled layers hold their window statically
            layer_in = (None, None if sinks is None else sinks[i], get(f"layers_{i}"))
            carry, y = layer(carry, layer_in, ctx, deterministic, keep_hidden)
            ys.append(y)
        stack = lambda xs: jax.tree_util.tree_map(lambda *a: jnp.stack(a), *xs)  # noqa: E731
        hid = stack([y[0] for y in ys]) if keep_hidden else None
        moe = [y[1] for y, k in zip(ys, kinds) if k[1] == "moe"]
        new = None if ssm is None else {f"layers_{i}": y[2] for i, y in enumerate(ys) if y[2] is not None}
        return carry, (hid, stack(moe) if moe else None, new)

    def _sow_moe(self, stats: Dict[str, jnp.ndarray]) -> None:
        """Balancing loss (HF-exact from the layer-averaged (f, P), or per layer), mean z-loss, layer-mean metrics."""
        m = self.config.moe
        f, p = stats["tokens_per_expert"], stats["router_prob_per_expert"]  # [n_moe_layers, E]
        if self.config.moe_aux_loss_layers == "hf":
            f, p = jnp.mean(f, axis=0), jnp.mean(p, axis=0)
        lb = jnp.mean(moe_losses.load_balancing_loss_from_stats(f, p))
        imp = jnp.mean(moe_losses.importance_loss_from_stats(f, p, m.top_k))
        z = jnp.mean(stats["z_loss"])
        main = lb if m.aux_loss_form == "switch" else imp
        losses = {"load_balancing": m.aux_loss_coef * main, "z_loss": m.z_loss_coef * z}
        metrics = {k: jnp.mean(stats[k], axis=0) for k in ("load_per_expert", "overflow_pct", "route_entropy",
                                                           "load_std_over_mean")}
        metrics.update(load_balancing_loss=lb, importance_loss=imp, z_loss=z)
        self.moe_telemetry(losses, metrics)

    # ---- per-call hook inputs ----------------------------------------------------------------------
    def _router_temperature(self, tau: Any, b: int, t: int) -> Any:
        if tau is None:
            return None
        if self.config.moe is None:
            raise ValueError("router_temperature was given but the model has no MoE layers (config.moe is None)")
        if isinstance(tau, (int, float)):
            if not tau > 0:
                raise ValueError(f"router_temperature must be > 0, got {tau}")
            return float(tau)
        tau = jnp.asarray(tau, jnp.float32)
        if tau.ndim == 0 or tau.shape == (b, t):
            return tau
        if tau.shape == (b,):
            return jnp.broadcast_to(tau[:, None], (b, t))
        raise ValueError(f"router_temperature shape {tau.shape} must be (), ({b},) or ({b}, {t})")

    def _sink_bias(self, alpha: Any, b: int) -> jnp.ndarray:
        """attn_sink_bias as [L, B, H] float32."""
        c = self.config
        L, H = c.num_hidden_layers, c.num_attention_heads
        a = jnp.asarray(alpha, jnp.float32)
        if a.ndim == 0:
            a = a[None, None, None]
        elif a.shape == (b,):
            a = a[None, :, None]
        elif a.shape == (b, H):
            a = a[None]
        elif a.shape != (L, b, H):
            raise ValueError(f"attn_sink_bias shape {a.shape} must be (), ({b},), ({b}, {H}) or ({L}, {b}, {H}) "
                             "(batch, heads, layers)")
        return jnp.broadcast_to(a, (L, b, H))

    # ---- embedding / unembedding -------------------------------------------------------------------
    def embed(self, input_ids: Optional[jnp.ndarray], inputs_embeds: Optional[jnp.ndarray] = None) -> jnp.ndarray:
        """Token embeddings [B, S, D] (exactly one of input_ids / inputs_embeds)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is not None:
            if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
                raise ValueError(f"inputs_embeds must be [batch, seq, {self.config.hidden_size}], "
                                 f"got {inputs_embeds.shape}")
            return inputs_embeds.astype(dtype_of(self.config.dtype))
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be integers, got {input_ids.dtype}")
        return self.embed_tokens(input_ids)

    def unembed(self, hidden: jnp.ndarray) -> jnp.ndarray:
        """Logits from final (normed) hidden states."""
        if self.config.tie_word_embeddings:
            return self.embed_tokens.attend(hidden)
        return self.lm_head(hidden)

    # ---- decode view -------------------------------------------------------------------------------
    def decode_view(self, params: Any, *, rows: Optional[int] = None) -> Tuple["Transformer", Any]:
        """(model, params) computing the same numbers with fewer kernels per decode step: q/k/v kernels
        concatenated into `qkv_proj`, gate/up into `gate_up_proj` (the returned model's flags say which),
        projection and embedding weights cast to the compute dtype once.  Build it once, outside the decode loop.

        All attention (dense-FFN) layers fuse or none do: quantized or adapter leaves and MoE FFNs stay as
        they are.  `rows` (tokens per step): gate/up fuse only where `kernels.swiglu` would run XLA for it.
        """
        c = self.config
        dt = dtype_of(c.dtype)
        attn, dense = [], []
        for i, (mixer, ffn) in enumerate(c.layer_kinds()):
            prefix = layer_param_location(c, i)[0]
            if mixer == "attention" and f"{prefix}/self_attn" not in attn:
                attn.append(f"{prefix}/self_attn")
            if ffn == "dense" and f"{prefix}/mlp" not in dense:
                dense.append(f"{prefix}/mlp")
        swiglu_xla = rows is None or c.mlp_bias or swiglu_impl(c.mlp_impl, rows, c.hidden_size,
                                                                  c.intermediate_size, dt) == "xla"
        out, flags = params, {"fused_qkv": self.fused_qkv, "fused_gate_up": self.fused_gate_up}
        for flag, paths, fused, names, allowed in (
                ("fused_qkv", attn, "qkv_proj", ("q_proj", "k_proj", "v_proj"), True),
                ("fused_gate_up", dense, "gate_up_proj", ("gate_proj", "up_proj"), swiglu_xla)):
            if flags[flag] or not paths or not allowed:
                continue
            modules = [_fuse_module(_tree_get(params, p), fused, names, dt) for p in paths]
            if all(m is not None for m in modules):
                for path, m in zip(paths, modules):
                    out = _tree_set(out, path, m)
                flags[flag] = True
        for path in attn + dense:
            if isinstance(_tree_get(out, path), Mapping):
                out = _tree_set(out, path, _cast_linears(_tree_get(out, path), ("o_proj", "down_proj"), dt))
        for path, leaf in (("lm_head", "kernel"), ("embed_tokens", "embedding")):
            if isinstance(_tree_get(out, path), Mapping):  # Linear / nn.Embed cast these to the compute dtype
                out = _tree_set(out, path, _cast_leaves(_tree_get(out, path), (leaf,), dt))
        return self.clone(**flags), out


def _tree_get(tree: Any, path: str) -> Any:
    for key in path.split("/"):
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _tree_set(tree: Any, path: str, value: Any) -> Dict[str, Any]:
    """A copy of `tree` (plain dicts along `path`) with `value` at `path`."""
    key, _, rest = path.partition("/")
    out = dict(tree)
    out[key] = _tree_set(tree[key], rest, value) if rest else value
    return out


def _is_float_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(x.dtype, jnp.floating)


def _linear_arrays(module: Any) -> Optional[Dict[str, Any]]:
    """A Linear's {"kernel"(, "bias")} when both are plain float arrays (not quantized, no adapters), else None."""
    if not isinstance(module, Mapping) or "kernel" not in module or set(module) - {"kernel", "bias"}:
        return None
    return dict(module) if all(_is_float_array(v) for v in module.values()) else None


def _cast_leaves(d: Mapping[str, Any], names: Sequence[str], dt: Any) -> Dict[str, Any]:
    return {k: v.astype(dt) if k in names and _is_float_array(v) else v for k, v in d.items()}


def _cast_linears(d: Mapping[str, Any], names: Sequence[str], dt: Any) -> Dict[str, Any]:
    """`d` with the plain Linear sub-dicts `names` cast to `dt` (what `linear_apply` does at every call)."""
    return {k: _cast_leaves(dict(v), ("kernel", "bias"), dt) if k in names and _linear_arrays(v) else v
            for k, v in d.items()}


def _fuse_module(module: Any, fused: str, names: Sequence[str], dt: Any) -> Optional[Dict[str, Any]]:
    """`module` with Linears `names` replaced by one Linear `fused` (kernels, biases concatenated on the output
    axis, cast to `dt`; leading stacked-layer axes kept), or None when they are not all plain."""
    if not isinstance(module, Mapping):
        return None
    parts = [_linear_arrays(module.get(n)) for n in names]
    if any(p is None for p in parts) or len({"bias" in p for p in parts}) != 1:
        return None
    cat = {k: jnp.concatenate([p[k].astype(dt) for p in parts], axis=-1) for k in parts[0]}
    return {**{k: v for k, v in module.items() if k not in names}, fused: cat}


def _check_recurrent(config: ModelConfig) -> None:
    bad = sorted(set(config.layer_mixers()) - {"attention", *RECURRENT})
    if bad:
        raise NotImplementedError(f"{bad} layers have no recurrent state, so they cannot run with a cache "
                                  f"(generation supports attention and the recurrent mixers {list(RECURRENT)})")


def _ssm_prefixes(config: ModelConfig) -> Dict[str, List[Tuple[Optional[int], str]]]:
    """{param prefix: [(stacked index or None, mixer), ...]} of the SSM layers, in layer order."""
    out: Dict[str, List[Tuple[Optional[int], str]]] = {}
    for i, mixer in enumerate(config.layer_mixers()):
        if mixer != "attention":
            prefix, idx = layer_param_location(config, i)
            out.setdefault(prefix, []).append((idx, mixer))
    return out


def init_ssm_states(config: ModelConfig, batch: int) -> Optional[Dict[str, Any]]:
    """Zero recurrent states of the SSM layers for `batch` rows, {param prefix: state} stacked like the params
    (`layer_param_location`); None for a model without SSM layers.  Size independent of sequence length."""
    groups = _ssm_prefixes(config)
    if not groups:
        return None
    _check_recurrent(config)
    dt, pdt = dtype_of(config.dtype), dtype_of(config.param_dtype)
    out = {}
    for prefix, items in groups.items():
        st = make_mixer(config.ssm.replace(type=items[0][1]), config.hidden_size, dtype=dt,
                        param_dtype=pdt).init_state(batch)
        if items[0][0] is not None:  # scanned: one state per block, stacked like the params
            st = jax.tree_util.tree_map(lambda a, n=len(items): jnp.repeat(a[None], n, axis=0), st)
        out[prefix] = st
    return out


def init_params(config: ModelConfig, seed: int = 0, batch: int = 1, seq: int = 8, mesh: Optional[Mesh] = None):
    """Random params for `config` (unboxed plain arrays) and the model."""
    model = Transformer(config, mesh=mesh)
    ids = jnp.zeros((batch, seq), jnp.int32)
    variables = jax.jit(model.init)(jax.random.PRNGKey(seed), ids)
    return model, nn.meta.unbox(variables["params"])


def param_logical_axes(config: ModelConfig):
    """Pytree of logical axis-name tuples, matching the param tree."""
    model = Transformer(config)
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
    return nn.get_partition_spec(abstract)["params"]


__all__: Sequence[str] = ("DecoderBlock", "DecoderLayer", "LayerInputs", "Transformer", "init_params",
                          "init_ssm_states", "layer_layout", "layer_param_location", "layer_period",
                          "param_logical_axes")
