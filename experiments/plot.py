"""Plots a training workdir's metrics.jsonl and expert_load.jsonl into <workdir>/plots/.

  python -m experiments.plot --workdir=/path/to/workdir      # a few seconds

Writes loss.png, lr.png and expert_load.png (see dsv3_jax/plots.py).
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags

from dsv3_jax import plots

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding metrics.jsonl and expert_load.jsonl.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    for path in plots.write_plots(_WORKDIR.value):
      print(path)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"plot: {e}")


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
