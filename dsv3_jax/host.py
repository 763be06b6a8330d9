"""The host CPU as XLA devices, and the allocator setting that keeps XLA's buffers on huge pages.

XLA's CPU runtime runs the small dots inside a loop body (the routed experts' tile loop) on one core, whatever
the thread pool holds (docs/BENCHMARKS.md). Splitting the host into one XLA device per core and the batch over
them (the `data` mesh axis, as on any other set of devices) gives every core its own stream of ops.
`set_cpu_devices` does that for an entry point, before any backend exists:

  host.set_cpu_devices("auto", batch_size=config.data.batch_size)   # one device per core the batch divides

XLA allocates each step's scratch anew; with glibc's default 4 KiB pages every step then faults it back in
(85k page faults, ~150 ms of kernel time per step of the small model on 2 cores). glibc maps its heap on
transparent huge pages when started with GLIBC_TUNABLES=glibc.malloc.hugetlb=1; the Makefile exports it, and
`huge_page_malloc` says whether this process has it. It has to be in the environment when the process
starts: it cannot be switched on from Python. The scratch is then still mapped afresh every step and zeroed by the
kernel on first touch; `keep_freed.py` (preloaded by `make run` and `make bench`) keeps it mapped instead. The
training and benchmark entry points restart themselves with both when started without them
(`keep_freed.restart_with_fast_malloc`).
"""

from __future__ import annotations

import os
import re

import jax

HUGE_PAGE_TUNABLE = "glibc.malloc.hugetlb=1"
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


def huge_page_malloc() -> bool:
  """Whether glibc's heap is on transparent huge pages here (GLIBC_TUNABLES, or THP 'always' system-wide)."""
  if HUGE_PAGE_TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":"):
    return True
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return "[always]" in f.read()
  except OSError:
    return False
