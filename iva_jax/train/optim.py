"""Optimizers, LR schedules and the gradient-health pieces, all as optax transformations.

`make_optimizer(cfg)` returns

    skip_nonfinite(chain(health_monitor, clip_by_global_norm, adamw | adam_atan2 | lion, [reduce_on_plateau]))

called as `tx.update(grads, opt_state, params, value=loss)`.  Pieces:
  * `make_schedule`: linear warmup (steps or percent) then cosine (with warm restarts) / constant /
    linear decay to `min_lr_ratio * lr`.
  * `skip_nonfinite`: like `optax.apply_if_finite`, but it always skips (zero update, inner state kept)
    and counts `skipped` and `consecutive_skips` in its state.  Skipped updates do not advance the
    inner optimizer's count, so the schedule follows *applied* updates.
  * `health_monitor`: passes gradients through and keeps bias-corrected EMAs of the gradient norm and
    the loss; flags a gradient spike (norm > threshold x EMA) and a loss spike (rise above the EMA
    by more than threshold standard deviations), with running counts.  Report-only.
  * plateau detection: `optax.contrib.reduce_on_plateau` on the loss (scales the updates, i.e. the LR).
`optimizer_metrics(opt_state, schedule)` reads all of this back as scalars for the metrics dict.
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Callable, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from iva_jax.train.config import TrainConfig

_global_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


# ------------------------------------------------------------------------------------------------
# schedules
# ------------------------------------------------------------------------------------------------
def lr_schedule(peak: float, total_steps: int, warmup_steps: int = 0, kind: str = "cosine",
                min_lr_ratio: float = 0.1, cycles: int = 1, restart_decay: float = 1.0) -> optax.Schedule:
    """LR at optimizer count c (0-based).

    warmup (c < W):  peak * (c + 1) / W
    after, t = c - W, D = total_steps - W:
      constant: peak
      linear:   peak * (1 - (1 - r) * min(t / D, 1))
      cosine:   cycle k = floor(t / (D / cycles)) (capped at cycles - 1), u = position in the cycle in [0, 1]:
                r * peak + (peak * restart_decay**k - r * peak) * (1 + cos(pi * u)) / 2
    """
    if kind not in ("cosine", "constant", "linear"):
        raise ValueError(f"schedule kind {kind!r} must be cosine, constant or linear")
    if total_steps < 1 or not 0 <= warmup_steps < max(total_steps, 1):
        raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) < total_steps ({total_steps})")
    if cycles < 1:
        raise ValueError(f"cycles={cycles} must be >= 1")
    decay_steps = max(total_steps - warmup_steps, 1)
    floor_lr = min_lr_ratio * peak

    def schedule(count):
        c = jnp.asarray(count, jnp.float32)
        warm = peak * (c + 1.0) / max(warmup_steps, 1)
        t = jnp.maximum(c - warmup_steps, 0.0)
        if kind == "constant":
            after = jnp.full_like(c, peak)
        elif kind == "linear":
            after = peak * (1.0 - (1.0 - min_lr_ratio) * jnp.minimum(t / decay_steps, 1.0))
        else:
            cycle_len = decay_steps / cycles
            k = jnp.minimum(jnp.floor(t / cycle_len), cycles - 1)
            u = jnp.clip((t - k * cycle_len) / cycle_len, 0.0, 1.0)
            top = peak * jnp.power(restart_decay, k)
            after = floor_lr + (top - floor_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * u))
        return jnp.where(c < warmup_steps, warm, after)

    return schedule


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
    """The schedule a TrainConfig describes."""
    return lr_schedule(cfg.lr, cfg.steps, cfg.resolved_warmup_steps, cfg.schedule, cfg.min_lr_ratio,
                       cfg.cosine_cycles, cfg.restart_decay)


# ------------------------------------------------------------------------------------------------
# non-finite guard
# ------------------------------------------------------------------------------------------------
class SkipState(NamedTuple):
    skipped: jax.Array  # total updates skipped for non-finite gradients / loss
    consecutive_skips: jax.Array
    inner_state: Any


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Apply `inner` only when all gradients (and `value`, if passed) are finite; else a zero update.

    On a skip the inner state is left untouched and `skipped` / `consecutive_skips` count it.
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return SkipState(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32), inner.init(params))

    def update_fn(updates, state, params=None, **extra):
        finite = _all_finite(updates)
        if extra.get("value") is not None:
            finite = finite & jnp.all(jnp.isfinite(extra["value"]))
        new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra)
        new_updates = jax.tree_util.tree_map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), new_updates)
        new_inner = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new_inner, state.inner_state)
        bad = (~finite).astype(jnp.int32)
        return new_updates, SkipState(state.skipped + bad, (state.consecutive_skips + bad) * bad, new_inner)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ------------------------------------------------------------------------------------------------
# gradient health
# ------------------------------------------------------------------------------------------------
class HealthState(NamedTuple):
    health_count: jax.Array  # updates observed (= applied updates when inside skip_nonfinite)
    grad_norm_ema: jax.Array  # raw (not bias-corrected) EMAs
    loss_ema: jax.Array
    loss_sq_ema: jax.Array
    grad_spike: jax.Array  # the last update was a spike
    loss_spike: jax.Array
    grad_spikes: jax.Array  # running counts
    loss_spikes: jax.Array
    grad_norm_avg: jax.Array  # bias-corrected EMAs (what is reported)
    loss_avg: jax.Array


def health_monitor(decay: float = 0.98, threshold: float = 4.0, warmup: int = 20) -> optax.GradientTransformationExtraArgs:
    """Identity on gradients; tracks EMAs of grad norm / loss (`value=`) and flags spikes after `warmup`."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"health_monitor decay={decay} must be in (0, 1)")

    def init_fn(params):
        del params
        z = jnp.zeros([], jnp.float32)
        i = jnp.zeros([], jnp.int32)
        return HealthState(i, z, z, z, jnp.array(False), jnp.array(False), i, i, z, z)

    def update_fn(updates, state, params=None, *, value=None, **extra):
        del params, extra
        gn = _global_norm(updates).astype(jnp.float32)
        n = state.health_count
        corr = jnp.maximum(1.0 - decay ** n.astype(jnp.float32), 1e-12)
        armed = n >= warmup
        grad_spike = armed & (gn > threshold * state.grad_norm_ema / corr)
        g_ema = decay * state.grad_norm_ema + (1 - decay) * gn
        if value is None:
            loss_spike, l_ema, l2_ema = jnp.array(False), state.loss_ema, state.loss_sq_ema
        else:
            v = jnp.asarray(value, jnp.float32)
            mean = state.loss_ema / corr
            std = jnp.sqrt(jnp.maximum(state.loss_sq_ema / corr - mean ** 2, 0.0))
            loss_spike = armed & (v - mean > threshold * jnp.maximum(std, 0.01 * jnp.abs(mean)))
            l_ema = decay * state.loss_ema + (1 - decay) * v
            l2_ema = decay * state.loss_sq_ema + (1 - decay) * v * v
        new_corr = 1.0 - decay ** (n + 1).astype(jnp.float32)
        return updates, HealthState(n + 1, g_ema, l_ema, l2_ema, grad_spike, loss_spike,
                                    state.grad_spikes + grad_spike.astype(jnp.int32),
                                    state.loss_spikes + loss_spike.astype(jnp.int32),
                                    g_ema / new_corr, l_ema / new_corr)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ------------------------------------------------------------------------------------------------
