"""FP8 numerics: quantizers against DeepSeek's semantics in torch, the block-scaled GEMM against its
dequantized reference, the FP8 Linears' three GEMMs, non-finite inputs, the precision policy."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh

from configs import tiny_cpu
from dsv3_jax import config as config_lib
from dsv3_jax import expert_parallel
from dsv3_jax import fp8
from dsv3_jax import layers
from dsv3_jax import model as model_lib
from dsv3_jax import moe
from dsv3_jax import ops
from dsv3_jax import sharding
from dsv3_jax import train

# ---------------------------------------------------------------------------------------------------
# DeepSeek's quantization in torch (inference/kernel.py `act_quant` after the 1e-4 clamp fix, and the
# 128x128 weight blocks of its FP8 checkpoints), written from the semantics: per tile amax in fp32,
# clamp at 1e-4, s = amax / 448, UE8M0 s = 2^ceil(log2 s), y = e4m3(x / s) with torch's saturating cast.


def _torch_scale(amax: torch.Tensor, ue8m0: bool) -> torch.Tensor:
  s = amax.clamp(min=1e-4) / 448.0
  if ue8m0:  # ceil(log2 s) evaluated exactly (float64 resolves the values just above a power of two)
    s = torch.exp2(torch.ceil(torch.log2(s.double()))).float()
  return s


def torch_act_quant(x: torch.Tensor, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
  """1x128 tiles along the last dim; a partial last tile covers the remaining elements."""
  k = x.shape[-1]
  j = -(-k // 128)
  tiles = torch.nn.functional.pad(x.float(), (0, j * 128 - k)).view(*x.shape[:-1], j, 128)
  s = _torch_scale(tiles.abs().amax(-1), ue8m0)
  y = (tiles / s[..., None]).to(torch.float8_e4m3fn).view(*x.shape[:-1], j * 128)[..., :k]
  return y, s


def torch_weight_quant(w: torch.Tensor, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
  """128x128 blocks of a 2-D [N, K] weight, partial edge blocks covering what exists."""
  n, k = w.shape
  i, j = -(-n // 128), -(-k // 128)
  blocks = torch.nn.functional.pad(w.float(), (0, j * 128 - k, 0, i * 128 - n)).view(i, 128, j, 128)
  s = _torch_scale(blocks.abs().amax(dim=(1, 3)), ue8m0)
  y = (blocks / s[:, None, :, None]).to(torch.float8_e4m3fn).view(i * 128, j * 128)[:n, :k]
  return y, s


def _awkward(shape, seed: int) -> np.ndarray:
  """Gaussian values spread over 2^-20..2^12 with outliers, zeros, an all-zero tile and tiny tiles."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape) * np.exp2(rng.integers(-20, 12, shape))
  x[rng.random(shape) < 0.05] = 0.0
  x.reshape(-1)[rng.integers(0, x.size, 8)] = 3e4 * rng.choice([-1, 1], 8)  # outliers
  x[0, :128] = 0.0  # an all-zero 1x128 tile (and part of a 128x128 block)
  x[1, :] = 1e-9  # amax below the 1e-4 clamp
  x[:128, -5:] = 0.0  # an all-zero partial edge block when the width is 128k + 5
  return x.astype(np.float32)


def _bytes(x) -> np.ndarray:
  return np.asarray(x.view(torch.uint8)) if isinstance(x, torch.Tensor) else np.asarray(x).view(np.uint8)


@pytest.mark.parametrize("ue8m0", [False, True], ids=["fp32_scales", "ue8m0"])
@pytest.mark.parametrize("shape", [(300, 389), (130, 128), (3, 1000)])
def test_quantizers_are_bit_exact_with_deepseek(shape, ue8m0):
  x = _awkward(shape, seed=shape[0] + ue8m0)
  rows = jax.jit(functools.partial(fp8.quantize_rows, ue8m0=ue8m0))
  blocks = jax.jit(functools.partial(fp8.quantize_blocks, ue8m0=ue8m0))
  checks = {"1x128": (rows(jnp.asarray(x)), torch_act_quant(torch.from_numpy(x), ue8m0)),
            "128x1": (rows(jnp.asarray(x.T)), torch_act_quant(torch.from_numpy(x.T.copy()), ue8m0)),
            "128x128": (blocks(jnp.asarray(x)), torch_weight_quant(torch.from_numpy(x), ue8m0))}
  for name, ((q, s), (want_q, want_s)) in checks.items():
    np.testing.assert_array_equal(np.asarray(s), want_s.numpy(), err_msg=f"{name} scales")
    np.testing.assert_array_equal(_bytes(q), _bytes(want_q), err_msg=f"{name} values")
  if ue8m0:
    s = np.asarray(rows(jnp.asarray(x))[1])
    np.testing.assert_array_equal(np.exp2(np.round(np.log2(s))), s)


