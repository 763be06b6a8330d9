"""The training step: objective, balancing, optimizer masks, non-finite skips, golden metrics."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import tiny_cpu
from dsv3_jax import balance
from dsv3_jax import config as config_lib
from dsv3_jax import loss as loss_lib
from dsv3_jax import metrics
from dsv3_jax import optimizer
from dsv3_jax import train


def _config(**train_overrides) -> ml_collections.ConfigDict:
  c = tiny_cpu.get_config()
  for key, value in train_overrides.items():
    section, name = key.split("__")
    c[section][name] = value
  return c


def _batch(cfg, n_micro=1, batch=4, seq=16, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.vocab_size, (n_micro, batch, seq + 1)).astype(np.int32)
  segments = np.ones((n_micro, batch, seq), np.int32)
  segments[..., seq // 2:] = 2  # two documents per row
  return {"inputs": tokens[..., :-1], "targets": tokens[..., 1:], "segment_ids": segments,
          "loss_mask": np.ones((n_micro, batch, seq), np.float32)}


def _setup(config):
  cfg = config_lib.ModelConfig(**config.model.to_dict())
  tx = optimizer.make(config.optimizer)
  step = jax.jit(functools.partial(train.train_step, cfg=cfg, config=config, tx=tx))
  return cfg, train.init_state(cfg, config, tx), step


def _hparams(gamma=1e-3, mtp_lambda=0.3):
  return {"gamma": np.float32(gamma), "mtp_lambda": np.float32(mtp_lambda)}


def test_golden_first_step_metrics():
  """Pinned values of the tiny config's first step (CPU, fp32): catches silent numerics changes."""
  config = _config()
  cfg, state, step = _setup(config)
  _, m = step(state, _batch(cfg), _hparams())
  got = {k: float(m[k]) for k in ("loss", "ce", "mtp", "balance", "grad_norm")}
  golden = {"loss": 7.221909523010254, "ce": 5.55735969543457, "mtp": 5.547832012176514,
            "balance": 2.0026679039001465, "grad_norm": 1.5040897130966187}
  for k, v in golden.items():
    assert got[k] == pytest.approx(v, rel=1e-5), (k, got)
  assert float(m["lr"]) == 0.0  # linear warmup starts at 0
  np.testing.assert_array_equal(np.asarray(m["expert_load"]).sum(-1), 4 * 16 * cfg.n_activated_experts)


def test_loss_at_init_is_near_uniform():
  config = _config()
  cfg, state, step = _setup(config)
  _, m = step(state, _batch(cfg), _hparams())
  assert abs(float(m["ce"]) - np.log(cfg.vocab_size)) < 0.05
  assert abs(float(m["mtp"]) - np.log(cfg.vocab_size)) < 0.05
  # Balanced random routing gives sum_i f_i P_i close to 1 per layer.
  assert float(m["balance"]) == pytest.approx(cfg.n_moe_layers + cfg.n_mtp_layers, rel=0.1)


def test_microbatch_accumulation_matches_one_big_batch():
  config = _config()
  cfg, state, step = _setup(config)
  two = _batch(cfg, n_micro=2, batch=2)
  one = jax.tree.map(lambda a: a.reshape(1, 4, *a.shape[2:]), two)
  _, m2 = step(state, two, _hparams())
  _, m1 = step(state, one, _hparams())
  np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-4)
  np.testing.assert_array_equal(m2["expert_load"], m1["expert_load"])


def test_mtp_targets_shift_and_mask():
  targets = jnp.arange(6)[None]
  mask = jnp.ones((1, 6))
  segments = jnp.array([[1, 1, 1, 2, 2, 2]])
  shifted, m = loss_lib.mtp_targets(targets, mask, None, 2)
  np.testing.assert_array_equal(shifted[0, :4], [2, 3, 4, 5])
  np.testing.assert_array_equal(m[0], [1, 1, 1, 1, 0, 0])
  _, m = loss_lib.mtp_targets(targets, mask, segments, 1)
  np.testing.assert_array_equal(m[0], [1, 1, 0, 1, 1, 0])


def test_routing_bias_gets_no_gradient_and_no_weight_decay():
  config = _config()
  config.optimizer.lr = 1e-2
  config.optimizer.warmup_steps = 0
  cfg, state, step = _setup(config)
  opt_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)]
  assert opt_paths and not any("bias" in p for p in opt_paths)
  for _ in range(3):
    state, _ = step(state, _batch(cfg), _hparams(gamma=0.0))
  for bias in jax.tree.leaves(state.routing):
    np.testing.assert_array_equal(bias, 0.0)  # only the balancing update may move it
  mask = optimizer.decay_mask(state.params)
  assert mask["moe_layers"]["ffn"]["experts"]["w1"] and mask["head"] and mask["embed"]["embedding"]
  assert not mask["norm"]["weight"] and not mask["moe_layers"]["attn"]["kv_norm"]["weight"]


def _skew_routing(state):
  """Starts every router far from balance: experts 0 and 1 get +0.05 (4 std of the scores at init)."""
  skew = lambda b: b.at[..., :2].set(0.05)
  return state.replace(routing=jax.tree.map(skew, state.routing))


