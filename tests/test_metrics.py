"""Host-side metrics: MaxVio, the JSONL/TensorBoard writer and its resume truncation, progress, FLOPs, plots."""

import glob
import json
import math
import os
import struct
import time

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from dsv3_jax import config
from dsv3_jax import metrics
from dsv3_jax import param_count
from dsv3_jax import plots as plot


def _lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _events(logdir):
  """Every Event in the TFRecord event files under `logdir` (length, crc, payload, crc per record)."""
  out = []
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      out.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
      pos += 12 + length + 4
  return out


def _scalars(logdir):
  """{(tag, step): value} of the scalar summaries under `logdir`."""
  return {(v.tag, e.step): v.simple_value for e in _events(logdir) for v in e.summary.value}


def test_max_violation_values():
  assert metrics.max_violation(np.array([5, 5, 5, 5])) == 0.0
  assert metrics.max_violation(np.array([4, 0, 0, 0])) == 3.0  # all on one expert: E - 1
  assert metrics.max_violation(np.array([1.0, 2.0, 3.0])) == pytest.approx(0.5)
  np.testing.assert_allclose(metrics.max_violation(np.array([[5, 5], [3, 1], [0, 2]])), [0.0, 0.5, 1.0])
  assert math.isnan(metrics.max_violation(np.zeros(4)))  # no tokens: undefined
  assert isinstance(metrics.max_violation(np.array([1, 2])), float)


@pytest.mark.parametrize("shape", [(), (2, 2, 2), (3, 0)])
def test_max_violation_refuses_other_shapes(shape):
  with pytest.raises(ValueError, match="shape"):
    metrics.max_violation(np.ones(shape))


def test_writer_writes_jsonl_and_tensorboard(tmp_path):
  with metrics.MetricsWriter(str(tmp_path)) as writer:
    writer.write(1, {"loss": np.float32(2.5), "lr": 1e-3})
    writer.write(2, {"loss": 2.0, "lr": 2e-3})
    writer.write(2, {"loss": 2.25}, split="heldout")
  assert _lines(tmp_path / "metrics.jsonl") == [
      {"step": 1, "split": "train", "loss": 2.5, "lr": 1e-3},
      {"step": 2, "split": "train", "loss": 2.0, "lr": 2e-3},
      {"step": 2, "split": "heldout", "loss": 2.25},
  ]
  for split in ("train", "heldout"):
    assert glob.glob(str(tmp_path / "tensorboard" / split / "events.out.tfevents.*"))
  train = _scalars(tmp_path / "tensorboard" / "train")
  assert train[("loss", 1)] == 2.5 and train[("lr", 2)] == pytest.approx(2e-3)
  assert _scalars(tmp_path / "tensorboard" / "heldout") == {("loss", 2): 2.25}


def test_write_is_flushed_before_close(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path))
  writer.write(7, {"loss": 1.0})
  assert _lines(tmp_path / "metrics.jsonl") == [{"step": 7, "split": "train", "loss": 1.0}]
  writer.close()


def test_write_expert_load(tmp_path):
  load = np.array([[4, 4, 4, 4], [8, 4, 2, 2]])  # MaxVio 0 and 1
  with metrics.MetricsWriter(str(tmp_path)) as writer:
    summary = writer.write_expert_load(3, load)
    assert writer.write_expert_load(3, np.zeros((0, 4))) == {}  # no MoE layers
  assert summary == {"maxvio_mean": 0.5, "maxvio_max": 1.0}
  assert _lines(tmp_path / "expert_load.jsonl") == [{"step": 3, "expert_load": load.tolist()}]
  assert not (tmp_path / "metrics.jsonl").exists()  # the caller writes the summary with its own scalars
  train = _scalars(tmp_path / "tensorboard" / "train")
  assert train[("maxvio/layer_0", 3)] == 0.0 and train[("maxvio/layer_1", 3)] == 1.0


def test_disabled_writer_does_nothing(tmp_path):
  workdir = tmp_path / "run"
  writer = metrics.MetricsWriter(str(workdir), enabled=False)
  writer.write(1, {"loss": 1.0})
  # The summary is still computed, for the progress line of a non-zero process.
  assert writer.write_expert_load(1, np.array([[1, 3]])) == {"maxvio_mean": 0.5, "maxvio_max": 0.5}
  assert writer.truncate_after(0) == 0
  writer.close()
  assert not workdir.exists()


def test_reserved_scalar_names(tmp_path):
  with metrics.MetricsWriter(str(tmp_path)) as writer, pytest.raises(ValueError, match="reserved"):
    writer.write(1, {"step": 3.0})