def test_ue8m0_rounds_up_just_above_a_power_of_two():
  """amax = 448 * 2^k exactly keeps 2^k; one ulp more needs 2^(k+1) (an fp32 log2 would round it down)."""
  amax = np.float32(448 * 2.0**-3)
  x = np.zeros((2, 128), np.float32)
  x[0, 0], x[1, 0] = amax, np.nextafter(amax, np.float32(1e9))
  _, s = fp8.quantize_rows(jnp.asarray(x), ue8m0=True)
  np.testing.assert_array_equal(np.asarray(s)[:, 0], [2.0**-3, 2.0**-2])
  np.testing.assert_array_equal(np.asarray(s), torch_act_quant(torch.from_numpy(x), ue8m0=True)[1].numpy())


def test_blocks_transpose_exactly_and_dequantize_like_weight_dequant():
  w = _awkward((260, 389), seed=3)
  q, s = fp8.quantize_blocks(jnp.asarray(w))
  q_t, s_t = fp8.quantize_blocks(jnp.asarray(w.T))
  np.testing.assert_array_equal(_bytes(q_t), _bytes(q).T)
  np.testing.assert_array_equal(np.asarray(s_t), np.asarray(s).T)
  scale = torch.from_numpy(np.array(s)).repeat_interleave(128, 0).repeat_interleave(128, 1)[:260, :389]
  want = torch_weight_quant(torch.from_numpy(w))[0].float() * scale
  np.testing.assert_array_equal(np.asarray(fp8.dequantize_blocks(q, s)), want.numpy())


def test_hf_checkpoint_quantizes_with_this_module():
  from dsv3_jax import hf_checkpoint

  w = _awkward((300, 260), seed=4)
  for fmt in (None, "ue8m0"):
    q, s = hf_checkpoint.quantize(w, fmt)
    want_q, want_s = torch_weight_quant(torch.from_numpy(w), fmt == "ue8m0")
    np.testing.assert_array_equal(q.view(np.uint8), _bytes(want_q))
    np.testing.assert_array_equal(s, want_s.numpy())


# ---------------------------------------------------------------------------------------------------
# The GEMM.


def _operands(m, n, k, b_block, seed):
  rng = np.random.default_rng(seed)
  a = rng.standard_normal((m, k)) * np.exp2(rng.integers(-6, 6, (m, 1)))  # rows of different magnitudes
  b = rng.standard_normal((n, k)) * np.exp2(rng.integers(-6, 6, (1, k)))  # and channels
  a_q, a_s = fp8.quantize_rows(jnp.asarray(a, jnp.float32))
  b_q, b_s = (fp8.quantize_blocks if b_block == 128 else fp8.quantize_rows)(jnp.asarray(b, jnp.float32))
  deq_b = fp8.dequantize_blocks(b_q, b_s) if b_block == 128 else fp8.dequantize_rows(b_q, b_s)
  return (a_q, a_s, b_q, b_s), np.asarray(fp8.dequantize_rows(a_q, a_s), np.float64), np.asarray(deq_b, np.float64)


def _assert_matches_dequantized(got, deq_a, deq_b, rtol=1e-6):
  """|got - A_deq B_deq^T| <= rtol * (|A_deq| |B_deq|^T) elementwise: equal up to fp32 summation order."""
  want, bound = deq_a @ deq_b.T, np.abs(deq_a) @ np.abs(deq_b).T
  err = np.abs(np.asarray(got, np.float64) - want)
  assert np.all(err <= rtol * bound), f"max error / bound {np.max(err / np.maximum(bound, 1e-300)):.3g}"


