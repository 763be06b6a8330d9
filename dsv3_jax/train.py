"""Training: a pure, jitted `train_step(state, batch, hparams) -> (state, metrics)` and a thin host loop.

One step (paper §2.1.2, §2.2, §4.2):
1. For each micro-batch: forward, loss = CE + lambda * MTP + alpha * balance, gradients (fp32).
2. Average the gradients, sum the expert loads over the micro-batches (and, under a mesh, over all
   devices: the loads are global-batch sums).
3. Clip, AdamW, weight decay (masked); move the routing biases by gamma toward balance.
4. If the loss or the gradient norm is not finite, keep the old parameters, optimizer state and
   biases, and count the skip; the host aborts after train.max_nonfinite_steps in a row.

Under a mesh (`config.mesh`, dsv3_jax/sharding.py) the same step is jitted with explicit state and
batch shardings and the state donated; state shardings come from `jax.eval_shape` of the init, so
nothing is allocated before it is placed. Steps trace inside the mesh context and the logical-axis
rules (expert parallelism keys off the context mesh). With a pipe axis > 1 the step's gradients come
from the pipeline executor (config.pipeline; dsv3_jax/pipeline/stages.py); the rest of the step is the
same. Every host assembles only its block of each global batch; metrics come back replicated, and only
process 0 writes or prints them.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsv3_jax import balance
from dsv3_jax import checkpoint
from dsv3_jax import config as config_lib
from dsv3_jax import data
from dsv3_jax import generate
from dsv3_jax import host
from dsv3_jax import loss as loss_lib
from dsv3_jax import metrics as metrics_lib
from dsv3_jax import mla
from dsv3_jax import model as model_lib
from dsv3_jax import moe as moe_lib
from dsv3_jax import optimizer as optimizer_lib
from dsv3_jax import sharding
from dsv3_jax.pipeline import schedules
from dsv3_jax.pipeline import stages


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array  # optimizer steps taken (skipped steps count: they consumed data)
  params: Any
  opt_state: Any
  routing: Any  # the MoE correction biases: state, not parameters
  rng: jax.Array
  nonfinite: jax.Array  # consecutive skipped steps


class ConfigValueError(ValueError):
  """A run-config value that cannot work; the message names the key."""


def model_config(config: ml_collections.ConfigDict, vocab_needed: int) -> config_lib.ModelConfig:
  """The ModelConfig of config.model, with the precision recipe of config.precision."""
  for key, allowed in (("recipe", config_lib.PRECISION_RECIPES), ("impl", config_lib.FP8_IMPLS)):
    if config.precision[key] not in allowed:
      raise ConfigValueError(f"config.precision.{key} = {config.precision[key]!r}: must be one of {allowed}")
  if config.train.impl not in moe_lib.EXPERT_IMPLS:
    raise ConfigValueError(f"config.train.impl = {config.train.impl!r}: must be one of {moe_lib.EXPERT_IMPLS}")
  if config.train.attention_impl not in mla.ATTENTION_IMPLS:
    raise ConfigValueError(f"config.train.attention_impl = {config.train.attention_impl!r}: must be one of "
                           f"{mla.ATTENTION_IMPLS}")
  if config.train.get("optimizer_impl", "auto") not in optimizer_lib.IMPLS:
    raise ConfigValueError(f"config.train.optimizer_impl = {config.train.optimizer_impl!r}: must be one of "
                           f"{optimizer_lib.IMPLS}")
  try:
    cfg = config_lib.ModelConfig(**config.model.to_dict(), precision=config.precision.recipe,
                                 fp8_impl=config.precision.impl)
  except config_lib.ConfigError as e:
    raise ConfigValueError(f"config.model: {e}") from e
  if cfg.vocab_size < vocab_needed:
    raise ConfigValueError(f"config.model.vocab_size = {cfg.vocab_size} is smaller than the tokenizer's "
                           f"vocabulary ({vocab_needed})")
  return cfg


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks values before anything is loaded or compiled; errors name the key."""
  checks = [
      ("train.steps", config.train.steps > 0, "must be positive"),
      ("train.microbatches", config.train.microbatches > 0, "must be positive"),
      ("train.warmup_microbatches", 0 <= config.train.warmup_microbatches <= config.train.microbatches,
       "must be in [0, train.microbatches]"),
      ("data.batch_size", config.data.batch_size > 0, "must be positive"),
      ("data.seq_len", config.data.seq_len > 0, "must be positive"),
      ("data.heldout_fraction", 0 < config.data.heldout_fraction < 1, "must be in (0, 1)"),
      ("optimizer.lr", config.optimizer.lr > 0, "must be positive"),
      ("optimizer.warmup_steps", config.optimizer.warmup_steps >= 0, "must be >= 0"),
      ("optimizer.grad_clip", config.optimizer.grad_clip > 0, "must be positive"),
      ("balance.gamma", config.balance.gamma >= 0, "must be >= 0"),
      ("train.log_every", config.train.log_every > 0, "must be positive"),
      ("train.eval_batches", config.train.eval_batches > 0, "must be positive"),
      ("train.checkpoint_every", config.train.checkpoint_every >= 0, "must be >= 0"),
      ("train.keep_checkpoints", config.train.keep_checkpoints > 0, "must be positive"),
  ]
  for key, ok, why in checks:
    if not ok:
      node = config
      for part in key.split("."):
        node = node[part]
      raise ConfigValueError(f"config.{key} = {node!r}: {why}")


