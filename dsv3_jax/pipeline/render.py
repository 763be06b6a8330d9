"""Text and PNG renderings of simulated schedules, the lockstep table, and the Table 2 comparison.

Text timeline: one character per `unit` of time per rank, `F` forward, `B` full backward, `b` input-gradient
backward, `W` weight gradient, `X` overlapped F&B pair, `.` idle (the notation of the DualPipe worked examples).

PNG, in the manner of DeepSeek-V3's Figure 5: one row per device, one box per op spanning its simulated time.
The fill colour is the micro-batch (global index, so the two DualPipe directions never share a colour); the kind
is the fill style (F solid, B and b lighter and hatched // and \\\\, W white with a coloured xx hatch, an F&B pair
split into a forward top half and a backward bottom half); the direction or chunk is the label colour (chunk 0
black digits, chunk 1 white digits with a dark outline, as the paper's figure prints its two directions).
"""

from __future__ import annotations

import os
import tempfile

from matplotlib import colormaps
from matplotlib import patches
from matplotlib import patheffects
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dsv3_jax.pipeline import lockstep as lockstep_lib
from dsv3_jax.pipeline import schedules
from dsv3_jax.pipeline import simulate

CHARS = {"F": "F", "B": "B", "b": "b", "W": "W", "FB": "X"}


def _units(t: float, unit: float, what: str) -> int:
  n = round(t / unit)
  if abs(n * unit - t) > 1e-9 * max(1.0, abs(t)):
    raise ValueError(f"{what} at time {t} is not a multiple of the text unit {unit}; pass a unit that divides "
                     "every op cost and the comm latency")
  return n


def timeline_bars(result: simulate.Result, unit: float = 1.0) -> list[str]:
  """One line per rank, `r0 |FFFFbWFXXX...|`, one character per `unit` of time."""
  if not unit > 0:
    raise ValueError(f"text unit must be > 0, got {unit}")
  width = _units(result.makespan, unit, "the makespan")
  label = len(str(result.schedule.n_ranks - 1))
  lines = []
  for rank, slots in enumerate(result.timeline):
    cells = ["."] * width
    for slot in slots:
      lo = _units(slot.start, unit, f"rank {rank} op {slot.op}")
      hi = _units(slot.end, unit, f"rank {rank} op {slot.op}")
      cells[lo:hi] = CHARS[slot.op.kind] * (hi - lo)
    lines.append(f"r{rank:<{label}} |{''.join(cells)}|")
  return lines


def timeline_text(result: simulate.Result, unit: float = 1.0) -> str:
  """The bars with each rank's busy and idle time, and a summary line."""
  lines = [f"{bar}  busy {_num(b)}, idle {_num(i)}"
           for bar, b, i in zip(timeline_bars(result, unit), result.busy, result.idle, strict=True)]
  lines.append(f"makespan {_num(result.makespan)}, worst-rank idle {_num(result.worst_idle)}, bubble fraction "
               f"{result.bubble_fraction:.1%}, peak live activations per rank {list(result.peak_live)}")
  return "\n".join(lines)


def op_lists_text(schedule: schedules.Schedule) -> str:
  """Each rank's op order, `r0: F0.0 F0.1 ...`."""
  return "\n".join(f"r{rank}: " + " ".join(map(str, ops)) for rank, ops in enumerate(schedule.ops))


def lockstep_text(ls: lockstep_lib.Lockstep) -> str:
  """The tick table: a row per tick, a column per rank, `.` for idle."""
  header = "t   " + "".join(f"r{r:<10}" for r in range(ls.schedule.n_ranks))
  rows = [f"{t:<4}" + "".join(f"{str(op) if op else '.':<11}" for op in row) for t, row in enumerate(ls.table)]
  return "\n".join(line.rstrip() for line in [header, *rows])


def table2_text(rows: list[simulate.Table2Row], n_stages: int, n_microbatches: int, costs: simulate.Costs) -> str:
  """Table 2 (bubble formula vs simulated worst-rank idle, params and activations per device) as aligned text."""
  head = (f"Table 2 at PP={n_stages} stages, N={n_microbatches} micro-batches, F={_num(costs.F)} B={_num(costs.B)} "
          f"W={_num(costs.W)} F&B={_num(costs.FB)} comm={_num(costs.comm)}")
  cols = (f"{'method':<10}{'devices':>8}{'bubble formula':>16}{'sim worst idle':>16}{'bubble %':>10}"
          f"{'params/dev':>12}{'act/dev formula':>17}{'sim peak act':>14}")
  lines = [head] + (["(the formulas leave out the comm latency; the simulation includes it)"] if costs.comm else [])
  lines.append(cols)
  for r in rows:
    lines.append(f"{r.name:<10}{r.n_devices:>8}{_num(r.bubble_formula):>16}{_num(r.worst_idle):>16}"
                 f"{r.bubble_fraction:>10.1%}{f'{r.params_per_device}x':>12}{r.activations_formula:>17}"
                 f"{r.peak_live:>14}")
  return "\n".join(lines)