def test_truncate_after_keeps_steps_up_to_the_restored_one(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path))
  for step in range(1, 6):
    writer.write(step, {"loss": float(step)})
    writer.write_expert_load(step, np.array([[step, 1]]))
  writer.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "split": "tr')  # torn by a kill mid-write
  writer = metrics.MetricsWriter(str(tmp_path))
  # Steps 4 and 5 go, each a loss line and an expert-load line, and the torn line.
  assert writer.truncate_after(3) == 2 + 1 + 2
  writer.write(4, {"loss": 40.0})
  writer.close()
  records = _lines(tmp_path / "metrics.jsonl")
  assert [(r["step"], r.get("loss")) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
  assert [r["step"] for r in _lines(tmp_path / "expert_load.jsonl")] == [1, 2, 3]
  assert not glob.glob(str(tmp_path / "*.tmp"))
  # The writer reopened after truncation tells TensorBoard to hide the old run's events from step 4 on.
  starts = [e.step for e in _events(tmp_path / "tensorboard" / "train") if e.session_log.status == 1]
  assert starts == [4]


def test_torn_last_line_is_not_joined_to_the_next_record(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 1.0}\n{"step": 2, "spl')
  with metrics.MetricsWriter(str(tmp_path)) as writer:
    writer.write(2, {"loss": 2.0})
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert json.loads(lines[-1]) == {"step": 2, "split": "train", "loss": 2.0}


class _Clock:
  def __init__(self, times):
    self._times = iter(times)

  def __call__(self):
    return next(self._times)


def test_progress_line_contents_and_eta():
  # The first call comes after compilation (t = 100 s); the step times only count from there.
  progress = metrics.Progress(total_steps=100, start_step=0, clock=_Clock([100.0, 120.0, 130.0]))
  scalars = {"loss": 2.5, "mtp_loss": 2.75, "lr": 3e-4, "grad_norm": 0.5, "tokens_per_s": 12345.0,
             "model_flops_per_s": 1.5e12, "maxvio_mean": 0.25, "unshown": 1.0}
  first = progress.line(10, scalars)
  assert first == ("step  10/100 | loss 2.5000 | mtp 2.7500 | lr 3.00e-04 | gnorm 0.500 | 12,345 tok/s | "
                   "1.50 TFLOP/s | maxvio 0.250 | eta ?")
  assert progress.line(20, scalars).endswith("eta 0:02:40")  # 2 s/step, 80 steps left
  assert progress.line(30, scalars).endswith("eta 0:01:45")  # (20 + 10) s / 20 steps, 70 steps left


def test_progress_shows_only_present_keys():
  progress = metrics.Progress(total_steps=10_000, start_step=5000, clock=_Clock([0.0, 3600.0]))
  progress.line(5000, {})
  line = progress.line(6000, {"loss": 1.0, "model_flops_per_s": 5e9})
  assert line == "step  6000/10000 | loss 1.0000 | 5.0 GFLOP/s | eta 4:00:00"


def test_model_flops_per_token_tiny_by_hand():
  cfg = config.tiny()  # D 64, V 128, H 4, d_qk 16 + 8, d_v 16, one dense + one MoE layer, 8 experts top-2, 1 MTP
  d = 64
  attention = (d * 32 + 32 + 32 * 4 * 24  # wq_a, q_norm, wq_b
               + d * (16 + 8) + 16 + 16 * 4 * (16 + 16)  # wkv_a, kv_norm, wkv_b
               + 4 * 16 * d)  # wo
  expert = 3 * d * 32
  dense_layer = attention + 2 * d + 3 * d * 128
  moe_layer = attention + 2 * d + d * 8 + 8 + (1 + 2) * expert  # gate + bias, shared + 2 routed experts
  main = dense_layer + moe_layer + d + d * 128  # final norm, head; no embedding lookup
  mtp = moe_layer + 2 * d * d + 3 * d + d * 128  # eh_proj, enorm/hnorm/norm, the shared head run again
  seq = 32
  scores = 3 * (2 + 1) * seq * 4 * (24 + 16)  # causal QK^T and PV, forward + backward
  assert metrics.model_flops_per_token(cfg, seq) == 6 * (main + mtp) + scores == 803_520


def test_model_flops_per_token_without_mtp():
  cfg = config.tiny(n_mtp_layers=0)
  counts = param_count.count(cfg)
  expected = 6 * (counts.activated - 128 * 64) + 3 * 2 * 100 * 4 * 40
  assert metrics.model_flops_per_token(cfg, 100, counts) == expected


def _synthetic_workdir(path):
  rng = np.random.default_rng(0)
  with metrics.MetricsWriter(str(path)) as writer:
    writer.write(0, {"unigram_entropy": 4.1}, split="data")
    for step in range(0, 41, 2):
      loss = 4.8 * math.exp(-step / 15) + 3.0
      writer.write(step, {"loss": loss, "mtp_loss": loss + 0.3, "lr": 1e-3 * min(1.0, (step + 1) / 10),
                          "grad_norm": 1.0 + rng.random()})
      writer.write_expert_load(step, rng.integers(0, 100, (3, 8)) + np.arange(8) * step)
    for step in (20, 40):
      loss = 4.8 * math.exp(-step / 15) + 3.1
      writer.write(step, {"loss": loss, "mtp_loss": loss + 0.3}, split="heldout")


def test_plot_writes_the_three_pngs(tmp_path):
  _synthetic_workdir(tmp_path)
  start = time.perf_counter()
  paths = list(plot.write_plots(str(tmp_path)))
  assert time.perf_counter() - start < 30
  assert [os.path.basename(p) for p in paths] == ["loss.png", "lr.png", "expert_load.png"]
  for p in paths:
    assert os.path.dirname(p) == str(tmp_path / "plots")
    with open(p, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_names_a_missing_or_empty_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
    list(plot.write_plots(str(tmp_path)))
  (tmp_path / "metrics.jsonl").write_text("")
  with pytest.raises(ValueError, match="metrics.jsonl holds no records"):
    list(plot.write_plots(str(tmp_path)))
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 1.0}\n')
  with pytest.raises(FileNotFoundError, match="expert_load.jsonl"):
    list(plot.write_plots(str(tmp_path)))
  assert (tmp_path / "plots" / "loss.png").exists()  # the plots before the failure are kept


def test_plot_series_keeps_the_last_value_of_a_repeated_step():
  records = [{"step": 2, "split": "train", "loss": 5.0}, {"step": 1, "split": "train", "loss": 1.0},
             {"step": 2, "split": "train", "loss": 2.0}, {"step": 2, "split": "heldout", "loss": 9.0}]
  steps, values = plot.series(records, "loss")
  assert steps.tolist() == [1, 2] and values.tolist() == [1.0, 2.0]
