"""Lockstep form of a schedule for SPMD execution: one op per rank per tick, all ranks advancing together.

An SPMD executor (one `lax.scan` step per tick, a `ppermute` at the end of each tick) needs every rank to run
one op, or idle, per tick. `lockstep` assigns ticks greedily in each rank's op order: a rank runs its next op at
the first tick at which all of that op's inputs were produced in an earlier tick, and idles until then. Every
op costs one tick, so FB pairs, b and W each take a tick.

Communication happens at the end of a tick: `transfers(lockstep, tick)` lists what each rank sends then (an
activation to the downstream (rank, chunk), a gradient to the upstream one). A received item can wait several
ticks before its consumer runs, so the executor keeps a FIFO per receiving (rank, chunk, kind);
`max_in_flight` is the most items ever waiting in one such FIFO (arrived, not yet consumed), which sizes it.
DualPipeV's turn-around on its last rank is a local transfer (src_rank == dst_rank) and is counted the same way.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import NamedTuple

from dsv3_jax.pipeline import schedules

CHANNELS = ("act", "grad")


@dataclasses.dataclass(frozen=True)
class Lockstep:
  """A schedule laid out on ticks."""

  schedule: schedules.Schedule
  table: tuple[tuple[schedules.Op | None, ...], ...]  # [tick][rank]; None = idle
  max_in_flight: dict[str, int]  # per channel kind ("act", "grad"): the most items waiting in one FIFO

  def n_ticks(self) -> int:
    return len(self.table)


class Transfer(NamedTuple):
  """One item sent at the end of a tick from the (rank, chunk) that produced it to the one that consumes it."""

  kind: str  # "act" (forward output, goes downstream) or "grad" (input gradient, goes upstream)
  src_rank: int
  src_chunk: int
  dst_rank: int
  dst_chunk: int
  mb: int  # micro-batch index within the chunks' stream

  @property
  def local(self) -> bool:
    """True for DualPipeV's turn-around on its last rank: no communication, a hand-off between chunks."""
    return self.src_rank == self.dst_rank


def lockstep(schedule: schedules.Schedule) -> Lockstep:
  """Assigns each op a tick (greedy per rank, inputs from earlier ticks only); raises on a deadlock."""
  produced: dict[schedules.Event, int] = {}
  pos = [0] * schedule.n_ranks
  table = []
  while any(pos[r] < len(ops) for r, ops in enumerate(schedule.ops)):
    tick = len(table)
    row = []
    for rank, ops in enumerate(schedule.ops):
      op = ops[pos[rank]] if pos[rank] < len(ops) else None
      if op is not None and all(produced.get(e, tick) < tick for e in schedules.needs(schedule, rank, op)):
        row.append(op)
      else:
        row.append(None)
    if all(op is None for op in row):
      schedules.check_deadlock_free(schedule)
      raise AssertionError("no rank can progress although the schedule is deadlock-free")
    for rank, op in enumerate(row):
      if op is not None:
        produced.update(dict.fromkeys(schedules.produces(rank, op), tick))
        pos[rank] += 1
    table.append(tuple(row))
  table = tuple(table)
  return Lockstep(schedule, table, _max_in_flight(schedule, table))


def transfers(ls: Lockstep, tick: int) -> list[Transfer]:
  """What the ranks send at the end of `tick`, in rank order (local turn-arounds included, see Transfer.local)."""
  if not 0 <= tick < ls.n_ticks():
    raise ValueError(f"tick {tick} out of range [0, {ls.n_ticks()})")
  return _row_transfers(ls.schedule, ls.table[tick])


def _row_transfers(schedule: schedules.Schedule, row: tuple[schedules.Op | None, ...]) -> list[Transfer]:
  out = []
  for rank, op in enumerate(row):
    if op is None:
      continue
    if (f := schedules.forward_part(op)) is not None and (down := schedule.downstream(rank, f[0])) is not None:
      out.append(Transfer("act", rank, f[0], down[0], down[1], f[1]))
    if (b := schedules.backward_part(op)) is not None and (up := schedule.upstream(rank, b[0])) is not None:
      out.append(Transfer("grad", rank, b[0], up[0], up[1], b[1]))
  return out


def _max_in_flight(schedule: schedules.Schedule, table: tuple[tuple[schedules.Op | None, ...], ...]) -> dict[str, int]:
  """Per channel kind, the most items that have arrived at one receiving (rank, chunk) and are not consumed yet."""
  arrive_at = collections.defaultdict(list)  # (kind, rank, chunk) -> ticks at which items become readable
  consume_at = collections.defaultdict(list)
  for tick in range(len(table)):
    for t in _row_transfers(schedule, table[tick]):
      arrive_at[(t.kind, t.dst_rank, t.dst_chunk)].append(tick + 1)
    for rank, op in enumerate(table[tick]):
      if op is None:
        continue
      if (f := schedules.forward_part(op)) is not None and schedule.upstream(rank, f[0]) is not None:
        consume_at[("act", rank, f[0])].append(tick)
      if (b := schedules.backward_part(op)) is not None and schedule.downstream(rank, b[0]) is not None:
        consume_at[("grad", rank, b[0])].append(tick)
  most = dict.fromkeys(CHANNELS, 0)
  for key, arrivals in arrive_at.items():
    for tick in range(len(table)):
      waiting = sum(a <= tick for a in arrivals) - sum(c < tick for c in consume_at[key])
      most[key[0]] = max(most[key[0]], waiting)
  return most
