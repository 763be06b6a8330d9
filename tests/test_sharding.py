"""Meshes on 8 fake CPU devices: sharded training steps equal the single-device step; bad meshes fail early."""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import tiny_cpu
from dsv3_jax import checkpoint
from dsv3_jax import config as config_lib
from dsv3_jax import data
from dsv3_jax import optimizer
from dsv3_jax import sharding
from dsv3_jax import train

TOL = 1e-5  # relative: max |sharded - single| / max |single| per leaf


def _config(**mesh):
  c = tiny_cpu.get_config()
  # Adam's first update is g / (|g| + eps): with the default eps it is about sign(g), which turns 1e-13
  # rounding in near-zero gradient entries into lr-sized parameter differences whatever the sharding.
  # eps = 1e-3 keeps the update a smooth function of the gradient, so parameters compare at TOL.
  c.optimizer.eps = 1e-3
  c.optimizer.warmup_steps = 0  # a non-zero learning rate on the first step
  c.mesh.data = 1
  for key, value in mesh.items():
    c.mesh[key] = value
  return c


def _batch(cfg, n_micro=2, batch=8, seq=16):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (n_micro, batch, seq + 1)).astype(np.int32)
  segments = np.ones((n_micro, batch, seq), np.int32)
  segments[..., seq // 2:] = 2
  return {"inputs": tokens[..., :-1], "targets": tokens[..., 1:], "segment_ids": segments,
          "loss_mask": np.ones((n_micro, batch, seq), np.float32)}


HPARAMS = {"gamma": np.float32(1e-2), "mtp_lambda": np.float32(0.3)}


def _relative(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.fixture(scope="module")
def single():
  """The reference: the step jitted without any mesh, on one device; also the initial state, on the host."""
  config = _config()
  cfg = config_lib.ModelConfig(**config.model.to_dict())
  tx = optimizer.make(config.optimizer)
  state = train.init_state(cfg, config, tx)
  initial = jax.tree.map(np.asarray, state)
  step = jax.jit(functools.partial(train.train_step, cfg=cfg, config=config, tx=tx))
  new, metrics = step(state, _batch(cfg), HPARAMS)
  return cfg, jax.tree.map(np.asarray, (new, metrics)), initial


def _sharded_step(name, cfg, initial):
  """(mesh, new state, metrics) of one step on mesh MESHES[name] from the reference's initial state, placed
  with the mesh's shardings (test_sharded_init_and_checkpoint_restore_onto_another_mesh covers the init)."""
  config = _config(**MESHES[name])
  tx = optimizer.make(config.optimizer)
  mesh = train.mesh_from_config(config, cfg)
  _, shardings = train.state_shardings(cfg, config, tx, mesh)
  state = jax.device_put(initial, shardings)
  step, _ = train.compile_steps(cfg, config, tx, mesh, shardings)
  batch = train.place_batch(_batch(cfg), mesh, 8, leading=1)
  with sharding.use_mesh(mesh):
    new, metrics = step(state, batch, HPARAMS)
  return mesh, new, metrics


@pytest.fixture(scope="module")
def sharded(single):
  """name -> _sharded_step result, each mesh run once (two tests inspect the ZeRO-1 run)."""
  cfg, _, initial = single
  runs = {}

  def run(name):
    if name not in runs:
      runs[name] = _sharded_step(name, cfg, initial)
    return runs[name]

  return run


MESHES = {
    "data2_expert4": dict(data=2, expert=4),
    "fsdp4_expert2": dict(fsdp=4, expert=2),
    "data8": dict(data=8),
    "zero1_data2_fsdp2_expert2": dict(data=2, fsdp=2, expert=2, zero1=True),
}


@pytest.mark.parametrize("name", MESHES)
def test_sharded_step_equals_single_device_step(name, single, sharded):
  _, (want, want_m), _ = single
  mesh, got, got_m = sharded(name)
  assert mesh.size == 8
  for key in ("loss", "ce", "mtp", "balance", "grad_norm"):
    assert _relative(got_m[key], want_m[key]) <= TOL, key
  # After one step Adam's first moment is (1 - b1) x the clipped gradient: the gradients, leaf by leaf.
  adam, adam_want = got.opt_state[1], want.opt_state[1]
  for moment in ("mu", "nu"):
    errors = jax.tree.map(_relative, getattr(adam, moment), getattr(adam_want, moment))
    assert max(jax.tree.leaves(errors)) <= TOL, (moment, errors)
  errors = jax.tree.map(_relative, got.params, want.params)
  assert max(jax.tree.leaves(errors)) <= TOL, errors
  # Expert loads are integer counts over the whole global batch; the bias update is their sign.
  np.testing.assert_array_equal(got_m["expert_load"], want_m["expert_load"])
  jax.tree.map(np.testing.assert_array_equal, got.routing, want.routing)
  assert any(np.any(b != 0) for b in jax.tree.leaves(want.routing))  # gamma > 0 moved the biases


def test_parameters_and_optimizer_state_are_sharded_as_declared(single, sharded):
  cfg, _, _ = single
  mesh, state, _ = sharded("zero1_data2_fsdp2_expert2")
  w1 = state.params["moe_layers"]["ffn"]["experts"]["w1"]  # [L, E, D, F] = [1, 8, 64, 32]
  assert w1.sharding.spec == P(None, "expert", "fsdp", "tensor")  # logical (layers, expert, embed, mlp)
  assert w1.addressable_shards[0].data.shape == (1, 4, 32, 32)
  mu_w1 = state.opt_state[1].mu["moe_layers"]["ffn"]["experts"]["w1"]
  assert mu_w1.addressable_shards[0].data.shape == (1, 4, 16, 32)  # ZeRO-1: also split over data
  wq_a = state.params["moe_layers"]["attn"]["wq_a"]["kernel"]  # [L, D, Q]: replicated over data and expert
  assert wq_a.sharding.spec == P(None, "fsdp", None)
  mu_wq_a = state.opt_state[1].mu["moe_layers"]["attn"]["wq_a"]["kernel"]
  assert mu_wq_a.addressable_shards[0].data.size == wq_a.size // 8  # one eighth on each device
  bias = state.routing["moe_layers"]["ffn"]["gate"]["bias"]
  assert bias.sharding.is_fully_replicated
  batch = train.place_batch(_batch(cfg), mesh, 8, leading=1)
  assert {s.data.shape for s in batch["inputs"].addressable_shards} == {(2, 1, 16)}


def test_sharded_init_and_checkpoint_restore_onto_another_mesh(tmp_path, single):
  cfg, _, initial = single
  saved_config, restored_config = _config(data=8), _config(fsdp=4, expert=2, zero1=True)
  tx = optimizer.make(saved_config.optimizer)
  _, saved_shardings = train.state_shardings(cfg, saved_config, tx, train.mesh_from_config(saved_config, cfg))
  state = train.init_state(cfg, saved_config, tx, saved_shardings)
  jax.tree.map(np.testing.assert_array_equal, state, initial)  # created sharded, same values as on one device
  ckpt = checkpoint.Checkpoints(str(tmp_path), every=1, keep=1)
  assert ckpt.save(1, state, {"tokens_seen": 7})
  ckpt.wait()
  mesh = train.mesh_from_config(restored_config, cfg)
  abstract, shardings = train.state_shardings(cfg, restored_config, tx, mesh)
  restored, host = ckpt.restore(1, checkpoint.target(abstract, shardings))
  ckpt.close()
  assert host == {"tokens_seen": 7}
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings), strict=True):
    assert got.sharding.spec == want.spec and got.sharding.mesh.shape == want.mesh.shape


