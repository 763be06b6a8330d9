"""Block-scaled FP8 GEMMs (DeepSeek-V3's recipe) as Pallas kernels on the Triton backend.

Numerics (DeepSeek-V3 report section 3.3; the semantics of `fp8.scaled_matmul`):

  D[m, n] = sum_j a_scale[m, j] * b_scale[n // b_block, j] * (sum_{k in 128-block j} a[m, k] * b[n, k])

1. Both operands are float8_e4m3fn and K-major: A is [M, K] with one fp32 scale per row per 128-wide K block
   (1x128 tiles), B is [N, K] (DeepSeek's weight layout) with one scale per 128x128 block (b_block=128) or per row
   per K block (b_block=1, the Wgrad operands).
2. Each program owns one [block_m, block_n] output tile and walks K in steps of exactly 128: every step starts a
   fresh fp8 dot with fp32 accumulation, then promotes it into an fp32 accumulator on the CUDA cores after
   multiplying by the combined scale (acc = acc + part * (sa[:, None] * sb)). This is the report's N_C = 128
   promotion interval, and the same order `reference()` sums in, so the two agree to fp32 rounding.
3. Partial tiles are handled, not refused: M and N edges mask their loads and stores; a K that is not a multiple of
   128 masks the columns past K in every step (zeros add nothing). Masks exist only where the static shapes need
   them, so the aligned case (all of DeepSeek's K) has none along K.

Three kernels share that body:
- `gemm`: dense, grid (M tiles, N tiles).
- `grouped_gemm`: the MoE forward / Dgrad GEMM over expert-contiguous row tiles (`moe.TileLayout`): grid
  (tile, row block, N tiles); each program reads its tile's expert id from memory (the Triton backend has no scalar
  prefetch, so B's BlockSpec spans all experts and the kernel indexes it). Padding tiles (g >= n_tiles) run a
  zero-trip K loop and store zeros; they read neither operand.
- `grouped_gemm_wgrad`: MoE Wgrad, out[e] = sum over expert e's live tiles of a[g] @ b[g]^T, contracting the token
  axis with one scale group per 128 tokens of a tile. It is output-stationary: grid (expert, K tiles, N tiles),
  each program loops over the token blocks of its expert's contiguous range of tiles (found before the call from
  tile_expert) and writes its tile once. No atomics and no [G, K, N] intermediate, the result is deterministic,
  and an expert with no tiles writes zeros. The cost is load imbalance between experts, which the many (K, N) tiles
  per expert should hide (not measured).

Hopper fast path: the Triton lowering of jax <= 0.10.2 emits fp8 dots without `maxNumImpreciseAcc`, so Triton
falls back to f16 `mma.sync`; `install_fp8_wgmma_patch()` (applied on first non-interpret use, only on the jax
versions where it was checked) passes the dot's K (128) so that the same kernel compiles to
`wgmma.mma_async ... .e4m3.e4m3`. Because each dot is exactly one 128-wide K block, this is still promotion every
128 products. `tests/test_pallas_fp8.py` checks both PTXs from a deviceless H100 compile.

The backward of an FP8 linear is built from these GEMMs by `fp8.py` (Fprop, Dgrad, Wgrad each quantize their own
operands), so the kernels themselves carry no custom VJP.

  python -m pallas_kernels.fp8_gemm          # sweep: checks against reference() and prints TFLOP/s (GPU only)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dsv3_jax import fp8

BLOCK_K = 128  # the K block of the scales and of every fp8 dot: DeepSeek's promotion interval
E4M3 = jnp.float8_e4m3fn
OUT_DTYPES = (jnp.bfloat16, jnp.float32)
H100_FP8_PEAK_TFLOPS = 1979.0  # dense FP8 spec figure of an H100/H200 SXM (the share-of-peak column)


@dataclasses.dataclass(frozen=True)
class TuningConfig:
  """Tile sizes and Triton launch parameters (K is always 128 per step: the scale block)."""

  block_m: int = 128  # rows per program (grouped: capped at the padded tile rows)
  block_n: int = 128  # columns per program; divides 128 so one weight scale block covers it
  num_warps: int = 8
  num_stages: int = 4

  def __post_init__(self):
    for name in ("block_m", "block_n"):
      value = getattr(self, name)
      if value < 16 or value & (value - 1):
        raise ValueError(f"TuningConfig.{name}={value}: must be a power of two >= 16 (Triton dot tiles)")
    if self.block_n > BLOCK_K:
      raise ValueError(f"TuningConfig.block_n={self.block_n}: must divide {BLOCK_K} (one 128x128 weight scale "
                       "block per program)")


def default_config(m: int) -> TuningConfig:
  """Smaller row tiles for decode-sized M, where the GEMM is bound by reading B."""
  return TuningConfig(block_m=64, num_warps=4) if m <= 64 else TuningConfig()


# The Hopper fast path: fp8 dots on wgmma instead of f16 mma.sync.

FP8_WGMMA_CHECKED_JAX = ("0.10.2",)  # versions whose lowering lacks maxNumImpreciseAcc and where the PTX was checked
_patch = {"installed": False, "enabled": True, "warned": False}


def install_fp8_wgmma_patch() -> bool:
  """Makes the Triton lowering pass maxNumImpreciseAcc = K on fp8 dots; returns whether it is active.

  Triton's AccelerateMatmul pass refuses MMAv3 (wgmma) for an fp8 dot with an fp32 result unless the dot allows at
  least 32 imprecise accumulations; jax's `_dot_general_lowering` never sets the value. Our dots are one 128-wide K
  block each (promoted right after), so allowing all 128 keeps DeepSeek's promotion interval. A private-API
  patch: applied only to the jax versions listed in FP8_WGMMA_CHECKED_JAX, else fp8 dots stay on mma.sync (correct,
  slower) with a warning.
  """
  if _patch["installed"]:
    return True
  if jax.__version__ not in FP8_WGMMA_CHECKED_JAX:
    if not _patch["warned"]:
      _patch["warned"] = True
      logging.warning("fp8_gemm: jax %s is not one of %s where the fp8 wgmma patch was checked; fp8 dots will run on "
                      "the slower f16 mma.sync path", jax.__version__, FP8_WGMMA_CHECKED_JAX)
    return False
  from jax._src.lib.mlir import ir
  from jax._src.pallas.triton import lowering

  original = lowering.tt_dialect.dot
  fp8_types = (ir.Float8E4M3FNType, ir.Float8E5M2Type)

  def dot(a, b, c, *, input_precision=None, max_num_imprecise_acc=None, **kwargs):
    a_type = ir.RankedTensorType(a.type)
    if _patch["enabled"] and max_num_imprecise_acc is None and isinstance(a_type.element_type, fp8_types):
      max_num_imprecise_acc = a_type.shape[-1]
    return original(a, b, c, input_precision=input_precision, max_num_imprecise_acc=max_num_imprecise_acc, **kwargs)

  lowering.tt_dialect.dot = dot
  _patch["installed"] = True
  return True


@contextlib.contextmanager
def fp8_wgmma(enabled: bool):
  """Turns the patch's effect on or off for kernels lowered inside the block (the PTX negative control).

  JAX caches lowerings and compilations, so the caches are cleared on entry and exit: nothing lowered under one
  setting is reused under the other.
  """
  install_fp8_wgmma_patch()
  previous, _patch["enabled"] = _patch["enabled"], enabled
  jax.clear_caches()
  try:
    yield
  finally:
    _patch["enabled"] = previous
    jax.clear_caches()


# Shared kernel pieces.


def _edge(start, size: int, extent: int):
  """Mask of the in-bounds positions of a block starting at `start`, or None when none can be out of bounds."""
  return None if extent % size == 0 else start + jnp.arange(size) < extent


def _and(*masks):
  masks = [m for m in masks if m is not None]
  if not masks:
    return None
  out = masks[0]
  for m in masks[1:]:
    out = jnp.logical_and(out, m)
  return out


def _outer(row_mask, col_mask, shape):
  rows = None if row_mask is None else jnp.broadcast_to(row_mask[:, None], shape)
  cols = None if col_mask is None else jnp.broadcast_to(col_mask[None, :], shape)
  return _and(rows, cols)


def _load(ref, mask):
  return ref[...] if mask is None else plgpu.load(ref, mask=mask, other=jnp.zeros((), ref.dtype))


def _dot_nt(a, b):
  """[p, t] x [q, t] -> fp32 [p, q]: the lowering transposes the K-major B for the MMA."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _scaled_k_loop(a_at, as_ref, b_at, b_scale, n_steps, shape, a_rows, b_rows, k_extent: int):
  """acc = sum over K blocks of part * (sa[:, None] * sb) in block order.

  a_at(kk) / b_at(kk) give the [bm, 128] / [bn, 128] views of K block kk as one indexer (the Triton lowering takes
  no chained .at); b_scale(k_step) gives a [bn] vector or a scalar.
  """
  bm, bn = shape

  def step(k_step, acc):
    kk = pl.ds(pl.multiple_of(k_step * BLOCK_K, BLOCK_K), BLOCK_K)
    k_mask = _edge(k_step * BLOCK_K, BLOCK_K, k_extent)
    a = _load(a_at(kk), _outer(a_rows, k_mask, (bm, BLOCK_K)))
    b = _load(b_at(kk), _outer(b_rows, k_mask, (bn, BLOCK_K)))
    part = _dot_nt(a, b)  # a fresh fp8 dot per 128-wide K block
    sa = _load(as_ref.at[:, k_step], a_rows)
    sb = b_scale(k_step)
    return acc + part * (sa[:, None] * (sb[None, :] if jnp.ndim(sb) else sb))

  # Both bounds int32: the Triton for-loop needs one index type, and n_steps may be a traced int32.
  return jax.lax.fori_loop(jnp.int32(0), jnp.int32(n_steps), step, jnp.zeros((bm, bn), jnp.float32))


