"""The block-scaled FP8 GEMM kernels: interpret mode against fp8.py's XLA definition, cuda export, H100 PTX.

The PTX checks need JAX's CUDA plugin (a deviceless H100 compile) and skip without it; run them in the plugin
environment that `make gpu-compile-check` builds (docs/EXPERT_PARALLEL.md):
  ../gpuvenv/bin/python -m pytest tests/test_pallas_fp8.py -q
"""

import functools
import glob
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental import topologies

from dsv3_jax import fp8
from dsv3_jax import ops
from experiments import gpu_compile_check
from pallas_kernels import fp8_gemm
from pallas_kernels import fp8_gemm_mgpu

E4M3 = jnp.float8_e4m3fn
# Kernel vs fp8.scaled_matmul with fp32 output: the same exact block products promoted in the same block order, so
# only the rounding of the scale products differs (a few fp32 ulps of the largest output).
FP32_ROUNDING = 1e-6
TRITON_CALL = "__gpu$xla.gpu.triton"


def _max_rel(x, ref) -> float:
  return fp8_gemm.relative_error(x, ref)


def _dequantized(a_MK, a_scale_MJ, b_NK, b_scale, b_block):
  a32 = fp8.dequantize_rows(a_MK, a_scale_MJ)
  b32 = fp8.dequantize_rows(b_NK, b_scale) if b_block == 1 else fp8.dequantize_blocks(b_NK, b_scale)
  return jnp.dot(a32, b32.T, precision=jax.lax.Precision.HIGHEST)


# Aligned, then M, N and K all partial (K: a 64-wide last block; N: a half 128x128 weight block).
@pytest.mark.parametrize("m,n,k", [(256, 256, 384), (200, 136, 320)])
@pytest.mark.parametrize("b_block", [128, 1])
def test_dense_kernel_equals_the_xla_definition(m, n, k, b_block):
  (a, sa, b, sb), exact = fp8_gemm.random_operands(jax.random.key(m + b_block), m, n, k, b_block=b_block)
  xla = fp8.scaled_matmul(a, sa, b, sb, b_block=b_block, out_dtype=jnp.float32)
  out = fp8_gemm.gemm(a, sa, b, sb, b_block=b_block, out_dtype=jnp.float32, interpret=True)
  assert out.shape == (m, n) and out.dtype == jnp.float32
  assert _max_rel(out, xla) <= FP32_ROUNDING
  assert _max_rel(out, fp8_gemm.reference(a, sa, b, sb, b_block=b_block, out_dtype=jnp.float32)) <= FP32_ROUNDING
  out_bf16 = fp8_gemm.gemm(a, sa, b, sb, b_block=b_block, interpret=True)
  assert out_bf16.dtype == jnp.bfloat16
  assert _max_rel(out_bf16, _dequantized(a, sa, b, sb, b_block)) <= 1e-2  # bf16 output rounding
  assert fp8_gemm.calc_diff(out_bf16, exact) < 1e-3  # DeepGEMM's bound against the unquantized product


def test_dense_kernel_decode_tiles_and_small_n_tile():
  (a, sa, b, sb), _ = fp8_gemm.random_operands(jax.random.key(3), 40, 200, 256)
  xla = fp8.scaled_matmul(a, sa, b, sb, out_dtype=jnp.float32)
  config = fp8_gemm.TuningConfig(block_m=32, block_n=64, num_warps=4)  # two N tiles share a weight scale block
  out = fp8_gemm.gemm(a, sa, b, sb, out_dtype=jnp.float32, config=config, interpret=True)
  assert _max_rel(out, xla) <= FP32_ROUNDING


def _grouped_operands(rows: int, n: int, k: int, tile_expert, n_tiles: int, n_experts: int = 3):
  """Tiles of `rows` rows; the padding tiles' activations are NaN, so reading one would show in the output."""
  n_groups = len(tile_expert)
  kx, kw = jax.random.split(jax.random.key(rows + n))
  x_GMK = jax.random.normal(kx, (n_groups, rows, k))
  x_GMK = jnp.where((jnp.arange(n_groups) < n_tiles)[:, None, None], x_GMK, jnp.nan)
  a, sa = fp8.quantize_rows(x_GMK)
  b, sb = jax.vmap(fp8.quantize_blocks)(jax.random.normal(kw, (n_experts, n, k)))
  return a, sa, b, sb, jnp.array(tile_expert, jnp.int32), jnp.array(n_tiles, jnp.int32)