@pytest.mark.parametrize("m,n,k,b_block", [(200, 300, 389, 128), (5, 129, 128, 128), (64, 96, 1000, 1),
                                           (130, 7, 20, 1)])
def test_scaled_matmul_is_the_dequantized_product(m, n, k, b_block):
  args, deq_a, deq_b = _operands(m, n, k, b_block, seed=m + n + k)
  got = jax.jit(functools.partial(fp8.scaled_matmul, b_block=b_block, out_dtype=jnp.float32))(*args)
  assert got.shape == (m, n) and got.dtype == jnp.float32
  _assert_matches_dequantized(got, deq_a, deq_b)
  bf16 = fp8.scaled_matmul(*args, b_block=b_block)
  assert bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(bf16, np.float32), np.asarray(got), rtol=2.0**-8)  # bf16 rounding only


def _tiles(n_slots, n_experts, rows, seed):
  experts_N = jnp.asarray(np.random.default_rng(seed).integers(0, n_experts, n_slots), jnp.int32)
  return moe.tile_layout(experts_N, n_experts, rows=rows)


def test_grouped_gemms_are_per_tile_scaled_matmuls_and_skip_padding():
  e, d, f, rows = 3, 200, 130, 16
  layout = _tiles(40, e, rows, seed=0)
  n_groups, live = layout.tile_expert_G.shape[0], int(layout.n_tiles)
  assert live < n_groups
  rng = np.random.default_rng(1)
  x = rng.standard_normal((n_groups, rows, d)).astype(np.float32)
  x[live:] = np.nan  # padding tiles: never read, so their NaNs cannot reach the output
  dy = rng.standard_normal((n_groups, rows, f)).astype(np.float32)
  dy[live:] = np.nan
  w = rng.standard_normal((e, f, d)).astype(np.float32)
  x_q, x_s = fp8.quantize_rows(jnp.asarray(x))
  w_q, w_s = fp8.quantize_blocks(jnp.asarray(w))
  tiles = (layout.tile_expert_G, layout.n_tiles)
  y = jax.jit(fp8.grouped_scaled_matmul, static_argnames="out_dtype")(x_q, x_s, w_q, w_s, *tiles, out_dtype=jnp.float32)
  xt_q, xt_s = fp8.quantize_rows(jnp.asarray(x.transpose(0, 2, 1)))
  dyt_q, dyt_s = fp8.quantize_rows(jnp.asarray(dy.transpose(0, 2, 1)))
  dw = jax.jit(fp8.grouped_scaled_matmul_wgrad, static_argnums=6)(xt_q, xt_s, dyt_q, dyt_s, *tiles, e)
  assert y.shape == (n_groups, rows, f) and dw.shape == (e, d, f) and dw.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(y[live:]), 0.0)
  want_dw = np.zeros((e, d, f), np.float32)
  gemm = jax.jit(fp8.scaled_matmul, static_argnames=("b_block", "out_dtype"))
  for g in range(live):
    ex = int(layout.tile_expert_G[g])
    tile = gemm(x_q[g], x_s[g], w_q[ex], w_s[ex], out_dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(y[g]), np.asarray(tile), rtol=1e-6, atol=1e-6 * np.abs(tile).max())
    want_dw[ex] += np.asarray(gemm(xt_q[g], xt_s[g], dyt_q[g], dyt_s[g], b_block=1, out_dtype=jnp.float32))
  np.testing.assert_allclose(np.asarray(dw), want_dw, rtol=1e-6, atol=1e-6 * np.abs(want_dw).max())


