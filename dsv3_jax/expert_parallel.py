"""Expert parallelism: routed experts sharded over the mesh's expert axis, tokens moved by all-to-all.

The P devices along the expert axis (an expert group) hold different tokens and different experts:
device p owns experts [p E_L, (p+1) E_L), E_L = E / P. Inside one `shard_map` each device, with its W
local tokens already routed (the router's top-k also runs per device, `on_local_tokens`):

1. Plans its sends. A token goes to every shard that owns one of its K experts, once per shard,
   carrying the local ids and gate weights of its experts there: at most J = min(K, E_L) places a row.
2. Exchanges counts: the rows for each shard, by an all-to-all of P integers, so every device knows
   how many rows each source sends it.
3. Dispatches the rows by all-to-all, dropless under a static bound:
   - dense (every backend): a [P, W] send buffer, W rows per destination. A token reaches a shard at
     most once, so W rows per (source, destination) can never overflow, whatever the routing.
   - ragged (`jax.lax.ragged_all_to_all`; GPU and TPU, XLA:CPU lacks it): only the counted rows move,
     from a compact send buffer of W min(K, P) rows (a token reaches at most min(K, P) shards).
   Both receive into P W rows: every token of the group may pick this shard.
4. Computes: the received (row, place) slots are laid out in expert-contiguous tiles (`moe.tile_layout`,
   empty places are "no expert") and run through `moe.expert_ffn`, the grouped matmul of the local
   dispatch: only live tiles are multiplied, so padding costs at most a tile per expert.
5. Combines: each row's expert outputs are weighted by its gates and summed on the expert side, so one
   row per (token, shard) travels back by the reverse all-to-all; the source sums its rows per token.

Under a mesh that splits the tokens but not the experts (P = 1) the same `shard_map` runs
`moe.local_dispatch` on each device's own tokens: no exchange, and no device sees another's routing.

Gradients flow through both exchanges (the transpose of an all-to-all is the reverse all-to-all; the
gathers that pack and unpack the buffers carry their own transposes). Weights sharded on `embed` (FSDP)
are all-gathered inside, which makes their gradient a reduce-scatter; weights sharded on `mlp` stay
sharded and the partial outputs are summed over those axes at the end. Expert loads need nothing here:
`moe.load_statistics` runs on the global arrays outside the `shard_map`, so jit sums them over all devices.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from dsv3_jax import moe
from dsv3_jax import ops
from dsv3_jax import sharding

EXCHANGES = ("auto", "dense", "ragged")
_RAGGED_PLATFORMS = ("gpu", "cuda", "rocm", "tpu")

# Looked up at trace time, so a test can put a same-semantics emulation here on XLA:CPU.
_ragged_all_to_all = jax.lax.ragged_all_to_all

Axes = tuple[str, ...]


class DispatchError(ValueError):
  """Tokens, experts or weights that the mesh cannot split; the message names the mesh axis."""


class _Plan(NamedTuple):
  """Static facts of one expert-parallel dispatch (hashable: it parameterises the traced function)."""

  expert_axes: Axes  # mesh axes the experts are split over (the `expert` axis)
  token_axes: Axes  # mesh axes the tokens are split over (data, fsdp, expert)
  embed_axes: Axes  # weight `embed` dim: all-gathered inside
  gather_axes: Axes  # the embed axes of size > 1 (a gather over one device would only copy)
  mlp_axes: Axes  # weight `mlp` dim: kept split, outputs summed over these axes
  n_shards: int  # P
  experts_per_shard: int  # E_L
  tokens: int  # W, tokens per device
  top_k: int  # K
  ragged: bool

  @property
  def places(self) -> int:  # J: a row's experts on one shard
    return min(self.top_k, self.experts_per_shard)

  @property
  def send_rows(self) -> int:
    return self.tokens * min(self.top_k, self.n_shards) if self.ragged else self.n_shards * self.tokens

  @property
  def recv_rows(self) -> int:
    return self.n_shards * self.tokens


def active() -> bool:
  """Whether the context mesh splits the experts: an expert axis of size > 1."""
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and _size(mesh, _axes(("expert",), mesh)[0]) > 1


def applies(n_tokens: int) -> bool:
  """Whether `dispatch` should run: experts split (expert parallelism), or these tokens split evenly.

  Without an expert axis each device then runs the local dispatch on its own tokens; left to jit, the
  local dispatch's sort over all routed slots would gather every device's routing onto every device.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return False
  shards = _size(mesh, _axes(("batch",), mesh)[0])
  return active() or (shards > 1 and n_tokens % shards == 0)


