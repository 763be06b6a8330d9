"""AdamW with the paper's settings (§4.2), its learning-rate shape, and the weight-decay mask.

The optimizer sees only the 'params' collection: the routing biases are updated by `balance.py`. `make` builds the
optax chain (its state is what checkpoints hold); `update` applies one step of it, either as optax runs it
(impl "xla": XLA makes four passes over each parameter) or as one native pass per parameter on the CPU that reads
p, g, m, v once and writes p, m, v in place (impl "native", `csrc/adamw.cc`): the same arithmetic in the same
order, so the moments are equal bit for bit and the parameters to two ulps of the step plus one of the result (XLA
may fuse a multiply and an add where the kernel rounds twice, or the reverse). "auto" takes the native pass when
lowering for the CPU with float32 parameters and moments, and XLA otherwise.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import PartitionSpec as P

from dsv3_jax import native

IMPLS = ("auto", "xla", "native")
ADAMW_TARGET = "dsv3_adamw_update"


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


class AdamState(NamedTuple):
  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def scale_by_adam(b1: float, b2: float, eps: float, moment_dtype) -> optax.GradientTransformation:
  """Adam's moment scaling with both moments stored in `moment_dtype` (paper: BF16), math in fp32."""

  def init(params):
    zeros = lambda p: jnp.zeros(p.shape, moment_dtype)
    return AdamState(jnp.zeros([], jnp.int32), jax.tree.map(zeros, params), jax.tree.map(zeros, params))

  def update(grads, state, params=None):
    del params
    count = state.count + 1
    mu = jax.tree.map(lambda m, g: b1 * m.astype(jnp.float32) + (1 - b1) * g, state.mu, grads)
    nu = jax.tree.map(lambda v, g: b2 * v.astype(jnp.float32) + (1 - b2) * g * g, state.nu, grads)
    c1, c2 = 1 - b1 ** count, 1 - b2 ** count
    updates = jax.tree.map(lambda m, v: (m / c1) / (jnp.sqrt(v / c2) + eps), mu, nu)
    cast = lambda t: jax.tree.map(lambda a: a.astype(moment_dtype), t)
    return updates, AdamState(count, cast(mu), cast(nu))

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


def update(tx: optax.GradientTransformation, opt: ml_collections.ConfigDict, grads, opt_state, params, *,
           impl: str = "xla", specs=None, grad_norm: jax.Array | None = None):
  """(new params, new optimizer state) after one step of `tx` (built by `make(opt)`) on these gradients.

  impl: one of IMPLS (module docstring). specs: the PartitionSpecs of the moments (a tree like params) under the
  context mesh, so that each device updates its own block of every parameter in the native pass (None: no mesh).
  grad_norm: the gradients' global norm when the caller has it (the clip computes it otherwise).
  """
  if impl not in IMPLS:
    raise ValueError(f"optimizer impl {impl!r} is not one of {IMPLS}")
  xla = lambda: _xla_update(tx, grads, opt_state, params)
  if impl == "xla":
    return xla()
  if not _is_chain_state(opt_state):
    if impl == "native":
      raise ValueError("optimizer.update impl 'native' needs the state of optimizer.make's chain (clip, Adam, decay, "
                       f"learning rate); got {type(opt_state).__name__}")
    return xla()
  leaves = jax.tree.leaves((params, opt_state[1].mu, opt_state[1].nu))
  if impl == "native":
    native.check_float32("optimizer impl", **{f"leaf {i}": a for i, a in enumerate(leaves)})
    native.require()
  elif not native.supports("the AdamW update", *leaves):
    return xla()
  if grad_norm is None:
    grad_norm = optax.tree.norm(grads)
  fused = lambda: _native_update(opt, grads, opt_state, params, grad_norm, specs)
  if impl == "native":
    return fused()
  return jax.lax.platform_dependent(cpu=fused, default=xla)


def _xla_update(tx, grads, opt_state, params):
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def _native_update(opt, grads, opt_state, params, grad_norm, specs):
  clip_state, adam, decay_state, lr_state = opt_state
  count = adam.count + 1
  clips = ~(grad_norm < opt.grad_clip)  # optax: g where norm < max_norm, else g / norm * max_norm
  one = jnp.ones([], jnp.float32)
  hyper = jnp.stack([jnp.where(clips, grad_norm.astype(jnp.float32), one),
                     jnp.where(clips, jnp.float32(opt.grad_clip), one),
                     1 - opt.b1 ** count, 1 - opt.b2 ** count,
                     jnp.asarray(-1 * learning_rate(opt)(lr_state.count), jnp.float32)]).astype(jnp.float32)
  attrs = dict(b1=opt.b1, one_minus_b1=1 - opt.b1, b2=opt.b2, one_minus_b2=1 - opt.b2, eps=opt.eps)
  decays = decay_mask(params)
  mesh = jax.sharding.get_abstract_mesh()

  def leaf(p, g, m, v, decayed, spec):
    kw = dict(attrs, decay=opt.weight_decay if decayed else 0.0)
    call = lambda p, g, m, v, h: tuple(native.call(ADAMW_TARGET, [p.shape] * 3, p, g, m, v, h,
                                                   aliases={0: 0, 2: 1, 3: 2}, **kw))
    splits = [math.prod(mesh.shape[a] for a in (e if isinstance(e, tuple) else (e,))) if e else 1
              for e in spec or ()] if not mesh.empty else []
    if not any(n > 1 for n in splits) or any(d % n for d, n in zip(p.shape, splits, strict=False)):
      return call(p, g, m, v, hyper)  # replicated, or split unevenly (XLA gathers around the call)
    return jax.shard_map(call, mesh=mesh, in_specs=(spec,) * 4 + (P(),), out_specs=(spec,) * 3)(p, g, m, v, hyper)

  if specs is None:
    specs = jax.tree.map(lambda _: None, params)
  out = jax.tree.map(leaf, params, grads, adam.mu, adam.nu, decays, specs,
                     is_leaf=lambda x: x is None or isinstance(x, P))
  pick = lambda i: jax.tree.map(lambda _, o: o[i], params, out, is_leaf=lambda x: isinstance(x, tuple))
  new_adam = AdamState(count, pick(1), pick(2))
  return pick(0), (clip_state, new_adam, decay_state, lr_state._replace(count=optax.safe_increment(lr_state.count)))


def _is_chain_state(opt_state) -> bool:
  """Whether this is the state of `make`'s chain: (clip, Adam, masked decay, learning-rate schedule)."""
  return (isinstance(opt_state, tuple) and len(opt_state) == 4 and isinstance(opt_state[1], AdamState)
          and isinstance(opt_state[3], optax.ScaleByScheduleState))
