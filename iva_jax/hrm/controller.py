"""The HRM controller over a language model (the IVA design): ponder, modulate, halt.

A small recurrent controller in HRM style reads the LM's final hidden states and, per sequence,

  (a) halts adaptively (ACT, Graves 2016): after ponder step t it emits p_h(t) = sigmoid(w . z_H(t) + b);
      the run stops at N = min{n : sum_{t<=n} p_h(t) >= 1 - eps} (or the step limit), the remainder is
      R = 1 - sum_{t<N} p_h(t), and the halting weights are w_t = p_h(t) for t < N, w_N = R, 0 after;
  (b) modulates attention-sink strength, A' = A + alpha_s * 1_sink, through the decoder's
      `attn_sink_bias` (alpha_s = sink_max * tanh(.), per sequence, head, or layer and head);
  (c) sets the MoE router temperature tau = tau_min + softplus(.) through `router_temperature`
      (only when the LM has MoE layers).

Ponder loop (`ponder_forward`): step 1 runs the plain LM (alpha_s = 0, tau = 1: the controller has read
nothing yet); after every step t the controller state is updated from the masked mean of that step's
final hidden states, p_h(t) is read off z_H(t), and the controls for step t + 1 come from z_H(t).  The
output is the ACT mixture sum_t w_t logits_t, formed as unembed(sum_t w_t hidden_t) (the unembedding
is linear, so this is the mixture of per-step logits at a fraction of the memory).  Everything is
differentiable: gradients reach the controller through the halting weights and, via the LM's
forward (frozen weights, differentiable activations), through alpha_s and tau.

The recurrent cell (`HRMController`) is HRM's two-timescale update on one vector per sequence:
    x = in_proj(rms_norm(mean_s hidden_t[s]))
    z_L <- L(z_L + z_H + x)  (L_cycles times);   z_H <- H(z_H + z_L)
with L and H stacks of post-norm SwiGLU blocks (h = rms_norm(h + mlp(h)); HRM's block without
attention, since the state is a single vector), fixed truncated-normal initial states, and heads
that start at zero (alpha_s = 0, tau = 1, p_h = sigmoid(halt_bias_init) for every input).  Why HRM
and not a GRU: the slow state z_H is what the HRM-RPO memory term contrasts (NT-Xent over z_H), the
fast L cycles integrate each step's evidence before z_H moves, and it is the project's model family.
Unlike HRM-ACT's one-step gradient, the controller back-propagates through every ponder step (it
is tiny and N is small).

Ponder cost (document of record).  Graves's ACT cost is rho = N + R; N is piecewise constant, so
d rho / d p_h(t) = -1 for every t < N: lambda * rho = lambda * (N + 1) - lambda * sum_{t<N} p_h(t),
the "lambda * sum_t p_h(t)" term of the IVA design entered with the sign that *rewards* halting
(penalizing +sum_t p_h(t) literally would reward never halting).  `ponder_cost="act"` (default)
penalizes lambda * (N + R); `"expected"` penalizes lambda * sum_t t w_t, the mean depth of the halting
distribution (also smooth in every p_h(t) with t < N).  Both are reported.

Evaluation modes: "adaptive" (halt when sum p_h >= threshold, default 1 - eps, i.e. the training
rule; `early_exit` stops the loop once every sequence halted) and "fixed" (run `steps` LM passes
and answer with the last one, like HRM-ACT's step-limit evaluation).  Compute: training always runs
max_steps LM passes (static shapes; weights past N are zero), so halting saves compute only at
inference, and there batch-wide (the early-exit loop stops when the last row halts); `steps` (N per
row) is what a per-sequence scheduler would spend.

Honest next-token evaluation: the controls are per sequence, so a controller that reads positions
whose tokens it is scored on sees the answers.  `read_mask` selects what it reads; the LM objective
in `iva_jax.hrm.controller_train` reads a context prefix and scores only later predictions.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from iva_jax.config import ConfigBase, ModelConfig, check, check_choice, check_positive
from iva_jax.hrm.model import lecun_trunc_normal, rms_norm, trunc_normal_init
from iva_jax.train.step import cross_entropy_sums

Array = jax.Array
SINK_MODES = ("none", "scalar", "head", "layer_head")
PONDER_COSTS = ("act", "expected")
MODES = ("adaptive", "fixed")


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ControllerConfig(ConfigBase):
    """The controller's shape, halting rule, ponder penalty and control heads."""

    hidden_size: int = 128  # controller width (z_H, z_L)
    expansion: float = 2.0  # SwiGLU width = round(expansion * hidden_size)
    H_layers: int = 1
    L_layers: int = 1
    L_cycles: int = 2  # L updates per ponder step (HRM's fast timescale)
    max_steps: int = 4  # ponder step limit N_max (LM passes per sequence at most)
    halt_eps: float = 0.01  # ACT: halt once the cumulative p_h reaches 1 - halt_eps
    halt_bias_init: float = 0.0  # p_h = sigmoid(halt_bias_init) for every input at initialisation
    ponder_cost: str = "act"  # "act": lambda * (N + R) | "expected": lambda * sum_t t w_t
    ponder_weight: float = 0.01  # lambda
    sink: str = "layer_head"  # alpha_s granularity: "none" | "scalar" | "head" | "layer_head"
    sink_max: float = 5.0  # |alpha_s| <= sink_max (tanh)
    n_sink: Optional[int] = None  # sink key slots; None = the LM config's n_sink
    router_temperature: bool = True  # emit tau for LMs with MoE layers
    tau_min: float = 0.1  # tau = tau_min + softplus(.) > 0
    eval_threshold: Optional[float] = None  # adaptive eval halts at sum p_h >= this (None: 1 - halt_eps)
    eval_steps: Optional[int] = None  # fixed eval runs this many steps (None: max_steps)
    rms_norm_eps: float = 1e-5
    init_seed: int = 0  # seed of the fixed initial states z_H(0), z_L(0)

    def validate(self) -> None:
        ints = ("hidden_size", "H_layers", "L_layers", "L_cycles", "max_steps")
        for f in ints:
            v = getattr(self, f)
            check(isinstance(v, int) and not isinstance(v, bool) and v > 0, f, v, "must be a positive integer")
        check_positive(self, "expansion", "sink_max", "tau_min", "rms_norm_eps")
        check(0.0 < self.halt_eps < 1.0, "halt_eps", self.halt_eps, "must be in (0, 1)")
        check(self.ponder_weight >= 0, "ponder_weight", self.ponder_weight, "must be >= 0")
        check(self.tau_min < 1.0, "tau_min", self.tau_min, "must be < 1 (the heads start at tau = 1)")
        check_choice(self, "ponder_cost", PONDER_COSTS)
        check_choice(self, "sink", SINK_MODES)
        if self.n_sink is not None:
            check(isinstance(self.n_sink, int) and self.n_sink >= 0, "n_sink", self.n_sink, "must be an int >= 0")
        if self.eval_threshold is not None:
            check(0.0 < self.eval_threshold <= 1.0, "eval_threshold", self.eval_threshold, "must be in (0, 1]")
        if self.eval_steps is not None:
            check(isinstance(self.eval_steps, int) and self.eval_steps > 0, "eval_steps", self.eval_steps,
                  "must be a positive integer or None")

    @property
    def threshold(self) -> float:
        """The ACT halting threshold 1 - eps."""
        return 1.0 - self.halt_eps


