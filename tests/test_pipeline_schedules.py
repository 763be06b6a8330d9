"""Pipeline schedules as data: DualPipe/DualPipeV op orders and timings against the worked examples of
shared/reference/deepseek_systems.md §1.3-1.4, Table 2's bubble formulas, the lockstep table, and bad input."""

import collections
import os

import pytest

from dsv3_jax.pipeline import lockstep as lockstep_lib
from dsv3_jax.pipeline import render
from dsv3_jax.pipeline import schedules
from dsv3_jax.pipeline import simulate

UNIT = simulate.Costs(F=1, B=2, W=1, FB=3)

DUALPIPE_PP4_N8 = """
r0: F0.0 F0.1 F0.2 F1.0 b1.0 W1.0 F1.1 F0.3&B1.1 F1.2&B0.0 B1.2 F1.3&B0.1 B1.3 b0.2 W0.2 b0.3 W0.3
r1: F0.0 F1.0 F0.1 F1.1 F0.2 B1.0 F1.2&B0.0 F0.3&B1.1 F1.3&B0.1 B1.2 B0.2 b1.3 b0.3 W1.3 W0.3
r2: F1.0 F0.0 F1.1 F0.1 F1.2 B0.0 F0.2&B1.0 F1.3&B0.1 F0.3&B1.1 B0.2 B1.2 b0.3 b1.3 W0.3 W1.3
r3: F1.0 F1.1 F1.2 F0.0 b0.0 W0.0 F0.1 F1.3&B0.1 F0.2&B1.0 B0.2 F0.3&B1.1 B0.3 b1.2 W1.2 b1.3 W1.3
"""

DUALPIPE_PP8_N16 = """
r0: F0.0 F0.1 F0.2 F0.3 F0.4 F0.5 F0.6 F1.0 b1.0 W1.0 F1.1 b1.1 W1.1 F1.2 b1.2 W1.2 F1.3 F0.7&B1.3 F1.4&B0.0 B1.4 F1.5&B0.1 B1.5 F1.6&B0.2 B1.6 F1.7&B0.3 B1.7 b0.4 W0.4 b0.5 W0.5 b0.6 W0.6 b0.7 W0.7
r1: F0.0 F0.1 F0.2 F0.3 F0.4 F1.0 F0.5 F1.1 b1.0 W1.0 F1.2 b1.1 W1.1 F1.3 F0.6&B1.2 F1.4&B0.0 F0.7&B1.3 F1.5&B0.1 B1.4 F1.6&B0.2 B1.5 F1.7&B0.3 B1.6 B0.4 b1.7 b0.5 W1.7 b0.6 W0.5 b0.7 W0.6 W0.7
r2: F0.0 F0.1 F0.2 F1.0 F0.3 F1.1 F0.4 F1.2 b1.0 W1.0 F1.3 F0.5&B1.1 F1.4&B0.0 F0.6&B1.2 F1.5&B0.1 F0.7&B1.3 F1.6&B0.2 B1.4 F1.7&B0.3 B1.5 B0.4 B1.6 b0.5 b1.7 b0.6 W0.5 b0.7 W1.7 W0.6 W0.7
r3: F0.0 F1.0 F0.1 F1.1 F0.2 F1.2 F0.3 F1.3 F0.4 B1.0 F1.4&B0.0 F0.5&B1.1 F1.5&B0.1 F0.6&B1.2 F1.6&B0.2 F0.7&B1.3 F1.7&B0.3 B1.4 B0.4 B1.5 B0.5 b1.6 b0.6 b1.7 b0.7 W1.6 W0.6 W1.7 W0.7
"""  # noqa: E501

