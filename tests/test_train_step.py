"""Train step: losses vs float64 numpy, gradient accumulation == large batch, NaN skip, remat, schedules,
gradient-health pieces, config validation."""

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from iva_jax.train.config import TrainConfig
from iva_jax.train.sft import SFTConfig
from iva_jax.train.optim import (health_monitor, lr_schedule, make_optimizer, make_schedule, optimizer_metrics,
                                 skip_nonfinite)
from iva_jax.layers.remat import remat_policy
from iva_jax.train.step import (check_batch, create_train_state, cross_entropy_sums, evaluate, make_eval_step,
                                make_loss_fn, make_train_step, shifted_targets)
from iva_jax.train.tiny import TinyConfig, TinyLM, tiny_host_params

ROOT = Path(__file__).resolve().parents[1]
B, S = 6, 11


def _batch(rng, vocab):
    ids = rng.integers(0, vocab, (B, S)).astype(np.int32)
    labels = np.where(rng.random((B, S)) < 0.15, -100, ids).astype(np.int32)
    # uneven packing: row r has a segment break at 3 + r, last row ends in padding (segment 0)
    seg = np.ones((B, S), np.int32)
    pos = np.tile(np.arange(S), (B, 1)).astype(np.int32)
    for r in range(B):
        seg[r, 3 + r:] = 2
        pos[r, 3 + r:] = np.arange(S - 3 - r)
    seg[-1, -3:] = 0
    loss_mask = (rng.random((B, S)) > 0.1).astype(np.float32)
    loss_mask[0, :4] = 0.5  # fractional token weights count fractionally
    return {"input_ids": ids, "labels": labels, "segment_ids": seg, "positions": pos, "loss_mask": loss_mask}


@pytest.fixture(scope="module")
def setup():
    tcfg = TinyConfig(aux_loss_coef=0.01, mtp_heads=1, num_layers=2)
    model, logical, params = tiny_host_params(tcfg, seed=3)
    base = dict(steps=20, batch_size=B, seq_len=S, compute_dtype="float32", z_loss_coef=1e-3,
                label_smoothing=0.1, mtp_heads=1, mtp_loss_coef=0.5, aux_loss_coef=2.0)
    # plain SGD(lr=1) behind the guard: the parameter change of one step *is* the gradient
    tx = skip_nonfinite(optax.chain(health_monitor(), optax.sgd(1.0)))
    cfgs = {m: TrainConfig(microbatches=m, **base) for m in (1, 3)}
    steps = {m: make_train_step(model.apply, tx, c, donate=False) for m, c in cfgs.items()}
    state, _ = create_train_state(params, tx, jax.random.PRNGKey(0))
    batch = _batch(np.random.default_rng(0), tcfg.vocab_size)
    return dict(model=model, params=params, cfgs=cfgs, steps=steps, state=state, batch=batch, tx=tx, tcfg=tcfg)


def _np_ce(logits, targets, w, eps):
    lf = logits.astype(np.float64)
    m = lf.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(lf - m).sum(-1, keepdims=True)))[..., 0]
    nll = lse - np.take_along_axis(lf, targets[..., None], -1)[..., 0]
    smooth = lse - lf.mean(-1)
    return ((1 - eps) * nll + eps * smooth), nll, lse


def _np_targets(batch, shift):
    lab = batch["labels"][:, shift:]
    seg = batch["segment_ids"]
    keep = (lab != -100) & (seg[:, shift:] == seg[:, :-shift]) & (seg[:, shift:] != 0)
    return np.where(keep, lab, 0), keep * batch["loss_mask"][:, shift:].astype(np.float64)


