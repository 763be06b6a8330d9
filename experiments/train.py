"""Trains a model from a config file, then samples from it and plots the run.

  python -m experiments.train --config=configs/small_cpu.py --workdir=/tmp/small
  python -m experiments.train --config=configs/tiny_cpu.py --workdir=/tmp/tiny --config.train.steps=50

Restarting with the same --workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from dsv3_jax import plots
from dsv3_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.", required=True)


def main(argv):
  del argv
  logging.info("jax %s, process %d of %d, %d local / %d global devices", jax.__version__, jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  summary = train.run(_CONFIG.value, _WORKDIR.value)
  if jax.process_index() != 0:
    return
  heldout = summary["heldout"]
  print(f"held-out loss {heldout['loss']:.3f} nats/token (unigram entropy {heldout['unigram_entropy']:.3f})")
  print("\n".join(summary["samples"]))
  if _CONFIG.value.train.plot:
    for path in plots.write_plots(_WORKDIR.value):
      print(f"plot: {path}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
