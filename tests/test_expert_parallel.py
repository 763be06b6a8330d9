"""Expert parallelism on 8 CPU devices against the single-device MoE, and node-limited routing."""

import contextlib
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from dsv3_jax import config
from dsv3_jax import expert_parallel
from dsv3_jax import moe
from dsv3_jax import sharding

DIM, HIDDEN = 16, 8


def _mesh(**sizes) -> Mesh:
  shape = [sizes.get(a, 1) for a in sharding.MESH_AXES]
  return Mesh(np.array(jax.devices()).reshape(shape), sharding.MESH_AXES)


@contextlib.contextmanager
def _in_mesh(mesh):
  """The context a sharded training step runs in: the mesh plus the logical-axis rules."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    yield


def _assert_close(got, want, tol=1e-5):
  """fp32 agreement up to summation order: relative 1e-5, absolute 1e-5 of the tensor's scale."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(np.abs(want).max(), 1e-30))


def _count(hlo: str, op: str) -> int:
  return len(re.findall(rf" {op}\(", hlo))


MESHES = [dict(expert=8), dict(data=2, expert=4), dict(fsdp=4, expert=2), dict(expert=4, tensor=2)]


# The MoE layer under a mesh equals the layer on one device.


@pytest.fixture(scope="module")
def moe_layer():
  cfg = config.tiny(n_routed_experts=16, n_activated_experts=4, n_expert_groups=4, n_limited_groups=2)
  layer = moe.MoE(cfg)
  x_BSD = jax.random.normal(jax.random.key(0), (8, 8, cfg.dim))
  variables = nn.unbox(jax.jit(layer.init)(jax.random.key(1), x_BSD))

  def loss(params, x_BSD):
    y_BSD, stats = layer.apply({**variables, "params": params}, x_BSD)
    return jnp.sum(y_BSD * jnp.cos(y_BSD)), (y_BSD, stats)

  step = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  want = jax.jit(step)(variables["params"], x_BSD)
  return step, variables["params"], x_BSD, want