@pytest.mark.parametrize("gamma", [0.0, 2e-3])
def test_bias_balancing_reduces_max_violation(gamma):
  config = _config()
  config.optimizer.lr = 1e-9  # freeze the weights: only the biases move
  cfg, state, step = _setup(config)
  state = _skew_routing(state)
  vio = []
  for i in range(40):
    state, m = step(state, _batch(cfg, batch=8, seed=i), _hparams(gamma=gamma))
    vio.append(float(np.mean(metrics.max_violation(np.asarray(m["expert_load"])))))
  assert vio[0] > 2.0, vio  # two of eight experts take (nearly) every top-2 slot: MaxVio 3
  if gamma:
    assert np.mean(vio[-5:]) < 0.3 * vio[0], vio
  else:
    assert np.mean(vio[-5:]) > 0.9 * vio[0], vio


def test_update_bias_moves_toward_balance():
  cfg = config_lib.tiny(n_mtp_layers=1)
  routing = {"moe_layers": {"ffn": {"gate": {"bias": jnp.zeros((1, 8))}}},
             "mtp_0": {"block": {"ffn": {"gate": {"bias": jnp.zeros(8)}}}}}
  load = jnp.array([[8, 0, 1, 1, 1, 1, 2, 2], [1, 1, 1, 1, 1, 1, 1, 9.0]])
  new = balance.update_bias(routing, load, 0.1, cfg)
  np.testing.assert_allclose(new["moe_layers"]["ffn"]["gate"]["bias"][0], [-.1, .1, .1, .1, .1, .1, 0, 0])
  np.testing.assert_allclose(new["mtp_0"]["block"]["ffn"]["gate"]["bias"], [.1] * 7 + [-.1])
  np.testing.assert_array_equal(routing["moe_layers"]["ffn"]["gate"]["bias"], 0.0)  # input untouched


def test_nonfinite_step_is_skipped_and_counted():
  config = _config()
  cfg, state, step = _setup(config)
  before = jax.tree.map(np.asarray, (state.params, state.routing))
  new, m = step(state, _batch(cfg), _hparams(mtp_lambda=float("nan")))
  assert not bool(m["finite"]) and int(new.nonfinite) == 1 and int(new.step) == 1
  jax.tree.map(np.testing.assert_array_equal, (new.params, new.routing), before)
  new, m = step(new, _batch(cfg), _hparams())
  assert bool(m["finite"]) and int(new.nonfinite) == 0


def test_bad_config_values_name_the_key():
  config = _config()
  config.train.steps = -1
  with pytest.raises(train.ConfigValueError, match="config.train.steps = -1"):
    train.validate(config)
  config = _config()
  config.model.n_activated_experts = 99
  with pytest.raises(train.ConfigValueError, match="n_activated_experts"):
    train.model_config(config, 257)
  config = _config()
  config.model.vocab_size = 100
  with pytest.raises(train.ConfigValueError, match="config.model.vocab_size = 100"):
    train.model_config(config, 257)
  for key, bad in (("impl", "blas"), ("attention_impl", "flash"), ("optimizer_impl", "fused")):
    config = _config()
    config.train[key] = bad
    with pytest.raises(train.ConfigValueError, match=f"config.train.{key} = '{bad}': must be one of"):
      train.model_config(config, 257)


def test_batch_size_warmup_ramps_microbatches():
  config = _config()
  config.train.microbatches, config.train.warmup_microbatches, config.train.batch_warmup_tokens = 5, 1, 1000
  schedule = train._Schedule(config)
  assert [schedule.microbatches(t) for t in (0, 250, 500, 999, 1000, 10**9)] == [1, 2, 3, 4, 5, 5]


def test_learning_rate_shape():
  o = ml_collections.ConfigDict(dict(lr=1.0, warmup_steps=10, decay_start_step=20, decay_steps=10, decay_end_lr=0.1,
                                     tail_start_step=40, tail_lr=0.03))
  lr = optimizer.learning_rate(o)
  np.testing.assert_allclose([lr(s) for s in (0, 5, 10, 19, 25, 30, 39, 40, 99)],
                             [0, .5, 1, 1, .55, .1, .1, .03, .03], atol=1e-6)


def test_adam_matches_optax_and_bf16_moments_stay_close():
  o = ml_collections.ConfigDict(dict(lr=1e-2, warmup_steps=0, decay_start_step=100, decay_steps=10, decay_end_lr=1e-3,
                                     tail_start_step=200, tail_lr=1e-3, b1=0.9, b2=0.95, eps=1e-8,
                                     weight_decay=0.1, grad_clip=1.0, bf16_moments=False))
  params = {"w": {"kernel": jnp.linspace(-1, 1, 12).reshape(3, 4)}, "n": {"weight": jnp.ones(4)}}
  grads = jax.tree.map(lambda p: 0.1 * jnp.cos(3 * p), params)
  reference = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adamw(optimizer.learning_rate(o), b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
                                      mask=optimizer.decay_mask))
  ours = optimizer.make(o)
  o.bf16_moments = True
  low = optimizer.make(o)
  states = [tx.init(params) for tx in (reference, ours, low)]
  for _ in range(3):
    updates = []
    for i, tx in enumerate((reference, ours, low)):
      u, states[i] = tx.update(grads, states[i], params)
      updates.append(u)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), updates[1], updates[0])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-2, atol=1e-6), updates[2], updates[0])
  assert all(m.dtype == jnp.bfloat16 for m in jax.tree.leaves(states[2][1].mu))
  assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(states[2][1].nu))
