"""DeepSeekMoE: dropless dispatch against a dense reference, tile layout, routing, load statistics, cost."""

import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import config
from dsv3_jax import moe
from dsv3_jax import ops

DIM, HIDDEN = 16, 8


def _routing(n_tokens: int, n_experts: int, top_k: int, seed: int, same: bool = False) -> moe.Routing:
  """Distinct experts per token with positive gate weights; `same` sends every token to experts 0..K-1."""
  rng = np.random.default_rng(seed)
  if same:
    experts_WK = np.tile(np.arange(top_k), (n_tokens, 1))
  else:
    experts_WK = np.stack([rng.permutation(n_experts)[:top_k] for _ in range(n_tokens)])
  weights_WK = rng.uniform(0.1, 1.0, (n_tokens, top_k))
  scores_WE = rng.uniform(0.1, 1.0, (n_tokens, n_experts))
  return moe.Routing(jnp.asarray(weights_WK, jnp.float32), jnp.asarray(experts_WK, jnp.int32),
                     jnp.asarray(scores_WE, jnp.float32))


def _weights(n_experts: int, seed: int):
  k1, k3, k2 = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(k1, (n_experts, DIM, HIDDEN)) / math.sqrt(DIM),
          jax.random.normal(k3, (n_experts, DIM, HIDDEN)) / math.sqrt(DIM),
          jax.random.normal(k2, (n_experts, HIDDEN, DIM)) / math.sqrt(HIDDEN))


def _dense_reference(x_WD, routing, w1_EDF, w3_EDF, w2_EFD):
  """Every expert on every token, each output weighted by the gates of the tokens that chose that expert."""
  n_tokens, n_experts = x_WD.shape[0], w1_EDF.shape[0]
  gate_WE = jnp.zeros((n_tokens, n_experts)).at[jnp.arange(n_tokens)[:, None], routing.experts_WK].add(
      routing.weights_WK)
  hp = jax.lax.Precision.HIGHEST
  h_WEF = nn.silu(jnp.einsum("wd,edf->wef", x_WD, w1_EDF, precision=hp)) * jnp.einsum(
      "wd,edf->wef", x_WD, w3_EDF, precision=hp)
  return jnp.einsum("we,wef,efd->wd", gate_WE, h_WEF, w2_EFD, precision=hp)


def _value_and_vjp(fn, cotangent, *args):
  y, vjp = jax.vjp(fn, *args)
  return y, vjp(cotangent)


def _assert_close(got, want, tol=1e-5):
  """fp32 agreement up to summation order: relative 1e-5, absolute 1e-5 of the tensor's scale."""
  got, want = np.asarray(got), np.asarray(want)
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(np.abs(want).max(), 1e-30))


# (tokens, E, top_k, every token picks the same experts)
DISPATCH_CASES = [
    (64, 8, 2, False),  # several tiles per expert
    (37, 16, 4, False),  # odd token count
    (64, 64, 6, False),  # many experts, a few rows each
    (48, 8, 3, True),  # extreme imbalance: 3 experts take all, 5 are empty
    (20, 1, 1, False),  # E = 1
    (3, 16, 2, False),  # fewer slots than experts: gathered weights
    (4, 8, 2, True),  # slots == experts, all on the same two: gathered, duplicated weights
    (5, 64, 6, False),  # decode-sized: gathered
]


@pytest.mark.parametrize("impl", moe.EXPERT_IMPLS)
@pytest.mark.parametrize("n_tokens,n_experts,top_k,same", DISPATCH_CASES)
def test_local_dispatch_matches_dense_reference(impl, n_tokens, n_experts, top_k, same):
  routing = _routing(n_tokens, n_experts, top_k, seed=n_tokens + n_experts, same=same)
  ws = _weights(n_experts, seed=1)
  x_WD = jax.random.normal(jax.random.key(2), (n_tokens, DIM))
  cot_WD = jax.random.normal(jax.random.key(3), (n_tokens, DIM))
  ours = lambda x_WD, *ws: moe.local_dispatch(x_WD, routing, *ws, impl=impl)
  reference = lambda x_WD, *ws: _dense_reference(x_WD, routing, *ws)
  y_WD, grads = jax.jit(lambda *a: _value_and_vjp(ours, cot_WD, *a))(x_WD, *ws)
  want_WD, want_grads = jax.jit(lambda *a: _value_and_vjp(reference, cot_WD, *a))(x_WD, *ws)
  _assert_close(y_WD, want_WD)
  for name, g, w in zip(("x", "w1", "w3", "w2"), grads, want_grads, strict=True):
    assert g.shape == w.shape, name
    _assert_close(g, w)


