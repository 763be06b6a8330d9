"""Every GPU-side check and timing in one run, one table at the end; about 5 minutes on one H200.

  python -m experiments.bench_gpu                           # needs one CUDA GPU and jax-cuda12-plugin
  python -m experiments.bench_gpu --train_batch=32 --json_path=/tmp/gpu.json

Rows (each with its wall time, so the whole run can be kept under 8 minutes):
1. bf16 matmul peak: an [N, N] @ [N, N] bf16 matmul (fp32 accumulation), the figure MFU is taken against
   (an H200 measures about 790 TFLOP/s).
2. Copy bandwidth: one large bf16 array copied (bytes read + written per second; about 4.3 TB/s).
3. FP8 kernels: `experiments.bench_fp8_gemm.run()` (about 2 minutes): the block-scaled FP8 GEMM kernels checked
   against fp8.scaled_matmul and timed on DeepGEMM's shapes next to bf16 jnp.dot; its table prints as it runs.
4. Training step, bf16 and fp8: `train.train_step` of the run config's model (default the small preset) with
   bf16 activations and fp32 master weights, MTP on, at --train_batch x --train_seq_len tokens, under the bf16
   recipe and under the fp8 one (block-scaled FP8 GEMMs in every block Linear and the routed experts, through
   the Pallas kernels); tokens/s and model FLOP/s (`metrics.model_flops_per_token`) over row 1's peak.
5. Decode: `experiments.bench_decode` in a child process (bf16, random weights, no transformers).
Without a GPU the script stops before doing anything and says why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
from absl import app
from absl import flags

from dsv3_jax import metrics
from experiments import bench
from experiments import bench_fp8_gemm

_MATMUL = flags.DEFINE_integer("gpu_matmul_size", 8192, "Side of the square bf16 matmul of the peak figure.")
_COPY_GIB = flags.DEFINE_float("copy_gib", 4.0, "Size of the array copied for the bandwidth figure, GiB.")
_TRAIN_BATCH = flags.DEFINE_integer("train_batch", 64, "Sequences per training step.")
_TRAIN_SEQ = flags.DEFINE_integer("train_seq_len", 512, "Tokens per training sequence.")
_DECODE_BATCHES = flags.DEFINE_list("gpu_decode_batch_sizes", ["1", "64"], "Batch sizes of the decode figures.")
_GPU_JSON = flags.DEFINE_string("gpu_json_path", None, "Also write the rows as JSON here.")


def require_gpu() -> None:
  """Stops with a plain message unless JAX's default backend is a GPU (nothing has run at that point)."""
  backend = jax.default_backend()
  if backend != "gpu":
    sys.exit(f"bench_gpu: needs a GPU, but JAX's backend is {backend!r} (devices: {jax.devices()}). Run it on a "
             "CUDA machine with jax-cuda12-plugin installed; nothing was measured.")


def _timed(fn, repetitions: int) -> dict[str, float]:
  fn()
  fn()
  times = []
  for _ in range(repetitions):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return bench.summary(times)


def bf16_peak(size: int) -> dict[str, Any]:
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.bfloat16)
  dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
  t = _timed(lambda: jax.block_until_ready(dot(a, b)), 50)
  tflops = 2 * size**3 / t["median"] / 1e12
  return {"figure": f"{tflops:.0f} TFLOP/s", "tflops": tflops, "seconds": t}


def copy_bandwidth(gib: float) -> dict[str, Any]:
  n = int(gib * 2**30 / 2)
  x = jnp.ones((n,), jnp.bfloat16)
  copy = jax.jit(lambda x: x * 1)  # one read and one write of every element
  t = _timed(lambda: jax.block_until_ready(copy(x)), 20)
  tbs = 2 * x.nbytes / t["median"] / 1e12
  return {"figure": f"{tbs:.2f} TB/s", "tb_per_s": tbs, "seconds": t}


def fp8_kernels() -> dict[str, Any]:
  rows = bench_fp8_gemm.run()
  summary = bench_fp8_gemm.summary(rows)
  return {"figure": summary.split(";")[0], "note": summary, "rows": rows}


def train_step(config, batch: int, seq: int, peak_tflops: float, recipe: str = "bf16", repetitions: int = 10,
               steps: int = 5) -> dict[str, Any]:
  """Our training step with bf16 activations under precision `recipe` (bf16, or fp8: block-scaled FP8 GEMMs
  through precision.impl, the Pallas kernels on a GPU); model FLOP/s over `peak_tflops`."""
  config = bench.bench_config(config, dtype="bfloat16")
  with config.unlocked():
    config.data.batch_size, config.data.seq_len = batch, seq
    config.precision.recipe = recipe
  runner = bench.OursStep(config, bench.random_tokens(config.model.vocab_size, batch, seq))
  for _ in range(3):
    runner.step()
  runner.sync()
  times = bench.round_robin({"ours": runner}, repetitions, steps)["ours"]
  rate = bench.summary([batch * seq / t for t in times])
  tflops = rate["median"] * metrics.model_flops_per_token(runner.cfg, seq) / 1e12
  return {"figure": f"{rate['median']:,.0f} tokens/s, {tflops:.1f} TFLOP/s, MFU {tflops / peak_tflops:.1%}",
          "tokens_per_s": rate, "model_tflops": tflops, "mfu": tflops / peak_tflops, "compile_s": runner.compile_s,
          "batch": batch, "seq_len": seq, "mtp": bool(runner.cfg.n_mtp_layers), "recipe": runner.cfg.precision,
          "first_ce": runner.first_ce}


def decode(batch_sizes: list[str]) -> dict[str, Any]:
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "decode.json")
    proc = subprocess.run([sys.executable, "-m", "experiments.bench_decode", "--nohf", "--config=configs/small_cpu.py",
                           "--config.model.dtype=bfloat16", f"--batch_sizes={','.join(batch_sizes)}",
                           "--new_tokens=128", "--repeats=3", f"--json_out={path}"],
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True,
                          text=True, timeout=300)
    if proc.returncode:
      return {"figure": "failed", "note": proc.stderr[-500:]}
    with open(path) as f:
      report = json.load(f)
  rates = {r["batch"]: r["ours"]["decode_tokens_per_s"]["median"] for r in report["runs"]}
  return {"figure": ", ".join(f"batch {b}: {v:,.0f} tokens/s" for b, v in rates.items()), "runs": report["runs"]}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  require_gpu()
  start = time.perf_counter()
  rows = {}

  def row(name, fn, *args):
    t = time.perf_counter()
    rows[name] = {**fn(*args), "wall_s": time.perf_counter() - t}
    print(f"{name}: {rows[name]['figure']} ({rows[name]['wall_s']:.0f} s)", flush=True)

  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
  row("bf16 matmul peak", bf16_peak, _MATMUL.value)
  row("copy bandwidth", copy_bandwidth, _COPY_GIB.value)
  row("FP8 kernels", fp8_kernels)
  for recipe in ("bf16", "fp8"):
    row(f"training step, {recipe}", train_step, bench._CONFIG.value, _TRAIN_BATCH.value, _TRAIN_SEQ.value,
        rows["bf16 matmul peak"]["tflops"], recipe)
  row("decode, bf16", decode, _DECODE_BATCHES.value)
  print(f"\n{'check':24s} {'figure':58s} {'wall s':>7s}  note")
  for name, r in rows.items():
    print(f"{name:24s} {r['figure']:58s} {r['wall_s']:7.0f}  {r.get('note', '')}")
  print(f"total {time.perf_counter() - start:.0f} s")
  if _GPU_JSON.value:
    with open(_GPU_JSON.value, "w") as f:
      json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
