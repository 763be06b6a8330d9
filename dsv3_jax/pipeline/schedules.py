"""Pipeline schedules as data: per-rank op lists for 1F1B, ZB1P, DualPipe and DualPipeV, and their validation.

A schedule is a tuple of op lists, one per pipeline rank, in execution order. Nothing here runs a model: the
simulator (`simulate.py`) times a schedule, `lockstep.py` turns it into one-op-per-tick form for SPMD execution,
and an executor runs it. Ops:

  F   forward of one micro-batch through one model chunk of this rank
  B   full backward (input and weight gradients)
  b   input-gradient-only backward; its weight gradient is queued on the rank (zero-bubble split)
  W   deferred weight gradient: pops the oldest queued b of this rank (FIFO); carries that b's chunk and mb
  FB  a forward of one chunk overlapped with a full backward of the other (DeepSeek-V3 §3.2.1, Figure 4)

Placement (which model stage a rank's chunk holds, where its activations come from and go):
  1f1b, zb1p  one chunk per rank; rank r holds stage r; micro-batch m is global micro-batch m.
  dualpipe    PP (even) ranks, two chunks = two directions. Direction 0 micro-batches m = 0..N/2-1 enter rank 0
              and flow 0 -> PP-1 (rank r, chunk 0 = stage r); direction 1 micro-batches enter rank PP-1 and flow
              PP-1 -> 0 (rank r, chunk 1 = stage PP-1-r). Global micro-batch d*N/2 + m. Stage s exists twice
              (rank s chunk 0, rank PP-1-s chunk 1); their parameter gradients are summed.
  dualpipev   R ranks, 2R stages: rank r chunk 0 = stage r, chunk 1 = stage 2R-1-r. One stream of N micro-batches
              flows through chunk 0 of ranks 0..R-1, turns around locally on rank R-1 and flows back through chunk 1
              of ranks R-1..0; the loss is on rank 0.

Dependencies (shared by validation, the simulator and the lockstep conversion): the forward of (rank, chunk, mb)
needs the forward output of its upstream (rank, chunk) for the same mb (none on the first stage); its backward
needs its own forward and the backward output of its downstream (rank, chunk) (none on the last stage, where the
loss is); a W needs the b it pops.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import NamedTuple

NAMES = ("1f1b", "zb1p", "dualpipe", "dualpipev")
KINDS = ("F", "B", "b", "W", "FB")
BACKWARD_KINDS = ("B", "b")


class Op(NamedTuple):
  """One op of a rank; `str(op)` is the reference notation (F0.3, b1.0, W1.0, F0.3&B1.1)."""

  kind: str
  chunk: int
  mb: int
  b_chunk: int = -1
  b_mb: int = -1

  def __str__(self) -> str:
    if self.kind == "FB":
      return f"F{self.chunk}.{self.mb}&B{self.b_chunk}.{self.b_mb}"
    return f"{self.kind}{self.chunk}.{self.mb}"


class Event(NamedTuple):
  """A value an op produces: "act" (forward output) or "grad" (input gradient) of (rank, chunk, mb)."""

  kind: str
  rank: int
  chunk: int
  mb: int


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Per-rank op lists of one training step, with the placement of model stages on (rank, chunk)."""

  name: str
  n_ranks: int
  n_microbatches: int
  n_chunks: int
  n_stages: int
  ops: tuple[tuple[Op, ...], ...]

  @property
  def mbs_per_chunk(self) -> int:
    """Length of each chunk's micro-batch stream: N/2 per direction for DualPipe, N otherwise."""
    return self.n_microbatches // 2 if self.name == "dualpipe" else self.n_microbatches

  def stage(self, rank: int, chunk: int) -> int:
    """The model stage that `chunk` of `rank` holds."""
    self._check_slot(rank, chunk)
    if chunk == 0:
      return rank
    if self.name == "dualpipe":
      return self.n_ranks - 1 - rank
    return 2 * self.n_ranks - 1 - rank

  def global_mb(self, chunk: int, mb: int) -> int:
    """Index into the step's N micro-batches of micro-batch `mb` of `chunk`'s stream."""
    if not 0 <= mb < self.mbs_per_chunk:
      raise ValueError(f"micro-batch {mb} out of range [0, {self.mbs_per_chunk}) for {self.name}")
    return chunk * self.mbs_per_chunk + mb if self.name == "dualpipe" else mb

  def upstream(self, rank: int, chunk: int) -> tuple[int, int] | None:
    """The (rank, chunk) whose forward output feeds this one; None on the first stage (it reads data)."""
    self._check_slot(rank, chunk)
    step = self._step(chunk)
    if self.name == "dualpipev" and chunk == 1 and rank == self.n_ranks - 1:
      return (rank, 0)
    prev = rank - step
    return (prev, chunk) if 0 <= prev < self.n_ranks else None

  def downstream(self, rank: int, chunk: int) -> tuple[int, int] | None:
    """The (rank, chunk) this forward output goes to; None on the last stage (it computes the loss)."""
    self._check_slot(rank, chunk)
    if self.name == "dualpipev" and chunk == 0 and rank == self.n_ranks - 1:
      return (rank, 1)
    nxt = rank + self._step(chunk)
    return (nxt, chunk) if 0 <= nxt < self.n_ranks else None

  def _step(self, chunk: int) -> int:
    """Rank increment along the data flow of `chunk`: +1 for chunk 0, -1 for the returning chunk 1."""
    return 1 if chunk == 0 else -1

  def _check_slot(self, rank: int, chunk: int) -> None:
    if not (0 <= rank < self.n_ranks and 0 <= chunk < self.n_chunks):
      raise ValueError(f"(rank {rank}, chunk {chunk}) is not in {self.name} with {self.n_ranks} ranks")