def _check_layout(experts_N: np.ndarray, n_experts: int):
  n_slots = experts_N.shape[0]
  layout = jax.jit(moe.tile_layout, static_argnums=1)(jnp.asarray(experts_N, jnp.int32), n_experts)
  rows, n_tiles = layout.rows, int(layout.n_tiles)
  row_N, slot_R, expert_G = (np.asarray(a) for a in (layout.row_of_slot_N, layout.slot_of_row_R,
                                                       layout.tile_expert_G))
  n_groups = expert_G.shape[0]
  assert rows == ops.tile_rows(n_slots, n_experts)
  assert n_groups == -(-n_slots // rows) + min(n_experts, n_slots)  # the static bound
  assert slot_R.shape == (n_groups * rows,)
  # Every slot has its own row, in a live tile owned by its expert; the inverse map agrees.
  assert len(set(row_N.tolist())) == n_slots
  assert row_N.min() >= 0 and row_N.max() < n_tiles * rows
  np.testing.assert_array_equal(expert_G[row_N // rows], experts_N)
  np.testing.assert_array_equal(slot_R[row_N], np.arange(n_slots))
  assert np.sum(slot_R < n_slots) == n_slots and np.all(slot_R[slot_R != n_slots] < n_slots)
  # One expert's rows are contiguous from the start of its first tile; it pads to whole tiles only.
  count_E = np.bincount(experts_N, minlength=n_experts)
  for e in np.flatnonzero(count_E):
    rows_e = np.sort(row_N[experts_N == e])
    assert rows_e[0] % rows == 0
    np.testing.assert_array_equal(rows_e, rows_e[0] + np.arange(count_E[e]))
    assert np.sum(expert_G[:n_tiles] == e) == -(-count_E[e] // rows)
  assert n_tiles == np.sum(-(-count_E // rows)) <= n_groups
  assert np.all(np.diff(expert_G[:n_tiles]) >= 0)
  return layout


@pytest.mark.parametrize("n_slots,n_experts,kind", [
    (256, 8, "uniform"), (200, 64, "uniform"), (512, 256, "uniform"), (40, 1, "uniform"), (6, 32, "uniform"),
    (300, 16, "one expert"), (256, 16, "zipf"), (144, 16, "overflow")])
def test_tile_layout_invariants(n_slots, n_experts, kind):
  rng = np.random.default_rng(n_slots * 1000 + n_experts)
  if kind == "uniform":
    experts_N = rng.integers(0, n_experts, n_slots)
  elif kind == "one expert":
    experts_N = np.full(n_slots, n_experts - 1)
  elif kind == "zipf":
    experts_N = np.minimum(rng.zipf(1.5, n_slots) - 1, n_experts - 1)
  else:
    # Near the worst case for padding: every expert overflows one 8-row tile by a row.
    assert ops.tile_rows(n_slots, n_experts) == 8 and n_slots == 9 * n_experts
    experts_N = rng.permutation(np.repeat(np.arange(n_experts), 9))
  _check_layout(experts_N.astype(np.int32), n_experts)


def test_tile_rows_policy():
  for n_slots, n_experts in ((8, 1), (64, 64), (2048, 256), (8192, 256), (32768, 8), (32768, 256)):
    rows = ops.tile_rows(n_slots, n_experts)
    assert 8 <= rows <= 128 and rows & (rows - 1) == 0
  # Many experts with few rows each get small tiles, so padding stays a fraction of the routed rows.
  assert ops.tile_rows(2048, 256) == 8
  assert ops.tile_rows(32768, 256) * 256 <= 32768 // 4


# Router and group-limited selection.


def _sigmoid(z: float) -> float:
  return 1.0 / (1.0 + math.exp(-z))


def test_router_bias_selects_but_weights_are_unbiased():
  cfg = config.tiny(dim=4, n_routed_experts=4, n_activated_experts=2, n_expert_groups=1, n_limited_groups=1,
                    route_scale=2.5)
  logits = [2.0, 1.0, 0.0, -1.0]
  variables = {"params": {"kernel": jnp.eye(4)}, moe.ROUTING: {"bias": jnp.array([0.0, 0.0, 3.0, 0.0])}}
  routing = moe.Router(cfg).apply(variables, jnp.array([logits]))
  # Biased scores: 0.88, 0.73, 0.5 + 3, 0.27, so experts 2 and 0 are picked ...
  assert sorted(np.asarray(routing.experts_WK[0]).tolist()) == [0, 2]
  # ... but weighted by their unbiased sigmoid scores, normalised over the pair and times route_scale.
  s0, s2 = _sigmoid(2.0), _sigmoid(0.0)
  got = dict(zip(np.asarray(routing.experts_WK[0]).tolist(), np.asarray(routing.weights_WK[0]).tolist(),
                 strict=True))
  np.testing.assert_allclose([got[0], got[2]], [2.5 * s0 / (s0 + s2), 2.5 * s2 / (s0 + s2)], rtol=1e-6)
  np.testing.assert_allclose(routing.scores_WE[0], [_sigmoid(z) for z in logits], rtol=1e-6)


def _select(biased_E, n_groups, n_limited, top_k):
  cfg = config.tiny(n_routed_experts=len(biased_E), n_activated_experts=top_k, n_expert_groups=n_groups,
                    n_limited_groups=n_limited)
  return sorted(np.asarray(moe.select_experts(jnp.array([biased_E]), cfg)[0]).tolist())


def test_group_limited_selection_scores_groups_by_top2_sum():
  biased_E = [0.99, 0.0, 0.0, 0.0,  # group 0: best single expert, top-2 sum 0.99
              0.6, 0.6, 0.0, 0.0,  # group 1: top-2 sum 1.2
              0.5, 0.5, 0.5, 0.5,  # group 2: top-2 sum 1.0 (but the largest full sum, 2.0)
              0.55, 0.52, 0.0, 0.0]  # group 3: top-2 sum 1.07
  # Groups 1 and 3 are kept; expert 0 (the best score) and group 2 never get picked.
  assert _select(biased_E, n_groups=4, n_limited=2, top_k=3) == [4, 5, 12]
  # Without the group limit, expert 0 would win.
  assert _select(biased_E, n_groups=1, n_limited=1, top_k=3) == [0, 4, 5]


def test_negative_scores_in_kept_groups_are_selectable():
  # A negative bias can push biased scores below 0; dropped groups must fall to -inf, not to 0.
  biased_E = [-0.5, -0.7, -0.1, -0.2, -2.0, -2.0, -3.0, -3.0]
  assert _select(biased_E, n_groups=4, n_limited=2, top_k=4) == [0, 1, 2, 3]


# Load statistics and the routing bias collection.


def test_load_statistics_matches_paper_eq_17_to_20():
  batch, seq, n_experts, top_k = 3, 10, 8, 2
  cfg = config.tiny(n_routed_experts=n_experts, n_activated_experts=top_k)
  routing = _routing(batch * seq, n_experts, top_k, seed=7)
  stats = moe.load_statistics(routing, batch, cfg)
  experts = np.asarray(routing.experts_WK).reshape(batch, seq, top_k)
  scores = np.asarray(routing.scores_WE, np.float64).reshape(batch, seq, n_experts)
  np.testing.assert_array_equal(stats["expert_load"], np.bincount(experts.ravel(), minlength=n_experts))
  assert float(stats["expert_load"].sum()) == batch * seq * top_k
  terms = []
  for b in range(batch):
    f = np.array([n_experts / (top_k * seq) * np.sum(experts[b] == i) for i in range(n_experts)])
    p = np.mean(scores[b] / scores[b].sum(-1, keepdims=True), axis=0)
    terms.append(np.sum(f * p))
  np.testing.assert_allclose(stats["seq_balance"], np.mean(terms), rtol=1e-6)


@pytest.fixture(scope="module")
def tiny_moe():
  cfg = config.tiny()
  layer = moe.MoE(cfg)
  x_BSD = jax.random.normal(jax.random.key(0), (2, 8, cfg.dim))
  return cfg, layer, jax.jit(layer.init)(jax.random.key(1), x_BSD), x_BSD


def _paths(tree) -> list[str]:
  return sorted("/".join(path) for path in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)))


def test_bias_is_routing_state_not_a_parameter(tiny_moe):
  cfg, layer, variables, x_BSD = tiny_moe
  assert _paths(variables[moe.ROUTING]) == ["gate/bias"]
  assert not any("bias" in p for p in _paths(variables["params"]))

  def loss(params):
    y_BSD, _ = layer.apply({**variables, "params": params}, x_BSD)
    return jnp.sum(y_BSD**2)

  grads = jax.jit(jax.grad(loss))(variables["params"])
  assert _paths(grads) == _paths(variables["params"])
  assert not any("bias" in p for p in _paths(grads))
  # The bias does steer selection: a large bias on one expert puts it in every token's top-k.
  steered = {**variables, moe.ROUTING: {"gate": {"bias": jnp.zeros(cfg.n_routed_experts).at[5].set(10.0)}}}
  _, state = jax.jit(lambda v, x: layer.apply(v, x, mutable=["intermediates"]))(steered, x_BSD)
  assert np.all(np.any(np.asarray(state["intermediates"]["selected_experts"][0]) == 5, axis=-1))


# Cost: the xla grouped matmul computes live tiles only, and live tiles are bounded by routed rows.


def _nan_padded_tiles(seed: int, out_width: int, n_experts: int = 8, n_slots: int = 100):
  """(layout, live tiles, x [G, M, DIM], dy [G, M, out_width]) with NaN in every padding tile of x and dy."""
  experts_N = jnp.asarray(np.random.default_rng(seed).integers(0, n_experts, n_slots), jnp.int32)
  layout = moe.tile_layout(experts_N, n_experts)
  n_groups, rows, n_tiles = layout.tile_expert_G.shape[0], layout.rows, int(layout.n_tiles)
  assert n_tiles < n_groups
  dead_G = (jnp.arange(n_groups) >= n_tiles)[:, None, None]
  x_GMD = jnp.where(dead_G, jnp.nan, jax.random.normal(jax.random.key(0), (n_groups, rows, DIM)))
  dy_GMF = jnp.where(dead_G, jnp.nan, jax.random.normal(jax.random.key(1), (n_groups, rows, out_width)))
  return layout, n_tiles, x_GMD, dy_GMF


def test_grouped_matmul_never_touches_padding_tiles():
  """NaN in every padding tile (and its cotangent) stays out of the results: those tiles are never multiplied."""
  n_experts = 8
  layout, n_tiles, x_GMD, dy_GMF = _nan_padded_tiles(0, HIDDEN, n_experts)
  w_EDF = _weights(n_experts, seed=2)[0]

  fn = lambda x, w: ops.grouped_matmul(x, w, layout.tile_expert_G, layout.n_tiles, "xla")
  y_GMF, (dx_GMD, dw_EDF) = jax.jit(lambda x, w, dy: _value_and_vjp(fn, dy, x, w))(x_GMD, w_EDF, dy_GMF)
  np.testing.assert_array_equal(y_GMF[n_tiles:], 0)
  np.testing.assert_array_equal(dx_GMD[n_tiles:], 0)
  assert np.all(np.isfinite(y_GMF[:n_tiles])) and np.all(np.isfinite(dx_GMD[:n_tiles]))
  assert np.all(np.isfinite(dw_EDF))


@pytest.mark.parametrize("impl", ("xla", "native"))
def test_fused_swiglu_never_touches_padding_tiles(impl):
  """The same for the fused SwiGLU (`ops.grouped_swiglu`: the tile loop and the native call), forward and backward."""
  n_experts = 8
  layout, n_tiles, x_GMD, dy_GMD = _nan_padded_tiles(1, DIM, n_experts)
  fn = lambda x, *ws: ops.grouped_swiglu(x, *ws, layout.tile_expert_G, layout.n_tiles, impl=impl)
  y_GMD, (dx_GMD, *dws) = jax.jit(lambda x, ws, dy: _value_and_vjp(fn, dy, x, *ws))(x_GMD, _weights(n_experts, 2),
                                                                                   dy_GMD)
  np.testing.assert_array_equal(y_GMD[n_tiles:], 0)
  np.testing.assert_array_equal(dx_GMD[n_tiles:], 0)
  assert np.all(np.isfinite(y_GMD[:n_tiles])) and np.all(np.isfinite(dx_GMD[:n_tiles]))
  assert all(np.all(np.isfinite(dw)) for dw in dws)


def _dots(jaxpr, in_cond: bool = False) -> list[bool]:
  """For every dot_general in a jaxpr and the jaxprs nested in it: whether it sits inside a cond branch."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append(in_cond)
    for param in eqn.params.values():
      for sub in param if isinstance(param, tuple | list) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if isinstance(inner, jax.extend.core.Jaxpr):
          found += _dots(inner, in_cond or eqn.primitive.name == "cond")
  return found


def test_grouped_matmul_multiplies_only_inside_the_live_tile_branch():
  """Every matmul of the xla impl's forward and backward sits in the `tile < n_tiles` branch of the scan."""
  layout = moe.tile_layout(jnp.arange(64, dtype=jnp.int32) % 8, 8)
  n_groups = layout.tile_expert_G.shape[0]
  x_GMD = jnp.ones((n_groups, layout.rows, DIM))
  w_EDF = jnp.ones((8, DIM, HIDDEN))
  loss = lambda x, w: jnp.sum(ops.grouped_matmul(x, w, layout.tile_expert_G, layout.n_tiles, "xla") ** 2)
  dots = _dots(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x_GMD, w_EDF).jaxpr)
  assert len(dots) == 3 and all(dots)  # y = x w, dx = dy w^T, dw = x^T dy


def test_fused_swiglu_multiplies_only_inside_the_live_tile_branch():
  layout = moe.tile_layout(jnp.arange(64, dtype=jnp.int32) % 8, 8)
  x_GMD = jnp.ones((layout.tile_expert_G.shape[0], layout.rows, DIM))
  ws = _weights(8, 0)
  loss = lambda x, *ws: jnp.sum(ops.grouped_swiglu(x, *ws, layout.tile_expert_G, layout.n_tiles, impl="xla") ** 2)
  dots = _dots(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(x_GMD, *ws).jaxpr)
  # forward: x w1, x w3, h w2; backward: x w1, x w3 again, dy w2^T, da1 w1^T, da3 w3^T and the three x^T / h^T grads
  assert len(dots) == 11 and all(dots)


@pytest.mark.parametrize("n_experts", [8, 64, 256])
def test_live_rows_grow_with_routed_slots_not_experts(n_experts):
  """At 4096 tokens x top-8 with balanced routing, the rows multiplied stay within 1.25x the routed slots."""
  n_slots = 4096 * 8
  rng = np.random.default_rng(n_experts)
  experts_N = np.concatenate([rng.permutation(n_experts)[:8] for _ in range(4096)]).astype(np.int32)
  layout = jax.jit(moe.tile_layout, static_argnums=1)(jnp.asarray(experts_N), n_experts)
  live_rows = int(layout.n_tiles) * layout.rows
  assert n_slots <= live_rows <= n_slots + n_experts * (layout.rows - 1)
  assert live_rows <= 1.25 * n_slots
  # The static buffer (what the gathers and the scan length see) is bounded the same way.
  assert layout.slot_of_row_R.shape[0] <= n_slots + n_experts * layout.rows + layout.rows