def set_cpu_devices(config: ml_collections.ConfigDict, spec: str = "auto", multi_process: bool = False) -> int:
  """Splits this host's CPU into XLA devices for the run (`host.set_cpu_devices`) before any backend exists.

  'auto' gives one device per core, as many as divide config.data.batch_size, when the run is one process on
  the default mesh (every device on `data`); a mesh the config pins, or a multi-process job, keeps the devices
  it planned for.
  """
  m = config.mesh
  default_mesh = m.data == -1 and all(m[axis] == 1 for axis in sharding.MESH_AXES if axis != "data")
  return host.set_cpu_devices(spec, config.data.batch_size, may_split=default_mesh and not multi_process)


def _loss_fn(params, routing, batch, mtp_lambda, *, cfg, config):
  model = model_lib.Transformer(cfg, impl=config.train.impl, attention_impl=config.train.attention_impl,
                                remat=config.train.remat, unroll=True)
  segments = None if config.data.attend_across_documents else batch["segment_ids"]
  out = model.apply({"params": params, "routing": routing}, batch["inputs"], segment_ids_BS=segments)
  loss_batch = dict(batch)
  if config.data.cross_document_loss:
    loss_batch.pop("segment_ids")
  loss, parts = loss_lib.objective(out, loss_batch, mtp_lambda, config.loss.balance_alpha)
  return loss, (parts, out.stats["expert_load"])