def experts_here(n_experts: int) -> int:
  """Routed experts whose weights a trace holds: all, or one expert shard's inside a shard_map over the expert
  axis (the pipeline runs its stages per device, with the expert weights still split)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return n_experts
  (expert,) = _axes(("expert",), mesh)
  return n_experts // _size(mesh, expert) if _manual(mesh, expert) else n_experts


def on_local_tokens(fn: Callable[[jax.Array], jax.Array], x_W: jax.Array) -> jax.Array:
  """fn (per-token, leading dim W) run by each device on its own tokens when the context mesh splits them."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(x_W)
  (tokens,) = _axes(("batch",), mesh)
  if _size(mesh, tokens) == 1 or x_W.shape[0] % _size(mesh, tokens) or _manual(mesh, tokens):
    return fn(x_W)
  spec = _spec(tokens)
  return jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec)(x_W)


def dispatch(x_WD: jax.Array, routing: moe.Routing, w1_EDF: jax.Array, w3_EDF: jax.Array, w2_EFD: jax.Array,
             impl: str = "auto", exchange: str = "auto") -> jax.Array:
  """The routed-expert output of every token, computed where its experts live (same result as local).

  With the experts split, tokens travel by all-to-all (`exchange`: dense, ragged, or auto by platform);
  with only the tokens split, each device runs `moe.local_dispatch` on its own.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if _manual(mesh, _axes(("batch",), mesh)[0]):
    # Already per device (inside the pipeline's shard_map): local tokens, weights whole but for the expert split.
    plan = _plan(mesh, x_WD.shape[0] * _size(mesh, _axes(("batch",), mesh)[0]), routing.experts_WK.shape[1],
                 w1_EDF.shape[0] * _size(mesh, _axes(("expert",), mesh)[0]), exchange)
    plan = plan._replace(embed_axes=(), gather_axes=(), mlp_axes=())
    return _dispatch_shard(x_WD, routing.weights_WK, jax.lax.stop_gradient(routing.experts_WK), w1_EDF, w3_EDF,
                           w2_EFD, plan=plan, impl=impl)
  plan = _plan(mesh, x_WD.shape[0], routing.experts_WK.shape[1], w1_EDF.shape[0], exchange)
  tokens = _spec(plan.token_axes, ())
  w13 = _spec(plan.expert_axes, plan.embed_axes, plan.mlp_axes)
  w2 = _spec(plan.expert_axes, plan.mlp_axes, plan.embed_axes)
  fn = jax.shard_map(functools.partial(_dispatch_shard, plan=plan, impl=impl), mesh=mesh,
                     in_specs=(tokens, tokens, tokens, w13, w13, w2), out_specs=tokens)
  return fn(x_WD, routing.weights_WK, jax.lax.stop_gradient(routing.experts_WK), w1_EDF, w3_EDF, w2_EFD)


_axes = sharding.mesh_axes


def _manual(mesh, axes: Axes) -> bool:
  """Whether every axis of `axes` longer than 1 is already manual (the caller runs inside a shard_map over them)."""
  live = [a for a in axes if mesh.shape[a] > 1]
  return bool(live) and all(a in mesh.manual_axes for a in live)


def _size(mesh, axes: Axes) -> int:
  return math.prod(mesh.shape[a] for a in axes)


def _spec(*dims: Axes) -> PartitionSpec:
  return PartitionSpec(*(d or None for d in dims))


def _plan(mesh, n_tokens: int, top_k: int, n_experts: int, exchange: str) -> _Plan:
  if exchange not in EXCHANGES:
    raise DispatchError(f"exchange {exchange!r} is not one of {EXCHANGES}")
  (tokens,) = _axes(("batch",), mesh)
  expert, embed, mlp = _axes(("expert", "embed", "mlp"), mesh)
  n_shards = _size(mesh, expert)
  missing = [a for a in expert if a not in tokens and mesh.shape[a] > 1]
  if missing:
    raise DispatchError(f"mesh axis {missing[0]!r} splits the experts but not the tokens (logical 'batch' maps "
                        f"to {tokens}); expert parallelism exchanges tokens between the devices of that axis")
  if _size(mesh, tokens) == 1:
    raise DispatchError(f"mesh {dict(mesh.shape)} splits neither the tokens nor the experts")
  both = [a for a in mlp if a in tokens]
  if both:
    raise DispatchError(f"mesh axis {both[0]!r} splits both the tokens and the experts' mlp dim; the partial "
                        "expert outputs summed over it would mix different tokens")
  if n_experts % n_shards:
    raise DispatchError(f"n_routed_experts = {n_experts} is not divisible by mesh axis {expert} = {n_shards}")
  if n_tokens % _size(mesh, tokens):
    raise DispatchError(f"{n_tokens} tokens (batch x sequence) are not divisible by mesh axes {tokens} = "
                        f"{_size(mesh, tokens)}")
  not_split = [a for a in embed if a not in tokens]
  if not_split:
    raise DispatchError(f"mesh axis {not_split[0]!r} splits the experts' embed dim but not the tokens; the "
                        "gathered weights would differ in type from the replicated tokens")
  if exchange == "auto":
    exchange = "ragged" if _platform(mesh) in _RAGGED_PLATFORMS else "dense"
  gather = tuple(a for a in embed if mesh.shape[a] > 1)
  return _Plan(expert, tokens, embed, gather, mlp, n_shards, n_experts // n_shards, n_tokens // _size(mesh, tokens),
               top_k, exchange == "ragged")


def _platform(mesh) -> str:
  device = getattr(mesh, "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


class _Sends(NamedTuple):
  """Where this device's slots go (integers only, no gradient)."""

  count_P: jax.Array  # rows for each shard
  offset_P: jax.Array  # first send-buffer row of each shard
  row_WK: jax.Array  # send-buffer row of slot (w, k): the row of (token w, shard of expert k)
  first_WK: jax.Array  # slot k is token w's first on its shard, so that row's result is added once
  slot_SJ: jax.Array  # slot w K + k in place j of send row s; W K marks an empty place