# ------------------------------------------------------------------------------------------------
# the recurrent cell
# ------------------------------------------------------------------------------------------------
def _dense(features: int, name: str, *, bias: Optional[float] = None, zero: bool = False) -> nn.Dense:
    """A controller Dense: replicated (tiny) params, lecun truncated normal or zeros, optional constant bias."""
    init = nn.initializers.zeros if zero else lecun_trunc_normal
    kw = {}
    if bias is not None:
        kw["bias_init"] = nn.with_logical_partitioning(nn.initializers.constant(bias), (None,))
    return nn.Dense(features, use_bias=bias is not None, dtype=jnp.float32, param_dtype=jnp.float32,
                    kernel_init=nn.with_logical_partitioning(init, (None, None)), name=name, **kw)


class _SwiGLU(nn.Module):
    config: ControllerConfig

    @nn.compact
    def __call__(self, h: Array) -> Array:
        c = self.config
        f = max(1, round(c.expansion * c.hidden_size))
        gate, up = _dense(f, "gate_proj")(h), _dense(f, "up_proj")(h)
        return _dense(c.hidden_size, "down_proj")(nn.silu(gate) * up)


class _Level(nn.Module):
    """HRM reasoning level on vectors: h = z + injection, then `num_layers` post-norm SwiGLU blocks."""

    config: ControllerConfig
    num_layers: int

    @nn.compact
    def __call__(self, z: Array, injection: Array) -> Array:
        h = z + injection
        for i in range(self.num_layers):
            h = rms_norm(h + _SwiGLU(self.config, name=f"layers_{i}")(h), self.config.rms_norm_eps)
        return h