@pytest.mark.parametrize("call, message", [
    (lambda a, s, b, t: fp8.scaled_matmul(a, s, b[:, :100], t), r"contraction dimension K differs"),
    (lambda a, s, b, t: fp8.scaled_matmul(a, s[:, :1], b, t), r"a_scale has shape \(8, 1\), expected \(8, 2\)"),
    (lambda a, s, b, t: fp8.scaled_matmul(a, s, b, t, b_block=1), r"b_scale has shape \(1, 2\), expected \(9, 2\)"),
    (lambda a, s, b, t: fp8.scaled_matmul(a, s, b, t, b_block=64), r"b_block must be 1 or 128"),
    (lambda a, s, b, t: fp8.scaled_matmul(a.astype(jnp.bfloat16), s, b, t), r"operand a must be float8_e4m3fn"),
    (lambda a, s, b, t: fp8.quantize_rows(jnp.zeros(())), r"quantize_rows: needs at least 1"),
    (lambda a, s, b, t: fp8.quantize_blocks(jnp.zeros((4, 0))), r"quantize_blocks: needs at least 2"),
    (lambda a, s, b, t: fp8.linear(jnp.zeros((2, 5)), jnp.zeros((6, 3))), r"input \(2, 5\) does not match kernel"),
])
def test_bad_operands_are_refused_naming_them(call, message):
  a, s = fp8.quantize_rows(jnp.ones((8, 200)))
  b, t = fp8.quantize_blocks(jnp.ones((9, 200)))
  with pytest.raises((ValueError, TypeError), match=message):
    call(a, s, b, t)


# ---------------------------------------------------------------------------------------------------
# The FP8 Linear: three GEMMs through the custom VJP.


def _rel(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_linear_gemms_are_the_documented_fp8_products():
  """Fprop, Dgrad and Wgrad each equal the dequantized product of the operands the recipe names."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 150, 300)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((300, 200)) * 0.05, jnp.float32)
  dy = jnp.asarray(rng.standard_normal((2, 150, 200)), jnp.float32)
  y, (dx, dw) = _linear_and_grads(x, w, dy)
  x_TI, dy_TO = x.reshape(300, 300), dy.reshape(300, 200)
  deq = lambda q_s: np.asarray(fp8.dequantize_rows(*q_s), np.float64)
  w_q, w_s = fp8.quantize_blocks(w.T)
  deq_w_OI = np.asarray(fp8.dequantize_blocks(w_q, w_s), np.float64)
  _assert_matches_dequantized(y.reshape(300, 200), deq(fp8.quantize_rows(x_TI)), deq_w_OI)  # Fprop
  _assert_matches_dequantized(dx.reshape(300, 300), deq(fp8.quantize_rows(dy_TO)), deq_w_OI.T)  # Dgrad
  _assert_matches_dequantized(dw, deq(fp8.quantize_rows(x_TI.T)), deq(fp8.quantize_rows(dy_TO.T)))  # Wgrad
  assert (y.dtype, dx.dtype, dw.dtype) == (jnp.float32,) * 3


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_linear_gradients_are_close_to_high_precision(dtype):
  """Relative error of each GEMM against the fp32 (HIGHEST) product, as docs/FP8.md reports them."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((256, 384)), dtype)
  w = jnp.asarray(rng.standard_normal((384, 256)) * 0.05, jnp.float32)
  dy = jnp.asarray(rng.standard_normal((256, 256)), dtype)
  exact = lambda x, w: jnp.dot(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST).astype(x.dtype)
  y, (dx, dw) = _value_and_vjp(lambda x, w: fp8.linear(x, w.astype(x.dtype)), x, w, dy)
  want_y, (want_dx, want_dw) = _value_and_vjp(exact, x, w, dy)
  errors = {"fprop": _rel(y, want_y), "dgrad": _rel(dx, want_dx), "wgrad": _rel(dw, want_dw)}
  print(f"\nFP8 linear relative error per GEMM ({dtype} activations): "
        + ", ".join(f"{k} {v:.4f}" for k, v in errors.items()))
  # E4M3 keeps 3 mantissa bits: each operand carries about 2.5% rms relative rounding error on Gaussian data.
  assert all(0.01 < e < 0.05 for e in errors.values()), errors
  assert dx.dtype == x.dtype and dw.dtype == jnp.float32


def _value_and_vjp(fn, x, w, dy):
  y, vjp = jax.vjp(fn, x, w)
  return y, vjp(dy)


_linear_and_grads = jax.jit(functools.partial(_value_and_vjp, fp8.linear))


def test_grouped_linear_gradients_match_the_grouped_matmul():
  e, d, f, rows = 4, 256, 128, 16
  layout = _tiles(90, e, rows, seed=2)
  live_G = (jnp.arange(layout.tile_expert_G.shape[0]) < layout.n_tiles)[:, None, None]
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((live_G.shape[0], rows, d)), jnp.float32) * live_G
  w = jnp.asarray(rng.standard_normal((e, d, f)) * 0.05, jnp.float32)
  dy = jnp.asarray(rng.standard_normal((live_G.shape[0], rows, f)), jnp.float32) * live_G
  run = lambda gmm: jax.jit(lambda x, w: _value_and_vjp(gmm, x, w, dy))(x, w)
  y, (dx, dw) = run(lambda x, w: fp8.grouped_linear(x, w, layout.tile_expert_G, layout.n_tiles))
  want_y, (want_dx, want_dw) = run(lambda x, w: ops.grouped_matmul(x, w, layout.tile_expert_G, layout.n_tiles))
  errors = {"fprop": _rel(y, want_y), "dgrad": _rel(dx, want_dx), "wgrad": _rel(dw, want_dw)}
  print("\nFP8 grouped linear relative error per GEMM: " + ", ".join(f"{k} {v:.4f}" for k, v in errors.items()))
  assert all(0.01 < e < 0.05 for e in errors.values()), errors


