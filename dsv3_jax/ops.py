"""One entry per heavy op, each selecting its implementation by name.

Model code calls these and never imports a kernel. Today:
- `grouped_matmul`: the routed experts' GEMM over expert-contiguous row tiles.
  impl="xla"        a scan over tiles that skips empty ones: cost grows with routed rows only.
  impl="ragged_dot" `jax.lax.ragged_dot` on the same layout: a reference, since XLA lowers it to
                    about one dense matmul per group (cost grows with the number of experts).
Both also run inside `shard_map` (expert parallelism), where the zeros of skipped tiles take on the
manual axes their operands vary over, as scan and cond require, and the backward sums a gradient over
the axes its primal is replicated on (the transpose of using a replicated weight on varying tokens).
- `grouped_swiglu`: the routed experts' whole SwiGLU (three GEMMs) over the same tiles, forward and backward; what
  `moe.expert_ffn` runs for impl "auto", "xla" and "native".
  impl="xla"    one scan over the tiles, three GEMMs per live tile.
  impl="native" a CPU custom call over BLAS (`cpu_experts.py`): one GEMM per expert's rows, padding rows skipped.
  impl="auto"   "native" when lowering for the CPU in float32 where it can be built, else "xla".
- `fp8_gemm`, `grouped_fp8_gemm`, `grouped_fp8_gemm_wgrad`: the block-scaled FP8 GEMMs of `fp8.py`'s Linears
  (dense; MoE forward/Dgrad over the same tiles; MoE Wgrad).
  impl="xla"    `fp8.scaled_matmul` and its grouped forms: the definition, plain XLA, any backend.
  impl="pallas" the Triton-backend kernels of `pallas_kernels/fp8_gemm.py`, compiled when lowered for CUDA and in
                Pallas interpret mode for any other platform (slow, but the same kernel body), so "pallas" runs
                and is testable everywhere.
  impl="auto"   "pallas" on GPU, "xla" elsewhere (`fp8_impl`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from dsv3_jax import cpu_experts
from dsv3_jax import fp8  # fp8 imports ops back; each only calls the other at run time
from dsv3_jax import native
from pallas_kernels import fp8_gemm as fp8_kernels

GROUPED_MATMUL_IMPLS = ("xla", "ragged_dot")
GROUPED_SWIGLU_IMPLS = ("auto", "xla", "native")
FP8_GEMM_IMPLS = ("xla", "pallas")


def grouped_matmul(x_GMD: jax.Array, w_EDF: jax.Array, tile_expert_G: jax.Array, n_tiles: jax.Array,
                   impl: str = "xla") -> jax.Array:
  """y[g] = x[g] @ w[tile_expert[g]] for the first n_tiles tiles; later (padding) tiles give zeros.

  x_GMD holds G tiles of M rows, each tile owned by one expert; tiles of one expert are contiguous
  and tile_expert_G is non-decreasing over the first n_tiles tiles.
  """
  if impl == "xla":
    return _scan_grouped_matmul(x_GMD, w_EDF, tile_expert_G, n_tiles)
  if impl == "ragged_dot":
    return _ragged_grouped_matmul(x_GMD, w_EDF, tile_expert_G, n_tiles)
  raise ValueError(f"grouped_matmul impl {impl!r} is not one of {GROUPED_MATMUL_IMPLS}")


def _ragged_grouped_matmul(x_GMD, w_EDF, tile_expert_G, n_tiles):
  n_groups, rows, _ = x_GMD.shape
  live_G = jnp.arange(n_groups) < n_tiles
  group_sizes_E = jnp.zeros(w_EDF.shape[0], jnp.int32).at[tile_expert_G].add(live_G * rows)
  y = jax.lax.ragged_dot(x_GMD.reshape(n_groups * rows, -1), w_EDF, group_sizes_E)
  return jnp.where(live_G[:, None, None], y.reshape(n_groups, rows, -1), 0).astype(x_GMD.dtype)


def varying_as(z: jax.Array, *refs: jax.Array) -> jax.Array:
  """z typed as varying over every manual mesh axis that any of refs varies over (no-op outside shard_map)."""
  varying = lambda a: jax.typeof(a).manual_axis_type.varying
  missing = tuple(frozenset().union(*map(varying, refs)) - varying(z))
  return jax.lax.pcast(z, missing, to="varying") if missing else z


def summed_to(g: jax.Array, primal: jax.Array) -> jax.Array:
  """g summed over the manual mesh axes that it varies over and its primal does not."""
  varying = lambda a: jax.typeof(a).manual_axis_type.varying
  extra = tuple(varying(g) - varying(primal))
  return jax.lax.psum(g, extra) if extra else g


@jax.custom_vjp
def _scan_grouped_matmul(x_GMD, w_EDF, tile_expert_G, n_tiles):
  def tile(_, xs):
    x_MD, expert, g = xs
    y_MF = jax.lax.cond(g < n_tiles,
                        lambda: jnp.dot(x_MD, w_EDF[expert].astype(x_MD.dtype)),
                        lambda: varying_as(jnp.zeros((x_MD.shape[0], w_EDF.shape[2]), x_MD.dtype), x_MD, w_EDF))
    return None, y_MF

  _, y_GMF = jax.lax.scan(tile, None, (x_GMD, tile_expert_G, jnp.arange(x_GMD.shape[0])))
  return y_GMF


def _scan_grouped_matmul_fwd(x_GMD, w_EDF, tile_expert_G, n_tiles):
  return _scan_grouped_matmul(x_GMD, w_EDF, tile_expert_G, n_tiles), (x_GMD, w_EDF, tile_expert_G, n_tiles)


def _scan_grouped_matmul_bwd(res, dy_GMF):
  """dx[g] = dy[g] @ w[e]^T and dw[e] += x[g]^T @ dy[g], again skipping empty tiles."""
  x_GMD, w_EDF, tile_expert_G, n_tiles = res

  def tile(dw_EDF, xs):
    x_MD, dy_MF, expert, g = xs

    def live(dw_EDF):
      dx_MD = jnp.dot(dy_MF, w_EDF[expert].T.astype(dy_MF.dtype)).astype(x_MD.dtype)
      dw_DF = jnp.dot(x_MD.T, dy_MF, preferred_element_type=jnp.float32)
      return dw_EDF.at[expert].add(dw_DF), dx_MD

    return jax.lax.cond(g < n_tiles, live, lambda dw: (dw, varying_as(jnp.zeros_like(x_MD), dy_MF, w_EDF)), dw_EDF)

  dw0_EDF = varying_as(jnp.zeros(w_EDF.shape, jnp.float32), x_GMD, dy_GMF, w_EDF)
  dw_EDF, dx_GMD = jax.lax.scan(tile, dw0_EDF, (x_GMD, dy_GMF, tile_expert_G, jnp.arange(x_GMD.shape[0])))
  return summed_to(dx_GMD, x_GMD), summed_to(dw_EDF, w_EDF).astype(w_EDF.dtype), None, None


_scan_grouped_matmul.defvjp(_scan_grouped_matmul_fwd, _scan_grouped_matmul_bwd)


def grouped_swiglu(x_GMD: jax.Array, w1_EDF: jax.Array, w3_EDF: jax.Array, w2_EFD: jax.Array,
                   tile_expert_G: jax.Array, n_tiles: jax.Array, live_rows_G: jax.Array | None = None,
                   impl: str = "auto") -> jax.Array:
  """y[g] = (silu(x[g] @ w1[e]) * (x[g] @ w3[e])) @ w2[e] with e = tile_expert[g], for the first n_tiles tiles.

  The routed experts' whole SwiGLU, forward and backward, over the tiles; later (padding) tiles give zeros.
  live_rows_G (default: every row) counts the live rows at the start of each tile; the rows after them are
  padding, whose inputs must be zeros (as `moe.tile_layout` places them) and whose outputs are then zeros.
  impl:
    "xla"    one scan over the tiles (the "xla" grouped_matmul three times over, fused): each live tile slices its
             expert's three matrices once and runs its three GEMMs in one iteration, forward and backward. The
             backward recomputes the tile's hidden activations from its input rather than keeping them.
    "native" `cpu_experts.grouped_swiglu`: a custom call over BLAS, one GEMM per run of an expert's tiles, padding
             rows skipped; the CPU only, float32 only; an error where it cannot run (the reason is named).
    "auto"   "native" when lowering for the CPU with float32 operands and the native kernels are available here,
             "xla" otherwise (other platforms, other dtypes, no compiler or BLAS).
  """
  if impl not in GROUPED_SWIGLU_IMPLS:
    raise ValueError(f"grouped_swiglu impl {impl!r} is not one of {GROUPED_SWIGLU_IMPLS}")
  if live_rows_G is None:
    live_rows_G = jnp.full(tile_expert_G.shape, x_GMD.shape[1], jnp.int32)
  args = (x_GMD, w1_EDF, w3_EDF, w2_EFD, tile_expert_G, n_tiles, live_rows_G)
  scan = lambda *a: _scan_grouped_swiglu(*a[:6])
  if impl == "xla" or (impl == "auto" and not cpu_experts.supports(*args[:4])):
    return scan(*args)
  if impl == "native":
    native.check_float32("grouped_swiglu impl", **dict(zip(("x", "w1", "w3", "w2"), args[:4], strict=True)))
    return cpu_experts.grouped_swiglu(*args)
  return jax.lax.platform_dependent(*args, cpu=cpu_experts.grouped_swiglu, default=scan)


def _swiglu_tile(x_MD, w1_DF, w3_DF, w2_FD):
  return jnp.dot(jax.nn.silu(jnp.dot(x_MD, w1_DF)) * jnp.dot(x_MD, w3_DF), w2_FD)


@jax.custom_vjp
def _scan_grouped_swiglu(x_GMD, w1_EDF, w3_EDF, w2_EFD, tile_expert_G, n_tiles):
  weights = lambda e: (w1_EDF[e].astype(x_GMD.dtype), w3_EDF[e].astype(x_GMD.dtype), w2_EFD[e].astype(x_GMD.dtype))

  def tile(_, xs):
    x_MD, expert, g = xs
    y_MD = jax.lax.cond(g < n_tiles, lambda: _swiglu_tile(x_MD, *weights(expert)),
                        lambda: varying_as(jnp.zeros_like(x_MD), x_MD, w1_EDF, w3_EDF, w2_EFD))
    return None, y_MD

  return jax.lax.scan(tile, None, (x_GMD, tile_expert_G, jnp.arange(x_GMD.shape[0])))[1]


def _scan_grouped_swiglu_fwd(x_GMD, w1_EDF, w3_EDF, w2_EFD, tile_expert_G, n_tiles):
  return (_scan_grouped_swiglu(x_GMD, w1_EDF, w3_EDF, w2_EFD, tile_expert_G, n_tiles),
          (x_GMD, w1_EDF, w3_EDF, w2_EFD, tile_expert_G, n_tiles))


def _scan_grouped_swiglu_bwd(res, dy_GMD):
  x_GMD, w1_EDF, w3_EDF, w2_EFD, tile_expert_G, n_tiles = res
  dtype = x_GMD.dtype

  def tile(dws, xs):
    x_MD, dy_MD, expert, g = xs

    def live(dws):
      dw1, dw3, dw2 = dws
      w1_DF, w3_DF, w2_FD = w1_EDF[expert].astype(dtype), w3_EDF[expert].astype(dtype), w2_EFD[expert].astype(dtype)
      a1_MF, a3_MF = jnp.dot(x_MD, w1_DF), jnp.dot(x_MD, w3_DF)
      sig_MF = jax.nn.sigmoid(a1_MF)
      silu_MF = a1_MF * sig_MF
      dh_MF = jnp.dot(dy_MD, w2_FD.T)
      da1_MF = (dh_MF * a3_MF * sig_MF * (1 + a1_MF * (1 - sig_MF))).astype(dtype)
      da3_MF = (dh_MF * silu_MF).astype(dtype)
      dx_MD = (jnp.dot(da1_MF, w1_DF.T) + jnp.dot(da3_MF, w3_DF.T)).astype(dtype)
      f32 = functools.partial(jnp.dot, preferred_element_type=jnp.float32)
      return (dw1.at[expert].add(f32(x_MD.T, da1_MF)), dw3.at[expert].add(f32(x_MD.T, da3_MF)),
              dw2.at[expert].add(f32((silu_MF * a3_MF).astype(dtype).T, dy_MD))), dx_MD

    dead = lambda dws: (dws, varying_as(jnp.zeros_like(x_MD), dy_MD, w1_EDF, w3_EDF, w2_EFD))
    return jax.lax.cond(g < n_tiles, live, dead, dws)

  zeros = tuple(varying_as(jnp.zeros(w.shape, jnp.float32), x_GMD, dy_GMD, w1_EDF, w3_EDF, w2_EFD)
                for w in (w1_EDF, w3_EDF, w2_EFD))
  (dw1, dw3, dw2), dx_GMD = jax.lax.scan(tile, zeros, (x_GMD, dy_GMD, tile_expert_G, jnp.arange(x_GMD.shape[0])))
  return (summed_to(dx_GMD, x_GMD), *(summed_to(dw, w).astype(w.dtype) for dw, w in
                                      ((dw1, w1_EDF), (dw3, w3_EDF), (dw2, w2_EFD))), None, None)


_scan_grouped_swiglu.defvjp(_scan_grouped_swiglu_fwd, _scan_grouped_swiglu_bwd)


# Per-tile overhead of the "xla" scan, counted in rows of work: a tile costs about as much as its rows
# plus 4 more would inside one large matmul (fit on a 2-core CPU with experiments/bench_moe.py).
_TILE_OVERHEAD_ROWS = 4


def tile_rows(n_slots: int, n_experts: int) -> int:
  """Rows per expert tile M: a power of two in [8, 128] balancing padding against per-tile overhead.

  Each expert pads its rows to whole tiles, wasting about M/2 rows, and each tile costs c rows of overhead;
  E M / 2 + c N / M is least at M = sqrt(2 c N / E). So tiles shrink when experts are many and tokens few,
  and grow to 128 (DeepGEMM's M-block) when every expert has plenty of rows. Measured at 4096 tokens x
  top-8 (MoE layer forward + backward): E=256 ran 497 ms with M=32 against 596 ms with M=128, E=8 345 ms
  with M=128 against 383 ms with M=32.
  """
  best = math.sqrt(2 * _TILE_OVERHEAD_ROWS * max(n_slots // n_experts, 1))
  return min(max(2 ** int(math.log2(best) + 0.5), 8), 128)


# Block-scaled FP8 GEMMs.


def fp8_impl(requested: str) -> str:
  """The FP8 GEMM implementation to use: "auto" picks the kernels on GPU and XLA elsewhere."""
  if requested == "auto":
    return "pallas" if jax.default_backend() == "gpu" else "xla"
  if requested not in FP8_GEMM_IMPLS:
    raise ValueError(f"fp8 gemm impl {requested!r} is not one of {FP8_GEMM_IMPLS} or 'auto'")
  return requested


def _on_platform(kernel, *args, **kwargs):
  """The compiled kernel when lowering for CUDA, its interpret mode for any other platform.

  Decided at lowering time by the target platform, not by the default backend, so a deviceless compile for GPUs
  from a CPU host gets the real kernel too.
  """
  return jax.lax.platform_dependent(*args, cuda=functools.partial(kernel, **kwargs, interpret=False),
                                    default=functools.partial(kernel, **kwargs, interpret=True))


def fp8_gemm(a_MK: jax.Array, a_scale_MJ: jax.Array, b_NK: jax.Array, b_scale: jax.Array, *, b_block: int = 128,
             out_dtype=jnp.bfloat16, impl: str = "xla") -> jax.Array:
  """D = a @ b^T, block-scaled (1x128 a scales; 128x128 or, with b_block=1, 1x128 b scales); see fp8.scaled_matmul."""
  if fp8_impl(impl) == "xla":
    return fp8.scaled_matmul(a_MK, a_scale_MJ, b_NK, b_scale, b_block=b_block, out_dtype=out_dtype)
  return _on_platform(fp8_kernels.gemm, a_MK, a_scale_MJ, b_NK, b_scale, b_block=b_block, out_dtype=out_dtype)


def grouped_fp8_gemm(a_GMK: jax.Array, a_scale_GMJ: jax.Array, b_ENK: jax.Array, b_scale_EIJ: jax.Array,
                     tile_expert_G: jax.Array, n_tiles: jax.Array, *, out_dtype=jnp.bfloat16,
                     impl: str = "xla") -> jax.Array:
  """y[g] = block-scaled a[g] @ b[tile_expert[g]]^T for g < n_tiles, zeros for padding tiles."""
  if fp8_impl(impl) == "xla":
    return fp8.grouped_scaled_matmul(a_GMK, a_scale_GMJ, b_ENK, b_scale_EIJ, tile_expert_G, n_tiles,
                                     out_dtype=out_dtype)
  return _on_platform(fp8_kernels.grouped_gemm, a_GMK, a_scale_GMJ, b_ENK, b_scale_EIJ, tile_expert_G, n_tiles,
                      out_dtype=out_dtype)


def grouped_fp8_gemm_wgrad(a_GKM: jax.Array, a_scale_GKI: jax.Array, b_GNM: jax.Array, b_scale_GNI: jax.Array,
                           tile_expert_G: jax.Array, n_tiles: jax.Array, n_experts: int, *, out_dtype=jnp.float32,
                           impl: str = "xla") -> jax.Array:
  """out[e] = sum over expert e's live tiles of block-scaled a[g] @ b[g]^T (token axis contracted): [E, K, N]."""
  if fp8_impl(impl) == "xla":
    return fp8.grouped_scaled_matmul_wgrad(a_GKM, a_scale_GKI, b_GNM, b_scale_GNI, tile_expert_G, n_tiles,
                                           n_experts, out_dtype=out_dtype)
  return _on_platform(fp8_kernels.grouped_gemm_wgrad, a_GKM, a_scale_GKI, b_GNM, b_scale_GNI, tile_expert_G,
                      n_tiles, n_experts=n_experts, out_dtype=out_dtype)
