"""The host CPU split into XLA devices (dsv3_jax/host.py) and the run's choice of that split (train.set_cpu_devices)."""

import json
import os
import platform
import re
import subprocess
import sys

import pytest

from dsv3_jax import host

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("batch, n_cores, want", [(16, 2, 2), (16, 3, 2), (12, 8, 6), (1, 4, 1), (7, 2, 1),
                                                  (8, 1, 1), (8, 0, 1)])
def test_auto_device_count_is_the_most_devices_that_split_the_batch(batch, n_cores, want):
  assert host.auto_device_count(batch, n_cores) == want


def test_auto_device_count_refuses_an_empty_batch():
  with pytest.raises(ValueError, match="batch_size must be positive, got 0"):
    host.auto_device_count(0, 2)


def test_forced_device_count_reads_xla_flags():
  assert host.forced_device_count("--xla_cpu_use_onednn=false --xla_force_host_platform_device_count=8") == 8
  assert host.forced_device_count("--xla_force_host_platform_device_count=2 "
                                  "--xla_force_host_platform_device_count=4") == 4  # XLA takes the last
  assert host.forced_device_count("") is None
  with pytest.raises(ValueError, match="'eight' is not an integer"):
    host.forced_device_count("--xla_force_host_platform_device_count=eight")


def test_set_cpu_devices_under_forced_flags():
  """This test process forces 8 devices through XLA_FLAGS (conftest): auto keeps them, a contradiction is refused."""
  assert host.forced_device_count() == 8
  assert host.set_cpu_devices("auto", batch_size=2) == 8
  assert host.set_cpu_devices("8", batch_size=2) == 8
  with pytest.raises(ValueError, match="cpu_devices = 2 contradicts XLA_FLAGS' "
                                       "--xla_force_host_platform_device_count=8"):
    host.set_cpu_devices("2", batch_size=2)
  for bad in ("two", "0", "-1"):
    with pytest.raises(ValueError, match=f"cpu_devices must be 'auto' or a positive integer, got '{bad}'"):
      host.set_cpu_devices(bad, batch_size=2)


_CHILD = r"""
import json, sys
import jax
from configs import tiny_cpu
from dsv3_jax import host, train
config = tiny_cpu.get_config()
pinned = tiny_cpu.get_config()
pinned.mesh.data, pinned.mesh.expert = 1, 2
out = {"pinned": train.set_cpu_devices(pinned, "auto"),
       "multi": train.set_cpu_devices(config, "auto", multi_process=True),
       "auto": train.set_cpu_devices(config, "auto"),
       "explicit": train.set_cpu_devices(config, "3")}
out["devices"] = jax.device_count()
try:
  train.set_cpu_devices(config, "2")
except RuntimeError as e:
  out["late"] = str(e)
print(json.dumps(out))
"""


def test_set_cpu_devices_in_a_fresh_process():
  """Without XLA_FLAGS: auto splits per core only on the default mesh in one process; the last count set before
  the backend starts is the one JAX uses; a change after that is refused with the reason."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, "-c", _CHILD], cwd=_REPO, env={**env, "JAX_PLATFORMS": "cpu"},
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["pinned"] == out["multi"] == 1
  assert out["auto"] == host.auto_device_count(8, host.cores())  # tiny_cpu's batch of 8
  assert out["explicit"] == out["devices"] == 3
  assert "cpu_devices = 2: a JAX backend already exists in this process" in out["late"]


def test_huge_page_malloc_reads_the_tunable(monkeypatch):
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1:" + host.HUGE_PAGE_TUNABLE)
  assert host.huge_page_malloc()


def test_heap_kept_needs_every_tunable(monkeypatch):
  monkeypatch.setenv("GLIBC_TUNABLES", host.RUN_TUNABLES)
  assert host.huge_page_malloc() and host.heap_kept()
  for missing in host.KEEP_HEAP_TUNABLES:
    monkeypatch.setenv("GLIBC_TUNABLES", ":".join(t for t in host.RUN_TUNABLES.split(":") if t != missing))
    assert not host.heap_kept(), missing
  # glibc takes the last setting of a name; a small trim threshold returns freed scratch to the kernel again.
  monkeypatch.setenv("GLIBC_TUNABLES", host.RUN_TUNABLES + ":glibc.malloc.trim_threshold=131072")
  assert not host.heap_kept()
  monkeypatch.setenv("GLIBC_TUNABLES", host.RUN_TUNABLES.replace("arena_max=1", "arena_max=one"))
  assert not host.heap_kept()
  monkeypatch.setenv("GLIBC_TUNABLES", host.HUGE_PAGE_TUNABLE)
  assert host.huge_page_malloc() and not host.heap_kept()


def test_makefile_starts_run_and_bench_with_run_tunables():
  """The Makefile spells the tunables out (make cannot import them); they must stay host's."""
  with open(os.path.join(_REPO, "Makefile")) as f:
    assigned = dict(re.findall(r"^(\w+_TUNABLES) := (\S+)$", f.read(), flags=re.M))
  assert assigned == {"TEST_TUNABLES": host.HUGE_PAGE_TUNABLE, "RUN_TUNABLES": host.RUN_TUNABLES}


_FAULTS_PER_CALL = """
import resource, jax, jax.numpy as jnp
f = jax.jit(lambda x: (jnp.sin(x) * 2 + 1).sum(axis=0) + jnp.cos(x)[::-1].sum(axis=0))  # 64 MiB of scratch
x = jnp.ones((4096, 4096), jnp.float32)
f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  f(x).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="GLIBC_TUNABLES are glibc's")
def test_run_tunables_keep_xla_scratch_mapped_between_calls():
  """With huge pages alone a 64 MiB scratch block is mapped afresh (and faulted in) on every call; not with
  RUN_TUNABLES."""
  def faults(tunables):
    env = dict(os.environ, GLIBC_TUNABLES=tunables, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _FAULTS_PER_CALL], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return float(proc.stdout.split()[-1])

  fresh, kept = faults(host.HUGE_PAGE_TUNABLE), faults(host.RUN_TUNABLES)
  assert fresh > 100, fresh  # 2 MiB faults over 64 MiB at least, every call
  assert kept < fresh / 10, (kept, fresh)
