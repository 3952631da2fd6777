"""Mamba mixer: HF MambaMixer parity (weights copied), recurrent step == parallel form, prefill + step, init."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iva_jax.ssm.config import SSMConfig
from iva_jax.ssm.mamba import MambaMixer
from test_ssm_reference import FAST_COMPILE, rel_err

H, L, BATCH = 16, 11, 2
CFG = SSMConfig(type="mamba", d_state=3, d_conv=4, expand=2, dt_rank=3, scan_impl="sequential")


@pytest.fixture(scope="module")
def model_and_params():
    m = MambaMixer(CFG, H)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((BATCH, L, H)), jnp.float32)
    params = nn.meta.unbox(jax.jit(m.init, compiler_options=FAST_COMPILE)(jax.random.PRNGKey(0), x))
    return m, params, x


def _jit(f):
    return jax.jit(f, compiler_options=FAST_COMPILE)


def test_param_names_shapes_and_init(model_and_params):
    m, p, _ = model_and_params
    p = p["params"]
    di, n = 32, 3
    shapes = jax.tree_util.tree_map(lambda a: a.shape, p)
    assert shapes == {"in_proj": {"kernel": (H, 2 * di)}, "conv1d": {"kernel": (4, 1, di), "bias": (di,)},
                      "x_proj": {"kernel": (di, 3 + 2 * n)}, "dt_proj": {"kernel": (3, di), "bias": (di,)},
                      "A_log": (di, n), "D": (di,), "out_proj": {"kernel": (di, H)}}
    np.testing.assert_allclose(np.exp(p["A_log"]), np.broadcast_to(np.arange(1, n + 1), (di, n)), rtol=1e-6)
    dt = np.log1p(np.exp(np.asarray(p["dt_proj"]["bias"])))  # softplus(bias) is the initial dt
    assert np.all(dt >= CFG.dt_min * 0.999) and np.all(dt <= CFG.dt_max * 1.001)
    assert np.all(np.abs(p["dt_proj"]["kernel"]) <= 3 ** -0.5)
    np.testing.assert_array_equal(p["D"], 1.0)


def _run_steps(m, params, x, state):
    def body(st, xt):
        y, st = m.apply(params, xt, st, method=MambaMixer.step)
        return st, y

    st, ys = jax.lax.scan(body, state, jnp.swapaxes(x, 0, 1))
    return jnp.swapaxes(ys, 0, 1), st


def test_step_equals_parallel_and_prefill(model_and_params):
    m, params, x = model_and_params

    @_jit
    def both(params, x):
        y_par, st_par = m.apply(params, x, return_state=True)
        y_seq, st_seq = _run_steps(m, params, x, m.init_state(BATCH))
        y_pre, st_pre = m.apply(params, x[:, :6], return_state=True)  # prefill 6 tokens, then step the rest
        y_rest, st_rest = _run_steps(m, params, x[:, 6:], st_pre)
        y_cont, st_cont = m.apply(params, x[:, 6:], state=st_pre, return_state=True)  # a second chunk
        return (y_par, st_par, y_seq, st_seq, jnp.concatenate([y_pre, y_rest], 1), st_rest,
                jnp.concatenate([y_pre, y_cont], 1), st_cont)

    y_par, st_par, y_seq, st_seq, y_mix, st_mix, y_cont, st_cont = both(params, x)
    assert y_par.shape == (BATCH, L, H)
    assert rel_err(y_seq, y_par) < 1e-5 and rel_err(y_mix, y_par) < 1e-5 and rel_err(y_cont, y_par) < 1e-5
    for a, b in ((st_seq, st_par), (st_mix, st_par), (st_cont, st_par)):
        assert rel_err(a.ssm, b.ssm) < 1e-5
        np.testing.assert_allclose(a.conv, b.conv, rtol=1e-6, atol=1e-6)
    assert st_par.conv.shape == (BATCH, 3, 32) and st_par.ssm.shape == (BATCH, 32, 3)


def test_left_padding_mask(model_and_params):
    """With a left-padding mask, real tokens see exactly what they would without the padding (HF semantics)."""
    m, params, x = model_and_params
    pad = 3
    xp = jnp.concatenate([jnp.ones((BATCH, pad, H)), x], axis=1)
    mask = jnp.concatenate([jnp.zeros((BATCH, pad)), jnp.ones((BATCH, L))], axis=1)
    f = _jit(lambda p, a, mk: m.apply(p, a, mask=mk))
    y_pad, y = f(params, xp, mask), f(params, x, jnp.ones((BATCH, L)))
    assert rel_err(y_pad[:, pad:], y) < 1e-5


def test_grad_flows_to_every_parameter(model_and_params):
    m, params, x = model_and_params
    g = _jit(jax.grad(lambda p: jnp.sum(m.apply(p, x) ** 2)))(params)
    for path, leaf in jax.tree_util.tree_leaves_with_path(g):
        assert np.all(np.isfinite(leaf)) and np.abs(leaf).max() > 0, path


def test_pallas_interpret_matches_sequential(model_and_params):
    m, params, x = model_and_params
    from kernels.selective_scan import ScanBlockConfig

    mk = MambaMixer(CFG.replace(scan_impl="pallas"), H, scan_config=ScanBlockConfig(chunk=4, ckpt_chunk=8),
                    interpret=True)
    y_k = _jit(mk.apply)(params, x)
    assert rel_err(y_k, _jit(m.apply)(params, x)) < 1e-5


def test_matches_transformers_mamba_mixer(model_and_params):
    torch = pytest.importorskip("torch")
    from transformers import MambaConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer as HFMixer

    m, params, x = model_and_params
    p = params["params"]
    hf = HFMixer(MambaConfig(hidden_size=H, state_size=3, conv_kernel=4, expand=2, time_step_rank=3, use_bias=False,
                             use_conv_bias=True, num_hidden_layers=1), 0).eval()
    t = lambda a: torch.tensor(np.asarray(a, np.float32))
    sd = {"A_log": t(p["A_log"]), "D": t(p["D"]), "conv1d.weight": t(np.transpose(p["conv1d"]["kernel"], (2, 1, 0))),
          "conv1d.bias": t(p["conv1d"]["bias"]), "in_proj.weight": t(p["in_proj"]["kernel"].T),
          "x_proj.weight": t(p["x_proj"]["kernel"].T), "dt_proj.weight": t(p["dt_proj"]["kernel"].T),
          "dt_proj.bias": t(p["dt_proj"]["bias"]), "out_proj.weight": t(p["out_proj"]["kernel"].T)}
    hf.load_state_dict(sd, strict=True)
    with torch.no_grad():
        y_hf = hf(t(x)).numpy()
    assert rel_err(_jit(m.apply)(params, x), y_hf) < 1e-5


def test_bad_shapes_raise(model_and_params):
    m, params, x = model_and_params
    with pytest.raises(ValueError, match="expects"):
        m.apply(params, x[..., :-1])
    with pytest.raises(ValueError, match="step expects"):
        m.apply(params, x, m.init_state(BATCH), method=MambaMixer.step)


def test_bf16_compute_close_to_f32(model_and_params):
    """dtype=bfloat16 (f32 params, f32 scan state): the parallel form and the step stay near the f32 result."""
    m, params, x = model_and_params
    mb = MambaMixer(CFG, H, dtype=jnp.bfloat16)

    @_jit
    def run(p, x):
        y = mb.apply(p, x)
        y_step, _ = _run_steps(mb, p, x, mb.init_state(BATCH))
        return y, y_step

    y, y_step = run(params, x)
    y32 = _jit(m.apply)(params, x)
    assert y.dtype == jnp.bfloat16 and rel_err(y, y32) < 3e-2 and rel_err(y_step, y32) < 3e-2
