"""The benchmark suite's pieces on the tiny config, one repetition each (the real runners' timings are not asserted)."""

import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import torch
from absl import flags

from configs import tiny_cpu
from dsv3_jax import config as config_lib
from dsv3_jax import param_count
from dsv3_jax import torch_parity
from experiments import bench
from experiments import bench_profile
from experiments import bench_report
from experiments import gemm_floor


@pytest.fixture(scope="module", autouse=True)
def _parsed_flags():
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(["bench"])  # default flag values; the functions under test take their settings as arguments


@pytest.fixture(scope="module")
def tiny_config():
  return bench.bench_config(tiny_cpu.get_config(), n_mtp_layers=0)


def test_matmul_peak_both_frameworks():
  for framework in ("jax", "torch"):
    rate = bench.matmul_peak(framework, (64, 32, 48), repetitions=2)
    assert rate["n"] == 2 and 0 < rate["min"] <= rate["median"] <= rate["max"]
  with pytest.raises(ValueError, match="'numpy'"):
    bench.matmul_peak("numpy", (8, 8, 8), repetitions=1)


def test_peer_holds_our_weights(tiny_config):
  """transformers' model built by the bench gives our logits: the side-by-side compares one model."""
  cfg = config_lib.ModelConfig(**tiny_config.model.to_dict())
  rng = np.random.default_rng(3)  # O(1) activations and non-zero routing biases, so a misplaced weight shows
  variables = jax.tree.map(lambda s: (rng.normal(size=s.shape) / np.sqrt(s.shape[-2] if len(s.shape) > 1 else 10.0)
                                      + (len(s.shape) == 1)).astype(np.float32), param_count.variable_shapes(cfg))
  hf = bench.hf_model(variables, cfg).eval()
  tokens = bench.random_tokens(cfg.vocab_size, 2, 12)[:, :-1]
  with torch.no_grad():
    theirs = hf(input_ids=torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
  ours, _, _ = torch_parity.ours_forward(variables, cfg, tokens)
  np.testing.assert_allclose(ours, theirs, atol=1e-5)
  with pytest.raises(ValueError, match="no MTP"):
    bench.hf_model(variables, cfg.replace(n_mtp_layers=1))


class _SlowAfterSwitch:
  """A runner whose first step after another runner's costs 50 ms and the rest nothing."""

  def __init__(self, log):
    self.log, self.steps = log, 0

  def step(self):
    if self.log and self.log[-1] is not self:
      time.sleep(0.05)
    self.log.append(self)
    self.steps += 1

  def sync(self):
    pass


def test_round_robin_settle_steps_are_untimed():
  log = []
  runners = {"a": _SlowAfterSwitch(log), "b": _SlowAfterSwitch(log)}
  times = bench.round_robin(runners, repetitions=3, steps=2, settle=1)
  assert all(r.steps == 3 * (1 + 2) for r in runners.values())
  assert all(len(t) == 3 and max(t) < 0.02 for t in times.values())  # the 50 ms switch fell on the settle step
  times = bench.round_robin(runners, repetitions=3, steps=2)
  assert min(times["a"] + times["b"]) >= 0.025  # without it each repetition pays the switch: 50 ms over 2 steps


def test_train_figures_side_by_side(tiny_config):
  out = bench.train_figures(tiny_config, peak=100.0, repetitions=1, steps=1, warmup=0, torch_compile=False)
  runs = out["runs"]
  assert set(runs) == {"ours", "transformers_eager"}  # MTP off in this config: no ours_with_mtp row
  # Same weights and tokens: the first step's cross-entropy agrees before either side has updated anything.
  assert runs["ours"]["first_step_ce"] == pytest.approx(runs["transformers_eager"]["first_step_ce"], abs=1e-5)
  for run in runs.values():
    assert run["tokens_per_s"]["median"] > 0 and not run["mtp"]
    assert run["mfu"] == pytest.approx(run["model_gflops_per_s"] / 100.0)
  assert out["ours_vs_faster_torch"] == pytest.approx(
      runs["ours"]["tokens_per_s"]["median"] / runs["transformers_eager"]["tokens_per_s"]["median"])
  assert runs["transformers_eager"]["implementation"]["experts"]


def test_gemm_floor_figures_and_their_report(tiny_config):
  floor = gemm_floor.for_run(tiny_config, repetitions=2)
  assert floor["ms"]["n"] == 2 and floor["ms"]["min"] > 0 and floor["devices"] >= 1
  assert floor["flops_per_device"] == sum(g["flops"] for g in floor["groups"])
  run = lambda ms: {"step_ms": {"median": ms}}
  report = {"floor": floor, "train": {"runs": {"ours": run(300.0), "transformers_eager": run(450.0),
                                               "transformers_compiled": run(330.0)}}}
  text = "\n".join(bench_report._md_floor(report))
  floor_ms = floor["ms"]["median"]
  assert "variant (330 ms) takes at most 220 ms" in text
  assert f"took {floor_ms / 220:.0%} of that, and our whole step (300 ms) {300 / floor_ms:.2f}x" in text
  assert set(floor["kernel_ms"]) == {"native", "numpy"} and floor["kernel_ms"][floor["kernel"]] == floor_ms
  assert ", the faster of the two (" in text


def test_seq_sweep_child_process(tiny_config):
  out = bench.seq_sweep(tiny_config, [16], tokens=32, repetitions=1, warmup=0)
  (point,) = out["points"]
  assert (point["seq_len"], point["batch"]) == (16, 2)
  assert point["peak_rss_bytes"] >= point["peak_rss_before_model_bytes"] > 0
  assert point["time_ratio"] == point["flop_ratio"] == 1.0


def test_exclusive_times_take_nested_ops_out():
  ev = lambda op, ts, dur, tid=1: {"tid": tid, "ts": ts, "dur": dur, "args": {"hlo_op": op}}
  events = [ev("while.1", 0, 100), ev("dot.1", 10, 30), ev("dot.1", 50, 30), ev("fusion.2", 60, 10),
            ev("copy.3", 120, 5), ev("dot.9", 0, 40, tid=2)]
  got = bench_profile._exclusive_times(events)
  assert got == {"while.1": 40, "dot.1": 50, "fusion.2": 10, "copy.3": 5, "dot.9": 40}


def test_components_and_matmuls():
  experts = "jit(train_step)/while/body/jvp(Transformer)/Transformer._trunk/while/body/moe_layers/ffn/experts/cond/dot"
  assert bench_profile._component(experts).startswith("MoE routed experts")
  trunk = "jit(train_step)/jvp(Transformer)/Transformer._trunk/broadcast_in_dim"
  assert bench_profile._component(trunk).startswith("layer")
  assert bench_profile._component("jit(train_step)/mul") == "optimizer, clipping, bias update"
  assert bench_profile._component("") == "other"
  assert bench_profile._is_matmul("ynn_fusion.3", experts + "_general")
  assert not bench_profile._is_matmul("ynn_fusion.3", experts)


def test_goals_report_missed_targets():
  report = {"train": {"ours_vs_faster_torch": 1.2, "runs": {"ours": {"mfu": 0.6}}},
            "seq": {"points": [{"seq_len": 512, "time_ratio": 1.0, "flop_ratio": 1.0},
                               {"seq_len": 4096, "time_ratio": 3.0, "flop_ratio": 2.0}]}}
  met = {g["target"]: g["met"] for g in bench_report.goals(report)}
  assert met == {">= 1.5x": False, ">= 50%": True, "time ratio <= FLOP ratio": False}


def test_report_header_says_how_malloc_ran():
  m = {"date": "d", "cpu": "c", "cpus": 2, "jax": "j", "jaxlib": "j", "flax": "f", "devices": 2}
  report = {"machine": m, "repetitions": 1, "config": "c.py", "model": "m", "goals": []}
  for kept, said in ((True, "yes"), (False, "no"), (None, "not recorded")):  # None: a report older than the field
    m.update(malloc_huge_pages=True, malloc_keep_freed=kept)
    if kept is None:
      del m["malloc_keep_freed"]
    assert (f"glibc malloc on huge pages: yes, large freed blocks kept mapped (`dsv3_jax/keep_freed.py`): {said}."
            in bench_report.markdown(report))


def test_replace_section_keeps_the_rest(tmp_path):
  path = tmp_path / "doc.md"
  path.write_text(f"# Title\nhand-written\n{bench_report.MARK_BEGIN}\nold\n{bench_report.MARK_END}\ntail\n")
  bench_report.replace_section(str(path), "new table\n")
  begin, end = bench_report.MARK_BEGIN, bench_report.MARK_END
  assert path.read_text() == f"# Title\nhand-written\n{begin}\nnew table\n{end}\ntail\n"
  broken = tmp_path / "broken.md"
  broken.write_text(f"no markers\n{bench_report.MARK_END}\n")
  with pytest.raises(ValueError, match="bench:begin"):
    bench_report.replace_section(str(broken), "x")
  assert broken.read_text() == f"no markers\n{bench_report.MARK_END}\n"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.md", "doc.md"]  # no temporary file left


def test_bench_gpu_stops_plainly_without_a_gpu():
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-m", "experiments.bench_gpu"], cwd=bench._REPO, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert "needs a GPU, but JAX's backend is 'cpu'" in proc.stderr and "nothing was measured" in proc.stderr


@pytest.mark.parametrize("recipe", ["bf16", "fp8"])
def test_bench_gpu_training_row_runs_each_recipe(tiny_config, recipe):
  """The GPU script's training row, here on CPU (FP8 through the XLA GEMMs): it trains under the recipe asked for."""
  from experiments import bench_gpu

  config = tiny_config.copy_and_resolve_references()
  config.precision.impl = "xla"
  row = bench_gpu.train_step(config, batch=2, seq=16, peak_tflops=1.0, recipe=recipe, repetitions=1, steps=1)
  assert row["recipe"] == recipe and np.isfinite(row["first_ce"])
  assert row["tokens_per_s"]["median"] > 0 and row["mfu"] == pytest.approx(row["model_tflops"])

