"""Trains a model from a config file, then samples from it and plots the run.

  python -m experiments.train --config=configs/small_cpu.py --workdir=/tmp/small
  python -m experiments.train --config=configs/tiny_cpu.py --workdir=/tmp/tiny --config.train.steps=50

Restarting with the same --workdir resumes from its latest checkpoint (on any mesh or process count).
Meshes: --config.mesh.data=2 --config.mesh.expert=4 (see configs/base.py). Several processes, one per
host, each started with the same flags plus its own id:

  python -m experiments.train ... --coordinator_address=host0:12355 --num_processes=2 --process_id=0

Inside a multi-process SLURM or Open MPI job the flags can be left out (--distributed=auto).

On a CPU host, --cpu_devices=auto (the default) splits the host into one XLA device per core, as many as
divide config.data.batch_size, and the default mesh puts them all on `data` (dsv3_jax/host.py says why);
--cpu_devices=1 keeps one device. XLA's scratch goes on huge pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1) and
stays mapped from one step to the next (LD_PRELOAD="$(python -m dsv3_jax.keep_freed)"): both must be in the
environment when the process starts, so `make run` sets them and a process started without them restarts itself
with them first thing (same pid and arguments; DSV3_RESTART=0 to not; dsv3_jax/host.py, dsv3_jax/keep_freed.py).
"""

from __future__ import annotations

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from dsv3_jax import distributed
from dsv3_jax import host
from dsv3_jax import keep_freed
from dsv3_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.", required=True)
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", distributed.MODES,
                                 "jax.distributed: auto (flags, JAX_COORDINATOR_ADDRESS or a SLURM/MPI job), on, off.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes).")
_CPU_DEVICES = flags.DEFINE_string("cpu_devices", "auto",
                                   "XLA CPU devices in this process: 'auto' (one per core that the batch divides, "
                                   "on a one-process run with the default mesh) or a count.")


def main(argv):
  del argv
  job = (_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  multi_process = distributed.wanted(*job)
  try:
    train.set_cpu_devices(_CONFIG.value, _CPU_DEVICES.value, multi_process=multi_process)
  except ValueError as e:
    raise app.UsageError(f"--cpu_devices: {e}") from None
  distributed.initialize(*job)
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)  # one log for the job: process 0's
  logging.info("jax %s, process %d of %d, %d local / %d global devices; malloc on huge pages: %s, freed blocks "
               "kept mapped: %s", jax.__version__, jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), host.huge_page_malloc(), keep_freed.active())
  summary = train.run(_CONFIG.value, _WORKDIR.value)
  if jax.process_index() == 0:
    _report(summary)
  distributed.shutdown()


def _report(summary) -> None:
  heldout = summary["heldout"]
  print(f"held-out loss {heldout['loss']:.3f} nats/token (unigram entropy {heldout['unigram_entropy']:.3f})")
  print("\n".join(summary["samples"]))
  if _CONFIG.value.train.plot:
    from dsv3_jax import plots  # here, not at the top: matplotlib adds seconds to every process's start-up

    for path in plots.write_plots(_WORKDIR.value):
      print(f"plot: {path}")


if __name__ == "__main__":
  keep_freed.restart_with_fast_malloc()  # glibc on huge pages, large freed blocks kept mapped (DSV3_RESTART=0: not)
  flags.mark_flags_as_required(["config"])
  app.run(main)
