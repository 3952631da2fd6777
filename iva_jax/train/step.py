"""Train state, losses, and the jitted train / eval step builders (model-agnostic).

Model protocol (anything flax-like):
    apply_fn(variables, input_ids, *, rngs=..., mutable=["losses", "metrics"], **forward_kwargs)
      -> (out, collections)
  * `variables = {"params": trainable}` plus `{"frozen": state.frozen}` when the state has frozen
    weights (LoRA's base); params are cast to `compute_dtype` for the call (f32 master weights stay).
  * `out` is `logits [B, S, V]` or `(logits, extras)`; `extras["mtp_logits"]` is a sequence of K
    logits arrays, head k (1-based) predicting the token k positions after the next one.
  * Every leaf the model sows into the "losses" collection (`self.sow("losses", name, scalar)`; under
    `nn.scan` a per-layer stack) is summed, times `aux_loss_coef`, and added to the objective: MoE
    balance / router z losses go there, already weighted by the model's own coefficients.
  * Leaves sown into "metrics" are averaged and reported as `metrics["model/<path>"]`.
  * Forward kwargs: batch entries named in `forward_keys` (default segment_ids, positions) when present,
    plus `deterministic=<bool>` when `make_train_step(deterministic=...)` is set (False = training mode:
    router jitter, Sinkhorn selection, the bias-balanced router's bias update).
  * Model state: non-parameter variable collections (`TrainState.model_state`, e.g. {"moe_stats":
    {...}} holding the bias-balanced router's `expert_bias`) are passed with the params and made
    mutable in the train step; the updated collections form the next state's `model_state` (the eval
    step passes them read-only).  Models without such state have `model_state=None`.

Batch: `input_ids [B, S]`; optional `labels [B, S]` (HF convention: aligned with the inputs, shifted
here; -100 ignored), `loss_mask [B, S]` (aligned with labels), `segment_ids` (packing: targets in
another segment, or in segment 0 = padding, are ignored), `positions`.  `loss_mask` values are token
weights (normally 0/1; fractional weights count fractionally, and a NaN poisons the step, which the
optimizer's non-finite guard then skips).

Gradient accumulation splits the batch into `microbatches` strided slices (row j goes to slice
j % M, so every slice spans all data shards) and scans over them.  Token losses are summed and
divided by the token count of the whole batch, so the gradient equals the large-batch gradient
exactly; sown aux losses are averaged over the slices.  `model_state` is threaded through the slices in
order, so it ends as if the slices had run one after another.

Fused projections (`make_train_step(fuse_projections=True)`, or `fused_view_apply(model)` as the apply_fn):
each forward runs on the model's `decode_view` of the (compute-dtype) params, built inside the
differentiated function: q/k/v (and, where the SwiGLU would run XLA for that many tokens, gate/up) are
concatenated into one matmul each, and the gradient flows back through the concatenation to the
HF-layout params, so the optimizer state and checkpoints keep the HF names.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from iva_jax.config import dtype_of
from iva_jax.parallel.mesh import mesh_context
from iva_jax.parallel.rules import DEFAULT_RULES
from iva_jax.parallel.sharding import batch_sharding, replicated, sharded_jit, tree_shardings, unbox
from iva_jax.train.config import TrainConfig
from iva_jax.train.optim import optimizer_metrics

IGNORE_INDEX = -100
_global_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm
DEFAULT_FORWARD_KEYS = ("segment_ids", "positions")
# collections a model writes per call (sown losses / metrics), never carried as model state
TRANSIENT_COLLECTIONS = ("params", "losses", "metrics", "intermediates")


# ------------------------------------------------------------------------------------------------
# state
# ------------------------------------------------------------------------------------------------
@flax.struct.dataclass
class TrainState:
    """step (train_step calls), params (f32 master), opt_state, rng (raw uint32 key), frozen weights,
    model_state (non-parameter variable collections the model updates, e.g. {"moe_stats": ...}; or None)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    frozen: Any = None
    model_state: Any = None

    @property
    def skipped(self) -> jax.Array:
        """Updates skipped for non-finite gradients (0 when the optimizer has no guard)."""
        return optimizer_metrics(self.opt_state).get("skipped", jnp.zeros([], jnp.int32))

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation, rng: jax.Array, frozen: Any = None,
               model_state: Any = None) -> "TrainState":
        return cls(step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params),
                   rng=raw_key(rng), frozen=frozen, model_state=model_state_of(model_state))


