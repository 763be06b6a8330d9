"""DeepSeekMoE (paper §2.1.2): sigmoid router with group-limited top-k, routed + shared experts.

The routing correction bias (auxiliary-loss-free balancing, §2.1.2) lives in the non-trainable
`routing` collection: it steers which experts are selected and nothing else, so it gets no gradient,
no optimizer state and no weight decay. The layer reports per-expert loads for its update.

Expert compute goes through one seam, `RoutedExperts.dispatch`: the local dropless dispatch below,
or, under a mesh, `expert_parallel.dispatch` (all-to-all to the experts' devices when the mesh has an
expert axis of size > 1, else the local dispatch on each device's own tokens). Both run the same
SwiGLU over expert-contiguous row tiles (`expert_ffn`).

Precision (cfg.precision, paper §3.3): the `impl` passed down the dispatch names the routed experts'
GEMM, either an `ops.grouped_swiglu` impl ("auto": a native BLAS custom call on CPU in float32, else the XLA
tile loop) or `ops.grouped_matmul` impl (in cfg.dtype), or, under the "fp8" recipe, "fp8:" + an FP8
GEMM impl, which runs `fp8.grouped_linear` (Fprop, Dgrad and Wgrad in FP8 over the same tiles). The
gathered dispatch (no more routed slots than experts: decoding a few tokens) stays in cfg.dtype: it
multiplies each slot by its own gathered expert matrices, which are memory-bound vector-matrix products
that FP8 GEMMs would not speed up, while quantizing them would re-quantize an expert's weights per slot.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax import config as config_lib
from dsv3_jax import expert_parallel  # imports this module back; it only calls into it at run time
from dsv3_jax import fp8
from dsv3_jax import fp8_weights
from dsv3_jax import layers
from dsv3_jax import ops

ROUTING = "routing"  # variable collection of the correction biases
FP8 = "fp8:"  # prefix of an expert GEMM impl that runs in FP8
# The routed experts' implementations a run can name (config key train.impl): the ops.grouped_swiglu ones, and
# ragged_dot as a reference.
EXPERT_IMPLS = (*ops.GROUPED_SWIGLU_IMPLS, "ragged_dot")


class Routing(NamedTuple):
  weights_WK: jax.Array  # fp32 gate weights of the selected experts
  experts_WK: jax.Array  # int32 selected expert ids
  scores_WE: jax.Array  # fp32 unbiased affinities s_{i,t}


def select_experts(biased_WE: jax.Array, cfg: config_lib.ModelConfig) -> jax.Array:
  """Node- and group-limited top-k on bias-corrected scores (paper §2.1.2; numerics §4 steps 3-5).

  1. Node limit (when n_nodes > 1): score each node, a contiguous block of experts, by the sum of its
     ceil(K / n_limited_nodes) best experts; experts outside the n_limited_nodes best nodes drop to -inf.
  2. Group limit (when n_expert_groups > 1): score each group by the sum of its two best experts; keep
     the n_limited_groups best groups (groups nest in nodes, so a dropped node's groups score -inf).
  3. Take the top n_activated_experts of what is left.
  """
  top_k = cfg.n_activated_experts
  if cfg.n_nodes > 1:
    biased_WE = _keep_best_blocks(biased_WE, cfg.n_nodes, cfg.n_limited_nodes, -(-top_k // cfg.n_limited_nodes))
  if cfg.n_expert_groups > 1:
    biased_WE = _keep_best_blocks(biased_WE, cfg.n_expert_groups, cfg.n_limited_groups, 2)
  return jax.lax.top_k(biased_WE, top_k)[1].astype(jnp.int32)


def _keep_best_blocks(biased_WE: jax.Array, n_blocks: int, n_kept: int, n_best: int) -> jax.Array:
  """-inf outside the n_kept of n_blocks contiguous expert blocks whose n_best scores sum highest."""
  n_tokens, n_experts = biased_WE.shape
  blocks_WGE = biased_WE.reshape(n_tokens, n_blocks, -1)
  block_scores_WG = jax.lax.top_k(blocks_WGE, n_best)[0].sum(-1)
  kept_WG = jax.lax.top_k(block_scores_WG, n_kept)[1]
  keep_WG = jax.nn.one_hot(kept_WG, n_blocks, dtype=jnp.bool_).any(axis=1)
  return jnp.where(keep_WG[:, :, None], blocks_WGE, -jnp.inf).reshape(n_tokens, n_experts)


class Router(nn.Module):
  """Gate in fp32: scores from the plain affinities, selection from affinities + bias."""

  cfg: config_lib.ModelConfig

  @nn.compact
  def __call__(self, x_WD: jax.Array) -> Routing:
    c = self.cfg
    kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(c.init_std), ("embed", None)),
                        (c.dim, c.n_routed_experts), c.weight_dtype)
    bias = self.variable(ROUTING, "bias", jnp.zeros, (c.n_routed_experts,), jnp.float32)
    logits_WE = jnp.dot(x_WD.astype(jnp.float32), kernel.astype(jnp.float32))
    scores_WE = jax.nn.sigmoid(logits_WE) if c.score_func == "sigmoid" else jax.nn.softmax(logits_WE, -1)
    # Per-token work on each device's own tokens (left to jit, the selection's top-k would gather them all).
    experts_WK = expert_parallel.on_local_tokens(lambda biased_WE: select_experts(biased_WE, c), scores_WE + bias.value)
    weights_WK = jnp.take_along_axis(scores_WE, experts_WK, axis=-1)
    if c.score_func == "sigmoid":
      weights_WK = weights_WK / weights_WK.sum(-1, keepdims=True)
    return Routing(weights_WK * c.route_scale, experts_WK, scores_WE)


class TileLayout(NamedTuple):
  """Where each routed slot sits in the expert-contiguous tile buffer (all integer, no gradient)."""

  row_of_slot_N: jax.Array  # buffer row of slot n = (token n // K, choice n % K)
  slot_of_row_R: jax.Array  # inverse map; N marks a padding row
  tile_expert_G: jax.Array  # owning expert of each tile
  n_tiles: jax.Array  # tiles in use; the rest of the G tiles are padding
  rows: int  # rows per tile (M)


def tile_layout(experts_N: jax.Array, n_experts: int, rows: int | None = None) -> TileLayout:
  """Sorts routed slots by expert into tiles of M rows, each expert padded to whole tiles.

  The buffer has a static bound of ceil(N/M) + min(E, N) tiles, the most that N slots can fill,
  so no token is ever dropped; tiles past n_tiles are never computed. A slot whose id equals
  n_experts belongs to no expert (an empty place in an exchange buffer): such slots sit unpadded
  after the live tiles, inside the same bound, and their outputs are zero. `rows` overrides M,
  which otherwise follows `ops.tile_rows` for N slots.
  """
  n_slots = experts_N.shape[0]
  rows = rows or ops.tile_rows(n_slots, n_experts)
  n_groups = -(-n_slots // rows) + min(n_experts, n_slots)
  order_N = jnp.argsort(experts_N, stable=True)
  sorted_experts_N = experts_N[order_N]
  count_X = jnp.zeros(n_experts + 1, jnp.int32).at[experts_N].add(1)  # X: the E experts, then "none"
  padded_E = (count_X[:n_experts] + rows - 1) // rows * rows
  padded_end_E = jnp.cumsum(padded_E)
  start_X = jnp.append(padded_end_E - padded_E, padded_end_E[-1])
  rank_N = jnp.arange(n_slots) - (jnp.cumsum(count_X) - count_X)[sorted_experts_N]
  row_sorted_N = start_X[sorted_experts_N] + rank_N
  row_of_slot_N = jnp.zeros(n_slots, jnp.int32).at[order_N].set(row_sorted_N.astype(jnp.int32))
  slot_of_row_R = jnp.full(n_groups * rows, n_slots, jnp.int32).at[row_of_slot_N].set(
      jnp.arange(n_slots, dtype=jnp.int32))
  tile_start_G = jnp.arange(n_groups) * rows
  tile_expert_G = jnp.minimum(jnp.searchsorted(padded_end_E, tile_start_G, side="right"), n_experts - 1)
  return TileLayout(row_of_slot_N, slot_of_row_R, tile_expert_G.astype(jnp.int32),
                    padded_end_E[-1] // rows, rows)


def expert_ffn(x_RD: jax.Array, layout: TileLayout, w1_EDF: jax.Array, w3_EDF: jax.Array, w2_EFD: jax.Array,
               impl: str) -> jax.Array:
  """SwiGLU of each tile row through its tile's expert; x_RD and the result are in tile-row order.

  x_RD's padding rows (slot_of_row_R == N) must be zeros; their outputs are zeros.
  impl: an `ops.grouped_swiglu` impl ("auto", "xla", "native": the three GEMMs in one op), "ragged_dot" (three
  `ops.grouped_matmul`s), or "fp8:" + an `ops` FP8 GEMM impl (all three GEMMs in FP8).
  """
  n_groups = layout.tile_expert_G.shape[0]
  x_GMD = x_RD.reshape(n_groups, layout.rows, -1)
  stored = isinstance(w1_EDF, fp8_weights.Stored)

  def gmm(a, w):
    if stored:  # FP8-stored weights (inference)
      if impl.startswith(FP8):
        return fp8_weights.grouped_linear(a, w, layout.tile_expert_G, layout.n_tiles, impl.removeprefix(FP8))
      w = w.dequantize(a.dtype)
    elif impl.startswith(FP8):
      return fp8.grouped_linear(a, w, layout.tile_expert_G, layout.n_tiles, impl.removeprefix(FP8))
    matmul_impl = "xla" if impl in ops.GROUPED_SWIGLU_IMPLS else impl
    return ops.grouped_matmul(a, w, layout.tile_expert_G, layout.n_tiles, matmul_impl)

  if impl in ops.GROUPED_SWIGLU_IMPLS and not stored:  # the three GEMMs in one op
    n_slots = layout.row_of_slot_N.shape[0]
    live_rows_G = jnp.sum((layout.slot_of_row_R < n_slots).reshape(n_groups, layout.rows), axis=1, dtype=jnp.int32)
    y_GMD = ops.grouped_swiglu(x_GMD, w1_EDF, w3_EDF, w2_EFD, layout.tile_expert_G, layout.n_tiles, live_rows_G,
                               impl)
    return y_GMD.reshape(n_groups * layout.rows, -1)
  h_GMF = nn.silu(gmm(x_GMD, w1_EDF)) * gmm(x_GMD, w3_EDF)
  return gmm(h_GMF, w2_EFD).reshape(n_groups * layout.rows, -1)


def local_dispatch(x_WD: jax.Array, routing: Routing, w1_EDF: jax.Array, w3_EDF: jax.Array,
                   w2_EFD: jax.Array, impl: str = "auto") -> jax.Array:
  """Dropless routed-expert FFN on this device's tokens; cost grows with tokens x top-k only.

  With no more routed slots than experts (decoding a few sequences), each slot gathers its own
  expert's weights and the FFN runs as batched vector-matrix products: the fewest reads and
  multiplies possible, and no tile loop, so the gather fuses with the slice of a scanned layer's
  stacked weights instead of that whole slice being copied each layer.
  """
  n_tokens, top_k = routing.experts_WK.shape
  if n_tokens * top_k <= w1_EDF.shape[0]:
    return gathered_dispatch(x_WD, routing, w1_EDF, w3_EDF, w2_EFD)
  layout = tile_layout(jax.lax.stop_gradient(routing.experts_WK).reshape(-1), w1_EDF.shape[0])
  token_of_slot = jnp.append(jnp.arange(n_tokens * top_k, dtype=jnp.int32) // top_k, 0)
  live_R = (layout.slot_of_row_R < n_tokens * top_k)[:, None]
  x_RD = jnp.where(live_R, x_WD[token_of_slot[layout.slot_of_row_R]], 0)
  y_RD = expert_ffn(x_RD, layout, w1_EDF, w3_EDF, w2_EFD, impl)
  y_WKD = y_RD[layout.row_of_slot_N].reshape(n_tokens, top_k, -1)
  return jnp.einsum("wk,wkd->wd", routing.weights_WK, y_WKD.astype(jnp.float32)).astype(x_WD.dtype)


def gathered_dispatch(x_WD: jax.Array, routing: Routing, w1_EDF: jax.Array, w3_EDF: jax.Array,
                      w2_EFD: jax.Array) -> jax.Array:
  """The routed-expert FFN with each (token, choice) slot multiplying its own gathered expert weights.

  Weights may be arrays (any dtype: each slot's slice is cast to the activations') or FP8-stored
  (`fp8_weights.Stored`: each slot's e4m3 slice and its block scales are gathered and only they dequantized).
  """
  experts_N = jax.lax.stop_gradient(routing.experts_WK).reshape(-1)
  x_ND = jnp.repeat(x_WD, routing.experts_WK.shape[1], axis=0)

  def per_slot(w):
    if isinstance(w, fp8_weights.Stored):
      return w.take(experts_N).dequantize(x_WD.dtype)
    return w[experts_N].astype(x_WD.dtype)

  h_NF = nn.silu(jnp.einsum("nd,ndf->nf", x_ND, per_slot(w1_EDF))) * jnp.einsum("nd,ndf->nf", x_ND,
                                                                                 per_slot(w3_EDF))
  y_WKD = jnp.einsum("nf,nfd->nd", h_NF, per_slot(w2_EFD)).reshape(*routing.experts_WK.shape, -1)
  return jnp.einsum("wk,wkd->wd", routing.weights_WK, y_WKD.astype(jnp.float32)).astype(x_WD.dtype)


Dispatch = Callable[..., jax.Array]


class RoutedExperts(nn.Module):
  """The n_routed_experts SwiGLU experts as stacked weights [E, ...], sharded on the expert axis.

  `dispatch` None picks by the context mesh: `expert_parallel.dispatch` when the mesh splits the experts
  (all-to-all between the devices of the expert axis) or evenly splits the tokens (the local dispatch on
  each device's own tokens), `local_dispatch` on the whole array otherwise and during `init` (which may
  run on a token count that the mesh does not divide; its outputs are the same either way). Under the
  "fp8" recipe the dispatch gets the impl "fp8:" + cfg.fp8_impl instead of `impl`.
  """

  cfg: config_lib.ModelConfig
  dispatch: Dispatch | None = None
  impl: str = "auto"

  @nn.compact
  def __call__(self, x_WD: jax.Array, routing: Routing) -> jax.Array:
    c = self.cfg

    in_fp8 = c.precision == "fp8"

    def weight(name, shape, axes):  # FP8 quantizes the stored (fp32 master) weights; its Wgrad stays fp32
      init = nn.with_logical_partitioning(nn.initializers.normal(c.init_std), axes)
      w = self.param(name, init, shape, c.weight_dtype)
      return w if in_fp8 else w.astype(c.compute_dtype)

    e, d, f = expert_parallel.experts_here(c.n_routed_experts), c.dim, c.moe_inter_dim  # a shard's, per device
    stored = self.has_variable(fp8_weights.STORED, "w1")
    if stored:  # FP8-stored weights (inference): no parameters
      w1, w3, w2 = (fp8_weights.Stored(**self.get_variable(fp8_weights.STORED, n)) for n in ("w1", "w3", "w2"))
    else:
      w1 = weight("w1", (e, d, f), ("expert", "embed", "mlp"))
      w3 = weight("w3", (e, d, f), ("expert", "embed", "mlp"))
      w2 = weight("w2", (e, f, d), ("expert", "mlp", "embed"))
    dispatch = self.dispatch
    if dispatch is None:
      sharded = expert_parallel.applies(x_WD.shape[0]) and not self.is_initializing()
      if sharded and stored:
        raise ValueError("FP8-stored routed experts (fp8_weights) run on one device's tokens only; this mesh "
                         "splits the tokens or the experts: load the weights dequantized (dtype bfloat16) instead")
      dispatch = expert_parallel.dispatch if sharded else local_dispatch
    impl = FP8 + c.fp8_impl if in_fp8 else self.impl
    return dispatch(x_WD.astype(c.compute_dtype), routing, w1, w3, w2, impl=impl)


class MoE(nn.Module):
  """y = sum_k g_k Expert_k(x) + Shared(x), with load statistics for balancing."""

  cfg: config_lib.ModelConfig
  impl: str = "auto"

  @nn.compact
  def __call__(self, x_BSD: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    c = self.cfg
    batch, seq, dim = x_BSD.shape
    x_WD = x_BSD.reshape(batch * seq, dim)
    routing = Router(c, name="gate")(x_WD)
    self.sow("intermediates", "selected_experts", routing.experts_WK.reshape(batch, seq, -1))
    y_WD = RoutedExperts(c, impl=self.impl, name="experts")(x_WD, routing)
    if c.n_shared_experts:
      y_WD = y_WD + layers.MLP(c, c.n_shared_experts * c.moe_inter_dim, name="shared_experts")(x_WD)
    return y_WD.reshape(batch, seq, dim), load_statistics(routing, batch, c)


def load_statistics(routing: Routing, batch: int, cfg: config_lib.ModelConfig) -> dict[str, jax.Array]:
  """Per-expert token counts [E] and the sequence-wise balance term sum_i f_i P_i (paper eq. 17-20).

  f_i = E / (K T) * #(tokens of the sequence routed to i), P_i = mean over the sequence of the
  normalised affinity s_i / sum_j s_j; the term is averaged over sequences (alpha is applied by the loss).
  """
  n_experts, top_k = cfg.n_routed_experts, cfg.n_activated_experts
  hits_WE = jax.nn.one_hot(routing.experts_WK, n_experts, dtype=jnp.float32).sum(1)
  hits_BSE = hits_WE.reshape(batch, -1, n_experts)
  seq = hits_BSE.shape[1]
  f_BE = hits_BSE.sum(1) * n_experts / (top_k * seq)
  affinity_BSE = (routing.scores_WE / routing.scores_WE.sum(-1, keepdims=True)).reshape(batch, seq, n_experts)
  p_BE = affinity_BSE.mean(1)
  return {"expert_load": hits_WE.sum(0), "seq_balance": jnp.mean(jnp.sum(f_BE * p_BE, -1))}
