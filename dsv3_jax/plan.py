"""Per-device memory of a training run on a mesh, from shapes alone: nothing is allocated, no device needed.

1. Shapes: `jax.eval_shape` of the model init and of the optimizer init (the same functions training runs).
2. Shardings: the logical-axis rules of `sharding.py` on an abstract mesh of the requested sizes; each
   leaf's per-device shape is its global shape divided by the mesh axes of its PartitionSpec. ZeRO-1 is
   evaluated both ways.
3. Pipeline stages (pipe > 1, an estimate until the pipeline exists): the dense-then-MoE layers are cut
   into contiguous stages of ceil(n_layers / pipe) layers; the embedding sits on the first stage, the
   final norm, head and MTP modules on the last.
4. Activations (an estimate): the residuals one decoder layer keeps for its backward pass under the run's
   remat policy, measured by tracing the layer's VJP on one micro-batch (`saved_residuals`), times the
   layers on the stage, times the micro-batches in flight (pipe - stage under a 1F1B-style schedule,
   1 without a pipeline); plus, under remat, one layer's full residuals while it is recomputed; plus the
   head/loss and MTP residuals on the last stage. Tensor parallelism is not modelled (counted unsplit).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax._src import ad_checkpoint  # saved_residuals: the residual list behind jax.ad_checkpoint.print_saved_residuals

from dsv3_jax import block as block_lib
from dsv3_jax import config as config_lib
from dsv3_jax import layers
from dsv3_jax import loss as loss_lib
from dsv3_jax import mla
from dsv3_jax import model as model_lib
from dsv3_jax import mtp as mtp_lib
from dsv3_jax import optimizer as optimizer_lib
from dsv3_jax import sharding

GIB = 2**30
MIB = 2**20
STACKS = ("dense_layers", "moe_layers")


@dataclasses.dataclass(frozen=True)
class Stage:
  index: int
  dense_layers: int
  moe_layers: int
  params: int  # bytes per device
  grads: int
  opt_state: int  # with the run's zero1 setting
  opt_state_other: int  # with the opposite setting
  activations: int  # estimate
  in_flight: int  # micro-batches whose activations the stage holds at its peak

  @property
  def model_state(self) -> int:
    return self.params + self.grads + self.opt_state

  @property
  def total(self) -> int:
    return self.model_state + self.activations


@dataclasses.dataclass(frozen=True)
class Plan:
  sizes: dict[str, int]
  zero1: bool
  remat: str
  microbatch_seqs: int  # sequences per device per micro-batch
  seq_len: int
  n_params: int
  stages: list[Stage]
  per_micro: dict[str, int]  # activation bytes per micro-batch: see `_activations`

  @property
  def n_devices(self) -> int:
    return math.prod(self.sizes.values())

  @property
  def heaviest(self) -> Stage:
    return max(self.stages, key=lambda s: s.total)


def plan(config, n_devices: int | None = None, microbatch_seqs: int | None = None) -> Plan:
  """The memory plan of `config` (a run config: model, mesh, data, optimizer, train.remat).

  n_devices fills a -1 mesh axis; microbatch_seqs is the pipeline micro-batch per device (default 1 with
  pipe > 1; without a pipeline, the run's micro-batch: data.batch_size over the batch axes).
  Raises sharding.MeshError, naming the axis, for a mesh that does not divide the model or the batch.
  """
  cfg = config_lib.ModelConfig(**config.model.to_dict())
  sizes = sharding.mesh_sizes(config.mesh, n_devices)
  n = math.prod(sizes.values())
  sharding.check_mesh(cfg, sizes, config.data.batch_size, n, allow_pipe=True)
  local_seqs = config.data.batch_size // sharding.batch_shards(sizes)
  if microbatch_seqs is None:
    microbatch_seqs = 1 if sizes["pipe"] > 1 else local_seqs
  if microbatch_seqs < 1 or (sizes["pipe"] == 1 and microbatch_seqs != local_seqs):
    raise sharding.MeshError(f"micro-batch of {microbatch_seqs} sequences per device: without a pipeline it is "
                             f"data.batch_size / batch axes = {local_seqs}")
  mesh = sharding.abstract_mesh(sizes)
  boxed = jax.eval_shape(lambda r: model_lib.Transformer(cfg).init(r, jnp.zeros((1, 2), jnp.int32)),
                         jax.random.PRNGKey(0))
  params = nn.unbox(boxed["params"])
  param_sh = sharding.logical_shardings(boxed["params"], mesh)
  opt_abstract = jax.eval_shape(optimizer_lib.make(config.optimizer).init, params)
  stage_layers = _stage_layers(cfg, sizes["pipe"])
  param_bytes = _per_stage(params, param_sh, sizes, stage_layers, cfg)
  opt_bytes = {z: _opt_per_stage(opt_abstract, params, param_sh, mesh, z, stage_layers, cfg) for z in (True, False)}
  n_micro = max(config.data.batch_size * config.train.microbatches // sharding.batch_shards(sizes)
                // microbatch_seqs, 1)
  acts = _activations(cfg, config.train.remat, microbatch_seqs, config.data.seq_len, sizes)
  stages = []
  for s, (n_dense, n_moe) in enumerate(stage_layers):
    in_flight = min(sizes["pipe"] - s, n_micro) if sizes["pipe"] > 1 else 1
    per_micro = n_dense * acts["dense"] + n_moe * acts["moe"] + acts["mask"]
    if s == len(stage_layers) - 1:
      per_micro += acts["head"]
    recompute = 0
    if config.train.remat != "none":  # the layer being recomputed holds its full residuals
      recompute = max(acts["dense_full"] * bool(n_dense), acts["moe_full"] * bool(n_moe))
    stages.append(Stage(s, n_dense, n_moe, int(param_bytes[s]), int(param_bytes[s]),
                        int(opt_bytes[config.mesh.zero1][s]), int(opt_bytes[not config.mesh.zero1][s]),
                        int(in_flight * per_micro + recompute), in_flight))
  n_params = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
  return Plan(sizes, bool(config.mesh.zero1), config.train.remat, microbatch_seqs, config.data.seq_len, n_params,
              stages, acts)


def _stage_layers(cfg, pipe: int) -> list[tuple[int, int]]:
  """(dense, MoE) layers of each stage: contiguous runs of ceil(n_layers / pipe) layers, dense first."""
  per = -(-cfg.n_layers // pipe)
  out = []
  for s in range(pipe):
    lo, hi = min(s * per, cfg.n_layers), min((s + 1) * per, cfg.n_layers)
    dense = max(0, min(hi, cfg.n_dense_layers) - lo)
    out.append((dense, hi - lo - dense))
  return out


def _share(path, cfg, stage_layers) -> np.ndarray:
  """The fraction of a parameter (by its path) that each stage holds."""
  top = path[0].key
  pipe = len(stage_layers)
  if top in STACKS:
    column, total = (0, cfg.n_dense_layers) if top == "dense_layers" else (1, cfg.n_moe_layers)
    return np.array([layers_[column] / total for layers_ in stage_layers])
  share = np.zeros(pipe)
  share[0 if top == "embed" else pipe - 1] = 1.0
  return share


def _per_stage(tree, shardings, sizes, stage_layers, cfg) -> np.ndarray:
  total = np.zeros(len(stage_layers))
  for (path, leaf), sh in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(shardings), strict=True):
    local = math.prod(sharding.shard_shape(leaf.shape, sh.spec, sizes)) * jnp.dtype(leaf.dtype).itemsize
    total += local * _share(path, cfg, stage_layers)
  return total


def _opt_per_stage(opt_state, params, param_sh, mesh, zero1, stage_layers, cfg) -> np.ndarray:
  """Moments split by stage like their parameters; other optimizer leaves (step counts) on every stage."""
  shardings = sharding.optimizer_shardings(opt_state, params, param_sh, mesh, zero1)
  params_def = jax.tree.structure(params)
  sizes = sharding.sizes_of(mesh)
  total = np.zeros(len(stage_layers))
  like_params = lambda node: jax.tree.structure(node) == params_def
  nodes = jax.tree.leaves(opt_state, is_leaf=like_params)
  node_shardings = jax.tree.leaves(shardings, is_leaf=lambda x: like_params(x) or isinstance(x, jax.sharding.Sharding))
  for node, sh in zip(nodes, node_shardings, strict=True):
    if like_params(node):
      total += _per_stage(node, sh, sizes, stage_layers, cfg)
    else:
      total += math.prod(sharding.shard_shape(node.shape, sh.spec, sizes)) * jnp.dtype(node.dtype).itemsize
  return total


def _residual_bytes(fn, *args, weight_parts: dict[tuple[int, ...], int] | None = None) -> int:
  """Bytes `fn` keeps for its backward pass per device, leaving out its non-`x` arguments (parameters are model
  state; the mask is counted once per micro-batch). A residual shaped like a parameter (its compute-dtype
  copy) is split as that parameter is: `weight_parts` maps such shapes to their number of shards."""
  total = 0
  for aval, source in ad_checkpoint.saved_residuals(fn, *args):
    if source.startswith("from the argument") and not source.startswith("from the argument x"):
      continue
    total += math.prod(aval.shape) * aval.dtype.itemsize // (weight_parts or {}).get(tuple(aval.shape), 1)
  return total


def _weight_parts(boxed_params, sizes) -> dict[tuple[int, ...], int]:
  """Parameter shape -> number of shards it is split into on a mesh of `sizes`."""
  parts = {}
  shardings = sharding.logical_shardings(boxed_params, sharding.abstract_mesh(sizes))
  for leaf, sh in zip(jax.tree.leaves(nn.unbox(boxed_params)), jax.tree.leaves(shardings), strict=True):
    parts[tuple(leaf.shape)] = math.prod(leaf.shape) // math.prod(sharding.shard_shape(leaf.shape, sh.spec, sizes))
  return parts


def _activations(cfg, remat: str, batch: int, seq: int, sizes) -> dict[str, int]:
  """Per micro-batch: residual bytes of one dense and one MoE layer (under `remat` and without), the head/loss
  and MTP residuals of the last stage, and the attention mask every layer shares."""
  x = jax.ShapeDtypeStruct((batch, seq, cfg.dim), cfg.compute_dtype)
  positions = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  # The training path's causal mask: long sequences take blockwise attention, which keeps no [S, S] residual.
  mask = mla.CausalMask(jax.ShapeDtypeStruct((batch, seq, seq), jnp.bool_))
  out = {"mask": batch * seq * seq}
  policy = block_lib.REMAT_POLICIES[remat]
  for name, moe in (("dense", False), ("moe", True)):
    block = block_lib.Block(cfg, moe=moe)
    boxed = jax.eval_shape(block.init, jax.random.PRNGKey(0), x, None, positions, mask)
    variables = nn.unbox(boxed)
    parts = _weight_parts(boxed["params"], sizes)

    def layer(params, x, positions, mask, block=block):
      y, (stats, _) = block.apply(params, x, None, positions, mask)
      return jnp.sum(y.astype(jnp.float32)) + sum(jnp.sum(v) for v in jax.tree.leaves(stats))

    full = _residual_bytes(layer, variables, x, positions, mask, weight_parts=parts)
    out[f"{name}_full"] = full
    out[name] = full if policy is None else _residual_bytes(jax.checkpoint(layer, policy=policy), variables, x,
                                                            positions, mask, weight_parts=parts)
  out["head"] = _head_bytes(cfg, x, positions, mask, sizes)
  return out


def _head_bytes(cfg, x, positions, mask, sizes) -> int:
  """Residuals of final norm + head + cross-entropy, and of each MTP depth with its own head + loss."""
  targets = jax.ShapeDtypeStruct(x.shape[:2], jnp.int32)
  norm = layers.RMSNorm(cfg, cfg.dim)
  norm_vars = jax.eval_shape(norm.init, jax.random.PRNGKey(0), x)
  head = jax.ShapeDtypeStruct((cfg.dim, cfg.vocab_size), cfg.weight_dtype)

  def head_loss(params, x, targets):
    logits = layers.head_logits(norm.apply(params["norm"], x), params["head"])
    return jnp.sum(loss_lib.token_cross_entropy(logits, targets))

  total = _residual_bytes(head_loss, {"norm": norm_vars, "head": head}, x, targets)
  if cfg.n_mtp_layers:
    module = mtp_lib.MTPModule(cfg)
    boxed = jax.eval_shape(module.init, jax.random.PRNGKey(0), x, x, positions, mask)
    variables = nn.unbox(boxed)

    def mtp_loss(params, x, positions, mask, targets):
      h = module.apply(params["mtp"], x, x, positions, mask)[0]
      return jnp.sum(loss_lib.token_cross_entropy(layers.head_logits(h, params["head"]), targets))

    total += cfg.n_mtp_layers * _residual_bytes(mtp_loss, {"mtp": variables, "head": head}, x, positions, mask,
                                                targets, weight_parts=_weight_parts(boxed["params"], sizes))
  return total


def format_plan(p: Plan, hbm_gib: float) -> str:
  """The report experiments.plan prints."""
  s, a = p.heaviest, p.per_micro
  pipe = p.sizes["pipe"]
  lines = [
      f"mesh {sharding.describe(p.sizes)} = {p.n_devices} devices; ZeRO-1 {'on' if p.zero1 else 'off'}; "
      f"{p.n_params:,} parameters",
      f"micro-batch {p.microbatch_seqs} x {p.seq_len} tokens per device, remat '{p.remat}'"
      + (f"; {pipe} stages of up to {max(a.dense_layers + a.moe_layers for a in p.stages)} layers (estimate)"
         if pipe > 1 else ""),
      f"per device, heaviest stage ({s.index} of {pipe}: {s.dense_layers} dense + {s.moe_layers} MoE layers"
      f"{', embedding' if s.index == 0 else ''}{', head + MTP' if s.index == pipe - 1 else ''}):",
      f"  parameters        {s.params / GIB:9.2f} GiB",
      f"  gradients         {s.grads / GIB:9.2f} GiB",
      f"  optimizer state   {s.opt_state / GIB:9.2f} GiB   ({s.opt_state_other / GIB:.2f} GiB with ZeRO-1 "
      f"{'off' if p.zero1 else 'on'})",
      f"  activations      ~{s.activations / GIB:9.2f} GiB   (estimate; {s.in_flight} micro-batch(es) in flight)",
      f"  total            ~{s.total / GIB:9.2f} GiB   of {hbm_gib:g} GiB",
      f"activations per micro-batch: a dense layer keeps {a['dense'] / MIB:,.0f} MiB ({a['dense_full'] / MIB:,.0f} MiB "
      f"while recomputed), an MoE layer {a['moe'] / MIB:,.0f} MiB ({a['moe_full'] / MIB:,.0f} MiB), head + loss + MTP "
      f"{a['head'] / MIB:,.0f} MiB",
  ]
  if pipe > 1:
    lines.append("stage  layers(dense+moe)  params  grads  opt    act~   total~  (GiB per device)")
    for st in p.stages:
      lines.append(f"{st.index:5d}  {st.dense_layers:5d} + {st.moe_layers:<9d} {st.params / GIB:6.2f} "
                   f"{st.grads / GIB:6.2f} {st.opt_state / GIB:6.2f} {st.activations / GIB:6.2f} {st.total / GIB:7.2f}")
  return "\n".join(lines)


def verdict(p: Plan, hbm_gib: float) -> tuple[bool, str]:
  """(fits, reason): parameters + gradients + optimizer state must fit; activations only warn (estimate)."""
  budget = hbm_gib * GIB
  worst = max(p.stages, key=lambda s: s.model_state)
  if worst.model_state > budget:
    return False, (f"rejected: stage {worst.index} needs {worst.model_state / GIB:.1f} GiB per device for parameters, "
                   f"gradients and optimizer state alone, over the {hbm_gib:g} GiB budget")
  if p.heaviest.total > budget:
    return True, (f"warning: with the activation estimate stage {p.heaviest.index} reaches "
                  f"{p.heaviest.total / GIB:.1f} GiB, over {hbm_gib:g} GiB (more remat or smaller micro-batches)")
  return True, f"fits: at most {p.heaviest.total / GIB:.1f} GiB of {hbm_gib:g} GiB per device (estimate)"


def summary(p: Plan) -> dict[str, Any]:
  """The heaviest stage's figures in bytes, for tests and scripts."""
  s = p.heaviest
  return {"devices": p.n_devices, "stage": s.index, "params": s.params, "grads": s.grads, "opt_state": s.opt_state,
          "opt_state_other": s.opt_state_other, "activations": s.activations, "total": s.total}
