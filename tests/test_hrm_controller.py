"""The HRM controller over an LM (iva_jax.hrm.controller): ACT halting and the ponder penalty against a
float64 numpy reference, the ponder loop (shapes, the mixture of per-step logits, the controls each LM
pass ran with), the sink-bias / router-temperature hooks, gradients (controller and LoRA yes, frozen LM
no), evaluation modes, the HRM-RPO adapter, configs, and the seed's check (halt_rate in [0.3, 0.7]).

Tiny random decoders (2 layers, width 40, vocab 61; a 5-expert MoE variant so tau matters), non-power-of-
two batch / sequence / controller sizes.  Each jitted function compiles once per module."""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iva_jax.hrm.controller import (ControllerConfig, act_halting, halting_stats, init_controller, make_controller,
                                    ponder_forward, ponder_lm_loss, ponder_penalty)
from iva_jax.hrm.controller_task import seed_check, tiny_lm

ROOT = Path(__file__).resolve().parents[1]
# XLA's backend optimisation level 0: these programs run a handful of times, so compile time is what counts
FAST = {"xla_backend_optimization_level": 0}
jit = functools.partial(jax.jit, compiler_options=FAST)
B, S, CTX = 5, 9, 4
CFG = ControllerConfig(hidden_size=24, max_steps=3, L_cycles=2, ponder_weight=0.03, sink="layer_head")


def perturb(params, seed, scale=0.5):
    """Controller params with the zero-initialised heads made random (non-trivial alpha_s, tau, p_h)."""
    rng = np.random.default_rng(seed)
    return {k: (jax.tree_util.tree_map(lambda a: a + scale * rng.normal(size=a.shape).astype(np.float32), v)
                if k.endswith("_head") else v) for k, v in params.items()}


def ids_and_read(vocab, seed=0):
    ids = jnp.asarray(np.random.default_rng(seed).integers(3, vocab, (B, S)), jnp.int32)
    return ids, jnp.broadcast_to(jnp.arange(S) < CTX, (B, S))


@pytest.fixture(scope="module")
def dense():
    """Dense LM, fresh controller, and ONE jitted function (one compile) giving the ponder loss's value and
    gradient with, as aux, the PonderOutput (per-step hidden included), the plain LM's logits / hidden and
    the per-step logits (the unembedding of each step's hidden)."""
    lm, lm_params = tiny_lm(0)
    ctrl = make_controller(CFG, lm.config)
    params = init_controller(ctrl, lm.config.hidden_size, seed=1)
    ids, read = ids_and_read(lm.config.vocab_size)
    tgt = jnp.asarray(np.random.default_rng(5).integers(0, lm.config.vocab_size, (B, S - 1)))
    w = jnp.broadcast_to(jnp.arange(S - 1) >= CTX - 1, (B, S - 1)).astype(jnp.float32)

    def loss(cp, thr):
        out = ponder_forward(lm, lm_params, ctrl, cp, ids, read_mask=read, threshold=thr, return_step_hidden=True)
        value, m = ponder_lm_loss(out, tgt, w, CFG, logits=out.logits[:, :-1])
        plain_logits, plain_hidden = lm.apply({"params": lm_params}, ids, return_hidden=True)
        unembed = lambda h: lm.apply({"params": lm_params}, h, method="unembed")  # noqa: E731
        return value, {"out": out, "ce": m["ce"], "plain_logits": plain_logits, "plain_hidden": plain_hidden,
                       "step_logits": jax.vmap(unembed)(out.step_hidden)}

    run = jit(jax.value_and_grad(loss, has_aux=True))
    return lm, lm_params, ctrl, params, ids, read, run


