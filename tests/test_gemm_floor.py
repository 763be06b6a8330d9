"""The training step's GEMM list (experiments/gemm_floor.py) against the model's FLOP count, and its timing."""

import math

import jax
import numpy as np
import pytest

from dsv3_jax import config as config_lib
from dsv3_jax import metrics
from dsv3_jax import native
from dsv3_jax import param_count
from experiments import gemm_floor


def _flops(gemms, group=None):
  return sum(g.flops for g in gemms if group is None or g.group == group)


def _vector_params(cfg) -> int:
  """Norm weights and routing biases: counted by the model FLOPs, multiplied by no GEMM."""
  leaves = jax.tree_util.tree_flatten_with_path(param_count.variable_shapes(cfg))[0]
  return sum(math.prod(v.shape) for p, v in leaves if "norm" in jax.tree_util.keystr(p)
             or jax.tree_util.keystr(p).startswith("['routing']"))


@pytest.mark.parametrize("preset,batch,seq,devices", [("small", 16, 128, 2), ("tiny", 4, 32, 1)])
def test_the_gemms_are_the_model_flops(preset, batch, seq, devices):
  """Every weight's three products and nothing else: the list's FLOPs over all devices are
  `metrics.model_flops_per_token` without attention, less the norms' and biases' 6 FLOPs per weight."""
  cfg = config_lib.preset(preset, vocab_size=257, n_mtp_layers=0)
  gemms = gemm_floor.step_gemms(cfg, batch, seq, devices)
  tokens = batch * seq
  attention = 3 * cfg.n_layers * seq * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * tokens
  weights = metrics.model_flops_per_token(cfg, seq) * tokens - attention - 6 * _vector_params(cfg) * tokens
  assert devices * (_flops(gemms) - _flops(gemms, "attention")) == weights


def test_attention_tiles_lie_between_the_causal_and_the_full_square():
  cfg = config_lib.small(vocab_size=257, n_mtp_layers=0)
  per_score = 2 * (4 * cfg.qk_head_dim + 3 * cfg.v_head_dim)  # scores twice, P V, dP, dV, dQ, dK
  one_layer = lambda seq: _flops(gemm_floor.step_gemms(cfg.replace(n_layers=1), 1, seq), "attention")
  square = gemm_floor.QUERY_ROWS  # one query tile: all of its keys
  assert one_layer(square) == cfg.n_heads * per_score * square * square
  seq = 8 * gemm_floor.QUERY_ROWS
  causal = cfg.n_heads * per_score * seq * (seq + 1) // 2
  assert causal < one_layer(seq) < cfg.n_heads * per_score * seq * seq


def test_routed_rows_spread_over_the_experts():
  cfg = config_lib.small(vocab_size=257, n_mtp_layers=0)
  tokens = 1000  # 2000 routed rows over 32 experts: 16 experts with 63 rows, 16 with 62
  experts = gemm_floor._experts(tokens, cfg)
  assert {(g.m, g.count) for g in experts if g.m < 100} == {(63, 16), (62, 16)}
  # Each routed row once in each product over dim: x w1, x w3, dy w2^T.
  assert sum(g.m * g.count for g in experts if g.k == cfg.dim and not g.trans_a) == 3 * 2000
  assert _flops(experts) == 6 * 3 * cfg.dim * cfg.moe_inter_dim * tokens * cfg.n_activated_experts
  assert all(g.group == "routed experts" for g in experts)
  with pytest.raises(ValueError, match="batch 3 does not split over 2 devices"):
    gemm_floor.step_gemms(cfg, 3, 16, 2)


@pytest.mark.parametrize("kernel", ["native", "numpy"])
def test_time_gemms_runs_every_thread_and_reports_groups(kernel):
  gemms = [gemm_floor.Gemm("a", 32, 16, 8), gemm_floor.Gemm("b", 16, 32, 8, trans_a=True, count=3),
           gemm_floor.Gemm("b", 8, 16, 32, trans_b=True)]
  out = gemm_floor.time_gemms(gemms, threads=2, repetitions=3, warmup=1, kernel=kernel)
  assert len(out["seconds"]) == 3 and min(out["seconds"]) > 0
  assert set(out["group_seconds"]) == {"a", "b"}
  assert out["one_blas_thread"]  # numpy's wheel bundles OpenBLAS, which has the per-thread setter
  a, b, c = gemm_floor._operands(gemms[1], np.random.default_rng(0))
  assert a.shape == (3, 32, 16) and b.shape == (3, 32, 8) and c.shape == (3, 16, 8)  # A as stored: [count, k, m]
  with pytest.raises(ValueError, match="'native' or 'numpy'"):
    gemm_floor.product("torch")


def test_time_gemms_passes_a_thread_failure_on():
  """A product that cannot run fails the call instead of leaving the other threads waiting at the barrier."""
  with pytest.raises(ValueError):
    gemm_floor.time_gemms([gemm_floor.Gemm("bad", -1, 4, 4)], threads=2, repetitions=1)


@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
def test_native_gemm_batch_matches_numpy(trans_a, trans_b):
  """The kernels' GEMM as the floor calls it, on a product large enough to be blocked (m n k > 1e6) and a small one."""
  rng = np.random.default_rng(0)
  for count, m, k, n in ((2, 300, 256, 160), (3, 7, 5, 9)):
    g = gemm_floor.Gemm("x", m, k, n, trans_a=trans_a, trans_b=trans_b, count=count)
    a, b, c = gemm_floor._operands(g, rng)
    gemm_floor.product("native")(g, a, b, c)
    want = np.matmul(a.swapaxes(1, 2) if trans_a else a, b.swapaxes(1, 2) if trans_b else b)
    np.testing.assert_allclose(c, want, rtol=2e-5, atol=2e-5 * np.sqrt(k))
  with pytest.raises(ValueError, match="gemm_batch: b must be C-contiguous float32"):
    native.gemm_batch(a, np.zeros((3, 1, 1), np.float32), c, trans_a, trans_b)
  with pytest.raises(ValueError, match="gemm_batch: a must be"):
    native.gemm_batch(a.astype(np.float64), b, c, trans_a, trans_b)
