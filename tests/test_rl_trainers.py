"""PPO with a value head (GAE plumbing against float64 numpy, value loss on a fixed batch, adaptive KL),
the pairwise reward model, and DPO with LoRA (reference = frozen base) on a tiny random decoder."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import meta

from iva_jax.config import ModelConfig
from iva_jax.models.transformer import Transformer
from iva_jax.rl import (
    DPOTrainer,
    Policy,
    PPOTrainer,
    PromptBatch,
    RewardModelTrainer,
    RLConfig,
    Rollout,
    preference_batch,
)
from iva_jax.train.lora import LoRAConfig

EOS, TARGET, OTHER = 1, 5, 7


def tiny_model(seed=0, std=0.25, vocab=23):
    """A 2-layer GQA decoder with host-made random weights (no init compile); pad == EOS as in SmolLM2."""
    mc = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                     eos_token_id=(EOS,), pad_token_id=EOS, attn_impl="xla", norm_impl="xla", mlp_impl="xla")
    model = Transformer(mc)
    abstract = meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
    rng = np.random.default_rng(seed)

    def one(path, s):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            return np.ones(s.shape, np.float32)
        return (std * rng.standard_normal(s.shape)).astype(np.float32)

    return model, jax.tree_util.tree_map_with_path(one, abstract)


def target_share(ro: Rollout) -> np.ndarray:
    r, m = np.asarray(ro.responses), np.asarray(ro.response_mask)
    return ((r == TARGET) & m).sum(1) / np.maximum(m.sum(1), 1)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


def pairs(seed, n):
    """Preference pairs over random prompts: chosen responses hold TARGET tokens, rejected hold OTHER."""
    rng = np.random.default_rng(seed)
    prompts, chosen, rejected = [], [], []
    for _ in range(n):
        prompts.append(rng.integers(8, 23, size=rng.integers(2, 5)).tolist())
        c = rng.integers(8, 23, size=rng.integers(3, 6))
        c[rng.choice(len(c), 2, replace=False)] = TARGET
        r = rng.integers(8, 23, size=rng.integers(3, 6))
        r[rng.choice(len(r), 2, replace=False)] = OTHER
        chosen.append(c.tolist())
        rejected.append(r.tolist())
    return preference_batch(prompts, chosen, rejected, EOS, length=10)


# ------------------------------------------------------------------------------------------------
# PPO
# ------------------------------------------------------------------------------------------------
PPO = dict(algorithm="ppo", group_size=1, prompts_per_step=16, max_new_tokens=8, mini_batches=2, ppo_epochs=2,
           gamma=1.0, lam=0.95, vf_coef=0.5, clip_range_value=0.2, kl_mode="reward", kl_estimator="k1",
           kl_coef=0.05, adaptive_kl=True, kl_target=6.0, kl_horizon=1000.0, loss_agg_mode="token-mean")


@pytest.fixture(scope="module")
def ppo(tiny):
    model, params = tiny
    tr = PPOTrainer(Policy(model, head=True), RLConfig.from_dict(PPO), target_share, tx=optax.adam(3e-3))
    rng = np.random.default_rng(0)
    prompts = PromptBatch.from_tokens([rng.integers(2, 23, size=rng.integers(2, 7)).tolist() for _ in range(16)],
                                      EOS, length=6)
    state = tr.init_state(params, seed=0)
    state, ro, m = tr.rollout(state, prompts)
    return tr, state, ro, m, prompts


def np_gae_returns(scores, logp, ref_logp, values, mask, beta, gamma, lam):
    """float64: KL-penalized token rewards (score on the last valid token), GAE(lambda), returns = A + V."""
    n, t = mask.shape
    ret = np.zeros((n, t))
    for i in range(n):
        idx = np.flatnonzero(mask[i])
        r = -beta * (logp[i, idx] - ref_logp[i, idx]).astype(np.float64)
        r[-1] += scores[i]
        v = np.r_[values[i, idx].astype(np.float64), 0.0]
        acc = 0.0
        for k in reversed(range(len(idx))):
            acc = r[k] + gamma * v[k + 1] - v[k] + gamma * lam * acc
            ret[i, idx[k]] = acc + v[k]
    return ret


def test_ppo_rollout_advantages_match_numpy(ppo):
    tr, state, ro, m, _ = ppo
    mask = np.asarray(ro.response_mask)
    ref = np_gae_returns(np.asarray(ro.rewards), np.asarray(ro.old_logp), np.asarray(ro.ref_logp),
                         np.asarray(ro.values), mask, PPO["kl_coef"], PPO["gamma"], PPO["lam"])
    np.testing.assert_allclose(np.where(mask, ro.returns, 0), ref, rtol=1e-4, atol=1e-5)
    adv = np.asarray(ro.advantages)[mask]  # whitened over valid tokens
    assert abs(adv.mean()) < 1e-5 and abs(adv.std(ddof=1) - 1) < 1e-3
    assert np.all(np.asarray(ro.advantages)[~mask] == 0)
    assert m["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before any update


def test_ppo_value_loss_decreases_on_a_fixed_batch(ppo, tiny):
    tr, _, ro, _, _ = ppo
    state = tr.init_state(tiny[1], seed=0)  # the state the rollout was scored with (updates donate it)
    losses = []
    for _ in range(6):
        state, um = tr.update(state, ro)
        losses.append(um["vf_loss"])
        assert np.isfinite(um["loss"]) and um["updates"] == 4  # ppo_epochs * mini_batches
    assert losses[-1] < 0.6 * losses[0], losses
    assert 0.0 <= um["vf_clipfrac"] <= 1.0 and um["clipfrac"] > 0.0


def test_ppo_step_and_adaptive_kl(ppo, tiny):
    tr, _, _, _, prompts = ppo
    state = tr.init_state(tiny[1], seed=1)
    kl0 = state.kl_coef
    for _ in range(2):
        state, m = tr.step(state, prompts)
    # measured KL far below the target: the proportional controller lowers the coefficient by 20% * N / horizon
    assert state.kl_coef == pytest.approx(kl0 * (1 - 0.2 * 16 / 1000) ** 2, rel=1e-6)
    assert m["kl_seq"] > 0 and np.isfinite(m["vf_loss"]) and m["response_length"] > 0


# ------------------------------------------------------------------------------------------------
# reward model and DPO
# ------------------------------------------------------------------------------------------------
def test_reward_model_learns_preferences(tiny):
    model, params = tiny
    rm = RewardModelTrainer(Policy(model, head=True), RLConfig(), tx=optax.adam(1e-2))
    train, held = pairs(0, 24), pairs(1, 16)
    state = rm.init_state(params, seed=0)
    before = rm.evaluate(state, held)
    for _ in range(12):
        state, m = rm.step(state, train)
    after = rm.evaluate(state, held)
    assert after["accuracy"] >= 0.9 and after["accuracy"] > before["accuracy"] + 0.2, (before, after)
    assert after["loss"] < 0.5 * before["loss"] and after["margin"] > 0
    # scoring a rollout (the PPO reward_fn path) agrees with the pairwise scores' ordering
    ro = Rollout(held["chosen_ids"][:, :4], held["chosen_mask"][:, :4], held["chosen_ids"][:, 4:],
                 held["chosen_mask"][:, 4:].astype(bool))
    direct = rm.score(state, held["chosen_ids"], held["chosen_mask"])
    np.testing.assert_allclose(rm.reward_fn(state)(ro), direct, rtol=1e-5, atol=1e-6)


def test_dpo_with_lora_moves_the_implicit_reward_margin(tiny):
    model, params = tiny
    lora = LoRAConfig(rank=4, alpha=8.0, targets="q_proj|v_proj|up_proj|down_proj")
    cfg = RLConfig(algorithm="dpo", dpo_beta=0.5, lora=lora)
    dpo = DPOTrainer(Policy(model, lora=lora), cfg, tx=optax.adam(1e-2))
    train, held = pairs(0, 24), pairs(1, 16)
    state = dpo.init_state(params, seed=0)
    assert state.ref is None  # the frozen LoRA base is the reference
    before = dpo.evaluate(state, held)
    assert before["reward_margin"] == pytest.approx(0.0, abs=1e-6)  # adapters start at zero: policy == ref
    assert before["loss"] == pytest.approx(np.log(2.0), abs=1e-6)
    for _ in range(10):
        state, m = dpo.step(state, train)
    after = dpo.evaluate(state, held)
    assert after["reward_margin"] > 0.3 and after["reward_accuracy"] >= 0.8, after
    assert after["loss"] < np.log(2.0) - 0.1
    assert after["rewards_chosen"] > 0 > after["rewards_rejected"]
    # only the adapters trained; the base (reference) is untouched
    np.testing.assert_array_equal(state.train.frozen["embed_tokens"]["embedding"], params["embed_tokens"]["embedding"])