def model_state_of(variables: Any) -> Optional[Dict[str, Any]]:
    """The carried collections of a flax variables dict (all but params / losses / metrics / intermediates),
    as a plain dict; None when there are none."""
    if variables is None:
        return None
    if not isinstance(variables, Mapping):
        raise ValueError(f"model state must be a mapping of variable collections, got {type(variables).__name__}")
    out = {k: flax.core.unfreeze(v) for k, v in variables.items() if k not in TRANSIENT_COLLECTIONS}
    return out or None


def _split_variables(tree: Any) -> Tuple[Any, Optional[Dict[str, Any]]]:
    """(params, model state) of an init_fn result: full variables (a mapping with "params") or bare params."""
    if isinstance(tree, Mapping) and "params" in tree:
        return tree["params"], model_state_of(tree)
    return tree, None


def raw_key(rng: jax.Array) -> jax.Array:
    """A uint32 key array (typed `jax.random.key` keys are unwrapped so orbax can store them)."""
    rng = jnp.asarray(rng)
    return jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng


def _is_quantized(x: Any) -> bool:
    """A quantized weight leaf (iva_jax.quant): it multiplies / dequantizes itself and keeps its own dtypes."""
    return hasattr(x, "dequantize") and hasattr(x, "matmul")


def _cast_floating(tree: Any, dtype) -> Any:
    """Floating leaves cast to `dtype`; integer leaves and quantized weights (QLoRA bases) left alone."""
    def one(x):
        if _is_quantized(x) or not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            return x
        return x.astype(dtype)
    return jax.tree_util.tree_map(one, tree, is_leaf=_is_quantized)


def init_train_state(init_fn: Callable[[jax.Array], Any], tx: optax.GradientTransformation, rng: jax.Array, *,
                     mesh: Optional[Mesh] = None, rules=DEFAULT_RULES, param_dtype: str = "float32",
                     frozen: Any = None, frozen_shardings: Any = None,
                     model_state: Any = None) -> Tuple[TrainState, Any]:
    """Build the TrainState directly in its sharded layout; return (state, state_shardings).

    `init_fn(rng)` returns the (boxed, logically annotated) params, or full flax variables
    (`model.init(...)`: a mapping with "params", whose other non-transient collections become
    `model_state`); shardings come from the boxes (unboxed leaves are replicated), and the optimizer
    state inherits them.  `model_state=` gives the model state explicitly instead.  `frozen` (already
    placed arrays) rides along untrained.  Without a mesh the state lives on the default device and
    the shardings are None.
    """
    dtype = dtype_of(param_dtype)
    rng = raw_key(rng)
    model_state = model_state_of(model_state)

    def make(key, ms):
        k_params, k_state = jax.random.split(key)
        params, init_ms = _split_variables(init_fn(k_params))
        if ms is not None and init_ms is not None:
            raise ValueError("init_train_state: model_state= was given and init_fn also returned model state "
                             f"(collections {sorted(init_ms)}); give it once")
        params = _cast_floating(params, dtype)
        return TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params),
                          rng=k_state, frozen=None, model_state=init_ms if ms is None else ms)

    if mesh is None:
        state = jax.jit(lambda k, ms: unbox(make(k, ms)))(rng, model_state)
        return state.replace(frozen=frozen), None
    abstract = jax.eval_shape(make, rng, model_state)
    shardings = tree_shardings(abstract, mesh, rules)
    with mesh_context(mesh), flax.linen.logical_axis_rules(rules):
        state = jax.jit(lambda k, ms: unbox(make(k, ms)), out_shardings=shardings)(rng, model_state)
    if frozen is not None:
        if frozen_shardings is None:
            frozen_shardings = jax.tree_util.tree_map(lambda x: x.sharding, frozen)
        shardings = shardings.replace(frozen=frozen_shardings)
        state = state.replace(frozen=frozen)
    return state, shardings