DUALPIPEV_R4_N8 = """
r0: F0.0 F0.1 F0.2 F0.3 F0.4 F0.5 F0.6 F1.0 b1.0 W1.0 F1.1 b1.1 W1.1 F1.2 b1.2 W1.2 F1.3 F0.7&B1.3 F1.4&B0.0 B1.4 F1.5&B0.1 B1.5 F1.6&B0.2 B1.6 F1.7&B0.3 B1.7 b0.4 W0.4 b0.5 W0.5 b0.6 W0.6 b0.7 W0.7
r3: F0.0 F1.0 F0.1 F1.1 F0.2 F1.2 F0.3 F1.3 F0.4 B1.0 F1.4&B0.0 F0.5&B1.1 F1.5&B0.1 F0.6&B1.2 F1.6&B0.2 F0.7&B1.3 F1.7&B0.3 B1.4 B0.4 B1.5 B0.5 b1.6 b0.6 b1.7 b0.7 W1.6 W0.6 W1.7 W0.7
"""  # noqa: E501

TIMELINE_PP4_N8 = """
r0 |FFFFbWFXXX.XXXBB.XXXBBbWbW|
r1 |.FFFFFBBXXXXXXXXXBBBB.bbWW|
r2 |.FFFFFBBXXXXXXXXXBBBB.bbWW|
r3 |FFFFbWFXXX.XXXBB.XXXBBbWbW|
"""

TIMELINE_PP8_N16 = """
r0 |FFFFFFFFbWFbWFbWFXXX...XXXBB.XXXBB.XXXBB.XXXBBbWbWbWbW|
r1 |.FFFFFFFFbWFbWFXXX..XXXXXXXXXBB.XXXBB.XXXBBBB.bbWbWbWW|
r2 |..FFFFFFFFbWFXXX.XXXXXXXXXXXXXXXBB.XXXBBBB.BBb.bbWbWWW|
r3 |...FFFFFFFFFBBXXXXXXXXXXXXXXXXXXXXXBBBB.BBBB.bb.bbWWWW|
"""

LOCKSTEP_PP4_N8 = """
t   r0         r1         r2         r3
0   F0.0       .          .          F1.0
1   F0.1       F0.0       F1.0       F1.1
2   F0.2       F1.0       F0.0       F1.2
3   F1.0       F0.1       F1.1       F0.0
4   b1.0       F1.1       F0.1       b0.0
5   W1.0       F0.2       F1.2       W0.0
6   F1.1       B1.0       B0.0       F0.1
7   F0.3&B1.1  F1.2&B0.0  F0.2&B1.0  F1.3&B0.1
8   F1.2&B0.0  F0.3&B1.1  F1.3&B0.1  F0.2&B1.0
9   B1.2       F1.3&B0.1  F0.3&B1.1  B0.2
10  F1.3&B0.1  B1.2       B0.2       F0.3&B1.1
11  B1.3       B0.2       B1.2       B0.3
12  b0.2       b1.3       b0.3       b1.2
13  W0.2       b0.3       b1.3       W1.2
14  b0.3       W1.3       W0.3       b1.3
15  W0.3       W0.3       W1.3       W1.3
"""


def _parse(text: str) -> dict[int, list[str]]:
  """{rank: [op strings]} from reference lines `rK: op op ...`."""
  rows = (line.split(":", 1) for line in text.strip().splitlines())
  return {int(name[1:]): ops.split() for name, ops in rows}


def _strs(schedule: schedules.Schedule, rank: int) -> list[str]:
  return [str(op) for op in schedule.ops[rank]]


# ------------------------------------------------------------------------------------------------ op orders


@pytest.mark.parametrize("name,pp,n,reference", [
  ("dualpipe", 4, 8, DUALPIPE_PP4_N8),
  ("dualpipe", 8, 16, DUALPIPE_PP8_N16),
  ("dualpipev", 4, 8, DUALPIPEV_R4_N8),
])
def test_op_orders_equal_the_worked_examples(name, pp, n, reference):
  schedule = schedules.generate(name, pp, n)
  for rank, ops in _parse(reference).items():
    assert _strs(schedule, rank) == ops, f"rank {rank}"