# ---------------------------------------------------------------------------------------------- dependencies


def forward_part(op: Op) -> tuple[int, int] | None:
  """(chunk, mb) that `op` forwards, if any."""
  return (op.chunk, op.mb) if op.kind in ("F", "FB") else None


def backward_part(op: Op) -> tuple[int, int] | None:
  """(chunk, mb) that `op` backwards (B, b or the backward half of FB), if any."""
  if op.kind in BACKWARD_KINDS:
    return (op.chunk, op.mb)
  return (op.b_chunk, op.b_mb) if op.kind == "FB" else None


def needs(schedule: Schedule, rank: int, op: Op) -> list[Event]:
  """Events `op` on `rank` waits for (each event's `rank` is its producer)."""
  events = []
  if (f := forward_part(op)) is not None and (up := schedule.upstream(rank, f[0])) is not None:
    events.append(Event("act", up[0], up[1], f[1]))
  if (b := backward_part(op)) is not None:
    events.append(Event("act", rank, b[0], b[1]))
    if (down := schedule.downstream(rank, b[0])) is not None:
      events.append(Event("grad", down[0], down[1], b[1]))
  if op.kind == "W":
    events.append(Event("grad", rank, op.chunk, op.mb))
  return events


def produces(rank: int, op: Op) -> list[Event]:
  """Events that `op` on `rank` makes available when it finishes."""
  events = []
  if (f := forward_part(op)) is not None:
    events.append(Event("act", rank, f[0], f[1]))
  if (b := backward_part(op)) is not None:
    events.append(Event("grad", rank, b[0], b[1]))
  return events


# ------------------------------------------------------------------------------------------------ validation


def validate(schedule: Schedule) -> None:
  """Raises ValueError unless every rank's list is well formed, complete, FIFO-consistent and deadlock-free.

  Per (rank, chunk) each micro-batch has exactly one forward and one backward (B, b or an FB's backward half),
  the forward comes first, every b is followed by the W that pops it in FIFO order, no W pops an empty queue,
  the queue is empty at the end, and running the ranks against each other's outputs finishes every op.
  """
  if schedule.name not in NAMES:
    raise ValueError(f"unknown schedule {schedule.name!r}; expected one of {NAMES}")
  if len(schedule.ops) != schedule.n_ranks:
    raise ValueError(f"{schedule.name}: {len(schedule.ops)} op lists for {schedule.n_ranks} ranks")
  for rank, ops in enumerate(schedule.ops):
    _check_rank(schedule, rank, ops)
  check_deadlock_free(schedule)


