"""Peak memory of loading a multi-shard FP8 HF checkpoint of at least 1 GiB, plain and onto a mesh.

  python -m experiments.bench_convert                     # about 2 minutes on 2 CPU cores, ~8 GB RAM at most

Writes a random FP8 checkpoint (DeepSeek-V3 layout, 128x128 block scales) in a child process, then
loads it twice, each time in a fresh child process, and reports that process's peak RSS beside the
output size and the largest tensor:
  1. `hf_checkpoint.load(..., dtype=--dtype)` into host numpy arrays;
  2. the same onto a mesh (--mesh, default fsdp=4,expert=2) over 8 fake CPU devices (XLA_FLAGS set
     for that child before it imports jax), each device's slices read and put on it one at a time.
A streaming load peaks near (interpreter + libraries) + output + a few copies of the largest tensor.
On CPU the devices' buffers are host memory, so the sharded load's output counts in its RSS too.
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
from dsv3_jax import convert
from dsv3_jax import hf_checkpoint
from dsv3_jax import model as model_lib
from dsv3_jax import sharding
from experiments import mesh_flag

# The sharded stage's child process gets 8 fake CPU devices; XLA reads this before jax starts there.
_FAKE_DEVICES = "--xla_force_host_platform_device_count=8"

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/dsv3_bench_convert", "Where the generated checkpoint goes.")
_N_LAYERS = flags.DEFINE_integer("n_layers", 11, "Decoder layers of the generated model (1 dense, rest MoE).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Dtype the load dequantises to.")
_SHARD_GIB = flags.DEFINE_float("shard_gib", 0.25, "Largest shard of the generated checkpoint.")
_DEFAULT_MESH = "fsdp=4,expert=2"  # --mesh of the sharded load, over the fake CPU devices


def _mesh_spec() -> str:
  return mesh_flag.MESH.value or _DEFAULT_MESH
_STAGE = flags.DEFINE_enum("stage", "all", ["all", "generate", "load", "load_sharded"], "Internal: child stage.")


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
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: (rng.standard_normal(s.shape, np.float32) * 0.02),
                           convert.abstract_variables(cfg))
  shutil.rmtree(path, ignore_errors=True)
  hf_checkpoint.save(variables, _config(), path, dtype="fp8", max_shard_bytes=int(_SHARD_GIB.value * 2**30))


def _output_bytes(variables) -> int:
  """Host bytes of numpy leaves, or the bytes of every device buffer of jax leaves (replicas included)."""
  return sum(sum(s.data.nbytes for s in a.addressable_shards) if isinstance(a, jax.Array) else a.nbytes
             for a in jax.tree.leaves(variables))


def _load(path: str, sharded: bool) -> dict:
  cfg = _config()
  shardings = model_lib.variable_shardings(cfg, sharding.mesh_from_spec(_mesh_spec())) if sharded else None
  files = hf_checkpoint.open_checkpoint(path)
  baseline = _peak_rss_bytes()  # high-water mark after imports, before any tensor is read
  start = time.perf_counter()
  variables = hf_checkpoint.load(path, cfg, dtype=_DTYPE.value, shardings=shardings)
  jax.block_until_ready(variables)
  seconds = time.perf_counter() - start
  largest = max(files, key=lambda n: int(np.prod(files.shape(n))))
  elements = int(np.prod(files.shape(largest)))
  return {
      "checkpoint_bytes": sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)),
      "tensor_bytes": sum(info["nbytes"] for info in files.info.values()),
      "shards": sum(f.endswith(".safetensors") for f in os.listdir(path)),
      "largest_tensor": largest,
      "largest_tensor_elements": elements,
      "largest_tensor_bytes_as_loaded": elements * np.dtype(hf_checkpoint._SAVE_DTYPES[_DTYPE.value]).itemsize,
      "output_bytes": _output_bytes(variables),
      "baseline_rss_bytes": baseline,
      "peak_rss_bytes": _peak_rss_bytes(),
      "load_seconds": seconds,
      "devices": jax.device_count(),
  }


def _child(stage: str) -> str:
  args = [sys.executable, "-m", "experiments.bench_convert", f"--stage={stage}", f"--workdir={_WORKDIR.value}",
          f"--n_layers={_N_LAYERS.value}", f"--dtype={_DTYPE.value}", f"--shard_gib={_SHARD_GIB.value}",
          f"--mesh={_mesh_spec()}"]
  env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {_FAKE_DEVICES}".strip()}
  return subprocess.run(args, check=True, capture_output=True, text=True,
                        env=env if stage == "load_sharded" else None).stdout


def _report(label: str, r: dict) -> None:
  gib = 2**30
  extra = r["peak_rss_bytes"] - r["baseline_rss_bytes"] - r["output_bytes"]
  print(f"{label}: load {r['load_seconds']:.1f} s, {r['checkpoint_bytes'] / 2**20 / r['load_seconds']:.0f} MiB/s "
        f"read; output {r['output_bytes'] / gib:.2f} GiB")
  print(f"  peak RSS {r['peak_rss_bytes'] / gib:.2f} GiB = baseline {r['baseline_rss_bytes'] / gib:.2f} GiB "
        f"+ output {r['output_bytes'] / gib:.2f} GiB + {extra / 2**20:.0f} MiB "
        f"({extra / r['largest_tensor_bytes_as_loaded']:.1f}x the largest tensor)")


def main(argv):
  del argv
  path = os.path.join(_WORKDIR.value, "hf_fp8")
  if _STAGE.value == "generate":
    _generate(path)
  elif _STAGE.value in ("load", "load_sharded"):
    print(json.dumps(_load(path, sharded=_STAGE.value == "load_sharded")))
  else:
    _child("generate")
    plain = json.loads(_child("load").strip().splitlines()[-1])
    sharded = json.loads(_child("load_sharded").strip().splitlines()[-1])
    print(f"checkpoint: {plain['checkpoint_bytes'] / 2**30:.2f} GiB in {plain['shards']} shards "
          f"(FP8 + 128x128 scales)")
    print(f"largest tensor: {plain['largest_tensor']} ({plain['largest_tensor_elements']:,} elements, "
          f"{plain['largest_tensor_bytes_as_loaded'] / 2**20:.0f} MiB as {_DTYPE.value})")
    _report("plain (host numpy)", plain)
    _report(f"sharded ({_mesh_spec()} over {sharded['devices']} CPU devices)", sharded)


if __name__ == "__main__":
  app.run(main)
