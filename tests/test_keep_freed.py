"""The preloaded allocator that keeps large freed blocks mapped (dsv3_jax/keep_freed.py, csrc_preload/keep_freed.c).

Each case runs in a child process started with the library preloaded (or without it, to compare against)."""

import json
import os
import platform
import subprocess
import sys

import pytest

from dsv3_jax import keep_freed

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the library replaces glibc's malloc through LD_PRELOAD")


@pytest.fixture(scope="module")
def library():
  return str(keep_freed.build())  # needs the C++ compiler the native kernels need (the README's test requirements)


def _child(code: str, preload: str | None, timeout: float = 600, **env) -> dict:
  env = dict(os.environ, LD_PRELOAD=preload or "", XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONPATH=_REPO, **env)
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


_ALLOCATOR = r"""
import ctypes, json
from dsv3_jax import keep_freed
libc = ctypes.CDLL(None)
for name in ("malloc", "realloc", "aligned_alloc", "calloc"):
  getattr(libc, name).restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.realloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.aligned_alloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
libc.calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.malloc_usable_size.argtypes = [ctypes.c_void_p]
libc.malloc_usable_size.restype = ctypes.c_size_t
MiB = 1 << 20
out = {"active": keep_freed.active()}
a = libc.malloc(40 * MiB)
ctypes.memset(a, 7, 40 * MiB)
out["usable"] = libc.malloc_usable_size(a)
libc.free(a)
out["after_free"] = keep_freed.stats()
b = libc.malloc(39 * MiB)  # fits the freed 40 MiB block
out["reused_same_block"] = b == a
out["reused_is_dirty"] = ctypes.string_at(b, 4) == b"\x07" * 4  # handed out as it was left, as malloc may
c = libc.realloc(b, 80 * MiB)  # grows into a new block, keeping the contents
out["realloc_kept"] = ctypes.string_at(c, 4) == b"\x07" * 4 and ctypes.string_at(c + 39 * MiB - 4, 4) == b"\x07" * 4
z = libc.calloc(40, MiB)  # calloc stays glibc's: zeroed memory
out["calloc_zero"] = all(ctypes.string_at(z + k * MiB, 4096).count(0) == 4096 for k in range(40))  # small reads
wide = libc.aligned_alloc(2 * MiB, 8 * MiB)  # an alignment over a page: glibc serves it
out["wide_aligned"] = wide % (2 * MiB) == 0
small = libc.malloc(1000)
out["before_frees"] = keep_freed.stats()
for p in (c, z, wide, small):
  libc.free(p)
d, e = libc.malloc(30 * MiB), libc.malloc(30 * MiB)
libc.free(d)
libc.free(e)  # over DSV3_KEEP_FREED_MB=64 with the 80 MiB block: the least recently freed go first
out["capped"] = keep_freed.stats()
print(json.dumps(out))
"""


def test_allocator_reuses_freed_blocks_and_leaves_the_rest_to_glibc(library):
  out = _child(_ALLOCATOR, library, DSV3_KEEP_FREED_MB="64")
  assert out["active"]
  assert out["usable"] >= 40 << 20
  assert out["after_free"] == {"blocks_mapped": 1, "blocks_in_use": 0, "cached_bytes": 42 << 20, "reuses": 0,
                               "mappings": 1}
  assert out["reused_same_block"] and out["reused_is_dirty"] and out["realloc_kept"]
  assert out["calloc_zero"] and out["wide_aligned"]
  assert out["before_frees"]["blocks_in_use"] == 1  # the 80 MiB block; calloc, 2 MiB-aligned and small ones not here
  assert out["before_frees"]["reuses"] == 1 and out["before_frees"]["mappings"] == 2
  capped = out["capped"]
  assert capped["blocks_in_use"] == 0 and capped["cached_bytes"] <= 64 << 20, capped
  assert capped["blocks_mapped"] == 2 and capped["cached_bytes"] == 64 << 20, capped  # the two 32 MiB blocks stay


def test_not_active_without_the_preload():
  assert _child("import json; from dsv3_jax import keep_freed; print(json.dumps([keep_freed.active(), "
                "keep_freed.stats()]))", None) == [False, None]


_FAULTS_PER_CALL = """
import json, resource, jax, jax.numpy as jnp
f = jax.jit(lambda x: (jnp.sin(x) * 2 + 1).sum(axis=0) + jnp.cos(x)[::-1].sum(axis=0))  # 128 MiB of scratch
x = jnp.ones((4096, 4096), jnp.float32)
for _ in range(3):
  f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  f(x).block_until_ready()
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5))
"""


def test_xla_scratch_is_not_faulted_in_again_every_call(library):
  fresh = _child(_FAULTS_PER_CALL, None, GLIBC_TUNABLES="glibc.malloc.hugetlb=1")
  kept = _child(_FAULTS_PER_CALL, library, GLIBC_TUNABLES="glibc.malloc.hugetlb=1")
  assert fresh > 100, fresh  # huge-page faults over the scratch at least, on every call
  assert kept < fresh / 10, (kept, fresh)