def test_dualpipev_is_the_first_half_of_dualpipe_on_twice_the_ranks():
  for r, n in ((4, 8), (2, 5), (3, 9)):
    v, d = schedules.dualpipev(r, n), schedules.dualpipe(2 * r, 2 * n)
    assert v.ops == d.ops[:r]
    assert v.n_stages == 2 * r and [v.stage(k, 1) for k in range(r)] == [2 * r - 1 - k for k in range(r)]


@pytest.mark.parametrize("pp,n", [(2, 4), (4, 8), (4, 14), (8, 16), (8, 20), (16, 32)])
def test_dualpipe_mirror_symmetry_and_counts(pp, n):
  schedule = schedules.dualpipe(pp, n)
  for rank in range(pp):
    mirrored = [op._replace(chunk=1 - op.chunk, b_chunk=1 - op.b_chunk if op.kind == "FB" else -1)
                for op in schedule.ops[pp - 1 - rank]]
    assert list(schedule.ops[rank]) == mirrored
    kinds = collections.Counter(op.kind for op in schedule.ops[rank])
    h = min(rank, pp - 1 - rank)
    assert kinds["W"] == kinds["b"] == pp - h - 1
    assert kinds["F"] + kinds["FB"] == n  # every micro-batch of both directions forwarded once on this rank


def test_one_f_one_b_and_zb1p_structure():
  f1b, zb = schedules.one_f_one_b(4, 6), schedules.zb1p(4, 6)
  assert _strs(f1b, 1) == "F0.0 F0.1 F0.2 B0.0 F0.3 B0.1 F0.4 B0.2 F0.5 B0.3 B0.4 B0.5".split()
  # ZB-H1 on rank 2 of 4: 1 warm-up F, 2 rounds (F, b), 3 steady (F, b, W), 1 cool-down (b, W), 2 trailing W.
  assert _strs(zb, 2) == ("F0.0 F0.1 b0.0 F0.2 b0.1 F0.3 b0.2 W0.0 F0.4 b0.3 W0.1 F0.5 b0.4 W0.2 b0.5 W0.3 "
                          "W0.4 W0.5").split()
  for schedule in (f1b, zb):
    assert schedule.n_chunks == 1 and schedule.n_stages == 4
    assert [schedule.upstream(r, 0) for r in range(4)] == [None, (0, 0), (1, 0), (2, 0)]
    assert [schedule.downstream(r, 0) for r in range(4)] == [(1, 0), (2, 0), (3, 0), None]


def test_placement_conventions():
  d = schedules.dualpipe(4, 8)
  assert [d.stage(r, 0) for r in range(4)] == [0, 1, 2, 3] and [d.stage(r, 1) for r in range(4)] == [3, 2, 1, 0]
  assert d.upstream(0, 0) is None and d.upstream(3, 1) is None and d.upstream(1, 1) == (2, 1)
  assert d.downstream(3, 0) is None and d.downstream(0, 1) is None and d.downstream(2, 1) == (1, 1)
  assert sorted(d.global_mb(c, m) for c in range(2) for m in range(4)) == list(range(8))
  assert d.global_mb(1, 0) == 4
  v = schedules.dualpipev(3, 6)
  assert [v.stage(r, c) for c in range(2) for r in range(3)] == [0, 1, 2, 5, 4, 3]
  assert v.downstream(2, 0) == (2, 1) and v.upstream(2, 1) == (2, 0)  # the local turn-around
  assert v.upstream(0, 0) is None and v.downstream(0, 1) is None and v.downstream(1, 1) == (0, 1)
  assert v.global_mb(1, 5) == 5
  # Following downstream from the data entry visits every stage once, in stage order.
  for s, entries in ((d, [(0, 0), (3, 1)]), (v, [(0, 0)])):
    for slot in entries:
      visited = []
      while slot is not None:
        visited.append(s.stage(*slot))
        slot = s.downstream(*slot)
      assert visited == list(range(s.n_stages))


# ------------------------------------------------------------------------------------------------ simulator