def test_loss_terms_match_float64_reference(setup):
    s = setup
    cfg = s["cfgs"][1]
    _, metrics = s["steps"][1](s["state"], s["batch"])
    b = s["batch"]
    (logits, extras), cols = s["model"].apply({"params": s["params"]}, b["input_ids"], segment_ids=b["segment_ids"],
                                              positions=b["positions"], mutable=["losses", "metrics"])
    logits, mtp = np.asarray(logits), np.asarray(extras["mtp_logits"][0])
    t1, w1 = _np_targets(b, 1)
    loss1, nll1, lse1 = _np_ce(logits[:, :-1], t1, w1, 0.1)
    n1 = w1.sum()
    ce = (loss1 * w1).sum() / n1
    z = 1e-3 * (lse1 ** 2 * w1).sum() / n1
    t2, w2 = _np_targets(b, 2)
    mtp_loss = (_np_ce(mtp[:, :-2], t2, w2, 0.1)[0] * w2).sum() / w2.sum()
    aux = 2.0 * sum(float(np.sum(x)) for x in jax.tree_util.tree_leaves(cols["losses"]))
    assert n1 > 20 and w2.sum() > 15 and aux > 0
    np.testing.assert_allclose(metrics["ce"], ce, rtol=2e-6)
    np.testing.assert_allclose(metrics["nll"], (nll1 * w1).sum() / n1, rtol=2e-6)
    np.testing.assert_allclose(metrics["z_loss"], z, rtol=2e-6)
    np.testing.assert_allclose(metrics["mtp1_loss"], mtp_loss, rtol=2e-6)
    np.testing.assert_allclose(metrics["aux_loss"], aux, rtol=2e-6)
    np.testing.assert_allclose(metrics["loss"], ce + z + aux + cfg.mtp_loss_coef * mtp_loss, rtol=2e-6)
    np.testing.assert_allclose(metrics["tokens"], n1)
    np.testing.assert_allclose(metrics["ppl"], math.exp((nll1 * w1).sum() / n1), rtol=2e-6)
    assert "model/layers/act_rms" in metrics


def test_loss_fn_is_the_steps_objective(setup):
    """make_loss_fn: the step's optimized scalar and (SGD lr=1: the parameter change) its gradient."""
    s = setup
    new, m = s["steps"][1](s["state"], s["batch"])
    loss, grads = jax.value_and_grad(make_loss_fn(s["model"].apply, s["cfgs"][1]))(
        s["state"].params, s["state"].model_state, s["batch"])
    np.testing.assert_allclose(loss, m["loss"], rtol=1e-6)
    for g, p0, p1 in zip(*(jax.tree_util.tree_leaves(t) for t in (grads, s["state"].params, new.params))):
        np.testing.assert_allclose(g, p0 - p1, rtol=1e-4, atol=1e-6)


def test_eval_step_matches_train_metrics(setup):
    s = setup
    _, m = s["steps"][1](s["state"], s["batch"])
    ev = make_eval_step(s["model"].apply, s["cfgs"][1])
    half = {k: v[:3] for k, v in s["batch"].items()}
    rest = {k: v[3:] for k, v in s["batch"].items()}
    out = evaluate(ev, s["state"], [half, rest])  # token-weighted over batches of another size
    np.testing.assert_allclose(out["eval_nll"], m["nll"], rtol=2e-6)
    np.testing.assert_allclose(out["eval_loss"], m["ce"], rtol=2e-6)
    np.testing.assert_allclose(out["eval_ppl"], m["ppl"], rtol=2e-6)
    assert out["eval_tokens"] == pytest.approx(float(m["tokens"]))
    empty = {**half, "labels": np.full_like(half["labels"], -100)}
    with pytest.raises(ValueError, match="no target tokens"):
        evaluate(ev, s["state"], [empty])


def test_cross_entropy_gradient_matches_analytic():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((3, 5, 13)).astype(np.float32) * 3
    tgt = rng.integers(0, 13, (3, 5)).astype(np.int32)
    w = (rng.random((3, 5)) > 0.3).astype(np.float32)
    eps = 0.2

    def f(lg):
        s = cross_entropy_sums(lg, tgt, w, eps)
        return s["loss"] + 0.01 * s["z"]

    g = np.asarray(jax.jit(jax.grad(f))(jnp.asarray(logits)))
    lf = logits.astype(np.float64)
    p = np.exp(lf - lf.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    lse = np.log(np.exp(lf).sum(-1))
    onehot = np.eye(13)[tgt]
    want = ((1 - eps) * (p - onehot) + eps * (p - 1.0 / 13) + 0.01 * 2 * lse[..., None] * p) * w[..., None]
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="disagree"):
        cross_entropy_sums(jnp.zeros((2, 3, 4)), jnp.zeros((2, 4), jnp.int32), jnp.zeros((2, 4)))