def create_train_state(params: Any, tx: optax.GradientTransformation, rng: jax.Array, *,
                       mesh: Optional[Mesh] = None, logical: Any = None, rules=DEFAULT_RULES,
                       param_dtype: Optional[str] = "float32", frozen: Any = None,
                       frozen_shardings: Any = None, model_state: Any = None) -> Tuple[TrainState, Any]:
    """TrainState from existing params (host or device arrays, e.g. a converted HF checkpoint).

    `logical` is the boxed abstract param tree (`jax.eval_shape(init_fn, rng)`) that supplies the
    logical axes; without it the params may themselves be boxed, else everything is replicated.
    `model_state` (collections such as {"moe_stats": ...}; boxed leaves keep their logical axes, the
    rest is replicated) rides along uncast.
    Returns (state, state_shardings) like `init_train_state`.  The state owns device arrays passed in
    (the train step donates them), so keep a host copy if you need the originals.
    """
    params = unbox(params)
    boxed_ms = model_state_of(model_state)
    model_state = unbox(boxed_ms)
    rng = raw_key(rng)
    if param_dtype is not None:
        params = _cast_floating(params, dtype_of(param_dtype))
    if mesh is None:
        params = jax.device_put(params)
        state = TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=jax.jit(tx.init)(params),
                           rng=jnp.asarray(rng), frozen=frozen, model_state=jax.device_put(model_state))
        return state, None
    boxed = logical if logical is not None else params
    abstract = jax.eval_shape(lambda p, k, ms: TrainState(step=jnp.zeros([], jnp.int32), params=p,
                                                          opt_state=tx.init(p), rng=k, model_state=ms),
                              boxed, rng, boxed_ms)
    shardings = tree_shardings(abstract, mesh, rules)
    with mesh_context(mesh):
        placed = jax.device_put(params, shardings.params)
        opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(placed)
        ms_placed = jax.device_put(model_state, shardings.model_state) if model_state is not None else None
    state = TrainState(step=jax.device_put(jnp.zeros([], jnp.int32), shardings.step), params=placed,
                       opt_state=opt_state, rng=jax.device_put(jnp.asarray(rng), shardings.rng), frozen=None,
                       model_state=ms_placed)
    if frozen is not None:
        if frozen_shardings is None:
            frozen_shardings = jax.tree_util.tree_map(lambda x: x.sharding, frozen)
        shardings = shardings.replace(frozen=frozen_shardings)
        state = state.replace(frozen=frozen)
    return state, shardings


# ------------------------------------------------------------------------------------------------
# losses
# ------------------------------------------------------------------------------------------------
def shifted_targets(batch: Mapping[str, jax.Array], shift: int = 1) -> Tuple[jax.Array, jax.Array]:
    """(targets [B, S-shift], weights [B, S-shift] f32): position t predicts labels[t + shift].

    Weight 0 for labels == -100 and across segment boundaries / padding; else loss_mask (default 1).
    """
    ids = batch["input_ids"]
    labels = batch.get("labels", ids)
    tgt = labels[:, shift:]
    keep = tgt != IGNORE_INDEX
    if "segment_ids" in batch:
        seg = batch["segment_ids"]
        keep = keep & (seg[:, shift:] == seg[:, :-shift]) & (seg[:, shift:] != 0)
    w = keep.astype(jnp.float32)
    if "loss_mask" in batch:
        w = w * batch["loss_mask"][:, shift:].astype(jnp.float32)
    return jnp.where(keep, tgt, 0).astype(jnp.int32), w


def cross_entropy_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                       label_smoothing: float = 0.0) -> Dict[str, jax.Array]:
    """Weighted sums over tokens (f32): `loss` (CE with label smoothing), `nll`, `z` (logsumexp^2), `tokens`.

    `logits [..., V]`, `targets [...]` int, `weights [...]`.  Smoothing mixes the one-hot target with
    the uniform distribution: (1 - eps) * nll + eps * mean_v(-log p_v).
    """
    if logits.shape[:-1] != targets.shape or targets.shape != weights.shape:
        raise ValueError(f"logits {logits.shape}, targets {targets.shape}, weights {weights.shape} disagree")
    lf = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(lf, axis=-1)
    nll = lse - jnp.take_along_axis(lf, targets[..., None], axis=-1)[..., 0]
    loss = nll if label_smoothing == 0 else (1 - label_smoothing) * nll + label_smoothing * (lse - lf.mean(-1))
    return {"loss": jnp.sum(loss * weights), "nll": jnp.sum(nll * weights), "z": jnp.sum(lse * lse * weights),
            "tokens": jnp.sum(weights)}


