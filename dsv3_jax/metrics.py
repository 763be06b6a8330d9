"""Host-side training metrics: MaxVio, a JSONL + TensorBoard writer, a console progress line, model FLOPs.

Everything here runs on the host between steps, on values already fetched from the devices.

Files under a workdir (names below): `metrics.jsonl` holds one JSON object per `MetricsWriter.write` call,
`{"step": int, "split": str, <scalar>: float, ...}`; `expert_load.jsonl` holds `{"step": int, "expert_load":
[[tokens per expert] per layer]}`; `tensorboard/<split>/` holds event files with the same scalars. Non-finite
values are written as JSON `NaN`/`Infinity` (Python's json reads them back), so a diverged loss stays visible.
"""

from __future__ import annotations

import collections
import json
import os
import tempfile
import time
from collections.abc import Callable
from collections.abc import Mapping
from typing import IO
from typing import Any

import numpy as np
from tensorboardX import SummaryWriter

from dsv3_jax import config as config_lib
from dsv3_jax import param_count

METRICS_FILE = "metrics.jsonl"
EXPERT_LOAD_FILE = "expert_load.jsonl"
TENSORBOARD_DIR = "tensorboard"


def max_violation(load_E: np.ndarray) -> float | np.ndarray:
  """MaxVio = max load / mean load - 1 over the last axis: a float for [E], an array [L] for [L, E]; NaN if no load.

  The balance metric of Wang et al. 2024 ("Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts"),
  which DeepSeek-V3 reports; 0 is perfect balance, E - 1 is every token on one expert.
  """
  load = np.asarray(load_E, dtype=np.float64)
  if load.ndim not in (1, 2) or load.shape[-1] == 0:
    raise ValueError(f"max_violation needs loads shaped [E] or [L, E] with E > 0, got shape {load.shape}")
  with np.errstate(divide="ignore", invalid="ignore"):
    vio = load.max(-1) / load.mean(-1) - 1.0
  return float(vio) if load.ndim == 1 else vio


class MetricsWriter:
  """Appends scalars to <workdir>/metrics.jsonl and TensorBoard; every method is a no-op when not enabled."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.workdir = workdir
    self.enabled = enabled
    self._files: dict[str, IO[str]] = {}
    self._tb: dict[str, SummaryWriter] = {}
    self._purge_step: int | None = None  # set by truncate_after; TensorBoard hides older events from there on
    self._tb_opened = 0
    if enabled:
      os.makedirs(workdir, exist_ok=True)

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def write(self, step: int, scalars: Mapping[str, Any], split: str = "train") -> None:
    """Appends {"step", "split", **scalars} to metrics.jsonl (flushed) and the scalars to tensorboard/<split>."""
    if not self.enabled:
      return
    if "step" in scalars or "split" in scalars:
      raise ValueError("scalar names 'step' and 'split' are reserved for the record's own fields")
    values = {name: float(value) for name, value in scalars.items()}
    self._append(METRICS_FILE, {"step": int(step), "split": split, **values})
    tb = self._summary_writer(split)
    for name, value in values.items():
      tb.add_scalar(name, value, int(step))
    tb.flush()

  def write_expert_load(self, step: int, load_LE: np.ndarray) -> dict[str, float]:
    """Logs per-layer expert token counts and their MaxVio; returns {"maxvio_mean", "maxvio_max"} ({} if L = 0).

    The returned scalars are computed on every process; the caller adds them to its own `write` of that step
    (so each step stays one line of metrics.jsonl) and to its progress line.
    """
    load = np.asarray(load_LE)
    if load.ndim != 2:
      raise ValueError(f"write_expert_load needs loads shaped [L, E], got shape {load.shape}")
    if load.shape[0] == 0:  # a model without MoE layers reports an empty [0, E] load
      return {}
    vio = max_violation(load)
    summary = {"maxvio_mean": float(np.mean(vio)), "maxvio_max": float(np.max(vio))}
    if not self.enabled:
      return summary
    self._append(EXPERT_LOAD_FILE, {"step": int(step), "expert_load": load.tolist()})
    tb = self._summary_writer("train")
    for layer, value in enumerate(vio):
      tb.add_scalar(f"maxvio/layer_{layer}", float(value), int(step))
    return summary

  def truncate_after(self, step: int) -> int:
    """Drops records with step > `step` (and torn lines) from both JSONL files; returns how many were dropped.

    Call it once when resuming from a checkpoint at `step`, before writing: the steps after it are redone and
    would otherwise appear twice. TensorBoard writers opened afterwards purge their events from step + 1 on.
    """
    if not self.enabled:
      return 0
    self._close_handles()
    self._purge_step = int(step) + 1
    return sum(_keep_up_to(os.path.join(self.workdir, name), int(step)) for name in (METRICS_FILE, EXPERT_LOAD_FILE))

  def close(self) -> None:
    """Flushes and closes the files and TensorBoard writers; a later write opens them again."""
    self._close_handles()

  def _append(self, name: str, record: dict[str, Any]) -> None:
    f = self._files.get(name)
    if f is None:
      path = os.path.join(self.workdir, name)
      f = self._files[name] = open(path, "a", encoding="utf-8")
      if _ends_mid_line(path):  # a kill mid-write left a torn line: start ours on a line of its own
        f.write("\n")
    f.write(json.dumps(record) + "\n")
    f.flush()

  def _summary_writer(self, split: str) -> SummaryWriter:
    if split not in self._tb:
      # Event files are named by the second they open in; the suffix keeps a reopened writer from clobbering one.
      self._tb_opened += 1
      self._tb[split] = SummaryWriter(
          os.path.join(self.workdir, TENSORBOARD_DIR, split), purge_step=self._purge_step,
          filename_suffix=f".{os.getpid()}.{self._tb_opened}")
    return self._tb[split]

  def _close_handles(self) -> None:
    for f in self._files.values():
      f.close()
    for tb in self._tb.values():
      tb.close()
    self._files.clear()
    self._tb.clear()


def _ends_mid_line(path: str) -> bool:
  with open(path, "rb") as f:
    if f.seek(0, os.SEEK_END) == 0:
      return False
    f.seek(-1, os.SEEK_END)
    return f.read(1) != b"\n"


def _keep_up_to(path: str, step: int) -> int:
  """Rewrites `path` atomically keeping the records with step <= `step`; returns the number of lines dropped."""
  if not os.path.exists(path):
    return 0
  with open(path, encoding="utf-8") as f:
    lines = [line for line in f if line.strip()]
  kept = [line if line.endswith("\n") else line + "\n" for line in lines if _record_step(line) <= step]
  fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path))
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.writelines(kept)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
  return len(lines) - len(kept)


def _record_step(line: str) -> float:
  """The record's step, or +inf for a line that is not a record (a torn write), so truncation drops it."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError:
    return float("inf")
  step = record.get("step") if isinstance(record, dict) else None
  return step if isinstance(step, int) else float("inf")