@pytest.fixture(scope="module")
def moe():
    """MoE LM and perturbed controller; ONE jitted function returning the ponder output and the LM's hidden
    states under: no hooks, neutral hooks (alpha 0, tau 1), the controls recomputed from step 1's hidden
    states, and each of those controls alone."""
    lm, lm_params = tiny_lm(3, moe=True)
    ctrl = make_controller(CFG, lm.config)
    params = perturb(init_controller(ctrl, lm.config.hidden_size, seed=2), seed=3)
    ids, read = ids_and_read(lm.config.vocab_size, seed=1)
    L, H = lm.config.num_hidden_layers, lm.config.num_attention_heads

    def run(cp):
        out = ponder_forward(lm, lm_params, ctrl, cp, ids, read_mask=read, return_step_hidden=True)
        hid = lambda **kw: lm.apply({"params": lm_params}, ids, return_hidden=True, **kw)[1]  # noqa: E731
        state0 = ctrl.apply({"params": cp}, B, method="initial_state")
        feat = jnp.sum(out.step_hidden[0] * read[..., None], 1) / CTX
        (z_h, _), _ = ctrl.apply({"params": cp}, state0, feat, method="step")
        alpha, tau = ctrl.apply({"params": cp}, z_h, method="controls")
        zero, one = jnp.zeros((L, B, H)), jnp.ones((B,))
        return {"out": out, "alpha": alpha, "tau": tau, "plain": hid(),
                "neutral": hid(attn_sink_bias=zero, router_temperature=one),
                "controlled": hid(attn_sink_bias=alpha, router_temperature=tau),
                "only_alpha": hid(attn_sink_bias=alpha, router_temperature=one),
                "only_tau": hid(attn_sink_bias=zero, router_temperature=tau)}

    return lm, ctrl, jit(run)(params)


# ------------------------------------------------------------------------------------------------
# halting semantics
# ------------------------------------------------------------------------------------------------
def act_reference(p, thr):
    """Graves's ACT in float64 loops: N = first n with cumsum >= thr (or the last), R, weights, N + R, sum t w_t."""
    p = np.asarray(p, np.float64)
    out = {k: [] for k in ("weights", "steps", "remainder", "ponder_cost", "expected_steps")}
    for row in p:
        n = len(row)
        big_n = next((i + 1 for i in range(n) if row[:i + 1].sum() >= thr), n)
        r = 1.0 - row[:big_n - 1].sum()
        w = np.zeros(n)
        w[:big_n - 1] = row[:big_n - 1]
        w[big_n - 1] = r
        for k, v in (("weights", w), ("steps", big_n), ("remainder", r), ("ponder_cost", big_n + r),
                     ("expected_steps", float((np.arange(1, n + 1) * w).sum()))):
            out[k].append(v)
    return {k: np.asarray(v) for k, v in out.items()}


def test_act_halting_and_ponder_penalty_match_float64_reference():
    thr = 0.9
    # rows: halts at step 1 / 2 / 3 / never (limit 5) / at the limit exactly, and random ones
    p = np.array([[0.95, 0.5, 0.5, 0.5, 0.5], [0.3, 0.65, 0.2, 0.1, 0.1], [0.1, 0.2, 0.7, 0.4, 0.3],
                  [0.05, 0.1, 0.1, 0.1, 0.1], [0.2, 0.2, 0.2, 0.2, 0.2]])
    p = np.concatenate([p, np.random.default_rng(0).uniform(0.01, 0.6, (6, 5))])
    got = jit(act_halting, static_argnums=1)(jnp.asarray(p, jnp.float32), thr)
    ref = act_reference(p, thr)
    np.testing.assert_array_equal(np.asarray(got["steps"]), ref["steps"])
    assert list(ref["steps"][:5]) == [1, 2, 3, 5, 5]
    for k in ("weights", "remainder", "ponder_cost", "expected_steps"):
        np.testing.assert_allclose(np.asarray(got[k]), ref[k], atol=1e-6, err_msg=k)
    np.testing.assert_allclose(np.asarray(got["weights"]).sum(-1), 1.0, atol=1e-6)
    # gradients: central differences of the float64 reference (no threshold crossing within h)
    h = 1e-6
    for key in ("ponder_cost", "expected_steps"):
        g = np.asarray(jax.grad(lambda q: jnp.sum(act_halting(q, thr)[key]))(jnp.asarray(p, jnp.float32)))
        fd = np.zeros_like(p)
        for i, j in np.ndindex(*p.shape):
            e = np.zeros_like(p)
            e[i, j] = h
            fd[i, j] = (act_reference(p + e, thr)[key][i] - act_reference(p - e, thr)[key][i]) / (2 * h)
        np.testing.assert_allclose(g, fd, atol=1e-4, err_msg=key)
        assert (g[:, 0] <= 0).all() and g[1, 0] < 0  # the cost always rewards halting earlier
    # N + R's gradient is -1 on every step before N (the "lambda * sum_t p_h(t)" term, sign that rewards halting)
    g = np.asarray(jax.grad(lambda q: jnp.sum(act_halting(q, thr)["ponder_cost"]))(jnp.asarray(p, jnp.float32)))
    np.testing.assert_array_equal(g, -(np.arange(1, 6)[None] < ref["steps"][:, None]).astype(np.float32))


