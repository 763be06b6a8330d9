"""AdamW with the paper's settings (§4.2), its learning-rate shape, and the weight-decay mask.

The optimizer sees only the 'params' collection: the routing biases are updated by `balance.py`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax


def learning_rate(opt: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to `lr`, constant, cosine decay to `decay_end_lr`, then constant tails.

  Paper §4.2 (in tokens): 0 -> 2.2e-4 over 2K steps, constant to 10T tokens, cosine to 2.2e-5 over
  4.3T tokens, 2.2e-5 for 333B tokens, then 7.3e-6 for the last 167B. Here every boundary is a step.
  """
  warmup = optax.linear_schedule(0.0, opt.lr, max(opt.warmup_steps, 1))
  constant = optax.constant_schedule(opt.lr)
  cosine = optax.cosine_decay_schedule(opt.lr, max(opt.decay_steps, 1), alpha=opt.decay_end_lr / opt.lr)
  after_decay = optax.constant_schedule(opt.decay_end_lr)
  tail = optax.constant_schedule(opt.tail_lr)
  decay_end = opt.decay_start_step + opt.decay_steps
  return optax.join_schedules([warmup, constant, cosine, after_decay, tail],
                              [opt.warmup_steps, opt.decay_start_step, decay_end, max(opt.tail_start_step, decay_end)])


def decay_mask(params: dict) -> dict:
  """Weight decay on matrices (kernels, expert stacks, embedding, head), not on norm weights."""
  return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key != "weight", params)


class _AdamState(NamedTuple):
  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def scale_by_adam(b1: float, b2: float, eps: float, moment_dtype) -> optax.GradientTransformation:
  """Adam's moment scaling with both moments stored in `moment_dtype` (paper: BF16), math in fp32."""

  def init(params):
    zeros = lambda p: jnp.zeros(p.shape, moment_dtype)
    return _AdamState(jnp.zeros([], jnp.int32), jax.tree.map(zeros, params), jax.tree.map(zeros, params))

  def update(grads, state, params=None):
    del params
    count = state.count + 1
    mu = jax.tree.map(lambda m, g: b1 * m.astype(jnp.float32) + (1 - b1) * g, state.mu, grads)
    nu = jax.tree.map(lambda v, g: b2 * v.astype(jnp.float32) + (1 - b2) * g * g, state.nu, grads)
    c1, c2 = 1 - b1 ** count, 1 - b2 ** count
    updates = jax.tree.map(lambda m, v: (m / c1) / (jnp.sqrt(v / c2) + eps), mu, nu)
    cast = lambda t: jax.tree.map(lambda a: a.astype(moment_dtype), t)
    return updates, _AdamState(count, cast(mu), cast(nu))

  return optax.GradientTransformation(init, update)


def make(opt: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """clip(global norm) -> Adam -> decoupled weight decay (masked) -> -lr."""
  moment_dtype = jnp.bfloat16 if opt.bf16_moments else jnp.float32
  return optax.chain(
      optax.clip_by_global_norm(opt.grad_clip),
      scale_by_adam(opt.b1, opt.b2, opt.eps, moment_dtype),
      optax.add_decayed_weights(opt.weight_decay, mask=decay_mask),
      optax.scale_by_learning_rate(learning_rate(opt)),
  )