@pytest.mark.parametrize("mesh, model, batch_size, message", [
    (dict(data=3), {}, 8, "the axes multiply to 3 but there are 8 devices"),
    (dict(data=-1, expert=-1), {}, 8, "only one axis may be -1"),
    (dict(data=2, pipe=2, tensor=2), {}, 8, "mesh.tensor = 2 with mesh.pipe = 2: pipeline stages run per device"),
    (dict(expert=8), dict(n_routed_experts=12), 8, "mesh.expert = 8 does not divide the model's n_routed_experts"),
    (dict(tensor=8), {}, 8, "mesh.tensor = 8 does not divide the model's n_heads = 4"),
    (dict(data=2, fsdp=2, expert=2), {}, 12, "= 8 does not divide the batch of 12 sequences"),
    (dict(data=0), {}, 8, "mesh.data = 0: must be a positive integer"),
])
def test_bad_mesh_fails_before_compiling_naming_the_axis(tmp_path, mesh, model, batch_size, message):
  config = _config(**mesh)
  config.data.batch_size = batch_size
  for key, value in model.items():
    config.model[key] = value
  compiles = []
  listener = lambda event, duration, **kw: compiles.append(event) if "backend_compile" in event else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    with pytest.raises(train.ConfigValueError, match=message.replace("(", r"\(")):
      train.run(config, str(tmp_path / "w"))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert not compiles
  assert not (tmp_path / "w").exists()


