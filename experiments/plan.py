"""Per-device memory of a run config on a mesh, from shapes only (no devices, nothing allocated).

  python -m experiments.plan --config=configs/deepseek_v3_671b.py --config.mesh.pipe=16 --config.mesh.expert=64
  python -m experiments.plan --config=configs/deepseek_v3_671b.py --config.mesh.pipe=8 --config.mesh.expert=48

Prints parameters, gradients, optimizer state (with and without ZeRO-1) and an activation estimate for
the heaviest pipeline stage, and a table of all stages. Exits 1 when the mesh does not divide the model or
the batch, or when parameters, gradients and optimizer state alone exceed --hbm_gib.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from dsv3_jax import plan
from dsv3_jax import sharding

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py).", lock_config=True)
_DEVICES = flags.DEFINE_integer("devices", None, "Device count; needed only when a mesh axis is -1.")
_MICROBATCH = flags.DEFINE_integer("microbatch_seqs", None,
                                   "Sequences per device per pipeline micro-batch (default 1 with mesh.pipe > 1).")
_HBM = flags.DEFINE_float("hbm_gib", 80.0, "Memory per device in GiB (H800/H100: 80).")


def main(argv):
  del argv
  try:
    p = plan.plan(_CONFIG.value, _DEVICES.value, _MICROBATCH.value)
  except sharding.MeshError as e:
    print(f"rejected: {e}")
    sys.exit(1)
  print(plan.format_plan(p, _HBM.value))
  fits, reason = plan.verdict(p, _HBM.value)
  print(reason)
  if not fits:
    sys.exit(1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