def _compiler_params(config: TuningConfig):
  return plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)


def _prepare_lowering(interpret: bool) -> None:
  if not interpret:
    install_fp8_wgmma_patch()


# Input checks: every problem names the argument and the shape or dtype expected.


def _check_fp8(name: str, x) -> None:
  if x.dtype != E4M3:
    raise TypeError(f"{name}: expected float8_e4m3fn, got {x.dtype} (quantize with fp8.quantize_rows / "
                     "fp8.quantize_blocks)")


def _check_shape(name: str, x, expected: tuple[int, ...], meaning: str) -> None:
  if tuple(x.shape) != tuple(expected):
    raise ValueError(f"{name}: expected shape {tuple(expected)} ({meaning}), got {tuple(x.shape)}")
  if x.dtype != jnp.float32:
    raise TypeError(f"{name}: scales must be float32, got {x.dtype}")


def _check_out_dtype(out_dtype) -> None:
  if jnp.dtype(out_dtype) not in [jnp.dtype(d) for d in OUT_DTYPES]:
    raise TypeError(f"out_dtype: expected bfloat16 or float32, got {jnp.dtype(out_dtype)}")


def _check_rank(name: str, x, rank: int, letters: str) -> None:
  if x.ndim != rank:
    raise ValueError(f"{name}: expected a rank-{rank} [{', '.join(letters)}] array, got shape {tuple(x.shape)}")


