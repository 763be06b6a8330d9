"""DeepSeek-V3 cut into pipeline stages, and the pipelined gradient of one training step.

Stage rule: the n_moe_layers = n_layers - n_dense_layers MoE layers split evenly over the schedule's stages
(n_ranks stages for 1f1b, zb1p and dualpipe, 2 n_ranks for dualpipev). Around them:

  first stage   prologue: embedding + the n_dense_layers dense layers, then its MoE layers
  middle        its MoE layers
  last stage    its MoE layers, then the epilogue: final norm + head + the MTP depths + the objective

The embedding, dense layers, norm, head and MTP modules ("shared" parameters) stay replicated over the pipe
axis: only the ranks holding the first or last stage use them (for DualPipe both are ranks {0, PP-1}), and
their gradients are summed over the pipe axis at the end. That costs their memory on every rank.

Parameters per rank: the MoE stack [L, ...] is viewed as [n_stages, L / n_stages, ...] and gathered into
[n_ranks, n_chunks, L / n_stages, ...] by `Schedule.stage(rank, chunk)` (DualPipe: chunk 1 is a second copy
of stage PP-1-r; DualPipeV: chunk 1 is stage 2R-1-r). Gradients are scattered back with a sum, so both copies
of a DualPipe stage add up, and the optimizer, checkpoints and metrics see the ordinary parameter tree.

Inside the executor's `shard_map` every mesh axis is manual: each device holds its own rows of the batch and
the whole parameters except the routed experts, which stay split over the expert axis (the expert all-to-all,
`expert_parallel.dispatch`, runs per device inside a stage). So that the per-device objectives add up to the
step's objective, each device's cross-entropy is its sum over its tokens divided by the micro-batch's global
token count, and its sequence-balance means are divided by the number of batch shards; gradients are then
summed over the batch axes (params are cast varying first, so no reduction happens inside the tick loop).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from dsv3_jax import block as block_lib
from dsv3_jax import config as config_lib
from dsv3_jax import layers
from dsv3_jax import loss as loss_lib
from dsv3_jax import mla
from dsv3_jax import mtp as mtp_lib
from dsv3_jax import sharding
from dsv3_jax.pipeline import executor
from dsv3_jax.pipeline import lockstep as lockstep_lib
from dsv3_jax.pipeline import schedules

STACK = "moe_layers"  # the parameter subtree cut into stages


class StageError(ValueError):
  """A model or mesh that cannot be cut into the schedule's stages; the message names the config keys."""


def check_stages(cfg: config_lib.ModelConfig, n_stages: int, schedule_name: str) -> None:
  """Raises unless the MoE layers split evenly into `n_stages` stages."""
  n_moe = cfg.n_moe_layers
  if n_moe == 0 or n_moe % n_stages:
    raise StageError(f"model.n_layers - model.n_dense_layers = {cfg.n_layers} - {cfg.n_dense_layers} = {n_moe} MoE "
                     f"layers do not split evenly into the {n_stages} stages of {schedule_name} (mesh.pipe = "
                     f"{n_stages // 2 if schedule_name == 'dualpipev' else n_stages}): the number of MoE layers "
                     f"must be a positive multiple of the number of stages (the dense layers join the first stage)")


def stage_index(schedule: schedules.Schedule) -> np.ndarray:
  """[n_ranks, n_chunks] model stage of each rank's chunk."""
  return np.array([[schedule.stage(r, c) for c in range(schedule.n_chunks)] for r in range(schedule.n_ranks)])


def to_chunks(tree_L: Any, schedule: schedules.Schedule) -> Any:
  """Leaves [L, ...] -> [n_ranks, n_chunks, L / n_stages, ...] (a stage held twice is copied)."""
  index = stage_index(schedule)
  return jax.tree.map(lambda a: a.reshape(schedule.n_stages, -1, *a.shape[1:])[index], tree_L)


def from_chunks(tree_RC: Any, schedule: schedules.Schedule) -> Any:
  """Leaves [n_ranks, n_chunks, L / n_stages, ...] -> [L, ...], the copies of a stage summed."""
  index = stage_index(schedule).reshape(-1)

  def one(a):
    flat = a.reshape(-1, *a.shape[2:])
    stages = jnp.zeros((schedule.n_stages, *flat.shape[1:]), a.dtype).at[index].add(flat)
    return stages.reshape(-1, *flat.shape[2:])

  return jax.tree.map(one, tree_RC)


# --------------------------------------------------------------------------------------------------------------------
# The model's pieces (parameter names as in model.Transformer, so they apply to slices of its tree)
# --------------------------------------------------------------------------------------------------------------------