def pipe_ranks() -> int:
  """Size of the context mesh's pipe axis (1 without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else dict(mesh.shape).get(sharding.PIPE_AXIS, 1)


def check_pipeline(config: ml_collections.ConfigDict, cfg: config_lib.ModelConfig, n_ranks: int) -> None:
  """With n_ranks > 1 pipeline ranks: the schedule exists, its micro-batch rule holds, the layers split into stages."""
  if n_ranks == 1:
    return
  p = config.pipeline
  if p.schedule not in schedules.NAMES:
    raise ConfigValueError(f"config.pipeline.schedule = {p.schedule!r}: must be one of {schedules.NAMES}")
  if config.train.warmup_microbatches:
    raise ConfigValueError(f"config.train.warmup_microbatches = {config.train.warmup_microbatches}: batch-size "
                           "warm-up is not available with mesh.pipe > 1 (a step runs config.pipeline.microbatches)")
  try:
    stages.plan(cfg, p.schedule, n_ranks, p.microbatches)
  except stages.StageError as e:
    raise ConfigValueError(f"config.model / config.mesh.pipe: {e}") from e
  except ValueError as e:
    raise ConfigValueError(f"config.pipeline.microbatches = {p.microbatches} (config.pipeline.schedule = "
                           f"{p.schedule!r}, mesh.pipe = {n_ranks}): {e}") from e


def gradients(state: TrainState, batch: dict, hparams: dict, *, cfg, config) -> tuple[Any, dict, jax.Array]:
  """(gradients, loss parts, expert loads [L, E]) of one step: means over the micro-batches (loads and token
  counts summed); pipelined (dsv3_jax/pipeline/stages.py) when the context mesh has a pipe axis > 1."""
  if pipe_ranks() > 1:
    return stages.gradients(state.params, state.routing, batch, hparams["mtp_lambda"], cfg=cfg, config=config)
  grad_fn = jax.value_and_grad(functools.partial(_loss_fn, cfg=cfg, config=config), has_aux=True)

  def micro(acc, mb):
    (_, aux), grads = grad_fn(state.params, state.routing, mb, hparams["mtp_lambda"])
    return jax.tree.map(jnp.add, acc, (grads, aux)), None

  first = jax.tree.map(lambda a: a[0], batch)
  if batch["inputs"].shape[0] == 1:  # no accumulator to zero-fill and add into
    (_, (parts, load_LE)), grads = grad_fn(state.params, state.routing, first, hparams["mtp_lambda"])
    return grads, parts, load_LE
  shapes = jax.eval_shape(lambda: grad_fn(state.params, state.routing, first, hparams["mtp_lambda"]))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[1], shapes[0][1]))
  (grads, (parts, load_LE)), _ = jax.lax.scan(micro, zeros, batch)
  n_micro = batch["inputs"].shape[0]
  grads = jax.tree.map(lambda g: g / n_micro, grads)
  parts = {k: v if k == "tokens" else v / n_micro for k, v in parts.items()}
  return grads, parts, load_LE


def train_step(state: TrainState, batch: dict, hparams: dict, *, cfg, config, tx,
               moment_specs=None) -> tuple[TrainState, dict]:
  """One optimizer step over batch leaves of shape [micro-batches, B, S]. moment_specs: the PartitionSpecs of the
  Adam moments (`optimizer.update`)."""
  grads, parts, load_LE = gradients(state, batch, hparams, cfg=cfg, config=config)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(parts["loss"]) & jnp.isfinite(grad_norm)

  def update(_):
    params, opt_state = optimizer_lib.update(tx, config.optimizer, grads, state.opt_state, state.params,
                                             impl=config.train.get("optimizer_impl", "auto"), specs=moment_specs,
                                             grad_norm=grad_norm)
    return params, opt_state, balance.update_bias(state.routing, load_LE, hparams["gamma"], cfg)

  # A branch, not a select over the updated and old trees: a normal step writes the new state once instead of
  # also passing over every parameter and both moments to pick between them.
  params, opt_state, routing = jax.lax.cond(finite, update, lambda _: (state.params, state.opt_state, state.routing),
                                            None)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, routing=routing,
                            nonfinite=jnp.where(finite, 0, state.nonfinite + 1))
  lr = optimizer_lib.learning_rate(config.optimizer)(state.step)
  return new_state, {**parts, "grad_norm": grad_norm, "lr": lr, "finite": finite, "nonfinite": new_state.nonfinite,
                     "expert_load": load_LE}


def eval_step(params, routing, batch, *, cfg, config) -> dict:
  _, (parts, _) = _loss_fn(params, routing, batch, 0.0, cfg=cfg, config=config)
  return {"ce": parts["ce"] * parts["tokens"], "mtp": parts.get("mtp", 0.0) * parts["tokens"],
          "tokens": parts["tokens"]}


def _init_fn(cfg, config, tx):
  def init():
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    variables = model_lib.init(cfg, init_rng, impl=config.train.impl)
    params = variables["params"]
    return TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params),
                      routing=variables.get("routing", {}), rng=state_rng, nonfinite=jnp.zeros([], jnp.int32))

  return init


def init_state(cfg, config, tx, shardings: TrainState | None = None) -> TrainState:
  """The initial state, created directly in `shardings` (see `state_shardings`) when given.

  The init traces outside the mesh context on purpose: its forward pass only creates variables (XLA drops
  the rest), so no activation constraint or expert-parallel dispatch has to cope with its dummy input.
  """
  return jax.jit(_init_fn(cfg, config, tx), out_shardings=shardings)()


def state_shardings(cfg, config, tx, mesh) -> tuple[TrainState, TrainState]:
  """(abstract state, its shardings on `mesh`) from `jax.eval_shape` of the init: nothing is allocated.

  Parameters follow their logical axes, optimizer moments their parameters (ZeRO-1 splits them further
  when config.mesh.zero1), routing biases and scalars are replicated.
  """
  model = model_lib.Transformer(cfg, impl=config.train.impl)
  boxed = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 2), jnp.int32)), jax.random.PRNGKey(0))
  abstract = jax.eval_shape(_init_fn(cfg, config, tx))
  params = sharding.logical_shardings(boxed["params"], mesh)
  routing = sharding.logical_shardings(boxed.get("routing", {}), mesh)
  opt_state = sharding.optimizer_shardings(abstract.opt_state, nn.unbox(boxed["params"]), params, mesh,
                                           config.mesh.zero1)
  replicated = NamedSharding(mesh, P())
  return abstract, TrainState(step=replicated, params=params, opt_state=opt_state, routing=routing, rng=replicated,
                              nonfinite=replicated)


def mesh_from_config(config: ml_collections.ConfigDict, cfg: config_lib.ModelConfig, devices=None):
  """The run's mesh, after checking that it fits the devices, the model and the batch (errors name the axis)."""
  devices = list(jax.devices() if devices is None else devices)
  try:
    sizes = sharding.mesh_sizes(config.mesh, len(devices))
    sharding.check_mesh(cfg, sizes, config.data.batch_size, len(devices))
  except sharding.MeshError as e:
    raise ConfigValueError(f"config.mesh: {e}") from e
  return sharding.make_mesh(sizes, devices)