@pytest.mark.parametrize("sizes", MESHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_moe_layer_under_mesh_equals_single_device(moe_layer, sizes):
  step, params, x_BSD, want = moe_layer
  with _in_mesh(_mesh(**sizes)):
    assert expert_parallel.active()
    compiled = jax.jit(step).lower(params, x_BSD).compile()
  # Expert parallelism really ran: 5 all-to-alls forward (counts, rows, ids, gates, results), 3 backward.
  assert _count(compiled.as_text(), "all-to-all") == 8
  (loss, (y_BSD, stats)), (grads, dx_BSD) = compiled(params, x_BSD)
  (want_loss, (want_y, want_stats)), (want_grads, want_dx) = want
  _assert_close(y_BSD, want_y)
  _assert_close(loss, want_loss)
  _assert_close(dx_BSD, want_dx)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    _assert_close(g, _at(want_grads, path))
  np.testing.assert_array_equal(stats["expert_load"], want_stats["expert_load"])  # global, so the bias moves alike
  _assert_close(stats["seq_balance"], want_stats["seq_balance"])


def _at(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def test_data_parallel_mesh_routes_local_tokens_without_exchanges(moe_layer):
  """No expert axis: the local dispatch runs, and each device selects experts for its own tokens only."""
  step, params, x_BSD, want = moe_layer
  assert not expert_parallel.active()
  with _in_mesh(_mesh(data=8)):
    assert not expert_parallel.active()
    compiled = jax.jit(step).lower(params, x_BSD).compile()
  hlo = compiled.as_text()
  assert _count(hlo, "all-to-all") == 0 and _count(hlo, "all-gather") == 0  # no token leaves its device
  (_, (y_BSD, stats)), (_, dx_BSD) = compiled(params, x_BSD)
  _assert_close(y_BSD, want[0][1][0])
  _assert_close(dx_BSD, want[1][1])
  np.testing.assert_array_equal(stats["expert_load"], want[0][1][1]["expert_load"])


# The dispatch itself, on hand-made routings.


def _routing(n_tokens, n_experts, top_k, seed, experts=None):
  rng = np.random.default_rng(seed)
  if experts is None:
    experts = np.stack([rng.permutation(n_experts)[:top_k] for _ in range(n_tokens)])
  return (jnp.asarray(rng.uniform(0.1, 1.0, (n_tokens, top_k)), jnp.float32), jnp.asarray(experts, jnp.int32),
          jnp.asarray(rng.uniform(0.1, 1.0, (n_tokens, n_experts)), jnp.float32))


def _weights(n_experts, seed):
  k1, k3, k2 = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(k1, (n_experts, DIM, HIDDEN)) / math.sqrt(DIM),
          jax.random.normal(k3, (n_experts, DIM, HIDDEN)) / math.sqrt(DIM),
          jax.random.normal(k2, (n_experts, HIDDEN, DIM)) / math.sqrt(HIDDEN))


def _value_and_grads(dispatch_fn, x_WD, gates_WK, experts_WK, scores_WE, ws, cot_WD):
  def fn(x_WD, gates_WK, *ws):
    return dispatch_fn(x_WD, moe.Routing(gates_WK, experts_WK, scores_WE), *ws)

  y, vjp = jax.vjp(fn, x_WD, gates_WK, *ws)
  return y, vjp(cot_WD)


def _check_dispatch(mesh_sizes, n_experts, top_k, experts=None, exchange="dense", n_tokens=64):
  """EP dispatch (values and gradients w.r.t. tokens, gate weights and expert weights) = local dispatch."""
  gates_WK, experts_WK, scores_WE = _routing(n_tokens, n_experts, top_k, seed=n_experts + top_k, experts=experts)
  ws = _weights(n_experts, seed=1)
  x_WD = jax.random.normal(jax.random.key(2), (n_tokens, DIM))
  cot_WD = jax.random.normal(jax.random.key(3), (n_tokens, DIM))
  args = (x_WD, gates_WK, experts_WK, scores_WE, ws, cot_WD)
  local = lambda x, r, *w: moe.local_dispatch(x, r, *w)
  want_y, want_grads = jax.jit(lambda *a: _value_and_grads(local, *a))(*args)
  parallel = lambda x, r, *w: expert_parallel.dispatch(x, r, *w, exchange=exchange)
  with _in_mesh(_mesh(**mesh_sizes)):
    y, grads = jax.jit(lambda *a: _value_and_grads(parallel, *a))(*args)
  _assert_close(y, want_y)
  for name, g, w in zip(("x", "gates", "w1", "w3", "w2"), grads, want_grads, strict=True):
    assert g.shape == w.shape, name
    _assert_close(g, w)


@pytest.mark.parametrize("kind", ["one expert", "one shard"])
def test_skewed_routing_drops_nothing(kind):
  """Every token on one expert (or every slot on shard 0): the static bounds still hold every row."""
  n_tokens, n_experts = 64, 16
  top_k = 1 if kind == "one expert" else 2
  experts = np.tile(np.arange(top_k) + (5 if kind == "one expert" else 0), (n_tokens, 1))
  _check_dispatch(dict(expert=8), n_experts, top_k, experts=experts)


def test_more_experts_per_token_than_per_shard():
  _check_dispatch(dict(data=2, expert=4), n_experts=8, top_k=6)  # J = min(K, E_L) = 2 places per row


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                                axis_name):
  """jax.lax.ragged_all_to_all's documented semantics (one slice per device) from a dense all-to-all."""
  n_shards, capacity = input_offsets.shape[0], operand.shape[0]
  i_C = jnp.arange(capacity)
  trailing = (1,) * (operand.ndim - 1)
  chunks = operand.at[input_offsets[:, None] + i_C].get(mode="fill", fill_value=0)
  chunks = jnp.where((i_C < send_sizes[:, None]).reshape(n_shards, capacity, *trailing), chunks, 0)
  received = jax.lax.all_to_all(chunks, axis_name, 0, 0, tiled=True).reshape(n_shards * capacity, *operand.shape[1:])
  where_C = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)[:, None] + i_C
  rows = jnp.where(i_C < recv_sizes[:, None], where_C, output.shape[0]).reshape(-1)
  return output.at[rows].set(received, mode="drop")


def test_emulated_ragged_all_to_all_follows_the_documented_example():
  mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
  per_device = {  # row i: the argument on axis index i
      "operand": [[1, 2, 2], [3, 4, 0]], "output": [[0, 0, 0, 0], [0, 0, 0, 0]],
      "input_offsets": [[0, 1], [0, 1]], "send_sizes": [[1, 2], [1, 1]],
      "output_offsets": [[0, 0], [1, 2]], "recv_sizes": [[1, 1], [2, 1]],
  }

  def fn(*args):
    return _emulated_ragged_all_to_all(*(a[0] for a in args), axis_name="x")[None]

  spec = jax.sharding.PartitionSpec("x")
  out = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * 6, out_specs=spec))(
      *(np.array(v, np.int32) for v in per_device.values()))
  np.testing.assert_array_equal(out, [[1, 3, 0, 0], [2, 2, 4, 0]])


