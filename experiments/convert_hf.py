"""Converts a DeepSeek-V3 HF safetensors checkpoint (FP8 included) to an orbax checkpoint and back.

  python -m experiments.convert_hf --hf_dir=/path/to/hf --out=/path/to/ours --dtype=bf16 [--mesh=fsdp=4,expert=2]
  python -m experiments.convert_hf --to_hf --checkpoint=/path/to/ours --out=/path/to/hf --dtype=fp8

Our layout: `<out>/variables` (orbax, {"params", "routing"}), `<out>/config.json` (the HF config
without its quantization_config, needed to convert back) and, with --dtype=fp8, `<out>/fp8` (orbax,
`hf_checkpoint.load`'s keep-mode tree: the stored e4m3 weights and scales) plus
`<out>/quantization_config.json`, so a round trip writes the FP8 bytes back unchanged.

With --mesh (sizes of named mesh axes; their product must be the device count), the variables are
read straight into their sharded layout, each process reading only its devices' slices, and orbax
writes each process's shards; --to_hf restores onto that mesh and writes one tensor at a time.
The output is written under a temporary name and renamed when complete, so an interrupted run
leaves nothing at --out. A progress line (percent, bytes/s) goes to stderr.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import app
from absl import flags
from absl import logging

from dsv3_jax import config
from dsv3_jax import convert
from dsv3_jax import hf_checkpoint
from dsv3_jax import model as model_lib
from dsv3_jax import sharding
from experiments import mesh_flag

_DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp8": "fp8"}
_HF_DIR = flags.DEFINE_string("hf_dir", None, "HF checkpoint directory to read (config.json + safetensors).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "With --to_hf: our converted checkpoint directory.")
_OUT = flags.DEFINE_string("out", None, "Output directory; must not exist or be empty unless --overwrite.")
_DTYPE = flags.DEFINE_enum("dtype", "bf16", list(_DTYPES), "Weight dtype; fp8 keeps/writes e4m3 + scale_inv.")
_TO_HF = flags.DEFINE_bool("to_hf", False, "Convert our checkpoint (--checkpoint) to HF safetensors.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out.")
_SHARD_GB = flags.DEFINE_float("max_shard_gb", 5.0, "With --to_hf: largest safetensors shard, GB.")
_SCALE_FMT = flags.DEFINE_enum("scale_fmt", None, ["ue8m0"], "With --to_hf --dtype=fp8: power-of-two scales for "
                               "weights quantised here (stored FP8 weights keep their own).")

QUANTIZATION = "quantization_config.json"


class Progress:
  """A progress line on `stream`: refreshed in place on a terminal, a new line every `every_s` otherwise."""

  def __init__(self, label: str, stream=None, every_s: float | None = None):
    self.label, self.stream = label, stream or sys.stderr
    self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
    self.every_s = every_s if every_s is not None else (0.2 if self.tty else 10.0)
    self.start, self.last, self.finished = time.perf_counter(), -math.inf, False

  def __call__(self, done: int, total: int) -> None:
    now = time.perf_counter()
    if self.finished or (now - self.last < self.every_s and done < total):
      return
    self.last, self.finished = now, done >= total
    seconds = max(now - self.start, 1e-9)
    scale, unit = next((s, u) for s, u in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1, "B")) if total >= s or s == 1)
    line = (f"{self.label}: {done / scale:.2f}/{total / scale:.2f} {unit} ({100 * done / max(total, 1):.0f}%), "
            f"{done / 1e6 / seconds:.1f} MB/s, {seconds:.0f} s")
    if self.tty:
      self.stream.write("\r" + line + "\x1b[K" + ("\n" if self.finished else ""))
    else:
      self.stream.write(line + "\n")
    self.stream.flush()


def parse_mesh(spec: str) -> jax.sharding.Mesh:
  try:
    return sharding.mesh_from_spec(spec)
  except sharding.MeshError as e:
    raise app.UsageError(f"--mesh={spec}: {e}") from e


def to_ours(hf_dir: str, out: str, dtype: str, overwrite: bool = False, mesh: jax.sharding.Mesh | None = None,
            progress: hf_checkpoint.Progress | None = None) -> None:
  out = os.path.abspath(out)
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise app.UsageError(f"{out} exists and is not empty; pass --overwrite")
  hf_config = hf_checkpoint.read_hf_config(hf_dir)
  cfg = config.ModelConfig.from_hf(hf_config)
  shardings = model_lib.variable_shardings(cfg, mesh) if mesh is not None else None
  loaded = hf_checkpoint.load(hf_dir, cfg, dtype, shardings, progress)  # validates before it reads
  variables, fp8 = loaded if dtype == "fp8" else (loaded, None)
  tmp = f"{out}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  checkpointer = ocp.StandardCheckpointer()
  try:
    checkpointer.save(os.path.join(tmp, "variables"), variables)
    if fp8:
      checkpointer.save(os.path.join(tmp, "fp8"), fp8)
    checkpointer.wait_until_finished()
    if fp8:
      _write_json(os.path.join(tmp, QUANTIZATION), hf_config.get("quantization_config") or {})
    hf_config.pop("quantization_config", None)  # our variables hold dequantised weights
    _write_json(os.path.join(tmp, "config.json"), hf_config)
    if os.path.isdir(out):
      shutil.rmtree(out)
    os.replace(tmp, out)
  except BaseException:
    _quietly(checkpointer.wait_until_finished)  # no background write may land after the clean-up
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _quietly(fn) -> None:
  try:
    fn()
  except Exception as e:  # noqa: BLE001 - the original error is the one worth raising
    logging.warning("while cleaning up: %s: %s", type(e).__name__, e)


def restore(checkpoint: str, mesh: jax.sharding.Mesh | None = None, with_fp8: bool = True):
  """(cfg, variables, fp8 tree or None, quantization_config or None) of a converted checkpoint.

  Without a mesh the arrays come back as numpy; with one, each lands in its sharded layout.
  """
  checkpoint = os.path.abspath(checkpoint)
  with open(os.path.join(checkpoint, "config.json")) as f:
    cfg = config.ModelConfig.from_hf(json.load(f))
  checkpointer = ocp.StandardCheckpointer()
  shardings = model_lib.variable_shardings(cfg, mesh) if mesh is not None else None
  variables = _restore(checkpointer, os.path.join(checkpoint, "variables"), lambda _: shardings)
  if not with_fp8 or not os.path.exists(os.path.join(checkpoint, "fp8")):
    return cfg, variables, None, None
  fp8 = _restore(checkpointer, os.path.join(checkpoint, "fp8"),
                 lambda stored: hf_checkpoint.fp8_shardings(shardings, stored) if shardings is not None else None)
  with open(os.path.join(checkpoint, QUANTIZATION)) as f:
    return cfg, variables, fp8, json.load(f)


def _restore(checkpointer: ocp.StandardCheckpointer, path: str, layout):
  """An orbax tree as stored (shapes and dtypes from its metadata), on the shardings `layout(stored)` or,
  when that is None, as host numpy arrays (whatever mesh wrote it)."""
  stored = checkpointer.metadata(path).item_metadata.tree
  shardings = layout(stored)
  if shardings is None:
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), stored)
    return ocp.PyTreeCheckpointer().restore(path, restore_args=as_numpy)
  flat = convert.flatten(shardings)
  return checkpointer.restore(path, convert.unflatten({
      p: jax.ShapeDtypeStruct(tuple(a.shape), a.dtype, sharding=flat[p]) for p, a in convert.flatten(stored).items()}))


def to_hf(checkpoint: str, out: str, dtype: str, max_shard_bytes: int, overwrite: bool = False,
          mesh: jax.sharding.Mesh | None = None, scale_fmt: str | None = None,
          progress: hf_checkpoint.Progress | None = None) -> None:
  cfg, variables, fp8, quantization = restore(checkpoint, mesh, with_fp8=dtype == "fp8")
  if dtype == "fp8" and scale_fmt is None and quantization:
    scale_fmt = quantization.get("scale_fmt")
  hf_checkpoint.save(variables, cfg, out, dtype, max_shard_bytes, fp8, overwrite, scale_fmt, progress)


def _write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)


def main(argv):
  del argv
  logging.info("process %d of %d, %d local / %d devices", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  if not _OUT.value:
    raise app.UsageError("--out is required")
  dtype = _DTYPES[_DTYPE.value]
  mesh = parse_mesh(mesh_flag.MESH.value) if mesh_flag.MESH.value else None  # none: host numpy arrays
  if _TO_HF.value:
    if not _CHECKPOINT.value:
      raise app.UsageError("--to_hf needs --checkpoint")
    to_hf(_CHECKPOINT.value, _OUT.value, dtype, int(_SHARD_GB.value * 1e9), _OVERWRITE.value, mesh,
          _SCALE_FMT.value, Progress("write"))
  else:
    if not _HF_DIR.value:
      raise app.UsageError("pass --hf_dir (or --to_hf --checkpoint)")
    to_ours(_HF_DIR.value, _OUT.value, dtype, _OVERWRITE.value, mesh, Progress("read"))
  logging.info("wrote %s", os.path.abspath(_OUT.value))


if __name__ == "__main__":
  app.run(main)
