"""HF `config.json` <-> `iva_jax.config.ModelConfig`, per model family (no transformers import).

MoE families: Mixtral (every layer MoE, `num_local_experts`, experts of `intermediate_size`, top-k weights
renormalized), Qwen2-MoE (shared expert with a sigmoid gate, `qkv_bias`, `decoder_sparse_step` /
`mlp_only_layers` choosing the MoE layers, dense layers of `intermediate_size`) and Qwen3-MoE (qk-norm, no
shared expert; `num_experts` is stored as `num_local_experts` by recent transformers).  They load dropless
(capacity_factor None), `router_aux_loss_coef` -> `MoEConfig.aux_loss_coef`, `router_jitter_noise` ->
`jitter_noise`.  Training-only MoE settings (capacity factor, z-loss, aux-loss form) are not exported;
settings HF cannot run (hash / bias-balanced routers, a router temperature, a shared expert outside
Qwen2-MoE) raise ValueError on export.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from iva_jax.config import ModelConfig, RopeScaling
from iva_jax.moe.config import MoEConfig
from iva_jax.moe.hf import moe_config_kwargs_from_hf

DENSE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
FAMILIES = DENSE_FAMILIES + MOE_FAMILIES

_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
         "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
         "qwen3_moe": "Qwen3MoeForCausalLM"}


def _rope(hf: Dict[str, Any]) -> tuple[float, Optional[RopeScaling], float]:
    """(rope_theta, scaling, partial_rotary_factor) from v5 `rope_parameters` or v4 `rope_scaling`."""
    params = hf.get("rope_parameters") or {}
    if params and not isinstance(params, dict):
        raise ValueError(f"rope_parameters must be a dict, got {params!r}")
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError("per-layer-type rope_parameters are not supported")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    partial = float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
    scaling = dict(hf.get("rope_scaling") or {})
    scaling.update({k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")})
    kind = scaling.pop("rope_type", scaling.pop("type", "default")) or "default"
    if kind == "default":
        return theta, None, partial
    if kind not in ("linear", "dynamic", "yarn", "llama3"):
        raise ValueError(f"unsupported rope_type {kind!r}; supported: default, linear, dynamic, yarn, llama3")
    known = set(RopeScaling.field_names())
    extra = sorted(set(scaling) - known)
    if extra:
        raise ValueError(f"unsupported rope scaling keys {extra} for rope_type {kind!r}")
    return theta, RopeScaling.from_dict({"rope_type": kind, **scaling}), partial


def config_from_hf(hf: Dict[str, Any], dtype: str = "float32") -> ModelConfig:
    """ModelConfig for an HF config dict; ValueError for an unknown or unsupported model_type."""
    mt = hf.get("model_type")
    if mt not in FAMILIES:
        raise ValueError(f"unsupported model_type {mt!r}; supported: {list(FAMILIES)}")
    act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
    if act != "silu":
        raise ValueError(f"unsupported hidden_act {act!r} (only 'silu')")
    theta, scaling, partial = _rope(hf)
    heads = hf["num_attention_heads"]
    kv = hf.get("num_key_value_heads") or heads
    bias = bool(hf.get("attention_bias", False))
    layer_types = hf.get("layer_types")
    window = hf.get("sliding_window")
    if mt == "qwen3_moe":  # one sliding window for every layer, when use_sliding_window
        window, layer_types = (window if hf.get("use_sliding_window", False) else None), None
    elif mt in ("qwen2", "qwen3", "qwen2_moe"):
        if not hf.get("use_sliding_window", False):
            window = None
        if layer_types is None and window is not None:
            mwl = hf.get("max_window_layers", hf["num_hidden_layers"])
            layer_types = ["sliding_attention" if i >= mwl else "full_attention" for i in range(hf["num_hidden_layers"])]
        if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
            window, layer_types = None, None
    elif mt == "llama":
        window = None
    eos = hf.get("eos_token_id")
    eos = None if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    qkv_bias, out_bias = bias, bias
    if mt == "qwen2":
        qkv_bias, out_bias = True, False
    elif mt == "qwen2_moe":
        qkv_bias, out_bias = bool(hf.get("qkv_bias", True)), False
    moe = None
    if mt in MOE_FAMILIES:
        h = dict(hf)
        if mt != "mixtral" and "num_experts" not in h:  # recent Qwen3-MoE configs store num_local_experts
            h["num_experts"] = h["num_local_experts"]
        moe = MoEConfig(**moe_config_kwargs_from_hf(h))
    return ModelConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=heads, num_key_value_heads=kv,
        head_dim=hf.get("head_dim"), rope_theta=theta, rope_scaling=scaling, partial_rotary_factor=partial,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=qkv_bias, attention_out_bias=out_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)), qk_norm=mt in ("qwen3", "qwen3_moe"), moe=moe,
        sliding_window=window, layer_types=tuple(layer_types) if layer_types else None,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        param_dtype=dtype, dtype=dtype, model_type=mt,
        bos_token_id=hf.get("bos_token_id"), eos_token_id=eos, pad_token_id=hf.get("pad_token_id"),
    )


def config_to_hf(c: ModelConfig, dtype: str = "float32") -> Dict[str, Any]:
    """An HF config dict that `transformers.AutoConfig` reads back to the same architecture."""
    mt = c.model_type
    if mt not in FAMILIES:
        raise ValueError(f"cannot export model_type {mt!r}; supported: {list(FAMILIES)}")
    ssm = sorted(set(c.layer_mixers()) - {"attention"})
    if ssm:
        raise ValueError(f"SSM mixer layers {ssm} have no Hugging Face family to export to")
    if (c.moe is not None) != (mt in MOE_FAMILIES):
        raise ValueError(f"model_type {mt!r} {'needs' if mt in MOE_FAMILIES else 'has no'} MoE layers; "
                         f"config.moe is {'None' if c.moe is None else 'set'}")
    if mt == "qwen2" and (not c.attention_bias or c.attention_out_bias):
        raise ValueError("qwen2 requires qkv bias and no o_proj bias")
    if mt == "qwen2_moe" and c.attention_out_bias:
        raise ValueError("qwen2_moe has no o_proj bias")
    if mt == "mixtral" and (c.attention_bias or c.attention_out_bias):
        raise ValueError("mixtral has no attention biases")
    if mt in ("llama", "qwen3", "qwen3_moe") and c.attention_bias != c.attention_out_bias:
        raise ValueError(f"{mt} ties q/k/v and o_proj bias (attention_bias); got {c.attention_bias}, "
                         f"{c.attention_out_bias}")
    if c.qk_norm != (mt in ("qwen3", "qwen3_moe")):
        raise ValueError(f"qk_norm={c.qk_norm} is not expressible for model_type {mt!r}")
    rope: Dict[str, Any] = {"rope_theta": c.rope_theta, "rope_type": "default"}
    if c.rope_scaling is not None:
        rs = {k: v for k, v in c.rope_scaling.to_dict().items() if v is not None}
        keep = {"linear": ("factor",), "dynamic": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                         "mscale_all_dim", "attention_factor", "truncate")}[rs["rope_type"]]
        rope.update({"rope_type": rs["rope_type"], **{k: rs[k] for k in keep if k in rs}})
    if c.partial_rotary_factor != 1.0:
        rope["partial_rotary_factor"] = c.partial_rotary_factor
    hf: Dict[str, Any] = {
        "architectures": [_ARCH[mt]], "model_type": mt, "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.resolved_head_dim, "hidden_act": "silu", "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps, "tie_word_embeddings": c.tie_word_embeddings, "rope_parameters": rope,
        "rope_theta": c.rope_theta, "dtype": dtype, "use_cache": True, "initializer_range": 0.02,
        "attention_dropout": 0.0,
    }
    if c.rope_scaling is not None:
        hf["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if mt == "llama":
        hf.update(attention_bias=c.attention_bias, mlp_bias=c.mlp_bias)
    elif c.mlp_bias:
        raise ValueError(f"mlp_bias is not expressible for model_type {mt!r}")
    if mt in ("qwen3", "qwen3_moe"):
        hf["attention_bias"] = c.attention_bias
    if mt == "qwen2_moe":
        hf["qkv_bias"] = c.attention_bias
    if mt in ("mistral", "mixtral", "qwen3_moe"):
        if mt == "mistral" and (c.attention_bias or c.attention_out_bias):
            raise ValueError("mistral has no attention biases")
        if c.layer_types is not None and "full_attention" in c.layer_types and c.sliding_window is not None:
            raise ValueError(f"{mt} applies the sliding window to every layer")
        hf["sliding_window"] = c.sliding_window
        if mt == "qwen3_moe":
            hf["use_sliding_window"] = c.sliding_window is not None
    if mt in ("qwen2", "qwen3", "qwen2_moe"):
        lt = c.layer_types or (("sliding_attention" if c.sliding_window else "full_attention"),) * c.num_hidden_layers
        hf.update(use_sliding_window=c.sliding_window is not None, sliding_window=c.sliding_window,
                  max_window_layers=c.num_hidden_layers, layer_types=list(lt))
    if c.moe is not None:
        hf.update(_moe_to_hf(c))
    for k in ("bos_token_id", "pad_token_id"):
        if getattr(c, k) is not None:
            hf[k] = getattr(c, k)
    if c.eos_token_id is not None:
        hf["eos_token_id"] = c.eos_token_id[0] if len(c.eos_token_id) == 1 else list(c.eos_token_id)
    return hf


def _moe_to_hf(c: ModelConfig) -> Dict[str, Any]:
    """The MoE keys of an HF config.json (ValueError for settings the family cannot express)."""
    m, mt, L = c.moe, c.model_type, c.num_hidden_layers
    if m.router not in ("softmax_topk", "sinkhorn", "switch"):  # sinkhorn routes by plain top-k at inference
        raise ValueError(f"moe.router={m.router!r} has no Hugging Face equivalent (softmax top-k routing)")
    if m.router_temperature != 1.0:
        raise ValueError(f"moe.router_temperature={m.router_temperature} has no Hugging Face equivalent")
    norm = m.norm_topk_prob and m.router != "switch"  # the switch router never renormalizes
    out: Dict[str, Any] = {"num_experts_per_tok": m.top_k, "router_aux_loss_coef": m.aux_loss_coef,
                           "output_router_logits": False}
    if mt == "mixtral":
        if not all(m.moe_layer_mask(L)):
            raise ValueError("mixtral has an MoE FFN in every layer; moe selects only some")
        if m.has_shared_expert:
            raise ValueError("mixtral has no shared expert")
        if not norm and m.top_k > 1:
            raise ValueError("mixtral renormalizes the top-k weights (norm_topk_prob must be true)")
        out.update(num_local_experts=m.num_experts, intermediate_size=m.moe_intermediate_size,
                   router_jitter_noise=m.jitter_noise)
        return out
    if m.moe_layers is not None:  # HF's rule only: every layer MoE except mlp_only_layers
        step, only = 1, [i for i in range(L) if i not in m.moe_layers]
    else:
        step, only = m.decoder_sparse_step, list(m.mlp_only_layers)
    out.update(num_experts=m.num_experts, moe_intermediate_size=m.moe_intermediate_size, norm_topk_prob=norm,
               decoder_sparse_step=step, mlp_only_layers=only)
    if mt == "qwen2_moe":
        if not (m.has_shared_expert and m.shared_expert_gate):
            raise ValueError("qwen2_moe always has a sigmoid-gated shared expert (shared_expert_intermediate_size)")
        out["shared_expert_intermediate_size"] = m.shared_expert_intermediate_size
    else:
        if m.has_shared_expert:
            raise ValueError(f"{mt} has no shared expert")
        out["num_local_experts"] = m.num_experts  # the field name recent transformers store for Qwen3-MoE
    return out