# scalar key -> how the progress line shows it, in display order.
_PROGRESS_FIELDS: dict[str, Callable[[float], str]] = {
    "loss": lambda v: f"loss {v:.4f}",
    "ce": lambda v: f"ce {v:.4f}",
    "mtp_loss": lambda v: f"mtp {v:.4f}",
    "lr": lambda v: f"lr {v:.2e}",
    "grad_norm": lambda v: f"gnorm {v:.3f}",
    "tokens_per_s": lambda v: f"{v:,.0f} tok/s",
    "model_flops_per_s": lambda v: f"{v / 1e12:.2f} TFLOP/s" if v >= 1e12 else f"{v / 1e9:.1f} GFLOP/s",
    "maxvio_mean": lambda v: f"maxvio {v:.3f}",
}


class Progress:
  """One console line per call: step/total, the known scalars present, and an ETA from recent step times.

  Shown scalar keys: loss, ce, mtp_loss, lr, grad_norm, tokens_per_s, model_flops_per_s (model FLOPs achieved,
  e.g. tokens_per_s * model_flops_per_token), maxvio_mean; others are ignored. Step times are measured between
  calls, so the time before the first call (compilation) never enters the ETA.
  """

  def __init__(self, total_steps: int, start_step: int, window: int = 20,
               clock: Callable[[], float] = time.perf_counter):
    self.total_steps = total_steps
    self.start_step = start_step
    self._clock = clock
    self._last: tuple[int, float] | None = None  # (step, time) at the previous call
    self._recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=window)  # (seconds, steps)

  def line(self, step: int, scalars: Mapping[str, Any]) -> str:
    """The progress line for `step`; call it at the same point of every logged step."""
    now = self._clock()
    if self._last is not None and step > self._last[0]:
      self._recent.append((now - self._last[1], step - self._last[0]))
    self._last = (step, now)
    width = len(str(self.total_steps))
    parts = [f"step {step:>{width}}/{self.total_steps}"]
    parts += [show(float(scalars[key])) for key, show in _PROGRESS_FIELDS.items() if key in scalars]
    parts.append(f"eta {self._eta(step)}")
    return " | ".join(parts)

  def _eta(self, step: int) -> str:
    if not self._recent:
      return "?"
    seconds_per_step = sum(s for s, _ in self._recent) / sum(n for _, n in self._recent)
    seconds = round(seconds_per_step * max(self.total_steps - step, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def model_flops_per_token(cfg: config_lib.ModelConfig, seq_len: int,
                          counts: param_count.ParamCount | None = None) -> float:
  """Training (forward + backward) model FLOPs per token at `seq_len`, MTP included; no rematerialisation.

  F = 6 (N_act - V D) + 6 (N_mtp_act + K V D) + 3 (L + K) T H (d_qk + d_v)

  with N_act, N_mtp_act = `param_count.count(cfg)` .activated, .mtp_activated; V = vocab_size, D = dim,
  K = n_mtp_layers, L = n_layers, T = seq_len, H = n_heads, d_qk = qk_nope + qk_rope head dims, d_v = v_head_dim.
  - Weights: 6 FLOPs per activated weight per token (2 forward, 4 backward; Kaplan et al. 2020). The embedding
    lookup is a gather, so its V D weights are taken out; the output head is a matmul and stays. Each MTP depth
    runs the shared head once more, which `mtp_activated` leaves out (the weights are shared), so K V D is added
    back. Norm weights and router biases are counted too: under 0.01% of the total.
  - Attention scores: per layer and token, QK^T costs 2 T H d_qk and PV 2 T H d_v forward over T keys, times 3
    for training: PaLM's 12 L H Q T (Chowdhery et al. 2022, App. B) with Q = (d_qk + d_v) / 2 for MLA's unequal
    head dims, halved for the causal mask (a query sees T/2 keys on average), which PaLM does not do. Every MTP
    depth has one attention layer at the same T.
  """
  if counts is None:
    counts = param_count.count(cfg)
  head = cfg.vocab_size * cfg.dim
  weights = (counts.activated - head) + (counts.mtp_activated + cfg.n_mtp_layers * head)
  attention = 3 * (cfg.n_layers + cfg.n_mtp_layers) * seq_len * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim)
  return float(6 * weights + attention)