_STEPS = """
import hashlib, json, numpy as np, jax
jax.config.update("jax_num_cpu_devices", 2)
from configs import small_cpu
from dsv3_jax import keep_freed
from experiments import bench
config = bench.bench_config(small_cpu.get_config(), n_mtp_layers=1)
with config.unlocked():
  config.data.batch_size, config.data.seq_len = 4, 64
step = bench.OursStep(config, np.random.default_rng(0).integers(0, 257, (4, 65)).astype(np.int32))
for _ in range(3):
  step.step()
step.sync()
leaves = [np.asarray(x) for x in jax.tree.leaves(step.state)]
print(json.dumps({"temp": step.temp_bytes, "stats": keep_freed.stats(),
                  "sha256": hashlib.sha256(b"".join(x.tobytes() for x in leaves)).hexdigest()}))
"""


def test_training_steps_are_the_same_on_reused_blocks(library):
  """Reused blocks hold the last step's bytes where fresh ones are zero: a kernel that read memory it had not
  written would tell them apart."""
  plain, kept = _child(_STEPS, None), _child(_STEPS, library)
  assert kept["temp"] >= 8 << 20, kept["temp"]  # the step's scratch is the library's to keep
  assert kept["stats"]["reuses"] >= 6, kept["stats"]  # two devices' scratch, reused by every later step
  assert plain["stats"] is None
  assert kept["sha256"] == plain["sha256"]  # the state after three steps, bit for bit


_FORK_WHILE_ALLOCATING = r"""
import ctypes, json, os, threading
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
stop = False
def churn():  # takes and drops the library's lock all the time
  while not stop:
    libc.free(libc.malloc(8 << 20))
workers = [threading.Thread(target=churn) for _ in range(2)]
for w in workers:
  w.start()
children = 0
for _ in range(20):
  pid = os.fork()
  if pid == 0:  # the child allocates at once: a lock copied while held would hang it
    libc.free(libc.malloc(8 << 20))
    os._exit(0)
  _, status = os.waitpid(pid, 0)
  children += os.waitstatus_to_exitcode(status) == 0
stop = True
for w in workers:
  w.join()
print(json.dumps(children))
"""


def test_fork_while_other_threads_allocate(library):
  assert _child(_FORK_WHILE_ALLOCATING, library, timeout=120) == 20  # before the fork handlers: a hang


_RESTART = r"""
import json, os, sys
from dsv3_jax import host, keep_freed
print(json.dumps({"started": os.getpid(), "restart": os.environ.get("DSV3_RESTART")}), flush=True)
keep_freed.restart_with_fast_malloc()
print(json.dumps({"pid": os.getpid(), "argv": sys.argv[1:], "active": keep_freed.active(),
                  "huge_pages": host.huge_page_malloc(), "tunables": os.environ.get("GLIBC_TUNABLES"),
                  "restart": os.environ.get("DSV3_RESTART")}))
"""


def _restarted(preload: str, **env) -> tuple[list[dict], dict]:
  """The lines the start-up printed (one per process image) and the final state, for `_RESTART` with `env`."""
  env = dict(os.environ, LD_PRELOAD=preload, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONPATH=_REPO, **env)
  proc = subprocess.run([sys.executable, "-c", _RESTART, "a", "b c"], env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
  return lines[:-1], lines[-1]


@pytest.mark.parametrize("tunables", ["", "glibc.malloc.arena_max=4", "glibc.malloc.hugetlb=0"])
def test_entry_points_restart_themselves_with_the_library(library, tunables):
  """What `experiments.train` and the benchmarks do first: the same pid and arguments, the library preloaded,
  huge pages added to the user's tunables unless they set them."""
  starts, final = _restarted("", GLIBC_TUNABLES=tunables, DSV3_RESTART="")
  assert [s["restart"] for s in starts] == ["", "done"]
  assert final["pid"] == starts[0]["started"] == starts[1]["started"]  # execve: the process a launcher waits on
  assert final["argv"] == ["a", "b c"] and final["active"] and final["restart"] == "done"
  if tunables == "glibc.malloc.hugetlb=0":
    assert final["tunables"] == tunables  # the user's choice stands
  elif final["tunables"] != tunables:  # unchanged where THP is on for every process already
    assert final["tunables"] == ":".join(filter(None, [tunables, "glibc.malloc.hugetlb=1"])) and final["huge_pages"]


def test_no_restart_when_set_up_or_told_not_to(library):
  starts, final = _restarted(library, GLIBC_TUNABLES="glibc.malloc.hugetlb=1", DSV3_RESTART="")
  assert len(starts) == 1 and final["active"] and final["restart"] == ""
  starts, final = _restarted("", GLIBC_TUNABLES="", DSV3_RESTART="0")
  assert len(starts) == 1 and not final["active"] and final["restart"] == "0"
