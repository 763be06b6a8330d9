"""The native CPU routed-expert SwiGLU (dsv3_jax/cpu_experts.py): parity with the XLA tile loop, the choice "auto"
makes, the kernel's checks of its inputs; and the native library's build (dsv3_jax/native.py) and what happens
where it cannot be built."""

import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import moe
from dsv3_jax import native
from dsv3_jax import ops

DIM, HIDDEN = 24, 40
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _weights(n_experts: int, seed: int, dtype=jnp.float32, dim: int = DIM, hidden: int = HIDDEN):
  k1, k3, k2 = jax.random.split(jax.random.key(seed), 3)
  return (
      (jax.random.normal(k1, (n_experts, dim, hidden)) / math.sqrt(dim)).astype(dtype),
      (jax.random.normal(k3, (n_experts, dim, hidden)) / math.sqrt(dim)).astype(dtype),
      (jax.random.normal(k2, (n_experts, hidden, dim)) / math.sqrt(hidden)).astype(dtype),
  )


def _tiles(experts_N: np.ndarray, n_experts: int, seed: int = 0, rows: int | None = None, dim: int = DIM):
  """(layout, live rows per tile, x [G, M, D] with zero padding rows, cotangent [G, M, D]) for these slots."""
  layout = moe.tile_layout(jnp.asarray(experts_N, jnp.int32), n_experts, rows)
  n_slots = experts_N.shape[0]
  live_R = np.asarray(layout.slot_of_row_R) < n_slots
  n_groups = layout.tile_expert_G.shape[0]
  live_rows_G = jnp.asarray(live_R.reshape(n_groups, layout.rows).sum(1), jnp.int32)
  x_RD = np.where(live_R[:, None], np.random.default_rng(seed).standard_normal((live_R.size, dim)), 0)
  dy_RD = np.random.default_rng(seed + 1).standard_normal((live_R.size, dim))
  shape = (n_groups, layout.rows, dim)
  return layout, live_rows_G, jnp.asarray(x_RD.reshape(shape), jnp.float32), jnp.asarray(dy_RD.reshape(shape),
                                                                                         jnp.float32)


def _value_and_grads(impl, layout, live_rows_G, x_GMD, dy_GMD, ws):
  fn = lambda x, *w: ops.grouped_swiglu(x, *w, layout.tile_expert_G, layout.n_tiles, live_rows_G, impl=impl)

  def run(x, *w):
    y, vjp = jax.vjp(fn, x, *w)
    return y, vjp(dy_GMD)

  return jax.jit(run)(x_GMD, *ws)


# (slots, experts, tile rows or None for ops.tile_rows, dim, hidden): several tiles per expert, many experts with a
# few rows each (and some with none), one expert, tiles of 8 rows with mostly partial last tiles; then products past
# the small-GEMM limit that dsv3::Gemm splits (about 150 and 600 rows per expert: column blocks with a short last
# one, then row blocks too) at dims that are not multiples of 8 (the weight transposes' scalar edges).
CASES = [(256, 8, None, DIM, HIDDEN), (90, 64, None, DIM, HIDDEN), (50, 1, None, DIM, HIDDEN),
         (200, 16, 8, DIM, HIDDEN), (300, 2, None, 203, 130), (1200, 2, None, 203, 21)]


@pytest.mark.parametrize("n_slots,n_experts,rows,dim,hidden", CASES)
def test_native_matches_the_tile_loop(n_slots, n_experts, rows, dim, hidden):
  """Outputs and all four gradients equal the XLA tile loop's to fp32 summation order."""
  experts_N = np.random.default_rng(n_slots).integers(0, n_experts, n_slots)
  layout, live_rows_G, x_GMD, dy_GMD = _tiles(experts_N, n_experts, seed=n_experts, rows=rows, dim=dim)
  ws = _weights(n_experts, seed=n_slots, dim=dim, hidden=hidden)
  y, grads = _value_and_grads("native", layout, live_rows_G, x_GMD, dy_GMD, ws)
  want_y, want_grads = _value_and_grads("xla", layout, live_rows_G, x_GMD, dy_GMD, ws)
  for name, got, want in zip(("y", "x", "w1", "w3", "w2"), (y, *grads), (want_y, *want_grads), strict=True):
    got, want = np.asarray(got), np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=name)
  # Experts that no slot chose get exactly zero weight gradients.
  unrouted = np.setdiff1d(np.arange(n_experts), experts_N)
  for g in grads[1:]:
    np.testing.assert_array_equal(np.asarray(g)[unrouted], 0)


def test_native_skips_padding_rows_and_tiles():
  """Rows past a tile's live count and tiles past n_tiles are never read: NaN there stays out of every result."""
  experts_N = np.random.default_rng(3).integers(0, 8, 100)
  layout, live_rows_G, x_GMD, dy_GMD = _tiles(experts_N, 8)
  live_GM = np.arange(layout.rows)[None, :] < np.asarray(live_rows_G)[:, None]
  x_nan = jnp.where(live_GM[:, :, None], x_GMD, jnp.nan)
  dy_nan = jnp.where(live_GM[:, :, None], dy_GMD, jnp.nan)
  ws = _weights(8, seed=4)
  y, grads = _value_and_grads("native", layout, live_rows_G, x_nan, dy_nan, ws)
  want_y, want_grads = _value_and_grads("xla", layout, live_rows_G, x_GMD, dy_GMD, ws)
  for got, want in zip((y, *grads), (want_y, *want_grads), strict=True):
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(np.asarray(want)).max())
  np.testing.assert_array_equal(np.asarray(y)[~live_GM], 0)
  np.testing.assert_array_equal(np.asarray(grads[0])[~live_GM], 0)


