"""FP8 block-scaled numerics (paper §3.3): the quantizers, the block-scaled GEMM, the FP8 Linears.

Quantization (paper §3.3.2; DeepSeek's `act_quant` and its 128x128 weight scheme; numerics §7):
1. Split the tensor into tiles: 1x128 along the last axis (`quantize_rows`: activations, and, applied to a
   transposed operand, the 128x1 token tiles of Wgrad) or 128x128 blocks (`quantize_blocks`: weights). A
   partial edge tile is a tile of the elements that exist (zero padding does not change its amax).
2. amax = max |x| over the tile in fp32, clamped below at 1e-4 (an all-zero tile gets a finite scale).
3. scale = amax / 448; with `ue8m0` the least power of two >= that (DeepSeek-V3.1's scale format; exact,
   from the fp32 bits, which equals 2^ceil(log2 s) evaluated exactly).
4. q = e4m3(clip(x / scale, -448, 448)): JAX's cast gives NaN above 464 where torch saturates, so clip
   first. A NaN or inf in a tile makes its scale or its values NaN/inf, so they propagate (never a
   finite result from a non-finite input).

The GEMM (`scaled_matmul`, DeepGEMM's 1D2D semantics, systems §3): per 128-wide K block, the exact fp32 sum
of e4m3 products, multiplied by the row's and the weight block's scales and added to an fp32 accumulator
in block order (the paper's promotion every N_C = 128 elements). This file is its plain-XLA definition;
`ops.fp8_gemm` dispatches to it (impl "xla") or to a Pallas kernel, and the Linears below call `ops` only.

FP8 Linear (`linear`, `grouped_linear`; paper §3.3.1, Fig. 6), y = x @ W with W [in, out] as our
kernels are stored, all three GEMMs in FP8 with fp32 accumulation, through `jax.custom_vjp`:
1. Fprop  y  = x @ W:    x in 1x128 tiles along `in`, W^T [out, in] in 128x128 blocks.
2. Dgrad  dx = dy @ W^T: dy in 1x128 tiles along `out`, W [in, out] in 128x128 blocks: the forward's
   quantized W^T transposed, scales transposed too (block quantization commutes with transposition).
3. Wgrad  dW = x^T @ dy: x and dy both in 128x1 tiles along the token axis (per channel, per 128
   tokens), each quantized from the high-precision tensor; output fp32.
The forward saves x already quantized for Wgrad (paper §3.3.3: Linear inputs cached in FP8) and the
quantized weight, not the high-precision tensors. Fprop and Dgrad return the activation dtype (cfg.dtype:
bf16 on GPU, fp32 in the CPU presets); the accumulation is fp32 either way. The grouped form does the same
over the expert-contiguous row tiles of dsv3_jax/moe.py, each tile's M rows one 128x1 token group for Wgrad.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dsv3_jax import ops  # ops imports this module back (its "xla" impl); both only call at run time

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
BLOCK = 128
AMAX_FLOOR = 1e-4


def n_blocks(size: int) -> int:
  """128-blocks that cover `size` elements (the last one partial when 128 does not divide it)."""
  return -(-size // BLOCK)


# ---------------------------------------------------------------------------------------------------
# Quantizers.


def scale_from_amax(amax: jax.Array, *, ue8m0: bool = False) -> jax.Array:
  """max(amax, 1e-4) / 448 in fp32, rounded up to a power of two with ue8m0 (steps 2-3 above)."""
  amax = jnp.maximum(amax.astype(jnp.float32), AMAX_FLOOR)
  scale = _divide(amax, jnp.float32(E4M3_MAX))
  return _power_of_two_ceil(scale) if ue8m0 else scale


def _power_of_two_ceil(s: jax.Array) -> jax.Array:
  """The least power of two >= s for positive normal s: its exponent, plus one if any mantissa bit is set.

  Non-finite s passes through (inf stays inf, NaN stays NaN). s >= 1e-4 / 448 is never subnormal.
  """
  bits = jax.lax.bitcast_convert_type(s, jnp.uint32)
  exponent = (bits >> 23) + ((bits & 0x7FFFFF) != 0).astype(jnp.uint32)
  return jnp.where(jnp.isfinite(s), jax.lax.bitcast_convert_type(exponent << 23, jnp.float32), s)


def _divide(x: jax.Array, d: jax.Array) -> jax.Array:
  """x / d correctly rounded, d broadcast to x's shape.

  XLA rewrites a division by a broadcast into a multiplication by the broadcast reciprocal, which is off
  by an ulp about half the time; the barrier keeps the divisor a full array, so the IEEE division stays.
  """
  return x / jax.lax.optimization_barrier(jnp.broadcast_to(d, x.shape))


def _amax(x32: jax.Array, axis) -> jax.Array:
  """max |x| over `axis`, NaN when any element is NaN (XLA's CPU max reduction over two axes can drop a NaN)."""
  return jnp.where(jnp.isnan(x32).any(axis=axis), jnp.nan, jnp.max(jnp.abs(x32), axis=axis))


def _to_e4m3(x32: jax.Array) -> jax.Array:
  return jnp.clip(x32, -E4M3_MAX, E4M3_MAX).astype(E4M3)


def _check_quantizable(x: jax.Array, min_ndim: int, what: str) -> None:
  if x.ndim < min_ndim or 0 in x.shape[-min_ndim:]:
    raise ValueError(f"{what}: needs at least {min_ndim} non-empty trailing axes, got shape {tuple(x.shape)}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{what}: needs a floating-point input, got {x.dtype}")


def quantize_rows(x: jax.Array, *, ue8m0: bool = False) -> tuple[jax.Array, jax.Array]:
  """(x_q e4m3 [..., K], scale fp32 [..., ceil(K/128)]): 1x128 tiles along the last axis (`act_quant`)."""
  _check_quantizable(x, 1, "quantize_rows")
  k = x.shape[-1]
  j = n_blocks(k)
  x32 = jnp.pad(x.astype(jnp.float32), [(0, 0)] * (x.ndim - 1) + [(0, j * BLOCK - k)])
  tiles = x32.reshape(*x.shape[:-1], j, BLOCK)
  scale = scale_from_amax(_amax(tiles, -1), ue8m0=ue8m0)
  x_q = _to_e4m3(_divide(tiles, scale[..., None])).reshape(*x.shape[:-1], j * BLOCK)
  return x_q[..., :k], scale


def quantize_blocks(w: jax.Array, *, ue8m0: bool = False) -> tuple[jax.Array, jax.Array]:
  """(w_q e4m3 [..., N, K], scale fp32 [..., ceil(N/128), ceil(K/128)]): 128x128 blocks of the last two axes."""
  _check_quantizable(w, 2, "quantize_blocks")
  *lead, n, k = w.shape
  i, j = n_blocks(n), n_blocks(k)
  w32 = jnp.pad(w.astype(jnp.float32), [(0, 0)] * len(lead) + [(0, i * BLOCK - n), (0, j * BLOCK - k)])
  blocks = w32.reshape(*lead, i, BLOCK, j, BLOCK)
  scale = scale_from_amax(_amax(blocks, (-3, -1)), ue8m0=ue8m0)
  w_q = _to_e4m3(_divide(blocks, scale[..., :, None, :, None])).reshape(*lead, i * BLOCK, j * BLOCK)
  return w_q[..., :n, :k], scale


def _expand(scale: jax.Array, axis: int, size: int) -> jax.Array:
  return jax.lax.slice_in_dim(jnp.repeat(scale, BLOCK, axis=axis), 0, size, axis=axis)


def dequantize_rows(x_q: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
  """fp32(x_q) * scale per 1x128 tile, cast to dtype (the inverse of `quantize_rows` up to rounding)."""
  return (x_q.astype(jnp.float32) * _expand(scale, -1, x_q.shape[-1])).astype(dtype)


def dequantize_blocks(w_q: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
  """fp32(w_q) * scale per 128x128 block, cast to dtype (DeepSeek's `weight_dequant`)."""
  expanded = _expand(_expand(scale, -2, w_q.shape[-2]), -1, w_q.shape[-1])
  return (w_q.astype(jnp.float32) * expanded).astype(dtype)


# ---------------------------------------------------------------------------------------------------
# The block-scaled GEMM, plain XLA.


def _check_gemm(a_MK, a_scale_MJ, b_NK, b_scale, b_block: int) -> None:
  for name, x in (("a", a_MK), ("b", b_NK)):
    if x.dtype != E4M3:
      raise TypeError(f"scaled_matmul: operand {name} must be float8_e4m3fn, got {x.dtype}")
    if x.ndim != 2:
      raise ValueError(f"scaled_matmul: operand {name} must be 2-D (K-major), got shape {tuple(x.shape)}")
  if a_MK.shape[1] != b_NK.shape[1]:
    raise ValueError(f"scaled_matmul: contraction dimension K differs: a {tuple(a_MK.shape)}, b {tuple(b_NK.shape)}")
  if b_block not in (1, BLOCK):
    raise ValueError(f"scaled_matmul: b_block must be 1 or {BLOCK}, got {b_block}")
  (m, k), n = a_MK.shape, b_NK.shape[0]
  j = n_blocks(k)
  b_rows = n if b_block == 1 else n_blocks(n)
  for name, scale, want in (("a_scale", a_scale_MJ, (m, j)), ("b_scale", b_scale, (b_rows, j))):
    if tuple(scale.shape) != want:
      raise ValueError(f"scaled_matmul: {name} has shape {tuple(scale.shape)}, expected {want} "
                       f"for a {tuple(a_MK.shape)}, b {tuple(b_NK.shape)}, b_block {b_block}")


def _k_blocks(x_XK: jax.Array) -> jax.Array:
  """[J, X, 128] fp32 (exact from e4m3), the last K block zero-padded."""
  rows, k = x_XK.shape
  j = n_blocks(k)
  x32 = jnp.pad(x_XK.astype(jnp.float32), ((0, 0), (0, j * BLOCK - k)))
  return x32.reshape(rows, j, BLOCK).transpose(1, 0, 2)


def scaled_matmul(a_MK: jax.Array, a_scale_MJ: jax.Array, b_NK: jax.Array, b_scale: jax.Array, *,
                  b_block: int = BLOCK, out_dtype=jnp.bfloat16) -> jax.Array:
  """D[m, n] = sum_j a_scale[m, j] * b_scale[n // b_block, j] * (sum_{k in block j} a[m, k] * b[n, k]).

  a_MK, b_NK: float8_e4m3fn, both K-major (B given as [N, K], DeepSeek's layout); J = ceil(K / 128), a
  partial last K block holds the remaining columns. b_block 128: b_scale [ceil(N/128), J] (128x128 weight
  blocks); b_block 1: b_scale [N, J] (per-row scales, the Wgrad operands). M and N need no alignment.
  Each block's partial sum is an fp32 dot of exact fp32 products (HIGHEST precision: no TF32 on GPU),
  scaled (partial * a_scale * b_scale, as DeepSeek's `fp8_gemm_kernel`) and added in block order.
  """
  _check_gemm(a_MK, a_scale_MJ, b_NK, b_scale, b_block)
  n = b_NK.shape[0]
  b_scale_NJ = b_scale if b_block == 1 else _expand(b_scale, 0, n)

  def promote(acc_MN, xs):
    a_MB, b_NB, a_scale_M, b_scale_N = xs
    partial_MN = jnp.dot(a_MB, b_NB.T, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return acc_MN + partial_MN * a_scale_M[:, None] * b_scale_N[None, :], None

  j = a_scale_MJ.shape[1]
  xs = (_k_blocks(a_MK), _k_blocks(b_NK), a_scale_MJ.astype(jnp.float32).T, b_scale_NJ.astype(jnp.float32).T)
  acc_MN = ops.varying_as(jnp.zeros((a_MK.shape[0], n), jnp.float32), a_MK, a_scale_MJ, b_NK, b_scale)
  acc_MN, _ = jax.lax.scan(promote, acc_MN, xs, unroll=j if j <= 8 else 1)
  return acc_MN.astype(out_dtype)


def grouped_scaled_matmul(a_GMK: jax.Array, a_scale_GMJ: jax.Array, b_ENK: jax.Array, b_scale_EIJ: jax.Array,
                          tile_expert_G: jax.Array, n_tiles: jax.Array, *, out_dtype=jnp.bfloat16) -> jax.Array:
  """y[g] = scaled_matmul(a[g], a_scale[g], b[e], b_scale[e]) with e = tile_expert[g], for g < n_tiles.

  The MoE forward/Dgrad GEMM over moe.TileLayout's expert-contiguous row tiles; tiles g >= n_tiles
  (padding) are zeros and never computed. b_scale_EIJ is [E, ceil(N/128), J].
  """
  n = b_ENK.shape[1]

  def tile(_, xs):
    a_MK, a_scale_MJ, expert, g = xs

    def live():
      return scaled_matmul(a_MK, a_scale_MJ, b_ENK[expert], b_scale_EIJ[expert], out_dtype=out_dtype)

    dead = lambda: ops.varying_as(jnp.zeros((a_MK.shape[0], n), out_dtype), a_MK, a_scale_MJ, b_ENK, b_scale_EIJ)
    return None, jax.lax.cond(g < n_tiles, live, dead)

  _, y_GMN = jax.lax.scan(tile, None, (a_GMK, a_scale_GMJ, tile_expert_G, jnp.arange(a_GMK.shape[0])))
  return y_GMN


def grouped_scaled_matmul_wgrad(a_GKM: jax.Array, a_scale_GKI: jax.Array, b_GNM: jax.Array, b_scale_GNI: jax.Array,
                                tile_expert_G: jax.Array, n_tiles: jax.Array, n_experts: int, *,
                                out_dtype=jnp.float32) -> jax.Array:
  """out[e] = sum over live tiles g of expert e of a[g] @ b[g]^T, scales per row over the token axis M.

  The MoE Wgrad (k-grouped): a[g] [K, M] and b[g] [N, M] with per-row scales [., ceil(M/128)] (each
  tile's rows one token group when M <= 128); returns [E, K, N] accumulated in fp32, then out_dtype.
  """
  k, n = a_GKM.shape[1], b_GNM.shape[1]

  def tile(out_EKN, xs):
    a_KM, a_scale_KI, b_NM, b_scale_NI, expert, g = xs

    def live(out_EKN):
      d_KN = scaled_matmul(a_KM, a_scale_KI, b_NM, b_scale_NI, b_block=1, out_dtype=jnp.float32)
      return out_EKN.at[expert].add(d_KN)

    return jax.lax.cond(g < n_tiles, live, lambda out: out, out_EKN), None

  out0_EKN = ops.varying_as(jnp.zeros((n_experts, k, n), jnp.float32), a_GKM, a_scale_GKI, b_GNM, b_scale_GNI)
  xs = (a_GKM, a_scale_GKI, b_GNM, b_scale_GNI, tile_expert_G, jnp.arange(a_GKM.shape[0]))
  out_EKN, _ = jax.lax.scan(tile, out0_EKN, xs)
  return out_EKN.astype(out_dtype)


# ---------------------------------------------------------------------------------------------------
# FP8 Linears with a custom VJP.


def _empty_like(x: jax.Array) -> jax.Array:
  """A zero-size slice of a primal: a free residual carrying its dtype and, in shard_map, its varying axes."""
  return x.reshape(-1)[:0]


def linear(x: jax.Array, kernel_IO: jax.Array, *, impl: str = "xla") -> jax.Array:
  """x [..., I] @ kernel [I, O] with Fprop, Dgrad and Wgrad in FP8 (steps 1-3 above); returns x.dtype."""
  if kernel_IO.ndim != 2 or x.shape[-1] != kernel_IO.shape[0]:
    raise ValueError(f"fp8.linear: input {tuple(x.shape)} does not match kernel {tuple(kernel_IO.shape)} [in, out]")
  y_TO = _linear(x.reshape(-1, x.shape[-1]), kernel_IO, impl)
  return y_TO.reshape(*x.shape[:-1], kernel_IO.shape[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _linear(x_TI, w_IO, impl):
  return _linear_fwd(x_TI, w_IO, impl)[0]


def _linear_fwd(x_TI, w_IO, impl):
  x_q, x_scale = quantize_rows(x_TI)
  w_q_OI, w_scale = quantize_blocks(w_IO.T)
  y_TO = ops.fp8_gemm(x_q, x_scale, w_q_OI, w_scale, out_dtype=x_TI.dtype, impl=impl)
  xt_q_IT, xt_scale = quantize_rows(x_TI.T)  # 128x1 token tiles of x, kept for Wgrad
  return y_TO, (xt_q_IT, xt_scale, w_q_OI, w_scale, _empty_like(x_TI), _empty_like(w_IO))


def _linear_bwd(impl, res, dy_TO):
  xt_q_IT, xt_scale, w_q_OI, w_scale, x_like, w_like = res
  dy_q, dy_scale = quantize_rows(dy_TO)
  dx_TI = ops.fp8_gemm(dy_q, dy_scale, w_q_OI.T, w_scale.T, out_dtype=x_like.dtype, impl=impl)
  dyt_q_OT, dyt_scale = quantize_rows(dy_TO.T)
  dw_IO = ops.fp8_gemm(xt_q_IT, xt_scale, dyt_q_OT, dyt_scale, b_block=1, out_dtype=jnp.float32, impl=impl)
  return dx_TI, dw_IO.astype(w_like.dtype)


_linear.defvjp(_linear_fwd, _linear_bwd)


def grouped_linear(x_GMD: jax.Array, w_EDF: jax.Array, tile_expert_G: jax.Array, n_tiles: jax.Array,
                   impl: str = "xla") -> jax.Array:
  """y[g] = x[g] @ w[tile_expert[g]] for g < n_tiles (zeros after), all three GEMMs in FP8; returns x's dtype.

  The FP8 form of `ops.grouped_matmul` (same tile layout); it also runs inside expert parallelism's
  shard_map, where the gradients are summed over the axes their primal is replicated on.
  """
  return _grouped_linear(x_GMD, w_EDF, tile_expert_G, n_tiles, impl)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _grouped_linear(x_GMD, w_EDF, tile_expert_G, n_tiles, impl):
  return _grouped_linear_fwd(x_GMD, w_EDF, tile_expert_G, n_tiles, impl)[0]


def _grouped_linear_fwd(x_GMD, w_EDF, tile_expert_G, n_tiles, impl):
  x_q, x_scale = quantize_rows(x_GMD)
  w_q_EFD, w_scale = quantize_blocks(jnp.swapaxes(w_EDF, 1, 2))
  y_GMF = ops.grouped_fp8_gemm(x_q, x_scale, w_q_EFD, w_scale, tile_expert_G, n_tiles, out_dtype=x_GMD.dtype,
                               impl=impl)
  xt_q_GDM, xt_scale = quantize_rows(jnp.swapaxes(x_GMD, 1, 2))  # each tile's rows: one 128x1 token group
  return y_GMF, (xt_q_GDM, xt_scale, w_q_EFD, w_scale, tile_expert_G, n_tiles, _empty_like(x_GMD),
                 _empty_like(w_EDF))


def _grouped_linear_bwd(impl, res, dy_GMF):
  xt_q_GDM, xt_scale, w_q_EFD, w_scale, tile_expert_G, n_tiles, x_like, w_like = res
  dy_q, dy_scale = quantize_rows(dy_GMF)
  dx_GMD = ops.grouped_fp8_gemm(dy_q, dy_scale, jnp.swapaxes(w_q_EFD, 1, 2), jnp.swapaxes(w_scale, 1, 2),
                                tile_expert_G, n_tiles, out_dtype=x_like.dtype, impl=impl)
  dyt_q_GFM, dyt_scale = quantize_rows(jnp.swapaxes(dy_GMF, 1, 2))
  dw_EDF = ops.grouped_fp8_gemm_wgrad(xt_q_GDM, xt_scale, dyt_q_GFM, dyt_scale, tile_expert_G, n_tiles,
                                      w_q_EFD.shape[0], out_dtype=jnp.float32, impl=impl)
  return (ops.summed_to(dx_GMD, x_like), ops.summed_to(dw_EDF, w_like).astype(w_like.dtype), None, None)


_grouped_linear.defvjp(_grouped_linear_fwd, _grouped_linear_bwd)