# ------------------------------------------------------------------------------------------------
# the ponder loop
# ------------------------------------------------------------------------------------------------
def test_ponder_forward_shapes_mixture_and_plain_start(dense):
    lm, lm_params, ctrl, params, ids, read, run = dense
    # fresh controller: heads start at zero, so every step is the plain LM and so is the mixture
    (_, aux0), _ = run(params, CFG.threshold)
    np.testing.assert_allclose(aux0["out"].logits, aux0["plain_logits"], atol=1e-5)
    np.testing.assert_allclose(aux0["out"].halt_probs, 0.5, atol=1e-6)  # sigmoid(halt_bias_init = 0)

    (value, aux), _ = run(perturb(params, 0), CFG.threshold)
    out = aux["out"]
    V, Dc = lm.config.vocab_size, CFG.hidden_size
    assert out.logits.shape == (B, S, V) and out.halt_probs.shape == (B, 3) and out.z_h.shape == (B, Dc)
    assert out.step_hidden.shape == (3, B, S, lm.config.hidden_size) and int(out.steps_run) == 3
    p = np.asarray(out.halt_probs)
    assert ((p > 0) & (p < 1)).all() and np.ptp(p) > 1e-3
    ref = act_reference(p, CFG.threshold)
    np.testing.assert_array_equal(np.asarray(out.steps), ref["steps"])
    np.testing.assert_allclose(out.weights, ref["weights"], atol=1e-6)
    np.testing.assert_allclose(out.ponder_cost, ref["ponder_cost"], atol=1e-6)
    # step 1 is the plain LM exactly; later steps are modulated
    np.testing.assert_allclose(out.step_hidden[0], aux["plain_hidden"], atol=1e-5)
    assert float(jnp.max(jnp.abs(out.step_hidden[1] - aux["plain_hidden"]))) > 1e-3
    assert float(out.alpha[0].max()) == 0.0 and float(out.alpha[1].min()) > 0.0
    # the output is the halting-weighted mixture of the per-step logits
    np.testing.assert_allclose(out.logits, np.einsum("bn,nbsv->bsv", ref["weights"], aux["step_logits"]), atol=1e-4)
    # z_H summary is the halting-weighted mixture too, and distinguishes the rows
    assert float(jnp.min(jnp.std(out.z_h, axis=0))) > 0
    # penalty, objective and telemetry statistics
    np.testing.assert_allclose(ponder_penalty(out, CFG), ref["ponder_cost"].mean(), rtol=1e-6)
    np.testing.assert_allclose(ponder_penalty(out, CFG.replace(ponder_cost="expected")),
                               ref["expected_steps"].mean(), rtol=1e-6)
    assert float(value) == pytest.approx(float(aux["ce"]) + CFG.ponder_weight * ref["ponder_cost"].mean(), rel=1e-5)
    st = halting_stats(out)
    assert float(st["halt_rate"]) == pytest.approx((ref["steps"] < 3).mean())
    assert float(st["avg_steps"]) == pytest.approx(ref["steps"].mean())
    used = (np.arange(3)[:, None] >= 1) & (np.arange(3)[:, None] < ref["steps"][None])  # modulated steps rows used
    assert used.any() and float(st["sink_alpha"]) == pytest.approx((np.asarray(out.alpha) * used).sum() / used.sum())
    assert float(st["router_tau"]) == 1.0  # a dense LM gets no temperature


def test_gradients_reach_every_controller_part(dense):
    *_, params, _, _, run = dense
    _, grads = run(perturb(params, 0), CFG.threshold)
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    assert {jax.tree_util.keystr(k).split("'")[1] for k, _ in flat} == {
        "in_proj", "L_level", "H_level", "halt_head", "sink_head"}
    for k, g in flat:  # every controller tensor gets a gradient (the sink head only through the LM's forward)
        assert np.isfinite(g).all() and float(jnp.max(jnp.abs(g))) > 0, jax.tree_util.keystr(k)


