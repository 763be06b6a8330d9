"""Where our training step spends its time: exclusive time per XLA op from a jax.profiler trace, by model component.

Used by `python -m experiments.bench --sections=train --profile_dir=DIR`; the summary lands in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import time
from typing import Any

import jax

# (substring of the op's source path, component); the first match wins.
_COMPONENTS = (
    ("moe_layers/ffn/experts", "MoE routed experts (layout, gathers, tile matmuls)"),
    ("moe_layers/ffn/gate", "MoE router"),
    ("moe_layers/ffn/shared_experts", "MoE shared expert"),
    ("moe_layers/ffn", "MoE combine and load statistics"),
    ("dense_layers/ffn", "dense MLP"),
    ("/attn/", "attention (MLA)"),
    ("_norm/", "layer norms"),
    ("Transformer._trunk", "layer scan: slicing weights, stacking residuals"),
    ("Transformer", "embedding, final norm, head"),
    ("while/body", "loss and micro-batch gradient sum"),
)


def _op_sources(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> the op_name metadata (the jax source path) of the compiled module."""
  out = {}
  for line in hlo_text.splitlines():
    m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"', line)
    if m:
      out[m.group(1)] = m.group(2)
  return out


def _is_matmul(op: str, source: str) -> bool:
  """A dot, or a fusion built around one (XLA CPU names them dot.N / ynn_fusion.N with a dot_general source)."""
  return op.startswith("dot") or (op.startswith("ynn_fusion") and source.endswith("dot_general"))


def _component(source: str) -> str:
  for key, name in _COMPONENTS:
    if key in source:
      return name
  return "optimizer, clipping, bias update" if source.startswith("jit(train_step)") else "other"


def _exclusive_times(events: list[dict]) -> collections.Counter:
  """Microseconds per op with nested ops' time taken out (a while's body ops are their own entries)."""
  out = collections.Counter()
  by_thread = collections.defaultdict(list)
  for e in events:
    by_thread[e["tid"]].append(e)
  for thread in by_thread.values():
    thread.sort(key=lambda e: (e["ts"], -e["dur"]))
    stack = []  # [end, name]
    for e in thread:
      while stack and stack[-1][0] <= e["ts"]:
        stack.pop()
      if stack:
        out[stack[-1][1]] -= e["dur"]
      out[e["args"]["hlo_op"]] += e["dur"]
      stack.append([e["ts"] + e["dur"], e["args"]["hlo_op"]])
  return out


def profile(runner, out_dir: str, steps: int) -> dict[str, Any]:
  """Traces `steps` steps of runner (a bench.OursStep) into out_dir; ms per step by component, and the top ops."""
  runner.sync()
  start = time.perf_counter()
  with jax.profiler.trace(out_dir):
    for _ in range(steps):
      runner.step()
    runner.sync()
  wall_ms = 1e3 * (time.perf_counter() - start) / steps
  trace_files = sorted(glob.glob(os.path.join(out_dir, "**", "*.trace.json.gz"), recursive=True), key=os.path.getmtime)
  with gzip.open(trace_files[-1]) as f:
    events = [e for e in json.load(f)["traceEvents"]
              if e.get("ph") == "X" and e.get("args", {}).get("hlo_module") == "jit_train_step"
              and "hlo_op" in e.get("args", {})]
  sources = _op_sources(runner.compiled.as_text())
  exclusive = _exclusive_times(events)
  counts = collections.Counter(e["args"]["hlo_op"] for e in events)
  by_component = collections.Counter()
  for op, us in exclusive.items():
    by_component[_component(sources.get(op, ""))] += us / 1e3 / steps
  total = sum(by_component.values())
  matmul_ms = sum(us for op, us in exclusive.items() if _is_matmul(op, sources.get(op, ""))) / 1e3 / steps
  top = [{"op": op, "ms": us / 1e3 / steps, "calls": counts[op] // steps, "source": sources.get(op, "")[-140:]}
         for op, us in exclusive.most_common(15)]
  return {"trace_dir": out_dir, "steps": steps, "wall_ms_per_step": wall_ms, "op_ms_per_step": total,
          "matmul_ms_per_step": matmul_ms, "model_flops_per_step": runner.flops_per_step,
          "by_component": [{"component": c, "ms": ms, "share": ms / total} for c, ms in by_component.most_common()],
          "top_ops": top}