# the chain
# ------------------------------------------------------------------------------------------------
def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def decay_mask(no_decay_regex: Optional[str]) -> Optional[Callable[[Any], Any]]:
    """Mask function for weight decay: False for params whose path matches the regex."""
    if not no_decay_regex:
        return None
    pat = re.compile(no_decay_regex)
    return lambda params: jax.tree_util.tree_map_with_path(lambda p, _: not pat.search(_path_str(p)), params)


def _adam_atan2(cfg: TrainConfig, schedule, mask):
    try:
        from iva_jax.train import adam_atan2 as mod
    except ImportError as e:  # pragma: no cover - depends on the HRM module landing
        raise ValueError("optimizer='adam_atan2' needs iva_jax/train/adam_atan2.py, which is not available: "
                         f"{e}") from None
    fn = getattr(mod, "adam_atan2")
    kwargs = dict(learning_rate=schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=mask)
    accepted = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in kwargs.items() if k in accepted})


def make_optimizer(cfg: TrainConfig, schedule: Optional[optax.Schedule] = None) -> optax.GradientTransformationExtraArgs:
    """The full optax chain of a TrainConfig (see module docstring); call update with `value=loss`."""
    schedule = schedule or make_schedule(cfg)
    mask = decay_mask(cfg.no_decay_regex)
    if cfg.optimizer == "adamw":
        opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask)
    elif cfg.optimizer == "lion":
        opt = optax.lion(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=mask)
    elif cfg.optimizer == "adam_atan2":
        opt = _adam_atan2(cfg, schedule, mask)
    else:  # validated by TrainConfig
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}")
    parts = [health_monitor(cfg.health_ema, cfg.spike_threshold, cfg.spike_warmup)]
    if cfg.grad_clip_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    parts.append(opt)
    if cfg.plateau_factor < 1.0:
        parts.append(optax.contrib.reduce_on_plateau(
            factor=cfg.plateau_factor, patience=cfg.plateau_patience, rtol=cfg.plateau_rtol,
            cooldown=cfg.plateau_cooldown, accumulation_size=cfg.plateau_accumulation))
    return skip_nonfinite(optax.chain(*parts))


def _find(tree: Any, cls: type) -> Optional[Any]:
    found = [x for x in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, cls)) if isinstance(x, cls)]
    return found[0] if found else None


def optimizer_metrics(opt_state: Any, schedule: Optional[optax.Schedule] = None) -> Dict[str, jax.Array]:
    """Scalars from the guard / health / plateau states found in `opt_state` (absent pieces omitted).

    `lr` is the rate of the last applied update: schedule(applied - 1) * plateau scale.
    """
    out: Dict[str, jax.Array] = {}
    skip = _find(opt_state, SkipState)
    if skip is not None:
        out["skipped"] = skip.skipped
        out["consecutive_skips"] = skip.consecutive_skips
    health = _find(opt_state, HealthState)
    scale = jnp.ones([], jnp.float32)
    plateau = _find(opt_state, optax.contrib.ReduceLROnPlateauState)
    if plateau is not None:
        scale = jnp.asarray(plateau.scale, jnp.float32)
        out["lr_scale"] = scale
        out["plateau_count"] = plateau.plateau_count
    if health is not None:
        out["grad_spike"] = health.grad_spike
        out["loss_spike"] = health.loss_spike
        out["grad_spikes"] = health.grad_spikes
        out["loss_spikes"] = health.loss_spikes
        out["grad_norm_avg"] = health.grad_norm_avg
        out["loss_avg"] = health.loss_avg
        if schedule is not None:
            out["lr"] = schedule(jnp.maximum(health.health_count - 1, 0)) * scale
    return out


__all__ = ["lr_schedule", "make_schedule", "skip_nonfinite", "SkipState", "health_monitor", "HealthState",
           "decay_mask", "make_optimizer", "optimizer_metrics"]
