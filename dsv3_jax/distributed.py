"""Multi-process start-up: `jax.distributed.initialize` from explicit settings or the cluster environment.

One process per host (or per GPU group) runs the same program; after `initialize` every process sees
all devices of the job (`jax.devices()`) and its own (`jax.local_devices()`). Nothing here starts
processes: a scheduler (SLURM, mpirun) or the user launches one per host.

Modes:
- "auto": initialize when a coordinator is given (argument or JAX_COORDINATOR_ADDRESS) or when a
  multi-process SLURM or Open MPI job is detected; otherwise run as a single process.
- "on": always initialize; settings left as None are filled in by JAX's own cluster detection
  (SLURM, Open MPI, Kubernetes, Cloud TPU) and it fails loudly if there is none.
- "off": never initialize.

CPU processes exchange collectives through gloo, so a laptop can stand in for a cluster: see
`tests/test_multihost.py`, which runs 2 processes x 4 CPU devices.
"""

from __future__ import annotations

import os

import jax
from absl import logging

MODES = ("auto", "on", "off")


def cluster_detected(environ: dict[str, str] | None = None) -> bool:
  """True inside a SLURM job step with more than one task, or an Open MPI job with more than one rank."""
  env = os.environ if environ is None else environ
  if "SLURM_JOB_ID" in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
    return True
  return "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


def wanted(mode: str = "auto", coordinator_address: str | None = None, num_processes: int | None = None,
           process_id: int | None = None) -> bool:
  """Whether `initialize` with these arguments joins a multi-process job (it touches no JAX backend)."""
  if mode not in MODES:
    raise ValueError(f"distributed mode {mode!r} is not one of {MODES}")
  explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
  if mode == "off":
    if explicit:
      raise ValueError("distributed mode 'off' contradicts the coordinator_address/num_processes/process_id given")
    return False
  return mode == "on" or explicit or bool(os.environ.get("JAX_COORDINATOR_ADDRESS")) or cluster_detected()


def initialize(mode: str = "auto", coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Joins the job's other processes as `mode` says; returns whether jax.distributed was initialized.

  Must run before anything touches a JAX backend (no jax.devices(), no arrays).
  """
  if not wanted(mode, coordinator_address, num_processes, process_id):
    return False
  explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
  if explicit and coordinator_address is not None and (num_processes is None or process_id is None):
    raise ValueError("with an explicit coordinator_address, give num_processes and process_id too")
  if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"process_id {process_id} is outside [0, num_processes = {num_processes})")
  # gloo carries CPU collectives across processes (the default in jax 0.10; set for older defaults too).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def shutdown() -> None:
  """Leaves the job (a no-op when jax.distributed was never initialized)."""
  if jax.distributed.is_initialized():
    jax.distributed.shutdown()
