"""Expert parallelism on 8 fake CPU devices: outputs and gradients with EP = 2, 4, 8 (with data
parallelism beside it) equal the single-device ones; the dense emulation of ragged_all_to_all follows
the documented semantics; bad meshes give clear errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from iva_jax.moe import MoEConfig, MoeBlock
from iva_jax.moe import dispatch as dp
from iva_jax.moe import expert_parallel as epm
from iva_jax.moe.routing import route
from iva_jax.parallel import make_mesh

T, D, F, E, K = 48, 12, 20, 8, 2


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
    logits = rng.normal(size=(T, E)) * 2
    logits[:, 0] += 1.5  # expert 0 is popular (uneven ragged sizes, drops at low capacity)
    r = route(jnp.asarray(logits, jnp.float32), top_k=K)
    ws = [jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32) for s in ((E, D, F), (E, D, F), (E, F, D))]
    return x, r.expert_index, r.gate_weights, ws


def _value_and_grads(fn, x, idx, w, ws):
    cot = jnp.cos(jnp.arange(T * D, dtype=jnp.float32)).reshape(T, D)

    def loss(x, w, wg, wu, wd):
        return jnp.sum(fn(x, idx, w, wg, wu, wd) * cot)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))(x, w, *ws)


def _assert_same(a, b):
    (va, ga), (vb, gb) = a, b
    np.testing.assert_allclose(va, vb, rtol=1e-5, atol=1e-5)
    for name, x, y in zip(("x", "gate_weights", "w_gate", "w_up", "w_down"), ga, gb):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.fixture(scope="module")
def single_dropless(case):
    x, idx, w, ws = case
    return _value_and_grads(lambda *a: dp.dropless_moe(*a), x, idx, w, ws)


@pytest.fixture(scope="module")
def single_capacity(case):
    x, idx, w, ws = case
    return _value_and_grads(lambda *a: dp.capacity_moe(*a, 0.75, num_groups=8)[0], x, idx, w, ws)


@pytest.mark.parametrize("data,fsdp,expert", [(4, 1, 2), (1, 2, 4), (1, 1, 8)])
def test_dropless_expert_parallel_equals_single_device(case, single_dropless, data, fsdp, expert):
    x, idx, w, ws = case
    mesh = make_mesh(data=data, fsdp=fsdp, expert=expert)
    got = _value_and_grads(lambda *a: epm.expert_parallel_moe(*a, mesh=mesh)[0], x, idx, w, ws)
    _assert_same(got, single_dropless)


@pytest.mark.parametrize("data,expert", [(4, 2)])
def test_capacity_expert_parallel_equals_grouped_single_device(case, single_capacity, data, expert):
    """One GShard group per token shard (8 shards): capacity 0.75 drops assignments, identically."""
    x, idx, w, ws = case
    mesh = make_mesh(data=data, expert=expert)
    fn = lambda *a: epm.expert_parallel_moe(*a, mesh=mesh, capacity_factor=0.75)[0]
    _assert_same(_value_and_grads(fn, x, idx, w, ws), single_capacity)
    _, keep = jax.jit(lambda *a: epm.expert_parallel_moe(*a, mesh=mesh, capacity_factor=0.75))(x, idx, w, *ws)
    _, keep1 = dp.capacity_moe(x, idx, w, *ws, 0.75, num_groups=8)
    np.testing.assert_array_equal(keep, keep1)
    assert 0 < int(jnp.sum(~keep)) < T * K  # some, not all, assignments dropped


def test_moe_block_with_mesh_matches_block_without(case):
    """The full block (router + shared expert + losses) under EP=4 x data=2: outputs, aux and all grads."""
    x = case[0].reshape(4, 12, D)
    cfg = MoEConfig(num_experts=E, num_experts_per_tok=K, moe_intermediate_size=F, shared_expert_intermediate_size=10,
                    z_loss_coef=1e-3)
    mesh = make_mesh(data=2, expert=4)
    plain, ep = MoeBlock(cfg, hidden_size=D), MoeBlock(cfg, hidden_size=D, mesh=mesh)
    rng = np.random.default_rng(1)
    shapes = jax.eval_shape(lambda: plain.init(jax.random.PRNGKey(0), x))
    import flax.linen as nn
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.4, jnp.float32),
                                    nn.unbox(shapes))

    def run(blk):
        def loss(p):
            y, aux = blk.apply(p, x)
            return jnp.sum(y * jnp.sin(y)) + aux["loss"], (y, aux)
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (l1, (y1, a1)), g1 = run(plain)
    (l2, (y2, a2)), g2 = run(ep)
    np.testing.assert_allclose(y2, y1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    for k in ("load_balancing_loss", "z_loss", "load_per_expert", "route_entropy"):
        np.testing.assert_allclose(a2[k], a1[k], rtol=1e-5, err_msg=k)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g2, g1)


def np_ragged_all_to_all(operands, outputs, in_off, send, out_off, recv):
    """The pseudocode of jax.lax.ragged_all_to_all's docstring, over a list of per-device arrays."""
    n = len(operands)
    spd = len(in_off[0]) // n
    res = [o.copy() for o in outputs]
    for src in range(n):
        for i in range(len(in_off[src])):
            dst = i // spd
            data = operands[src][in_off[src][i]:in_off[src][i] + send[src][i]]
            # slice i of src lands at src's out_off[i] on dst; dst's recv index is src * spd + i % spd
            j = src * spd + i % spd
            assert recv[dst][j] == send[src][i]
            res[dst][out_off[src][i]:out_off[src][i] + send[src][i]] = data
    return res


