"""Mamba-2 / SSD: chunked form vs a float64 quadratic reference, gradients chunked vs sequential, the mixer's
recurrent step == parallel form, and parity with transformers' Mamba2Mixer (weights copied)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iva_jax.ssm.config import SSMConfig
from iva_jax.ssm.mamba2 import Mamba2Mixer, ssd_chunked, ssd_sequential
from test_ssm_reference import FAST_COMPILE, rel_err

_jit = lambda f: jax.jit(f, compiler_options=FAST_COMPILE)


def ssd_quadratic_np(x, dt, A, B, C, D=None, h0=None):
    """float64: y_t = sum_{s<=t} (C_t . B_s) exp(sum_{s<r<=t} dt_r A) dt_s x_s
                      + C_t . (exp(sum_{r<=t} dt_r A) h0) + D x_t."""
    x, dt, A, B, C = (np.asarray(a, np.float64) for a in (x, dt, A, B, C))
    b, l, h, p = x.shape
    rep = h // B.shape[2]
    Bh, Ch = np.repeat(B, rep, axis=2), np.repeat(C, rep, axis=2)  # [b, l, h, n]
    cum = np.cumsum(dt * A, axis=1)  # [b, l, h]
    y = np.zeros((b, l, h, p))
    for t in range(l):
        for s in range(t + 1):
            w = np.einsum("bhn,bhn->bh", Ch[:, t], Bh[:, s]) * np.exp(cum[:, t] - cum[:, s]) * dt[:, s]
            y[:, t] += w[..., None] * x[:, s]
        if h0 is not None:
            y[:, t] += np.einsum("bhn,bhpn->bhp", Ch[:, t], np.exp(cum[:, t])[..., None, None] * h0)
    if D is not None:
        y += np.asarray(D, np.float64)[:, None] * x
    return y


@pytest.fixture(scope="module")
def ssd_inputs():
    rng = np.random.default_rng(0)
    b, l, h, p, g, n = 2, 37, 6, 3, 2, 5
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    return dict(x=f(b, l, h, p), dt=jnp.asarray(rng.uniform(0.05, 0.8, (b, l, h)), jnp.float32),
                A=-jnp.asarray(rng.uniform(0.5, 4.0, h), jnp.float32), B=f(b, l, g, n), C=f(b, l, g, n),
                D=f(h), initial_state=0.5 * f(b, h, p, n))


def test_ssd_chunked_and_sequential_match_quadratic(ssd_inputs):
    a = ssd_inputs
    ref = ssd_quadratic_np(a["x"], a["dt"], a["A"], a["B"], a["C"], a["D"], np.asarray(a["initial_state"]))
    run = _jit(lambda a: (ssd_chunked(**a, chunk_size=8), ssd_sequential(**a),
                          ssd_chunked(**a, chunk_size=8, dot_dtype=jnp.bfloat16)))
    (y_c, s_c), (y_s, s_s), (y_b, s_b) = run(a)
    assert rel_err(y_c, ref) < 2e-5 and rel_err(y_s, ref) < 2e-5
    assert rel_err(s_c, s_s) < 2e-5
    assert rel_err(y_b, ref) < 2e-2 and rel_err(s_b, s_s) < 2e-2  # bf16 matmul operands, f32 accumulation
    # no initial state, a chunk longer than the sequence
    a0 = {k: v for k, v in a.items() if k != "initial_state"}
    y1, _ = _jit(lambda a: ssd_chunked(**a, chunk_size=64))(a0)
    assert rel_err(y1, ssd_quadratic_np(a["x"], a["dt"], a["A"], a["B"], a["C"], a["D"])) < 2e-5


def test_ssd_chunked_gradients_match_sequential(ssd_inputs):
    a = ssd_inputs
    ct = jnp.asarray(np.random.default_rng(1).standard_normal(a["x"].shape), jnp.float32)
    cs = jnp.asarray(np.random.default_rng(2).standard_normal(a["initial_state"].shape), jnp.float32)

    def loss(fn):
        def f(a):
            y, s = fn(a)
            return jnp.sum(y * ct) + jnp.sum(s * cs)
        return jax.grad(f)

    g_c, g_s = _jit(lambda a: (loss(lambda a: ssd_chunked(**a, chunk_size=8))(a),
                               loss(lambda a: ssd_sequential(**a))(a)))(a)
    for k in a:
        assert rel_err(g_c[k], g_s[k]) < 5e-5, k


H, L, BATCH = 16, 13, 2
CFG = SSMConfig(type="mamba2", d_state=4, d_conv=4, expand=2, headdim=8, ngroups=2, chunk_size=4)


@pytest.fixture(scope="module")
def mixer():
    m = Mamba2Mixer(CFG, H)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((BATCH, L, H)), jnp.float32)
    params = nn.meta.unbox(_jit(m.init)(jax.random.PRNGKey(0), x))
    return m, params, x


def test_param_shapes(mixer):
    m, params, _ = mixer
    shapes = jax.tree_util.tree_map(lambda a: a.shape, params["params"])
    di, nh, conv_dim = 32, 4, 32 + 2 * 2 * 4
    assert shapes == {"in_proj": {"kernel": (H, 2 * di + 16 + nh)},
                      "conv1d": {"kernel": (4, 1, conv_dim), "bias": (conv_dim,)},
                      "dt_bias": (nh,), "A_log": (nh,), "D": (nh,), "norm": {"scale": (di,)},
                      "out_proj": {"kernel": (di, H)}}
    A = np.exp(params["params"]["A_log"])
    assert np.all((A >= 1.0) & (A <= 16.0))


def test_step_equals_parallel_and_prefill(mixer):
    m, params, x = mixer

    def steps(p, xs, st):
        st, ys = jax.lax.scan(lambda s, xt: m.apply(p, xt, s, method=Mamba2Mixer.step)[::-1], st,
                              jnp.swapaxes(xs, 0, 1))
        return jnp.swapaxes(ys, 0, 1), st

    @_jit
    def run(p, x):
        y, st = m.apply(p, x, return_state=True)
        y_seq, st_seq = steps(p, x, m.init_state(BATCH))
        y_pre, st_pre = m.apply(p, x[:, :5], return_state=True)
        y_rest, st_rest = steps(p, x[:, 5:], st_pre)
        y_cont, st_cont = m.apply(p, x[:, 5:], state=st_pre, return_state=True)  # a second chunk from the state
        return (y, st, y_seq, st_seq, jnp.concatenate([y_pre, y_rest], 1), st_rest,
                jnp.concatenate([y_pre, y_cont], 1), st_cont)

    y, st, y_seq, st_seq, y_mix, st_mix, y_cont, st_cont = run(params, x)
    assert rel_err(y_seq, y) < 1e-5 and rel_err(y_mix, y) < 1e-5 and rel_err(y_cont, y) < 1e-5
    for s in (st_seq, st_mix, st_cont):
        assert rel_err(s.ssm, st.ssm) < 1e-5
    np.testing.assert_allclose(st_mix.conv, st.conv, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(st_cont.conv, st.conv, rtol=1e-6, atol=1e-6)


def test_matches_transformers_mamba2_mixer(mixer):
    torch = pytest.importorskip("torch")
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer as HFMixer

    m, params, x = mixer
    p = params["params"]
    hf_cfg = Mamba2Config(hidden_size=H, state_size=4, expand=2, head_dim=8, num_heads=4, n_groups=2, conv_kernel=4,
                          chunk_size=4, use_bias=False, use_conv_bias=True, layer_norm_epsilon=CFG.norm_eps,
                          num_hidden_layers=1)
    hf = HFMixer(hf_cfg, 0).eval()
    t = lambda a: torch.tensor(np.asarray(a, np.float32))
    sd = {"dt_bias": t(p["dt_bias"]), "A_log": t(p["A_log"]), "D": t(p["D"]), "norm.weight": t(p["norm"]["scale"]),
          "conv1d.weight": t(np.transpose(p["conv1d"]["kernel"], (2, 1, 0))), "conv1d.bias": t(p["conv1d"]["bias"]),
          "in_proj.weight": t(p["in_proj"]["kernel"].T), "out_proj.weight": t(p["out_proj"]["kernel"].T)}
    hf.load_state_dict(sd, strict=True)
    with torch.no_grad():
        y_hf = hf(t(x)).numpy()
    assert rel_err(_jit(m.apply)(params, x), y_hf) < 1e-5


def test_bad_inputs_raise(mixer):
    m, params, x = mixer
    with pytest.raises(ValueError, match="dt shape"):
        ssd_chunked(jnp.ones((1, 4, 2, 3)), jnp.ones((1, 4, 3)), -jnp.ones(2), jnp.ones((1, 4, 1, 2)),
                    jnp.ones((1, 4, 1, 2)), chunk_size=2)
    with pytest.raises(ValueError, match="headdim"):
        Mamba2Mixer(CFG.replace(headdim=5), H).init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="expects"):
        m.apply(params, x[..., :-1])
