"""Training: a pure, jitted `train_step(state, batch, hparams) -> (state, metrics)` and a thin host loop.

One step (paper §2.1.2, §2.2, §4.2):
1. For each micro-batch: forward, loss = CE + lambda * MTP + alpha * balance, gradients (fp32).
2. Average the gradients, sum the expert loads over the micro-batches (and, under a mesh, over all
   devices: the loads are global-batch sums).
3. Clip, AdamW, weight decay (masked); move the routing biases by gamma toward balance.
4. If the loss or the gradient norm is not finite, keep the old parameters, optimizer state and
   biases, and count the skip; the host aborts after train.max_nonfinite_steps in a row.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from dsv3_jax import balance
from dsv3_jax import checkpoint
from dsv3_jax import config as config_lib
from dsv3_jax import data
from dsv3_jax import generate
from dsv3_jax import loss as loss_lib
from dsv3_jax import metrics as metrics_lib
from dsv3_jax import model as model_lib
from dsv3_jax import optimizer as optimizer_lib


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
  try:
    cfg = config_lib.ModelConfig(**config.model.to_dict())
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
      ("data.batch_size", config.data.batch_size % jax.device_count() == 0,
       f"must be divisible by the {jax.device_count()} devices"),
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


def _loss_fn(params, routing, batch, mtp_lambda, *, cfg, config):
  model = model_lib.Transformer(cfg, impl=config.train.impl, remat=config.train.remat)
  segments = None if config.data.attend_across_documents else batch["segment_ids"]
  out = model.apply({"params": params, "routing": routing}, batch["inputs"], segment_ids_BS=segments)
  loss_batch = dict(batch)
  if config.data.cross_document_loss:
    loss_batch.pop("segment_ids")
  loss, parts = loss_lib.objective(out, loss_batch, mtp_lambda, config.loss.balance_alpha)
  return loss, (parts, out.stats["expert_load"])


def train_step(state: TrainState, batch: dict, hparams: dict, *, cfg, config, tx) -> tuple[TrainState, dict]:
  """One optimizer step over batch leaves of shape [micro-batches, B, S]."""
  grad_fn = jax.value_and_grad(functools.partial(_loss_fn, cfg=cfg, config=config), has_aux=True)

  def micro(acc, mb):
    (_, aux), grads = grad_fn(state.params, state.routing, mb, hparams["mtp_lambda"])
    return jax.tree.map(jnp.add, acc, (grads, aux)), None

  first = jax.tree.map(lambda a: a[0], batch)
  shapes = jax.eval_shape(lambda: grad_fn(state.params, state.routing, first, hparams["mtp_lambda"]))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[1], shapes[0][1]))
  (grads, (parts, load_LE)), _ = jax.lax.scan(micro, zeros, batch)
  n_micro = batch["inputs"].shape[0]
  grads = jax.tree.map(lambda g: g / n_micro, grads)
  parts = {k: v if k == "tokens" else v / n_micro for k, v in parts.items()}
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(parts["loss"]) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  routing = balance.update_bias(state.routing, load_LE, hparams["gamma"], cfg)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                            opt_state=keep(opt_state, state.opt_state), routing=keep(routing, state.routing),
                            nonfinite=jnp.where(finite, 0, state.nonfinite + 1))
  lr = optimizer_lib.learning_rate(config.optimizer)(state.step)
  return new_state, {**parts, "grad_norm": grad_norm, "lr": lr, "finite": finite, "nonfinite": new_state.nonfinite,
                     "expert_load": load_LE}


def eval_step(params, routing, batch, *, cfg, config) -> dict:
  _, (parts, _) = _loss_fn(params, routing, batch, 0.0, cfg=cfg, config=config)
  return {"ce": parts["ce"] * parts["tokens"], "mtp": parts.get("mtp", 0.0) * parts["tokens"],
          "tokens": parts["tokens"]}


def init_state(cfg, config, tx) -> TrainState:
  rng = jax.random.PRNGKey(config.seed)
  init_rng, state_rng = jax.random.split(rng)

  @jax.jit
  def init():
    variables = model_lib.init(cfg, init_rng, impl=config.train.impl)
    params = variables["params"]
    return TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params),
                      routing=variables.get("routing", {}), rng=state_rng, nonfinite=jnp.zeros([], jnp.int32))

  return init()


class _Schedule:
  """Host-side, token-based schedules: micro-batches per step, MTP lambda, balancing gamma."""

  def __init__(self, config):
    self.config = config
    self.tokens_per_micro = config.data.batch_size * config.data.seq_len

  def microbatches(self, tokens_seen: int) -> int:
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
  """Everything the host loop holds: data, compiled steps, checkpoints, metrics."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    validate(config)
    self.config, self.workdir = config, workdir
    d = config.data
    self.tokenizer = data.load_tokenizer(None if d.tokenizer == "bytes" else d.tokenizer, d.eos_token or None)
    self.cfg = model_config(config, self.tokenizer.vocab_size)
    load = functools.partial(data.load_split, d.source, tokenizer=self.tokenizer, seq_len=d.seq_len,
                             heldout_fraction=d.heldout_fraction, max_bytes=d.max_bytes or None)
    self.train_rows, self.heldout_rows = load(split="train"), load(split="heldout")
    self.unigram = data.unigram_entropy(self.train_rows["tokens"], self.tokenizer.vocab_size)
    self.batches = data.make_batches(self.train_rows, d.batch_size, config.seed, True, d.cross_document_loss)
    self.tx = optimizer_lib.make(config.optimizer)
    kw = dict(cfg=self.cfg, config=config)
    self.train_step = jax.jit(functools.partial(train_step, **kw, tx=self.tx), donate_argnums=(0,))
    self.eval_step = jax.jit(functools.partial(eval_step, **kw))
    self.schedule = _Schedule(config)
    self.primary = jax.process_index() == 0
    self.writer = metrics_lib.MetricsWriter(workdir, enabled=self.primary)
    self.checkpoints = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"),
                                              config.train.checkpoint_every, config.train.keep_checkpoints)
    self.flops_per_token = metrics_lib.model_flops_per_token(self.cfg, d.seq_len)
    self._clock = None  # (time, tokens seen) at the previous log line

  def start(self) -> tuple[TrainState, dict]:
    """A fresh state, or the latest checkpoint's (state, data position, tokens seen)."""
    state = init_state(self.cfg, self.config, self.tx)
    host = {"tokens_seen": 0}
    latest = self.checkpoints.latest_step()
    if latest is not None:
      state, host = self.checkpoints.restore(latest, checkpoint.abstract(state))
      self.batches.set_state(host["data"])
      self.writer.truncate_after(latest)
      logging.info("resumed from step %d (%s tokens seen)", latest, f"{host['tokens_seen']:,}")
    return state, host

  def evaluate(self, state: TrainState) -> dict[str, float]:
    batches = data.make_batches(self.heldout_rows, self.config.data.batch_size, 0, False,
                                self.config.data.cross_document_loss)
    totals = {"ce": 0.0, "mtp": 0.0, "tokens": 0.0}
    for _ in range(self.config.train.eval_batches):
      out = self.eval_step(state.params, state.routing, next(batches))
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
    c = self.config.sample
    variables = {"params": state.params, "routing": state.routing}
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
  logging.info("model %s parameters; corpus %d train rows, %d held-out rows; unigram entropy %.3f nats",
               f"{sum(x.size for x in jax.tree.leaves(state.params)):,}", len(r.train_rows["tokens"]),
               len(r.heldout_rows["tokens"]), r.unigram)
  pending = None
  last_eval = None
  for step in range(start_step, steps):
    n_micro = r.schedule.microbatches(tokens_seen)
    batch = _next_batch(r.batches, n_micro)
    state, m = r.train_step(state, batch, r.schedule.hparams(tokens_seen))
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