def _out_struct(shape: tuple[int, ...], dtype, *inputs) -> jax.ShapeDtypeStruct:
  """The kernel's output type, varying over every manual mesh axis an input varies over (inside shard_map,
  pallas_call needs this stated; outside it the set is empty)."""
  varying = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in inputs))
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.sharding.ManualAxisType(varying=varying))


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


# Dense GEMM.


def _dense_kernel(a_ref, as_ref, b_ref, bs_ref, o_ref, *, m: int, n: int, k: int, b_block: int):
  bm, bn = o_ref.shape
  a_rows = _edge(pl.program_id(0) * bm, bm, m)
  b_rows = _edge(pl.program_id(1) * bn, bn, n)
  if b_block == 1:
    b_scale = lambda k_step: _load(bs_ref.at[:, k_step], b_rows)
  else:
    b_scale = lambda k_step: bs_ref[k_step]
  acc = _scaled_k_loop(lambda kk: a_ref.at[:, kk], as_ref, lambda kk: b_ref.at[:, kk], b_scale, _cdiv(k, BLOCK_K),
                       (bm, bn), a_rows, b_rows, k)
  plgpu.store(o_ref, acc.astype(o_ref.dtype), mask=_outer(a_rows, b_rows, (bm, bn)))


def check_gemm_inputs(a_MK, a_scale_MJ, b_NK, b_scale, b_block: int, out_dtype) -> None:
  """Raises TypeError (dtype) or ValueError (shape) naming the first argument that does not fit the others."""
  _check_fp8("a", a_MK)
  _check_fp8("b", b_NK)
  _check_rank("a", a_MK, 2, "MK")
  _check_rank("b", b_NK, 2, "NK")
  (m, k), (n, k_b) = a_MK.shape, b_NK.shape
  if k_b != k:
    raise ValueError(f"b: expected shape ({n}, {k}) (K-major [N, K], K as in a), got {tuple(b_NK.shape)}")
  j = _cdiv(k, BLOCK_K)
  _check_shape("a_scale", a_scale_MJ, (m, j), "[M, ceil(K/128)]")
  if b_block == BLOCK_K:
    _check_shape("b_scale", b_scale, (_cdiv(n, BLOCK_K), j), "[ceil(N/128), ceil(K/128)] for b_block=128")
  elif b_block == 1:
    _check_shape("b_scale", b_scale, (n, j), "[N, ceil(K/128)] for b_block=1")
  else:
    raise ValueError(f"b_block: expected 128 (128x128 weight blocks) or 1 (1x128 row tiles), got {b_block}")
  _check_out_dtype(out_dtype)


