"""per_shard: Pallas kernels run on each device's shard under a mesh (8 fake CPU devices), not replicated."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import kernels
from iva_jax.config import ModelConfig
from iva_jax.models.transformer import Transformer
from iva_jax.parallel import DEFAULT_RULES, make_mesh, mesh_context
from iva_jax.parallel.kernel_sharding import per_shard


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(data=2, fsdp=2, tensor=2)


def _traced_shapes(mesh, fn_args, in_axes, out_axes, *, rules=DEFAULT_RULES):
    seen = []

    def fn(*xs):
        seen.append([None if x is None else x.shape for x in xs])
        return xs[0] * 2.0

    with mesh_context(mesh), nn.logical_axis_rules(rules):
        out = jax.jit(lambda *a: per_shard(fn, a, in_axes, out_axes))(*fn_args)
    return seen[-1], out


def test_no_mesh_is_a_plain_call():
    x = jnp.arange(12.0).reshape(4, 3)
    seen = []
    out = per_shard(lambda x: seen.append(x.shape) or x + 1, (x,), (("batch", None),), ("batch", None))
    assert seen == [(4, 3)]
    np.testing.assert_array_equal(out, x + 1)


def test_kernel_sees_local_shards(mesh):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 5, 6)), jnp.float32)
    w = jnp.ones((6,))
    seen, out = _traced_shapes(mesh, (x, w), (("batch", None, None), None), ("batch", None, None))
    assert seen == [(2, 5, 6), (6,)]  # batch over data x fsdp (4); the weight whole
    np.testing.assert_array_equal(out, x * 2.0)
    assert out.sharding.spec[0] in (("data", "fsdp"), "data")  # the output stays batch-sharded


def test_gqa_heads_share_one_decision(mesh):
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((4, 3, 4, 8)), jnp.float32)
    heads = ("batch", None, "q_heads", None)
    seen, _ = _traced_shapes(mesh, (q, q[:, :, :2]), (heads, heads), heads)
    assert seen == [(1, 3, 2, 8), (1, 3, 1, 8)]  # 4:2 heads split over tensor=2, groups aligned
    seen, _ = _traced_shapes(mesh, (q, q[:, :, :1]), (heads, heads), heads)
    assert seen == [(1, 3, 4, 8), (1, 3, 1, 8)]  # one kv head cannot split: q heads stay whole too


def test_indivisible_batch_drops_axes(mesh):
    x = jnp.ones((6, 4))  # 6 rows: divisible by data=2, not by data*fsdp=4
    seen, out = _traced_shapes(mesh, (x,), (("batch", None),), ("batch", None))
    assert seen == [(3, 4)]
    x = jnp.ones((3, 4))
    seen, _ = _traced_shapes(mesh, (x,), (("batch", None),), ("batch", None))
    assert seen == [(3, 4)]


def test_logical_axes_must_match_rank(mesh):
    with mesh_context(mesh), pytest.raises(ValueError, match="do not match an operand of shape"):
        per_shard(lambda x: x, (jnp.ones((4, 2)),), (("batch",),), ("batch",))


def test_triton_kernel_in_interpret_mode_per_shard(mesh):
    """A real Pallas kernel (interpret mode) under the mesh, values and VJPs equal to the reference."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((8, 7, 48)), jnp.float32)
    w = jnp.asarray(1 + 0.1 * rng.standard_normal(48), jnp.float32)
    rows = ("batch", None, None)

    def loss(x, w, impl):
        y = per_shard(lambda x, w: kernels.rms_norm(x, w, eps=1e-6, impl=impl, interpret=impl != "xla"),
                      (x, w), (rows, None), rows)
        return jnp.sum(jnp.sin(y))

    with mesh_context(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
        got = jax.jit(jax.value_and_grad(lambda x, w: loss(x, w, "triton"), argnums=(0, 1)))(xs, w)
    want = jax.value_and_grad(lambda x, w: loss(x, w, "xla"), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for g, r in zip(got[1], want[1]):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_decoder_kernels_traced_on_local_shapes(mesh, monkeypatch):
    """Every kernel the decoder calls sees a per-device batch under a data x fsdp x tensor mesh."""
    seen = {}

    def spy(name, f):
        def wrapped(*a, **k):
            seen.setdefault(name, set()).add(tuple(a[0].shape))
            return f(*a, **k)
        return wrapped

    for name in ("flash_attention", "rms_norm", "rms_norm_residual", "swiglu"):
        monkeypatch.setattr(kernels, name, spy(name, getattr(kernels, name)))
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = Transformer(cfg)
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 64, (8, 12)), jnp.int32)
    params = model.init(jax.random.PRNGKey(0), ids[:1])["params"]
    want = model.apply({"params": params}, ids)
    with mesh_context(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        idss = jax.device_put(ids, NamedSharding(mesh, P(("data", "fsdp"))))
        got = jax.jit(lambda p, i: model.apply({"params": p}, i))(params, idss)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
    assert {s[0] for shapes in seen.values() for s in shapes} >= {2}  # traced per shard (8 rows / 4)
    assert (2, 12, 2, 8) in seen["flash_attention"]  # heads split over tensor=2 too (4 q / 2 kv heads)
    assert (2, 12, 32) in seen["swiglu"]


def test_bf16_replicated_operand_gradient(mesh):
    """The replicated weight's cotangent is summed over shards (XLA:CPU needs it in float32: it used to abort)."""
    x = jnp.asarray(np.random.default_rng(4).standard_normal((8, 3, 16)), jnp.bfloat16)
    w = jnp.ones((16,), jnp.bfloat16)
    rows = ("batch", None, None)

    def loss(x, w):
        y = per_shard(lambda x, w: kernels.rms_norm(x, w, eps=1e-6, impl="xla"), (x, w), (rows, None), rows)
        return jnp.sum(y.astype(jnp.float32))

    with mesh_context(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        got = jax.jit(jax.grad(loss, argnums=1))(jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp")))), w)
    want = np.asarray(jax.grad(loss, argnums=1)(x.astype(jnp.float32), w.astype(jnp.float32)))
    assert got.dtype == jnp.bfloat16
    assert np.max(np.abs(np.asarray(got, np.float32) - want)) <= 2e-2 * np.max(np.abs(want))


def test_inside_a_callers_shard_map_is_a_plain_call(mesh):
    """Under a user's shard_map the kernel runs on the caller's blocks, not in a nested shard_map; grads work.
    (The kernels' custom VJPs return per-device weight cotangents, so a caller's shard_map needs check=False,
    as for any Pallas call.)"""
    from iva_jax.parallel.kernel_sharding import shard_map

    x = jnp.asarray(np.random.default_rng(5).standard_normal((8, 3, 16)), jnp.float32)
    w = jnp.ones((16,))
    rows = ("batch", None, None)

    seen = []

    def local(x, w):
        def kernel(x, w):
            seen.append(x.shape)
            return kernels.rms_norm(x, w, eps=1e-6, impl="xla")
        return per_shard(kernel, (x, w), (rows, None), rows)

    def loss(x, w):
        return jnp.sum(jnp.sin(shard_map(local, mesh=mesh, in_specs=(P(("data", "fsdp")), P()),
                                         out_specs=P(("data", "fsdp")), check=False)(x, w)))

    with mesh_context(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        got = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    want = jax.grad(lambda x, w: jnp.sum(jnp.sin(kernels.rms_norm(x, w, eps=1e-6, impl="xla"))), argnums=(0, 1))(x, w)
    assert set(seen) == {(2, 3, 16)}  # the caller's block, not split again
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def test_eager_call_under_a_mesh_and_argument_checks(mesh):
    x = jnp.ones((8, 4))
    with mesh_context(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        out = per_shard(lambda x: x * 3.0, (x,), (("batch", None),), ("batch", None))  # no jit around it
        np.testing.assert_array_equal(out, x * 3.0)
        with pytest.raises(ValueError, match="2 logical-axis entries for 1 operands"):
            per_shard(lambda x: x, (x,), (("batch", None), None), ("batch", None))
