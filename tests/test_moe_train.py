"""The seed's check: a tiny MoE LM trained briefly on the embedded corpus with capacity_factor 1.25 ends
with per-expert load std/mean <= 1.0 and overflow <= 5%, while its loss falls.

The LM is deliberately small and self-contained (byte embedding + previous-byte embedding -> MoeBlock
-> lm_head); phase 2 moves this check onto the real decoder (iva_jax.models.transformer)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from iva_jax.moe import MoEConfig, MoeBlock
from iva_jax.train.data import default_corpus_path

VOCAB, D, SEQ, BATCH, STEPS = 256, 48, 64, 8, 120


class TinyMoeLM(nn.Module):
    moe: MoEConfig

    @nn.compact
    def __call__(self, ids, deterministic=True):
        emb = nn.Embed(VOCAB, D, name="embed_tokens")
        prev = nn.Embed(VOCAB, D, name="embed_prev")(jnp.pad(ids, ((0, 0), (1, 0)))[:, :-1])
        h = emb(ids) + prev
        y, aux = MoeBlock(self.moe, hidden_size=D, name="mlp")(nn.RMSNorm()(h), deterministic=deterministic)
        h = h + y
        return nn.Dense(VOCAB, use_bias=False, name="lm_head")(nn.RMSNorm()(h)), aux


@pytest.mark.parametrize("router", ["softmax_topk", "bias_balanced"])
def test_tiny_moe_lm_balances_at_capacity_1_25(router):
    data = np.frombuffer(default_corpus_path().read_bytes(), np.uint8).astype(np.int32)
    rng = np.random.default_rng(0)
    cfg = MoEConfig(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, capacity_factor=1.25,
                    router=router, aux_loss_coef=0.05 if router == "softmax_topk" else 0.0, z_loss_coef=1e-3,
                    bias_update_rate=0.01)
    model = TinyMoeLM(cfg)
    # parameters from numpy (a jitted flax init compiles slowly on CPU): N(0, 0.02), norm scales 1
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((BATCH, SEQ), jnp.int32))
    params = jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.ones(s.shape) if "scale" in str(path[-1]) else
        jnp.asarray(rng.normal(size=s.shape) * 0.02, jnp.float32), shapes["params"])
    stats = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape), shapes.get("moe_stats", {}))
    opt = optax.adamw(3e-3)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, stats, opt_state, batch):
        def loss_fn(p):
            (logits, aux), new = model.apply({"params": p, "moe_stats": stats}, batch[:, :-1], deterministic=False,
                                             mutable=["moe_stats"])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
            return ce + aux["loss"], (ce, aux, new.get("moe_stats", {}))

        (_, (ce, aux, new_stats)), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, ce, aux

    ces, std_mean, overflow = [], [], []
    for _ in range(STEPS):
        starts = rng.integers(0, len(data) - SEQ - 2, size=BATCH)
        batch = jnp.asarray(np.stack([data[s:s + SEQ + 1] for s in starts]))
        params, stats, opt_state, ce, aux = step(params, stats, opt_state, batch)
        ces.append(float(ce))
        std_mean.append(float(aux["load_std_over_mean"]))
        overflow.append(float(aux["overflow_pct"]))
    last = slice(-10, None)
    assert np.mean(ces[last]) < 0.7 * np.mean(ces[:5]), ces[::10]
    assert np.mean(std_mean[last]) <= 1.0, std_mean[::10]
    assert np.mean(overflow[last]) <= 5.0, overflow[::10]
