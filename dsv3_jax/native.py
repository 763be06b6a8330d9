"""The native CPU kernels (`csrc/`): built on first use, loaded, registered with XLA's FFI, and called.

`csrc/` holds XLA FFI handlers over BLAS sgemm for what XLA's CPU runtime runs far below a core's matmul rate:
the routed experts' SwiGLU (`cpu_experts.py`) and causal attention (`cpu_attention.py`); and AdamW's update in one
pass per parameter (`optimizer.py`), where XLA makes four. Every `.cc` file there is
compiled into one library on first use with the system C++ compiler (`$CXX`, else g++) against JAX's FFI headers,
for this machine's CPU (-march=native), and cached under `$DSV3_JAX_CACHE` (default ~/.cache/dsv3_jax), keyed by
the sources, the flags, the compiler, jax's version and the CPU; the build is atomic (a temporary directory, then
a rename), so a failed or interrupted one leaves nothing behind. sgemm comes from the OpenBLAS that numpy's wheel
bundles (scipy-openblas, already loaded by numpy), or from `$DSV3_JAX_BLAS`: a shared library exporting
`cblas_sgemm` with 32-bit integers (or the ILP64 names `cblas_sgemm64_`, `scipy_cblas_sgemm64_`).

`available()` says whether all of that worked and `unavailable_reason()` why not. The kernels' "auto" choices use
them when lowering for the CPU with float32 operands and they are available, and XLA otherwise, logging the
reason once (`supports`).
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
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dsv3_jax import host
from dsv3_jax import ops

SOURCE_DIR = pathlib.Path(__file__).with_name("csrc")
LIBRARY = "dsv3_native.so"
# FFI target name -> the handler symbol the library exports.
TARGETS = {
    "dsv3_grouped_swiglu_forward": "GroupedSwigluForward",
    "dsv3_grouped_swiglu_forward_saving": "GroupedSwigluForwardSaving",
    "dsv3_grouped_swiglu_backward": "GroupedSwigluBackward",
    "dsv3_causal_attention_forward": "CausalAttentionForward",
    "dsv3_causal_attention_backward": "CausalAttentionBackward",
    "dsv3_adamw_update": "AdamWUpdate",
}
# -fno-trapping-math (no FP exception traps) and -fno-math-errno (sqrt never sets errno) let the elementwise loops
# vectorize with results unchanged (AdamW's one pass: 12.9 -> 1.8 ms for 3.1M elements on one core); -fopenmp-simd
# honours the `omp simd` reductions (no OpenMP runtime).
_FLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-fopenmp-simd", "-std=c++17", "-shared",
          "-fPIC", "-w")
# (symbol, 64-bit integers) in the order they are looked for.
_SGEMM_SYMBOLS = (("scipy_cblas_sgemm64_", True), ("cblas_sgemm64_", True), ("scipy_cblas_sgemm", False),
                  ("cblas_sgemm", False))
_THREADS_SYMBOLS = ("openblas_set_num_threads_local", "scipy_openblas_set_num_threads_local64_")

_LOADED: list[ctypes.CDLL] = []  # the BLAS and handler libraries once loaded, kept for the process's life


class Unavailable(RuntimeError):
  """The native kernels cannot run here; the message says why."""


def cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("DSV3_JAX_CACHE") or pathlib.Path.home() / ".cache" / "dsv3_jax")


def sources() -> list[pathlib.Path]:
  """The library's translation units (the headers they include are hashed with them)."""
  return sorted(SOURCE_DIR.glob("*.cc"))


def _cpu_signature() -> str:
  try:
    info = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
  except OSError:
    return platform.processor()
  return "\n".join(sorted({line for line in info if line.startswith(("model name", "flags"))}))


def compiler() -> str:
  """The C++ compiler driver the native code is built with (`$CXX`, else g++ on PATH)."""
  cxx = os.environ.get("CXX") or "g++"
  path = shutil.which(cxx)
  if path is None:
    raise Unavailable(f"no C++ compiler: {cxx!r} is not on PATH (set $CXX)")
  return path


