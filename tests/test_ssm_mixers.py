"""Lighter mixers: RWKV time mix (vs a float64 direct WKV sum; step == parallel), Hyena (FFT conv == direct causal
conv; causality), top-k attention (vs a float64 explicit top-k; k_top > seq raises)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iva_jax.ssm.config import SSMConfig
from iva_jax.ssm.mixers import HyenaOperator, RWKVTimeMix, TopKAttention, fft_causal_conv, topk_attention
from test_ssm_reference import FAST_COMPILE, rel_err

_jit = lambda f: jax.jit(f, compiler_options=FAST_COMPILE)
H, L, BATCH = 12, 9, 2


def _x(seed, shape=(BATCH, L, H)):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def wkv_np(k, v, time_decay, time_first):
    """float64 RWKV-4: wkv_t = (sum_{i<t} e^{k_i - (t-1-i) e^{decay}} v_i + e^{u + k_t} v_t) / (same, v = 1)."""
    k, v = np.asarray(k, np.float64), np.asarray(v, np.float64)
    w, u = np.exp(np.asarray(time_decay, np.float64)), np.asarray(time_first, np.float64)
    out = np.zeros_like(v)
    for t in range(k.shape[1]):
        num, den = np.exp(u + k[:, t]) * v[:, t], np.exp(u + k[:, t])
        for i in range(t):
            e = np.exp(k[:, i] - (t - 1 - i) * w)
            num, den = num + e * v[:, i], den + e
        out[:, t] = num / den
    return out


def test_rwkv_matches_direct_sum_and_step():
    m = RWKVTimeMix(SSMConfig(type="rwkv"), H)
    x = _x(0)
    params = nn.meta.unbox(_jit(m.init)(jax.random.PRNGKey(0), x))
    p = params["params"]
    # the reference: token shift + projections by hand, then the float64 WKV sum
    xs = np.asarray(x, np.float64)
    shifted = np.concatenate([np.zeros_like(xs[:, :1]), xs[:, :-1]], 1)
    mix = lambda name: xs * np.asarray(p[name]) + shifted * (1 - np.asarray(p[name]))
    lin = lambda name, a: a @ np.asarray(p[name]["kernel"], np.float64)
    k, v = lin("key", mix("time_mix_key")), lin("value", mix("time_mix_value"))
    r = 1 / (1 + np.exp(-lin("receptance", mix("time_mix_receptance"))))
    ref = lin("output", r * wkv_np(k, v, p["time_decay"], p["time_first"]))

    def steps(params, xs, st):
        st, ys = jax.lax.scan(lambda s, xt: m.apply(params, xt, s, method=RWKVTimeMix.step)[::-1], st,
                              jnp.swapaxes(xs, 0, 1))
        return jnp.swapaxes(ys, 0, 1), st

    @_jit
    def run(params, x):
        y, st = m.apply(params, x, return_state=True)
        y_seq, st_seq = steps(params, x, m.init_state(BATCH))
        y_pre, st_pre = m.apply(params, x[:, :4], return_state=True)
        y_rest, st_rest = steps(params, x[:, 4:], st_pre)
        y_cont, st_cont = m.apply(params, x[:, 4:], state=st_pre, return_state=True)  # a second chunk
        # padding (mask 0) leaves the state alone: 2 garbage tokens in front and 1 inside change nothing
        xp = jnp.concatenate([x[:, :1] * 9, x[:, :1] - 3, x[:, :5], x[:, :1] * 7, x[:, 5:]], 1)
        keep = np.r_[0, 0, [1] * 5, 0, [1] * (L - 5)].astype(bool)
        y_pad, st_pad = m.apply(params, xp, mask=jnp.broadcast_to(jnp.asarray(keep, jnp.int32), xp.shape[:2]),
                                return_state=True)
        return (y, st, y_seq, st_seq, jnp.concatenate([y_pre, y_rest], 1), st_rest,
                jnp.concatenate([y_pre, y_cont], 1), st_cont, y_pad[:, keep], st_pad)

    y, st, y_seq, st_seq, y_mix, st_mix, y_cont, st_cont, y_pad, st_pad = run(params, x)
    assert rel_err(y, ref) < 2e-5
    for other in (y_seq, y_mix, y_cont, y_pad):
        assert rel_err(other, y) < 1e-5
    for a in (st_seq, st_mix, st_cont, st_pad):
        np.testing.assert_allclose(a.num / a.den, st.num / st.den, rtol=1e-5)
        np.testing.assert_allclose(a.shift, st.shift, rtol=1e-6)


def test_fft_causal_conv_equals_direct():
    rng = np.random.default_rng(1)
    u, k, bias = rng.standard_normal((2, 37, 3)), rng.standard_normal((37, 3)), rng.standard_normal(3)
    ref = np.zeros_like(u)
    for t in range(37):
        for s in range(t + 1):
            ref[:, t] += k[s] * u[:, t - s]
    ref += u * bias
    y = _jit(fft_causal_conv)(jnp.asarray(u, jnp.float32), jnp.asarray(k, jnp.float32), jnp.asarray(bias, jnp.float32))
    assert rel_err(y, ref) < 1e-5
    y_short = fft_causal_conv(jnp.asarray(u, jnp.float32), jnp.asarray(k[:5], jnp.float32))  # short filter
    ref_short = sum(np.pad(u, ((0, 0), (s, 0), (0, 0)))[:, :37] * k[s] for s in range(5))
    assert rel_err(y_short, ref_short) < 1e-5
    with pytest.raises(ValueError, match="Lk <= L"):
        fft_causal_conv(jnp.ones((1, 4, 3)), jnp.ones((5, 3)))


def test_hyena_is_causal():
    m = HyenaOperator(SSMConfig(type="hyena", hyena_order=2, hyena_filter_dim=8), H)
    x = _x(2)
    params = nn.meta.unbox(_jit(m.init)(jax.random.PRNGKey(0), x))
    x2 = x.at[:, 6:].set(_x(3)[:, 6:])  # change the future only
    f = _jit(lambda p, a: m.apply(p, a))
    y, y2 = f(params, x), f(params, x2)
    assert y.shape == (BATCH, L, H)
    np.testing.assert_allclose(y[:, :6], y2[:, :6], rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(y[:, 6:] - y2[:, 6:]).max()) > 1e-3
    # a prefix's outputs do not depend on the total length (filters use absolute positions)
    np.testing.assert_allclose(f(params, x[:, :6]), y[:, :6], rtol=1e-5, atol=1e-6)
    with pytest.raises(NotImplementedError):
        m.init_state(BATCH)


def topk_np(q, k, v, k_top):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, l, h, d = q.shape
    out = np.zeros_like(v)
    for bi in range(b):
        for hi in range(h):
            s = q[bi, :, hi] @ k[bi, :, hi].T / np.sqrt(d)
            for t in range(l):
                row = s[t, :t + 1]
                keep = np.argsort(-row)[:k_top]
                w = np.exp(row[keep] - row[keep].max())
                out[bi, t, hi] = (w / w.sum()) @ v[bi, keep, hi]
    return out


def test_topk_attention_matches_reference_and_errors():
    q, k, v = (_x(s, (2, 11, 3, 4)) for s in (4, 5, 6))
    outs = _jit(lambda q, k, v: [topk_attention(q, k, v, kt) for kt in (1, 3, 11)])(q, k, v)
    for k_top, o in zip((1, 3, 11), outs):
        assert rel_err(o, topk_np(q, k, v, k_top)) < 1e-5, k_top
    with pytest.raises(ValueError, match="k_top"):
        topk_attention(q, k, v, 12)
    with pytest.raises(ValueError, match="k_top"):
        topk_attention(q, k, v, 0)
    m = TopKAttention(SSMConfig(type="topk_attention", num_heads=3, k_top=4), H)
    x = _x(7)
    params = nn.meta.unbox(_jit(m.init)(jax.random.PRNGKey(0), x))
    y = _jit(m.apply)(params, x)
    assert y.shape == x.shape and set(params["params"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