@pytest.mark.parametrize("sizes,n_experts,top_k,experts", [
    (dict(data=2, expert=4), 16, 4, None),
    (dict(expert=8), 16, 2, np.tile([0, 1], (64, 1))),  # all slots to shard 0
], ids=["random", "one shard"])
def test_ragged_exchange_offsets(monkeypatch, sizes, n_experts, top_k, experts):
  """The ragged path's offsets and sizes, run through an emulation of the op (XLA:CPU has no kernel for it)."""
  monkeypatch.setattr(expert_parallel, "_ragged_all_to_all", _emulated_ragged_all_to_all)
  _check_dispatch(sizes, n_experts, top_k, experts=experts, exchange="ragged")


def test_real_ragged_all_to_all_lowers_with_its_gradient():
  gates_WK, experts_WK, scores_WE = _routing(64, 16, 4, seed=0)
  ws = _weights(16, seed=1)
  x_WD = jnp.ones((64, DIM))

  def loss(x_WD, gates_WK, *ws):
    y = expert_parallel.dispatch(x_WD, moe.Routing(gates_WK, experts_WK, scores_WE), *ws, exchange="ragged")
    return jnp.sum(y**2)

  with _in_mesh(_mesh(data=2, expert=4)):
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x_WD, gates_WK, *ws).as_text()
  # Forward: rows, ids, gates there and results back; backward: the transposes of the three float ones.
  assert text.count("custom_call @ragged_all_to_all(") == 7


def test_auto_exchange_is_dense_on_cpu():
  with _in_mesh(_mesh(expert=8)):
    mesh = jax.sharding.get_abstract_mesh()
    assert not expert_parallel._plan(mesh, 64, 2, 16, "auto").ragged
    assert expert_parallel._plan(mesh, 64, 2, 16, "ragged").ragged


@pytest.mark.parametrize("sizes,n_tokens,n_experts,exchange,message", [
    (dict(expert=8), 64, 12, "dense", r"n_routed_experts = 12 is not divisible by mesh axis \('expert',\) = 8"),
    (dict(data=2, expert=4), 12, 16, "dense", r"12 tokens .* not divisible by mesh axes \('data', 'fsdp', 'expert'\)"),
    (dict(expert=8), 64, 16, "nccl", r"exchange 'nccl' is not one of"),
    (dict(tensor=8), 64, 16, "dense", r"splits neither the tokens nor the experts"),
])
def test_bad_mesh_is_named(sizes, n_tokens, n_experts, exchange, message):
  gates_WK, experts_WK, scores_WE = _routing(n_tokens, n_experts, 2, seed=0)
  ws = _weights(n_experts, seed=1)
  with _in_mesh(_mesh(**sizes)), pytest.raises(expert_parallel.DispatchError, match=message):
    expert_parallel.dispatch(jnp.ones((n_tokens, DIM)), moe.Routing(gates_WK, experts_WK, scores_WE), *ws,
                             exchange=exchange)


def test_init_under_the_mesh_runs_on_any_token_count():
  """`init` traces the model on 2 tokens, which 8 devices cannot split; it must not need the exchange."""
  cfg = config.tiny(n_routed_experts=16)
  with _in_mesh(_mesh(expert=8)):
    variables = jax.eval_shape(moe.MoE(cfg).init, jax.random.key(0), jnp.zeros((1, 2, cfg.dim)))
  assert variables["params"]["experts"]["w1"].value.shape == (16, cfg.dim, cfg.moe_inter_dim)


# Node-limited routing (paper §2.1.2): each token reaches at most n_limited_nodes nodes.