def test_hybrid_layout_puts_hosts_on_the_outer_factors():
  sizes = dict(pipe=16, data=2, fsdp=1, expert=64, tensor=1)
  ici, dcn = sharding.hybrid_shapes(sizes, 256, 8)  # DeepSeek-V3: 256 nodes of 8 GPUs
  assert ici == [1, 1, 1, 8, 1] and dcn == [16, 2, 1, 8, 1]
  ici, dcn = sharding.hybrid_shapes(dict(pipe=1, data=2, fsdp=1, expert=4, tensor=1), 2, 4)
  assert ici == [1, 1, 1, 4, 1] and dcn == [1, 2, 1, 1, 1]
  ici, dcn = sharding.hybrid_shapes(dict(pipe=1, data=6, fsdp=1, expert=4, tensor=1), 4, 6)
  assert ici == [1, 3, 1, 2, 1] and dcn == [1, 2, 1, 2, 1]
  with pytest.raises(sharding.MeshError, match="multiply to 2, not to 2 hosts x 4 devices"):
    sharding.hybrid_shapes(dict(pipe=1, data=2, fsdp=1, expert=1, tensor=1), 2, 4)


def test_zero1_spec_splits_over_free_batch_axes_where_divisible():
  sizes = dict(pipe=1, data=2, fsdp=2, expert=4, tensor=1)
  assert sharding.zero1_spec(P(None, "expert", "fsdp", None), (3, 8, 64, 32), sizes) == P(
      None, "expert", ("fsdp", "data"), None)
  assert sharding.zero1_spec(P(None, "fsdp"), (3, 64), sizes) == P(None, ("fsdp", "data", "expert"))
  assert sharding.zero1_spec(P(), (3,), sizes) == P(None)  # divides by nothing: stays replicated


def test_hosts_assemble_disjoint_rows_of_the_same_global_batch():
  rows = {"tokens": np.arange(40 * 9, dtype=np.int32).reshape(40, 9), "segment_ids": np.ones((40, 9), np.int32)}
  whole = data.make_batches(rows, 8, seed=3)
  halves = [data.make_batches(rows, 8, seed=3, local_rows=r) for r in ((0, 4), (4, 8))]
  for _ in range(6):  # across an epoch boundary (5 batches per epoch)
    want, got = next(whole), [next(h) for h in halves]
    for key in want:
      np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key])
  assert halves[0].get_state() == halves[1].get_state() == whole.get_state()
  with pytest.raises(ValueError, match="local_rows"):
    data.make_batches(rows, 8, seed=3, local_rows=(4, 9))


def test_process_rows_cover_the_batch_in_one_process():
  mesh = sharding.make_mesh(dict(pipe=1, data=2, fsdp=1, expert=4, tensor=1))
  assert sharding.process_rows(sharding.batch_sharding(mesh, 2), (8, 16), 0) == (0, 8)