@pytest.mark.parametrize("rows,n,k", [(32, 256, 384), (64, 136, 320)])
def test_grouped_kernel_equals_the_xla_definition_and_skips_padding(rows, n, k):
  # Expert 1 has no tiles; tiles 4 and 5 are padding (their rows are NaN and must never be read).
  args = _grouped_operands(rows, n, k, [0, 0, 2, 2, 2, 2], n_tiles=4)
  xla = fp8.grouped_scaled_matmul(*args, out_dtype=jnp.float32)
  out = fp8_gemm.grouped_gemm(*args, out_dtype=jnp.float32, interpret=True)
  assert out.shape == (6, rows, n)
  assert bool(jnp.all(out[4:] == 0))
  assert bool(jnp.all(jnp.isfinite(out[:4])))
  assert _max_rel(out[:4], xla[:4]) <= FP32_ROUNDING
  out_bf16 = fp8_gemm.grouped_gemm(*args, interpret=True)
  assert out_bf16.dtype == jnp.bfloat16 and bool(jnp.all(out_bf16[4:] == 0))
  a, sa, b, sb, tile_expert, _ = args
  dequantized = jnp.stack([_dequantized(a[g], sa[g], b[e], sb[e], 128) for g, e in enumerate([0, 0, 2, 2])])
  assert _max_rel(out_bf16[:4], dequantized) <= 1e-2


def _wgrad_operands(rows: int, k: int, n: int, tile_expert, n_tiles: int):
  """Per-tile x^T [K, M] and dy^T [N, M], quantized 1x128 along the tokens; padding tiles NaN."""
  n_groups = len(tile_expert)
  live = (jnp.arange(n_groups) < n_tiles)[:, None, None]
  x_GKM = jnp.where(live, jax.random.normal(jax.random.key(5), (n_groups, k, rows)), jnp.nan)
  dy_GNM = jnp.where(live, jax.random.normal(jax.random.key(6), (n_groups, n, rows)), jnp.nan)
  a, sa = fp8.quantize_rows(x_GKM)
  b, sb = fp8.quantize_rows(dy_GNM)
  exact = [jnp.einsum("gkm,gnm->kn", x_GKM[g0:g1], dy_GNM[g0:g1], precision="highest") for g0, g1 in
           ((0, 2), (2, 4))]
  return (a, sa, b, sb, jnp.array(tile_expert, jnp.int32), jnp.array(n_tiles, jnp.int32)), exact


# 8 tokens: a masked 32-token dot; 160 tokens: two scale groups, the second partial.
@pytest.mark.parametrize("rows,k,n", [(8, 256, 128), (160, 136, 72)])
def test_wgrad_kernel_equals_the_xla_definition(rows, k, n):
  # Experts 0 and 2 own two tiles each, expert 1 none; tiles 4 and 5 are padding (NaN, never read).
  args, exact = _wgrad_operands(rows, k, n, [0, 0, 2, 2, 2, 2], n_tiles=4)
  xla = fp8.grouped_scaled_matmul_wgrad(*args, 3)
  out = fp8_gemm.grouped_gemm_wgrad(*args, 3, interpret=True)
  assert out.shape == (3, k, n) and out.dtype == jnp.float32
  assert bool(jnp.all(out[1] == 0))
  assert bool(jnp.all(jnp.isfinite(out)))
  assert _max_rel(out, xla) <= FP32_ROUNDING
  for e, want in zip((0, 2), exact, strict=True):
    assert fp8_gemm.calc_diff(out[e], want) < 1e-3


