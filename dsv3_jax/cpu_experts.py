"""The routed experts' SwiGLU on the CPU as one native call per pass: XLA FFI handlers over BLAS sgemm.

XLA's CPU runtime runs the `ops.grouped_swiglu` tile loop at about a third of a core's matmul rate: every
32-row tile slices its expert's three matrices out of the stack, runs small dots, and adds into the [E, D, F]
weight gradients, each a separate op (docs/BENCHMARKS.md). `csrc/grouped_swiglu.cc` does the same work as two
custom calls, forward and backward, on the same tile layout: one sgemm per run of an expert's consecutive tiles
(all its rows at once), the SwiGLU's elementwise work in between, transposed operands read in place and the
weight gradients accumulated straight into [E, ...]. Same semantics as the tile loop: tiles g < n_tiles compute,
the rest give zeros; float32 only.

The library is compiled on first use with the system C++ compiler (`$CXX`, else g++) against JAX's FFI headers,
for this machine's CPU (-march=native), and cached under `$DSV3_JAX_CACHE` (default ~/.cache/dsv3_jax), keyed by
the source, the flags, the compiler, jaxlib's version and the CPU. sgemm comes from the OpenBLAS that numpy's
wheel bundles (scipy-openblas, already loaded by numpy), or from `$DSV3_JAX_BLAS`: a shared library exporting
`cblas_sgemm` with 32-bit integers (or the ILP64 names `cblas_sgemm64_`, `scipy_cblas_sgemm64_`).

`available()` says whether all of that worked and `unavailable_reason()` why not; `ops.grouped_swiglu` with
impl="auto" uses these kernels when lowering for the CPU with float32 operands and they are available, and the
XLA tile loop otherwise.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dsv3_jax import host
from dsv3_jax import ops  # ops imports this module back; each only calls the other at run time

SOURCE = pathlib.Path(__file__).with_name("csrc") / "grouped_swiglu.cc"
FORWARD_TARGET = "dsv3_grouped_swiglu_forward"
FORWARD_SAVING_TARGET = "dsv3_grouped_swiglu_forward_saving"
BACKWARD_TARGET = "dsv3_grouped_swiglu_backward"
# -fno-trapping-math (no FP exception traps; results unchanged) lets the SwiGLU loops vectorize.
_FLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-std=c++17", "-shared", "-fPIC", "-w")
# (symbol, 64-bit integers) in the order they are looked for.
_SGEMM_SYMBOLS = (("scipy_cblas_sgemm64_", True), ("cblas_sgemm64_", True), ("scipy_cblas_sgemm", False),
                  ("cblas_sgemm", False))
_THREADS_SYMBOLS = ("openblas_set_num_threads_local", "scipy_openblas_set_num_threads_local64_")


_LOADED: list[ctypes.CDLL] = []  # the BLAS and handler libraries once loaded, kept for the process's life


class Unavailable(RuntimeError):
  """The native kernels cannot run here; the message says why."""


def cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("DSV3_JAX_CACHE") or pathlib.Path.home() / ".cache" / "dsv3_jax")


def _cpu_signature() -> str:
  try:
    info = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
  except OSError:
    return platform.processor()
  return "\n".join(sorted({line for line in info if line.startswith(("model name", "flags"))}))


def _compiler() -> str:
  cxx = os.environ.get("CXX") or "g++"
  path = shutil.which(cxx)
  if path is None:
    raise Unavailable(f"no C++ compiler: {cxx!r} is not on PATH (set $CXX)")
  return path


def build() -> pathlib.Path:
  """The compiled handler library, built into the cache if it is not there yet (atomic: no half-written file)."""
  cxx = _compiler()
  version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
  key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(_FLAGS), version, jax.__version__,
                                  _cpu_signature()]).encode()).hexdigest()[:20]
  target = cache_dir() / "native" / key / "grouped_swiglu.so"
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    built = pathlib.Path(tmp) / target.name
    cmd = [cxx, *_FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", str(built)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
      raise Unavailable(f"compiling {SOURCE} failed ({' '.join(cmd)}):\n{result.stderr[-2000:]}")
    os.replace(built, target)
  return target


def _blas_candidates() -> list[pathlib.Path]:
  override = os.environ.get("DSV3_JAX_BLAS")
  if override:
    return [pathlib.Path(override)]
  bundled = pathlib.Path(np.__file__).resolve().parent.parent / "numpy.libs"
  return sorted(bundled.glob("*openblas*.so*"))


def _blas() -> tuple[ctypes.CDLL, int, bool, int]:
  """(library, sgemm address, ILP64, address of the per-thread thread-count setter or 0)."""
  candidates = _blas_candidates()
  if not candidates:
    raise Unavailable("no BLAS library: numpy's wheel bundles none here (numpy.libs/*openblas*); set $DSV3_JAX_BLAS")
  for path in candidates:
    try:
      lib = ctypes.CDLL(str(path))
    except OSError as e:
      raise Unavailable(f"cannot load BLAS library {path}: {e}") from e
    for symbol, ilp64 in _SGEMM_SYMBOLS:
      if hasattr(lib, symbol):
        threads = next((getattr(lib, s) for s in _THREADS_SYMBOLS if hasattr(lib, s)), None)
        address = lambda f: ctypes.cast(f, ctypes.c_void_p).value or 0
        return lib, address(getattr(lib, symbol)), ilp64, address(threads) if threads is not None else 0
  raise Unavailable(f"no cblas sgemm ({', '.join(s for s, _ in _SGEMM_SYMBOLS)}) in {[str(p) for p in candidates]}")


@functools.cache
def _load() -> str | None:
  """Builds, loads and registers the handlers once per process; None when ready, else the reason they are not."""
  try:
    blas_lib, sgemm, ilp64, threads = _blas()
    lib = ctypes.CDLL(str(build()))
  except Unavailable as e:
    return str(e)
  lib.dsv3_set_blas(ctypes.c_void_p(sgemm), ctypes.c_int(int(ilp64)), ctypes.c_void_p(threads))
  _LOADED.extend((blas_lib, lib))  # the libraries must outlive every compiled call into them
  jax.ffi.register_ffi_target(FORWARD_TARGET, jax.ffi.pycapsule(lib.GroupedSwigluForward), platform="cpu")
  jax.ffi.register_ffi_target(FORWARD_SAVING_TARGET, jax.ffi.pycapsule(lib.GroupedSwigluForwardSaving),
                              platform="cpu")
  jax.ffi.register_ffi_target(BACKWARD_TARGET, jax.ffi.pycapsule(lib.GroupedSwigluBackward), platform="cpu")
  return None


def unavailable_reason() -> str | None:
  """Why the native kernels cannot run in this process, or None when they can."""
  return _load()


def available() -> bool:
  return _load() is None


def supports(*operands: jax.Array) -> bool:
  """Whether these operands (x and the three weight stacks) can take the native path; logs once why not when the
  kernels cannot be built or loaded here."""
  if not all(jnp.dtype(a.dtype) == jnp.float32 for a in operands):
    return False
  if not available():
    _warn_unavailable()
    return False
  return True


@functools.cache
def _warn_unavailable() -> None:
  logging.warning("the native CPU routed-expert kernels are not available, so the XLA tile loop runs instead "
                  "(slower): %s", unavailable_reason())


def _threads() -> int:
  """Threads per call (each running whole experts with one BLAS thread): this process's cores over its CPU devices."""
  return max(1, host.cores() // max(1, len(jax.local_devices(backend="cpu"))))


def _call(target: str, results, *operands):
  """The FFI call with every operand and result typed as varying over the same manual mesh axes (shard_map)."""
  operands = [ops.varying_as(a, *operands) for a in operands]
  typed = jax.typeof(operands[0])
  if typed.manual_axis_type.empty:
    shapes = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in results]
  else:
    sharding = jax.sharding.NamedSharding(typed.sharding.mesh, jax.P())
    shapes = [jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding, manual_axis_type=typed.manual_axis_type)
              for shape in results]
  return jax.ffi.ffi_call(target, shapes, vmap_method="sequential")(*operands, threads=np.int64(_threads()))


