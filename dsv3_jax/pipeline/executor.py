"""The SPMD pipeline executor: a lockstep schedule run as one `lax.scan` over ticks inside a `shard_map`.

Every pipeline rank runs the same program; at each tick it reads its own entry of the lockstep table
(`lockstep.py`) and runs that op on its model chunks:

1. Tables. `compile_table` turns the lockstep table into integer arrays [ticks, ranks, fields] (the scan's
   xs): the op's branch (among the kinds the schedule uses), the forward's and the backward's chunk,
   micro-batch, stage role (first: reads data, last: computes the loss) and buffer slots, and for every
   incoming channel the slot its item lands in. Slots are assigned here, in Python, by replaying the table:
   an activation keeps its slot from arrival until the last op that needs it (its B, or the W after its b),
   a gradient from arrival until its B or W. The buffers are therefore exactly as deep as the schedule ever
   needs (`Table.act_slots`, `Table.grad_slots`); for 1F1B that is the number of micro-batches in flight on
   a rank, never N.
2. Ops, one `lax.switch` branch each (the rank's branch index comes from its table entry):
   F   forward of one chunk: the stage output is sent on, the objective's value is not needed.
   B   recompute the chunk's forward under `jax.vjp` (only its input was kept) and pull back the output
       gradient (zero on the last stage) and the objective seed: input gradient and weight gradients.
   b   the same, input gradient only (the weight half is dropped, so XLA does not compute it).
   W   the weight half of an earlier b, recomputed from the same input and output gradient.
   FB  a forward of one chunk and a full backward of the other in one branch: one computation with no data
       dependency between its halves, so XLA may overlap one half's collectives (the expert all-to-alls)
       with the other's compute.
3. Communication. After the switch, every tick, each channel the schedule uses moves its item with one
   `ppermute`: activations one rank along their chunk's direction (+1 for chunk 0, -1 for DualPipe's and
   DualPipeV's chunk 1), gradients the opposite way. DualPipeV's turn-around on the last rank is a local
   hand-off between the two chunks (no collective). Ranks that sent nothing this tick send their last
   value; the receiver's table says whether anything arrived (slot -1: nothing).
4. Gradients. Weight gradients accumulate per chunk ([n_chunks, ...]) and for the shared parameters
   (those the chunk function uses besides its chunk's, e.g. an embedding on the first stage); per-chunk
   auxiliary outputs of every forward (expert loads, loss parts) accumulate the same way. What the caller
   does with the per-rank results (sum mirrored copies, reduce over data axes) is outside this module.

The chunk function `fn(chunk_params, shared_params, chunk_consts, consts, x, mb, first, last)` returns
`((y, objective), aux)`; its backward seeds `objective` with `seed` (e.g. 1/N: the step's loss is the mean
over micro-batches). Everything here runs per device, inside a `shard_map` whose manual axes include `axis`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.pipeline import lockstep as lockstep_lib
from dsv3_jax.pipeline import schedules

BRANCHES = ("idle", "F", "B", "b", "W", "FB")
# Per-tick fields of a rank's table entry; "recv_<kind><shift>" is the slot an item arriving on that channel
# takes (-1: nothing arrives). Shifts: "+" from rank r-1, "-" from rank r+1, "0" local hand-off.
CHANNELS = ("act+", "act-", "act0", "grad+", "grad-", "grad0")
FIELDS = ("branch", "f_chunk", "f_mb", "f_first", "f_last", "f_slot", "b_chunk", "b_mb", "b_first", "b_last",
          "b_act_slot", "b_grad_slot", *(f"recv_{c}" for c in CHANNELS))


@dataclasses.dataclass(frozen=True)
class Table:
  """A lockstep schedule as scan inputs, with the buffer depths its replay needs."""

  entries: np.ndarray  # int32 [ticks, ranks, len(FIELDS)]
  act_slots: int  # activations a rank ever holds at once (received, not yet consumed by their last op)
  grad_slots: int  # gradients likewise
  channels: tuple[str, ...]  # the CHANNELS this schedule uses
  n_chunks: int
  branches: tuple[str, ...]  # the op kinds (BRANCHES) the table's "branch" field indexes

  def field(self, name: str) -> int:
    return FIELDS.index(name)


def _shift(channel: str) -> int:
  return {"+": 1, "-": -1, "0": 0}[channel[-1]]


class _Slots:
  """Slot allocator of one buffer kind on one rank: lowest free slot first."""

  def __init__(self):
    self.free: list[int] = []
    self.size = 0
    self.held: dict[tuple[int, int], int] = {}  # (chunk, mb) -> slot

  def take(self, key: tuple[int, int]) -> int:
    slot = min(self.free) if self.free else self.size
    if self.free:
      self.free.remove(slot)
    else:
      self.size += 1
    self.held[key] = slot
    return slot

  def release(self, key: tuple[int, int]) -> None:
    self.free.append(self.held.pop(key))


def compile_table(ls: lockstep_lib.Lockstep) -> Table:
  """Integer scan inputs for `execute`, from a lockstep table (buffer slots assigned by replaying it)."""
  sched = ls.schedule
  n_ranks = sched.n_ranks
  entries = np.full((ls.n_ticks(), n_ranks, len(FIELDS)), -1, np.int32)
  acts = [_Slots() for _ in range(n_ranks)]
  grads = [_Slots() for _ in range(n_ranks)]
  used = set()
  for tick, row in enumerate(ls.table):
    releases = []
    for rank, op in enumerate(row):
      entry = entries[tick, rank]
      entry[FIELDS.index("branch")] = BRANCHES.index(op.kind) if op is not None else 0
      if op is None:
        continue
      if (f := schedules.forward_part(op)) is not None:
        _fill_forward(entry, sched, rank, f, acts[rank])
      b = schedules.backward_part(op) if op.kind != "W" else (op.chunk, op.mb)
      if b is not None:
        releases += _fill_backward(entry, sched, rank, b, op.kind, acts[rank], grads[rank])
    for pool, key in releases:  # slots read this tick are free for what arrives at its end
      pool.release(key)
    for t in lockstep_lib.transfers(ls, tick):
      channel = f"{t.kind}{'+' if t.dst_rank > t.src_rank else '-' if t.dst_rank < t.src_rank else '0'}"
      used.add(channel)
      pool = (acts if t.kind == "act" else grads)[t.dst_rank]
      entries[tick, t.dst_rank, FIELDS.index(f"recv_{channel}")] = pool.take((t.dst_chunk, t.mb))
  leftover = [r for r in range(n_ranks) if acts[r].held or grads[r].held]
  if leftover:
    raise AssertionError(f"{sched.name}: buffers not drained at the end on ranks {leftover}")
  # Only the branches this schedule uses are traced (each is a copy of the stage's forward and/or backward).
  kinds = sorted(set(entries[..., FIELDS.index("branch")].reshape(-1).tolist()))
  entries[..., FIELDS.index("branch")] = np.searchsorted(kinds, entries[..., FIELDS.index("branch")])
  return Table(entries, max(1, max(a.size for a in acts)), max(1, max(g.size for g in grads)),
               tuple(c for c in CHANNELS if c in used), sched.n_chunks, tuple(BRANCHES[k] for k in kinds))


def _fill_forward(entry, sched, rank, f, acts: _Slots) -> None:
  chunk, mb = f
  entry[FIELDS.index("f_chunk")] = chunk
  entry[FIELDS.index("f_mb")] = sched.global_mb(chunk, mb)
  entry[FIELDS.index("f_first")] = sched.upstream(rank, chunk) is None
  entry[FIELDS.index("f_last")] = sched.downstream(rank, chunk) is None
  if sched.upstream(rank, chunk) is not None:
    entry[FIELDS.index("f_slot")] = acts.held[(chunk, mb)]


def _fill_backward(entry, sched, rank, b, kind, acts: _Slots, grads: _Slots) -> list:
  """Fills the backward fields; returns the (pool, key) slots whose last reader this op is."""
  chunk, mb = b
  first, last = sched.upstream(rank, chunk) is None, sched.downstream(rank, chunk) is None
  entry[FIELDS.index("b_chunk")] = chunk
  entry[FIELDS.index("b_mb")] = sched.global_mb(chunk, mb)
  entry[FIELDS.index("b_first")] = first
  entry[FIELDS.index("b_last")] = last
  done = kind != "b"  # after a b, its W still needs the input and the output gradient
  releases = []
  if not first:
    entry[FIELDS.index("b_act_slot")] = acts.held[(chunk, mb)]
    releases += [(acts, (chunk, mb))] if done else []
  if not last:
    entry[FIELDS.index("b_grad_slot")] = grads.held[(chunk, mb)]
    releases += [(grads, (chunk, mb))] if done else []
  return releases


# --------------------------------------------------------------------------------------------------------------------
# Execution (per device, inside shard_map)
# --------------------------------------------------------------------------------------------------------------------


def vary(tree: Any, axes: tuple[str, ...]) -> Any:
  """Each leaf cast to varying over the manual `axes` it does not yet vary over (scan and cond need equal types)."""

  def one(a):
    missing = tuple(ax for ax in axes if ax not in jax.typeof(a).manual_axis_type.varying)
    return jax.lax.pcast(a, missing, to="varying") if missing else a

  return jax.tree.map(one, tree)


def _take(tree: Any, i: jax.Array) -> Any:
  return jax.tree.map(lambda a: a[i], tree)


def _zeros(tree: Any) -> Any:
  return jax.tree.map(jnp.zeros_like, tree)


def execute(table: Table, fn: Callable, chunk_params: Any, shared_params: Any, chunk_consts: Any, consts: Any,
            act: jax.ShapeDtypeStruct, aux_like: Any, seed: float | jax.Array, *, axis: str,
            manual_axes: tuple[str, ...]):
  """Runs the table on this device; returns (chunk grads [n_chunks, ...], shared grads, aux sums [n_chunks, ...]).

  chunk_params / chunk_consts: this rank's chunks, leaves [n_chunks, ...]. act: one activation's shape and
  dtype. aux_like: a pytree of zeros shaped like fn's aux. manual_axes: every manual axis of the enclosing
  shard_map (the carry varies over all of them).
  """
  varying = lambda t: vary(t, manual_axes)  # noqa: E731
  chunk_params, shared_params, chunk_consts, consts = varying((chunk_params, shared_params, chunk_consts, consts))
  rank = jax.lax.axis_index(axis)
  n_ranks = table.entries.shape[1]
  zero_act = varying(jnp.zeros(act.shape, act.dtype))
  one_chunk = _take(chunk_params, 0)

  def run_fn(p_chunk, p_shared, c, mb, first, last, x):
    return fn(p_chunk, p_shared, _take(chunk_consts, c), consts, x, mb, first.astype(bool), last.astype(bool))

  def forward(e, bufs):
    c = e["f_chunk"]
    x = bufs[0][jnp.maximum(e["f_slot"], 0)]
    (y, _), aux = run_fn(_take(chunk_params, c), shared_params, c, e["f_mb"], e["f_first"], e["f_last"], x)
    return y, aux

  def backward(e, bufs, wrt):
    """Pull back through chunk b_chunk for micro-batch b_mb; wrt: "all", "input" or "weights"."""
    c = e["b_chunk"]
    x = bufs[0][jnp.maximum(e["b_act_slot"], 0)]
    gy = jnp.where(e["b_last"] == 1, jnp.zeros_like(x), bufs[1][jnp.maximum(e["b_grad_slot"], 0)])
    p_chunk = _take(chunk_params, c)
    f = lambda p, s, x_in: run_fn(p, s, c, e["b_mb"], e["b_first"], e["b_last"], x_in)  # noqa: E731
    cot = (gy, varying(jnp.asarray(seed, jnp.float32)))
    if wrt == "input":
      _, pull, _ = jax.vjp(lambda x_in: f(p_chunk, shared_params, x_in), x, has_aux=True)
      return _zeros(p_chunk), _zeros(shared_params), pull(cot)[0]
    if wrt == "weights":
      _, pull, _ = jax.vjp(lambda p, s: f(p, s, x), p_chunk, shared_params, has_aux=True)
      return (*pull(cot), jnp.zeros_like(x))
    _, pull, _ = jax.vjp(f, p_chunk, shared_params, x, has_aux=True)
    return pull(cot)

  def out(y=None, aux=None, grads=None):
    y = zero_act if y is None else y
    aux = aux_like if aux is None else aux
    grads = (_zeros(one_chunk), _zeros(shared_params), zero_act) if grads is None else grads
    return varying((y, aux, grads))

  branches = {
      "idle": lambda e, bufs: out(),
      "F": lambda e, bufs: out(*forward(e, bufs)),
      "B": lambda e, bufs: out(grads=backward(e, bufs, "all")),
      "b": lambda e, bufs: out(grads=backward(e, bufs, "input")),
      "W": lambda e, bufs: out(grads=backward(e, bufs, "weights")),
      "FB": lambda e, bufs: out(*forward(e, bufs), grads=backward(e, bufs, "all")),
  }
  branches = [branches[kind] for kind in table.branches]

  def tick(carry, entries_RF):
    bufs, g_chunk, g_shared, aux_acc = carry
    e = {name: entries_RF[rank, i] for i, name in enumerate(FIELDS)}
    y, aux, (gp, gs, gx) = jax.lax.switch(e["branch"], branches, e, bufs)
    has_f = (e["f_chunk"] >= 0).astype(jnp.float32)
    has_b = (e["b_chunk"] >= 0).astype(jnp.float32)
    aux_acc = jax.tree.map(lambda acc, a: acc.at[jnp.maximum(e["f_chunk"], 0)].add(a * has_f), aux_acc, aux)
    g_chunk = jax.tree.map(lambda acc, g: acc.at[jnp.maximum(e["b_chunk"], 0)].add(g * has_b), g_chunk, gp)
    g_shared = jax.tree.map(jnp.add, g_shared, gs)
    bufs = _communicate(table, bufs, y, gx, e, axis, n_ranks)
    return varying((bufs, g_chunk, g_shared, aux_acc)), None

  bufs = (jnp.zeros((table.act_slots, *act.shape), act.dtype), jnp.zeros((table.grad_slots, *act.shape), act.dtype))
  aux0 = jax.tree.map(lambda a: jnp.zeros((table.n_chunks, *a.shape), a.dtype), aux_like)
  carry = varying((bufs, _zeros(chunk_params), _zeros(shared_params), aux0))
  (_, g_chunk, g_shared, aux_acc), _ = jax.lax.scan(tick, carry, jnp.asarray(table.entries))
  return g_chunk, g_shared, aux_acc


def _communicate(table: Table, bufs, y, gx, e, axis: str, n_ranks: int):
  """Moves this tick's activation and input gradient along every channel the schedule uses; stores arrivals."""
  act_buf, grad_buf = bufs
  for channel in table.channels:
    kind, shift = channel[:-1], _shift(channel)
    item = y if kind == "act" else gx
    if shift:
      pairs = [(r, r + shift) for r in range(n_ranks) if 0 <= r + shift < n_ranks]
      item = jax.lax.ppermute(item, axis, pairs)
    slot = e[f"recv_{channel}"]
    buf = act_buf if kind == "act" else grad_buf
    at = jnp.maximum(slot, 0)
    buf = buf.at[at].set(jnp.where(slot >= 0, item, buf[at]))
    act_buf, grad_buf = (buf, grad_buf) if kind == "act" else (act_buf, buf)
  return act_buf, grad_buf
