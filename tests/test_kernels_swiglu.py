"""SwiGLU kernels (interpret mode) vs a float64 reference: values and VJPs."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sw = importlib.import_module("kernels.swiglu")

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.isfinite(a).all(), "non-finite output (unwritten element?)"
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


@pytest.mark.parametrize("impl,save", [("xla", False), ("triton", False), ("triton", True)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_swiglu_values_and_vjp(impl, save, dtype):
    rng = np.random.default_rng(0)
    # 3*23 = 69 tokens, K = 72, N = 100: none a multiple of the 32-wide interpret tiles
    x = jnp.asarray(rng.standard_normal((3, 23, 72)), dtype)
    wg = jnp.asarray(rng.standard_normal((72, 100)) / np.sqrt(72), dtype)
    wu = jnp.asarray(rng.standard_normal((72, 100)) / np.sqrt(72), dtype)
    dh = jnp.asarray(rng.standard_normal((3, 23, 100)), dtype)
    y, vjp = jax.vjp(lambda x, a, b: sw.swiglu(x, a, b, impl=impl, interpret=True, save_products=save), x, wg, wu)
    grads = vjp(dh)
    assert y.shape == (3, 23, 100) and y.dtype == dtype
    with jax.enable_x64(True):
        f64 = lambda a: jnp.asarray(np.asarray(a, np.float64))  # noqa: E731
        ry, rvjp = jax.vjp(sw.reference, f64(x), f64(wg), f64(wu))
        rgrads = rvjp(f64(dh))
    tol = TOL[dtype]
    assert _rel(y, ry) < tol
    for a, b in zip(grads, rgrads):
        assert a.dtype == dtype and _rel(a, b) < tol


def test_bad_inputs_raise():
    x = jnp.ones((4, 8))
    with pytest.raises(ValueError, match="w_gate/w_up"):
        sw.swiglu(x, jnp.ones((8, 5)), jnp.ones((8, 6)), impl="xla")
    with pytest.raises(ValueError, match="cannot run"):
        sw.swiglu(x, jnp.ones((8, 5)), jnp.ones((8, 5)), impl="mosaic", interpret=True)


def test_save_products_skips_the_recomputed_products():
    """With saved products the backward has 4 matmuls (dx twice, dw_gate, dw_up), not 6."""
    x, w = jnp.ones((40, 24)), jnp.ones((24, 56)) / 24

    def dots(save):
        f = lambda x, a, b: jnp.sum(sw.swiglu(x, a, b, impl="xla", save_products=save))  # noqa: E731
        return str(jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2)))(x, w, w)).count("dot_general")

    assert dots(True) == 2 + 4 and dots(False) == 2 + 6


def test_decoder_with_saved_products_has_the_same_gradients():
    from iva_jax.config import ModelConfig
    from iva_jax.models.transformer import Transformer

    ids = jnp.asarray(np.random.default_rng(1).integers(0, 50, (2, 9)), jnp.int32)
    grads = []
    for save in (False, True):
        cfg = ModelConfig(vocab_size=50, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, mlp_save_products=save)
        model = Transformer(cfg)
        params = model.init(jax.random.PRNGKey(0), ids)["params"]
        loss = lambda p: jnp.mean(jax.nn.log_softmax(model.apply({"params": p}, ids))[..., 0])  # noqa: E731
        grads.append(jax.grad(loss)(params))
    for a, b in zip(jax.tree_util.tree_leaves(grads[0]), jax.tree_util.tree_leaves(grads[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
