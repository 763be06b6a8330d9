"""Checks and times the block-scaled FP8 GEMM kernels on one GPU, next to a bf16 `jnp.dot` in the same run.

  python -m experiments.bench_fp8_gemm                          # about 2 minutes on one H200 (estimate: not run)
  python -m experiments.bench_fp8_gemm --fp8_repeats=50 --fp8_json_path=/tmp/fp8_gemm.json

Rows: DeepGEMM's published dense shapes (M=4096 with (N, K) in (2112, 7168), (24576, 1536), (32768, 512),
(7168, 16384), (4096, 7168), (7168, 2048); the decode shapes M=64 and 128), then one MoE forward GEMM over 64
expert tiles of 128 rows (8 experts, N=4096, K=7168; `grouped_gemm`) and one MoE Wgrad (8 experts, 64 tiles of
128 tokens, K=7168, N=2048; `grouped_gemm_wgrad`). For each kernel (the Triton-backend kernels of
`pallas_kernels/fp8_gemm.py` with the fp8 wgmma fast path, and the Mosaic GPU kernel of `fp8_gemm_mgpu.py` on the
dense shapes):
- rel err: max |kernel - ref| / max |ref| against the dequantized fp32 product (`fp8.scaled_matmul` with fp32
  output: exact block products promoted in fp32), where bf16 output rounding gives about 4e-3;
- calc_diff: DeepGEMM's 1 - 2 sum(xy) / sum(x^2 + y^2) against the unquantized fp32 product of the randn inputs
  (< 1e-3 passes, as in DeepGEMM's tests);
- TFLOP/s = 2 M N K / median time of back-to-back calls (dispatch is asynchronous, so per-call launch cost is
  hidden), and the same for `jnp.dot` of the bf16 inputs with fp32 accumulation and bf16 output.
A kernel that fails to compile or run gets an error row; the others still run. Without a GPU the script says so
and exits 0 without measuring anything.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from dsv3_jax import fp8
from pallas_kernels import fp8_gemm
from pallas_kernels import fp8_gemm_mgpu

_REPEATS = flags.DEFINE_integer("fp8_repeats", 20, "Back-to-back calls per timing, after two warm-up calls.")
_JSON = flags.DEFINE_string("fp8_json_path", None, "Also write the rows as JSON here.")

DENSE_SHAPES = fp8_gemm.SWEEP_SHAPES
GROUPED = {"tiles": 64, "rows": 128, "experts": 8, "n": 4096, "k": 7168}
WGRAD = {"tiles": 64, "rows": 128, "experts": 8, "k": 7168, "n": 2048}
CALC_DIFF_BOUND = 1e-3


def _checked(name: str, fn, args, flops: float, dequantized, exact, repeats: int) -> dict[str, Any]:
  try:
    out = fn(*args)
    row = {"kernel": name, "rel_err": fp8_gemm.relative_error(out, dequantized),
           "calc_diff": fp8_gemm.calc_diff(out, exact)}
    row["ok"] = bool(row["rel_err"] <= 1e-2 and row["calc_diff"] < CALC_DIFF_BOUND)
    row["tflops"] = flops / fp8_gemm.time_call(fn, *args, repeats=repeats) / 1e12
  except Exception as e:  # noqa: BLE001 (one kernel's failure must not hide the other rows)
    row = {"kernel": name, "ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
  return row


def dense_rows(m: int, n: int, k: int, repeats: int) -> list[dict[str, Any]]:
  """Triton kernel, Mosaic GPU kernel and bf16 jnp.dot at one DeepGEMM shape."""
  kx, kw = jax.random.split(jax.random.key(m + n + k))
  x_MK = jax.random.normal(kx, (m, k), jnp.float32)
  w_NK = jax.random.normal(kw, (n, k), jnp.float32)
  a, sa = fp8.quantize_rows(x_MK)
  b, sb = fp8.quantize_blocks(w_NK)
  exact = jnp.dot(x_MK, w_NK.T, precision=jax.lax.Precision.HIGHEST)
  dequantized = jax.jit(functools.partial(fp8.scaled_matmul, out_dtype=jnp.float32))(a, sa, b, sb)
  flops = 2.0 * m * n * k
  triton = jax.jit(functools.partial(fp8_gemm.gemm, config=fp8_gemm.default_config(m)))
  mgpu_config = fp8_gemm_mgpu.TuningConfig(tile_n=128 if n % 128 == 0 else 64)
  mgpu = jax.jit(functools.partial(fp8_gemm_mgpu.gemm, config=mgpu_config))
  rows = [_checked("triton", triton, (a, sa, b, sb), flops, dequantized, exact, repeats),
          _checked("mosaic_gpu", mgpu, (a, sa, b, sb), flops, dequantized, exact, repeats)]
  x16, w16 = x_MK.astype(jnp.bfloat16), w_NK.astype(jnp.bfloat16)
  bf16_dot = jax.jit(lambda x, w: jnp.dot(x, w.T, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
  rows.append({"kernel": "bf16 jnp.dot", "calc_diff": fp8_gemm.calc_diff(bf16_dot(x16, w16), exact),
               "tflops": flops / fp8_gemm.time_call(bf16_dot, x16, w16, repeats=repeats) / 1e12})
  return [{"shape": f"{m}x{n}x{k}", **r} for r in rows]


def _tile_layout(tiles: int, experts: int):
  """Every expert owns tiles/experts contiguous tiles; the last 4 tiles are padding."""
  tile_expert_G = jnp.repeat(jnp.arange(experts, dtype=jnp.int32), tiles // experts)
  return tile_expert_G, jnp.array(tiles - 4, jnp.int32)


def grouped_row(repeats: int) -> dict[str, Any]:
  g, rows, e, n, k = (GROUPED[key] for key in ("tiles", "rows", "experts", "n", "k"))
  kx, kw = jax.random.split(jax.random.key(1))
  x_GMK = jax.random.normal(kx, (g, rows, k), jnp.float32)
  w_ENK = jax.random.normal(kw, (e, n, k), jnp.float32)
  a, sa = fp8.quantize_rows(x_GMK)
  b, sb = jax.vmap(fp8.quantize_blocks)(w_ENK)
  tile_expert_G, n_tiles = _tile_layout(g, e)
  live = (jnp.arange(g) < n_tiles)[:, None, None]
  x_ETMK = x_GMK.reshape(e, g // e, rows, k)  # each expert's tiles, contiguous
  exact = jnp.where(live, jnp.einsum("etmk,enk->etmn", x_ETMK, w_ENK, precision="highest").reshape(g, rows, n), 0)
  dequantized = jax.jit(functools.partial(fp8.grouped_scaled_matmul, out_dtype=jnp.float32))(
      a, sa, b, sb, tile_expert_G, n_tiles)
  flops = 2.0 * int(n_tiles) * rows * n * k
  row = _checked("triton grouped", jax.jit(fp8_gemm.grouped_gemm), (a, sa, b, sb, tile_expert_G, n_tiles), flops,
                 dequantized, exact, repeats)
  return {"shape": f"{int(n_tiles)}x{rows} rows, E={e}, N={n}, K={k}", **row}


def wgrad_row(repeats: int) -> dict[str, Any]:
  g, rows, e, k, n = (WGRAD[key] for key in ("tiles", "rows", "experts", "k", "n"))
  kx, ky = jax.random.split(jax.random.key(2))
  x_GKM = jax.random.normal(kx, (g, k, rows), jnp.float32)
  dy_GNM = jax.random.normal(ky, (g, n, rows), jnp.float32)
  a, sa = fp8.quantize_rows(x_GKM)
  b, sb = fp8.quantize_rows(dy_GNM)
  tile_expert_G, n_tiles = _tile_layout(g, e)
  live_x_GKM = jnp.where((jnp.arange(g) < n_tiles)[:, None, None], x_GKM, 0)
  exact = jnp.einsum("etkm,etnm->ekn", live_x_GKM.reshape(e, g // e, k, rows), dy_GNM.reshape(e, g // e, n, rows),
                     precision="highest")
  args = (a, sa, b, sb, tile_expert_G, n_tiles)
  dequantized = jax.jit(fp8.grouped_scaled_matmul_wgrad, static_argnums=6)(*args, e)
  fn = jax.jit(functools.partial(fp8_gemm.grouped_gemm_wgrad, n_experts=e))
  row = _checked("triton wgrad", fn, args, 2.0 * int(n_tiles) * rows * k * n, dequantized, exact, repeats)
  return {"shape": f"E={e}, {int(n_tiles)}x{rows} tokens, K={k}, N={n}", **row}


def run(repeats: int = 20) -> list[dict[str, Any]]:
  """Every row (the caller checks for a GPU); printed as they finish."""
  rows = []
  for m, n, k in DENSE_SHAPES:
    for row in dense_rows(m, n, k, repeats):
      rows.append(row)
      print(format_row(row), flush=True)
  for fn in (grouped_row, wgrad_row):
    rows.append(fn(repeats))
    print(format_row(rows[-1]), flush=True)
  return rows


def format_row(row: dict[str, Any]) -> str:
  if "error" in row:
    return f"{row['shape']:38s} {row['kernel']:16s} ERROR {row['error']}"
  rel = f"{row['rel_err']:9.1e}" if "rel_err" in row else f"{'':9s}"
  status = {True: "ok", False: "FAIL"}.get(row.get("ok"), "")
  return f"{row['shape']:38s} {row['kernel']:16s} {rel} {row['calc_diff']:9.1e} {row['tflops']:8.0f}  {status}"


def summary(rows: list[dict[str, Any]]) -> str:
  """One line: checks passed, and the best and the M=4096 median TFLOP/s of each kernel."""
  checked = [r for r in rows if "ok" in r]
  parts = [f"{sum(r['ok'] for r in checked)}/{len(checked)} checks pass"]
  for kernel in ("triton", "mosaic_gpu", "bf16 jnp.dot"):
    big = [r["tflops"] for r in rows if r["kernel"] == kernel and r["shape"].startswith("4096x") and "tflops" in r]
    if big:
      parts.append(f"{kernel} M=4096 median {np.median(big):.0f} TFLOP/s")
  return "; ".join(parts)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if jax.default_backend() != "gpu":
    print(f"bench_fp8_gemm: needs a GPU, but JAX's backend is {jax.default_backend()!r}; nothing was measured. "
          "(On CPU, tests/test_pallas_fp8.py checks the kernels in interpret mode.)")
    return
  start = time.perf_counter()
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, fp8 wgmma fast path "
        f"{'on' if fp8_gemm.install_fp8_wgmma_patch() else 'OFF (unchecked jax version)'}")
  print(f"{'shape (M x N x K)':38s} {'kernel':16s} {'rel err':>9s} {'calc_diff':>9s} {'TFLOP/s':>8s}")
  rows = run(_REPEATS.value)
  print(summary(rows))
  print(f"total {time.perf_counter() - start:.0f} s")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows}, f, indent=1)
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