class Prologue(nn.Module):
  """Embedding, then the dense layers."""

  cfg: config_lib.ModelConfig
  impl: str = "xla"
  remat: str = "none"
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, tokens_BS, positions_BS, mask_BST):
    c = self.cfg
    x_BSD = layers.Embed(c, name="embed")(tokens_BS)
    if c.n_dense_layers:
      dense = block_lib.stack(c, moe=False, length=c.n_dense_layers, impl=self.impl, remat=self.remat,
                              name="dense_layers", attention_impl=self.attention_impl)
      x_BSD, _ = dense(x_BSD, None, positions_BS, mask_BST)
    return x_BSD


class StageLayers(nn.Module):
  """One stage's MoE layers; returns (hidden, {expert_load [l, E], seq_balance [l]})."""

  cfg: config_lib.ModelConfig
  length: int
  impl: str = "xla"
  remat: str = "none"
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x_BSD, positions_BS, mask_BST):
    stack = block_lib.stack(self.cfg, moe=True, length=self.length, impl=self.impl, remat=self.remat, name=STACK,
                            attention_impl=self.attention_impl)
    x_BSD, (stats, _) = stack(x_BSD, None, positions_BS, mask_BST)
    return x_BSD, stats


class Epilogue(nn.Module):
  """Final norm and head, then the MTP depths; returns (logits, MTP logits or None, MTP statistics)."""

  cfg: config_lib.ModelConfig
  impl: str = "xla"
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, tokens_BS, h_BSD, positions_BS, mask_BST):
    c = self.cfg
    h_BSD = layers.RMSNorm(c, c.dim, name="norm")(h_BSD)
    head = self.param("head", nn.initializers.zeros, (c.dim, c.vocab_size), c.weight_dtype)  # apply only
    logits = layers.head_logits(h_BSD, head)
    embed = layers.Embed(c, name="embed")
    mtp_logits, balance, loads = [], [], []
    for depth in range(1, c.n_mtp_layers + 1):
      emb_BSD = embed(mtp_lib.shifted_tokens(tokens_BS, depth))
      h_BSD, stats, _ = mtp_lib.MTPModule(c, impl=self.impl, attention_impl=self.attention_impl,
                                           name=f"mtp_{depth - 1}")(emb_BSD, h_BSD, positions_BS, mask_BST)
      mtp_logits.append(layers.head_logits(h_BSD, head))
      balance.append(stats["seq_balance"])
      loads.append(stats["expert_load"])
    if not mtp_logits:
      return logits, None, jnp.zeros((0,)), jnp.zeros((0, c.n_routed_experts))
    return logits, jnp.stack(mtp_logits), jnp.stack(balance), jnp.stack(loads)


# --------------------------------------------------------------------------------------------------------------------
# The chunk function the executor runs
# --------------------------------------------------------------------------------------------------------------------


def _attention_inputs(batch, config):
  tokens_BS = batch["inputs"]
  positions_BS = jnp.broadcast_to(jnp.arange(tokens_BS.shape[1]), tokens_BS.shape)
  mask_BST = positions_BS[:, None, :] <= positions_BS[:, :, None]
  if not config.data.attend_across_documents:
    mask_BST = mask_BST & (batch["segment_ids"][:, None, :] == batch["segment_ids"][:, :, None])
  return tokens_BS, positions_BS, mla.CausalMask(mask_BST)


def _objective(logits, mtp_logits, batch, counts, config):
  """This device's share of one micro-batch's CE and MTP means (global token counts in `counts`)."""
  mask = batch["loss_mask"].astype(jnp.float32)
  ce = jnp.sum(loss_lib.token_cross_entropy(logits, batch["targets"]) * mask) / jnp.maximum(counts[0], 1.0)
  if mtp_logits is None:
    return ce, jnp.zeros((), jnp.float32), jnp.sum(mask)
  segments = None if config.data.cross_document_loss else batch["segment_ids"]
  mtp = []
  for k in range(mtp_logits.shape[0]):
    targets, mtp_mask = loss_lib.mtp_targets(batch["targets"], mask, segments, k + 1)
    mtp_ce = jnp.sum(loss_lib.token_cross_entropy(mtp_logits[k], targets) * mtp_mask)
    mtp.append(mtp_ce / jnp.maximum(counts[k + 1], 1.0))
  return ce, jnp.mean(jnp.stack(mtp)), jnp.sum(mask)


