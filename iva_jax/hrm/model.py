"""HRM-ACT-v1: the Hierarchical Reasoning Model with adaptive computation time (sapientinc/HRM).

Two levels of non-causal, post-norm transformer blocks: a slow H module and a fast L module.  One
segment (one call of `HRMInner`) runs H_cycles x L_cycles updates,

    z_L <- L(z_L + z_H + x)   (L_cycles times per H cycle; x = scaled input embeddings)
    z_H <- H(z_H + z_L)       (once per H cycle)

of which only the last L update and the last H update are differentiated (the one-step gradient);
the carry (z_H, z_L) leaves every segment detached.  The ACT wrapper (`HRMACT`) keeps the carry
across batches: a slot that halted is refilled with a new sample (carry reset to the fixed,
untrained H_init/L_init).  Halting is learned by Q-learning: q_head(z_H[:, 0]) gives
(q_halt, q_continue); a sample halts at `halt_max_steps`, or (training, and `eval_mode="adaptive"`
at evaluation) when q_halt > q_continue, with random minimum-step exploration during training;
the q_continue target comes from a no-grad pass over the next segment.

Where this differs from the reference on purpose: attention is plain jnp by default (no FlashAttention
dependency; `attn_impl="auto" | "triton" | "mosaic"` goes through `kernels.flash_attention`),
q/k/v and gate/up are separate HF-named projections (the reference fuses them into `qkv_proj` and
`gate_up_proj`: split those along the output axis to convert), `evaluate` freezes a sample's
answer at its halting step (the reference's eval loop only supports halting at the step limit).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from iva_jax.config import dtype_of
from iva_jax.hrm.config import HRMConfig
from iva_jax.parallel.kernel_sharding import per_shard

Array = jax.Array
_TRUNC2_STD = 0.87962566103423978  # std of a standard normal truncated to [-2, 2]


def trunc_normal_init(std: float):
    """Truncated normal at +-2 std whose *actual* std is `std` (the reference's trunc_normal_init_)."""

    def init(key, shape, dtype=jnp.float32):
        if std == 0:
            return jnp.zeros(shape, dtype)
        x = jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)
        return (x * (std / _TRUNC2_STD)).astype(dtype)

    return init


