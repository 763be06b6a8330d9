"""Dependency simulator for pipeline schedules: makespan, per-rank idle, bubble fraction, peak live activations.

Each rank runs its op list in order. An op starts at max(the rank is free, every input has been produced, plus
`comm` when the producer is another rank) and runs for its cost: F, B, b = B - W, W, and FB = the overlapped
pair as one op (DeepSeek-V3 §3.2.1 measures F&B as one chunk). Inputs are those of `schedules.needs`; an op whose
input can never be produced raises, naming the rank and op.

Reported, as in the DualPipe paper's Table 2:
  makespan T      the latest end time over ranks
  busy_r, idle_r  the sum of op costs on rank r, and T - busy_r
  bubble fraction sum_r idle_r / (ranks * T); the worst rank's idle is what Table 2's bubble column predicts
  peak live       per rank, the most (chunk, micro-batch) activations held at once: forward done, backward
                  (B, b or an FB's backward half) not yet done, counted after each op

`table2` runs all four schedules at one number of pipeline stages and sets them beside the paper's formulas.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from dsv3_jax.pipeline import schedules


@dataclasses.dataclass(frozen=True)
class Costs:
  """Op durations (any time unit) and the point-to-point latency between ranks."""

  F: float = 1.0
  B: float = 2.0
  W: float = 1.0
  FB: float = 3.0
  comm: float = 0.0

  def __post_init__(self):
    for name in ("F", "B", "FB"):
      if not getattr(self, name) > 0:
        raise ValueError(f"cost {name} must be > 0, got {getattr(self, name)}")
    if not 0 <= self.W <= self.B:
      raise ValueError(f"cost W must be in [0, B={self.B}] (b costs B - W), got W={self.W}")
    if not self.comm >= 0:
      raise ValueError(f"comm latency must be >= 0, got {self.comm}")

  def of(self, op: schedules.Op) -> float:
    """Duration of `op`: b is the input-gradient part of a full backward, B - W."""
    return {"F": self.F, "B": self.B, "b": self.B - self.W, "W": self.W, "FB": self.FB}[op.kind]


class Slot(NamedTuple):
  """One op placed on a rank's time line."""

  start: float
  end: float
  op: schedules.Op


@dataclasses.dataclass(frozen=True)
class Result:
  """A timed schedule."""

  schedule: schedules.Schedule
  costs: Costs
  timeline: tuple[tuple[Slot, ...], ...]  # [rank][op]
  makespan: float
  busy: tuple[float, ...]  # [rank]
  peak_live: tuple[int, ...]  # [rank]

  @property
  def idle(self) -> tuple[float, ...]:
    return tuple(self.makespan - b for b in self.busy)

  @property
  def worst_idle(self) -> float:
    return max(self.idle)

  @property
  def bubble_fraction(self) -> float:
    return sum(self.idle) / (self.schedule.n_ranks * self.makespan)


def simulate(schedule: schedules.Schedule, costs: Costs) -> Result:
  """Times `schedule` under `costs`; raises ValueError on a deadlock."""
  ready: dict[schedules.Event, float] = {}
  slots: list[list[Slot]] = [[] for _ in range(schedule.n_ranks)]
  free = [0.0] * schedule.n_ranks
  progressed = True
  while progressed:
    progressed = False
    for rank, ops in enumerate(schedule.ops):
      while len(slots[rank]) < len(ops):
        op = ops[len(slots[rank])]
        inputs = schedules.needs(schedule, rank, op)
        if any(e not in ready for e in inputs):
          break
        start = max([free[rank]] + [ready[e] + (costs.comm if e.rank != rank else 0.0) for e in inputs])
        free[rank] = start + costs.of(op)
        slots[rank].append(Slot(start, free[rank], op))
        ready.update(dict.fromkeys(schedules.produces(rank, op), free[rank]))
        progressed = True
  _raise_if_stuck(schedule, slots, ready)
  return Result(
    schedule=schedule,
    costs=costs,
    timeline=tuple(tuple(s) for s in slots),
    makespan=max(free),
    busy=tuple(sum(costs.of(op) for op in ops) for ops in schedule.ops),
    peak_live=tuple(peak_live(ops) for ops in schedule.ops),
  )


def _raise_if_stuck(schedule: schedules.Schedule, slots: list[list[Slot]], ready: dict) -> None:
  for rank, ops in enumerate(schedule.ops):
    if len(slots[rank]) < len(ops):
      op = ops[len(slots[rank])]
      missing = [e for e in schedules.needs(schedule, rank, op) if e not in ready]
      raise ValueError(f"{schedule.name}: deadlock: rank {rank} op {len(slots[rank])} ({op}) waits forever for "
                       f"{missing[0]}")


def peak_live(ops: tuple[schedules.Op, ...]) -> int:
  """Most (chunk, micro-batch) activations held after any op: forwards done whose backward has not run."""
  live = peak = 0
  for op in ops:
    live += (schedules.forward_part(op) is not None) - (schedules.backward_part(op) is not None)
    peak = max(peak, live)
  return peak


# ------------------------------------------------------------------------------------------------- Table 2


class Table2Row(NamedTuple):
  """One method of Table 2 at PP stages: formulas next to what the simulator measured."""

  name: str
  n_devices: int
  bubble_formula: float
  worst_idle: float
  bubble_fraction: float
  params_per_device: int  # in units of one stage's parameters
  activations_formula: int  # in units of one micro-batch's activations of one stage
  peak_live: int  # simulated, worst rank


def bubble_formula(name: str, n_stages: int, costs: Costs) -> float:
  """Table 2's bubble column (DeepSeek-V3 §3.2.1; DualPipeV from DualPipe's README) at PP = `n_stages`."""
  pp, c = n_stages, costs
  formulas = {
    "1f1b": (pp - 1) * (c.F + c.B),
    "zb1p": (pp - 1) * (c.F + c.B - 2 * c.W),
    "dualpipe": (pp / 2 - 1) * (c.FB + c.B - 3 * c.W),
    "dualpipev": (pp / 2 - 1) * (c.FB + c.B - 3 * c.W),
  }
  return formulas[name]


def activations_formula(name: str, n_stages: int) -> int:
  """Table 2's activations column: PP for 1F1B and ZB1P, PP+1 for DualPipe and DualPipeV."""
  return n_stages + 1 if name in ("dualpipe", "dualpipev") else n_stages


def table2(n_stages: int, n_microbatches: int, costs: Costs) -> list[Table2Row]:
  """All four methods at PP = `n_stages` pipeline stages: DualPipeV then runs on PP/2 devices."""
  if n_stages < 2 or n_stages % 2:
    raise ValueError(f"Table 2 compares at an even number of pipeline stages, got pp={n_stages}")
  rows = []
  for name in schedules.NAMES:
    n_devices = n_stages // 2 if name == "dualpipev" else n_stages
    result = simulate(schedules.generate(name, n_devices, n_microbatches), costs)
    rows.append(Table2Row(
      name=name,
      n_devices=n_devices,
      bubble_formula=bubble_formula(name, n_stages, costs),
      worst_idle=result.worst_idle,
      bubble_fraction=result.bubble_fraction,
      params_per_device=result.schedule.n_chunks,
      activations_formula=activations_formula(name, n_stages),
      peak_live=max(result.peak_live),
    ))
  return rows