class HRMController(nn.Module):
    """State (z_H, z_L) [B, Dc] each; `step` folds one LM pass in, `controls` maps z_H to (alpha_s, tau).

    `num_layers`, `num_heads` (the LM's, for alpha_s's shape) and `use_tau` come from the LM config
    (see `make_controller`).  `__call__` exists for `init` (it touches every parameter).
    """

    config: ControllerConfig
    num_layers: int
    num_heads: int
    use_tau: bool

    def setup(self) -> None:
        c = self.config
        self.in_proj = _dense(c.hidden_size, "in_proj")
        self.L_level = _Level(c, c.L_layers)
        self.H_level = _Level(c, c.H_layers)
        self.halt_head = _dense(1, "halt_head", bias=c.halt_bias_init, zero=True)
        n_alpha = {"none": 0, "scalar": 1, "head": self.num_heads, "layer_head": self.num_layers * self.num_heads}
        self.n_alpha = n_alpha[c.sink]
        if self.n_alpha:
            self.sink_head = _dense(self.n_alpha, "sink_head", bias=0.0, zero=True)
        if self.use_tau:  # softplus(b0) = 1 - tau_min: tau starts at exactly 1
            self.tau_head = _dense(1, "tau_head", bias=math.log(math.expm1(1.0 - c.tau_min)), zero=True)

    def initial_state(self, batch: int) -> Tuple[Array, Array]:
        """Fixed (untrained) truncated-normal z_H(0), z_L(0) shared by every row, as HRM's H_init / L_init."""
        c = self.config
        kh, kl = jax.random.split(jax.random.PRNGKey(c.init_seed))
        init = trunc_normal_init(1.0)
        z_h, z_l = init(kh, (c.hidden_size,)), init(kl, (c.hidden_size,))
        return jnp.broadcast_to(z_h, (batch, c.hidden_size)), jnp.broadcast_to(z_l, (batch, c.hidden_size))

    def step(self, state: Tuple[Array, Array], feature: Array) -> Tuple[Tuple[Array, Array], Array]:
        """((z_H, z_L), pooled LM hidden [B, D]) -> (new state, halting logit [B])."""
        c = self.config
        z_h, z_l = state
        x = self.in_proj(rms_norm(feature.astype(jnp.float32), c.rms_norm_eps))
        for _ in range(c.L_cycles):
            z_l = self.L_level(z_l, z_h + x)
        z_h = self.H_level(z_h, z_l)
        return (z_h, z_l), self.halt_head(z_h)[..., 0]

    def controls(self, z_h: Array) -> Tuple[Optional[Array], Optional[Array]]:
        """alpha_s ([B], [B, H] or [L, B, H] per `sink`; None for "none") and tau [B] (None without MoE)."""
        c = self.config
        b = z_h.shape[0]
        alpha = tau = None
        if self.n_alpha:
            a = c.sink_max * jnp.tanh(self.sink_head(z_h))
            alpha = {"scalar": lambda: a[:, 0], "head": lambda: a,
                     "layer_head": lambda: a.reshape(b, self.num_layers, self.num_heads).transpose(1, 0, 2)}[c.sink]()
        if self.use_tau:
            tau = c.tau_min + jax.nn.softplus(self.tau_head(z_h)[..., 0])
        return alpha, tau

    def __call__(self, feature: Array):
        state = self.initial_state(feature.shape[0])
        state, halt = self.step(state, feature)
        return halt, self.controls(state[0])


def make_controller(config: ControllerConfig, lm_config: ModelConfig) -> HRMController:
    """The controller for a decoder config (alpha_s shaped by its layers / heads; tau iff it has MoE layers)."""
    if config.sink != "none" and lm_config.num_attention_layers == 0:
        raise ValueError(f"sink={config.sink!r} needs attention layers; the LM has none (use sink='none')")
    return HRMController(config, lm_config.num_hidden_layers, lm_config.num_attention_heads,
                         use_tau=bool(config.router_temperature and lm_config.moe is not None))