lecun_trunc_normal = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def rms_norm(x: Array, eps: float) -> Array:
    """Parameter-free RMSNorm computed in float32 (the reference's `rms_norm`)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
    return xf.astype(x.dtype)


def rope_cos_sin(length: int, head_dim: int, theta: float) -> Tuple[Array, Array]:
    """HF-layout RoPE tables [length, head_dim] (frequencies repeated, rotate-half convention)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = jnp.outer(jnp.arange(length, dtype=jnp.float32), inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x [B, T, H, hd] rotated in float32 and cast back."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos[:, None, :] + rot * sin[:, None, :]).astype(x.dtype)


def attention(q: Array, k: Array, v: Array, impl: str = "xla") -> Array:
    """Non-causal multi-head attention, q/k/v [B, T, H, hd] -> [B, T, H, hd]; softmax in float32."""
    if impl != "xla":  # the kernels dispatcher: Mosaic / Triton flash attention on GPU, XLA elsewhere
        import kernels

        heads = ("batch", None, "q_heads", None)
        return per_shard(lambda q, k, v: kernels.flash_attention(q, k, v, causal=False, impl=impl), (q, k, v),
                         (heads, heads, heads), heads)
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def embed_lookup(table: Array, ids: Array) -> Array:
    """table[ids] in float32.  For the small vocabularies of puzzles (<= 1024) it is a one-hot matmul,
    so the gradient is a matmul accumulating in float32 rather than a scatter-add: a bf16 scatter-add
    of every token of the batch into a handful of rows is a contended compare-and-swap loop on GPUs
    (it dominated the H100 train step) and sums thousands of terms in bf16."""
    if table.shape[0] > 1024:
        return jnp.take(table, ids.astype(jnp.int32), axis=0).astype(jnp.float32)
    one_hot = jax.nn.one_hot(ids, table.shape[0], dtype=jnp.float32)
    return jnp.dot(one_hot, table.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


def _dense(features: int, axes: Tuple[Optional[str], Optional[str]], dtype, name: str, **kw) -> nn.Dense:
    kernel_init = kw.pop("kernel_init", lecun_trunc_normal)
    return nn.Dense(features, use_bias=kw.pop("use_bias", False), dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=nn.with_logical_partitioning(kernel_init, axes), name=name, **kw)


class Attention(nn.Module):
    config: HRMConfig

    @nn.compact
    def __call__(self, x: Array, cos_sin: Optional[Tuple[Array, Array]]) -> Array:
        c = self.config
        dt = dtype_of(c.forward_dtype)
        B, T, D = x.shape
        H, hd = c.num_heads, c.head_dim
        q = _dense(H * hd, ("embed", "q_heads"), dt, "q_proj")(x).reshape(B, T, H, hd)
        k = _dense(H * hd, ("embed", "kv_heads"), dt, "k_proj")(x).reshape(B, T, H, hd)
        v = _dense(H * hd, ("embed", "kv_heads"), dt, "v_proj")(x).reshape(B, T, H, hd)
        if cos_sin is not None:
            q, k = apply_rope(q, *cos_sin), apply_rope(k, *cos_sin)
        o = attention(q, k, v, c.attn_impl).reshape(B, T, H * hd)
        return _dense(D, ("q_heads", "embed"), dt, "o_proj")(o)


class SwiGLU(nn.Module):
    config: HRMConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        dt = dtype_of(c.forward_dtype)
        f = c.intermediate_size
        gate = _dense(f, ("embed", "mlp"), dt, "gate_proj")(x)
        up = _dense(f, ("embed", "mlp"), dt, "up_proj")(x)
        return _dense(c.hidden_size, ("mlp", "embed"), dt, "down_proj")(nn.silu(gate) * up)


class HRMBlock(nn.Module):
    """Post-norm block: h = norm(h + attn(h)); h = norm(h + mlp(h)).  Scan-shaped (carry, None)."""

    config: HRMConfig

    @nn.compact
    def __call__(self, h: Array, cos_sin) -> Tuple[Array, None]:
        eps = self.config.rms_norm_eps
        h = rms_norm(h + Attention(self.config, name="self_attn")(h, cos_sin), eps)
        h = rms_norm(h + SwiGLU(self.config, name="mlp")(h), eps)
        return h, None


class ReasoningModule(nn.Module):
    """`num_layers` scanned blocks after input injection by addition."""

    config: HRMConfig
    num_layers: int

    @nn.compact
    def __call__(self, h: Array, injection: Array, cos_sin) -> Array:
        stack = nn.scan(HRMBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=nn.broadcast, length=self.num_layers,
                        metadata_params={nn.PARTITION_NAME: "layers"})
        h, _ = stack(self.config, name="layers")(h + injection, cos_sin)
        return h


@struct.dataclass
class InnerCarry:
    z_H: Array  # [B, total_len, hidden] in forward_dtype
    z_L: Array


class HRMInner(nn.Module):
    """One HRM segment: (carry, inputs, puzzle rows) -> (carry, logits, q_halt, q_continue).

    Variables: "params" (trained by AdamATan2) and "buffers" (H_init, L_init: fixed, never trained).
    `puzzle_rows` [B, puzzle_emb_ndim] are rows of the sparse puzzle table (see sparse_embedding.py).
    """

    config: HRMConfig

    def setup(self) -> None:
        c = self.config
        D = c.hidden_size
        dt = dtype_of(c.forward_dtype)
        std = 1.0 / math.sqrt(D)
        self.embed_tokens = nn.Embed(c.vocab_size, D, dtype=dt, param_dtype=jnp.float32,
                                     embedding_init=nn.with_logical_partitioning(trunc_normal_init(std),
                                                                                 ("vocab", "embed")))
        if c.pos_encodings == "learned":
            self.embed_pos = self.param("embed_pos", nn.with_logical_partitioning(trunc_normal_init(std),
                                                                                  ("length", "embed")),
                                        (c.total_len, D))
        self.lm_head = _dense(c.vocab_size, ("embed", "vocab"), dt, "lm_head")
        self.q_head = _dense(2, ("embed", None), dt, "q_head", use_bias=True,
                             kernel_init=nn.initializers.zeros,
                             bias_init=nn.with_logical_partitioning(nn.initializers.constant(-5.0), (None,)))
        if c.arch == "hrm":
            self.H_level = ReasoningModule(c, c.H_layers)
            self.L_level = ReasoningModule(c, c.L_layers)
        else:
            self.layers = ReasoningModule(c, c.H_layers + c.L_layers)
        init = trunc_normal_init(1.0)
        self.H_init = self.variable("buffers", "H_init", lambda: init(self.make_rng("params"), (D,), dt))
        self.L_init = self.variable("buffers", "L_init", lambda: init(self.make_rng("params"), (D,), dt))

    def _cos_sin(self):
        c = self.config
        if c.pos_encodings != "rope":
            return None
        return rope_cos_sin(c.total_len, c.head_dim, c.rope_theta)

    def embed(self, inputs: Array, puzzle_rows: Array) -> Array:
        """sqrt(D) * (token embeddings with the puzzle embedding prepended [+ learned positions])."""
        c = self.config
        dt = dtype_of(c.forward_dtype)
        emb = embed_lookup(self.embed_tokens.embedding, inputs).astype(dt)
        if c.puzzle_emb_ndim > 0:
            B = inputs.shape[0]
            pe = puzzle_rows.astype(dt)
            pad = c.puzzle_emb_len * c.hidden_size - c.puzzle_emb_ndim
            pe = jnp.pad(pe, ((0, 0), (0, pad))).reshape(B, c.puzzle_emb_len, c.hidden_size)
            emb = jnp.concatenate([pe, emb], axis=1)
        if c.pos_encodings == "learned":
            emb = 0.707106781 * (emb + self.embed_pos.astype(dt))  # keeps the forward variance
        return (math.sqrt(c.hidden_size) * emb).astype(dt)

    def __call__(self, carry: InnerCarry, inputs: Array, puzzle_rows: Array):
        c = self.config
        cs = self._cos_sin()
        x = self.embed(inputs, puzzle_rows)
        if c.arch == "transformer":
            z_H = self.layers(x, jnp.zeros_like(x), cs)
            z_L = z_H
        else:
            z_H, z_L = carry.z_H, carry.z_L
            # All but the last L and the last H update: forward only (no gradient flows through them).
            for h_step in range(c.H_cycles):
                for l_step in range(c.L_cycles):
                    if not (h_step == c.H_cycles - 1 and l_step == c.L_cycles - 1):
                        z_L = self.L_level(z_L, z_H + x, cs)
                if h_step != c.H_cycles - 1:
                    z_H = self.H_level(z_H, z_L, cs)
            z_H, z_L = jax.lax.stop_gradient(z_H), jax.lax.stop_gradient(z_L)
            # The one-step gradient.
            z_L = self.L_level(z_L, z_H + x, cs)
            z_H = self.H_level(z_H, z_L, cs)
        new_carry = InnerCarry(z_H=jax.lax.stop_gradient(z_H), z_L=jax.lax.stop_gradient(z_L))
        logits = self.lm_head(z_H)[:, c.puzzle_emb_len:]
        q = self.q_head(z_H[:, 0]).astype(jnp.float32)
        return new_carry, logits, q[..., 0], q[..., 1]


def act_halt(steps: Array, q_halt: Array, q_continue: Array, *, halt_max_steps: int, exploration_prob: float,
             training: bool, adaptive_eval: bool = False, rng: Optional[Array] = None) -> Tuple[Array, Array]:
    """(halted, is_last) after a segment; `steps` already counts it.

    Always halt at the step limit.  Training (halt_max_steps > 1): also halt when q_halt > q_continue,
    but, with probability `exploration_prob` per sample, not before a random step in
    [2, halt_max_steps].  Evaluation halts on q only with `adaptive_eval` (the reference never does).
    """
    is_last = steps >= halt_max_steps
    halted = is_last
    if halt_max_steps > 1 and training:
        halted = halted | (q_halt > q_continue)
        k_explore, k_steps = jax.random.split(rng)
        explore = jax.random.uniform(k_explore, steps.shape) < exploration_prob
        min_halt = explore * jax.random.randint(k_steps, steps.shape, 2, halt_max_steps + 1, jnp.int32)
        halted = halted & (steps >= min_halt)
    elif halt_max_steps > 1 and adaptive_eval:
        halted = halted | (q_halt > q_continue)
    return halted, is_last


def q_continue_target(is_last: Array, next_q_halt: Array, next_q_continue: Array) -> Array:
    """sigmoid(next q_halt) at the step limit, else sigmoid(max(next q_halt, next q_continue)); no grad."""
    target = jnp.where(is_last, next_q_halt, jnp.maximum(next_q_halt, next_q_continue))
    return jax.lax.stop_gradient(jax.nn.sigmoid(target))


@struct.dataclass
class HRMCarry:
    inner: InnerCarry
    steps: Array  # int32 [B]: segments run on the current sample
    halted: Array  # bool [B]: the slot takes a new sample at the next call
    current_data: Dict[str, Array]  # inputs [B, S], labels [B, S], puzzle_identifiers [B]


DATA_KEYS = ("inputs", "labels", "puzzle_identifiers")


class HRMACT:
    """The ACT wrapper as pure functions over (variables, puzzle_table, carry, batch).

    `variables = {"params": ..., "buffers": {"H_init", "L_init"}}`; `puzzle_table`
    [num_puzzle_identifiers, puzzle_emb_ndim] (shape [N, 0] when the puzzle embedding is off).
    """

    def __init__(self, config: HRMConfig):
        self.config = config
        self.inner = HRMInner(config)
        self._init_fn = None  # jitted once per wrapper (init compiles the RNG for every parameter)

    # ---- construction ---------------------------------------------------------------------------
    def init(self, rng: Array) -> Tuple[Dict[str, Any], Array]:
        """Fresh (variables, puzzle_table): parameters as the reference, puzzle table zeros."""
        c = self.config
        if self._init_fn is None:
            carry = self.empty_inner_carry(1)
            inputs = jnp.zeros((1, c.seq_len), jnp.int32)
            rows = jnp.zeros((1, c.puzzle_emb_ndim), jnp.float32)
            self._init_fn = jax.jit(lambda r: nn.unbox(self.inner.init({"params": r}, carry, inputs, rows)))
        variables = self._init_fn(rng)
        table = jnp.zeros((c.num_puzzle_identifiers, c.puzzle_emb_ndim), jnp.float32)
        return dict(variables), table

    def logical_axes(self) -> Any:
        """The params' logical axis names (a PartitionSpec pytree) for sharding rules."""
        c = self.config
        shapes = jax.eval_shape(lambda: self.inner.init({"params": jax.random.PRNGKey(0)},
                                                        self.empty_inner_carry(1),
                                                        jnp.zeros((1, c.seq_len), jnp.int32),
                                                        jnp.zeros((1, c.puzzle_emb_ndim), jnp.float32)))
        return nn.get_partition_spec(shapes["params"])

    def empty_inner_carry(self, batch_size: int) -> InnerCarry:
        c = self.config
        z = jnp.zeros((batch_size, c.total_len, c.hidden_size), dtype_of(c.forward_dtype))
        return InnerCarry(z_H=z, z_L=z)

    def initial_carry(self, batch: Dict[str, Array]) -> HRMCarry:
        """All slots halted, so the first call loads the whole batch (the reference's initial_carry)."""
        self._check_batch(batch)
        B = batch["inputs"].shape[0]
        return HRMCarry(inner=self.empty_inner_carry(B), steps=jnp.zeros((B,), jnp.int32),
                        halted=jnp.ones((B,), jnp.bool_),
                        current_data={k: jnp.zeros_like(batch[k]) for k in DATA_KEYS})

    def _check_batch(self, batch: Dict[str, Array]) -> None:
        c = self.config
        missing = [k for k in DATA_KEYS if k not in batch]
        if missing:
            raise ValueError(f"HRM batch is missing keys {missing}; needs {list(DATA_KEYS)}")
        B = batch["inputs"].shape[0]
        if batch["inputs"].shape != (B, c.seq_len) or batch["labels"].shape != (B, c.seq_len):
            raise ValueError(f"HRM batch inputs/labels must be [B, seq_len={c.seq_len}], got "
                             f"{batch['inputs'].shape} / {batch['labels'].shape}")
        if batch["puzzle_identifiers"].shape != (B,):
            raise ValueError(f"puzzle_identifiers must be [B={B}], got {batch['puzzle_identifiers'].shape}")

    # ---- one ACT step ------------------------------------------------------------------------------
    def reset(self, variables: Dict[str, Any], carry: HRMCarry, batch: Dict[str, Array]) -> HRMCarry:
        """Replace halted slots: inner carry <- (H_init, L_init), steps <- 0, data <- the batch's row."""
        self._check_batch(batch)
        h = carry.halted
        H0, L0 = variables["buffers"]["H_init"], variables["buffers"]["L_init"]
        inner = InnerCarry(z_H=jnp.where(h[:, None, None], H0, carry.inner.z_H),
                           z_L=jnp.where(h[:, None, None], L0, carry.inner.z_L))
        data = {k: jnp.where(h.reshape((-1,) + (1,) * (batch[k].ndim - 1)), batch[k], carry.current_data[k])
                for k in DATA_KEYS}
        return HRMCarry(inner=inner, steps=jnp.where(h, 0, carry.steps), halted=h, current_data=data)

    def segment(self, variables: Dict[str, Any], carry: HRMCarry, puzzle_rows: Array, *,
                rng: Optional[Array] = None, training: bool = False) -> Tuple[HRMCarry, Dict[str, Array]]:
        """Run one segment on an already-reset carry; decide halting; add the Q target when training.

        Differentiable w.r.t. `variables["params"]` and `puzzle_rows` (the one-step gradient).
        """
        c = self.config
        data = carry.current_data
        inner, logits, q_halt, q_cont = self.inner.apply(variables, carry.inner, data["inputs"], puzzle_rows)
        outputs = {"logits": logits, "q_halt_logits": q_halt, "q_continue_logits": q_cont}

        if training and c.halt_max_steps > 1 and rng is None:
            raise ValueError("HRMACT.segment(training=True) needs rng for halting exploration")
        steps = (carry.steps + 1).astype(jnp.int32)
        halted, is_last = act_halt(steps, q_halt, q_cont, halt_max_steps=c.halt_max_steps,
                                   exploration_prob=c.halt_exploration_prob, training=training,
                                   adaptive_eval=c.eval_mode == "adaptive", rng=rng)
        if training and c.halt_max_steps > 1:
            # Q target from a no-grad pass over the next segment (no replay buffer / target net, as PQN).
            _, _, nq_halt, nq_cont = self.inner.apply(jax.lax.stop_gradient(variables), inner,
                                                      data["inputs"], jax.lax.stop_gradient(puzzle_rows))
            outputs["target_q_continue"] = q_continue_target(is_last, nq_halt, nq_cont)
        new_carry = HRMCarry(inner=inner, steps=steps, halted=halted, current_data=data)
        return new_carry, outputs

    def __call__(self, variables: Dict[str, Any], puzzle_table: Array, carry: HRMCarry,
                 batch: Dict[str, Array], *, rng: Optional[Array] = None,
                 training: bool = False) -> Tuple[HRMCarry, Dict[str, Array]]:
        """reset -> gather puzzle rows -> segment: one call of the reference's ACT `forward`."""
        carry = self.reset(variables, carry, batch)
        rows = puzzle_table[carry.current_data["puzzle_identifiers"]]
        return self.segment(variables, carry, rows, rng=rng, training=training)

    # ---- evaluation -------------------------------------------------------------------------------
    def evaluate(self, variables: Dict[str, Any], puzzle_table: Array, batch: Dict[str, Array],
                 eval_mode: Optional[str] = None) -> Dict[str, Array]:
        """Run a fresh batch to its halting steps; each sample's answer is frozen when it halts.

        Returns per-sample `preds` [B, S], `steps`, `q_halt_logits` for `eval_mode` (default: the
        config's) and, as a by-product, the same for the other rule (`*_max` / `*_adaptive`) where the
        loop ran long enough to know them (max_steps mode always does).
        """
        c = self.config
        mode = eval_mode or c.eval_mode
        if mode not in ("max_steps", "adaptive"):
            raise ValueError(f"eval_mode={mode!r} must be 'max_steps' or 'adaptive'")
        self._check_batch(batch)
        B, S = batch["inputs"].shape
        carry = self.reset(variables, self.initial_carry(batch), batch)
        rows = puzzle_table[batch["puzzle_identifiers"]]
        inputs = batch["inputs"]

        def body(state):
            i, inner, done, p_ad, s_ad, q_ad, p_max, q_max = state
            inner, logits, qh, qc = self.inner.apply(variables, inner, inputs, rows)
            i = i + 1
            preds = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            halt_now, _ = act_halt(jnp.full((B,), i, jnp.int32), qh, qc, halt_max_steps=c.halt_max_steps,
                                   exploration_prob=0.0, training=False, adaptive_eval=True)
            new = halt_now & ~done
            p_ad = jnp.where(new[:, None], preds, p_ad)
            s_ad = jnp.where(new, i, s_ad)
            q_ad = jnp.where(new, qh, q_ad)
            return i, inner, done | halt_now, p_ad, s_ad, q_ad, preds, qh

        def cond(state):
            i, done = state[0], state[2]
            keep = i < c.halt_max_steps
            return keep & ~jnp.all(done) if mode == "adaptive" else keep

        zi = jnp.zeros((B, S), jnp.int32)
        zf = jnp.zeros((B,), jnp.float32)
        init = (jnp.int32(0), carry.inner, jnp.zeros((B,), jnp.bool_), zi, jnp.zeros((B,), jnp.int32), zf, zi, zf)
        i, _, _, p_ad, s_ad, q_ad, p_max, q_max = jax.lax.while_loop(cond, body, init)
        adaptive = {"preds": p_ad, "steps": s_ad, "q_halt_logits": q_ad}
        maxed = {"preds": p_max, "steps": jnp.full((B,), c.halt_max_steps, jnp.int32), "q_halt_logits": q_max}
        primary, other, tag = (adaptive, maxed, "max") if mode == "adaptive" else (maxed, adaptive, "adaptive")
        out = dict(primary)
        if mode == "max_steps":  # the adaptive answers are known for free
            out.update({f"{k}_{tag}": v for k, v in other.items()})
        out["segments_run"] = i
        return out