def test_shifted_targets_mask_segments_and_padding():
    batch = {"input_ids": jnp.array([[5, 6, 7, 8, 9]]), "labels": jnp.array([[5, 6, -100, 8, 9]]),
             "segment_ids": jnp.array([[1, 1, 1, 2, 0]])}
    tgt, w = shifted_targets(batch, 1)
    np.testing.assert_array_equal(np.asarray(w), [[1, 0, 0, 0]])  # -100, segment break, padding
    np.testing.assert_array_equal(np.asarray(tgt), [[6, 0, 0, 0]])


def test_gradient_accumulation_equals_large_batch(setup):
    s = setup
    s1, m1 = s["steps"][1](s["state"], s["batch"])
    s3, m3 = s["steps"][3](s["state"], s["batch"])
    # sown aux losses are averaged over equal-sized microbatches; TinyLM's (a mean over all elements)
    # is therefore batch-split invariant too, so everything, gradients included, must agree
    for k in ("loss", "ce", "z_loss", "mtp1_loss", "aux_loss", "tokens", "grad_norm"):
        np.testing.assert_allclose(m3[k], m1[k], rtol=2e-6, err_msg=k)
    g1 = jax.tree_util.tree_map(lambda a, b: np.asarray(a) - np.asarray(b), s["state"].params, s1.params)
    g3 = jax.tree_util.tree_map(lambda a, b: np.asarray(a) - np.asarray(b), s["state"].params, s3.params)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree_util.tree_leaves(g3)):
        # p_old - p_new carries the f32 rounding of p (|p| up to ~3): atol of a few ulps
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    assert float(m1["grad_norm"]) > 0.1


def test_nan_batch_is_skipped_and_counted(setup):
    s = setup
    step = s["steps"][1]
    bad = dict(s["batch"])
    bad["loss_mask"] = bad["loss_mask"].copy()
    bad["loss_mask"][2, 3] = np.nan  # a weighted (kept) target position
    st, m = step(s["state"], bad)
    assert not np.isfinite(float(m["loss"]))
    assert int(m["skipped"]) == 1 and int(m["consecutive_skips"]) == 1 and int(st.skipped) == 1
    assert int(st.step) == 1
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                           st.params, s["state"].params)
    assert int(optimizer_metrics(st.opt_state)["grad_spikes"]) == 0
    health = st.opt_state.inner_state[0]
    assert int(health.health_count) == 0  # the inner optimizer state did not advance
    st2, m2 = step(st, s["batch"])
    assert np.isfinite(float(m2["loss"])) and int(m2["skipped"]) == 1 and int(m2["consecutive_skips"]) == 0
    assert int(st2.opt_state.inner_state[0].health_count) == 1
    moved = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                                                             st2.params, s["state"].params))
    assert max(moved) > 0


def test_batch_checks_raise_early(setup):
    step = setup["steps"][3]
    b = setup["batch"]
    with pytest.raises(ValueError, match=r"batch\['labels'\] has shape \(6, 10\)"):
        step(setup["state"], {**b, "labels": b["labels"][:, :-1]})
    with pytest.raises(ValueError, match="batch_size=6"):
        step(setup["state"], {k: v[:3] for k, v in b.items()})
    with pytest.raises(ValueError, match="not divisible by microbatches=4"):
        check_batch({k: v for k, v in b.items()}, 4)
    with pytest.raises(ValueError, match="must be integers"):
        check_batch({"input_ids": np.zeros((2, 3), np.float32)})