def init_controller(ctrl: HRMController, lm_hidden_size: int, seed: int = 0) -> Dict[str, Any]:
    """Unboxed controller params (float32); every head starts at zero (alpha_s = 0, tau = 1)."""
    variables = jax.jit(ctrl.init)(jax.random.PRNGKey(seed), jnp.zeros((1, lm_hidden_size), jnp.float32))
    return nn.meta.unbox(variables["params"])


# ------------------------------------------------------------------------------------------------
# halting
# ------------------------------------------------------------------------------------------------
def act_halting(halt_probs: Array, threshold: Any) -> Dict[str, Array]:
    """ACT halting of per-step probabilities [..., N]: weights [..., N] (sum 1), steps N (int32),
    remainder R, ponder_cost N + R, expected_steps sum_t t w_t; the last step always halts."""
    p = jnp.asarray(halt_probs, jnp.float32)
    if p.ndim < 1 or p.shape[-1] < 1:
        raise ValueError(f"halt_probs must be [..., N] with N >= 1, got shape {p.shape}")
    n = p.shape[-1]
    cum = jnp.cumsum(p, axis=-1)
    prev = jnp.concatenate([jnp.zeros_like(cum[..., :1]), cum[..., :-1]], axis=-1)  # sum_{k<t} p_k
    t = jnp.arange(1, n + 1)
    reached = (cum >= threshold) | (t == n)
    steps = (jnp.argmax(reached, axis=-1) + 1).astype(jnp.int32)
    rem = 1.0 - jnp.take_along_axis(prev, (steps - 1)[..., None], axis=-1)[..., 0]
    s = steps[..., None]
    weights = jnp.where(t < s, p, jnp.where(t == s, rem[..., None], 0.0))
    return {"weights": weights, "steps": steps, "remainder": rem, "ponder_cost": steps + rem,
            "expected_steps": jnp.sum(weights * t, axis=-1)}


@struct.dataclass
class PonderOutput:
    """What `ponder_forward` returns (per sequence unless noted; N = steps run)."""

    logits: Array  # [B, S, V] the output (adaptive: ACT mixture; fixed: the last step's)
    halt_probs: Array  # [B, N] p_h(t) (0 for steps an early exit skipped)
    weights: Array  # [B, N] ACT halting weights
    steps: Array  # [B] int32: N, the step the ACT rule halts at
    remainder: Array  # [B] R
    ponder_cost: Array  # [B] N + R
    expected_steps: Array  # [B] sum_t t w_t
    z_h: Array  # [B, Dc] halting-weighted z_H (the memory summary for NT-Xent)
    alpha: Array  # [N, B] mean |alpha_s| each step ran with (step 1: 0)
    tau: Array  # [N, B] router temperature each step ran with (1 without MoE control)
    steps_run: Array  # [] int32: LM passes actually made (< N only with early_exit)
    step_hidden: Optional[Array] = None  # [N, B, S, D] per-step final hidden (return_step_hidden=True)

    @property
    def max_steps(self) -> int:
        return self.halt_probs.shape[-1]

    @property
    def halted_early(self) -> Array:
        """[B] bool: halted before the step limit."""
        return self.steps < self.max_steps


