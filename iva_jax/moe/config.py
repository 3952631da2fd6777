"""`MoEConfig`: routing, dispatch, balancing and layer-pattern settings of a Mixture-of-Experts FFN.

Field names follow Hugging Face where one exists (num_experts, num_experts_per_tok,
moe_intermediate_size, norm_topk_prob, shared_expert_intermediate_size, decoder_sparse_step,
mlp_only_layers, router_aux_loss_coef -> aux_loss_coef, router_jitter_noise -> jitter_noise).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from iva_jax.config import ConfigBase, check, check_choice, check_positive

ROUTERS = ("softmax_topk", "switch", "hash", "sinkhorn", "bias_balanced")
DISPATCHES = ("capacity", "dropless_ragged", "dropless_pallas", "dropless_mosaic", "dropless_auto", "auto")
AUX_LOSS_FORMS = ("switch", "importance")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class MoEConfig(ConfigBase):
    """One MoE FFN layer (shared by every MoE layer of a decoder) and which layers are MoE.

    router: "softmax_topk" (Mixtral/Qwen), "switch" (top-1 softmax; requires num_experts_per_tok=1),
      "hash" (expert from the token id), "sinkhorn" (Sinkhorn-Knopp balanced selection in training),
      "bias_balanced" (DeepSeek-V3 aux-loss-free: a non-trainable per-expert bias shifts selection only).
    capacity_factor: None = dropless; else capacity = ceil(tokens * k * capacity_factor / experts).
    dispatch: "capacity" (needs capacity_factor), "dropless_ragged" (jax.lax.ragged_dot),
      "dropless_pallas" (kernels.grouped_matmul), "dropless_mosaic" (kernels.grouped_matmul_mosaic: Hopper
      wgmma kernels, Triton weight gradients), "dropless_auto" (the fastest of those the device, dtype and
      shapes allow: Mosaic on sm90, Pallas on sm80+, ragged_dot elsewhere; logged once),
      "auto" (capacity if capacity_factor else dropless_auto).
    aux_loss_form: "switch" = E * sum_e f_e P_e (HF load_balancing_loss_func), "importance" = sum_e p_e l_e.
    MoE layers: `moe_layers` (explicit indices) if given, else HF's rule: layer i is MoE when
      i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0.
    """

    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 1408
    router: str = "softmax_topk"
    router_temperature: float = 1.0
    # multiplicative U(1-eps, 1+eps) on the router input, training only (Switch Transformer; HF Mixtral's
    # router_jitter_noise also scales the experts' input, which we do not)
    jitter_noise: float = 0.0
    norm_topk_prob: bool = True  # renormalize the k selected gate weights to sum to 1
    capacity_factor: Optional[float] = None
    dispatch: str = "auto"
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    aux_loss_form: str = "switch"
    sinkhorn_iters: int = 8
    bias_update_rate: float = 1e-3  # DeepSeek-V3 gamma: bias_e += rate * sign(mean_load - load_e)
    shared_expert_intermediate_size: Optional[int] = None  # 0 / None = no shared expert
    shared_expert_gate: bool = True  # Qwen2-MoE sigmoid gate on the shared expert
    decoder_sparse_step: int = 1
    mlp_only_layers: Tuple[int, ...] = ()
    moe_layers: Optional[Tuple[int, ...]] = None

    def validate(self) -> None:
        for f in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "sinkhorn_iters",
                  "decoder_sparse_step"):
            v = getattr(self, f)
            check(_is_int(v) and v > 0, f, v, "must be a positive integer")
        check(self.num_experts_per_tok <= self.num_experts, "num_experts_per_tok", self.num_experts_per_tok,
              f"top_k cannot exceed num_experts={self.num_experts}")
        check_choice(self, "router", ROUTERS)
        check_choice(self, "dispatch", DISPATCHES)
        check_choice(self, "aux_loss_form", AUX_LOSS_FORMS)
        check_positive(self, "router_temperature")
        check(isinstance(self.jitter_noise, (int, float)) and 0.0 <= self.jitter_noise < 1.0, "jitter_noise",
              self.jitter_noise, "must be in [0, 1)")
        if self.router == "switch":
            check(self.num_experts_per_tok == 1, "num_experts_per_tok", self.num_experts_per_tok,
                  "the switch router routes each token to exactly one expert (set it to 1)")
        if self.capacity_factor is not None:
            check(isinstance(self.capacity_factor, (int, float)) and not isinstance(self.capacity_factor, bool)
                  and self.capacity_factor > 0, "capacity_factor", self.capacity_factor,
                  "must be > 0 (or None for dropless)")
        if self.dispatch == "capacity":
            check(self.capacity_factor is not None, "capacity_factor", self.capacity_factor,
                  "dispatch='capacity' needs a capacity_factor")
        for f in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            v = getattr(self, f)
            check(isinstance(v, (int, float)) and v >= 0, f, v, "must be >= 0")
        s = self.shared_expert_intermediate_size
        check(s is None or (_is_int(s) and s >= 0), "shared_expert_intermediate_size", s,
              "must be a non-negative integer or None")
        for f in ("mlp_only_layers",) + (("moe_layers",) if self.moe_layers is not None else ()):
            v = getattr(self, f)
            check(all(_is_int(i) and i >= 0 for i in v), f, v, "must be non-negative layer indices")

    @property
    def top_k(self) -> int:
        return self.num_experts_per_tok

    @property
    def has_shared_expert(self) -> bool:
        return bool(self.shared_expert_intermediate_size)

    @property
    def resolved_dispatch(self) -> str:
        """The dispatch actually used ("auto" resolved from capacity_factor)."""
        if self.dispatch != "auto":
            return self.dispatch
        return "capacity" if self.capacity_factor is not None else "dropless_auto"

    def is_moe_layer(self, layer: int) -> bool:
        """Whether decoder layer `layer` (0-based) uses the MoE FFN."""
        if self.moe_layers is not None:
            return layer in self.moe_layers
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0

    def moe_layer_mask(self, num_layers: int) -> Tuple[bool, ...]:
        """One bool per layer; ValueError when `moe_layers` names a layer >= num_layers."""
        if self.moe_layers is not None:
            bad = [i for i in self.moe_layers if i >= num_layers]
            check(not bad, "moe_layers", self.moe_layers, f"indices {bad} >= num_layers={num_layers}")
        return tuple(self.is_moe_layer(i) for i in range(num_layers))