def _primitives(fn, *args) -> set[str]:
  names = set()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      names.add(eqn.primitive.name)
      for param in eqn.params.values():
        for sub in param if isinstance(param, tuple | list) else (param,):
          inner = getattr(sub, "jaxpr", sub)
          if isinstance(inner, jax.extend.core.Jaxpr):
            walk(inner)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return names


def test_auto_calls_native_for_float32_and_the_tile_loop_otherwise():
  """impl="auto" stages the native call (for the CPU) with float32 operands and the tile loop alone for bfloat16."""
  assert native.available(), native.unavailable_reason()
  layout, live_rows_G, x_GMD, _ = _tiles(np.arange(64) % 8, 8)
  fn = lambda x, *w: ops.grouped_swiglu(x, *w, layout.tile_expert_G, layout.n_tiles, live_rows_G, impl="auto")
  assert "ffi_call" in _primitives(jax.grad(lambda *a: fn(*a).sum(), argnums=(0, 1)), x_GMD, *_weights(8, 0))
  bf16 = _primitives(fn, x_GMD.astype(jnp.bfloat16), *_weights(8, 0, jnp.bfloat16))
  assert "ffi_call" not in bf16 and "scan" in bf16


def test_native_refuses_other_dtypes_and_unknown_impls():
  layout, _, x_GMD, _ = _tiles(np.arange(64) % 8, 8)
  with pytest.raises(ValueError, match="float32 only.*bfloat16"):
    ops.grouped_swiglu(x_GMD.astype(jnp.bfloat16), *_weights(8, 0, jnp.bfloat16), layout.tile_expert_G,
                       layout.n_tiles, impl="native")
  with pytest.raises(ValueError, match="'blas' is not one of"):
    ops.grouped_swiglu(x_GMD, *_weights(8, 0), layout.tile_expert_G, layout.n_tiles, impl="blas")


@pytest.mark.parametrize("tile_expert,n_tiles,live_rows,message", [
    ([0, 1, 9, 9], 3, [32] * 4, "tile 2 names expert 9 of 8"),
    ([0, 2, 1, 3], 4, [32] * 4, "tile_expert decreases at tile 2"),
    ([0, 1, 2, 3], 5, [32] * 4, "n_tiles 5 outside"),
    ([0, 1, 2, 3], 4, [32, 33, 32, 32], "tile 1 has 33 live rows of 32"),
])
def test_kernel_names_a_bad_layout(tile_expert, n_tiles, live_rows, message):
  """The kernel checks the layout it is handed and says what is wrong instead of reading out of bounds."""
  x_GMD = jnp.ones((4, 32, DIM))
  call = jax.jit(lambda x, te, n, lr: ops.grouped_swiglu(x, *_weights(8, 0), te, n, lr, impl="native"))
  with pytest.raises(Exception, match=message):
    jax.block_until_ready(call(x_GMD, jnp.asarray(tile_expert, jnp.int32), jnp.int32(n_tiles),
                               jnp.asarray(live_rows, jnp.int32)))


def test_build_into_an_empty_cache_then_reuse(tmp_path, monkeypatch):
  """A first build compiles into the cache (nothing else left there); the next call finds it without compiling."""
  monkeypatch.setenv("DSV3_JAX_CACHE", str(tmp_path))
  built = native.build()
  assert built.is_file() and built.is_relative_to(tmp_path)
  assert [p for p in tmp_path.rglob("*") if p.is_file()] == [built]
  stat = built.stat()
  again = native.build()
  assert again == built and (again.stat().st_ino, again.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)


def test_build_failure_names_the_command_and_leaves_no_library(tmp_path, monkeypatch):
  monkeypatch.setenv("DSV3_JAX_CACHE", str(tmp_path))
  monkeypatch.setenv("CXX", "false")  # a "compiler" that exits 1
  with pytest.raises(native.Unavailable, match="compiling .*csrc failed"):
    native.build()
  assert not list(tmp_path.rglob("*.so"))
  monkeypatch.setenv("CXX", "no-such-compiler-here")
  with pytest.raises(native.Unavailable, match="'no-such-compiler-here' is not on PATH"):
    native.build()


def test_without_a_compiler_auto_falls_back_and_native_says_why(tmp_path):
  """In a process that cannot build the kernels, "auto" runs the tile loop with the same results, "native" fails
  with the reason, and the model's gradients are computed."""
  script = """
import jax, jax.numpy as jnp, numpy as np
from dsv3_jax import config, model, moe, native, ops
assert not native.available()
print("reason:", native.unavailable_reason())
layout = moe.tile_layout(jnp.arange(64, dtype=jnp.int32) % 8, 8)
x = jax.random.normal(jax.random.key(0), (layout.tile_expert_G.shape[0], layout.rows, 16))
ws = [jax.random.normal(jax.random.key(i), s) for i, s in enumerate([(8, 16, 8), (8, 16, 8), (8, 8, 16)])]
run = lambda impl: ops.grouped_swiglu(x, *ws, layout.tile_expert_G, layout.n_tiles, impl=impl)
np.testing.assert_array_equal(run("auto"), run("xla"))
try:
  run("native")
except native.Unavailable as e:
  print("native:", e)
cfg = config.tiny()
variables = model.init(cfg, jax.random.key(0))
tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16)), jnp.int32)
loss = lambda params: model.Transformer(cfg).apply({**variables, "params": params}, tokens).logits.mean()
grads = jax.grad(loss)(variables["params"])
assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
print("ok")
"""
  env = {**os.environ, "CXX": "no-such-compiler-here", "DSV3_JAX_CACHE": str(tmp_path), "XLA_FLAGS": ""}
  result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "reason: no C++ compiler: 'no-such-compiler-here' is not on PATH" in result.stdout
  assert "native: no C++ compiler" in result.stdout and result.stdout.rstrip().endswith("ok")