def _check_rank(schedule: Schedule, rank: int, ops: tuple[Op, ...]) -> None:
  n = schedule.mbs_per_chunk
  fwd_at, bwd_at = {}, {}
  queue = collections.deque()
  for i, op in enumerate(ops):
    where = f"{schedule.name} rank {rank} op {i} ({op})"
    _check_op_fields(schedule, op, where)
    if (f := forward_part(op)) is not None:
      if f in fwd_at:
        raise ValueError(f"{where}: second forward of chunk {f[0]} micro-batch {f[1]}")
      fwd_at[f] = i
    if (b := backward_part(op)) is not None:
      if b in bwd_at:
        raise ValueError(f"{where}: second backward of chunk {b[0]} micro-batch {b[1]}")
      if fwd_at.get(b, i) >= i:
        raise ValueError(f"{where}: backward of chunk {b[0]} micro-batch {b[1]} before its forward")
      bwd_at[b] = i
    if op.kind == "b":
      queue.append((op.chunk, op.mb))
    if op.kind == "W":
      if not queue:
        raise ValueError(f"{where}: W with no queued b")
      if queue[0] != (op.chunk, op.mb):
        raise ValueError(f"{where}: W must pop the oldest queued b {queue[0]} (FIFO)")
      queue.popleft()
  expected = {(c, m) for c in range(schedule.n_chunks) for m in range(n)}
  for what, seen in (("forward", fwd_at), ("backward", bwd_at)):
    if missing := sorted(expected - set(seen)):
      raise ValueError(f"{schedule.name} rank {rank}: no {what} of (chunk, micro-batch) {missing[:4]}")
  if queue:
    raise ValueError(f"{schedule.name} rank {rank}: W queue not empty at the end: {list(queue)}")


def _check_op_fields(schedule: Schedule, op: Op, where: str) -> None:
  if op.kind not in KINDS:
    raise ValueError(f"{where}: unknown kind {op.kind!r}; expected one of {KINDS}")
  pairs = [(op.chunk, op.mb)] + ([(op.b_chunk, op.b_mb)] if op.kind == "FB" else [])
  for chunk, mb in pairs:
    if not (0 <= chunk < schedule.n_chunks and 0 <= mb < schedule.mbs_per_chunk):
      raise ValueError(f"{where}: (chunk {chunk}, micro-batch {mb}) out of range")


def check_deadlock_free(schedule: Schedule) -> None:
  """Runs every rank as far as its inputs allow (no timing); raises naming a stuck rank, op and missing input."""
  done: set[Event] = set()
  pos = [0] * schedule.n_ranks
  progressed = True
  while progressed:
    progressed = False
    for rank, ops in enumerate(schedule.ops):
      while pos[rank] < len(ops) and all(e in done for e in needs(schedule, rank, ops[pos[rank]])):
        done.update(produces(rank, ops[pos[rank]]))
        pos[rank] += 1
        progressed = True
  for rank, ops in enumerate(schedule.ops):
    if pos[rank] < len(ops):
      op = ops[pos[rank]]
      missing = [e for e in needs(schedule, rank, op) if e not in done]
      raise ValueError(f"{schedule.name}: deadlock: rank {rank} op {pos[rank]} ({op}) waits forever for {missing[0]}")


# ------------------------------------------------------------------------------------------------ generators


def generate(name: str, n_ranks: int, n_microbatches: int) -> Schedule:
  """The validated schedule `name` (one of NAMES) on `n_ranks` pipeline ranks with N micro-batches."""
  generators: dict[str, Callable[[int, int], Schedule]] = {
    "1f1b": one_f_one_b,
    "zb1p": zb1p,
    "dualpipe": dualpipe,
    "dualpipev": dualpipev,
  }
  if name not in generators:
    raise ValueError(f"unknown schedule {name!r}; expected one of {NAMES}")
  return generators[name](n_ranks, n_microbatches)


def _check_ranks_mbs(label: str, n_ranks: int, n_microbatches: int, min_mbs: int, rule: str) -> None:
  if n_ranks < 1:
    raise ValueError(f"{label} needs at least one pipeline rank, got pp={n_ranks}")
  if n_microbatches < min_mbs:
    raise ValueError(f"{label} needs {rule}, got N={n_microbatches} with pp={n_ranks}")


def _finish(name: str, n_ranks: int, n: int, n_chunks: int, n_stages: int, ops: list[list[Op]]) -> Schedule:
  schedule = Schedule(name, n_ranks, n, n_chunks, n_stages, tuple(tuple(r) for r in ops))
  validate(schedule)
  return schedule


def one_f_one_b(n_ranks: int, n_microbatches: int) -> Schedule:
  """1F1B: rank r runs PP-1-r warm-up forwards, then alternates F and B, then drains the remaining Bs."""
  _check_ranks_mbs("1F1B", n_ranks, n_microbatches, n_ranks, "N >= pp micro-batches")
  ops = []
  for rank in range(n_ranks):
    warm = n_ranks - 1 - rank
    rank_ops = [Op("F", 0, m) for m in range(warm)]
    for i in range(n_microbatches - warm):
      rank_ops += [Op("F", 0, warm + i), Op("B", 0, i)]
    rank_ops += [Op("B", 0, m) for m in range(n_microbatches - warm, n_microbatches)]
    ops.append(rank_ops)
  return _finish("1f1b", n_ranks, n_microbatches, 1, n_ranks, ops)


