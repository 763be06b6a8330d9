"""Peak memory of loading a multi-shard FP8 HF checkpoint of at least 1 GiB, against its largest tensor.

  python -m experiments.bench_convert                     # about 3 minutes on 2 CPU cores, ~8 GB RAM at most

Writes a random FP8 checkpoint (DeepSeek-V3 layout, 128x128 block scales) in a child process, then loads
it in a fresh child process with `hf_checkpoint.load(..., dtype=--dtype)` and reports that process's peak
RSS beside the output size and the largest tensor: a streaming load peaks near
(interpreter + libraries) + output + a few copies of the largest tensor.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
from absl import app
from absl import flags

from dsv3_jax import config
from dsv3_jax import hf_checkpoint
from dsv3_jax import model as model_lib

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/dsv3_bench_convert", "Where the generated checkpoint goes.")
_N_LAYERS = flags.DEFINE_integer("n_layers", 11, "Decoder layers of the generated model (1 dense, rest MoE).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Dtype the load dequantises to.")
_SHARD_GIB = flags.DEFINE_float("shard_gib", 0.25, "Largest shard of the generated checkpoint.")
_STAGE = flags.DEFINE_enum("stage", "all", ["all", "generate", "load"], "Internal: which child stage to run.")


def _config() -> config.ModelConfig:
  return config.ModelConfig(vocab_size=32000, dim=1024, inter_dim=4096, moe_inter_dim=512, n_layers=_N_LAYERS.value,
                            n_dense_layers=1, n_heads=8, n_routed_experts=64, n_activated_experts=6,
                            n_expert_groups=8, n_limited_groups=4, q_lora_rank=384, kv_lora_rank=256,
                            qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_mtp_layers=1,
                            dtype="bfloat16")


def _peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _generate(path: str) -> None:
  cfg = _config()
  abstract = jax.eval_shape(lambda: model_lib.init(cfg, jax.random.PRNGKey(0)))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: (rng.standard_normal(s.shape, np.float32) * 0.02), abstract)
  shutil.rmtree(path, ignore_errors=True)
  hf_checkpoint.save(variables, cfg, path, dtype="fp8", max_shard_bytes=int(_SHARD_GIB.value * 2**30))


def _load(path: str) -> dict:
  baseline = _peak_rss_bytes()  # high-water mark after imports, before any tensor is read
  start = time.perf_counter()
  variables = hf_checkpoint.load(path, dtype=_DTYPE.value)
  seconds = time.perf_counter() - start
  files = hf_checkpoint.open_checkpoint(path)
  largest = max(files.keys(), key=lambda n: int(np.prod(files.shape(n))))
  elements = int(np.prod(files.shape(largest)))
  return {
      "checkpoint_bytes": sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)),
      "shards": sum(f.endswith(".safetensors") for f in os.listdir(path)),
      "largest_tensor": largest,
      "largest_tensor_elements": elements,
      "largest_tensor_bytes_as_loaded": elements * np.dtype(hf_checkpoint._SAVE_DTYPES[_DTYPE.value]).itemsize,
      "output_bytes": sum(a.nbytes for a in jax.tree.leaves(variables)),
      "baseline_rss_bytes": baseline,
      "peak_rss_bytes": _peak_rss_bytes(),
      "load_seconds": seconds,
  }


def _child(stage: str) -> str:
  args = [sys.executable, "-m", "experiments.bench_convert", f"--stage={stage}", f"--workdir={_WORKDIR.value}",
          f"--n_layers={_N_LAYERS.value}", f"--dtype={_DTYPE.value}", f"--shard_gib={_SHARD_GIB.value}"]
  return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def _report(r: dict) -> None:
  gib = 2**30
  extra = r["peak_rss_bytes"] - r["baseline_rss_bytes"] - r["output_bytes"]
  print(f"checkpoint: {r['checkpoint_bytes'] / gib:.2f} GiB in {r['shards']} shards (FP8 + 128x128 scales)")
  print(f"largest tensor: {r['largest_tensor']} ({r['largest_tensor_elements']:,} elements, "
        f"{r['largest_tensor_bytes_as_loaded'] / 2**20:.0f} MiB as {_DTYPE.value})")
  print(f"output ({_DTYPE.value}): {r['output_bytes'] / gib:.2f} GiB; load {r['load_seconds']:.1f} s, "
        f"{r['checkpoint_bytes'] / 2**20 / r['load_seconds']:.0f} MiB/s read")
  print(f"peak RSS {r['peak_rss_bytes'] / gib:.2f} GiB = baseline {r['baseline_rss_bytes'] / gib:.2f} GiB "
        f"+ output {r['output_bytes'] / gib:.2f} GiB + {extra / 2**20:.0f} MiB "
        f"({extra / r['largest_tensor_bytes_as_loaded']:.1f}x the largest tensor)")


def main(argv):
  del argv
  path = os.path.join(_WORKDIR.value, "hf_fp8")
  if _STAGE.value == "generate":
    _generate(path)
  elif _STAGE.value == "load":
    print(json.dumps(_load(path)))
  else:
    _child("generate")
    _report(json.loads(_child("load").strip().splitlines()[-1]))


if __name__ == "__main__":
  app.run(main)