def _masked_mean(hidden: Array, mask: Array) -> Array:
    m = mask.astype(jnp.float32)[..., None]
    return jnp.sum(hidden.astype(jnp.float32) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


def _mean_abs_alpha(alpha: Optional[Array], b: int) -> Array:
    """[B] mean |alpha_s| of a [B], [B, H] or [L, B, H] sink bias (zeros without one)."""
    if alpha is None:
        return jnp.zeros((b,), jnp.float32)
    a = jnp.abs(alpha)
    return a if a.ndim == 1 else jnp.mean(a, axis=-1) if a.ndim == 2 else jnp.mean(a, axis=(0, 2))


def ponder_forward(lm: nn.Module, lm_params: Any, ctrl: HRMController, ctrl_params: Any, input_ids: Array,
                   attention_mask: Optional[Array] = None, *, read_mask: Optional[Array] = None,
                   positions: Optional[Array] = None, segment_ids: Optional[Array] = None,
                   mode: str = "adaptive", threshold: Optional[float] = None, steps: Optional[int] = None,
                   early_exit: bool = False, return_step_hidden: bool = False) -> PonderOutput:
    """Ponder the LM (`Transformer`) under the controller; see the module docstring for the semantics.

    `read_mask` [B, S]: positions whose hidden states the controller reads (default: attention_mask,
    else all).  mode "adaptive": ACT halting at `threshold` (default 1 - eps) over `steps` (default
    max_steps) LM passes, output the halting mixture; `early_exit=True` stops once every row halted
    (forward only: not reverse-differentiable).  mode "fixed": `steps` passes, output the last.
    """
    c = ctrl.config
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} must be one of {list(MODES)}")
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integer [batch, seq], got {input_ids.dtype} {input_ids.shape}")
    b, s = input_ids.shape
    for name, a in (("attention_mask", attention_mask), ("read_mask", read_mask), ("positions", positions),
                    ("segment_ids", segment_ids)):
        if a is not None and jnp.shape(a) != (b, s):
            raise ValueError(f"{name} shape {jnp.shape(a)} != input_ids shape {(b, s)}")
    n = c.max_steps if steps is None else steps
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"steps={steps!r} must be a positive int")
    thr = c.threshold if threshold is None else threshold  # a float, or a traced scalar
    if isinstance(thr, (int, float)) and not 0.0 < thr <= 1.0:
        raise ValueError(f"threshold={threshold} must be in (0, 1]")
    if early_exit and mode != "adaptive":
        raise ValueError("early_exit applies to mode='adaptive' only")
    if read_mask is None:
        read_mask = jnp.ones((b, s), bool) if attention_mask is None else attention_mask
    lm_cfg = lm.config
    n_sink = lm_cfg.n_sink if c.n_sink is None else c.n_sink
    sinks, use_tau = c.sink != "none", bool(ctrl.use_tau)

    def lm_hidden(alpha, tau):
        kw = dict(positions=positions, segment_ids=segment_ids, return_hidden=True)  # deterministic (frozen LM)
        if sinks:
            kw.update(attn_sink_bias=alpha, n_sink=n_sink)
        if use_tau:
            kw["router_temperature"] = tau
        _, hidden = lm.apply({"params": lm_params}, input_ids, attention_mask, **kw)
        return hidden

    def ctrl_step(state, hidden):
        return ctrl.apply({"params": ctrl_params}, state, _masked_mean(hidden, read_mask), method="step")

    def ctrl_controls(z_h):
        return ctrl.apply({"params": ctrl_params}, z_h, method="controls")

    def body(carry, _):
        state, alpha, tau, cum = carry
        hidden = lm_hidden(alpha, tau)
        state, logit = ctrl_step(state, hidden)
        p = jax.nn.sigmoid(logit.astype(jnp.float32))
        nxt_alpha, nxt_tau = ctrl_controls(state[0])
        t_stat = jnp.ones((b,)) if tau is None else tau
        return (state, nxt_alpha, nxt_tau, cum + p), (hidden, state[0], p, _mean_abs_alpha(alpha, b), t_stat)

    state0 = ctrl.apply({"params": ctrl_params}, b, method="initial_state")
    alpha0 = {"none": None, "scalar": jnp.zeros((b,)), "head": jnp.zeros((b, ctrl.num_heads)),
              "layer_head": jnp.zeros((ctrl.num_layers, b, ctrl.num_heads))}[c.sink]
    tau0 = jnp.ones((b,)) if use_tau else None
    carry0 = (state0, alpha0, tau0, jnp.zeros((b,), jnp.float32))

    if not early_exit:
        _, (hid, zs, probs, a_st, t_st) = jax.lax.scan(body, carry0, None, length=n)
        steps_run = jnp.asarray(n, jnp.int32)
    else:
        shapes = jax.eval_shape(lambda cr: body(cr, None)[1], carry0)
        bufs = jax.tree_util.tree_map(lambda x: jnp.zeros((n,) + x.shape, x.dtype), shapes)

        def cond(loop):
            t, carry, _ = loop
            return (t < n) & ~jnp.all(carry[3] >= thr)

        def wbody(loop):
            t, carry, bufs = loop
            carry, ys = body(carry, None)
            bufs = jax.tree_util.tree_map(lambda buf, y: jax.lax.dynamic_update_index_in_dim(buf, y, t, 0), bufs, ys)
            return t + 1, carry, bufs

        steps_run, _, (hid, zs, probs, a_st, t_st) = jax.lax.while_loop(cond, wbody, (jnp.int32(0), carry0, bufs))

    probs_b = probs.T  # [B, N]
    halt = act_halting(probs_b, thr)
    if mode == "adaptive":
        mixed = jnp.einsum("bn,nbsd->bsd", halt["weights"], hid.astype(jnp.float32))
    else:
        mixed = hid[-1]
    logits = lm.apply({"params": lm_params}, mixed.astype(hid.dtype), method="unembed")
    z_h = jnp.einsum("bn,nbd->bd", halt["weights"], zs)
    return PonderOutput(logits=logits, halt_probs=probs_b, weights=halt["weights"], steps=halt["steps"],
                        remainder=halt["remainder"], ponder_cost=halt["ponder_cost"],
                        expected_steps=halt["expected_steps"], z_h=z_h, alpha=a_st, tau=t_st, steps_run=steps_run,
                        step_hidden=hid if return_step_hidden else None)