def _plan_sends(experts_WK: jax.Array, plan: _Plan) -> _Sends:
  n_tokens, top_k = experts_WK.shape
  shard_WK = experts_WK // plan.experts_per_shard
  # Rank of slot k among token w's slots on the same shard (experts are distinct, so rank < J).
  earlier_KK = jnp.tri(top_k, k=-1, dtype=jnp.bool_)
  rank_WK = jnp.sum((shard_WK[:, :, None] == shard_WK[:, None, :]) & earlier_KK, axis=-1)
  sends_WP = jnp.zeros((n_tokens, plan.n_shards), jnp.bool_).at[jnp.arange(n_tokens)[:, None], shard_WK].set(True)
  count_P = jnp.sum(sends_WP, axis=0, dtype=jnp.int32)
  if plan.ragged:
    offset_P = jnp.cumsum(count_P) - count_P
  else:
    offset_P = jnp.arange(plan.n_shards, dtype=jnp.int32) * plan.tokens
  position_WP = jnp.cumsum(sends_WP, axis=0, dtype=jnp.int32) - 1
  row_WK = offset_P[shard_WK] + jnp.take_along_axis(position_WP, shard_WK, axis=1)
  place_N = (row_WK * plan.places + rank_WK).reshape(-1)
  slot_SJ = jnp.full(plan.send_rows * plan.places, n_tokens * top_k, jnp.int32).at[place_N].set(
      jnp.arange(n_tokens * top_k, dtype=jnp.int32)).reshape(plan.send_rows, plan.places)
  return _Sends(count_P, offset_P.astype(jnp.int32), row_WK, rank_WK == 0, slot_SJ)


class _Exchange(NamedTuple):
  there: Callable[..., jax.Array]  # send rows [S, ...] -> received rows [R, ...], empty rows filled
  back: Callable[[jax.Array], jax.Array]  # result rows [R, D] -> rows [S, D] in send order
  valid_R: jax.Array  # received rows that carry a token


def _dense_exchange(sends: _Sends, recv_count_P: jax.Array, plan: _Plan) -> _Exchange:
  def all_to_all(a, fill=0):
    del fill  # empty places of the send buffer already hold the fill
    return jax.lax.all_to_all(a, plan.expert_axes, 0, 0, tiled=True)

  valid_R = (jnp.arange(plan.tokens)[None, :] < recv_count_P[:, None]).reshape(-1)
  return _Exchange(all_to_all, all_to_all, valid_R)


