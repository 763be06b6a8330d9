"""The memory plan of the 671B config on DeepSeek-V3's own mesh, from shapes only (eval_shape, no allocation)."""

import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from configs import deepseek_v3_671b
from dsv3_jax import config as config_lib
from dsv3_jax import model as model_lib
from dsv3_jax import plan
from dsv3_jax import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**mesh):
  c = deepseek_v3_671b.get_config()
  for key, value in mesh.items():
    c.mesh[key] = value
  return c


@pytest.fixture(scope="module")
def moe_stack_bytes():
  """(all MoE-stack parameter bytes, the routed experts' share), counted straight from the init's shapes."""
  cfg = config_lib.deepseek_v3_671b()
  shapes = jax.eval_shape(lambda r: nn.unbox(model_lib.Transformer(cfg).init(r, jnp.zeros((1, 2), jnp.int32))),
                          jax.random.PRNGKey(0))["params"]["moe_layers"]
  nbytes = lambda tree: sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(tree))
  return nbytes(shapes), nbytes(shapes["ffn"]["experts"])


def test_pp16_ep64_zero1_per_device_bytes(moe_stack_bytes):
  p = plan.plan(_config(pipe=16, data=2, expert=64, zero1=True))
  assert p.n_devices == 2048 and len(p.stages) == 16
  assert [(s.dense_layers, s.moe_layers) for s in p.stages] == [(3, 1)] + [(0, 4)] * 14 + [(0, 1)]
  moe, experts = moe_stack_bytes
  middle = p.stages[1]  # 4 of the 58 MoE layers
  # Routed experts split 64 ways; everything else in a layer is replicated (no fsdp, no tensor axis).
  want = 4 / 58 * (experts / 64 + (moe - experts))
  assert middle.params == pytest.approx(want, rel=1e-9)
  assert middle.grads == middle.params
  # BF16 moments (2 x 2 bytes) of fp32 parameters: as many bytes as the parameters, less under ZeRO-1, where
  # expert moments split over data (2) and the rest over data x expert (128).
  assert middle.opt_state_other == pytest.approx(middle.params, abs=64)  # + the step counters
  assert middle.opt_state == pytest.approx(4 / 58 * (experts / 64 / 2 + (moe - experts) / 128), abs=64)
  # Activations: 15 micro-batches in flight (1F1B: stage s holds pipe - s) of 4 layers' saved inputs and the
  # shared mask, plus one layer recomputed in full (remat "full").
  assert middle.in_flight == 15
  a = p.per_micro
  assert middle.activations == 15 * (4 * a["moe"] + a["mask"]) + a["moe_full"]
  # remat "full" keeps only the layer input (1 x 4096 tokens x dim in bf16) and RoPE's 32 fp32 frequencies.
  assert a["moe"] == 4096 * 7168 * 2 + 32 * 4
  # Recomputed in full, a layer holds far more than its input (its weights' bf16 copies, the expert tiles; no
  # [S, S] scores: training attention is blockwise, see tests/test_flash_attention.py).
  assert a["moe_full"] > 50 * a["moe"]
  assert p.heaviest.total >= max(s.total for s in p.stages)
  text = plan.format_plan(p, 80)
  assert "pipe=16 x data=2 x expert=64 = 2048 devices" in text and "ZeRO-1 on" in text


def test_zero1_only_changes_the_optimizer_state():
  on = plan.plan(_config(pipe=16, data=2, expert=64, zero1=True)).stages[1]
  off = plan.plan(_config(pipe=16, data=2, expert=64, zero1=False)).stages[1]
  assert (on.params, on.grads, on.activations) == (off.params, off.grads, off.activations)
  assert (on.opt_state, on.opt_state_other) == (off.opt_state_other, off.opt_state)
  assert on.opt_state < off.opt_state / 4


@pytest.mark.parametrize("mesh, devices, message", [
    (dict(pipe=8, data=2, expert=48), None, "mesh.expert = 48 does not divide the model's n_routed_experts = 256"),
    (dict(pipe=16, data=2, expert=64, tensor=3), None, "mesh.tensor = 3 does not divide the model's n_heads = 128"),
    (dict(pipe=1, data=-1, expert=64), 2048, "= 2048 does not divide the batch of 3072 sequences"),
    (dict(pipe=64, data=1, expert=64), None, "mesh.pipe = 64: more stages than the model's 61 layers"),
    (dict(pipe=16, data=-1, expert=64), None, "mesh.data = -1 needs a device count"),
])
def test_meshes_that_do_not_divide_the_model_are_rejected(mesh, devices, message):
  with pytest.raises(sharding.MeshError, match=message):
    plan.plan(_config(**mesh), devices)


def test_cli_rejects_a_mesh_too_small_for_the_model_state():
  out = subprocess.run([sys.executable, "-m", "experiments.plan", "--config=configs/deepseek_v3_671b.py",
                        "--config.mesh.expert=4"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 1, out.stderr[-2000:]
  assert "pipe=16 x data=2 x expert=4 = 128 devices" in out.stdout
  assert "rejected: stage 1 needs" in out.stdout and "optimizer state alone, over the 80 GiB budget" in out.stdout
