"""RetNet retention: parallel == recurrent == chunkwise == a float64 direct sum (values and gradients), the
decay gammas, and the block's recurrent step == its parallel/chunkwise forms (incl. prefill + step)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iva_jax.ssm.config import SSMConfig
from iva_jax.ssm.retnet import (MultiScaleRetention, retention_chunkwise, retention_parallel, retention_recurrent,
                                retnet_log_gammas, rotary)
from test_ssm_reference import FAST_COMPILE, rel_err

_jit = lambda f: jax.jit(f, compiler_options=FAST_COMPILE)


def retention_np(q, k, v, gamma):
    """float64 o_n = sum_{m<=n} gamma_h^(n-m) (q_n . k_m) v_m."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, h, l, _ = q.shape
    o = np.zeros(v.shape)
    for n in range(l):
        for m in range(n + 1):
            w = np.einsum("bhd,bhd->bh", q[:, :, n], k[:, :, m]) * gamma[None, :] ** (n - m)
            o[:, :, n] += w[..., None] * v[:, :, m]
    return o


def test_gammas():
    np.testing.assert_allclose(np.exp(retnet_log_gammas(4)), 1 - 2.0 ** (-5 - np.arange(4)), rtol=1e-6)


@pytest.fixture(scope="module")
def qkv():
    rng = np.random.default_rng(0)
    b, h, l, dk, dv = 2, 3, 29, 4, 6
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    lg = jnp.asarray(np.log([0.5, 0.8, 0.97]), jnp.float32)  # strong decays so every term matters
    return f(b, h, l, dk), f(b, h, l, dk), f(b, h, l, dv), lg


def test_three_forms_agree_values_and_grads(qkv):
    q, k, v, lg = qkv
    ref = retention_np(q, k, v, np.exp(np.asarray(lg, np.float64)))
    ct = jnp.asarray(np.random.default_rng(1).standard_normal(ref.shape), jnp.float32)
    forms = {"parallel": lambda q, k, v: retention_parallel(q, k, v, lg),
             "recurrent": lambda q, k, v: retention_recurrent(q, k, v, lg)[0],
             "chunkwise": lambda q, k, v: retention_chunkwise(q, k, v, lg, 8)[0]}

    @_jit
    def run(q, k, v):
        return {n: (f(q, k, v), jax.grad(lambda *a: jnp.sum(f(*a) * ct), argnums=(0, 1, 2))(q, k, v))
                for n, f in forms.items()}

    out = run(q, k, v)
    for name, (o, g) in out.items():
        assert rel_err(o, ref) < 2e-5, name
        for gi, gp in zip(g, out["parallel"][1]):
            assert rel_err(gi, gp) < 2e-5, name


def test_chunkwise_and_recurrent_states_and_continuation(qkv):
    q, k, v, lg = qkv

    @_jit
    def run(q, k, v):
        o_r, s_r = retention_recurrent(q, k, v, lg)
        o_c, s_c = retention_chunkwise(q, k, v, lg, 8)  # 29 = 3 * 8 + 5: padded last chunk
        # split the sequence: the state carried from the first part continues the second
        o1, s1 = retention_chunkwise(q[:, :, :11], k[:, :, :11], v[:, :, :11], lg, 4)
        o2, s2 = retention_chunkwise(q[:, :, 11:], k[:, :, 11:], v[:, :, 11:], lg, 4, state=s1)
        return o_r, s_r, o_c, s_c, jnp.concatenate([o1, o2], 2), s2

    o_r, s_r, o_c, s_c, o_split, s_split = run(q, k, v)
    assert rel_err(s_c, s_r) < 2e-5 and rel_err(s_split, s_r) < 2e-5
    assert rel_err(o_split, o_r) < 2e-5


def test_rotary_is_relative():
    rng = np.random.default_rng(2)
    a, b = (jnp.asarray(rng.standard_normal((1, 8)), jnp.float32) for _ in range(2))
    dot = lambda n, m: float(jnp.sum(rotary(a, jnp.array([n]), 1e4) * rotary(b, jnp.array([m]), 1e4)))
    assert abs(dot(7, 3) - dot(104, 100)) < 1e-4 and abs(dot(7, 3) - dot(3, 7)) > 1e-3


H, L, BATCH = 16, 13, 2
CFG = SSMConfig(type="retnet", num_heads=4, value_factor=2, chunk_size=4)


def test_block_forms_step_and_prefill():
    m = MultiScaleRetention(CFG, H)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((BATCH, L, H)), jnp.float32)
    params = nn.meta.unbox(_jit(m.init)(jax.random.PRNGKey(0), x))
    shapes = jax.tree_util.tree_map(lambda a: a.shape, params["params"])
    assert shapes == {"q_proj": {"kernel": (H, H)}, "k_proj": {"kernel": (H, H)}, "v_proj": {"kernel": (H, 2 * H)},
                      "g_proj": {"kernel": (H, 2 * H)}, "out_proj": {"kernel": (2 * H, H)},
                      "group_norm": {"scale": (2 * H,), "bias": (2 * H,)}}

    def steps(p, xs, st):
        st, ys = jax.lax.scan(lambda s, xt: m.apply(p, xt, s, method=MultiScaleRetention.step)[::-1], st,
                              jnp.swapaxes(xs, 0, 1))
        return jnp.swapaxes(ys, 0, 1), st

    @_jit
    def run(p, x):
        outs = {f: m.apply(p, x, form=f, return_state=True) for f in ("parallel", "recurrent", "chunkwise")}
        outs["step"] = steps(p, x, m.init_state(BATCH))
        y_pre, st_pre = m.apply(p, x[:, :6], return_state=True)
        y_rest, st = steps(p, x[:, 6:], st_pre)
        outs["prefill+step"] = (jnp.concatenate([y_pre, y_rest], 1), st)
        for f in ("parallel", "recurrent", "chunkwise"):  # a second chunk continues from the first's state
            y1, s1 = m.apply(p, x[:, :5], form=f, return_state=True)
            y2, s2 = m.apply(p, x[:, 5:], form=f, state=s1, return_state=True)
            outs[f"{f} from state"] = (jnp.concatenate([y1, y2], 1), s2)
        return outs

    outs = run(params, x)
    y_ref, st_ref = outs["parallel"]
    assert y_ref.shape == (BATCH, L, H)
    for name, (y, st) in outs.items():
        assert rel_err(y, y_ref) < 2e-5, name
        assert rel_err(st.S, st_ref.S) < 2e-5 and int(st.pos) == L, name
    with pytest.raises(ValueError, match="form"):
        m.apply(params, x, form="fast")