def test_controls_reach_the_lm_and_neutral_controls_are_exact(moe):
    lm, ctrl, r = moe
    L, H = lm.config.num_hidden_layers, lm.config.num_attention_heads
    assert ctrl.use_tau and r["alpha"].shape == (L, B, H) and r["tau"].shape == (B,)
    # alpha 0, tau 1 is the plain forward (the bias routes attention through the masked XLA path: rounding only)
    np.testing.assert_allclose(r["neutral"], r["plain"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(r["out"].step_hidden[0], r["plain"], atol=1e-6, rtol=0)
    # step 2 ran with exactly the controls the controller derives from step 1's hidden states
    tau, alpha = r["tau"], r["alpha"]
    assert float(jnp.min(jnp.abs(tau - 1.0))) > 1e-3 and float(jnp.min(jnp.abs(alpha))) > 1e-4
    assert bool(jnp.all(tau >= CFG.tau_min)) and bool(jnp.all(jnp.abs(alpha) <= CFG.sink_max))
    np.testing.assert_allclose(r["out"].step_hidden[1], r["controlled"], atol=1e-5)
    np.testing.assert_allclose(r["out"].tau[1], tau, rtol=1e-6)
    np.testing.assert_array_equal(r["out"].tau[0], 1.0)
    # each control on its own changes the LM's output
    assert float(jnp.max(jnp.abs(r["only_alpha"] - r["plain"]))) > 1e-2
    assert float(jnp.max(jnp.abs(r["only_tau"] - r["plain"]))) > 1e-3


# ------------------------------------------------------------------------------------------------
# evaluation modes
# ------------------------------------------------------------------------------------------------
def test_eval_modes_adaptive_early_exit_and_fixed(dense):
    lm, lm_params, ctrl, params, ids, read, run = dense
    cp = perturb(params, 0)
    (_, scan), _ = run(cp, 0.3)
    scan = scan["out"]
    assert int(scan.steps.max()) < 3  # every row halts early at this threshold
    early = jit(lambda cp, thr: ponder_forward(lm, lm_params, ctrl, cp, ids, read_mask=read, threshold=thr,
                                                   early_exit=True))
    ee = early(cp, 0.3)
    assert int(ee.steps_run) == int(scan.steps.max())  # stopped once every row halted
    np.testing.assert_allclose(ee.logits, scan.logits, atol=5e-5)
    np.testing.assert_array_equal(ee.steps, scan.steps)
    np.testing.assert_allclose(ee.weights, scan.weights, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(ee.halt_probs)[:, int(ee.steps_run):], 0.0)
    assert int(early(cp, 1.0).steps_run) == 3  # threshold 1: nobody halts early, the loop runs to the limit
    fixed = jit(lambda cp: ponder_forward(lm, lm_params, ctrl, cp, ids, read_mask=read, mode="fixed"))(cp)
    (_, ref), _ = run(cp, CFG.threshold)
    np.testing.assert_allclose(fixed.logits, ref["step_logits"][-1], atol=5e-5)  # the last step's answer
    assert float(jnp.max(jnp.abs(fixed.logits - ref["out"].logits))) > 1e-3
    with pytest.raises(ValueError, match="early_exit"):
        ponder_forward(lm, lm_params, ctrl, cp, ids, mode="fixed", early_exit=True)


def test_input_and_config_errors_name_the_culprit(dense):
    lm, lm_params, ctrl, params, ids, read, _ = dense
    with pytest.raises(ValueError, match="read_mask shape"):
        ponder_forward(lm, lm_params, ctrl, params, ids, read_mask=read[:, :3])
    with pytest.raises(ValueError, match="input_ids"):
        ponder_forward(lm, lm_params, ctrl, params, ids.astype(jnp.float32))
    with pytest.raises(ValueError, match="mode"):
        ponder_forward(lm, lm_params, ctrl, params, ids, mode="sometimes")
    with pytest.raises(ValueError, match="threshold"):
        ponder_forward(lm, lm_params, ctrl, params, ids, threshold=1.5)
    for kw, field in ((dict(halt_eps=1.0), "halt_eps"), (dict(sink="all"), "sink"), (dict(max_steps=0), "max_steps"),
                      (dict(tau_min=1.0), "tau_min"), (dict(ponder_cost="time"), "ponder_cost"),
                      (dict(ponder_weight=-1.0), "ponder_weight")):
        with pytest.raises(ValueError, match=field):
            ControllerConfig(**kw)
    with pytest.raises(ValueError, match="MoE|router_temperature"):  # tau needs MoE layers: not emitted for dense
        lm.apply({"params": lm_params}, ids, router_temperature=2.0)
    assert not ctrl.use_tau


# ------------------------------------------------------------------------------------------------
# training (frozen LM, LoRA) and configs
# ------------------------------------------------------------------------------------------------
def test_trainer_updates_controller_and_lora_only(dense):
    import optax

    from iva_jax.hrm.controller_train import ControllerTrainConfig, ControllerTrainer, lm_batch, scored_targets

    lm, lm_params, *_ = dense
    cfg = ControllerTrainConfig.from_dict(dict(
        model=CFG.to_dict(), context_len=CTX, lora=dict(rank=2, alpha=4.0, targets="q_proj"),
        train=dict(steps=4, batch_size=B, seq_len=S, lr=3e-2, warmup_steps=0, compute_dtype="float32", log_every=1,
                   eval_every=-1)))
    tr = ControllerTrainer(cfg, lm, tx=optax.adam(3e-2), compiler_options=FAST)  # make_optimizer: tested elsewhere
    state = tr.init_state(lm_params, seed=0)
    frozen_before = jax.tree_util.tree_map(np.array, state.frozen)
    params_before = jax.tree_util.tree_map(np.array, state.params)
    rng = np.random.default_rng(3)
    packed = [{"input_ids": rng.integers(3, 61, (B, S)).astype(np.int32)} for _ in range(2)]
    batches = [lm_batch(b, CTX) for b in packed]
    _, w = scored_targets({k: jnp.asarray(v) for k, v in batches[0].items()}, CTX)
    assert float(w[:, :CTX - 1].sum()) == 0 and bool(jnp.all(w[:, CTX - 1:] == 1))  # only unread tokens scored
    assert batches[0]["read_mask"][:, :CTX].all() and not batches[0]["read_mask"][:, CTX:].any()
    ev0 = tr.evaluate(state, batches)
    # at initialisation (zero heads, LoRA B = 0) every evaluation mode is the plain LM
    for k in ("ppl_base", "ppl_ponder", "ppl_fixed"):
        assert ev0[k] == pytest.approx(ev0["ppl_plain"], rel=1e-5), k
    for _ in range(3):
        state, m = tr.step(state, batches[0])
    assert int(state.step) == 3 and np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0
    assert 0.0 <= float(m["hrm/halt_rate"]) <= 1.0 and 1.0 <= float(m["hrm/avg_steps"]) <= 3.0
    for a, b in zip(jax.tree_util.tree_leaves(frozen_before), jax.tree_util.tree_leaves(state.frozen)):
        np.testing.assert_array_equal(a, b)  # the LM never moves
    moved = {k: any(not np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(params_before[k]),
                                                             jax.tree_util.tree_leaves(state.params[k])))
             for k in ("ctrl", "lora")}
    assert moved == {"ctrl": True, "lora": True}
    ev = tr.evaluate(state, batches)
    assert ev["ppl_plain"] != pytest.approx(ev["ppl_base"], rel=1e-6)  # LoRA changed the plain LM
    for k in ("ppl_ponder", "ppl_fixed", "halt_rate", "avg_steps", "ponder_cost"):
        assert np.isfinite(ev[k]), k


def test_configs_yaml_section_and_hrm_act_keys():
    import yaml

    from iva_jax.hrm.config import load_train_config
    from iva_jax.hrm.controller_train import ControllerTrainConfig

    raw = yaml.safe_load((ROOT / "configs" / "hrm.yaml").read_text())
    cfg = ControllerTrainConfig.from_dict(raw["controller"])
    assert cfg.model.max_steps >= 2 and cfg.lm == "smollm2-135m" and cfg.context_len < cfg.train.seq_len
    assert ControllerTrainConfig.from_yaml(cfg.to_yaml()) == cfg
    assert load_train_config(ROOT / "configs" / "hrm.yaml").model.halt_max_steps == raw["model"]["halt_max_steps"]
    with pytest.raises(ValueError, match="context_len"):
        cfg.replace(context_len=cfg.train.seq_len)


# ------------------------------------------------------------------------------------------------
# HRM-RPO
# ------------------------------------------------------------------------------------------------
def test_rpo_controller_feeds_hrm_rpo_shaping(dense):
    from iva_jax.hrm.controller_rpo import ControllerShaping, RPOController
    from iva_jax.rl import HRMRPOShaping, Rollout
    from iva_jax.rl.shaping import group_partners, memory_reward

    lm, lm_params, _, params, *_ = dense
    n, g, P, T = 6, 3, 4, 5
    rng = np.random.default_rng(11)
    pmask = np.ones((n, P), np.int32)
    pmask[0, :2] = 0  # left padding
    rmask = np.arange(T)[None] < np.array([5, 3, 4, 5, 2, 5])[:, None]
    ro = Rollout(rng.integers(3, 61, (n, P)).astype(np.int32), pmask, rng.integers(3, 61, (n, T)).astype(np.int32),
                 rmask, group_size=g, entropy=rng.uniform(0, 2, (n, T)).astype(np.float32))
    ctrl = RPOController(lm, lm_params, CFG, perturb(params, 4), lr=1e-2, mem_coef=0.5, compiler_options=FAST)
    hook = ControllerShaping(b_halt=0.5, b_entropy=0.1, b_mem=0.2, group_size=g, controller=ctrl)
    rewards = rng.uniform(size=n).astype(np.float32)
    hidden = jnp.zeros((n, T, lm.config.hidden_size))
    shaped, m = hook(ro, rewards, hidden)
    sc = jax.device_get(ctrl.score(ro))
    assert sc["halt_probs"].shape == (n, 3) and sc["z_h"].shape == (n, CFG.hidden_size)
    assert ((sc["ponder_steps"] >= 1) & (sc["ponder_steps"] <= 3)).all()
    r_halt = -sc["ponder_steps"] / 3
    r_ent = (ro.entropy * rmask).sum(1) / rmask.sum(1)
    r_mem = np.asarray(memory_reward(sc["z_h"], sc["z_h"][group_partners(n, g)], 0.1))
    np.testing.assert_allclose(shaped, rewards + 0.5 * r_halt + 0.1 * r_ent + 0.2 * r_mem, rtol=1e-4, atol=1e-5)
    assert m["r_halt"] < 0
    before = jax.tree_util.tree_map(np.array, ctrl.params)
    um = hook.update(ro, hidden)
    assert {"controller_loss", "controller_ce", "controller_mem_loss", "controller_halt_rate"} <= set(um)
    assert all(np.isfinite(v) for v in um.values())
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(before),
                                                          jax.tree_util.tree_leaves(ctrl.params)))
    with pytest.raises(ValueError, match="ControllerShaping"):  # plain HRMRPOShaping cannot pass the tokens
        HRMRPOShaping(b_halt=0.5, group_size=g, controller=ctrl)(ro, rewards, hidden)


# ------------------------------------------------------------------------------------------------
# the seed's check
# ------------------------------------------------------------------------------------------------
def test_seed_check_halt_rate_lands_in_band():
    """Modulation recovery (iva_jax.hrm.controller_task): easy rows halt after the plain pass, hard rows
    ponder to the limit, so halt_rate -> the share of easy rows (0.5); nothing is NaN."""
    r = seed_check(0, compiler_options=FAST)
    assert r["passed"] and r["no_nan"], r
    assert 0.3 <= r["halt_rate"] <= 0.7, r
    assert r["halt_rate_easy"] > 0.8 and r["halt_rate_hard"] < 0.2, r  # halting follows difficulty
    assert r["kl_ponder"] < 0.25 * r["kl_plain"], r  # pondering (the learned sink bias) fixes the hard rows
    assert r["loss_last"] < 0.5 * r["loss_first"], r
    assert 1.0 < r["avg_steps"] < 2.0