def test_ops_selects_the_implementation():
  (a, sa, b, sb), _ = fp8_gemm.random_operands(jax.random.key(7), 128, 136, 256)
  via_xla = ops.fp8_gemm(a, sa, b, sb, out_dtype=jnp.float32, impl="xla")
  via_pallas = jax.jit(functools.partial(ops.fp8_gemm, out_dtype=jnp.float32, impl="pallas"))(a, sa, b, sb)
  assert _max_rel(via_pallas, via_xla) <= FP32_ROUNDING
  assert ops.fp8_impl("auto") == ("pallas" if jax.default_backend() == "gpu" else "xla")
  with pytest.raises(ValueError, match="'triton' is not one of"):
    ops.fp8_gemm(a, sa, b, sb, impl="triton")

  args = _grouped_operands(32, 128, 256, [0, 1, 1, 2], n_tiles=3)
  grouped = jax.jit(functools.partial(ops.grouped_fp8_gemm, out_dtype=jnp.float32, impl="pallas"))(*args)
  assert _max_rel(grouped[:3], ops.grouped_fp8_gemm(*args, out_dtype=jnp.float32)[:3]) <= FP32_ROUNDING
  wargs, _ = _wgrad_operands(32, 128, 128, [0, 0, 2, 2], n_tiles=4)
  wgrad = jax.jit(functools.partial(ops.grouped_fp8_gemm_wgrad, n_experts=3, impl="pallas"))(*wargs)
  assert _max_rel(wgrad, ops.grouped_fp8_gemm_wgrad(*wargs, 3)) <= FP32_ROUNDING


def test_bad_inputs_name_the_argument_and_the_expected_shape():
  (a, sa, b, sb), _ = fp8_gemm.random_operands(jax.random.key(8), 64, 256, 384)
  gemm = functools.partial(fp8_gemm.gemm, interpret=True)
  with pytest.raises(TypeError, match="a: expected float8_e4m3fn, got bfloat16"):
    gemm(a.astype(jnp.bfloat16), sa, b, sb)
  with pytest.raises(TypeError, match="b: expected float8_e4m3fn"):
    gemm(a, sa, b.astype(jnp.float32), sb)
  with pytest.raises(ValueError, match=r"a_scale: expected shape \(64, 3\) \(\[M, ceil\(K/128\)\]\), got \(64, 2\)"):
    gemm(a, sa[:, :2], b, sb)
  with pytest.raises(ValueError, match=r"b_scale: expected shape \(256, 3\) .*b_block=1\), got \(2, 3\)"):
    gemm(a, sa, b, sb, b_block=1)
  with pytest.raises(ValueError, match="b_block: expected 128 .* or 1 .*got 64"):
    gemm(a, sa, b, sb, b_block=64)
  with pytest.raises(ValueError, match=r"b: expected shape \(256, 384\)"):
    gemm(a, sa, b[:, :256], sb)
  with pytest.raises(TypeError, match="a_scale: scales must be float32, got bfloat16"):
    gemm(a, sa.astype(jnp.bfloat16), b, sb)
  with pytest.raises(TypeError, match="out_dtype: expected bfloat16 or float32, got float16"):
    gemm(a, sa, b, sb, out_dtype=jnp.float16)
  args = _grouped_operands(32, 128, 256, [0, 1, 1, 2], n_tiles=3)
  with pytest.raises(ValueError, match=r"tile_expert_G: expected an integer array of shape \(4,\)"):
    fp8_gemm.grouped_gemm(*args[:4], args[4][:3], args[5], interpret=True)
  with pytest.raises(ValueError, match=r"b_scale: expected shape \(3, 1, 2\) \(\[E, ceil\(N/128\), ceil\(K/128\)\]\)"):
    fp8_gemm.grouped_gemm(*args[:3], args[3][:, :, :1].repeat(2, 1), *args[4:], interpret=True)
  wargs, _ = _wgrad_operands(32, 128, 128, [0, 0, 2, 2], n_tiles=4)
  with pytest.raises(ValueError, match=r"b: expected shape \(4, N, 32\)"):
    fp8_gemm.grouped_gemm_wgrad(wargs[0], wargs[1], wargs[2][:, :, :16], *wargs[3:], 3, interpret=True)
  with pytest.raises(ValueError, match="TuningConfig.block_n=256: must divide 128"):
    fp8_gemm.TuningConfig(block_n=256)
  with pytest.raises(ValueError, match="N=2112 is not a multiple of 128"):
    fp8_gemm_mgpu.check_tiles(4096, 2112, 7168, fp8_gemm_mgpu.TuningConfig())