def _flatten_collection(tree: Any) -> Dict[str, jax.Array]:
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/") if tree else {}
    out = {}
    for k, v in flat.items():
        leaves = jax.tree_util.tree_leaves(v)
        out[k] = jnp.mean(jnp.stack([jnp.mean(jnp.asarray(x, jnp.float32)) for x in leaves]))
    return out


def _sum_collection(tree: Any) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    return sum((jnp.sum(jnp.asarray(x, jnp.float32)) for x in leaves), jnp.zeros([], jnp.float32))


def _forward(apply_fn, params, frozen, model_state, batch, rng, cfg: TrainConfig, forward_keys, apply_kwargs,
             update_state: bool):
    """(logits, extras, collections, new model_state); model_state collections are mutable iff update_state."""
    dtype = dtype_of(cfg.compute_dtype)
    variables = {"params": _cast_floating(params, dtype)}
    if frozen is not None:
        variables["frozen"] = _cast_floating(frozen, dtype)
    state_cols = list(model_state or {})
    if model_state:
        clash = [k for k in state_cols if k in variables]
        if clash:
            raise ValueError(f"model_state collections {clash} clash with the params / frozen variables")
        variables.update(model_state)
    kwargs = {k: batch[k] for k in forward_keys if k in batch}
    kwargs.update(apply_kwargs)
    rngs = {"dropout": rng} if rng is not None else None
    mutable = ["losses", "metrics"] + (state_cols if update_state else [])
    out, cols = apply_fn(variables, batch["input_ids"], rngs=rngs, mutable=mutable, **kwargs)
    logits, extras = (out if isinstance(out, tuple) else (out, {}))
    new_state = model_state
    if update_state and model_state:
        new_state = {k: flax.core.unfreeze(cols.get(k, model_state[k])) for k in state_cols}
    return logits, dict(extras or {}), cols, new_state


def _batch_sums(apply_fn, params, frozen, model_state, batch, rng, cfg, forward_keys, apply_kwargs,
                update_state: bool = False):
    """Per-(micro)batch sums: the loss terms before normalization, plus aux loss, model metrics and new state."""
    logits, extras, cols, new_state = _forward(apply_fn, params, frozen, model_state, batch, rng, cfg,
                                               forward_keys, apply_kwargs, update_state)
    tgt, w = shifted_targets(batch, 1)
    sums = cross_entropy_sums(logits[:, :-1], tgt, w, cfg.label_smoothing)
    if cfg.mtp_heads:
        mtp = tuple(extras.get("mtp_logits", ()))
        if len(mtp) != cfg.mtp_heads:
            raise ValueError(f"mtp_heads={cfg.mtp_heads} but the model returned {len(mtp)} mtp_logits")
        for k, lk in enumerate(mtp, start=1):
            tk, wk = shifted_targets(batch, 1 + k)
            s = cross_entropy_sums(lk[:, : -(1 + k)], tk, wk, cfg.label_smoothing)
            sums[f"mtp{k}_loss"], sums[f"mtp{k}_tokens"] = s["loss"], s["tokens"]
    sums["aux"] = _sum_collection(cols.get("losses", {}))
    model_metrics = {f"model/{k}": v for k, v in _flatten_collection(cols.get("metrics", {})).items()}
    return sums, model_metrics, new_state


def _token_counts(batch, cfg: TrainConfig) -> Dict[str, jax.Array]:
    counts = {"tokens": jnp.maximum(shifted_targets(batch, 1)[1].sum(), 1.0)}
    for k in range(1, cfg.mtp_heads + 1):
        counts[f"mtp{k}_tokens"] = jnp.maximum(shifted_targets(batch, 1 + k)[1].sum(), 1.0)
    return counts


