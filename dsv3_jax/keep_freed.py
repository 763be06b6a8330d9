"""Large freed blocks kept mapped for the next allocation of their size (`csrc_preload/keep_freed.c`).

XLA's CPU runtime allocates each step's scratch anew and frees it at the end of the step: one block per device,
166 MiB for the small model's step on each of two devices. glibc maps a block that large afresh every time (a
worker thread's arena cannot hold it) and hands mid-sized ones back to the kernel, which then zeroes their pages
again on first touch: about 950 page faults and 33-46 ms of kernel time per step of the small model on 2 cores,
on the path of the ops that first write the memory. `keep_freed.c` is a small allocator for blocks of 4 MiB and
more that keeps a freed block mapped and hands it to the next request it fits; everything else stays glibc's.
It replaces malloc, so it must be preloaded when the process starts (LD_PRELOAD); `make run` and `make bench` do:

  LD_PRELOAD="$(python -m dsv3_jax.keep_freed)" python -m experiments.train ...

`python -m dsv3_jax.keep_freed` builds the library on first use (with the C++ compiler of the native kernels,
`native.py`, into the same cache) and prints its path, or prints nothing and says why on stderr, so that the
command then runs without it. `active()` says whether this process has it, `stats()` what it holds.
DSV3_KEEP_FREED_MB (default 2048) caps the freed bytes it keeps.

glibc's own settings do it only at a cost: `GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0` (one arena,
so the scratch comes from the main heap) with a large trim threshold stops the faults too, but every thread then
takes that arena's lock (compiling 20-55% slower, the tests about 20%) and the heap fragments (peak RSS 1.2-1.9x);
docs/BENCHMARKS.md has the figures.
"""

from __future__ import annotations

import ctypes
import pathlib
import sys

from dsv3_jax import native

SOURCE = pathlib.Path(__file__).with_name("csrc_preload") / "keep_freed.c"
LIBRARY = "keep_freed.so"
_FLAGS = ("-x", "c", "-O2", "-shared", "-fPIC", "-w")  # C, by the native kernels' compiler driver
_STATS_SYMBOL = "dsv3_keep_freed_stats"
_STATS_FIELDS = ("blocks_mapped", "blocks_in_use", "cached_bytes", "reuses", "mappings")


def build() -> pathlib.Path:
  """The library, compiled into the cache if it is not there yet (`native.compile_cached`)."""
  return native.compile_cached("keep_freed", LIBRARY, _FLAGS, [SOURCE])


def _stats_function():
  return getattr(ctypes.CDLL(None), _STATS_SYMBOL, None)


def active() -> bool:
  """Whether this process was started with the library preloaded."""
  return _stats_function() is not None


def stats() -> dict[str, int] | None:
  """What the library holds now (None without it): blocks mapped and in use, bytes cached, reuses, mappings made."""
  fn = _stats_function()
  if fn is None:
    return None
  out = (ctypes.c_uint64 * len(_STATS_FIELDS))()
  fn(out)
  return dict(zip(_STATS_FIELDS, (int(v) for v in out), strict=True))


def main() -> int:
  try:
    print(build())
  except (native.Unavailable, OSError) as e:
    print(f"dsv3_jax.keep_freed: not built, running without it: {e}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
