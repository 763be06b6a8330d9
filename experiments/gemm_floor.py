"""The matrix products of one training step, timed alone: a floor under the step time that no glue can beat.

`step_gemms` lists every GEMM one device runs in a forward + backward of a config's model with MTP off, as our
step runs it: each Linear's three products (forward, input gradient, weight gradient; the MLPs' w1 and w3 as one
product, as `layers.MLP` fuses them), the routed experts' nine per expert with the routed rows spread evenly
(`csrc/grouped_swiglu.cc`), and causal attention's query tiles against the keys up to each tile's end, forward and
backward with the scores recomputed (`csrc/causal_attention.cc`). `time_gemms` runs that list back to back, one
thread per device, all devices at once, as the step's device threads run, through one of two GEMMs over the
OpenBLAS numpy bundles: the native kernels' own (`native.gemm_batch`: products blocked under OpenBLAS's
small-matrix limit) or numpy's matmul (one call per product). `floor` times both and keeps the faster. Everything
else the step does (norms, RoPE, SwiGLU, routing, layouts, all-reduces, the optimizer) is left out.
`experiments.bench` reports it beside the step:

  python -m experiments.bench --sections=peak,train,floor
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import statistics
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from dsv3_jax import config as config_lib
from dsv3_jax import host
from dsv3_jax import native
from dsv3_jax import train

# The native attention kernel's tiles (csrc/causal_attention.cc: kQueryRows, kKeyCols).
QUERY_ROWS, KEY_COLS = 64, 256


@dataclasses.dataclass(frozen=True)
class Gemm:
  """`count` products C[m, n] = op(A) op(B), contracting k, on separate operands (one batched matmul);
  trans_a: A is stored [k, m]; trans_b: B is stored [n, k]."""
  group: str
  m: int
  k: int
  n: int
  trans_a: bool = False
  trans_b: bool = False
  count: int = 1

  @property
  def flops(self) -> int:
    return 2 * self.m * self.k * self.n * self.count


def _linear(group: str, tokens: int, d_in: int, d_out: int) -> list[Gemm]:
  """y = x W ([tokens, d_in] @ [d_in, d_out]), dx = dy W^T, dW = x^T dy."""
  return [Gemm(group, tokens, d_in, d_out), Gemm(group, tokens, d_out, d_in, trans_b=True),
          Gemm(group, d_in, tokens, d_out, trans_a=True)]


def _experts(tokens: int, c: config_lib.ModelConfig) -> list[Gemm]:
  """The native grouped SwiGLU's products, each expert with its share of the tokens x top-k routed rows."""
  rows_total, e, d, f = tokens * c.n_activated_experts, c.n_routed_experts, c.dim, c.moe_inter_dim
  out = []
  for r, count in ((rows_total // e + 1, rows_total % e), (rows_total // e, e - rows_total % e)):
    if not r or not count:
      continue
    g = functools.partial(Gemm, "routed experts", count=count)
    out += [g(r, d, f), g(r, d, f), g(r, f, d)]  # x w1, x w3; h w2
    out += [g(r, d, f), g(r, f, d), g(r, f, d)]  # dy w2^T, da1 w1^T, da3 w3^T (on transposed copies of the weights)
    out += [g(d, r, f, trans_a=True), g(d, r, f, trans_a=True), g(f, r, d, trans_a=True)]  # x^T da1, x^T da3, h^T dy
  return out


def _attention(sequences: int, seq: int, c: config_lib.ModelConfig) -> list[Gemm]:
  """Per sequence and head: each query tile against the keys up to its end, in key tiles; the backward recomputes
  the scores, then dP = dO V^T, dV += P^T dO, dQ = dS K, dK += dS^T Q."""
  qk, v = c.qk_head_dim, c.v_head_dim
  g = functools.partial(Gemm, "attention", count=sequences * c.n_heads)
  out = []
  for s0 in range(0, seq, QUERY_ROWS):
    nq = min(QUERY_ROWS, seq - s0)
    for t0 in range(0, s0 + nq, KEY_COLS):
      nk = min(KEY_COLS, s0 + nq - t0)
      out += [g(nq, qk, nk), g(nq, nk, v)]  # forward: scores, P V
      out += [g(nq, qk, nk), g(nq, v, nk, trans_b=True), g(nk, nq, v, trans_a=True), g(nq, nk, qk),
              g(nk, nq, qk, trans_a=True)]
  return out


def step_gemms(c: config_lib.ModelConfig, batch: int, seq: int, devices: int = 1) -> list[Gemm]:
  """Every GEMM of one device's forward + backward (MTP off), the batch split evenly over `devices`."""
  if batch % devices:
    raise ValueError(f"batch {batch} does not split over {devices} devices")
  sequences = batch // devices
  t = sequences * seq
  out = []
  for layer in range(c.n_layers):
    attn = ("attention projections", t)
    if c.q_lora_rank:
      out += _linear(*attn, c.dim, c.q_lora_rank) + _linear(*attn, c.q_lora_rank, c.n_heads * c.qk_head_dim)
    else:
      out += _linear(*attn, c.dim, c.n_heads * c.qk_head_dim)
    out += _linear(*attn, c.dim, c.kv_lora_rank + c.qk_rope_head_dim)
    out += _linear(*attn, c.kv_lora_rank, c.n_heads * (c.qk_nope_head_dim + c.v_head_dim))
    out += _linear(*attn, c.n_heads * c.v_head_dim, c.dim)
    out += _attention(sequences, seq, c)
    if layer < c.n_dense_layers:
      out += _linear("dense MLP", t, c.dim, 2 * c.inter_dim) + _linear("dense MLP", t, c.inter_dim, c.dim)
    else:
      out += _linear("router", t, c.dim, c.n_routed_experts)
      hidden = c.n_shared_experts * c.moe_inter_dim
      if hidden:
        out += _linear("shared experts", t, c.dim, 2 * hidden) + _linear("shared experts", t, hidden, c.dim)
      out += _experts(t, c)
  out += _linear("output head", t, c.dim, c.vocab_size)
  return out


def _operands(g: Gemm, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """A, B as stored ([count, k, m] where A is read transposed, [count, n, k] where B is) and C, all C-contiguous."""
  a = rng.standard_normal((g.count, *((g.k, g.m) if g.trans_a else (g.m, g.k))), np.float32)
  b = rng.standard_normal((g.count, *((g.n, g.k) if g.trans_b else (g.k, g.n))), np.float32)
  return a, b, np.empty((g.count, g.m, g.n), np.float32)


def product(kernel: str):
  """fn(g, a, b, c) running `g` on operands from `_operands`: 'native', the kernels' own GEMM (`native.gemm_batch`:
  OpenBLAS with products blocked under its small-matrix limit, as csrc/ runs them), or 'numpy' (numpy's matmul, one
  OpenBLAS call per product)."""
  if kernel == "native":
    return lambda g, a, b, c: native.gemm_batch(a, b, c, g.trans_a, g.trans_b)
  if kernel == "numpy":
    return lambda g, a, b, c: np.matmul(a.swapaxes(1, 2) if g.trans_a else a, b.swapaxes(1, 2) if g.trans_b else b,
                                        out=c)
  raise ValueError(f"kernel must be 'native' or 'numpy', got {kernel!r}")


def time_gemms(gemms: list[Gemm], threads: int, repetitions: int, warmup: int = 2,
               kernel: str = "native") -> dict[str, Any]:
  """`gemms` run back to back through `product(kernel)` in each of `threads` threads at once, `repetitions` times
  after `warmup`.

  Returns the seconds of each repetition (its slowest thread), each group's seconds in thread 0's last
  repetition, and whether every thread's BLAS calls were held to one core.
  """
  run = product(kernel)
  barrier = threading.Barrier(threads)
  spans: list[list[float]] = [[] for _ in range(threads)]
  by_group: dict[str, float] = collections.defaultdict(float)
  single = [False] * threads
  errors = []

  def worker(index: int) -> None:
    try:
      single[index] = native.one_blas_thread_here()
      rng = np.random.default_rng(index)
      operands = {g: _operands(g, rng) for g in dict.fromkeys(gemms)}
      for rep in range(warmup + repetitions):
        last = index == 0 and rep == warmup + repetitions - 1
        barrier.wait()
        start = time.perf_counter()
        for g in gemms:
          t0 = time.perf_counter()
          run(g, *operands[g])
          if last:
            by_group[g.group] += time.perf_counter() - t0
        if rep >= warmup:
          spans[index].append(time.perf_counter() - start)
    except BaseException as e:  # noqa: BLE001 - re-raised below
      errors.append(e)
      barrier.abort()

  pool = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
  for th in pool:
    th.start()
  for th in pool:
    th.join()
  if errors:
    raise errors[0]
  return {"seconds": [max(s[i] for s in spans) for i in range(repetitions)], "group_seconds": dict(by_group),
          "one_blas_thread": all(single)}


def for_run(config: ml_collections.ConfigDict, repetitions: int) -> dict[str, Any]:
  """`floor` for a run config's model (MTP off, as the suite times our step) at its batch and length, on as many
  threads as the step has devices (`host.auto_device_count`, as `bench.OursStep` picks them)."""
  batch = config.data.batch_size
  cfg = train.model_config(config, vocab_needed=0).replace(n_mtp_layers=0)
  return floor(cfg, batch, config.data.seq_len, host.auto_device_count(batch, jax.device_count()), repetitions)


def floor(c: config_lib.ModelConfig, batch: int, seq: int, devices: int, repetitions: int) -> dict[str, Any]:
  """The step's GEMMs timed alone (see the module docstring) through each GEMM at hand, the native kernels' own
  (where they are available) and numpy's; the faster list's ms per step, its rate and its parts, and every
  kernel's median."""
  gemms = step_gemms(c, batch, seq, devices)
  kernels = ("native", "numpy") if native.available() else ("numpy",)
  timed = {k: time_gemms(gemms, devices, repetitions, kernel=k) for k in kernels}
  medians = {k: 1e3 * statistics.median(t["seconds"]) for k, t in timed.items()}
  kernel = min(medians, key=medians.get)
  ms = [1e3 * s for s in timed[kernel]["seconds"]]
  flops = collections.Counter()
  for g in gemms:
    flops[g.group] += g.flops
  total = sum(flops.values())
  return {"kernel": kernel, "kernel_ms": medians, "devices": devices, "batch": batch, "seq_len": seq,
          "gemms_per_device": sum(g.count for g in gemms), "flops_per_device": total,
          "ms": {"median": medians[kernel], "min": min(ms), "max": max(ms), "n": len(ms)},
          "gflops_per_s_per_thread": total / medians[kernel] / 1e6,
          "one_blas_thread": all(t["one_blas_thread"] for t in timed.values()),
          "groups": [{"group": name, "flops": f, "ms": 1e3 * timed[kernel]["group_seconds"].get(name, 0.0)}
                     for name, f in flops.most_common()]}