def _chunk_fn(p_chunk, p_shared, r_chunk, consts, x_BSD, mb, first, last, *, cfg, config, length, n_shards, axes):
  """((stage output, objective share), aux) of one chunk on one micro-batch; see the module docstring."""
  impl, remat, attention = config.train.impl, config.train.remat, config.train.attention_impl
  batch = jax.tree.map(lambda a: a[mb], consts["batch"])
  tokens_BS, positions_BS, mask_BST = _attention_inputs(batch, config)
  shared = {"params": p_shared, "routing": consts["routing"]}
  prologue = Prologue(cfg, impl, remat, attention)
  x_BSD = jax.lax.cond(
      first, lambda: executor.vary(prologue.apply(shared, tokens_BS, positions_BS, mask_BST), axes), lambda: x_BSD)
  y_BSD, stats = StageLayers(cfg, length, impl, remat, attention).apply(
      {"params": {STACK: p_chunk}, "routing": {STACK: r_chunk}}, x_BSD, positions_BS, mask_BST)
  balance = jnp.sum(stats["seq_balance"]) / n_shards

  def tail():
    logits, mtp_logits, mtp_balance, mtp_load = Epilogue(cfg, impl, attention).apply(shared, tokens_BS, y_BSD,
                                                                                      positions_BS, mask_BST)
    ce, mtp, tokens = _objective(logits, mtp_logits, batch, consts["counts"][mb], config)
    parts = {"ce": ce, "mtp": mtp, "balance": jnp.sum(mtp_balance) / n_shards, "tokens": tokens}
    return executor.vary((parts, mtp_load), axes)

  def no_tail():
    zero = jnp.zeros((), jnp.float32)
    return executor.vary(({"ce": zero, "mtp": zero, "balance": zero, "tokens": zero},
                          jnp.zeros((cfg.n_mtp_layers, cfg.n_routed_experts))), axes)

  parts, mtp_load = jax.lax.cond(last, tail, no_tail)
  parts["balance"] = balance + parts["balance"]
  objective = parts["ce"] + consts["mtp_lambda"] * parts["mtp"] + config.loss.balance_alpha * parts["balance"]
  aux = {**parts, "expert_load": stats["expert_load"], "mtp_load": mtp_load}
  return (y_BSD, objective), aux


# --------------------------------------------------------------------------------------------------------------------
# The pipelined gradient of one step
# --------------------------------------------------------------------------------------------------------------------


def plan(cfg: config_lib.ModelConfig, schedule_name: str, n_ranks: int, n_microbatches: int):
  """(schedule, executor table) for these sizes; raises ValueError (schedule rules) or StageError."""
  schedule = schedules.generate(schedule_name, n_ranks, n_microbatches)
  check_stages(cfg, schedule.n_stages, schedule_name)
  return schedule, executor.compile_table(lockstep_lib.lockstep(schedule))


def gradients(params, routing, batch, mtp_lambda, *, cfg, config) -> tuple[Any, dict, jax.Array]:
  """(mean gradients over the micro-batches, loss parts averaged as in train.train_step, expert loads [L+MTP, E]).

  Runs under the context mesh (its pipe axis is the pipeline); batch leaves are [micro-batches, B, S].
  """
  mesh = jax.sharding.get_abstract_mesh()
  n_micro = batch["inputs"].shape[0]
  schedule, table = plan(cfg, config.pipeline.schedule, mesh.shape[sharding.PIPE_AXIS], n_micro)
  length = cfg.n_moe_layers // schedule.n_stages
  batch_axes = tuple(a for a in sharding.BATCH_AXES if a in mesh.axis_names)
  n_shards = math.prod(mesh.shape[a] for a in batch_axes)
  chunk_p, chunk_r = to_chunks(params[STACK], schedule), to_chunks(routing[STACK], schedule)
  shared_p = {k: v for k, v in params.items() if k != STACK}
  shared_r = {k: v for k, v in routing.items() if k != STACK}
  loss_batch = dict(batch)
  if config.data.cross_document_loss:
    loss_batch.pop("segment_ids")
  counts = _token_counts(loss_batch, cfg)
  fn = functools.partial(_chunk_fn, cfg=cfg, config=config, length=length, n_shards=n_shards)
  run = functools.partial(_per_device, table=table, fn=fn, cfg=cfg,
                          mesh_axes=tuple(mesh.axis_names), n_micro=n_micro)
  chunk_specs = jax.tree_util.tree_map_with_path(lambda path, _: _chunk_spec(path), chunk_p)
  shared_specs = jax.tree_util.tree_map_with_path(lambda path, _: _shared_spec(path), shared_p)
  batch_spec = P(None, sharding.BATCH_AXES)
  g_chunk, g_shared, aux = jax.shard_map(
      run, mesh=mesh, in_specs=(chunk_specs, P(sharding.PIPE_AXIS), shared_specs, P(), batch_spec, P(), P()),
      out_specs=(chunk_specs, shared_specs, P(sharding.PIPE_AXIS)),
  )(chunk_p, chunk_r, shared_p, shared_r, batch, counts, jnp.asarray(mtp_lambda, jnp.float32))
  grads = {**g_shared, STACK: from_chunks(g_chunk, schedule)}
  parts, loads = _summaries(aux, schedule, n_micro)
  parts["loss"] = (parts["ce"] + mtp_lambda * parts.get("mtp", 0.0) + config.loss.balance_alpha * parts["balance"])
  return {k: grads[k] for k in params}, parts, loads