def report(name: str, n_ranks: int, n_microbatches: int, costs: simulate.Costs, png_path: str | None,
           unit: float = 1.0, with_table2: bool = True) -> str:
  """The CLI's output: op lists, timeline, lockstep tick count and Table 2; the PNG is written last, once every
  part has been computed, so bad input writes nothing."""
  schedule = schedules.generate(name, n_ranks, n_microbatches)
  result = simulate.simulate(schedule, costs)
  ls = lockstep_lib.lockstep(schedule)
  parts = [
    f"{name}: {n_ranks} ranks, {schedule.n_stages} stages, N={n_microbatches} micro-batches",
    "Op order per rank", op_lists_text(schedule),
    f"Timeline (one character = {_num(unit)} time unit{'s' if unit != 1 else ''})", timeline_text(result, unit),
    f"Lockstep: {ls.n_ticks()} ticks, most items waiting per FIFO {ls.max_in_flight}",
  ]
  if with_table2:
    rows = simulate.table2(n_ranks, n_microbatches, costs)
    parts.append(table2_text(rows, n_ranks, n_microbatches, costs))
  if png_path:
    parts.append(f"wrote {write_png(result, png_path)}")
  return "\n".join(parts)


def _num(x: float) -> str:
  return f"{x:g}"


# ----------------------------------------------------------------------------------------------------- PNG


def write_png(result: simulate.Result, path: str) -> str:
  """Draws the simulated timeline (Figure 5 style) into `path`, written atomically; returns `path`."""
  schedule = result.schedule
  fig = Figure(figsize=(max(8.0, 0.22 * result.makespan + 2), 0.55 * schedule.n_ranks + 2.2), layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  colors = _mb_colors(schedule.n_microbatches)
  for rank, slots in enumerate(result.timeline):
    for slot in slots:
      _draw_slot(ax, schedule, rank, slot, colors)
  _decorate(ax, result)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".png", dir=directory)
  os.close(fd)
  try:
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def _mb_colors(n: int) -> list[tuple[float, ...]]:
  cmap = colormaps["tab20"] if n <= 20 else colormaps["turbo"]
  return [cmap(i / 20 if n <= 20 else i / max(n - 1, 1)) for i in range(n)]


def _lighten(color: tuple[float, ...], amount: float = 0.45) -> tuple[float, ...]:
  return tuple(c + (1 - c) * amount for c in color[:3]) + (1.0,)


def _draw_slot(ax: Axes, schedule: schedules.Schedule, rank: int, slot: simulate.Slot, colors: list) -> None:
  y, width = rank, slot.end - slot.start
  op = slot.op
  if op.kind == "FB":
    _box(ax, schedule, slot.start, y - 0.4, width, 0.4, "F", op.chunk, op.mb, colors)
    _box(ax, schedule, slot.start, y, width, 0.4, "B", op.b_chunk, op.b_mb, colors)
  else:
    _box(ax, schedule, slot.start, y - 0.4, width, 0.8, op.kind, op.chunk, op.mb, colors)


def _box(ax: Axes, schedule: schedules.Schedule, x: float, y: float, w: float, h: float, kind: str, chunk: int,
         mb: int, colors: list) -> None:
  color = colors[schedule.global_mb(chunk, mb)]
  style = {
    "F": dict(facecolor=color, hatch=None),
    "B": dict(facecolor=_lighten(color), hatch="//"),
    "b": dict(facecolor=_lighten(color), hatch="\\\\"),
    "W": dict(facecolor="white", hatch="xx"),
  }[kind]
  ax.add_patch(patches.Rectangle((x, y), w, h, edgecolor=color if kind == "W" else "black", linewidth=0.6,
                                 **style))
  text = ax.text(x + w / 2, y + h / 2, str(mb), ha="center", va="center", fontsize=6.5,
                 color="black" if chunk == 0 else "white", fontweight="bold")
  if chunk == 1:
    text.set_path_effects([patheffects.withStroke(linewidth=1.6, foreground="black")])


def _decorate(ax: Axes, result: simulate.Result) -> None:
  schedule, costs = result.schedule, result.costs
  ax.set_xlim(0, result.makespan)
  ax.set_ylim(schedule.n_ranks - 0.5, -0.5)
  ax.set_yticks(range(schedule.n_ranks), [f"device {r}" for r in range(schedule.n_ranks)])
  ax.set_xlabel("time")
  ax.set_title(f"{schedule.name}: {schedule.n_ranks} ranks, N={schedule.n_microbatches}, F={costs.F:g} B={costs.B:g} "
               f"W={costs.W:g} F&B={costs.FB:g} comm={costs.comm:g}; makespan {result.makespan:g}, "
               f"bubble {result.bubble_fraction:.1%}", fontsize=9)
  gray = (0.6, 0.6, 0.6, 1.0)
  handles = [
    patches.Patch(facecolor=gray, edgecolor="black", label="F forward"),
    patches.Patch(facecolor=_lighten(gray), edgecolor="black", hatch="//", label="B full backward"),
    patches.Patch(facecolor=_lighten(gray), edgecolor="black", hatch="\\\\", label="b input-grad backward"),
    patches.Patch(facecolor="white", edgecolor=gray, hatch="xx", label="W weight grad"),
    patches.Patch(facecolor="white", edgecolor="black", label="F&B: top F, bottom B"),
  ]
  what = "direction" if schedule.name == "dualpipe" else "chunk"
  title = "colour = micro-batch"
  if schedule.n_chunks == 2:
    title += f"; black digits = {what} 0, white digits = {what} 1"
  ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=5, fontsize=7, title=title,
            title_fontsize=7)