def _specs(*shapes_dtypes):
  return [jax.ShapeDtypeStruct(s, d) for s, d in shapes_dtypes]


DENSE_SPECS = ((256, 512), E4M3), ((256, 4), jnp.float32), ((256, 512), E4M3), ((2, 4), jnp.float32)
GROUPED_SPECS = (((6, 32, 512), E4M3), ((6, 32, 4), jnp.float32), ((3, 256, 512), E4M3), ((3, 2, 4), jnp.float32),
                 ((6,), jnp.int32), ((), jnp.int32))
WGRAD_SPECS = (((6, 512, 128), E4M3), ((6, 512, 1), jnp.float32), ((6, 256, 128), E4M3), ((6, 256, 1), jnp.float32),
               ((6,), jnp.int32), ((), jnp.int32))


@pytest.mark.parametrize("name,fn,specs", [
    ("gemm", fp8_gemm.gemm, DENSE_SPECS),
    ("grouped", fp8_gemm.grouped_gemm, GROUPED_SPECS),
    ("wgrad", functools.partial(fp8_gemm.grouped_gemm_wgrad, n_experts=3), WGRAD_SPECS),
])
def test_triton_kernels_export_for_cuda(name, fn, specs):
  exported = export.export(jax.jit(fn), platforms=["cuda"],
                           disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*_specs(*specs))
  assert exported.platforms == ("cuda",)
  assert exported.mlir_module().count(TRITON_CALL) == 1, name


@pytest.mark.parametrize("b_block,b_scale_shape", [(128, (2, 4)), (1, (256, 4))])
def test_mosaic_gpu_kernel_exports_for_cuda(b_block, b_scale_shape):
  specs = _specs(((256, 512), E4M3), ((256, 4), jnp.float32), ((256, 512), E4M3), (b_scale_shape, jnp.float32))
  fn = jax.jit(functools.partial(fp8_gemm_mgpu.gemm, b_block=b_block))
  exported = export.export(fn, platforms=["cuda"],
                           disabled_checks=[export.DisabledSafetyCheck.custom_call("mosaic_gpu_v2")])(*specs)
  module = exported.mlir_module()
  assert module.count("stablehlo.custom_call @mosaic_gpu_v2") == 1
  assert "tensor<256x512xf8E4M3FN>" in module


def test_fp8_wgmma_patch_is_guarded_by_jax_version(monkeypatch):
  from jax._src.pallas.triton import lowering

  monkeypatch.setattr(fp8_gemm, "_patch", {"installed": False, "enabled": True, "warned": False})
  monkeypatch.setattr(fp8_gemm, "FP8_WGMMA_CHECKED_JAX", ("0.0.0",))
  before = lowering.tt_dialect.dot
  assert fp8_gemm.install_fp8_wgmma_patch() is False
  assert lowering.tt_dialect.dot is before


# Deviceless H100 compiles (need the CUDA plugin).

needs_plugin = pytest.mark.skipif(
    not gpu_compile_check.plugin_installed(),
    reason="jax-cuda12-plugin is missing (a deviceless H100 compile needs XLA's GPU compiler): run "
           "../gpuvenv/bin/python -m pytest tests/test_pallas_fp8.py after make gpu-compile-check")
MMA = r"(wgmma\.mma_async\S*|mma\.sync\S*)"