def zb1p(n_ranks: int, n_microbatches: int) -> Schedule:
  """ZB1P, the zero-bubble ZB-H1 schedule: 1F1B's memory (PP live micro-batches on rank 0) with b split from W.

  Rank r, with p = PP and N micro-batches:
    1. PP-1-r forwards alone (1F1B's warm-up).
    2. r rounds of (F, b): the W of those b's waits, which lets the b's travel upstream one op sooner per rank.
    3. N-PP+1 steady rounds (F x, b x-(PP-1-r), W x-(PP-1)).
    4. PP-1-r rounds of (b, W) in the cool-down.
    5. r trailing Ws: the deferred weight gradients fill the time in which upstream ranks finish their b's.
  With F = b = W (B = 2W) every rank idles (PP-1)(F+B-2W): PP-1 units at unit costs.
  """
  _check_ranks_mbs("ZB1P", n_ranks, n_microbatches, n_ranks, "N >= pp micro-batches")
  p, n = n_ranks, n_microbatches
  ops = []
  for rank in range(p):
    warm = p - 1 - rank
    fwd, bwd = iter(range(n)), iter(range(n))
    rank_ops = [Op("F", 0, next(fwd)) for _ in range(warm)]
    for _ in range(rank):
      rank_ops += [Op("F", 0, next(fwd)), Op("b", 0, next(bwd))]
    w_mb = 0
    for _ in range(n - p + 1):
      rank_ops += [Op("F", 0, next(fwd)), Op("b", 0, next(bwd)), Op("W", 0, w_mb)]
      w_mb += 1
    for _ in range(warm):
      rank_ops += [Op("b", 0, next(bwd)), Op("W", 0, w_mb)]
      w_mb += 1
    rank_ops += [Op("W", 0, m) for m in range(w_mb, n)]
    ops.append(rank_ops)
  return _finish("zb1p", n_ranks, n_microbatches, 1, n_ranks, ops)


class _RankOps:
  """Builds one DualPipe rank's op list in local phases, numbering micro-batches and keeping the W FIFO."""

  def __init__(self):
    self.ops: list[Op] = []
    self.n_fwd = [0, 0]
    self.n_bwd = [0, 0]
    self.queue: collections.deque[tuple[int, int]] = collections.deque()

  def forward(self, phase: int) -> None:
    self.ops.append(Op("F", phase, self._next(self.n_fwd, phase)))

  def backward(self, phase: int, zero_bubble: bool = False) -> None:
    mb = self._next(self.n_bwd, phase)
    self.ops.append(Op("b" if zero_bubble else "B", phase, mb))
    if zero_bubble:
      self.queue.append((phase, mb))

  def weight(self) -> None:
    self.ops.append(Op("W", *self.queue.popleft()))

  def forward_backward(self, f_phase: int, b_phase: int) -> None:
    f_mb = self._next(self.n_fwd, f_phase)
    self.ops.append(Op("FB", f_phase, f_mb, b_phase, self._next(self.n_bwd, b_phase)))

  @staticmethod
  def _next(counters: list[int], phase: int) -> int:
    counters[phase] += 1
    return counters[phase] - 1