def test_dense_ragged_all_to_all_follows_documented_semantics():
    # the docstring example (axis of size 2)
    mesh2 = Mesh(np.array(jax.devices()[:2]), ("x",))
    ex = dict(operand=[[1, 2, 2], [3, 4, 0]], in_off=[[0, 1], [0, 1]], send=[[1, 2], [1, 1]],
              out_off=[[0, 0], [1, 2]], recv=[[1, 1], [2, 1]])
    want = [[1, 3, 0, 0], [2, 2, 4, 0]]
    # a random one: 4 devices, 2 slices per peer, slices not contiguous, gaps in the output
    rng = np.random.default_rng(2)
    n, spd, rows = 4, 2, 10
    send = rng.integers(0, 3, size=(n, n * spd))
    recv = np.zeros_like(send)
    for src in range(n):
        for i in range(n * spd):
            recv[i // spd, src * spd + i % spd] = send[src, i]
    in_off = np.stack([rng.permutation(np.arange(0, 3 * n * spd, 3))[:n * spd] for _ in range(n)])
    out_off = np.zeros_like(send)
    for dst in range(n):  # receiver layout: slot j = src * spd + l at 3 * j (room for up to 3 rows)
        for src in range(n):
            for l in range(spd):
                out_off[src, dst * spd + l] = 3 * (src * spd + l)
    ops = [rng.normal(size=(3 * n * spd, 2)) for _ in range(n)]
    outs = [np.full((3 * n * spd + 1, 2), -7.0) for _ in range(n)]
    want_rand = np_ragged_all_to_all(ops, outs, in_off, send, out_off, recv)
    mesh4 = Mesh(np.array(jax.devices()[:4]), ("x",))

    def run(mesh, operand, output, *ints, rows_per_peer):
        f = functools.partial(epm.ragged_all_to_all_dense, axis_name="x", max_rows_per_peer=rows_per_peer)
        body = lambda a, b, c, d, e, g: f(a[0], b[0], c[0], d[0], e[0], g[0])[None]
        sm = epm.shard_map(body, mesh=mesh, in_specs=(P("x"),) * 6, out_specs=P("x"))
        return np.asarray(jax.jit(sm)(jnp.asarray(operand), jnp.asarray(output),
                                      *[jnp.asarray(np.asarray(v), jnp.int32) for v in ints]))

    got = run(mesh2, np.asarray(ex["operand"], np.float32), np.zeros((2, 4), np.float32), ex["in_off"], ex["send"],
              ex["out_off"], ex["recv"], rows_per_peer=3)
    np.testing.assert_array_equal(got, want)
    got_rand = run(mesh4, np.stack(ops).astype(np.float32), np.stack(outs).astype(np.float32), in_off, send,
                   out_off, recv, rows_per_peer=2 * spd)
    np.testing.assert_allclose(got_rand, np.stack(want_rand), rtol=1e-6)


def test_bad_meshes():
    ws = [jnp.zeros((6, D, F)), jnp.zeros((6, D, F)), jnp.zeros((6, F, D))]
    x, idx, w = jnp.zeros((T, D)), jnp.zeros((T, K), jnp.int32), jnp.zeros((T, K))
    with pytest.raises(ValueError, match="num_experts=6 is not divisible by the 'expert' mesh axis of size 4"):
        epm.expert_parallel_moe(x, idx, w, *ws, mesh=make_mesh(data=2, expert=4))
    ws8 = [jnp.zeros((8, D, F)), jnp.zeros((8, D, F)), jnp.zeros((8, F, D))]
    with pytest.raises(ValueError, match="44 tokens are not divisible by the 8 token shards"):
        epm.expert_parallel_moe(x[:44], idx[:44], w[:44], *ws8, mesh=make_mesh(data=2, expert=4))
    with pytest.raises(ValueError, match="no 'expert' axis"):
        epm.check_expert_mesh(Mesh(np.array(jax.devices()), ("data",)), 8)
    blk = MoeBlock(MoEConfig(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=8), hidden_size=D,
                   mesh=make_mesh(data=2, expert=4))
    with pytest.raises(ValueError, match="num_experts=6 is not divisible"):
        jax.eval_shape(blk.init, jax.random.PRNGKey(0), jnp.zeros((2, 8, D)))


def test_ragged_exchange_traces_with_gradients(case):
    """exchange='ragged' (jax.lax.ragged_all_to_all, the GPU path) passes tracing, replication checks
    and autodiff here; XLA:CPU cannot run it, so this stops at lowering: 2 exchanges forward + 2 backward."""
    x, idx, w, ws = case
    mesh = make_mesh(data=2, expert=4)

    def loss(x, w, *ws):
        return jnp.sum(epm.expert_parallel_moe(x, idx, w, *ws, mesh=mesh, exchange="ragged")[0])

    text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))).trace(x, w, *ws).lower().as_text()
    assert text.count("ragged_all_to_all") == 4


def test_dropless_expert_parallel_with_pallas_grouped_matmul(case, single_dropless):
    """The Pallas grouped matmul (interpret mode) inside the expert-parallel shard_map, values and VJPs."""
    x, idx, w, ws = case
    mesh = make_mesh(data=4, fsdp=1, expert=2)
    got = _value_and_grads(lambda *a: epm.expert_parallel_moe(*a, mesh=mesh, impl="pallas", interpret=True,
                                                              block_m=16, block_n=16, block_k=16)[0],
                           x, idx, w, ws)
    _assert_same(got, single_dropless)