# ------------------------------------------------------------------------------------------------
# objective and statistics
# ------------------------------------------------------------------------------------------------
def ponder_penalty(out: PonderOutput, config: ControllerConfig) -> Array:
    """Mean ponder cost the objective penalizes: N + R ("act") or sum_t t w_t ("expected")."""
    cost = out.ponder_cost if config.ponder_cost == "act" else out.expected_steps
    return jnp.mean(cost)


def halting_stats(out: PonderOutput) -> Dict[str, Array]:
    """The telemetry `hrm` block: halt_rate (share halting before the step limit), avg_steps (mean N),
    ponder_cost (mean N + R), expected_steps, p_first (mean p_h(1)), sink_alpha / router_tau (means of
    mean |alpha_s| / tau over the modulated steps 2..N each row used; 0 / 1 when no row got there)."""
    t = jnp.arange(out.alpha.shape[0])[:, None]
    used = ((t >= 1) & (t < out.steps[None, :])).astype(jnp.float32)  # [N, B]
    cnt = jnp.sum(used)
    return {"halt_rate": jnp.mean(out.halted_early.astype(jnp.float32)),
            "avg_steps": jnp.mean(out.steps.astype(jnp.float32)), "ponder_cost": jnp.mean(out.ponder_cost),
            "expected_steps": jnp.mean(out.expected_steps), "p_first": jnp.mean(out.halt_probs[:, 0]),
            "sink_alpha": jnp.where(cnt > 0, jnp.sum(out.alpha * used) / jnp.maximum(cnt, 1.0), 0.0),
            "router_tau": jnp.where(cnt > 0, jnp.sum(out.tau * used) / jnp.maximum(cnt, 1.0), 1.0)}


def ponder_objective(ce: Array, out: PonderOutput, config: ControllerConfig) -> Tuple[Array, Dict[str, Array]]:
    """(loss, metrics): loss = ce + lambda * ponder cost; metrics = ce, ponder_penalty and `halting_stats`."""
    pen = ponder_penalty(out, config)
    loss = ce + config.ponder_weight * pen
    return loss, {"loss": loss, "ce": ce, "ponder_penalty": pen, **halting_stats(out)}


def ponder_lm_loss(out: PonderOutput, targets: Array, weights: Array, config: ControllerConfig,
                   logits: Optional[Array] = None) -> Tuple[Array, Dict[str, Array]]:
    """Token-mean cross-entropy of `logits` (default out.logits; pass them shifted to align with
    `targets` [B, T] and `weights` [B, T]) plus lambda * ponder cost."""
    logits = out.logits if logits is None else logits
    sums = cross_entropy_sums(logits, targets, weights)
    ce = sums["loss"] / jnp.maximum(sums["tokens"], 1.0)
    loss, m = ponder_objective(ce, out, config)
    return loss, dict(m, tokens=sums["tokens"], ppl=jnp.exp(jnp.minimum(ce, 50.0)))


__all__ = ("ControllerConfig", "HRMController", "PonderOutput", "act_halting", "halting_stats", "init_controller",
           "make_controller", "ponder_forward", "ponder_lm_loss", "ponder_objective", "ponder_penalty")