def _reference_selection(biased_E, cfg) -> set[int]:
  """The rule written out per token in numpy: best nodes, then best groups, then the top-k experts."""
  scores = np.asarray(biased_E, np.float64).copy()
  n_experts, top_k = scores.shape[0], cfg.n_activated_experts
  for n_blocks, n_kept, n_best in ((cfg.n_nodes, cfg.n_limited_nodes, -(-top_k // cfg.n_limited_nodes)),
                                   (cfg.n_expert_groups, cfg.n_limited_groups, 2)):
    if n_blocks == 1:
      continue
    size = n_experts // n_blocks
    block_scores = [np.sort(scores[b * size:(b + 1) * size])[::-1][:n_best].sum() for b in range(n_blocks)]
    kept = sorted(range(n_blocks), key=lambda b: -block_scores[b])[:n_kept]
    for b in set(range(n_blocks)) - set(kept):
      scores[b * size:(b + 1) * size] = -np.inf
  return set(np.argsort(-scores, kind="stable")[:top_k].tolist())


NODE_CASES = [  # (E, n_nodes, n_limited_nodes, top_k, n_expert_groups, n_limited_groups)
    (32, 4, 2, 4, 1, 1),  # node limit alone
    (32, 8, 3, 5, 1, 1),  # K/M not whole: nodes scored by their best ceil(5/3) = 2
    (64, 4, 2, 6, 8, 3),  # node limit, then groups (2 per node) inside the kept nodes
    (64, 8, 4, 8, 8, 4),  # DeepSeek-V3's shape: nodes are the groups
]


@pytest.mark.parametrize("n_experts,n_nodes,n_limited,top_k,n_groups,n_limited_groups", NODE_CASES)
def test_node_limited_selection_matches_the_rule(n_experts, n_nodes, n_limited, top_k, n_groups, n_limited_groups):
  cfg = config.tiny(n_routed_experts=n_experts, n_activated_experts=top_k, n_nodes=n_nodes,
                    n_limited_nodes=n_limited, n_expert_groups=n_groups, n_limited_groups=n_limited_groups)
  biased_WE = np.random.default_rng(n_experts + n_nodes).normal(size=(200, n_experts)).astype(np.float32)
  got_WK = np.asarray(jax.jit(lambda b: moe.select_experts(b, cfg))(biased_WE))
  per_node = n_experts // n_nodes
  for biased_E, got_K in zip(biased_WE, got_WK, strict=True):
    assert set(got_K.tolist()) == _reference_selection(biased_E, cfg)
    assert len(set((got_K // per_node).tolist())) <= n_limited
  # The limit binds: without it, some token would reach more than n_limited nodes.
  free = cfg.replace(n_nodes=1, n_limited_nodes=1, n_expert_groups=1, n_limited_groups=1)
  free_WK = np.asarray(moe.select_experts(jnp.asarray(biased_WE), free))
  assert max(len(set((k // per_node).tolist())) for k in free_WK) > n_limited


def test_deepseek_v3_group_limit_is_its_node_limit():
  """With 8 groups = 8 nodes, keeping 4 groups by their top-2 is the M = 4 node limit (K/M = 2)."""
  v3 = config.tiny(n_routed_experts=64, n_activated_experts=8, n_expert_groups=8, n_limited_groups=4)
  with_nodes = v3.replace(n_nodes=8, n_limited_nodes=4)
  assert with_nodes.node_limit_is_group_limit and with_nodes.to_hf() == v3.to_hf()
  biased_WE = jnp.asarray(np.random.default_rng(0).normal(size=(300, 64)), jnp.float32)
  got = np.sort(np.asarray(moe.select_experts(biased_WE, with_nodes)), axis=-1)
  np.testing.assert_array_equal(got, np.sort(np.asarray(moe.select_experts(biased_WE, v3)), axis=-1))


@pytest.mark.parametrize("fields,message", [
    (dict(n_nodes=4, n_limited_nodes=5), "n_limited_nodes = 5: exceeds n_nodes = 4"),
    (dict(n_nodes=3), "n_nodes = 3: must divide n_routed_experts = 32"),
    (dict(n_nodes=8, n_expert_groups=4, n_limited_groups=2), "n_nodes = 8: must divide n_expert_groups = 4"),
    (dict(n_nodes=8, n_limited_nodes=1, n_activated_experts=6), "n_activated_experts = 6: exceeds the 4 experts"),
    (dict(n_nodes=4, n_limited_nodes=1, n_expert_groups=8, n_limited_groups=3, n_activated_experts=10),
     "n_activated_experts = 10: exceeds the 8 experts that the node and group limits leave"),
    (dict(n_nodes=0), "n_nodes = 0: must be a positive integer"),
])
def test_node_limit_config_errors_name_the_field(fields, message):
  base = dict(n_routed_experts=32, n_activated_experts=2, n_expert_groups=1, n_limited_groups=1)
  with pytest.raises(config.ConfigError, match=re.escape(message)):
    config.tiny(**{**base, **fields})


def test_node_limit_without_a_hf_equivalent_is_not_exported():
  cfg = config.tiny(n_routed_experts=32, n_activated_experts=4, n_expert_groups=1, n_limited_groups=1,
                    n_nodes=4, n_limited_nodes=2)
  with pytest.raises(config.ConfigError, match="n_nodes = 4"):
    cfg.to_hf()