def gemm(a_MK: jax.Array, a_scale_MJ: jax.Array, b_NK: jax.Array, b_scale: jax.Array, *, b_block: int = BLOCK_K,
         out_dtype=jnp.bfloat16, config: TuningConfig | None = None, interpret: bool = False) -> jax.Array:
  """D = block-scaled a @ b^T (see the module docstring); [M, N] in out_dtype, fp32 accumulation."""
  check_gemm_inputs(a_MK, a_scale_MJ, b_NK, b_scale, b_block, out_dtype)
  (m, k), n = a_MK.shape, b_NK.shape[0]
  config = config or default_config(m)
  bm, bn, j = config.block_m, config.block_n, _cdiv(k, BLOCK_K)
  if b_block == 1:
    bs_spec = pl.BlockSpec((bn, j), lambda i, jj: (jj, 0))
  else:
    bs_spec = pl.BlockSpec((None, j), lambda i, jj: (jj * bn // BLOCK_K, 0))
  _prepare_lowering(interpret)
  return pl.pallas_call(
      functools.partial(_dense_kernel, m=m, n=n, k=k, b_block=b_block),
      out_shape=_out_struct((m, n), out_dtype, a_MK, a_scale_MJ, b_NK, b_scale),
      grid=(_cdiv(m, bm), _cdiv(n, bn)),
      in_specs=[pl.BlockSpec((bm, k), lambda i, jj: (i, 0)),
                pl.BlockSpec((bm, j), lambda i, jj: (i, 0)),
                pl.BlockSpec((bn, k), lambda i, jj: (jj, 0)),
                bs_spec],
      out_specs=pl.BlockSpec((bm, bn), lambda i, jj: (i, jj)),
      compiler_params=_compiler_params(config),
      interpret=interpret,
      name="fp8_gemm",
  )(a_MK, a_scale_MJ, b_NK, b_scale)


# Grouped forward / Dgrad GEMM over expert-contiguous row tiles.


def _grouped_kernel(expert_ref, a_ref, as_ref, b_ref, bs_ref, o_ref, *, rows: int, n: int, k: int):
  bm, bn = o_ref.shape
  expert = expert_ref[pl.program_id(0)]  # -1 marks a padding tile
  e = jnp.maximum(expert, 0)
  a_rows = _edge(pl.program_id(1) * bm, bm, rows)
  b_rows = _edge(pl.program_id(2) * bn, bn, n)
  n_steps = (expert >= 0).astype(jnp.int32) * _cdiv(k, BLOCK_K)
  acc = _scaled_k_loop(lambda kk: a_ref.at[:, kk], as_ref, lambda kk: b_ref.at[e, :, kk],
                       lambda k_step: bs_ref[e, k_step], n_steps, (bm, bn), a_rows, b_rows, k)
  plgpu.store(o_ref, acc.astype(o_ref.dtype), mask=_outer(a_rows, b_rows, (bm, bn)))


def check_grouped_inputs(a_GMK, a_scale_GMJ, b_ENK, b_scale_EIJ, tile_expert_G, out_dtype) -> None:
  _check_fp8("a", a_GMK)
  _check_fp8("b", b_ENK)
  _check_rank("a", a_GMK, 3, "GMK")
  _check_rank("b", b_ENK, 3, "ENK")
  (g, m, k), (e, n, k_b) = a_GMK.shape, b_ENK.shape
  if k_b != k:
    raise ValueError(f"b: expected shape ({e}, {n}, {k}) ([E, N, K], K as in a), got {tuple(b_ENK.shape)}")
  j = _cdiv(k, BLOCK_K)
  _check_shape("a_scale", a_scale_GMJ, (g, m, j), "[G, M, ceil(K/128)]")
  _check_shape("b_scale", b_scale_EIJ, (e, _cdiv(n, BLOCK_K), j), "[E, ceil(N/128), ceil(K/128)]")
  if tuple(tile_expert_G.shape) != (g,) or not jnp.issubdtype(tile_expert_G.dtype, jnp.integer):
    raise ValueError(f"tile_expert_G: expected an integer array of shape ({g},) (one expert per tile of a), got "
                     f"{tile_expert_G.dtype}{list(tile_expert_G.shape)}")
  _check_out_dtype(out_dtype)


def _tile_config(config: TuningConfig, rows: int) -> TuningConfig:
  """Row blocks no taller than a tile, but at least 64: below that Triton drops fp8 wgmma for f16 mma.sync, and a
  masked half-empty wgmma is still the faster of the two. One warpgroup for a 64-row block."""
  block_m = min(config.block_m, max(64, pl.next_power_of_2(rows)))
  return dataclasses.replace(config, block_m=block_m, num_warps=4 if block_m <= 64 else config.num_warps)


def grouped_gemm(a_GMK: jax.Array, a_scale_GMJ: jax.Array, b_ENK: jax.Array, b_scale_EIJ: jax.Array,
                 tile_expert_G: jax.Array, n_tiles: jax.Array, *, out_dtype=jnp.bfloat16,
                 config: TuningConfig | None = None, interpret: bool = False) -> jax.Array:
  """y[g] = block-scaled a[g] @ b[tile_expert[g]]^T for g < n_tiles; padding tiles are zeros, never computed."""
  check_grouped_inputs(a_GMK, a_scale_GMJ, b_ENK, b_scale_EIJ, tile_expert_G, out_dtype)
  (g, rows, k), (e, n, _) = a_GMK.shape, b_ENK.shape
  config = _tile_config(config or TuningConfig(), rows)
  bm, bn, j = config.block_m, config.block_n, _cdiv(k, BLOCK_K)
  expert_G = jnp.where(jnp.arange(g) < n_tiles, tile_expert_G, -1).astype(jnp.int32)
  _prepare_lowering(interpret)
  return pl.pallas_call(
      functools.partial(_grouped_kernel, rows=rows, n=n, k=k),
      out_shape=_out_struct((g, rows, n), out_dtype, a_GMK, a_scale_GMJ, b_ENK, b_scale_EIJ, expert_G),
      grid=(g, _cdiv(rows, bm), _cdiv(n, bn)),
      in_specs=[pl.BlockSpec((g,), lambda t, r, c: (0,)),
                pl.BlockSpec((None, bm, k), lambda t, r, c: (t, r, 0)),
                pl.BlockSpec((None, bm, j), lambda t, r, c: (t, r, 0)),
                pl.BlockSpec((e, bn, k), lambda t, r, c: (0, c, 0)),
                pl.BlockSpec((e, None, j), lambda t, r, c: (0, c * bn // BLOCK_K, 0))],
      out_specs=pl.BlockSpec((None, bm, bn), lambda t, r, c: (t, r, c)),
      compiler_params=_compiler_params(config),
      interpret=interpret,
      name="fp8_grouped_gemm",
  )(expert_G, a_GMK, a_scale_GMJ, b_ENK, b_scale_EIJ)


# Grouped Wgrad (k-grouped over the token axis), output-stationary.


def _wgrad_kernel(first_ref, end_ref, a_ref, as_ref, b_ref, bs_ref, o_ref, *, rows: int, k: int, n: int):
  bk, bn = o_ref.shape
  expert = pl.program_id(0)
  a_rows = _edge(pl.program_id(1) * bk, bk, k)
  b_rows = _edge(pl.program_id(2) * bn, bn, n)
  step = _token_step(rows)
  steps_per_tile = _cdiv(rows, step)
  first = first_ref[expert]

  def token_block(t, acc):
    """One [step]-token block of one tile: the loop runs over (tile, block) pairs, so one block's loads are in
    flight per pipeline stage whatever the tile rows."""
    g, s = first + t // steps_per_tile, t % steps_per_tile
    start = pl.multiple_of(s * step, step)
    t_mask = _edge(start, step, rows)
    a = _load(a_ref.at[g, :, pl.ds(start, step)], _outer(a_rows, t_mask, (bk, step)))
    b = _load(b_ref.at[g, :, pl.ds(start, step)], _outer(b_rows, t_mask, (bn, step)))
    part = _dot_nt(a, b)
    group = start // BLOCK_K  # the 128-token scale group of this block
    sa = _load(as_ref.at[g, :, group], a_rows)
    sb = _load(bs_ref.at[g, :, group], b_rows)
    return acc + part * (sa[:, None] * sb[None, :])

  n_blocks = (end_ref[expert] - first) * steps_per_tile
  acc = jax.lax.fori_loop(jnp.int32(0), n_blocks, token_block, jnp.zeros((bk, bn), jnp.float32))
  plgpu.store(o_ref, acc.astype(o_ref.dtype), mask=_outer(a_rows, b_rows, (bk, bn)))


def _token_step(rows: int) -> int:
  """Tokens per Wgrad dot: one 128-token scale group at most, at least 32 (fp8 wgmma's K; with less Triton falls
  back to f16 mma.sync, so short tiles are padded by masking instead)."""
  return min(BLOCK_K, max(32, pl.next_power_of_2(rows)))


def check_wgrad_inputs(a_GKM, a_scale_GKI, b_GNM, b_scale_GNI, tile_expert_G, n_experts: int, out_dtype) -> None:
  _check_fp8("a", a_GKM)
  _check_fp8("b", b_GNM)
  _check_rank("a", a_GKM, 3, "GKM")
  _check_rank("b", b_GNM, 3, "GNM")
  (g, k, m), (g_b, n, m_b) = a_GKM.shape, b_GNM.shape
  if (g_b, m_b) != (g, m):
    raise ValueError(f"b: expected shape ({g}, N, {m}) ([G, N, M], tiles and tokens as in a), got "
                     f"{tuple(b_GNM.shape)}")
  i = _cdiv(m, BLOCK_K)
  _check_shape("a_scale", a_scale_GKI, (g, k, i), "[G, K, ceil(M/128)]")
  _check_shape("b_scale", b_scale_GNI, (g, n, i), "[G, N, ceil(M/128)]")
  if tuple(tile_expert_G.shape) != (g,) or not jnp.issubdtype(tile_expert_G.dtype, jnp.integer):
    raise ValueError(f"tile_expert_G: expected an integer array of shape ({g},) (one expert per tile of a), got "
                     f"{tile_expert_G.dtype}{list(tile_expert_G.shape)}")
  if n_experts < 1:
    raise ValueError(f"n_experts: expected a positive count, got {n_experts}")
  _check_out_dtype(out_dtype)


def expert_tile_ranges(tile_expert_G: jax.Array, n_tiles: jax.Array, n_experts: int) -> tuple[jax.Array, jax.Array]:
  """[first, end) live tile of each expert; tiles of one expert are contiguous (as moe.TileLayout lays them)."""
  live_G = jnp.arange(tile_expert_G.shape[0]) < n_tiles
  count_E = jnp.zeros(n_experts, jnp.int32).at[tile_expert_G].add(live_G.astype(jnp.int32), mode="drop")
  end_E = jnp.cumsum(count_E).astype(jnp.int32)
  return end_E - count_E, end_E


def grouped_gemm_wgrad(a_GKM: jax.Array, a_scale_GKI: jax.Array, b_GNM: jax.Array, b_scale_GNI: jax.Array,
                       tile_expert_G: jax.Array, n_tiles: jax.Array, n_experts: int, *, out_dtype=jnp.float32,
                       config: TuningConfig | None = None, interpret: bool = False) -> jax.Array:
  """out[e] = sum over expert e's live tiles g of block-scaled a[g] @ b[g]^T (token axis M contracted): [E, K, N]."""
  check_wgrad_inputs(a_GKM, a_scale_GKI, b_GNM, b_scale_GNI, tile_expert_G, n_experts, out_dtype)
  (g, k, rows), n = a_GKM.shape, b_GNM.shape[1]
  config = config or TuningConfig()
  bk, bn, i = config.block_m, config.block_n, _cdiv(rows, BLOCK_K)
  first_E, end_E = expert_tile_ranges(tile_expert_G, n_tiles, n_experts)
  padded_rows = _cdiv(rows, _token_step(rows)) * _token_step(rows)  # whole token steps; the excess is masked
  _prepare_lowering(interpret)
  return pl.pallas_call(
      functools.partial(_wgrad_kernel, rows=rows, k=k, n=n),
      out_shape=_out_struct((n_experts, k, n), out_dtype, a_GKM, a_scale_GKI, b_GNM, b_scale_GNI, first_E),
      grid=(n_experts, _cdiv(k, bk), _cdiv(n, bn)),
      in_specs=[pl.BlockSpec((n_experts,), lambda e, r, c: (0,)),
                pl.BlockSpec((n_experts,), lambda e, r, c: (0,)),
                pl.BlockSpec((g, bk, padded_rows), lambda e, r, c: (0, r, 0)),
                pl.BlockSpec((g, bk, i), lambda e, r, c: (0, r, 0)),
                pl.BlockSpec((g, bn, padded_rows), lambda e, r, c: (0, c, 0)),
                pl.BlockSpec((g, bn, i), lambda e, r, c: (0, c, 0))],
      out_specs=pl.BlockSpec((None, bk, bn), lambda e, r, c: (e, r, c)),
      compiler_params=_compiler_params(config),
      interpret=interpret,
      name="fp8_grouped_gemm_wgrad",
  )(first_E, end_E, a_GKM, a_scale_GKI, b_GNM, b_scale_GNI)


# Plain-JAX references: the same per-block products, promoted in the same order.


def _blocks(x, axis_len: int):
  """[..., L] fp8 -> fp32 [..., ceil(L/128), 128], zero-padded (a partial last block holds the remaining columns)."""
  pad = _cdiv(axis_len, BLOCK_K) * BLOCK_K - axis_len
  x = jnp.pad(x.astype(jnp.float32), [(0, 0)] * (x.ndim - 1) + [(0, pad)])
  return x.reshape(*x.shape[:-1], -1, BLOCK_K)


def reference(a_MK, a_scale_MJ, b_NK, b_scale, *, b_block: int = BLOCK_K, out_dtype=jnp.bfloat16) -> jax.Array:
  """The dense GEMM in plain JAX: exact fp32 block products, scaled and added block after block (a scan over K
  blocks, so memory stays at one [M, N] accumulator at any size)."""
  check_gemm_inputs(a_MK, a_scale_MJ, b_NK, b_scale, b_block, out_dtype)
  k, n = a_MK.shape[1], b_NK.shape[0]
  sb_NJ = b_scale if b_block == 1 else jnp.repeat(b_scale, BLOCK_K, axis=0)[:n]

  def promote(acc_MN, xs):
    a_MB, b_NB, sa_M, sb_N = xs
    part_MN = jnp.dot(a_MB, b_NB.T, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return acc_MN + part_MN * (sa_M[:, None] * sb_N[None, :]), None

  xs = (jnp.swapaxes(_blocks(a_MK, k), 0, 1), jnp.swapaxes(_blocks(b_NK, k), 0, 1), a_scale_MJ.T, sb_NJ.T)
  acc_MN, _ = jax.lax.scan(promote, jnp.zeros((a_MK.shape[0], n), jnp.float32), xs)
  return acc_MN.astype(out_dtype)


def grouped_reference(a_GMK, a_scale_GMJ, b_ENK, b_scale_EIJ, tile_expert_G, n_tiles, *,
                      out_dtype=jnp.bfloat16) -> jax.Array:
  """grouped_gemm in plain JAX: reference() per tile with its expert's weight; padding tiles zero."""
  check_grouped_inputs(a_GMK, a_scale_GMJ, b_ENK, b_scale_EIJ, tile_expert_G, out_dtype)
  y_GMN = jax.vmap(lambda a, sa, e: reference(a, sa, b_ENK[e], b_scale_EIJ[e], out_dtype=jnp.float32))(
      a_GMK, a_scale_GMJ, tile_expert_G)
  live_G = jnp.arange(a_GMK.shape[0]) < n_tiles
  return jnp.where(live_G[:, None, None], y_GMN, 0).astype(out_dtype)


def wgrad_reference(a_GKM, a_scale_GKI, b_GNM, b_scale_GNI, tile_expert_G, n_tiles, n_experts: int, *,
                    out_dtype=jnp.float32) -> jax.Array:
  """grouped_gemm_wgrad in plain JAX: per-tile products (1x128 scales on both sides), summed per expert in order."""
  check_wgrad_inputs(a_GKM, a_scale_GKI, b_GNM, b_scale_GNI, tile_expert_G, n_experts, out_dtype)
  y_GKN = jax.vmap(lambda a, sa, b, sb: reference(a, sa, b, sb, b_block=1, out_dtype=jnp.float32))(
      a_GKM, a_scale_GKI, b_GNM, b_scale_GNI)
  live_G = jnp.arange(a_GKM.shape[0]) < n_tiles
  expert_G = jnp.where(live_G, tile_expert_G, n_experts)  # padding tiles go to a dropped slot
  out_EKN, _ = jax.lax.scan(lambda acc, x: (acc.at[x[1]].add(x[0], mode="drop"), None),
                            jnp.zeros((n_experts, *y_GKN.shape[1:]), jnp.float32), (y_GKN, expert_G))
  return out_EKN.astype(out_dtype)


# The sweep.


def random_operands(key, m: int, n: int, k: int, *, b_block: int = BLOCK_K):
  """Quantized DeepGEMM-style test operands (randn inputs) and the unquantized fp32 product."""
  ka, kb = jax.random.split(key)
  x_MK = jax.random.normal(ka, (m, k), jnp.float32)
  w_NK = jax.random.normal(kb, (n, k), jnp.float32)
  a, sa = fp8.quantize_rows(x_MK)
  b, sb = fp8.quantize_rows(w_NK) if b_block == 1 else fp8.quantize_blocks(w_NK)
  return (a, sa, b, sb), jnp.dot(x_MK, w_NK.T, precision=jax.lax.Precision.HIGHEST)


def calc_diff(x, y) -> float:
  """DeepGEMM's similarity error: 1 - 2 sum(xy) / sum(x^2 + y^2), in float64."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  denominator = (x * x + y * y).sum()
  return 0.0 if denominator == 0 else float(1 - 2 * (x * y).sum() / denominator)


def relative_error(x, y) -> float:
  """max |x - y| / max |y| (y the reference)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-30))


def time_call(fn, *args, repeats: int = 20) -> float:
  """Seconds per call: median over 3 rounds of `repeats` back-to-back calls (dispatch is asynchronous, so launch
  overhead overlaps the previous call), after two warm-up calls."""
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  rounds = []
  for _ in range(3):
    start = time.perf_counter()
    out = None
    for _ in range(repeats):
      out = fn(*args)
    jax.block_until_ready(out)
    rounds.append((time.perf_counter() - start) / repeats)
  return float(np.median(rounds))


SWEEP_SHAPES = ((64, 2112, 7168), (64, 7168, 16384), (128, 7168, 16384), (128, 4096, 7168), (4096, 2112, 7168),
                (4096, 24576, 1536), (4096, 32768, 512), (4096, 7168, 16384), (4096, 4096, 7168),
                (4096, 7168, 2048))  # DeepGEMM's published dense shapes (M, N, K)


def main() -> None:
  if jax.default_backend() != "gpu":
    print(f"fp8_gemm: no GPU (JAX backend {jax.default_backend()!r}); the sweep times kernels on a GPU only. "
          "tests/test_pallas_fp8.py checks the kernels in interpret mode.")
    return
  print(f"{jax.devices()[0].device_kind}; columns: M N K, rel err vs dequantized ref, calc_diff vs fp32, "
        "TFLOP/s, share of FP8 peak")
  for m, n, k in SWEEP_SHAPES:
    (a, sa, b, sb), exact = random_operands(jax.random.key(0), m, n, k)
    fn = jax.jit(functools.partial(gemm, config=default_config(m)))
    out = fn(a, sa, b, sb)
    ref = jax.jit(reference)(a, sa, b, sb)
    tflops = 2 * m * n * k / time_call(fn, a, sa, b, sb) / 1e12
    print(f"{m:5d} {n:6d} {k:6d}  {relative_error(out, ref):.1e}  {calc_diff(out, exact):.1e}  {tflops:7.0f}  "
          f"{tflops / H100_FP8_PEAK_TFLOPS:.0%}")


if __name__ == "__main__":
  main()
