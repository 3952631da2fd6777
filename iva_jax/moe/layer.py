"""`MoeBlock`: the sparse MoE FFN (SwiGLU experts) of Mixtral / Qwen2-MoE / Qwen3-MoE, in flax.linen.

Parameters (names mirror HF so the bridge is a table; kernels are [in, out]):
  gate/kernel                   [D, E]   router (HF gate.weight [E, D], transposed)
  experts/gate_proj             [E, D, F]  (HF experts.gate_up_proj[:, :F, :] transposed per expert)
  experts/up_proj               [E, D, F]  (HF experts.gate_up_proj[:, F:, :] transposed per expert)
  experts/down_proj             [E, F, D]  (HF experts.down_proj [E, D, F] transposed per expert)
  shared_expert/{gate,up,down}_proj/kernel   dense SwiGLU (Qwen2-MoE), when configured
  shared_expert_gate/kernel     [D, 1]   sigmoid gate on the shared expert (Qwen2-MoE)
Variables: collection "moe_stats" holds `expert_bias` [E] for router="bias_balanced" (non-trainable;
updated in place when the collection is mutable and deterministic=False, or by the train loop from
aux["expert_counts"] with `routing.update_expert_bias`).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from iva_jax.layers.linear import Linear
from iva_jax.moe import losses as L
from iva_jax.moe.config import MoEConfig
from iva_jax.moe.dispatch import capacity_moe, dropless_moe, resolve_dropless_impl
from iva_jax.moe.expert_parallel import expert_parallel_moe
from iva_jax.moe.routing import jitter, route, update_expert_bias
from iva_jax.parallel.kernel_sharding import per_shard

Array = jnp.ndarray


def _normal(std: float):
    return nn.initializers.normal(std)


class MoeExperts(nn.Module):
    """The stacked expert weights; calling it returns (gate_proj, up_proj, down_proj)."""

    num_experts: int
    hidden_size: int
    intermediate_size: int
    param_dtype: Any = jnp.float32
    init_std: float = 0.02

    @nn.compact
    def __call__(self) -> Tuple[Array, Array, Array]:
        e, d, f = self.num_experts, self.hidden_size, self.intermediate_size
        p = lambda name, shape, axes: self.param(
            name, nn.with_logical_partitioning(_normal(self.init_std), axes), shape, self.param_dtype)
        return (p("gate_proj", (e, d, f), ("expert", "embed", "mlp")),
                p("up_proj", (e, d, f), ("expert", "embed", "mlp")),
                p("down_proj", (e, f, d), ("expert", "mlp", "embed")))


class SharedExpert(nn.Module):
    """Dense SwiGLU FFN (HF Qwen2MoeMLP): down_proj(silu(gate_proj(x)) * up_proj(x))."""

    hidden_size: int
    intermediate_size: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x: Array) -> Array:
        # iva_jax Linear (HF-named `kernel` [in, out]) so quantized kernels (iva_jax.quant) work here too
        dense = lambda n_in, n, name, axes: Linear(  # noqa: E731
            n_in, n, axes, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_normal(self.init_std),
            name=name)
        d, f = self.hidden_size, self.intermediate_size
        h = jax.nn.silu(dense(d, f, "gate_proj", ("embed", "mlp"))(x)) * dense(d, f, "up_proj", ("embed", "mlp"))(x)
        return dense(f, d, "down_proj", ("mlp", "embed"))(h)


class MoeBlock(nn.Module):
    """Sparse MoE FFN: x [B, S, D] -> (y [B, S, D], aux) with aux = losses + routing metrics.

    __call__ keywords: router_temperature (None = config; float, traced scalar or [B, S]),
    deterministic (False = training: jitter from the "dropout" rng stream, Sinkhorn selection,
    bias update), token_ids [B, S] (hash router), mask [B, S] (False = padding: left out of losses,
    metrics and capacity).
    aux: "loss" (= aux_loss_coef * balancing + z_loss_coef * z, to add to the task loss),
    "load_balancing_loss", "importance_loss", "z_loss", "tokens_per_expert" / "router_prob_per_expert"
    (f, P for an HF-style average over layers), and `losses.routing_metrics` (load_per_expert,
    overflow_pct, route_entropy, load_std_over_mean, expert_counts).
    `mesh` with an `expert` axis > 1 turns on expert parallelism (iva_jax.moe.expert_parallel);
    `gmm_kw` passes block sizes / interpret to the Pallas grouped matmul (dispatch="dropless_pallas" or
    "dropless_mosaic", whose backward takes the same block sizes).
    """

    config: MoEConfig
    hidden_size: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    init_std: float = 0.02
    mesh: Optional[Mesh] = None
    gmm_kw: Optional[Dict[str, Any]] = None

    @nn.compact
    def __call__(self, x: Array, *, router_temperature: Any = None, deterministic: bool = True,
                 token_ids: Optional[Array] = None, mask: Optional[Array] = None) -> Tuple[Array, Dict[str, Array]]:
        c = self.config
        if x.ndim != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"MoeBlock expects x [batch, seq, {self.hidden_size}], got {x.shape}")
        b, s, d = x.shape
        t = b * s
        xt = x.reshape(t, d)
        valid = None if mask is None else mask.reshape(t).astype(bool)
        tau = c.router_temperature if router_temperature is None else router_temperature

        router_in = xt
        if not deterministic and c.jitter_noise > 0:
            router_in = jitter(xt, self.make_rng("dropout"), c.jitter_noise)
        logits = nn.Dense(c.num_experts, use_bias=False, dtype=jnp.float32, param_dtype=self.param_dtype,
                          kernel_init=nn.with_logical_partitioning(_normal(self.init_std), ("embed", None)),
                          name="gate")(router_in.astype(jnp.float32))
        bias = None
        if c.router == "bias_balanced":
            bias = self.variable("moe_stats", "expert_bias", jnp.zeros, (c.num_experts,), jnp.float32)
        r = route(logits, router=c.router, top_k=c.top_k, temperature=tau, norm_topk_prob=c.norm_topk_prob,
                  training=not deterministic, token_ids=token_ids,
                  expert_bias=None if bias is None else bias.value, sinkhorn_iters=c.sinkhorn_iters)

        wg, wu, wd = MoeExperts(c.num_experts, d, c.moe_intermediate_size, self.param_dtype, self.init_std,
                                name="experts")()
        kind = c.resolved_dispatch
        cf = c.capacity_factor if kind == "capacity" else None
        impl = {"dropless_pallas": "pallas", "dropless_mosaic": "mosaic", "dropless_auto": "auto"}.get(kind, "ragged")
        gkw = dict(self.gmm_kw or {})
        xe = xt.astype(self.dtype)
        if impl == "auto":
            impl = resolve_dropless_impl(impl, xe.dtype, d, c.moe_intermediate_size, gkw)
        keep = None
        if self.mesh is not None and self.mesh.shape.get("expert", 1) > 1:
            y, keep = expert_parallel_moe(xe, r.expert_index, r.gate_weights, wg, wu, wd, mesh=self.mesh,
                                          capacity_factor=cf, valid=valid, impl=impl, dtype=self.dtype, **gkw)
        elif cf is not None:
            y, keep = capacity_moe(xe, r.expert_index, r.gate_weights, wg, wu, wd, cf, valid=valid, dtype=self.dtype)
        else:  # dropless is per-token exact, so under a mesh each device sorts and multiplies its own tokens
            rows = ("batch", None)
            y = per_shard(lambda xe, ei, gw, wg, wu, wd: dropless_moe(xe, ei, gw, wg, wu, wd, impl=impl,
                                                                      dtype=self.dtype, **gkw),
                          (xe, r.expert_index, r.gate_weights, *(w.astype(self.dtype) for w in (wg, wu, wd))),
                          (rows, rows, rows, None, None, None), rows)  # weights gathered in the compute dtype

        if c.has_shared_expert:
            sh = SharedExpert(d, c.shared_expert_intermediate_size, self.dtype, self.param_dtype, self.init_std,
                              name="shared_expert")(xe).astype(jnp.float32)
            if c.shared_expert_gate:
                g = nn.Dense(1, use_bias=False, dtype=jnp.float32, param_dtype=self.param_dtype,
                             kernel_init=nn.with_logical_partitioning(_normal(self.init_std), ("embed", None)),
                             name="shared_expert_gate")(xt.astype(jnp.float32))
                sh = jax.nn.sigmoid(g) * sh
            y = y + sh

        f, p = L.load_balancing_stats(r.probs, r.expert_index, valid)
        lb = L.load_balancing_loss_from_stats(f, p)
        imp = L.importance_loss_from_stats(f, p, c.top_k)
        z = L.router_z_loss(r.logits, valid)
        aux_main = lb if c.aux_loss_form == "switch" else imp
        aux: Dict[str, Array] = {
            "loss": c.aux_loss_coef * aux_main + c.z_loss_coef * z,
            "load_balancing_loss": lb,
            "importance_loss": imp,
            "z_loss": z,
            "tokens_per_expert": f,
            "router_prob_per_expert": p,
        }
        aux.update(L.routing_metrics(r.probs, r.expert_index, keep, valid))
        if bias is not None and not deterministic and self.is_mutable_collection("moe_stats"):
            bias.value = update_expert_bias(bias.value, aux["expert_counts"], c.bias_update_rate)
        return y.astype(x.dtype).reshape(b, s, d), aux
