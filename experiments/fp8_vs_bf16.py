"""Trains one model with the "bf16" and the "fp8" precision recipes and compares their losses (paper §3.3).

  python -m experiments.fp8_vs_bf16 --config=configs/fp8_vs_bf16.py --workdir=workdir/fp8_vs_bf16

Both runs start from the config's seed and read the same batches in the same order (config.seed drives
init and data), so their losses differ only by the recipe. Each run trains in <workdir>/<recipe> (rerunning
resumes and reuses finished runs); then this prints each run's final losses and the relative difference
(fp8 - bf16) / bf16 of the mean training cross-entropy over the last 10% of steps, and the held-out loss of
each run's final parameters under the other recipe (forward-pass cost of FP8 against its training cost);
writes both curves and the per-step relative difference to --plot and the figures to --out (docs/FP8.md
quotes them).

A third run, "bf16_control", repeats the bf16 recipe from --control_seed (another init and batch order): its
difference to the bf16 run is the run-to-run spread of this setup, the yardstick for the fp8 difference.
"""

from __future__ import annotations

import copy
import json
import os
import shutil

import jax
import numpy as np
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from dsv3_jax import metrics
from dsv3_jax import plots
from dsv3_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (configs/fp8_vs_bf16.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the two runs (<workdir>/bf16, <workdir>/fp8).",
                               required=True)
_OUT = flags.DEFINE_string("out", "docs/fp8_vs_bf16.json", "JSON file for the figures.")
_PLOT = flags.DEFINE_string("plot", "docs/fp8_vs_bf16.png", "PNG file for the curves.")
_CONTROL_SEED = flags.DEFINE_integer("control_seed", 1, "Seed of the bf16 control run (config.seed for the others).")

RECIPES = ("bf16", "fp8")
CONTROL = "bf16_control"  # the bf16 recipe again, from another seed
PAPER_BAR = 0.0025  # paper §3.3: relative loss error below 0.25%
TAIL = 0.1  # share of the last steps the difference is averaged over


def main(argv):
  del argv
  logging.info("jax %s, process %d of %d, %d devices", jax.__version__, jax.process_index(), jax.process_count(),
               jax.device_count())
  runs = {recipe: _train(_CONFIG.value, recipe) for recipe in RECIPES}
  runs[CONTROL] = _train(_CONFIG.value, "bf16", seed=_CONTROL_SEED.value, name=CONTROL)
  crossed = {f"{trained} parameters, {other} forward": _cross_evaluate(_CONFIG.value, trained, other)
             for trained, other in zip(RECIPES, reversed(RECIPES), strict=True)}
  result = compare(runs, _CONFIG.value)
  result["heldout_loss_crossed"] = crossed
  _write(result, runs)
  print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=1))


def _train(config, recipe: str, seed: int | None = None, name: str | None = None) -> dict:
  """One run with config.precision.recipe = recipe (and seed, when given): per-step losses, held-out loss, step
  time. It trains in <workdir>/<name or recipe>."""
  config = copy.deepcopy(config)
  with config.unlocked():
    config.precision.recipe = recipe
    config.seed = config.seed if seed is None else seed
  workdir = os.path.join(_WORKDIR.value, name or recipe)
  summary = train.run(config, workdir)
  records = plots.read_jsonl(os.path.join(workdir, metrics.METRICS_FILE))
  steps, loss = plots.series(records, "ce")  # next-token cross-entropy, the language-model loss
  if len(steps) != config.train.steps or not np.array_equal(steps, np.arange(1, config.train.steps + 1)):
    raise RuntimeError(f"{workdir}: metrics hold steps {steps[:3]}...{steps[-3:]}, expected 1..{config.train.steps} "
                       "(set train.log_every = 1; remove the workdir after changing the config)")
  # Step time from the logged throughput (steps 2..N, compile excluded), so a resumed run reports it too.
  _, tokens_per_s = plots.series(records, "tokens_per_s")
  step_seconds = float(np.median(config.data.batch_size * config.data.seq_len / tokens_per_s))
  return {"steps": steps, "loss": loss, "heldout": summary["heldout"]["loss"], "step_seconds": step_seconds}