# ---------------------------------------------------------------------------------------------------
# Non-finite inputs propagate.


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_inputs_never_give_finite_outputs(bad):
  rng = np.random.default_rng(4)
  x = rng.standard_normal((256, 260)).astype(np.float32)
  w = (rng.standard_normal((260, 140)) * 0.05).astype(np.float32)
  dy = rng.standard_normal((256, 140)).astype(np.float32)
  x_bad, w_bad, dy_bad = x.copy(), w.copy(), dy.copy()
  x_bad[7, 200] = bad  # row 7, second K tile
  w_bad[3, 130] = bad  # first K block of output block 1 (columns 128..139)
  dy_bad[9, 5] = bad
  fwd = _linear_and_grads
  y, (dx, dw) = fwd(x_bad, w, dy)
  assert not np.isfinite(np.asarray(y)[7]).any() and np.isfinite(np.delete(np.asarray(y), 7, 0)).all()
  assert not np.isfinite(np.asarray(dw)[200]).any()  # x's channel 200 over the bad token's 128-token tile
  y, _ = fwd(x, w_bad, dy)
  assert not np.isfinite(np.asarray(y)[:, 128:]).any() and np.isfinite(np.asarray(y)[:, :128]).all()
  _, (dx, dw) = fwd(x, w, dy_bad)
  assert not np.isfinite(np.asarray(dx)[9]).any() and np.isfinite(np.delete(np.asarray(dx), 9, 0)).all()
  assert not np.isfinite(np.asarray(dw)[:, 5]).any()
  q, s = fp8.quantize_rows(jnp.asarray(x_bad))
  assert not np.isfinite(np.asarray(fp8.dequantize_rows(q, s))[7, 128:256]).any()  # the whole tile
  # As DeepSeek's: the tile's scale is inf (inf amax) or NaN, and so are its dequantized values.
  for got, want in ((fp8.quantize_rows(jnp.asarray(x_bad)), torch_act_quant(torch.from_numpy(x_bad))),
                    (fp8.quantize_blocks(jnp.asarray(w_bad)), torch_weight_quant(torch.from_numpy(w_bad)))):
    np.testing.assert_array_equal(np.asarray(got[1]), want[1].numpy())
    np.testing.assert_array_equal(np.isnan(np.asarray(got[0], np.float32)), torch.isnan(want[0].float()).numpy())


# ---------------------------------------------------------------------------------------------------
# The precision policy.


def test_recipe_is_validated_naming_the_key():
  config = tiny_cpu.get_config()
  config.precision.recipe = "fp16"
  with pytest.raises(train.ConfigValueError, match=r"config.precision.recipe = 'fp16': must be one of"):
    train.model_config(config, 257)
  config.precision.recipe, config.precision.impl = "fp8", "cuda"
  with pytest.raises(train.ConfigValueError, match=r"config.precision.impl = 'cuda'"):
    train.model_config(config, 257)
  with pytest.raises(config_lib.ConfigError, match=r"ModelConfig.precision = 'int8': \(run config key "
                                                   r"precision.recipe\) must be one of"):
    config_lib.tiny(precision="int8")
  assert set(config_lib.FP8_IMPLS) == {"auto", *ops.FP8_GEMM_IMPLS}
  assert "precision" not in tiny_cpu.get_config().model  # one place for the recipe: config.precision


