"""Times the MoE layer's forward + backward against the number of routed experts, ours beside ragged_dot.

impl "auto" is what training runs (on CPU in float32 the native BLAS call of `dsv3_jax/cpu_experts.py`), "xla"
the XLA tile loop, "ragged_dot" `jax.lax.ragged_dot` as a reference.

  python -m experiments.bench_moe                                  # about 1.5 minutes on 2 CPU cores
  python -m experiments.bench_moe --tokens=4096 --experts=8,256 --impls=auto,xla --json_out=/tmp/moe.json

Each case jits value_and_grad of sum(y^2) w.r.t. x and the expert weights (routed and shared) of
`dsv3_jax.moe.MoE`, so routing, the tile layout, the gathers and the shared expert are all timed. A dropless
MoE should cost about the same for any E at a fixed tokens x top-k; the summary prints t(max E) / t(min E).
Cases whose compiled program needs more than --max_temp_gb of scratch or --max_gflop of work (ragged_dot
lowers to about one dense matmul per expert on CPU) are skipped and reported with XLA's own numbers.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
from absl import app
from absl import flags
from absl import logging

from dsv3_jax import config
from dsv3_jax import keep_freed
from dsv3_jax import moe
from dsv3_jax import ops

_TOKENS = flags.DEFINE_list("tokens", ["256", "1024", "4096"], "Token counts (batch x seq) to time.")
_EXPERTS = flags.DEFINE_list("experts", ["8", "64", "256"], "Numbers of routed experts to time.")
_IMPLS = flags.DEFINE_list("impls", ["auto", "xla", "ragged_dot"],
                           "Routed-expert implementations (moe.expert_ffn): auto (native on CPU), xla, native, "
                           "ragged_dot.")
_REPS = flags.DEFINE_integer("reps", 5, "Timed repetitions per case, after --warmup untimed ones.")
_RAGGED_REPS = flags.DEFINE_integer("ragged_reps", 1, "Timed repetitions for impl=ragged_dot (slow on CPU).")
# Several: with large freed blocks kept mapped (dsv3_jax/keep_freed.py) the process maps its last new blocks within
# the first 4-8 calls, and on this VM first touching memory the process never had costs ~1 ms per MiB.
_WARMUP = flags.DEFINE_integer("warmup", 8, "Untimed runs per case after compilation.")
_MAX_CASE_S = flags.DEFINE_float("max_case_s", 10.0, "Stop repeating a case once its timed runs exceed this.")
_MAX_TEMP_GB = flags.DEFINE_float("max_temp_gb", 8.0, "Skip a case whose compiled scratch memory exceeds this.")
_MAX_GFLOP = flags.DEFINE_float("max_gflop", 700.0, "Skip a case whose compiled cost analysis exceeds this.")
_BATCH = flags.DEFINE_integer("batch", 1, "Sequences the tokens are split into (load statistics are per sequence).")
_DIM = flags.DEFINE_integer("dim", 256, "Model dim.")
_INTER = flags.DEFINE_integer("moe_inter_dim", 128, "Hidden size of each expert.")
_TOP_K = flags.DEFINE_integer("top_k", 8, "Experts activated per token.")
_SHARED = flags.DEFINE_integer("n_shared_experts", 1, "Shared experts.")
_GROUPS = flags.DEFINE_integer("n_expert_groups", 1, "Expert groups, used where valid for E (else 1).")
_LIMITED = flags.DEFINE_integer("n_limited_groups", 1, "Groups kept per token, with --n_expert_groups.")
_SEED = flags.DEFINE_integer("seed", 0, "Input and initialisation seed.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Optional path for the results as JSON.")


def _config(n_experts: int) -> config.ModelConfig:
  base = dict(dim=_DIM.value, moe_inter_dim=_INTER.value, n_routed_experts=n_experts, n_activated_experts=_TOP_K.value,
              n_shared_experts=_SHARED.value, dtype="float32", param_dtype="float32")
  try:
    return config.tiny(**base, n_expert_groups=_GROUPS.value, n_limited_groups=_LIMITED.value)
  except config.ConfigError:
    return config.tiny(**base, n_expert_groups=1, n_limited_groups=1)


def _step_fn(layer: moe.MoE, variables: dict[str, Any]):
  """jit(value_and_grad) of sum(y^2) w.r.t. x and the routed and shared expert weights."""
  params = variables["params"]
  trained = {"experts": params["experts"], **({"shared_experts": params["shared_experts"]}
                                              if "shared_experts" in params else {})}

  def loss(x_BSD, trained):
    y_BSD, _ = layer.apply({**variables, "params": {**params, **trained}}, x_BSD)
    return jnp.sum(jnp.square(y_BSD.astype(jnp.float32)))

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), trained


def _padding(layer: moe.MoE, variables: dict[str, Any], x_BSD: jax.Array) -> float:
  """Rows the tiles compute (live tiles x tile rows) per routed slot, for this input: 1.0 is no padding."""

  def live_rows(variables, x_BSD):
    _, state = layer.apply(variables, x_BSD, mutable=["intermediates"])
    experts_N = state["intermediates"]["selected_experts"][0].reshape(-1)
    layout = moe.tile_layout(experts_N, layer.cfg.n_routed_experts)
    return layout.n_tiles * layout.rows / experts_N.shape[0]

  return float(jax.jit(live_rows)(variables, x_BSD))


def _time_case(n_tokens: int, n_experts: int, impl: str) -> dict[str, Any]:
  cfg = _config(n_experts)
  layer = moe.MoE(cfg, impl=impl)
  key_x, key_init = jax.random.split(jax.random.key(_SEED.value))
  x_BSD = jax.random.normal(key_x, (_BATCH.value, n_tokens // _BATCH.value, cfg.dim), jnp.float32)
  variables = jax.jit(layer.init)(key_init, x_BSD)
  step, trained = _step_fn(layer, variables)
  record = dict(tokens=n_tokens, experts=n_experts, impl=impl, groups=cfg.n_expert_groups,
                rows_per_tile=ops.tile_rows(n_tokens * cfg.n_activated_experts, n_experts))
  start = time.perf_counter()
  compiled = step.lower(x_BSD, trained).compile()
  record["compile_s"] = time.perf_counter() - start
  temp_gb = compiled.memory_analysis().temp_size_in_bytes / 1e9
  cost = compiled.cost_analysis()
  gflop = (cost[0] if isinstance(cost, list) else cost).get("flops", 0.0) / 1e9
  record.update(temp_gb=temp_gb, xla_gflop=gflop)
  if temp_gb > _MAX_TEMP_GB.value or gflop > _MAX_GFLOP.value:
    record["skipped"] = f"needs {temp_gb:.1f} GB scratch, {gflop:.0f} GFLOP (limits --max_temp_gb, --max_gflop)"
    return record
  record["padding"] = _padding(layer, variables, x_BSD)
  for _ in range(_WARMUP.value):
    jax.block_until_ready(compiled(x_BSD, trained))
  reps = _RAGGED_REPS.value if impl == "ragged_dot" else _REPS.value
  times = []
  while len(times) < reps and (not times or sum(times) < _MAX_CASE_S.value):
    start = time.perf_counter()
    jax.block_until_ready(compiled(x_BSD, trained))
    times.append(time.perf_counter() - start)
  record.update(reps=len(times), median_ms=1e3 * statistics.median(times), min_ms=1e3 * min(times),
                max_ms=1e3 * max(times))
  return record


def _row(r: dict[str, Any]) -> str:
  head = f"{r['tokens']:>7} {r['experts']:>4} {r['impl']:>11} {r['rows_per_tile']:>4}"
  if "skipped" in r:
    return f"{head}  skipped: {r['skipped']}"
  return (f"{head} {r['padding']:>5.2f} {r['median_ms']:>10.1f} {r['min_ms']:>9.1f} {r['max_ms']:>9.1f} "
          f"{r['reps']:>4} {r['compile_s']:>8.1f}")


def _ratios(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """t(largest E) / t(smallest E) per impl and token count, where both were timed."""
  timed = {(r["impl"], r["tokens"], r["experts"]): r["median_ms"] for r in records if "median_ms" in r}
  lo, hi = min(int(e) for e in _EXPERTS.value), max(int(e) for e in _EXPERTS.value)
  out = []
  for impl in _IMPLS.value:
    for tokens in (int(t) for t in _TOKENS.value):
      a, b = timed.get((impl, tokens, hi)), timed.get((impl, tokens, lo))
      out.append(dict(impl=impl, tokens=tokens, experts_hi=hi, experts_lo=lo, ratio=a / b if a and b else None))
  return out


def main(argv):
  del argv
  if any(int(t) % _BATCH.value for t in _TOKENS.value):
    raise app.UsageError(f"--batch={_BATCH.value} must divide every --tokens value")
  logging.info("jax %s, %d device(s) (%s), %d CPU core(s)", jax.__version__, jax.device_count(),
               jax.devices()[0].platform, os.cpu_count())
  print(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"{os.cpu_count()} CPU core(s); dim {_DIM.value}, moe_inter_dim {_INTER.value}, top-{_TOP_K.value}, "
        f"{_SHARED.value} shared; forward + backward of sum(y^2) w.r.t. x and expert weights; "
        f"load average {os.getloadavg()[0]:.1f}")
  print(f"{'tokens':>7} {'E':>4} {'impl':>11} {'M':>4} {'pad':>5} {'median_ms':>10} {'min_ms':>9} {'max_ms':>9} "
        f"{'reps':>4} {'compile_s':>8}")
  records = []
  for n_tokens in (int(t) for t in _TOKENS.value):
    for n_experts in (int(e) for e in _EXPERTS.value):
      for impl in _IMPLS.value:
        records.append(_time_case(n_tokens, n_experts, impl))
        print(_row(records[-1]), flush=True)
  ratios = _ratios(records)
  for r in ratios:
    value = f"{r['ratio']:.2f}" if r["ratio"] else "n/a (a case was skipped)"
    goal = " (goal <= 2.0)" if r["impl"] == "auto" else ""
    print(f"t(E={r['experts_hi']}) / t(E={r['experts_lo']}) at {r['tokens']:>5} tokens, {r['impl']:>10}: {value}{goal}")
  if _JSON_OUT.value:
    holders = [v for v in globals().values() if isinstance(v, flags.FlagHolder)]
    meta = dict(jax=jax.__version__, devices=jax.device_count(), platform=jax.devices()[0].platform,
                cpus=os.cpu_count(), flags={h.name: h.value for h in holders})
    with open(_JSON_OUT.value, "w") as f:
      json.dump(dict(meta=meta, cases=records, ratios=ratios), f, indent=1)
    print(f"wrote {_JSON_OUT.value}")


if __name__ == "__main__":
  keep_freed.restart_with_fast_malloc()  # glibc on huge pages, large freed blocks kept mapped (DSV3_RESTART=0: not)
  app.run(main)