def test_bf16_compute_keeps_f32_master_weights(setup):
    s = setup
    cfg = s["cfgs"][1].replace(compute_dtype="bfloat16")
    step = make_train_step(s["model"].apply, s["tx"], cfg, donate=False)
    new_state, metrics = jax.eval_shape(step.jitted, s["state"], {k: jnp.asarray(v) for k, v in s["batch"].items()})
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(new_state.params))
    assert metrics["loss"].dtype == jnp.float32
    # the forward pass itself runs in bf16: the model sees bf16 params and produces bf16 logits
    jaxpr = jax.make_jaxpr(step.jitted)(s["state"], {k: jnp.asarray(v) for k, v in s["batch"].items()})
    assert "bf16[6,11,67]" in str(jaxpr)


def test_remat_policies_give_identical_gradients():
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 67, (2, 7)), jnp.int32)
    base = TinyConfig(num_layers=2)
    _, logical, params = tiny_host_params(base, seed=5)

    def loss(p, policy):
        lg = TinyLM(base.replace(remat=policy)).apply({"params": p}, ids)
        return jnp.mean(jax.nn.logsumexp(lg, -1) - lg[..., 0])

    grads = jax.jit(lambda p: [jax.grad(loss)(p, r) for r in ("none", "full", "dots_saveable")])(params)
    for g in grads[1:]:
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), g, grads[0])
    fwd = {r: str(jax.make_jaxpr(lambda p: loss(p, r))(params)) for r in ("none", "full")}
    assert "remat" in fwd["full"] and "remat" not in fwd["none"]
    with pytest.raises(ValueError, match="remat policy 'some'"):
        remat_policy("some")


# ------------------------------------------------------------------------------------------------
# schedules and optimizer pieces
# ------------------------------------------------------------------------------------------------
def _ref_lr(c, peak, total, warm, kind, r, cycles=1, decay=1.0):
    if c < warm:
        return peak * (c + 1) / warm
    t, d = c - warm, total - warm
    if kind == "constant":
        return peak
    if kind == "linear":
        return peak * (1 - (1 - r) * min(t / d, 1))
    L = d / cycles
    k = min(math.floor(t / L), cycles - 1)
    u = min(max((t - k * L) / L, 0), 1)
    return r * peak + (peak * decay ** k - r * peak) * 0.5 * (1 + math.cos(math.pi * u))


def test_schedules_match_hand_computed_values():
    cfg = TrainConfig(steps=50, lr=1e-3, warmup_pct=0.1, min_lr_ratio=0.1, cosine_cycles=3, restart_decay=0.5)
    assert cfg.resolved_warmup_steps == 5
    same = TrainConfig(steps=50, lr=1e-3, warmup_steps=5, min_lr_ratio=0.1, cosine_cycles=3, restart_decay=0.5)
    counts = jnp.arange(0, 60)
    a, b = jax.jit(make_schedule(cfg))(counts), jax.jit(make_schedule(same))(counts)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    want = [_ref_lr(c, 1e-3, 50, 5, "cosine", 0.1, 3, 0.5) for c in range(60)]
    np.testing.assert_allclose(np.asarray(a), want, rtol=1e-5)
    # landmarks: end of warmup = peak, cycle starts restart at decayed peaks, the end is the floor
    assert abs(float(a[4]) - 1e-3) < 1e-9 and abs(float(a[20]) - 0.5e-3) < 1e-8 and abs(float(a[35]) - 0.25e-3) < 1e-8
    assert abs(float(a[59]) - 1e-4) < 1e-9
    for kind in ("linear", "constant"):
        f = lr_schedule(2e-3, 40, 4, kind, 0.25)
        np.testing.assert_allclose(np.asarray(jax.jit(f)(counts)), [_ref_lr(c, 2e-3, 40, 4, kind, 0.25) for c in range(60)],
                                   rtol=1e-5)
    with pytest.raises(ValueError, match="warmup_steps"):
        lr_schedule(1e-3, 10, 10)


