"""Block-scaled FP8 GEMM for Hopper in Pallas Mosaic GPU: TMA-pipelined operands and fp8 wgmma.

Same semantics as `pallas_kernels/fp8_gemm.py` and `fp8.scaled_matmul` (b_block=128 or 1):

  D[m, n] = sum_j a_scale[m, j] * b_scale[n // b_block, j] * (sum_{k in 128-block j} a[m, k] * b[n, k])

1. One CTA (one warpgroup) owns a [tile_m, tile_n] output tile. `emit_pipeline` walks K in steps of 128 and keeps
   `max_concurrent_steps` TMA copies in flight: the [tile_m, 128] A block, the [tile_n, 128] B block (both
   128-byte swizzled) and the step's scales.
2. 8-bit wgmma takes no transposes, so A is [M, K] and B is K-major [N, K] (DeepSeek's weight layout) viewed as
   [K, N] through `transpose_ref`, the only fp8 form the hardware has.
3. Each step starts a fresh fp32 wgmma accumulator (the 128-wide block is 4 wgmma of K=32 on the tensor cores),
   waits for it, and promotes it into the register accumulator that the pipeline carries:
   acc = acc + part * (sa[:, None] * sb[None, :]). This is DeepSeek's promotion every 128 products, on the CUDA
   cores, in block order like the reference.
4. Scales arrive MN-major, as DeepGEMM takes them: a_scale transposed to [J, M], and b_scale expanded to [J, N]
   (one column per output column, whatever b_block is) so that both are [1, tile] row vectors per step, loaded
   in the WGMMA row / column layouts and broadcast over the tile.
5. The epilogue writes the tile through SMEM with one TMA store.

Limits: M, N and K must be multiples of tile_m, tile_n and 128 (refused, naming the dimension; the Triton kernel
handles partial tiles). Without warp specialization the TMA and the math share one warpgroup; tile_m stays at 64
rows, so the carried and the fresh 64x128 fp32 accumulators take 128 registers per thread together.

Mosaic GPU kernels compile when first run on the device, so on a CPU host only the Python lowering runs (it checks
layouts and types: the fp8 transpose rule, TMA shapes); `jax.export` for cuda shows the kernel is well formed.
Its interpreter cannot run fp8 (no `transpose_ref`), so it is checked against `reference()` on a GPU only.

  python -m pallas_kernels.fp8_gemm_mgpu     # sweep: checks and TFLOP/s (GPU only)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import fp8_gemm

BLOCK_K = fp8_gemm.BLOCK_K


@dataclasses.dataclass(frozen=True)
class TuningConfig:
  """CTA tile and pipeline depth (K is always 128 per step: the scale block)."""

  tile_m: int = 64  # one warpgroup's wgmma M; the fresh and carried fp32 accumulators must both fit in registers
  tile_n: int = 128
  max_concurrent_steps: int = 4  # TMA copies in flight

  def __post_init__(self):
    if self.tile_m % 64:
      raise ValueError(f"TuningConfig.tile_m={self.tile_m}: must be a multiple of 64 (wgmma M)")
    if self.tile_n % 8 or not 8 <= self.tile_n <= 256:
      raise ValueError(f"TuningConfig.tile_n={self.tile_n}: must be a multiple of 8 in [8, 256] (wgmma N)")


def _swizzled(tile_minor: int, dtype) -> tuple:
  swizzle = plgpu.find_swizzle(tile_minor * jnp.dtype(dtype).itemsize * 8)
  return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle))


def _kernel(a_gmem, as_gmem, b_gmem, bs_gmem, out_gmem, *, config: TuningConfig):
  tm, tn = config.tile_m, config.tile_n
  k_steps = a_gmem.shape[1] // BLOCK_K
  m_slice = pl.ds(lax.axis_index("m") * tm, tm)
  n_slice = pl.ds(lax.axis_index("n") * tn, tn)
  operand = _swizzled(BLOCK_K, a_gmem.dtype)

  def step(_, a_smem, b_smem, as_smem, bs_smem, acc):
    def block_product(part_ref):
      plgpu.wgmma(part_ref, a_smem, plgpu.transpose_ref(b_smem, (1, 0)))
      return part_ref[...]  # waits for the wgmma group

    part = pl.run_scoped(block_product, plgpu.ACC((tm, tn), jnp.float32))
    sa = plgpu.load(as_smem, (0,), layout=plgpu.Layout.WGMMA.reduce(1))
    sb = plgpu.load(bs_smem, (0,), layout=plgpu.Layout.WGMMA.reduce(0))
    return acc + part * (lax.broadcast_in_dim(sa, (tm, tn), [0]) * lax.broadcast_in_dim(sb, (tm, tn), [1]))

  pipeline = plgpu.emit_pipeline(
      step,
      grid=(k_steps,),
      in_specs=[plgpu.BlockSpec((tm, BLOCK_K), lambda k: (0, k), transforms=operand),
                plgpu.BlockSpec((tn, BLOCK_K), lambda k: (0, k), transforms=operand),
                plgpu.BlockSpec((1, tm), lambda k: (k, 0)),
                plgpu.BlockSpec((1, tn), lambda k: (k, 0))],
      max_concurrent_steps=config.max_concurrent_steps,
      init_carry=plgpu.layout_cast(jnp.zeros((tm, tn), jnp.float32), plgpu.Layout.WGMMA),
  )
  acc = pipeline(a_gmem.at[m_slice, :], b_gmem.at[n_slice, :], as_gmem.at[:, m_slice], bs_gmem.at[:, n_slice])

  def epilogue(out_smem):
    out_smem[...] = acc.astype(out_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[m_slice, n_slice])
    plgpu.wait_smem_to_gmem(0)

  pl.run_scoped(epilogue, plgpu.SMEM((tm, tn), out_gmem.dtype, transforms=_swizzled(tn, out_gmem.dtype)))


def check_tiles(m: int, n: int, k: int, config: TuningConfig) -> None:
  for name, size, tile in (("M", m, config.tile_m), ("N", n, config.tile_n), ("K", k, BLOCK_K)):
    if size % tile:
      raise ValueError(f"{name}={size} is not a multiple of {tile}: the Mosaic GPU kernel takes whole tiles only "
                       "(use pallas_kernels.fp8_gemm.gemm for partial tiles)")


def gemm(a_MK: jax.Array, a_scale_MJ: jax.Array, b_NK: jax.Array, b_scale: jax.Array, *, b_block: int = BLOCK_K,
         out_dtype=jnp.bfloat16, config: TuningConfig | None = None) -> jax.Array:
  """D = block-scaled a @ b^T on Hopper wgmma; [M, N] in out_dtype (see the module docstring)."""
  fp8_gemm.check_gemm_inputs(a_MK, a_scale_MJ, b_NK, b_scale, b_block, out_dtype)
  config = config or TuningConfig()
  (m, k), n = a_MK.shape, b_NK.shape[0]
  check_tiles(m, n, k, config)
  sb_JN = (b_scale if b_block == 1 else jnp.repeat(b_scale, BLOCK_K, axis=0)[:n]).T.astype(jnp.float32)
  kernel = plgpu.kernel(
      functools.partial(_kernel, config=config),
      out_type=jax.ShapeDtypeStruct((m, n), out_dtype),
      grid=(m // config.tile_m, n // config.tile_n),
      grid_names=("m", "n"),
  )
  return kernel(a_MK, a_scale_MJ.T.astype(jnp.float32), b_NK, sb_JN)


reference = fp8_gemm.reference


def main() -> None:
  if jax.default_backend() != "gpu":
    print(f"fp8_gemm_mgpu: no GPU (JAX backend {jax.default_backend()!r}); Mosaic GPU kernels run on Hopper only. "
          "tests/test_pallas_fp8.py exports it for cuda.")
    return
  print(f"{jax.devices()[0].device_kind}; columns: M N K, rel err vs dequantized ref, calc_diff vs fp32, "
        "TFLOP/s, share of FP8 peak")
  for m, n, k in fp8_gemm.SWEEP_SHAPES:
    config = TuningConfig(tile_n=64 if n % 128 else 128)
    (a, sa, b, sb), exact = fp8_gemm.random_operands(jax.random.key(0), m, n, k)
    fn = jax.jit(functools.partial(gemm, config=config))
    out = fn(a, sa, b, sb)
    ref = jax.jit(reference)(a, sa, b, sb)
    tflops = 2 * m * n * k / fp8_gemm.time_call(fn, a, sa, b, sb) / 1e12
    print(f"{m:5d} {n:6d} {k:6d}  {fp8_gemm.relative_error(out, ref):.1e}  {fp8_gemm.calc_diff(out, exact):.1e}  "
          f"{tflops:7.0f}  {tflops / fp8_gemm.H100_FP8_PEAK_TFLOPS:.0%}")


if __name__ == "__main__":
  main()