def compile_steps(cfg, config, tx, mesh, shardings: TrainState):
  """(train_step, eval_step) jitted with explicit shardings; call them inside `sharding.use_mesh(mesh)`."""
  kw = dict(cfg=cfg, config=config)
  replicated = NamedSharding(mesh, P())
  adam = [s for s in shardings.opt_state if isinstance(s, optimizer_lib.AdamState)]
  moment_specs = jax.tree.map(lambda s: s.spec, adam[0].mu) if adam else None
  train = jax.jit(functools.partial(train_step, **kw, tx=tx, moment_specs=moment_specs), donate_argnums=(0,),
                  in_shardings=(shardings, sharding.batch_sharding(mesh, 3, leading=1), replicated),
                  out_shardings=(shardings, replicated))
  evaluate = jax.jit(functools.partial(eval_step, **kw),
                     in_shardings=(shardings.params, shardings.routing, sharding.batch_sharding(mesh, 2)),
                     out_shardings=replicated)
  return train, evaluate


def place_batch(batch: dict[str, np.ndarray], mesh, global_batch: int, leading: int = 0) -> dict[str, jax.Array]:
  """Global arrays from this host's rows of a batch (leaves [*leading, rows, ...]); no host sends another's."""
  out = {}
  for key, local in batch.items():
    shape = list(local.shape)
    shape[leading] = global_batch
    out[key] = jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, local.ndim, leading), local,
                                                      tuple(shape))
  return out


class _Schedule:
  """Host-side, token-based schedules: micro-batches per step, MTP lambda, balancing gamma."""

  def __init__(self, config, pipelined: bool = False):
    self.config = config
    self.pipelined = pipelined
    self.tokens_per_micro = config.data.batch_size * config.data.seq_len

  def microbatches(self, tokens_seen: int) -> int:
    if self.pipelined:  # the schedule is built for one count
      return self.config.pipeline.microbatches
    t = self.config.train
    if not t.warmup_microbatches or not t.batch_warmup_tokens or tokens_seen >= t.batch_warmup_tokens:
      return t.microbatches
    ramp = tokens_seen / t.batch_warmup_tokens
    return int(t.warmup_microbatches + ramp * (t.microbatches - t.warmup_microbatches))

  def hparams(self, tokens_seen: int) -> dict:
    c = self.config
    late = c.loss.mtp_switch_tokens and tokens_seen >= c.loss.mtp_switch_tokens
    stopped = c.balance.stop_after_tokens and tokens_seen >= c.balance.stop_after_tokens
    return {"mtp_lambda": np.float32(c.loss.mtp_lambda_late if late else c.loss.mtp_lambda),
            "gamma": np.float32(0.0 if stopped else c.balance.gamma)}


def _next_batch(iterator, n_micro: int) -> dict:
  micro = [next(iterator) for _ in range(n_micro)]
  return {k: np.stack([m[k] for m in micro]) for k in micro[0]}