@pytest.mark.parametrize("name,pp,n,makespan,idle", [
  ("dualpipe", 4, 8, 26, 2),
  ("dualpipe", 8, 16, 54, 6),
  ("dualpipe", 8, 20, 66, 6),
  ("dualpipev", 4, 8, 54, 6),
  ("1f1b", 8, 20, 81, 21),
  ("zb1p", 8, 20, 67, 7),
])
def test_unit_cost_makespan_and_idle(name, pp, n, makespan, idle):
  result = simulate.simulate(schedules.generate(name, pp, n), UNIT)
  assert result.makespan == makespan
  assert result.idle == (idle,) * pp
  assert result.bubble_fraction == pytest.approx(idle / makespan)


def test_unit_cost_start_times_rank0_pp4():
  result = simulate.simulate(schedules.dualpipe(4, 8), UNIT)
  assert [s.start for s in result.timeline[0]] == [0, 1, 2, 3, 4, 5, 6, 7, 11, 14, 17, 20, 22, 23, 24, 25]


@pytest.mark.parametrize("costs,pp,want", [
  ((1, 2, 1, 3), 4, 2), ((1, 2, 1, 3), 8, 6), ((1, 2, 1, 3), 16, 14),
  ((2, 4, 2, 5), 8, 9), ((2, 4, 2, 5), 16, 21),
  ((3, 6, 3, 8), 8, 15),
  ((2, 3, 1, 4), 8, 12),
])
def test_worst_rank_idle_equals_table2_formula(costs, pp, want):
  c = simulate.Costs(*costs)
  assert simulate.bubble_formula("dualpipe", pp, c) == want
  for name, ranks in (("dualpipe", pp), ("dualpipev", pp // 2)):
    result = simulate.simulate(schedules.generate(name, ranks, 2 * pp + 4), c)
    assert result.worst_idle == want, name
    assert result.idle[pp // 2 - 1] == want, name  # the middle rank (DualPipeV's last rank) idles the most


@pytest.mark.parametrize("costs", [(1, 2, 1, 3), (2, 4, 2, 5), (3, 6, 3, 8), (2, 3, 1, 4)])
@pytest.mark.parametrize("pp", [4, 8])
def test_1f1b_and_zb1p_idle_equal_their_formulas(costs, pp):
  c = simulate.Costs(*costs)
  for name in ("1f1b", "zb1p"):
    result = simulate.simulate(schedules.generate(name, pp, 20), c)
    assert result.idle == (simulate.bubble_formula(name, pp, c),) * pp, name


def test_edge_ranks_idle_less_when_the_pair_overlaps():
  result = simulate.simulate(schedules.dualpipe(8, 20), simulate.Costs(2, 4, 2, 5))
  assert result.idle == (7, 8, 9, 9, 9, 9, 8, 7)


@pytest.mark.parametrize("pp", [4, 8, 16])
def test_peak_live_activations(pp):
  peak = simulate.simulate(schedules.dualpipe(pp, 2 * pp + 2), UNIT).peak_live
  assert peak[pp // 2 - 1] == peak[pp // 2] == pp + 1
  assert peak[0] == peak[-1] == pp and max(peak) == pp + 1
  assert simulate.simulate(schedules.dualpipev(pp // 2, pp), UNIT).peak_live[-1] == pp + 1
  for name in ("1f1b", "zb1p"):  # 1F1B's memory: PP - r micro-batches on rank r
    assert simulate.simulate(schedules.generate(name, pp, pp + 3), UNIT).peak_live == tuple(range(pp, 0, -1))


def test_comm_latency_delays_cross_rank_inputs_only():
  # Rank 0: F0 0-1, F1 1-2; rank 1: F0 1.5-2.5, B0 2.5-4.5, F1 4.5-5.5, B1 5.5-7.5; rank 0: B0 5-7, B1 8-10.
  result = simulate.simulate(schedules.one_f_one_b(2, 2), simulate.Costs(F=1, B=2, W=1, FB=3, comm=0.5))
  assert [(s.start, s.end) for s in result.timeline[1]] == [(1.5, 2.5), (2.5, 4.5), (4.5, 5.5), (5.5, 7.5)]
  assert [(s.start, s.end) for s in result.timeline[0]] == [(0, 1), (1, 2), (5, 7), (8, 10)]
  assert result.makespan == 10 and result.idle == (4, 4)
  # DualPipeV's turn-around is local: no latency between chunk 0 and chunk 1 of the last rank.
  timeline = simulate.simulate(schedules.dualpipev(1, 2), simulate.Costs(comm=5)).timeline[0]
  assert [str(s.op) for s in timeline[:2]] == ["F0.0", "F1.0"] and timeline[1].start == timeline[0].end


def test_timelines_reproduce_the_reference():
  for (pp, n), reference in (((4, 8), TIMELINE_PP4_N8), ((8, 16), TIMELINE_PP8_N16)):
    want = reference.strip().splitlines()  # PP=8 lists ranks 0..3; ranks 4..7 mirror them
    bars = render.timeline_bars(simulate.simulate(schedules.dualpipe(pp, n), UNIT))
    assert bars[: len(want)] == want
    assert [bar.split("|")[1] for bar in bars[::-1][: len(want)]] == [line.split("|")[1] for line in want]
  with pytest.raises(ValueError, match="not a multiple of the text unit"):
    render.timeline_bars(simulate.simulate(schedules.dualpipe(4, 8), simulate.Costs(F=1.5, B=2, W=1, FB=3)))


def test_table2_rows():
  rows = {r.name: r for r in simulate.table2(8, 20, UNIT)}
  assert {k: (r.bubble_formula, r.worst_idle, r.params_per_device, r.activations_formula, r.peak_live, r.n_devices)
          for k, r in rows.items()} == {
    "1f1b": (21, 21, 1, 8, 8, 8), "zb1p": (7, 7, 1, 8, 8, 8),
    "dualpipe": (6, 6, 2, 9, 9, 8), "dualpipev": (6, 6, 2, 9, 9, 4)}
  assert rows["dualpipe"].bubble_fraction == pytest.approx(6 / 66)
  assert rows["1f1b"].bubble_fraction == pytest.approx(21 / 81)


# ------------------------------------------------------------------------------------------------- lockstep


def test_lockstep_table_pp4_n8():
  ls = lockstep_lib.lockstep(schedules.dualpipe(4, 8))
  assert ls.n_ticks() == 16
  assert render.lockstep_text(ls) == LOCKSTEP_PP4_N8.strip()
  assert ls.max_in_flight == {"act": 2, "grad": 1}


@pytest.mark.parametrize("name,pp,n,ticks", [("dualpipe", 8, 16, 34), ("dualpipe", 8, 20, 38), ("dualpipev", 4, 8, 34)])
def test_lockstep_tick_counts(name, pp, n, ticks):
  assert lockstep_lib.lockstep(schedules.generate(name, pp, n)).n_ticks() == ticks


def test_lockstep_at_most_two_items_in_flight_per_channel():
  cases = [("dualpipe", pp, n) for pp in (4, 8) for n in range(2 * pp, 21, 2)]
  cases += [("dualpipev", pp // 2, n) for pp in (4, 8) for n in range(pp, 21)]
  for name, ranks, n in cases:
    in_flight = lockstep_lib.lockstep(schedules.generate(name, ranks, n)).max_in_flight
    assert 1 <= min(in_flight.values()) and max(in_flight.values()) <= 2, (name, ranks, n, in_flight)


@pytest.mark.parametrize("name,pp,n", [("dualpipe", 4, 8), ("dualpipe", 8, 18), ("dualpipev", 3, 7), ("zb1p", 4, 6)])
def test_transfers_replay_as_fifos(name, pp, n):
  """Every consumer finds its input at the head of its (rank, chunk, kind) FIFO, delivered in an earlier tick."""
  schedule = schedules.generate(name, pp, n)
  ls = lockstep_lib.lockstep(schedule)
  fifos = collections.defaultdict(collections.deque)
  sent = 0
  for tick, row in enumerate(ls.table):
    for rank, op in enumerate(row):
      if op is None:
        continue
      if (f := schedules.forward_part(op)) is not None and schedule.upstream(rank, f[0]) is not None:
        assert fifos[("act", rank, f[0])].popleft() == f[1], (tick, rank, op)
      if (b := schedules.backward_part(op)) is not None and schedule.downstream(rank, b[0]) is not None:
        assert fifos[("grad", rank, b[0])].popleft() == b[1], (tick, rank, op)
    for t in lockstep_lib.transfers(ls, tick):
      assert t.kind == "act" and schedule.downstream(t.src_rank, t.src_chunk) == (t.dst_rank, t.dst_chunk) or \
        t.kind == "grad" and schedule.upstream(t.src_rank, t.src_chunk) == (t.dst_rank, t.dst_chunk)
      fifos[(t.kind, t.dst_rank, t.dst_chunk)].append(t.mb)
      sent += 1
  assert not any(fifos.values())
  n_links = sum(schedule.downstream(r, c) is not None for r in range(pp) for c in range(schedule.n_chunks))
  assert sent == 2 * n_links * schedule.mbs_per_chunk


def test_transfers_first_tick_and_range():
  ls = lockstep_lib.lockstep(schedules.dualpipe(4, 8))
  assert lockstep_lib.transfers(ls, 0) == [
    lockstep_lib.Transfer("act", 0, 0, 1, 0, 0), lockstep_lib.Transfer("act", 3, 1, 2, 1, 0)]
  assert not any(t.local for t in lockstep_lib.transfers(ls, 0))
  with pytest.raises(ValueError, match="tick 16 out of range"):
    lockstep_lib.transfers(ls, 16)
  v = lockstep_lib.lockstep(schedules.dualpipev(2, 4))
  local = [t for tick in range(v.n_ticks()) for t in lockstep_lib.transfers(v, tick) if t.local]
  assert len(local) == 2 * 4 and all(t.src_rank == 1 for t in local)


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("name,pp,n,message", [
  ("dualpipe", 5, 20, "DualPipe needs an even number of pipeline ranks, got pp=5"),
  ("dualpipe", 4, 7, "DualPipe needs an even number of micro-batches N >= 2*pp, got N=7 with pp=4"),
  ("dualpipe", 4, 6, "DualPipe needs an even number of micro-batches N >= 2*pp, got N=6 with pp=4"),
  ("dualpipev", 4, 7, "DualPipeV needs N >= 2*pp micro-batches, got N=7 with pp=4"),
  ("1f1b", 4, 3, "1F1B needs N >= pp micro-batches, got N=3 with pp=4"),
  ("zb1p", 8, 7, "ZB1P needs N >= pp micro-batches, got N=7 with pp=8"),
  ("1f1b", 0, 3, "1F1B needs at least one pipeline rank, got pp=0"),
  ("gpipe", 4, 8, "unknown schedule 'gpipe'"),
])
def test_bad_sizes_fail_with_the_rule(name, pp, n, message):
  with pytest.raises(ValueError, match=message.replace("*", r"\*").replace("(", r"\(")):
    schedules.generate(name, pp, n)


def _tampered(ops_by_rank, name="1f1b", n=2):
  ops = tuple(tuple(schedules.Op(*o) for o in rank) for rank in ops_by_rank)
  return schedules.Schedule(name, len(ops), n, 1, len(ops), ops)


@pytest.mark.parametrize("ops,message", [
  ([[("F", 0, 0), ("F", 0, 0), ("B", 0, 0), ("B", 0, 1)]], "second forward of chunk 0 micro-batch 0"),
  ([[("F", 0, 0), ("B", 0, 1), ("F", 0, 1), ("B", 0, 0)]], "backward of chunk 0 micro-batch 1 before its forward"),
  ([[("F", 0, 0), ("F", 0, 1), ("b", 0, 0), ("b", 0, 1), ("W", 0, 1), ("W", 0, 0)]], r"oldest queued b \(0, 0\)"),
  ([[("F", 0, 0), ("F", 0, 1), ("b", 0, 0), ("B", 0, 1)]], r"W queue not empty at the end: \[\(0, 0\)\]"),
  ([[("F", 0, 0), ("F", 0, 1), ("W", 0, 0), ("B", 0, 0), ("B", 0, 1)]], "W with no queued b"),
  ([[("F", 0, 0), ("B", 0, 0)]], r"no forward of \(chunk, micro-batch\) \[\(0, 1\)\]"),
  ([[("F", 0, 0), ("F", 0, 2), ("B", 0, 0), ("B", 0, 1)]], r"\(chunk 0, micro-batch 2\) out of range"),
  ([[("X", 0, 0)]], "unknown kind 'X'"),
])
def test_validate_rejects_malformed_lists(ops, message):
  with pytest.raises(ValueError, match=message):
    schedules.validate(_tampered(ops))


def test_validate_rejects_wrong_rank_count_and_name():
  good = schedules.one_f_one_b(2, 2)
  with pytest.raises(ValueError, match="1 op lists for 2 ranks"):
    schedules.validate(schedules.Schedule("1f1b", 2, 2, 1, 2, good.ops[:1]))
  with pytest.raises(ValueError, match="unknown schedule 'gpipe'"):
    schedules.validate(schedules.Schedule("gpipe", 2, 2, 1, 2, good.ops))


def test_deadlock_is_named_by_validate_and_simulator():
  # Rank 0 waits for rank 1's gradient of micro-batch 0 before sending micro-batch 1, which rank 1 needs first.
  schedule = _tampered([[("F", 0, 0), ("B", 0, 0), ("F", 0, 1), ("B", 0, 1)],
                        [("F", 0, 0), ("F", 0, 1), ("B", 0, 0), ("B", 0, 1)]])
  for check in (schedules.validate, lambda s: simulate.simulate(s, UNIT), lockstep_lib.lockstep):
    with pytest.raises(ValueError, match=r"deadlock: rank 0 op 1 \(B0.0\) waits forever"):
      check(schedule)


def test_bad_costs():
  with pytest.raises(ValueError, match="cost W must be in"):
    simulate.Costs(F=1, B=2, W=3, FB=3)
  with pytest.raises(ValueError, match="cost FB must be > 0"):
    simulate.Costs(FB=0)
  with pytest.raises(ValueError, match="comm latency must be >= 0"):
    simulate.Costs(comm=-1)


# ------------------------------------------------------------------------------------------------------ CLI


def test_report_writes_png_and_prints_table2(tmp_path):
  png = str(tmp_path / "out" / "dualpipe.png")
  text = render.report("dualpipe", 8, 20, UNIT, png)
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert "makespan 66, worst-rank idle 6, bubble fraction 9.1%" in text
  row = "dualpipe         8               6               6      9.1%          2x                9             9"
  assert row in text
  assert "Lockstep: 38 ticks" in text
  assert os.listdir(tmp_path / "out") == ["dualpipe.png"]  # no temporary file left behind


def test_report_bad_input_writes_nothing(tmp_path):
  png = str(tmp_path / "x.png")
  with pytest.raises(ValueError, match="got pp=5"):
    render.report("dualpipe", 5, 20, UNIT, png)
  with pytest.raises(ValueError, match="DualPipe needs an even number of micro-batches"):
    render.report("1f1b", 8, 9, UNIT, png)  # valid for 1F1B, but Table 2 also runs DualPipe
  assert not os.listdir(tmp_path)
  assert "Table 2" not in render.report("1f1b", 5, 9, UNIT, None, with_table2=False)
