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

A training or benchmark entry point started without it (`python -m experiments.train ...`) gets it anyway:
`restart_with_fast_malloc()`, called first thing in their `__main__`, re-executes the process (same interpreter,
arguments, environment and pid) with the library preloaded and glibc's heap on huge pages (`host.py`), where it
lacks either. That costs the imports once more (about 4 s for `experiments.train`); DSV3_RESTART=0 leaves the
process as started.

glibc's own settings do it only at a cost: `GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0` (one arena,
so the scratch comes from the main heap) with a large trim threshold stops the faults too, but every thread then
takes that arena's lock (compiling 20-55% slower, the tests about 20%) and the heap fragments (peak RSS 1.2-1.9x);
docs/BENCHMARKS.md has the figures.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import platform
import sys

from dsv3_jax import host
from dsv3_jax import native

SOURCE = pathlib.Path(__file__).with_name("csrc_preload") / "keep_freed.c"
LIBRARY = "keep_freed.so"
_FLAGS = ("-x", "c", "-O2", "-shared", "-fPIC", "-w")  # C, by the native kernels' compiler driver
_STATS_SYMBOL = "dsv3_keep_freed_stats"
_STATS_FIELDS = ("blocks_mapped", "blocks_in_use", "cached_bytes", "reuses", "mappings")
RESTART_ENV = "DSV3_RESTART"  # "0": never restart; "done": set on the restarted process


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


def restart_with_fast_malloc() -> None:
  """Re-executes this process with the library preloaded and glibc's heap on huge pages, where it lacks either.

  For an entry point's `__main__`, before it starts threads, a backend or output: `os.execve` keeps the pid, the
  arguments (`sys.orig_argv`: `-m module`, `-X` options and all) and the environment, plus GLIBC_TUNABLES' huge-page
  setting and LD_PRELOAD's library. Returns without restarting where there is nothing to gain or no way to:
  DSV3_RESTART=0 (or a process this already restarted), no glibc, both settings in place (a GLIBC_TUNABLES that
  sets glibc.malloc.hugetlb either way counts), or the library cannot be built (said on stderr; the process then
  goes on without it, restarted for huge pages alone if those were missing).
  """
  if os.environ.get(RESTART_ENV) in ("0", "done") or platform.libc_ver()[0] != "glibc":
    return
  argv = getattr(sys, "orig_argv", None)
  if not argv or not sys.executable:
    return
  env = dict(os.environ)
  tunables = env.get("GLIBC_TUNABLES", "")
  if not host.huge_page_malloc() and "glibc.malloc.hugetlb=" not in tunables:  # a user's own setting stands
    env["GLIBC_TUNABLES"] = ":".join(filter(None, (tunables, host.HUGE_PAGE_TUNABLE)))
  if not active():
    try:
      library = str(build())
    except (native.Unavailable, OSError) as e:
      print(f"dsv3_jax.keep_freed: not built, running without it: {e}", file=sys.stderr)
    else:
      env["LD_PRELOAD"] = ":".join(filter(None, (env.get("LD_PRELOAD"), library)))
  if env == dict(os.environ):
    return
  env[RESTART_ENV] = "done"
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, argv, env)


def main() -> int:
  try:
    print(build())
  except (native.Unavailable, OSError) as e:
    print(f"dsv3_jax.keep_freed: not built, running without it: {e}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