def _cross_evaluate(config, trained: str, recipe: str) -> float:
  """Held-out loss of the `trained` run's final parameters evaluated under `recipe`.

  Separates what FP8 costs in the forward pass from what it costs in training. `train.run` on a copy of the
  run's checkpoints resumes at its last step, so it trains nothing and only evaluates.
  """
  workdir = os.path.join(_WORKDIR.value, f"{trained}_parameters_{recipe}_forward")
  if not os.path.exists(workdir):
    shutil.copytree(os.path.join(_WORKDIR.value, trained, "checkpoints"), os.path.join(workdir, "checkpoints"))
  config = copy.deepcopy(config)
  with config.unlocked():
    config.precision.recipe = recipe
  return float(train.run(config, workdir)["heldout"]["loss"])


def compare(runs: dict, config) -> dict:
  """Final losses, the relative differences over the last 10% of steps, and the paper's bar."""
  bf16, fp8 = runs["bf16"]["loss"], runs["fp8"]["loss"]
  tail = slice(-max(1, int(round(TAIL * len(bf16)))), None)
  rel_mean = float((fp8[tail].mean() - bf16[tail].mean()) / bf16[tail].mean())
  control = {}
  if CONTROL in runs:
    other = runs[CONTROL]["loss"]
    control = {"control_seed": _CONTROL_SEED.value,
               "control_tail_mean_loss": float(other[tail].mean()),
               "control_relative_difference_tail_mean": float((other[tail].mean() - bf16[tail].mean()) /
                                                              bf16[tail].mean()),
               "control_relative_difference_heldout": float(runs[CONTROL]["heldout"] / runs["bf16"]["heldout"] - 1)}
  return {
      "steps": len(bf16),
      "tail_steps": len(bf16[tail]),
      "final_loss": {r: float(runs[r]["loss"][-1]) for r in RECIPES},
      "tail_mean_loss": {"bf16": float(bf16[tail].mean()), "fp8": float(fp8[tail].mean())},
      "relative_difference_tail_mean": rel_mean,
      "relative_difference_tail_mean_abs_per_step": float(np.mean(np.abs(fp8[tail] / bf16[tail] - 1))),
      "heldout_loss": {r: float(runs[r]["heldout"]) for r in RECIPES},
      "relative_difference_heldout": float(runs["fp8"]["heldout"] / runs["bf16"]["heldout"] - 1),
      "paper_bar": PAPER_BAR,
      "within_paper_bar": abs(rel_mean) < PAPER_BAR,
      **control,
      "median_step_seconds": {r: round(runs[r]["step_seconds"], 3) for r in RECIPES},
      "backend": jax.default_backend(),
      "config": {"model": config.model.to_dict(), "data": config.data.to_dict(), "train": config.train.to_dict(),
                 "precision_impl": config.precision.impl, "seed": config.seed},
  }


def _write(result: dict, runs: dict) -> None:
  from matplotlib.figure import Figure  # here: matplotlib adds seconds to start-up

  with open(_OUT.value, "w") as f:
    json.dump(result, f, indent=1, default=str)
    f.write("\n")
  fig = Figure(figsize=(10, 4), layout="constrained")
  ax_loss, ax_rel = fig.subplots(1, 2)
  for name in (*RECIPES, CONTROL):
    ax_loss.plot(runs[name]["steps"], runs[name]["loss"], label=name, lw=1)
  ax_loss.set(xlabel="step", ylabel="training cross-entropy (nats/token)", yscale="log", title="loss")
  ax_loss.legend()
  steps, rel = runs["bf16"]["steps"], 100 * (runs["fp8"]["loss"] / runs["bf16"]["loss"] - 1)
  ax_rel.plot(steps, rel, lw=0.6, color="tab:gray", label="per step")
  window = max(1, len(rel) // 20)
  ax_rel.plot(steps[window - 1:], np.convolve(rel, np.ones(window) / window, "valid"), label=f"mean of {window}")
  control = 100 * (runs[CONTROL]["loss"] / runs["bf16"]["loss"] - 1)
  ax_rel.plot(steps[window - 1:], np.convolve(control, np.ones(window) / window, "valid"), color="tab:orange",
              label=f"{CONTROL} - bf16, mean of {window}")
  for bar in (-100 * PAPER_BAR, 100 * PAPER_BAR):
    ax_rel.axhline(bar, color="tab:red", ls="--", lw=0.8)
  ax_rel.axvspan(steps[-result["tail_steps"]], steps[-1], color="tab:green", alpha=0.1, label="last 10%")
  ax_rel.set(xlabel="step", ylabel="(fp8 - bf16) / bf16  [%]",
             title=f"relative difference, last 10%: {100 * result['relative_difference_tail_mean']:+.3f}%")
  ax_rel.legend()
  fig.savefig(_PLOT.value, dpi=120)
  print(f"wrote {_OUT.value} and {_PLOT.value}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