def _dualpipe_rank(n_half: int, h: int, per_chunk: int, middle: bool) -> list[Op]:
  """One rank's DualPipe op list in local phases (DeepSeek-V3 §3.2.1; DualPipe's `step()`).

  H = n_half (PP/2 for DualPipe, R for DualPipeV), h = the rank's half-rank (its distance from the nearer end;
  r for DualPipeV), C = per_chunk micro-batches per phase; `middle` marks h = H-1 (the last rank of DualPipeV).
  Local phase 0 is the chunk whose data enters nearer to this rank.
    1. nF0: 2(H-h-1) forwards of phase 0, filling the time until phase 1's first micro-batch arrives.
    2. nF0F1: h+1 rounds of (F0, F1).
    3. nB1W1F1: H-h-1 rounds of (b1, W, F1); these early backwards are input-grad only and the W that follows
       pops them, so the gradient moves upstream one W sooner.
    4. nF0B1F1B0: C-PP+h+1 main rounds of (F0&B1, F1&B0), each an overlapped forward/backward pair. On the middle
       ranks the first F0 and B1 run one after the other, not overlapped, which shortens the bubble.
    5. nB1F1B0: H-h-1 rounds of (B1, F1&B0).
    6. nB1B0: h+1 rounds of (B1, B0); from round (h+1)//2 on they are input-grad only (for odd h from that round's
       B1, for even h from its B0), so exactly h+1 of these 2(h+1) backwards queue a W.
    7. nWB0: H-h-1 rounds of (W, b0).
    8. nW: h+1 Ws drain the queue.
  """
  pp = 2 * n_half
  ops = _RankOps()
  for _ in range(2 * (n_half - h - 1)):
    ops.forward(0)
  for _ in range(h + 1):
    ops.forward(0)
    ops.forward(1)
  for _ in range(n_half - h - 1):
    ops.backward(1, zero_bubble=True)
    ops.weight()
    ops.forward(1)
  for i in range(per_chunk - pp + h + 1):
    if i == 0 and middle:
      ops.forward(0)
      ops.backward(1)
    else:
      ops.forward_backward(0, 1)
    ops.forward_backward(1, 0)
  for _ in range(n_half - h - 1):
    ops.backward(1)
    ops.forward_backward(1, 0)
  _dualpipe_step6(ops, h)
  for _ in range(n_half - h - 1):
    ops.weight()
    ops.backward(0, zero_bubble=True)
  for _ in range(h + 1):
    ops.weight()
  assert not ops.queue, "DualPipe's W queue must drain"
  return ops.ops


def _dualpipe_step6(ops: _RankOps, h: int) -> None:
  """Step 6 (nB1B0): the second half of these backwards are input-grad only."""
  zero_bubble = False
  for i in range(h + 1):
    if i == (h + 1) // 2 and h % 2 == 1:
      zero_bubble = True
    ops.backward(1, zero_bubble)
    if i == (h + 1) // 2 and h % 2 == 0:
      zero_bubble = True
    ops.backward(0, zero_bubble)


def _swap_phases(ops: list[Op]) -> list[Op]:
  """Local phase -> direction on the second half of DualPipe's ranks (phase 0 there is direction 1)."""
  return [op._replace(chunk=1 - op.chunk, b_chunk=1 - op.b_chunk if op.kind == "FB" else -1) for op in ops]


def dualpipe(n_ranks: int, n_microbatches: int) -> Schedule:
  """DualPipe (DeepSeek-V3 §3.2.1) on PP even ranks with N even >= 2*PP micro-batches, N/2 per direction."""
  if n_ranks < 2 or n_ranks % 2:
    raise ValueError(f"DualPipe needs an even number of pipeline ranks, got pp={n_ranks}")
  if n_microbatches % 2 or n_microbatches < 2 * n_ranks:
    raise ValueError(f"DualPipe needs an even number of micro-batches N >= 2*pp, got N={n_microbatches} "
                     f"with pp={n_ranks}")
  n_half = n_ranks // 2
  ops = []
  for rank in range(n_ranks):
    h = min(rank, n_ranks - 1 - rank)
    rank_ops = _dualpipe_rank(n_half, h, n_microbatches // 2, middle=h == n_half - 1)
    ops.append(_swap_phases(rank_ops) if rank >= n_half else rank_ops)
  return _finish("dualpipe", n_ranks, n_microbatches, 2, n_ranks, ops)


def dualpipev(n_ranks: int, n_microbatches: int) -> Schedule:
  """DualPipeV ("cut-in-half" DualPipe) on R ranks holding 2R stages, with N >= 2*R micro-batches.

  Rank r's list is rank r's list of DualPipe on 2R ranks with 2N micro-batches; chunk 1 of rank r holds stage
  2R-1-r and the last rank turns activations and gradients around locally.
  """
  if n_ranks < 1:
    raise ValueError(f"DualPipeV needs at least one pipeline rank, got pp={n_ranks}")
  if n_microbatches < 2 * n_ranks:
    raise ValueError(f"DualPipeV needs N >= 2*pp micro-batches, got N={n_microbatches} with pp={n_ranks}")
  ops = [_dualpipe_rank(n_ranks, r, n_microbatches, middle=r == n_ranks - 1) for r in range(n_ranks)]
  return _finish("dualpipev", n_ranks, n_microbatches, 2, 2 * n_ranks, ops)
