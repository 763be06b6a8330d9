"""Prints the parameter counts of a model preset or a HF config.json, from shapes alone (no allocation).

  python -m experiments.param_count --preset=deepseek_v3_671b     # a few seconds on CPU
  python -m experiments.param_count --hf_config=path/to/config.json
"""

import json

import jax
from absl import app
from absl import flags
from absl import logging

from dsv3_jax import config as config_lib
from dsv3_jax import param_count

_PRESET = flags.DEFINE_enum("preset", "deepseek_v3_671b", sorted(config_lib.PRESETS), "Model preset to count.")
_HF_CONFIG = flags.DEFINE_string("hf_config", None, "A HF config.json to count instead of --preset.")


def _line(name: str, n: int) -> str:
  return f"  {name:<28}{n:>18,}  {n / 1e9:9.3f}B"


def main(argv):
  del argv
  logging.info("jax %s, %d process(es), %d device(s)", jax.__version__, jax.process_count(), jax.device_count())
  if _HF_CONFIG.value:
    with open(_HF_CONFIG.value) as f:
      cfg, source = config_lib.ModelConfig.from_hf(json.load(f)), _HF_CONFIG.value
  else:
    cfg, source = config_lib.preset(_PRESET.value), f"preset {_PRESET.value}"
  shapes = param_count.variable_shapes(cfg)
  counts = param_count.count(cfg, shapes)
  print(f"Parameters of {source}")
  print(_line("main model total", counts.total))
  print(_line("main activated per token", counts.activated))
  print(_line("MTP unique", counts.mtp))
  print(_line("MTP activated per token", counts.mtp_activated))
  print("Per-layer pieces")
  for name, n in param_count.pieces(cfg, shapes).items():
    print(_line(name, n))


if __name__ == "__main__":
  app.run(main)