def _ints(tile_expert_G, n_tiles, live_rows_G):
  return tile_expert_G.astype(jnp.int32), jnp.asarray(n_tiles, jnp.int32), live_rows_G.astype(jnp.int32)


@jax.custom_vjp
def grouped_swiglu(x_GMD: jax.Array, w1_EDF: jax.Array, w3_EDF: jax.Array, w2_EFD: jax.Array,
                   tile_expert_G: jax.Array, n_tiles: jax.Array, live_rows_G: jax.Array) -> jax.Array:
  """y[g] = (silu(x[g] @ w1[e]) * (x[g] @ w3[e])) @ w2[e] with e = tile_expert[g], for g < n_tiles; else zeros.

  live_rows_G: the live rows at the start of each tile; the rest are padding, whose inputs must be zeros (as
  `moe.tile_layout` places them): they are skipped and give zeros, what the tile loop computes from them.
  """
  reason = unavailable_reason()
  if reason is not None:
    raise Unavailable(reason)
  (y_GMD,) = _call(FORWARD_TARGET, [x_GMD.shape], x_GMD, w1_EDF, w3_EDF, w2_EFD,
                   *_ints(tile_expert_G, n_tiles, live_rows_G))
  return y_GMD


def _forward(x_GMD, w1_EDF, w3_EDF, w2_EFD, tile_expert_G, n_tiles, live_rows_G):
  """The forward keeps x @ w1 and x @ w3 ([G, M, F] each) so that the backward does not recompute them."""
  reason = unavailable_reason()
  if reason is not None:
    raise Unavailable(reason)
  ints = _ints(tile_expert_G, n_tiles, live_rows_G)
  hidden_GMF = (*x_GMD.shape[:2], w1_EDF.shape[2])
  y_GMD, a1_GMF, a3_GMF = _call(FORWARD_SAVING_TARGET, [x_GMD.shape, hidden_GMF, hidden_GMF], x_GMD, w1_EDF,
                                w3_EDF, w2_EFD, *ints)
  return y_GMD, (x_GMD, w1_EDF, w3_EDF, w2_EFD, ints, a1_GMF, a3_GMF)


def _backward(res, dy_GMD):
  x_GMD, w1_EDF, w3_EDF, w2_EFD, ints, a1_GMF, a3_GMF = res
  dx, dw1, dw3, dw2 = _call(BACKWARD_TARGET, [x_GMD.shape, w1_EDF.shape, w3_EDF.shape, w2_EFD.shape], x_GMD, w1_EDF,
                            w3_EDF, w2_EFD, *ints, a1_GMF, a3_GMF, dy_GMD)
  return (ops.summed_to(dx, x_GMD), ops.summed_to(dw1, w1_EDF), ops.summed_to(dw3, w3_EDF),
          ops.summed_to(dw2, w2_EFD), None, None, None)


grouped_swiglu.defvjp(_forward, _backward)
