"""Converts a DeepSeek-V3 HF safetensors checkpoint (FP8 included) to an orbax checkpoint and back.

  python -m experiments.convert_hf --hf_dir=/path/to/hf --out=/path/to/ours --dtype=bf16
  python -m experiments.convert_hf --to_hf --checkpoint=/path/to/ours --out=/path/to/hf --dtype=fp8

Our layout: `<out>/variables` (orbax, {"params", "routing"}), `<out>/config.json` (the HF config, needed
to convert back) and, with --dtype=fp8, `<out>/fp8` (orbax, the stored e4m3 bytes as uint8 and their
scales) plus `<out>/fp8_names.json`, so a round trip writes the FP8 bytes back unchanged. The
directory is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil

import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from absl import app
from absl import flags
from absl import logging

from dsv3_jax import config
from dsv3_jax import hf_checkpoint

_DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp8": "fp8"}
_HF_DIR = flags.DEFINE_string("hf_dir", None, "HF checkpoint directory to read (config.json + safetensors).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "With --to_hf: our converted checkpoint directory.")
_OUT = flags.DEFINE_string("out", None, "Output directory; must not exist or be empty unless --overwrite.")
_DTYPE = flags.DEFINE_enum("dtype", "bf16", list(_DTYPES), "Weight dtype; fp8 keeps/writes e4m3 + scale_inv.")
_TO_HF = flags.DEFINE_bool("to_hf", False, "Convert our checkpoint (--checkpoint) to HF safetensors.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out.")
_SHARD_GB = flags.DEFINE_float("max_shard_gb", 5.0, "With --to_hf: largest safetensors shard, GB.")


def to_ours(hf_dir: str, out: str, dtype: str, overwrite: bool = False) -> None:
  out = os.path.abspath(out)
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise app.UsageError(f"{out} exists and is not empty; pass --overwrite")
  with open(os.path.join(hf_dir, "config.json")) as f:
    hf_config = json.load(f)
  cfg = config.ModelConfig.from_hf(hf_config)
  loaded = hf_checkpoint.load(hf_dir, cfg, dtype)  # validates everything before writing anything
  variables, fp8_weights = loaded if dtype == "fp8" else (loaded, None)
  tmp = f"{out}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(tmp, "variables"), variables)
    if fp8_weights is not None:
      names = sorted(fp8_weights)
      checkpointer.save(os.path.join(tmp, "fp8"), {
          "weights": [np.asarray(fp8_weights[n][0]).view(np.uint8) for n in names],
          "scales": [np.asarray(fp8_weights[n][1]) for n in names]})
      _write_json(os.path.join(tmp, "fp8_names.json"), names)
    checkpointer.wait_until_finished()
    hf_config.pop("quantization_config", None)  # our variables hold dequantised weights
    _write_json(os.path.join(tmp, "config.json"), hf_config)
    if os.path.isdir(out):
      shutil.rmtree(out)
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def to_hf(checkpoint: str, out: str, dtype: str, max_shard_bytes: int, overwrite: bool = False) -> None:
  checkpoint = os.path.abspath(checkpoint)
  with open(os.path.join(checkpoint, "config.json")) as f:
    cfg = config.ModelConfig.from_hf(json.load(f))
  checkpointer = ocp.StandardCheckpointer()
  variables = checkpointer.restore(os.path.join(checkpoint, "variables"))
  fp8_weights = None
  if dtype == "fp8" and os.path.exists(os.path.join(checkpoint, "fp8_names.json")):
    with open(os.path.join(checkpoint, "fp8_names.json")) as f:
      names = json.load(f)
    stored = checkpointer.restore(os.path.join(checkpoint, "fp8"))
    fp8_weights = {n: (np.asarray(w).view(ml_dtypes.float8_e4m3fn), np.asarray(s))
                   for n, w, s in zip(names, stored["weights"], stored["scales"], strict=True)}
  hf_checkpoint.save(variables, cfg, out, dtype, max_shard_bytes, fp8_weights, overwrite)


def _write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)


def main(argv):
  del argv
  if not _OUT.value:
    raise app.UsageError("--out is required")
  dtype = _DTYPES[_DTYPE.value]
  if _TO_HF.value:
    if not _CHECKPOINT.value:
      raise app.UsageError("--to_hf needs --checkpoint")
    to_hf(_CHECKPOINT.value, _OUT.value, dtype, int(_SHARD_GB.value * 1e9), _OVERWRITE.value)
  else:
    if not _HF_DIR.value:
      raise app.UsageError("pass --hf_dir (or --to_hf --checkpoint)")
    to_ours(_HF_DIR.value, _OUT.value, dtype, _OVERWRITE.value)
  logging.info("wrote %s", os.path.abspath(_OUT.value))


if __name__ == "__main__":
  app.run(main)
