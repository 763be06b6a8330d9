"""Prints a pipeline schedule's op order, simulated timeline and Table 2 comparison, and draws the timeline as a PNG.

  python -m experiments.pipeline_schedule --schedule=dualpipe --pp=8 --microbatches=20   # about 4 s on a 2-core CPU
  python -m experiments.pipeline_schedule --schedule=zb1p --pp=8 --microbatches=20 --F=2 --B=4 --W=2 --FB=5

--pp is the number of pipeline ranks (devices) of the drawn schedule; Table 2 compares all four methods at --pp
pipeline stages (DualPipeV on pp/2 devices), so it needs an even --pp and N that every method accepts
(--notable2 skips it). The PNG goes to --png (default workdir/pipeline/<schedule>_pp<pp>_n<N>.png).
"""

import jax
from absl import app
from absl import flags
from absl import logging

from dsv3_jax.pipeline import render
from dsv3_jax.pipeline import schedules
from dsv3_jax.pipeline import simulate

_SCHEDULE = flags.DEFINE_enum("schedule", "dualpipe", schedules.NAMES, "Schedule to generate and draw.")
_PP = flags.DEFINE_integer("pp", 8, "Pipeline ranks (devices) of the schedule; Table 2's number of stages.")
_MICROBATCHES = flags.DEFINE_integer("microbatches", 20, "Micro-batches N per training step.")
_F = flags.DEFINE_float("F", 1.0, "Cost of a forward chunk.")
_B = flags.DEFINE_float("B", 2.0, "Cost of a full backward chunk.")
_W = flags.DEFINE_float("W", 1.0, "Cost of the weight-gradient part of a backward (b costs B - W).")
_FB = flags.DEFINE_float("FB", 3.0, "Cost of an overlapped forward+backward pair.")
_COMM = flags.DEFINE_float("comm", 0.0, "Point-to-point latency between ranks.")
_UNIT = flags.DEFINE_float("unit", 1.0, "Time per character of the text timeline.")
_TABLE2 = flags.DEFINE_bool("table2", True, "Print the Table 2 comparison of the four methods.")
_PNG = flags.DEFINE_string("png", None, "Where to write the timeline PNG; empty string: no PNG.")


def main(argv):
  del argv
  logging.info("jax %s, %d process(es), %d device(s)", jax.__version__, jax.process_count(), jax.device_count())
  png = _PNG.value
  if png is None:
    png = f"workdir/pipeline/{_SCHEDULE.value}_pp{_PP.value}_n{_MICROBATCHES.value}.png"
  try:
    costs = simulate.Costs(F=_F.value, B=_B.value, W=_W.value, FB=_FB.value, comm=_COMM.value)
    text = render.report(_SCHEDULE.value, _PP.value, _MICROBATCHES.value, costs, png, _UNIT.value, _TABLE2.value)
  except ValueError as e:  # a rule of the schedule or the costs: say which, without a traceback
    raise app.UsageError(str(e)) from e
  print(text)


if __name__ == "__main__":
  app.run(main)