def _objective(sums, counts, cfg: TrainConfig, n_micro: int) -> jax.Array:
    """The scalar optimized: token terms / whole-batch counts, aux terms / number of microbatches."""
    obj = (sums["loss"] + cfg.z_loss_coef * sums["z"]) / counts["tokens"] + cfg.aux_loss_coef * sums["aux"] / n_micro
    if cfg.mtp_heads:
        mtp = sum(sums[f"mtp{k}_loss"] / counts[f"mtp{k}_tokens"] for k in range(1, cfg.mtp_heads + 1))
        obj = obj + cfg.mtp_loss_coef * mtp / cfg.mtp_heads
    return obj


def make_loss_fn(apply_fn: Callable, config: TrainConfig, *, forward_keys: Sequence[str] = DEFAULT_FORWARD_KEYS,
                 apply_kwargs: Optional[Mapping[str, Any]] = None) -> Callable:
    """`loss(params, model_state, batch, rng=None) -> scalar`: the train step's objective on one batch (no
    microbatching, no optimizer), e.g. to time or differentiate the loss alone."""
    kw = dict(apply_kwargs or {})

    def loss(params, model_state, batch, rng=None):
        sums, _, _ = _batch_sums(apply_fn, params, None, model_state, batch, rng, config, forward_keys, kw)
        return _objective(sums, _token_counts(batch, config), config, 1)

    return loss


def _summarize(sums, counts, cfg: TrainConfig, n_micro: int) -> Dict[str, jax.Array]:
    t = counts["tokens"]
    m = {"loss": _objective(sums, counts, cfg, n_micro), "ce": sums["loss"] / t, "nll": sums["nll"] / t,
         "ppl": jnp.exp(sums["nll"] / t), "tokens": sums["tokens"]}
    if cfg.z_loss_coef:
        m["z_loss"] = cfg.z_loss_coef * sums["z"] / t
    m["aux_loss"] = cfg.aux_loss_coef * sums["aux"] / n_micro
    for k in range(1, cfg.mtp_heads + 1):
        m[f"mtp{k}_loss"] = sums[f"mtp{k}_loss"] / counts[f"mtp{k}_tokens"]
    return m


