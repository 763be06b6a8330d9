"""The pipeline executor: pipelined gradients equal the unpipelined step's, training runs alike, bad input refused."""

import functools

import jax
import numpy as np
import pytest

from configs import tiny_cpu
from dsv3_jax import balance
from dsv3_jax import optimizer
from dsv3_jax import sharding
from dsv3_jax import train
from dsv3_jax.pipeline import executor
from dsv3_jax.pipeline import lockstep
from dsv3_jax.pipeline import schedules
from dsv3_jax.pipeline import stages

N_MICRO = 8
# Fast CPU compiles for the comparisons (both sides compiled alike); the numerics are unchanged by it.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
MESHES = {"pipe4_data2": dict(pipe=4, data=2), "pipe2_expert2_data2": dict(pipe=2, expert=2, data=2)}


def _config(schedule="dualpipev", **mesh):
  """Tiny model with 8 MoE layers (8 stages: DualPipeV on 4 ranks) after one dense layer, MTP on, fp32."""
  c = tiny_cpu.get_config()
  c.model.n_layers = 9
  c.model.n_dense_layers = 1
  c.pipeline.schedule = schedule
  c.pipeline.microbatches = N_MICRO
  c.data.attend_across_documents = False  # segment masks inside the stages
  c.data.cross_document_loss = False  # and in the MTP targets
  for axis in sharding.MESH_AXES:
    c.mesh[axis] = mesh.get(axis, 1)
  return c


