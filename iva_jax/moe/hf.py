"""HF <-> iva-jax tables for one sparse MoE block (numpy only; the bridge calls these per layer).

Checkpoints on disk (safetensors) keep one tensor per expert:
  mixtral:   {prefix}.gate.weight [E, D]; {prefix}.experts.{i}.w1/w3/w2.weight = gate/up [F, D], down [D, F]
             (prefix "model.layers.{L}.block_sparse_moe")
  qwen2_moe / qwen3_moe: {prefix}.gate.weight; {prefix}.experts.{i}.{gate,up,down}_proj.weight;
             qwen2_moe adds {prefix}.shared_expert.{gate,up,down}_proj.weight and
             {prefix}.shared_expert_gate.weight [1, D]      (prefix "model.layers.{L}.mlp")
transformers >= 5 fuses experts in memory: {prefix}.experts.gate_up_proj [E, 2F, D] (gate first) and
{prefix}.experts.down_proj [E, D, F]; `moe_block_from_hf` reads either form.
"""

from __future__ import annotations

from typing import Dict, Mapping, Set, Tuple

import numpy as np

_EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2"), "qwen": ("gate_proj", "up_proj", "down_proj")}


def _style(model_type: str) -> str:
    if model_type == "mixtral":
        return "mixtral"
    if model_type in ("qwen2_moe", "qwen3_moe"):
        return "qwen"
    raise ValueError(f"no MoE key table for model_type={model_type!r} (mixtral, qwen2_moe, qwen3_moe)")


def moe_block_from_hf(tensors: Mapping[str, np.ndarray], prefix: str, model_type: str,
                      num_experts: int) -> Tuple[dict, Set[str]]:
    """(MoeBlock params subtree, keys consumed) from HF tensors (per-expert or fused form).

    Raises ValueError naming a missing key or a misshaped tensor.
    """
    names = _EXPERT_NAMES[_style(model_type)]
    used: Set[str] = set()

    def get(key: str) -> np.ndarray:
        if key not in tensors:
            raise ValueError(f"missing HF tensor {key!r}")
        used.add(key)
        return np.asarray(tensors[key])

    router = get(f"{prefix}.gate.weight")
    if router.shape[0] != num_experts:
        raise ValueError(f"{prefix}.gate.weight has shape {router.shape}, expected ({num_experts}, hidden)")
    fused = f"{prefix}.experts.gate_up_proj"
    if fused in tensors:
        gu = get(fused)  # [E, 2F, D]
        f = gu.shape[1] // 2
        wg, wu = gu[:, :f].transpose(0, 2, 1), gu[:, f:].transpose(0, 2, 1)
        wd = get(f"{prefix}.experts.down_proj").transpose(0, 2, 1)
    else:
        stack = lambda n: np.stack([get(f"{prefix}.experts.{i}.{n}.weight").T for i in range(num_experts)])
        wg, wu, wd = stack(names[0]), stack(names[1]), stack(names[2])
    if wg.shape != wu.shape or wd.shape != (wg.shape[0], wg.shape[2], wg.shape[1]):
        raise ValueError(f"{prefix}: inconsistent expert shapes gate {wg.shape} up {wu.shape} down {wd.shape}")
    params = {"gate": {"kernel": router.T}, "experts": {"gate_proj": wg, "up_proj": wu, "down_proj": wd}}
    if f"{prefix}.shared_expert.gate_proj.weight" in tensors:
        params["shared_expert"] = {n: {"kernel": get(f"{prefix}.shared_expert.{n}.weight").T}
                                   for n in ("gate_proj", "up_proj", "down_proj")}
        if f"{prefix}.shared_expert_gate.weight" in tensors:
            params["shared_expert_gate"] = {"kernel": get(f"{prefix}.shared_expert_gate.weight").T}
    return params, used


def moe_block_to_hf(params: Mapping, prefix: str, model_type: str) -> Dict[str, np.ndarray]:
    """HF on-disk tensors (one per expert, [out, in]) from a MoeBlock params subtree."""
    names = _EXPERT_NAMES[_style(model_type)]
    ex = params["experts"]
    out = {f"{prefix}.gate.weight": np.asarray(params["gate"]["kernel"]).T}
    mats = (ex["gate_proj"], ex["up_proj"], ex["down_proj"])
    for n, w in zip(names, mats):
        w = np.asarray(w)
        for i in range(w.shape[0]):
            out[f"{prefix}.experts.{i}.{n}.weight"] = np.ascontiguousarray(w[i].T)
    if "shared_expert" in params:
        for n in ("gate_proj", "up_proj", "down_proj"):
            out[f"{prefix}.shared_expert.{n}.weight"] = np.asarray(params["shared_expert"][n]["kernel"]).T
    if "shared_expert_gate" in params:
        out[f"{prefix}.shared_expert_gate.weight"] = np.asarray(params["shared_expert_gate"]["kernel"]).T
    return out


def moe_config_kwargs_from_hf(hf: Mapping) -> dict:
    """MoEConfig keyword arguments from an HF config.json dict (Mixtral, Qwen2-MoE, Qwen3-MoE)."""
    mt = hf.get("model_type")
    _style(mt)
    kw = {"num_experts_per_tok": hf.get("num_experts_per_tok", 2),
          "aux_loss_coef": hf.get("router_aux_loss_coef", 0.001)}
    if mt == "mixtral":
        kw.update(num_experts=hf["num_local_experts"], moe_intermediate_size=hf["intermediate_size"],
                  norm_topk_prob=True, jitter_noise=hf.get("router_jitter_noise", 0.0))
    else:
        kw.update(num_experts=hf["num_experts"], moe_intermediate_size=hf["moe_intermediate_size"],
                  norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                  decoder_sparse_step=hf.get("decoder_sparse_step", 1),
                  mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()))
        if mt == "qwen2_moe":
            kw["shared_expert_intermediate_size"] = hf.get("shared_expert_intermediate_size")
    return kw