def test_fp8_recipe_covers_exactly_the_papers_linears(monkeypatch):
  """Under "fp8": MLA projections, dense MLP, shared and routed experts in FP8; eh_proj, router, head not."""
  cfg = config_lib.tiny(precision="fp8")
  variables = jax.eval_shape(functools.partial(model_lib.init, config_lib.tiny()), jax.random.key(0))
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 16)), jnp.int32)
  seen, grouped = [], []
  monkeypatch.setattr(fp8, "grouped_linear", _recording(fp8.grouped_linear, grouped))

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, layers.Linear) and context.method_name == "__call__":
      seen.append(("/".join(context.module.path[-2:]), context.module.in_fp8))
    return next_fun(*args, **kwargs)

  def loss(params, routing):
    return jnp.mean(model_lib.Transformer(cfg).apply({"params": params, "routing": routing}, tokens).logits)

  with nn.intercept_methods(record):
    jax.eval_shape(jax.grad(loss), variables["params"], variables["routing"])
  quantized = {"wq_a", "wq_b", "wkv_a", "wkv_b", "wo", "w1", "w2", "w3"}
  assert {name.split("/")[-1] for name, fp in seen if fp} == quantized
  assert {name for name, fp in seen if not fp} == {"mtp_0/eh_proj"}
  e, d, f = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim
  assert sorted(set(grouped)) == [(e, f, d), (e, d, f)] and len(grouped) % 3 == 0  # w1, w3 [E, D, F]; w2


def _recording(fn, calls):
  def wrapped(*args, **kwargs):
    calls.append(args[1].shape)
    return fn(*args, **kwargs)

  return wrapped


# ---------------------------------------------------------------------------------------------------
# Expert parallelism: the FP8 routed experts inside shard_map.


def test_fp8_experts_under_expert_parallelism_equal_the_local_dispatch():
  """Values and gradients (tokens, gates, w1, w3, w2) of the EP dispatch equal the local FP8 dispatch.

  With 2 expert shards over 2 token shards each shard's tiles hold the same tokens as the local layout's
  (same tile size, same token order), so even Wgrad's 128x1 token groups agree: equal up to summation order.
  """
  n_tokens, n_experts, top_k, dim, hidden = 64, 4, 2, 128, 128
  rng = np.random.default_rng(6)
  experts_WK = jnp.asarray(np.stack([rng.permutation(n_experts)[:top_k] for _ in range(n_tokens)]), jnp.int32)
  gates_WK = jnp.asarray(rng.uniform(0.1, 1.0, (n_tokens, top_k)), jnp.float32)
  ws = [jnp.asarray(rng.standard_normal(s) / math.sqrt(s[1]), jnp.float32)
        for s in ((n_experts, dim, hidden), (n_experts, dim, hidden), (n_experts, hidden, dim))]
  x_WD, cot_WD = (jnp.asarray(rng.standard_normal((n_tokens, dim)), jnp.float32) for _ in range(2))

  def run(dispatch):
    fn = lambda x, gates, *w: dispatch(x, moe.Routing(gates, experts_WK, None), *w, impl=moe.FP8 + "xla")
    y, vjp = jax.vjp(fn, x_WD, gates_WK, *ws)
    return y, vjp(cot_WD)

  want_y, want_grads = jax.jit(lambda: run(moe.local_dispatch))()
  mesh = Mesh(np.array(jax.devices()[:2]).reshape(1, 1, 1, 2, 1), sharding.MESH_AXES)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    y, grads = jax.jit(lambda: run(functools.partial(expert_parallel.dispatch, exchange="dense")))()
  for name, got, want in zip(("y", "x", "gates", "w1", "w3", "w2"), (y, *grads), (want_y, *want_grads), strict=True):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * np.abs(want).max(),
                               err_msg=name)