def _h100_ptx(fn, specs, tmp_path, *, fp8_wgmma: bool = True) -> set[str]:
  """The MMA instructions in the PTX of fn compiled for one deviceless H100."""
  topology = topologies.get_topology_desc(platform="cuda", topology="1x1x1",
                                          target_config=gpu_compile_check.h100_target_config())
  sharding = jax.sharding.SingleDeviceSharding(topology.devices[0])
  args = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in specs]
  with fp8_gemm.fp8_wgmma(fp8_wgmma):
    lowered = jax.jit(fn).lower(*args)
  lowered.compile(compiler_options={"xla_dump_to": str(tmp_path)})
  ptx = "".join(open(p).read() for p in glob.glob(f"{tmp_path}/**/*.ptx", recursive=True))
  return set(re.findall(MMA, ptx))


@needs_plugin
def test_fast_path_compiles_fp8_dots_to_wgmma_and_without_it_to_mma_sync(tmp_path):
  fast = _h100_ptx(fp8_gemm.gemm, DENSE_SPECS, tmp_path / "fast")
  assert fast == {"wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3"}
  slow = _h100_ptx(fp8_gemm.gemm, DENSE_SPECS, tmp_path / "slow", fp8_wgmma=False)
  assert slow == {"mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"}  # fp8 promoted to f16


@needs_plugin
@pytest.mark.parametrize("name,fn,specs", [
    ("grouped", fp8_gemm.grouped_gemm, GROUPED_SPECS),  # 32-row tiles: a masked 64-row wgmma block
    ("wgrad", functools.partial(fp8_gemm.grouped_gemm_wgrad, n_experts=3), WGRAD_SPECS),
    ("wgrad 160 tokens", functools.partial(fp8_gemm.grouped_gemm_wgrad, n_experts=3),
     (((6, 136, 160), E4M3), ((6, 136, 2), jnp.float32), ((6, 72, 160), E4M3), ((6, 72, 2), jnp.float32),
      ((6,), jnp.int32), ((), jnp.int32))),
    ("partial dense", fp8_gemm.gemm, (((200, 320), E4M3), ((200, 3), jnp.float32), ((136, 320), E4M3),
                                      ((2, 3), jnp.float32))),
    ("ops pallas", functools.partial(ops.fp8_gemm, impl="pallas"), DENSE_SPECS),  # the CUDA branch, from a CPU host
])
def test_every_kernel_compiles_to_fp8_wgmma(name, fn, specs, tmp_path):
  assert _h100_ptx(fn, specs, tmp_path) == {"wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3"}, name


@needs_plugin
def test_kernels_lower_inside_expert_parallel_shard_map(tmp_path):
  """On a deviceless 4-GPU mesh, the grouped kernels run per shard (outputs typed varying over 'expert')."""
  topology = topologies.get_topology_desc(platform="cuda", topology="1x1x4",
                                          target_config=gpu_compile_check.h100_target_config())
  mesh = jax.sharding.Mesh(np.array(topology.devices), ("expert",))
  sharded = jax.sharding.NamedSharding(mesh, jax.P("expert"))
  tiles, rows, k, n = 8, 128, 512, 256
  specs = [((4 * tiles, rows, k), E4M3), ((4 * tiles, rows, k // 128), jnp.float32), ((8, n, k), E4M3),
           ((8, n // 128, k // 128), jnp.float32), ((4 * tiles,), jnp.int32), ((4,), jnp.int32)]
  args = [jax.ShapeDtypeStruct(s, d, sharding=sharded) for s, d in specs]

  def per_shard(a, sa, b, sb, tile_expert, n_tiles):
    y = ops.grouped_fp8_gemm(a, sa, b, sb, tile_expert, n_tiles[0], impl="pallas")
    ones = jnp.ones((tiles, k, 1), jnp.float32)
    dw = ops.grouped_fp8_gemm_wgrad(a.swapaxes(1, 2), ones, a.swapaxes(1, 2), ones, tile_expert, n_tiles[0], 2,
                                    impl="pallas")
    return y, dw

  step = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=(jax.P("expert"),) * 6,
                               out_specs=(jax.P("expert"), jax.P("expert"))))
  step.lower(*args).compile(compiler_options={"xla_dump_to": str(tmp_path)})
  ptx = "".join(open(p).read() for p in glob.glob(f"{tmp_path}/**/*.ptx", recursive=True))
  assert set(re.findall(MMA, ptx)) == {"wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3"}