def test_health_monitor_flags_spikes():
    tx = health_monitor(decay=0.9, threshold=3.0, warmup=5)
    p = {"w": jnp.zeros(3)}
    st = tx.init(p)
    update = jax.jit(lambda s, g, v: tx.update({"w": jnp.array([g, 0.0, 0.0])}, s, value=v)[1])
    for i in range(8):
        st = update(st, 1.0, 2.0 - 0.01 * i)
    assert not bool(st.grad_spike) and not bool(st.loss_spike)
    np.testing.assert_allclose(float(st.grad_norm_avg), 1.0, rtol=1e-6)
    st = update(st, 10.0, 5.0)
    assert bool(st.grad_spike) and bool(st.loss_spike) and int(st.grad_spikes) == 1 and int(st.loss_spikes) == 1
    st = update(st, 1.0, 1.9)
    assert not bool(st.grad_spike) and int(st.grad_spikes) == 1


def test_plateau_scales_lr_and_optimizers_descend():
    cfg = TrainConfig(steps=100, lr=0.1, warmup_steps=0, schedule="constant", plateau_factor=0.5,
                      plateau_patience=2, plateau_accumulation=1, grad_clip_norm=None, weight_decay=0.0)
    tx = make_optimizer(cfg)
    p = {"w": jnp.ones(4)}
    st = tx.init(p)
    sched = make_schedule(cfg)
    update = jax.jit(lambda s: tx.update({"w": jnp.ones(4)}, s, p, value=jnp.array(1.0))[1])
    for _ in range(6):  # a flat loss: after `patience` non-improving updates the scale halves
        st = update(st)
    m = optimizer_metrics(st, sched)
    assert float(m["lr_scale"]) < 1.0
    np.testing.assert_allclose(float(m["lr"]), 0.1 * float(m["lr_scale"]), rtol=1e-6)
    # every optimizer choice: a finite update pointing downhill, parameter paths matching no_decay get no decay
    g = {"w": jnp.array([0.5, -1.0, 2.0]), "norm": {"scale": jnp.array([1.0, 1.0, 1.0])}}
    params = {"w": jnp.ones(3), "norm": {"scale": jnp.ones(3)}}
    for name in ("adamw", "lion", "adam_atan2"):
        tx = make_optimizer(TrainConfig(optimizer=name, lr=0.01, warmup_steps=0, weight_decay=0.5))
        u, _ = jax.jit(lambda: tx.update(g, tx.init(params), params, value=jnp.array(1.0)))()
        assert float(jnp.vdot(u["w"], g["w"])) < 0, name
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(u))
        # scale has gradient +1: without decay the update is the optimizer's step alone (same for all coords)
        np.testing.assert_allclose(np.asarray(u["norm"]["scale"]), np.asarray(u["norm"]["scale"])[0], rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------
def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match=r"unknown TrainConfig keys \['learning_rate'\]; valid keys: \[.*'lr'"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(ValueError, match=r"unknown DataConfig keys \['pathz'\]"):
        TrainConfig.from_dict({"data": {"pathz": ["x"]}})
    with pytest.raises(ValueError, match="optimizer='sgd'"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="not both"):
        TrainConfig(warmup_steps=3, warmup_pct=0.1)
    with pytest.raises(ValueError, match="microbatches=3"):
        TrainConfig(batch_size=8, microbatches=3)
    with pytest.raises(ValueError, match="remat='some'"):
        TrainConfig(remat="some")
    cfg = SFTConfig.from_yaml(ROOT / "configs" / "train_sft.yaml")
    assert cfg.optimizer == "adamw" and cfg.compute_dtype == "bfloat16" and cfg.resolved_warmup_steps == 30
    assert SFTConfig.from_yaml(cfg.to_yaml()) == cfg
    assert TrainConfig.from_dict({"mesh": {"fsdp": 2}, "data": {"paths": ["a.jsonl"]}}).data.paths == ("a.jsonl",)
