"""The host CPU as XLA devices, and the allocator settings that keep XLA's scratch on huge pages and mapped.

XLA's CPU runtime runs the small dots inside a loop body (the routed experts' tile loop) on one core, whatever
the thread pool holds (docs/BENCHMARKS.md). Splitting the host into one XLA device per core and the batch over
them (the `data` mesh axis, as on any other set of devices) gives every core its own stream of ops.
`set_cpu_devices` does that for an entry point, before any backend exists:

  host.set_cpu_devices("auto", batch_size=config.data.batch_size)   # one device per core the batch divides

XLA allocates each step's scratch anew (one block per device, 166 MiB per device for the small model's step); with
glibc's default 4 KiB pages every step then faults it back in (85k page faults, ~150 ms of kernel time per step of
the small model on 2 cores). glibc maps its heap on transparent huge pages when started with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (`HUGE_PAGE_TUNABLE`); `huge_page_malloc` says whether this process has it.
The block is still a fresh mapping every step, which the kernel zeroes on first touch (~950 faults and 35-45 ms of
kernel time per step over both cores). `KEEP_HEAP_TUNABLES` keep it mapped instead: one malloc arena for every
thread (the device threads' other arenas cannot hold a block over 64 MiB and map it afresh), no mmap'd chunks
and no trimming, so a freed block is reused by the next step; `heap_kept` says whether this process has them.
That costs contention on the one arena where many threads allocate at once: compiling is about 20% slower (the
test suite too), so the Makefile starts `make run` and `make bench` with `RUN_TUNABLES` and `make test` with the
huge pages alone. Tunables are read when a process starts: they cannot be switched on from Python.
"""

from __future__ import annotations

import os
import re

import jax

HUGE_PAGE_TUNABLE = "glibc.malloc.hugetlb=1"
KEEP_HEAP_TUNABLES = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0", "glibc.malloc.trim_threshold=17179869184")
RUN_TUNABLES = ":".join((HUGE_PAGE_TUNABLE,) + KEEP_HEAP_TUNABLES)  # the Makefile's, for `make run` and `make bench`
_FORCE_FLAG = re.compile(r"--xla_force_host_platform_device_count=(\S+)")


def cores() -> int:
  """CPU cores this process may run on (its affinity mask, not the machine's count)."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def forced_device_count(xla_flags: str | None = None) -> int | None:
  """The CPU device count XLA_FLAGS forces (--xla_force_host_platform_device_count), or None."""
  flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
  found = _FORCE_FLAG.findall(flags)
  if not found:
    return None
  try:
    return int(found[-1])
  except ValueError:
    raise ValueError(f"XLA_FLAGS: --xla_force_host_platform_device_count={found[-1]!r} is not an integer") from None


def auto_device_count(batch_size: int, n_cores: int) -> int:
  """The most devices, at most one per core, that split `batch_size` sequences evenly."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  return max(d for d in range(1, max(n_cores, 1) + 1) if batch_size % d == 0)


def set_cpu_devices(spec: str | int, batch_size: int, may_split: bool = True) -> int:
  """Gives this process `spec` XLA CPU devices ('auto': `auto_device_count` over `cores()`); returns the count.

  Call it before anything touches a JAX backend. 'auto' keeps one device (or what XLA_FLAGS forces) unless
  `may_split`: callers pass False for a multi-process job or a mesh the config pins, whose device counts are
  the user's plan. An explicit count that contradicts XLA_FLAGS is an error rather than a silent pick.
  """
  forced = forced_device_count()
  if spec == "auto":
    if forced is not None:
      return forced
    n = auto_device_count(batch_size, cores()) if may_split else 1
  else:
    try:
      n = int(spec)
    except ValueError:
      raise ValueError(f"cpu_devices must be 'auto' or a positive integer, got {spec!r}") from None
    if n < 1:
      raise ValueError(f"cpu_devices must be 'auto' or a positive integer, got {spec!r}")
    if forced is not None and forced != n:
      raise ValueError(f"cpu_devices = {n} contradicts XLA_FLAGS' --xla_force_host_platform_device_count={forced}")
    if forced is not None:
      return n
  if jax.config.jax_num_cpu_devices == n:
    return n
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError as e:
    raise RuntimeError(f"cpu_devices = {n}: a JAX backend already exists in this process, so its CPU device "
                       f"count is fixed; set it before the first JAX operation ({e})") from None
  return n


def _tunables() -> dict[str, str]:
  """GLIBC_TUNABLES as name -> value (a later setting of the same name wins, as in glibc)."""
  pairs = (item.split("=", 1) for item in os.environ.get("GLIBC_TUNABLES", "").split(":") if "=" in item)
  return {name: value for name, value in pairs}


def huge_page_malloc() -> bool:
  """Whether glibc's heap is on transparent huge pages here (GLIBC_TUNABLES, or THP 'always' system-wide)."""
  if _tunables().get("glibc.malloc.hugetlb") == "1":
    return True
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return "[always]" in f.read()
  except OSError:
    return False


def heap_kept() -> bool:
  """Whether GLIBC_TUNABLES keep freed scratch mapped for the next step (`KEEP_HEAP_TUNABLES` or stricter)."""
  t = _tunables()
  try:
    return (int(t.get("glibc.malloc.arena_max", "0")) == 1 and int(t.get("glibc.malloc.mmap_max", "-1")) == 0
            and int(t.get("glibc.malloc.trim_threshold", "0")) >= 2**30)
  except ValueError:
    return False
