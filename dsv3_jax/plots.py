"""Plots of a training workdir's metrics.jsonl and expert_load.jsonl, written into <workdir>/plots/.

loss.png: train and MTP loss against step, held-out losses as points, the unigram entropy as a dashed line when
a "unigram_entropy" scalar was logged. lr.png: learning rate and gradient norm. expert_load.png: for each row
of the logged expert load (the MoE layers, then the MTP layers) a heatmap over time of each expert's share of
the tokens routed in that layer, and MaxVio against step for every row.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
from absl import logging
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dsv3_jax import metrics

PLOTS_DIR = "plots"


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """The records ({"step": int, ...} objects) of a JSONL file; unreadable (torn) lines are skipped with a warning."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist")
  records, skipped = [], 0
  with open(path, encoding="utf-8") as f:
    for line in filter(str.strip, f):
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        record = None
      if isinstance(record, dict) and isinstance(record.get("step"), int):
        records.append(record)
      else:
        skipped += 1
  if skipped:
    logging.warning("%s: skipped %d unreadable line(s)", path, skipped)
  if not records:
    raise ValueError(f"{path} holds no records")
  return records


def series(records: list[dict[str, Any]], key: str, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
  """Steps and values of one scalar in one split, sorted by step; a step logged twice keeps its last value."""
  by_step = {r["step"]: float(r[key]) for r in records if r.get("split") == split and key in r}
  steps = np.array(sorted(by_step), dtype=np.int64)
  return steps, np.array([by_step[s] for s in steps], dtype=np.float64)


def plot_loss(records: list[dict[str, Any]], path: str) -> str:
  """Train and MTP loss lines, held-out points of both, the unigram entropy line; returns `path`."""
  fig = _figure((9, 5))
  ax = fig.add_subplot()
  for key, label in (("loss", "train loss"), ("mtp_loss", "MTP loss")):
    steps, values = series(records, key)
    if steps.size:
      ax.plot(steps, values, lw=1, label=label)
  for key, label, marker in (("loss", "held-out loss", "o"), ("mtp_loss", "held-out MTP loss", "s")):
    steps, values = series(records, key, split="heldout")
    if steps.size:
      ax.plot(steps, values, marker, ms=5, label=label)
  entropy = [float(r["unigram_entropy"]) for r in records if "unigram_entropy" in r]
  if entropy:
    ax.axhline(entropy[-1], ls="--", color="gray", label=f"unigram entropy ({entropy[-1]:.3f})")
  _finish(ax, "loss", "no loss records")
  return _save(fig, path)


def plot_lr(records: list[dict[str, Any]], path: str) -> str:
  """Learning rate (top) and gradient norm (bottom, log scale) against step; returns `path`."""
  fig = _figure((9, 6))
  top, bottom = fig.subplots(2, 1, sharex=True)
  for ax, key, label in ((top, "lr", "learning rate"), (bottom, "grad_norm", "gradient norm")):
    steps, values = series(records, key)
    if steps.size:
      ax.plot(steps, values, lw=1, label=label)
    if key == "grad_norm" and _spans_decades(values):
      ax.set_yscale("log")  # early norms and spikes sit orders of magnitude above the rest
    _finish(ax, label, f"no {key!r} records")
  top.set_xlabel("")
  return _save(fig, path)


def expert_load_array(records: list[dict[str, Any]], source: str) -> tuple[np.ndarray, np.ndarray]:
  """Steps [T] and loads [T, L, E] from expert_load records; a step logged twice keeps its last load."""
  by_step = {r["step"]: r["expert_load"] for r in records if "expert_load" in r}
  if not by_step:
    raise ValueError(f"{source} holds no 'expert_load' records")
  steps = np.array(sorted(by_step), dtype=np.int64)
  try:
    load = np.array([by_step[s] for s in steps], dtype=np.float64)
  except ValueError as e:  # ragged lists: the layer or expert count changed between records
    raise ValueError(f"{source}: expert_load records differ in shape") from e
  if load.ndim != 3:
    raise ValueError(f"{source}: expert_load must be [layers][experts] lists, got shape {load.shape[1:]}")
  return steps, load


def plot_expert_load(records: list[dict[str, Any]], path: str, source: str = metrics.EXPERT_LOAD_FILE) -> str:
  """One heatmap per layer of each expert's share of the layer's tokens over time, then MaxVio; returns `path`."""
  steps, load = expert_load_array(records, source)
  n_layers, n_experts = load.shape[1:]
  total = load.sum(-1, keepdims=True)
  share = np.divide(load, total, out=np.full_like(load, np.nan), where=total > 0)
  ncols = math.ceil(math.sqrt(n_layers + 1))
  nrows = math.ceil((n_layers + 1) / ncols)
  fig = _figure((4.2 * ncols + 1, 3.2 * nrows))
  axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
  vmax = float(np.nanmax(share)) if np.isfinite(share).any() else 1.0
  step_edges, expert_edges = _edges(steps), np.arange(n_experts + 1) - 0.5
  for layer, ax in enumerate(axes[:n_layers]):
    mesh = ax.pcolormesh(step_edges, expert_edges, share[:, layer].T, vmin=0.0, vmax=vmax, cmap="viridis")
    ax.set(title=f"layer {layer}", xlabel="step", ylabel="expert")
  fig.colorbar(mesh, ax=list(axes[:n_layers]), label=f"share of the layer's routed tokens (uniform = 1/{n_experts})")
  _plot_max_violation(axes[n_layers], steps, load)
  for ax in axes[n_layers + 1:]:
    ax.set_axis_off()
  return _save(fig, path)


def write_plots(workdir: str) -> Iterator[str]:
  """Writes loss.png, lr.png and expert_load.png into <workdir>/plots/, yielding each path once written."""
  out_dir = os.path.join(workdir, PLOTS_DIR)
  records = read_jsonl(os.path.join(workdir, metrics.METRICS_FILE))
  os.makedirs(out_dir, exist_ok=True)
  yield plot_loss(records, os.path.join(out_dir, "loss.png"))
  yield plot_lr(records, os.path.join(out_dir, "lr.png"))
  load_path = os.path.join(workdir, metrics.EXPERT_LOAD_FILE)
  yield plot_expert_load(read_jsonl(load_path), os.path.join(out_dir, "expert_load.png"), source=load_path)


def _plot_max_violation(ax: Axes, steps: np.ndarray, load: np.ndarray) -> None:
  vio = np.stack([metrics.max_violation(load_LE) for load_LE in load])  # [T, L]
  n_layers = vio.shape[1]
  colors = _layer_colors(n_layers)
  for layer in range(n_layers):
    # A legend entry per layer only while it stays readable; the mean line carries the summary.
    ax.plot(steps, vio[:, layer], lw=0.8, alpha=0.7, color=colors[layer],
            label=f"layer {layer}" if n_layers <= 8 else None)
  ax.plot(steps, np.nanmean(vio, axis=1), lw=2, color="black", label="mean over layers")
  ax.set(title="MaxVio = max load / mean load - 1", xlabel="step", ylabel="MaxVio")
  ax.set_ylim(bottom=0)
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small")


def _layer_colors(n: int) -> list[Any]:
  return [colormaps["viridis"](i / max(n - 1, 1)) for i in range(n)]


def _spans_decades(values: np.ndarray) -> bool:
  finite = values[np.isfinite(values)]
  return finite.size > 0 and finite.min() > 0 and finite.max() > 10 * finite.min()


def _edges(steps: np.ndarray) -> np.ndarray:
  """Cell edges around each step for pcolormesh: midpoints between steps, half a gap beyond the ends."""
  s = steps.astype(np.float64)
  if s.size == 1:
    return np.array([s[0] - 0.5, s[0] + 0.5])
  mid = (s[1:] + s[:-1]) / 2
  return np.concatenate([[2 * s[0] - mid[0]], mid, [2 * s[-1] - mid[-1]]])


def _figure(size: tuple[float, float]) -> Figure:
  # An Agg canvas on a bare Figure: no pyplot global state and no display backend involved.
  fig = Figure(figsize=size, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def _finish(ax: Axes, ylabel: str, empty_note: str) -> None:
  ax.set(xlabel="step", ylabel=ylabel)
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend()
  else:
    ax.text(0.5, 0.5, empty_note, transform=ax.transAxes, ha="center", va="center", color="gray")


def _save(fig: Figure, path: str) -> str:
  fig.savefig(path, dpi=100)
  return path