def _ragged_exchange(sends: _Sends, recv_count_P: jax.Array, plan: _Plan) -> _Exchange:
  axes = plan.expert_axes
  recv_offset_P = jnp.cumsum(recv_count_P) - recv_count_P
  there_offset_P = jax.lax.all_to_all(recv_offset_P, axes, 0, 0, tiled=True)  # where my rows land on each shard
  back_offset_P = jax.lax.all_to_all(sends.offset_P, axes, 0, 0, tiled=True)  # where results land back

  # Output buffers built from the operand: they vary over the same axes, so no cast is inserted whose
  # transpose would all-reduce the (unused) buffer cotangent in the backward pass.
  def there(a, fill=0):
    out = jnp.full_like(a, fill, shape=(plan.recv_rows, *a.shape[1:]))
    return _ragged_all_to_all(a, out, sends.offset_P, sends.count_P, there_offset_P, recv_count_P, axis_name=axes)

  def back(a):
    out = jnp.zeros_like(a, shape=(plan.send_rows, *a.shape[1:]))
    return _ragged_all_to_all(a, out, recv_offset_P, recv_count_P, back_offset_P, sends.count_P, axis_name=axes)

  return _Exchange(there, back, jnp.arange(plan.recv_rows) < jnp.sum(recv_count_P))


def _dispatch_shard(x_WD, weights_WK, experts_WK, w1_EDF, w3_EDF, w2_EFD, *, plan: _Plan, impl: str):
  """One device's part; with experts split, the exchange of steps 1-5 above, else the local dispatch."""
  if plan.gather_axes:
    w1_EDF, w3_EDF = (jax.lax.all_gather(w, plan.gather_axes, axis=1, tiled=True) for w in (w1_EDF, w3_EDF))
    w2_EFD = jax.lax.all_gather(w2_EFD, plan.gather_axes, axis=2, tiled=True)
  if plan.n_shards == 1:
    y_WD = moe.local_dispatch(x_WD, moe.Routing(weights_WK, experts_WK, None), w1_EDF, w3_EDF, w2_EFD, impl)
  else:
    y_WD = _exchange_and_compute(x_WD, weights_WK, experts_WK, w1_EDF, w3_EDF, w2_EFD, plan, impl)
  if plan.mlp_axes:
    y_WD = jax.lax.psum(y_WD.astype(jnp.float32), plan.mlp_axes)
  return y_WD.astype(x_WD.dtype)


def _exchange_and_compute(x_WD, weights_WK, experts_WK, w1_EDF, w3_EDF, w2_EFD, plan: _Plan, impl: str):
  n_tokens, top_k = experts_WK.shape
  sends = _plan_sends(experts_WK, plan)
  recv_count_P = jax.lax.all_to_all(sends.count_P, plan.expert_axes, 0, 0, tiled=True)
  exchange = (_ragged_exchange if plan.ragged else _dense_exchange)(sends, recv_count_P, plan)
  no_expert = plan.experts_per_shard
  local_N = jnp.append((experts_WK % no_expert).reshape(-1), no_expert)
  x_SD = x_WD.at[sends.slot_SJ[:, 0] // top_k].get(mode="fill", fill_value=0)
  gates_SJ = weights_WK.reshape(-1).at[sends.slot_SJ].get(mode="fill", fill_value=0)
  x_RD = exchange.there(x_SD)
  ids_RJ = jnp.where(exchange.valid_R[:, None], exchange.there(local_N[sends.slot_SJ], no_expert), no_expert)
  gates_RJ = exchange.there(gates_SJ)
  out_RD = _expert_rows(x_RD, ids_RJ, gates_RJ, w1_EDF, w3_EDF, w2_EFD, plan, impl)
  back_SD = exchange.back(out_RD)
  y_WKD = jnp.where(sends.first_WK[:, :, None], back_SD[sends.row_WK].astype(jnp.float32), 0)
  return jnp.sum(y_WKD, axis=1)


def _expert_rows(x_RD, ids_RJ, gates_RJ, w1_EDF, w3_EDF, w2_EFD, plan: _Plan, impl: str) -> jax.Array:
  """Sum over each received row's places of gate x Expert(row): the grouped matmul over live tiles only."""
  n_rows, n_places = ids_RJ.shape
  rows = ops.tile_rows(plan.tokens * plan.top_k, plan.experts_per_shard)  # a balanced shard's slots
  layout = moe.tile_layout(ids_RJ.reshape(-1), plan.experts_per_shard, rows=rows)
  x_tiles_RD = x_RD.at[layout.slot_of_row_R // n_places].get(mode="fill", fill_value=0)
  y_tiles_RD = moe.expert_ffn(x_tiles_RD, layout, w1_EDF, w3_EDF, w2_EFD, impl)
  y_RJD = y_tiles_RD[layout.row_of_slot_N].reshape(n_rows, n_places, -1).astype(jnp.float32)
  return jnp.einsum("rj,rjd->rd", gates_RJ, y_RJD).astype(x_RD.dtype)