def _batch(cfg, n_micro=N_MICRO, batch=4, seq=16, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.vocab_size, (n_micro, batch, seq + 1)).astype(np.int32)
  segments = np.ones((n_micro, batch, seq), np.int32)
  segments[..., seq // 2:] = 2
  mask = (rng.random((n_micro, batch, seq)) > 0.2).astype(np.float32)  # uneven token counts per device
  return {"inputs": tokens[..., :-1], "targets": tokens[..., 1:], "segment_ids": segments, "loss_mask": mask}


def _hparams():
  return {"gamma": np.float32(1e-3), "mtp_lambda": np.float32(0.3)}


def _gradients(config, cfg, state, batch, mesh=None):
  fn = jax.jit(functools.partial(train.gradients, cfg=cfg, config=config))
  if mesh is None:
    return jax.device_get(fn.lower(state, batch, _hparams()).compile(FAST_COMPILE)(state, batch, _hparams()))
  with sharding.use_mesh(mesh):
    return jax.device_get(fn.lower(state, batch, _hparams()).compile(FAST_COMPILE)(state, batch, _hparams()))


@pytest.fixture(scope="module")
def reference():
  """The unpipelined step's gradients, loss parts and expert loads over the same micro-batches (no mesh)."""
  config = _config()
  cfg = train.model_config(config, 0)
  tx = optimizer.make(config.optimizer)
  state = train.init_state(cfg, config, tx)
  batch = _batch(cfg)
  return cfg, state, batch, _gradients(config, cfg, state, batch)


def _relative_error(got, want) -> float:
  return float(np.linalg.norm(np.asarray(got) - np.asarray(want)) / max(np.linalg.norm(np.asarray(want)), 1e-30))


# Each case compiles the pipelined step (~30-60 s on a loaded 2-core CPU); the default run keeps the two that
# together use every op kind, channel and axis: DualPipe (F, B, b, W, FB; mirrored stages) on pipe x data, and
# DualPipeV (local turn-around) with the expert all-to-all inside its stages.
FAST_CASES = {("dualpipe", "pipe4_data2"), ("dualpipev", "pipe2_expert2_data2")}


@pytest.mark.parametrize("schedule, mesh_name", [
    pytest.param(schedule, mesh_name, marks=() if (schedule, mesh_name) in FAST_CASES else pytest.mark.slow)
    for schedule in schedules.NAMES for mesh_name in MESHES])
def test_pipelined_gradients_equal_unpipelined(reference, schedule, mesh_name):
  cfg, state, batch, (want_grads, want_parts, want_load) = reference
  config = _config(schedule, **MESHES[mesh_name])
  mesh = train.mesh_from_config(config, cfg)
  grads, parts, load = _gradients(config, cfg, state, batch, mesh)
  assert set(parts) == set(want_parts)
  for key in want_parts:
    assert _relative_error(parts[key], want_parts[key]) < 1e-6, (key, parts[key], want_parts[key])
  flat_want = jax.tree_util.tree_leaves_with_path(want_grads)
  assert jax.tree.structure(grads) == jax.tree.structure(want_grads)
  errors = {jax.tree_util.keystr(path): _relative_error(g, w)
            for (path, w), g in zip(flat_want, jax.tree.leaves(grads), strict=True)}
  assert max(errors.values()) < 1e-6, sorted(errors.items(), key=lambda kv: -kv[1])[:5]
  np.testing.assert_array_equal(load, want_load)  # integer counts: exact
  assert load.shape == (cfg.n_moe_layers + cfg.n_mtp_layers, cfg.n_routed_experts)
  new_bias = balance.update_bias(state.routing, load, 1e-3, cfg)
  jax.tree.map(np.testing.assert_array_equal, new_bias, balance.update_bias(state.routing, want_load, 1e-3, cfg))


@pytest.mark.slow  # two step compiles: ~70 s on a loaded 2-core CPU
def test_dualpipev_training_run_matches_unpipelined():
  """Ten optimizer steps with DualPipeV on pipe=4 x data=2 reach the losses of the same steps unpipelined."""
  config = _config("dualpipev", pipe=4, data=2)
  config.optimizer.warmup_steps = 2
  cfg = train.model_config(config, 0)
  tx = optimizer.make(config.optimizer)
  batches = [_batch(cfg, seed=step % 2) for step in range(10)]  # two batches in turn: the loss can fall
  plain = jax.jit(functools.partial(train.train_step, cfg=cfg, config=config, tx=tx))
  state = train.init_state(cfg, config, tx)
  plain = plain.lower(state, batches[0], _hparams()).compile(FAST_COMPILE)
  want = []
  for batch in batches:
    state, m = plain(state, batch, _hparams())
    want.append(float(m["loss"]))
  final_want = jax.device_get(state.params)

  mesh = train.mesh_from_config(config, cfg)
  _, shardings = train.state_shardings(cfg, config, tx, mesh)
  step, _ = train.compile_steps(cfg, config, tx, mesh, shardings)
  state = train.init_state(cfg, config, tx, shardings)
  got = []
  with sharding.use_mesh(mesh):
    placed = [train.place_batch(batch, mesh, 4, leading=1) for batch in batches]
    step = step.lower(state, placed[0], _hparams()).compile(FAST_COMPILE)
    for batch in placed:
      state, m = step(state, batch, _hparams())
      got.append(float(m["loss"]))
  np.testing.assert_allclose(got, want, rtol=1e-6)  # measured: 1.3e-7
  assert got[-1] < got[0] - 0.5, got  # it learns
  # The state keeps the ordinary (mesh-independent) parameter tree: checkpoints do not see the pipeline.
  got_params = jax.device_get(state.params)
  assert jax.tree.structure(got_params) == jax.tree.structure(final_want)
  leaves = zip(jax.tree.leaves(got_params), jax.tree.leaves(final_want), strict=True)
  errors = [_relative_error(g, w) for g, w in leaves]
  assert max(errors) < 1e-5, max(errors)  # measured: 1.0e-6 after ten Adam steps


def test_buffers_do_not_grow_with_micro_batches():
  """1F1B's buffers (stashed inputs plus items waiting for their op) have one depth for every N, here 4 = pipe."""
  sizes = [executor.compile_table(lockstep.lockstep(schedules.generate("1f1b", 4, n))) for n in (4, 8, 16)]
  assert [t.act_slots for t in sizes] == [4, 4, 4]
  assert [t.grad_slots for t in sizes] == [1, 1, 1]
  dualpipev = executor.compile_table(lockstep.lockstep(schedules.generate("dualpipev", 4, 8)))
  assert set(dualpipev.channels) == {"act+", "act-", "act0", "grad+", "grad-", "grad0"}
  assert dualpipev.branches == ("idle", "F", "B", "b", "W", "FB")


def test_stage_rule_names_the_config_keys(tmp_path):
  config = _config("1f1b", pipe=4, data=2)
  config.model.n_layers = 7  # 6 MoE layers into 4 stages
  with pytest.raises(train.ConfigValueError, match=r"model.n_layers - model.n_dense_layers = 7 - 1 = 6 MoE layers "
                     r"do not split evenly into the 4 stages of 1f1b \(mesh.pipe = 4\)"):
    train.run(config, str(tmp_path / "w"))
  config = _config("dualpipev", pipe=4, data=2)
  config.model.n_layers = 5  # 4 MoE layers, but DualPipeV on 4 ranks has 8 stages
  with pytest.raises(train.ConfigValueError, match="into the 8 stages of dualpipev"):
    train.run(config, str(tmp_path / "w"))


@pytest.mark.parametrize("schedule, n_micro, message", [
    ("dualpipe", 6, r"DualPipe needs an even number of micro-batches N >= 2\*pp, got N=6"),
    ("dualpipev", 7, r"DualPipeV needs N >= 2\*pp micro-batches, got N=7 with pp=4"),
])
def test_schedule_rule_names_pipeline_microbatches(tmp_path, schedule, n_micro, message):
  config = _config(schedule, pipe=4, data=2)
  config.pipeline.microbatches = n_micro
  with pytest.raises(train.ConfigValueError, match=rf"config.pipeline.microbatches = {n_micro} .*{message}"):
    train.run(config, str(tmp_path / "w"))


def test_unknown_schedule_is_refused(tmp_path):
  config = _config("gpipe", pipe=4, data=2)
  with pytest.raises(train.ConfigValueError, match="config.pipeline.schedule = 'gpipe': must be one of"):
    train.run(config, str(tmp_path / "w"))


def test_stages_round_trip_sums_mirrored_copies():
  """to_chunks / from_chunks: DualPipe's two copies of a stage add up; DualPipeV's 2R stages each appear once."""
  layers = np.arange(8, dtype=np.float32)
  dualpipe = schedules.generate("dualpipe", 4, 8)
  chunks = stages.to_chunks(layers, dualpipe)
  assert chunks.shape == (4, 2, 2)
  np.testing.assert_array_equal(chunks[0, 1], [6.0, 7.0])  # rank 0's chunk 1 is the last stage
  np.testing.assert_array_equal(stages.from_chunks(chunks, dualpipe), 2 * layers)
  dualpipev = schedules.generate("dualpipev", 4, 8)
  chunks = stages.to_chunks(layers, dualpipev)
  assert chunks.shape == (4, 2, 1)
  np.testing.assert_array_equal(chunks[3, :, 0], [3.0, 4.0])  # the turn-around rank holds stages 3 and 4
  np.testing.assert_array_equal(stages.from_chunks(chunks, dualpipev), layers)