def split_microbatches(batch: Mapping[str, jax.Array], n: int) -> Dict[str, jax.Array]:
    """[B, ...] -> [n, B/n, ...] with row j in slice j % n (each slice spans every data shard)."""
    def one(x):
        b = x.shape[0]
        if b % n:
            raise ValueError(f"batch of {b} rows cannot be split into {n} microbatches")
        return jnp.swapaxes(x.reshape((b // n, n) + x.shape[1:]), 0, 1)
    return {k: one(v) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------
# batch checks
# ------------------------------------------------------------------------------------------------
def check_batch(batch: Mapping[str, Any], microbatches: int = 1) -> Tuple[int, int]:
    """ValueError unless `batch` has int `input_ids [B, S]` and every entry is [B, S]; returns (B, S)."""
    if "input_ids" not in batch:
        raise ValueError(f"batch needs 'input_ids'; got keys {sorted(batch)}")
    shape = tuple(np.shape(batch["input_ids"]))
    if len(shape) != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {shape}")
    if not jnp.issubdtype(batch["input_ids"].dtype, jnp.integer):
        raise ValueError(f"input_ids must be integers, got {batch['input_ids'].dtype}")
    for k, v in batch.items():
        if tuple(np.shape(v)) != shape:
            raise ValueError(f"batch[{k!r}] has shape {tuple(np.shape(v))}, expected {shape} like input_ids")
    if shape[1] < 2:
        raise ValueError(f"sequence length {shape[1]} < 2 leaves no next-token targets")
    if shape[0] % microbatches:
        raise ValueError(f"batch size {shape[0]} is not divisible by microbatches={microbatches}")
    return shape


# ------------------------------------------------------------------------------------------------
# builders
# ------------------------------------------------------------------------------------------------
def fused_view_apply(model: Any) -> Callable:
    """An apply_fn running `model.apply` on `model.decode_view(params, rows=tokens of the call)`: the same
    function of the HF-layout params with fused q/k/v (and gate/up) matmuls, differentiable w.r.t. them."""
    if not callable(getattr(model, "decode_view", None)):
        raise ValueError(f"fused projections need a model with a decode_view method (iva_jax Transformer), "
                         f"got {type(model).__name__}")

    def apply(variables, input_ids, *args, **kwargs):
        if not isinstance(variables, Mapping) or "params" not in variables:
            raise ValueError("fused_view_apply expects variables {'params': ..., ...}")
        x = input_ids if input_ids is not None else kwargs.get("inputs_embeds")  # [B, S(, D)]
        view, params = model.decode_view(variables["params"], rows=int(np.prod(np.shape(x)[:2])))
        return view.apply({**variables, "params": params}, input_ids, *args, **kwargs)

    return apply


def make_train_step(apply_fn: Callable, tx: optax.GradientTransformation, config: TrainConfig, *,
                    schedule: Optional[optax.Schedule] = None, mesh: Optional[Mesh] = None,
                    state_shardings: Any = None, rules=DEFAULT_RULES,
                    forward_keys: Sequence[str] = DEFAULT_FORWARD_KEYS,
                    apply_kwargs: Optional[Mapping[str, Any]] = None, donate: bool = True,
                    deterministic: Optional[bool] = None, fuse_projections: bool = False) -> Callable:
    """One jitted `train_step(state, batch) -> (state, metrics)` (see the module docstring).

    With a mesh, `state_shardings` (from `init_train_state`) and the batch sharding are declared as
    in/out shardings; metrics come back replicated.  The state is donated unless `donate=False`.
    `deterministic` (None: not passed) is given to `apply_fn` in training, e.g. False for a decoder
    whose MoE router jitters or updates its bias in training; the `state.model_state` collections are
    updated by the step.  `fuse_projections`: `apply_fn` must be a model's bound `apply` (`model.apply`);
    the forward runs on `fused_view_apply(model)` (wrap other apply_fns, e.g. LoRA's, around that yourself).
    """
    if fuse_projections:
        model = getattr(apply_fn, "__self__", None)
        if model is None or not callable(getattr(model, "decode_view", None)):
            raise ValueError("make_train_step(fuse_projections=True) needs apply_fn=model.apply of a model with "
                             f"decode_view; got {apply_fn!r} (compose fused_view_apply(model) into it instead)")
        apply_fn = fused_view_apply(model)
    tx = optax.with_extra_args_support(tx)
    apply_kwargs = dict(apply_kwargs or {})
    if deterministic is not None:
        if apply_kwargs.get("deterministic", deterministic) != deterministic:
            raise ValueError(f"make_train_step: deterministic={deterministic} contradicts "
                             f"apply_kwargs['deterministic']={apply_kwargs['deterministic']}")
        apply_kwargs["deterministic"] = bool(deterministic)
    n_micro = config.microbatches
    if mesh is not None and state_shardings is None:
        raise ValueError("make_train_step: a mesh needs state_shardings (from init_train_state)")
    bsh = batch_sharding(mesh, rules, config.batch_size // n_micro * n_micro) if mesh is not None else None
    micro_sh = batch_sharding(mesh, rules, config.batch_size // n_micro) if mesh is not None else None
    param_sh = state_shardings.params if state_shardings is not None else None
    ms_sh = getattr(state_shardings, "model_state", None) if state_shardings is not None else None

    def constrain(x, sh):
        return jax.lax.with_sharding_constraint(x, sh) if sh is not None else x

    def train_step(state: TrainState, batch):
        counts = _token_counts(batch, config)
        rng, step_rng = jax.random.split(state.rng)

        def grads_of(mb, key, ms):
            def f(p):
                sums, mm, new_ms = _batch_sums(apply_fn, p, state.frozen, ms, mb, key, config, forward_keys,
                                               apply_kwargs, update_state=True)
                return _objective(sums, counts, config, n_micro), (sums, mm, new_ms)
            (_, (sums, mm, new_ms)), g = jax.value_and_grad(f, has_aux=True)(state.params)
            return (g, sums, mm), new_ms

        if n_micro == 1:
            (grads, sums, mm), model_state = grads_of(batch, step_rng, state.model_state)
        else:
            mbs = split_microbatches(batch, n_micro)
            first = jax.tree_util.tree_map(lambda x: x[0], mbs)
            shapes = jax.eval_shape(grads_of, first, step_rng, state.model_state)[0]
            zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

            def body(carry, xs):  # model state runs through the slices in order
                acc, ms = carry
                mb, i = xs
                mb = {k: constrain(v, micro_sh) for k, v in mb.items()}
                gsm, ms = grads_of(mb, jax.random.fold_in(step_rng, i), ms)
                acc = jax.tree_util.tree_map(jnp.add, acc, gsm)
                return ((constrain(acc[0], param_sh),) + acc[1:], constrain(ms, ms_sh)), None

            ((grads, sums, mm), model_state), _ = jax.lax.scan(
                body, (zeros, state.model_state), (mbs, jnp.arange(n_micro)))
            mm = {k: v / n_micro for k, v in mm.items()}
        metrics = _summarize(sums, counts, config, n_micro)
        metrics.update(mm)
        metrics["grad_norm"] = _global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params, value=metrics["loss"])
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng,
                                  model_state=model_state)
        metrics.update(optimizer_metrics(opt_state, schedule))
        return new_state, metrics

    jitted = sharded_jit(train_step, mesh=mesh, in_shardings=(state_shardings, bsh),
                         out_shardings=(state_shardings, replicated(mesh) if mesh is not None else None),
                         donate_argnums=(0,) if donate else (), rules=rules)

    def call(state: TrainState, batch: Mapping[str, Any]):
        b, _ = check_batch(batch, n_micro)
        if b != config.batch_size:
            raise ValueError(f"batch has {b} rows but TrainConfig.batch_size={config.batch_size}")
        return jitted(state, dict(batch))

    call.jitted = jitted.jitted
    call.lower = lambda state, batch: jitted.lower(state, dict(batch))
    return call


def make_eval_step(apply_fn: Callable, config: TrainConfig, *, mesh: Optional[Mesh] = None,
                   state_shardings: Any = None, rules=DEFAULT_RULES,
                   forward_keys: Sequence[str] = DEFAULT_FORWARD_KEYS,
                   apply_kwargs: Optional[Mapping[str, Any]] = None) -> Callable:
    """Jitted `eval_step(state, batch) -> sums` (nll, loss, tokens: f32 scalars); combine with `evaluate`."""
    apply_kwargs = dict(apply_kwargs or {})
    cache: Dict[int, Callable] = {}

    def eval_step(state: TrainState, batch):
        sums, _, _ = _batch_sums(apply_fn, state.params, state.frozen, state.model_state, batch, None, config,
                                 forward_keys, apply_kwargs)
        return {"nll": sums["nll"], "loss": sums["loss"], "tokens": sums["tokens"]}

    def call(state: TrainState, batch: Mapping[str, Any]):
        b, _ = check_batch(batch)
        if b not in cache:
            bsh = batch_sharding(mesh, rules, b) if mesh is not None else None
            cache[b] = sharded_jit(eval_step, mesh=mesh, in_shardings=(state_shardings, bsh),
                                   out_shardings=replicated(mesh) if mesh is not None else None, rules=rules)
        return cache[b](state, dict(batch))

    return call


def evaluate(eval_step: Callable, state: TrainState, batches) -> Dict[str, float]:
    """Token-weighted mean loss / nll and perplexity over an iterable of batches."""
    tot = {"nll": 0.0, "loss": 0.0, "tokens": 0.0}
    for batch in batches:
        s = jax.device_get(eval_step(state, batch))
        for k in tot:
            tot[k] += float(s[k])
    if tot["tokens"] == 0:
        raise ValueError("evaluate: the batches held no target tokens")
    nll = tot["nll"] / tot["tokens"]
    return {"eval_loss": tot["loss"] / tot["tokens"], "eval_nll": nll, "eval_ppl": float(np.exp(nll)),
            "eval_tokens": tot["tokens"]}


def make_tx_and_schedule(config: TrainConfig):
    """(tx, schedule) from a TrainConfig (convenience around `optim.make_optimizer`)."""
    from iva_jax.train.optim import make_optimizer, make_schedule
    sched = make_schedule(config)
    return make_optimizer(config, sched), sched