def compile_cached(name: str, library: str, flags: Sequence[str], inputs: Sequence[pathlib.Path],
                   key_texts: Sequence[str] = (), include_dir: str | None = None) -> pathlib.Path:
  """`inputs` compiled by `compiler()` with `flags` into cache_dir()/name/<key>/library, unless it is there.

  The key hashes the texts of the inputs and `key_texts` (the headers, whatever else the build depends on)
  with the flags and the compiler's version, not the paths, so every checkout shares one build. Atomic: the
  output is built in a temporary directory and renamed, so a failed or interrupted build leaves nothing behind;
  a failure raises Unavailable with the compiler's error.
  """
  cxx = compiler()
  version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
  texts = [p.read_text() for p in inputs]
  key = hashlib.sha256("\0".join([*texts, *key_texts, " ".join(flags), version]).encode()).hexdigest()[:20]
  target = cache_dir() / name / key / library
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    built = pathlib.Path(tmp) / library
    cmd = [cxx, *flags, *(["-I", include_dir] if include_dir else []), *map(str, inputs), "-o", str(built)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
      where = inputs[0].parent if len(inputs) > 1 else inputs[0]
      raise Unavailable(f"compiling {where} failed ({' '.join(cmd)}):\n{result.stderr[-2000:]}")
    os.replace(built, target)
  return target


def build() -> pathlib.Path:
  """The compiled handler library, built into the cache if it is not there yet (`compile_cached`)."""
  headers = [p.read_text() for p in sorted(SOURCE_DIR.glob("*.h"))]
  return compile_cached("native", LIBRARY, _FLAGS, sources(), [*headers, jax.__version__, _cpu_signature()],
                        include_dir=jax.ffi.include_dir())


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


def gemm_batch(a: np.ndarray, b: np.ndarray, c: np.ndarray, trans_a: bool, trans_b: bool) -> None:
  """c[i] = op(a[i]) @ op(b[i]) through the kernels' own GEMM (`dsv3::Gemm`, csrc/native.h: OpenBLAS with products
  blocked under its small-matrix limit), on operands as stored: C-contiguous float32, a [count, k, m] if trans_a
  else [count, m, k], b [count, n, k] if trans_b else [count, k, n], c [count, m, n]. Raises `Unavailable` without
  the kernels, ValueError on operands that do not fit."""
  require()
  count, m, n = c.shape
  k = a.shape[1] if trans_a else a.shape[2]
  want_a = (count, k, m) if trans_a else (count, m, k)
  want_b = (count, n, k) if trans_b else (count, k, n)
  for name, x, want in (("a", a, want_a), ("b", b, want_b), ("c", c, c.shape)):
    if x.dtype != np.float32 or not x.flags.c_contiguous or x.shape != want:
      raise ValueError(f"gemm_batch: {name} must be C-contiguous float32 {want}, got {x.dtype} {x.shape}")
  pointer = lambda x: ctypes.c_void_p(x.ctypes.data)
  _LOADED[-1].dsv3_gemm_batch(ctypes.c_int(trans_a), ctypes.c_int(trans_b), ctypes.c_int64(m), ctypes.c_int64(n),
                              ctypes.c_int64(k), pointer(a), pointer(b), pointer(c), ctypes.c_int64(count))


def one_blas_thread_here() -> bool:
  """Runs this thread's calls into the BLAS that `_blas` finds on one core (OpenBLAS's per-thread setting).

  False where there is no such library or it has no per-thread setter. It is numpy's own BLAS unless
  $DSV3_JAX_BLAS names another.
  """
  try:
    _, _, _, setter = _blas()
  except Unavailable:
    return False
  if not setter:
    return False
  ctypes.CFUNCTYPE(None, ctypes.c_int)(setter)(1)
  return True


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
  for target, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  return None


def unavailable_reason() -> str | None:
  """Why the native kernels cannot run in this process, or None when they can."""
  return _load()


def available() -> bool:
  return _load() is None


def require() -> None:
  """Raises `Unavailable` with the reason when the kernels cannot run here."""
  reason = unavailable_reason()
  if reason is not None:
    raise Unavailable(reason)


def check_float32(what: str, **operands: jax.Array) -> None:
  """Raises ValueError naming `what` and the operands' dtypes unless all are float32 (an impl "native" asked for)."""
  if not all(jnp.dtype(a.dtype) == jnp.float32 for a in operands.values()):
    raise ValueError(f"{what} 'native' is float32 only; got {', '.join(str(a.dtype) for a in operands.values())} "
                     f"for {', '.join(operands)} (use 'auto' or 'xla')")


def supports(what: str, *operands: jax.Array) -> bool:
  """Whether these operands can take a native kernel: float32, and the kernels available here (else it logs once
  why not, naming `what` falls back to XLA)."""
  if not all(jnp.dtype(a.dtype) == jnp.float32 for a in operands):
    return False
  if not available():
    _warn_unavailable(what)
    return False
  return True


@functools.cache
def _warn_unavailable(what: str) -> None:
  logging.warning("the native CPU kernels are not available, so %s runs in XLA instead (slower): %s", what,
                  unavailable_reason())


def threads() -> int:
  """Threads per call (each task with one BLAS thread): this process's cores over its CPU devices."""
  return max(1, host.cores() // max(1, len(jax.local_devices(backend="cpu"))))


def call(target: str, results: Sequence[tuple[int, ...]], *operands: jax.Array,
         aliases: dict[int, int] | None = None, **attrs) -> list[jax.Array]:
  """The FFI call (float32 results of these shapes; `aliases`: operand index -> the result that reuses its buffer;
  `attrs`: float attributes), every operand and result typed as varying over the same manual mesh axes (inside
  `shard_map`)."""
  operands = [ops.varying_as(a, *operands) for a in operands]
  typed = jax.typeof(operands[0])
  if typed.manual_axis_type.empty:
    shapes = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in results]
  else:
    sharding = jax.sharding.NamedSharding(typed.sharding.mesh, jax.P())
    shapes = [jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding, manual_axis_type=typed.manual_axis_type)
              for shape in results]
  attrs = {k: np.float32(v) for k, v in attrs.items()}
  return jax.ffi.ffi_call(target, shapes, vmap_method="sequential", input_output_aliases=aliases)(
      *operands, threads=np.int64(threads()), **attrs)