class _Run:
  """Everything the host loop holds: mesh, data, compiled steps, checkpoints, metrics."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    validate(config)
    self.config, self.workdir = config, workdir
    d = config.data
    self.tokenizer = data.load_tokenizer(None if d.tokenizer == "bytes" else d.tokenizer, d.eos_token or None)
    self.cfg = model_config(config, self.tokenizer.vocab_size)
    self.mesh = mesh_from_config(config, self.cfg)
    check_pipeline(config, self.cfg, self.mesh.shape[sharding.PIPE_AXIS])
    self.local_rows = sharding.process_rows(sharding.batch_sharding(self.mesh, 2), (d.batch_size, d.seq_len), 0)
    load = functools.partial(data.load_split, d.source, tokenizer=self.tokenizer, seq_len=d.seq_len,
                             heldout_fraction=d.heldout_fraction, max_bytes=d.max_bytes or None)
    self.train_rows, self.heldout_rows = load(split="train"), load(split="heldout")
    self.unigram = data.unigram_entropy(self.train_rows["tokens"], self.tokenizer.vocab_size)
    self.batches = data.make_batches(self.train_rows, d.batch_size, config.seed, True, d.cross_document_loss,
                                     self.local_rows)
    self.tx = optimizer_lib.make(config.optimizer)
    self.abstract, self.shardings = state_shardings(self.cfg, config, self.tx, self.mesh)
    self._train_step, self._eval_step = compile_steps(self.cfg, config, self.tx, self.mesh, self.shardings)
    self.schedule = _Schedule(config, pipelined=self.mesh.shape[sharding.PIPE_AXIS] > 1)
    self.primary = jax.process_index() == 0
    self.writer = metrics_lib.MetricsWriter(workdir, enabled=self.primary)
    self.checkpoints = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"),
                                              config.train.checkpoint_every, config.train.keep_checkpoints)
    self.flops_per_token = metrics_lib.model_flops_per_token(self.cfg, d.seq_len)
    self._clock = None  # (time, tokens seen) at the previous log line

  def start(self) -> tuple[TrainState, dict]:
    """A fresh state, or the latest checkpoint's (state, data position, tokens seen), placed on this mesh."""
    latest = self.checkpoints.latest_step()
    if latest is None:
      return init_state(self.cfg, self.config, self.tx, self.shardings), {"tokens_seen": 0}
    state, host = self.checkpoints.restore(latest, checkpoint.target(self.abstract, self.shardings))
    self.batches.set_state(host["data"])
    self.writer.truncate_after(latest)
    logging.info("resumed from step %d (%s tokens seen)", latest, f"{host['tokens_seen']:,}")
    return state, host

  def train_step(self, state: TrainState, n_micro: int, hparams: dict) -> tuple[TrainState, dict]:
    batch = place_batch(_next_batch(self.batches, n_micro), self.mesh, self.config.data.batch_size, leading=1)
    with sharding.use_mesh(self.mesh):
      return self._train_step(state, batch, hparams)

  def evaluate(self, state: TrainState) -> dict[str, float]:
    d = self.config.data
    batches = data.make_batches(self.heldout_rows, d.batch_size, 0, False, d.cross_document_loss, self.local_rows)
    totals = {"ce": 0.0, "mtp": 0.0, "tokens": 0.0}
    for _ in range(self.config.train.eval_batches):
      batch = place_batch(next(batches), self.mesh, d.batch_size)
      with sharding.use_mesh(self.mesh):
        out = self._eval_step(state.params, state.routing, batch)
      totals = {k: totals[k] + float(out[k]) for k in totals}
    n = max(totals["tokens"], 1.0)
    return {"loss": totals["ce"] / n, "mtp_loss": totals["mtp"] / n, "unigram_entropy": self.unigram}

  def log(self, step: int, m: dict, progress, tokens_seen: int) -> None:
    load_LE = np.asarray(m["expert_load"])
    scalars = {"loss": float(m["loss"]), "ce": float(m["ce"]), "balance": float(m["balance"]),
               "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"]), "tokens_seen": float(tokens_seen)}
    if "mtp" in m:
      scalars["mtp_loss"] = float(m["mtp"])
    now = time.perf_counter()
    if self._clock is not None and now > self._clock[0]:
      scalars["tokens_per_s"] = (tokens_seen - self._clock[1]) / (now - self._clock[0])
      scalars["model_flops_per_s"] = scalars["tokens_per_s"] * self.flops_per_token
    self._clock = (now, tokens_seen)
    scalars.update(self.writer.write_expert_load(step, load_LE))
    self.writer.write(step, scalars)
    if self.primary:
      print(progress.line(step, scalars), flush=True)

  def sample(self, state: TrainState) -> list[str]:
    """Samples after training (none when sample.max_new_tokens is 0 or there are no prompts).

    The sampler runs on fully replicated variables outside the mesh context, so every host gets the same
    text; that copy must fit on one device (turn sampling off for models that do not).
    """
    c = self.config.sample
    if not c.max_new_tokens or not c.prompts:
      return []
    replicate = jax.jit(lambda v: v, out_shardings=NamedSharding(self.mesh, P()))
    variables = replicate({"params": state.params, "routing": state.routing})
    prompts = [self.tokenizer.encode(p) for p in c.prompts]
    lines = []
    for temperature in (0.0, c.temperature):
      outs = generate.generate(variables, self.cfg, prompts, c.max_new_tokens, jax.random.PRNGKey(self.config.seed),
                               temperature=temperature, top_k=c.top_k, eos_id=self.tokenizer.eos_id)
      for prompt, out in zip(c.prompts, outs, strict=True):
        lines.append(f"--- {'greedy' if temperature == 0 else f'temperature {temperature}'}: {prompt!r}\n"
                     f"{prompt}{self.tokenizer.decode(out)}")
    return lines


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from the latest checkpoint in workdir), evaluates, samples; returns a summary."""
  r = _Run(config, workdir)
  state, host = r.start()
  start_step, steps = int(state.step), config.train.steps
  tokens_seen = int(host["tokens_seen"])
  progress = metrics_lib.Progress(steps, start_step)
  logging.info("model %s parameters; mesh %s over %d devices in %d processes (this host's batch rows %d:%d); "
               "corpus %d train rows, %d held-out rows; unigram entropy %.3f nats",
               f"{sum(x.size for x in jax.tree.leaves(state.params)):,}", sharding.describe(r.mesh.shape),
               r.mesh.size, jax.process_count(), *r.local_rows, len(r.train_rows["tokens"]),
               len(r.heldout_rows["tokens"]), r.unigram)
  pending = None
  last_eval = None
  for step in range(start_step, steps):
    n_micro = r.schedule.microbatches(tokens_seen)
    state, m = r.train_step(state, n_micro, r.schedule.hparams(tokens_seen))
    tokens_seen += n_micro * r.schedule.tokens_per_micro
    if pending is not None:  # read step n-1's metrics while step n runs
      _check_finite(pending, config)
      if pending[0] % config.train.log_every == 0 or pending[0] == steps:
        r.log(pending[0], pending[1], progress, pending[2])
    pending = (step + 1, m, tokens_seen)
    if r.checkpoints.due(step + 1) or step + 1 == steps:
      r.checkpoints.save(step + 1, state, {"tokens_seen": tokens_seen, "data": r.batches.get_state()})
    if config.train.eval_every and (step + 1) % config.train.eval_every == 0 and step + 1 < steps:
      last_eval = r.evaluate(state)
      r.writer.write(step + 1, last_eval, split="heldout")
  if pending is not None:
    _check_finite(pending, config)
    r.log(pending[0], pending[1], progress, pending[2])
  r.checkpoints.close()
  last_eval = r.evaluate(state)
  r.writer.write(int(state.step), last_eval, split="heldout")
  r.writer.close()
  return {"step": int(state.step), "heldout": last_eval, "samples": r.sample(state), "workdir": workdir}


def _check_finite(pending, config) -> None:
  step, m, _ = pending
  skipped = int(m["nonfinite"])
  if skipped:
    logging.warning("step %d: non-finite loss or gradient; update skipped", step)
  if skipped >= config.train.max_nonfinite_steps:
    raise FloatingPointError(f"{skipped} consecutive non-finite steps (train.max_nonfinite_steps = "
                             f"{config.train.max_nonfinite_steps}); aborting at step {step}")
