"""The native one-pass AdamW update (dsv3_jax/optimizer.py `update`, csrc/adamw.cc) against optax's chain as XLA runs
it: the moments bit for bit and the parameters to one ulp over steps that clip and steps that do not, with and
without weight decay; the choice impl "auto" makes; each device on its own block of a sharded parameter; errors."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dsv3_jax import optimizer
from dsv3_jax import sharding


def _opt(**overrides) -> ml_collections.ConfigDict:
  values = dict(lr=1e-2, warmup_steps=3, decay_start_step=4, decay_steps=10, decay_end_lr=1e-3, tail_start_step=200,
                tail_lr=1e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0, bf16_moments=False)
  return ml_collections.ConfigDict({**values, **overrides})


def _params(rng, rows: int = 301) -> dict:
  # A kernel (decayed) with a length that is not a whole number of the kernel's chunks, and a norm weight (not).
  return {"w": {"kernel": jnp.asarray(rng.standard_normal((rows, 400)), jnp.float32)},
          "n": {"weight": jnp.asarray(rng.standard_normal(400), jnp.float32)}}


def _run(opt, impl: str, steps: int = 6, specs=None, place=lambda t: t, check=None, rows: int = 301):
  """(params, state) after `steps` updates with gradients that alternate between clipped (norm >> 1) and not; each
  step's result and its inputs go to check(result, inputs) when given."""
  rng = np.random.default_rng(0)
  params = place(_params(rng, rows))
  tx = optimizer.make(opt)
  state = place(tx.init(params))
  step = jax.jit(lambda g, s, p: optimizer.update(tx, opt, g, s, p, impl=impl, specs=specs))
  for i in range(steps):
    scale = 1e-4 if i % 2 else 1.0
    grads = place(jax.tree.map(lambda p, s=scale: s * jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params))
    inputs = (grads, state, params)
    params, state = step(*inputs)
    if check is not None:
      check((params, state), inputs)
  return params, state


def _matches_xla(opt):
  """check for _run: one step of the optax chain under XLA from the same inputs gives the same moments, counts and
  learning-rate state bit for bit, and the parameters to two ulps of the step plus one of the result: the two sides
  may fuse a different multiply and add (u + decay p, p + step u) into one rounding, which moves u by about an ulp,
  and p + step u may cancel, so an ulp of the result alone is not the bound."""
  tx = optimizer.make(opt)
  xla = jax.jit(lambda g, s, p: optimizer.update(tx, opt, g, s, p, impl="xla"))

  def check(got, inputs):
    (params, state), (want_params, want_state) = jax.device_get(got), jax.device_get(xla(*inputs))
    assert jax.tree.structure(state) == jax.tree.structure(want_state)
    for g, w in zip(jax.tree.leaves(state), jax.tree.leaves(want_state), strict=True):
      np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    old = jax.tree.leaves(jax.device_get(inputs[2]))
    for g, w, p in zip(jax.tree.leaves(params), jax.tree.leaves(want_params), old, strict=True):
      g, w, p = np.asarray(g), np.asarray(w), np.asarray(p)
      bound = 2 * np.spacing(np.abs(w - p)) + np.spacing(np.abs(w))
      assert np.all(np.abs(g - w) <= bound), np.max(np.abs(g - w) / bound)

  return check


@pytest.mark.parametrize("weight_decay", [0.1, 0.0])
def test_native_matches_the_optax_chain(weight_decay):
  opt = _opt(weight_decay=weight_decay)
  got = _run(opt, "native", check=_matches_xla(opt))
  # The parameters moved (not a pass-through), by the learning rate's order of magnitude.
  start = _params(np.random.default_rng(0))
  moved = np.abs(np.asarray(got[0]["w"]["kernel"]) - np.asarray(start["w"]["kernel"])).max()
  assert 1e-3 < moved < 0.1


def test_auto_runs_native_on_cpu_for_float32_and_xla_otherwise():
  opt, params = _opt(), _params(np.random.default_rng(0))
  tx = optimizer.make(opt)
  staged = lambda opt, tx: str(jax.make_jaxpr(lambda p, s: optimizer.update(tx, opt, p, s, p, impl="auto"))(
      params, tx.init(params)))
  assert optimizer.ADAMW_TARGET in staged(opt, tx)
  bf16 = _opt(bf16_moments=True)
  assert optimizer.ADAMW_TARGET not in staged(bf16, optimizer.make(bf16))
  # Lowered for CUDA from this host, the program keeps XLA's update.
  lower = jax.jit(lambda p, s: optimizer.update(tx, opt, p, s, p, impl="auto")).trace(params, tx.init(params))
  assert optimizer.ADAMW_TARGET not in lower.lower(lowering_platforms=("cuda",)).as_text()
  assert optimizer.ADAMW_TARGET in lower.lower(lowering_platforms=("cpu",)).as_text()


def test_each_device_updates_its_own_block():
  """With the moments split over a mesh, the update runs per device (no all-gather) and equals the unsharded one."""
  opt = _opt()
  specs = {"w": {"kernel": P("fsdp", "tensor")}, "n": {"weight": P("tensor")}}
  mesh = sharding.mesh_from_spec("fsdp=4,tensor=2")
  with sharding.use_mesh(mesh):
    put = lambda t: jax.tree.map(lambda a, s: jax.device_put(a, jax.NamedSharding(mesh, s)), t, specs)

    def place(tree):
      if isinstance(tree, dict):
        return put(tree)
      clip, adam, decay, lr = tree
      return clip, adam._replace(mu=put(adam.mu), nu=put(adam.nu)), decay, lr

    _run(opt, "native", steps=3, specs=specs, place=place, check=_matches_xla(opt), rows=304)
    params = place(_params(np.random.default_rng(0), 304))
    tx = optimizer.make(opt)
    hlo = jax.jit(lambda g, s, p: optimizer.update(tx, opt, g, s, p, impl="native", specs=specs)).lower(
        params, place(tx.init(params)), params).compile().as_text()
  assert "all-gather" not in hlo and optimizer.ADAMW_TARGET in hlo


def test_bad_impl_and_dtypes_are_named():
  opt, params = _opt(), _params(np.random.default_rng(0))
  tx = optimizer.make(opt)
  with pytest.raises(ValueError, match="optimizer impl 'fused' is not one of"):
    optimizer.update(tx, opt, params, tx.init(params), params, impl="fused")
  bf16 = _opt(bf16_moments=True)
  tx = optimizer.make(bf16)
  with pytest.raises(ValueError, match="optimizer impl 'native' is float32 only.*bfloat16"):
    optimizer.update(tx, bf16, params, tx.init(params), params, impl="native")
  # bf16 moments under "auto" take XLA's update.
  new_params, _ = optimizer.update(tx, bf16, params, tx.init(params), params, impl="auto")
  assert jax.tree.structure(new_params) == jax.tree.structure(params)


def test_a_state_of_another_chain_is_refused():
  opt, params = _opt(), _params(np.random.default_rng(0))
  other = optimizer.optax.adamw(1e-3)
  with pytest.raises(ValueError, match="needs the state of optimizer.make's chain"):
    optimizer.update(other, opt, params, other.init(params), params, impl="native")