def _chunk_spec(path) -> P:
  """Rank-chunk leaves [R, C, l, ...]: split over pipe; routed expert weights [.., E, ...] also over experts."""
  if _is_expert_weight(path):
    return P(sharding.PIPE_AXIS, None, None, sharding.EXPERT_AXIS)
  return P(sharding.PIPE_AXIS)


def _shared_spec(path) -> P:
  """Shared leaves: whole on every device, but for the MTP layers' routed expert weights [E, ...]."""
  return P(sharding.EXPERT_AXIS) if _is_expert_weight(path) else P()


def _is_expert_weight(path) -> bool:
  return "experts" in [getattr(k, "key", None) for k in path]


def _token_counts(loss_batch, cfg) -> jax.Array:
  """[micro-batches, 1 + n_mtp]: the global number of loss tokens of the CE and of each MTP depth."""
  mask = loss_batch["loss_mask"].astype(jnp.float32)
  segments = loss_batch.get("segment_ids")
  counts = [jnp.sum(mask, axis=(1, 2))]

  def mtp_count(targets, mask, segments, depth):
    return jnp.sum(loss_lib.mtp_targets(targets, mask, segments, depth)[1])

  for depth in range(1, cfg.n_mtp_layers + 1):
    count = jax.vmap(functools.partial(mtp_count, depth=depth), in_axes=(0, 0, None if segments is None else 0))
    counts.append(count(loss_batch["targets"], mask, segments))
  return jnp.stack(counts, axis=1)


def _per_device(chunk_p, chunk_r, shared_p, shared_r, batch, counts, mtp_lambda, *, table, fn, cfg,
                mesh_axes, n_micro):
  """One device's part: run the table, then sum each gradient over the axes its parameter is not split on."""
  chunk_p, chunk_r = jax.tree.map(lambda a: a[0], (chunk_p, chunk_r))
  consts = {"batch": batch, "counts": counts, "routing": shared_r, "mtp_lambda": mtp_lambda}
  act = jax.ShapeDtypeStruct((batch["inputs"].shape[1], batch["inputs"].shape[2], cfg.dim), cfg.compute_dtype)
  zero = jnp.zeros((), jnp.float32)
  length = jax.tree.leaves(chunk_p)[0].shape[1]
  aux_like = {"ce": zero, "mtp": zero, "balance": zero, "tokens": zero,
              "expert_load": jnp.zeros((length, cfg.n_routed_experts)),
              "mtp_load": jnp.zeros((cfg.n_mtp_layers, cfg.n_routed_experts))}
  g_chunk, g_shared, aux = executor.execute(table, functools.partial(fn, axes=mesh_axes), chunk_p, shared_p, chunk_r,
                                            consts, act, executor.vary(aux_like, mesh_axes), 1.0 / n_micro,
                                            axis=sharding.PIPE_AXIS, manual_axes=mesh_axes)
  chunk_specs = jax.tree_util.tree_map_with_path(lambda path, _: _chunk_spec(path), g_chunk)
  g_chunk = jax.tree.map(lambda g, s: jax.lax.psum(g, _reduced(s, mesh_axes))[None], g_chunk, chunk_specs)
  shared_specs = jax.tree_util.tree_map_with_path(lambda path, _: _shared_spec(path), g_shared)
  g_shared = jax.tree.map(lambda g, s: jax.lax.psum(g, _reduced(s, mesh_axes)), g_shared, shared_specs)
  aux = jax.lax.psum(aux, tuple(a for a in mesh_axes if a != sharding.PIPE_AXIS))
  return g_chunk, g_shared, jax.tree.map(lambda a: a[None], aux)


def _reduced(spec: P, mesh_axes) -> tuple[str, ...]:
  """The mesh axes a gradient is summed over: those its leaf is not split on (so pipe for the shared leaves,
  which every rank holds whole, and not for the chunk leaves, whose pipe index is their rank)."""
  split = {a for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry)}
  return tuple(a for a in mesh_axes if a not in split)


def _summaries(aux, schedule, n_micro):
  """Loss parts averaged over micro-batches (tokens summed) and expert loads [n_moe + n_mtp, E]."""
  ce, mtp, balance = (jnp.sum(aux[k]) / n_micro for k in ("ce", "mtp", "balance"))
  parts = {"ce": ce, "balance": balance, "tokens": jnp.sum(aux["tokens"])}
  if aux["mtp_load"].shape[-2]:
    parts["mtp"] = mtp
  loads = from_chunks(aux["expert_load"], schedule)
  mtp_load = jnp.sum(aux["mtp_load"], axis=(0, 1))
  return parts, jnp.concatenate([loads, mtp_load])
