"""The host CPU split into XLA devices (dsv3_jax/host.py) and the run's choice of that split (train.set_cpu_devices)."""

import json
import os
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
