"""HF safetensors checkpoints (FP8 included) <-> our variables, on a tiny model with ragged FP8 blocks.

dim=160 and inter_dim=200 make FP8 weights with a dimension above 128 and not a multiple of it, so
the partial edge blocks of the 128x128 scale grid are exercised.
"""

import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from dsv3_jax import config
from dsv3_jax import convert
from dsv3_jax import hf_checkpoint as hc
from dsv3_jax import torch_parity
from experiments import convert_hf

LOGITS_TOL = 1e-5
TOKENS = np.array([[1, 5, 9, 17, 33, 65, 100, 127], [3, 3, 7, 60, 2, 90, 11, 42]])
SHARD_BYTES = 200_000


@pytest.fixture(scope="module")
def cfg():
  return config.tiny(dim=160, inter_dim=200)


@pytest.fixture(scope="module")
def variables(cfg):
  hf = torch_parity.tiny_hf_model(cfg)
  return torch_parity.variables_from_hf(hf, cfg, torch_parity.tiny_hf_mtp(hf, cfg.n_mtp_layers))


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory, cfg, variables):
  out = str(tmp_path_factory.mktemp("ckpt") / "fp8")
  hc.save(variables, cfg, out, dtype="fp8", max_shard_bytes=SHARD_BYTES)
  return out


def _tensors(hf_dir):
  files = hc.open_checkpoint(hf_dir)
  return {name: files[name] for name in files}


def _assert_same_bytes(dir_a, dir_b):
  a, b = _tensors(dir_a), _tensors(dir_b)
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
    assert a[name].tobytes() == b[name].tobytes(), name


def test_fp8_layout(fp8_dir, cfg):
  files = hc.open_checkpoint(fp8_dir)
  assert len({info["path"] for info in files.info.values()}) > 1  # sharded
  gate = "model.layers.0.mlp.gate_proj.weight"  # [200, 160]: partial blocks in both dimensions
  assert files.dtype_name(gate) == "F8_E4M3" and files.shape(gate + "_scale_inv") == (2, 2)
  for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
               f"model.layers.{cfg.n_layers}.eh_proj.weight", "model.norm.weight"):
    assert files.dtype_name(name) == "BF16", name
  assert files.dtype_name("model.layers.1.mlp.gate.e_score_correction_bias") == "F32"
  with open(os.path.join(fp8_dir, "config.json")) as f:
    assert json.load(f)["quantization_config"]["weight_block_size"] == [128, 128]


def test_fp32_round_trip_is_bit_exact(tmp_path, cfg, variables):
  hc.save(variables, cfg, str(tmp_path / "a"), dtype="float32", max_shard_bytes=SHARD_BYTES)
  hc.save(hc.load(str(tmp_path / "a"), cfg), cfg, str(tmp_path / "b"), dtype="float32")
  _assert_same_bytes(tmp_path / "a", tmp_path / "b")
  for name, value in convert.params_to_hf(variables, cfg).items():
    np.testing.assert_array_equal(_tensors(tmp_path / "b")[name], value)


def test_fp8_keep_mode_round_trip_keeps_bytes(tmp_path, fp8_dir, cfg):
  variables, fp8_weights = hc.load(fp8_dir, cfg, dtype="fp8")
  assert all(hc.is_fp8_name(name) for name in fp8_weights)
  hc.save(variables, cfg, str(tmp_path / "again"), dtype="fp8", fp8_weights=fp8_weights)
  _assert_same_bytes(fp8_dir, tmp_path / "again")


def test_fp8_checkpoint_logits_match_torch_on_dequantised_weights(fp8_dir, cfg):
  variables = hc.load(fp8_dir, cfg, dtype="float32")
  no_mtp = cfg.replace(n_mtp_layers=0)
  hf = torch_parity.tiny_hf_model(no_mtp, seed=5)
  state = convert.params_to_hf({"params": {k: v for k, v in variables["params"].items() if k != "mtp_0"},
                                "routing": variables["routing"]}, no_mtp, fused_experts=True)
  hf.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, strict=True)
  report = torch_parity.compare(hf, variables, cfg, TOKENS)
  assert report.logits_max_diff <= LOGITS_TOL, report
  assert not any(report.expert_mismatches), report


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_transformers_loads_our_output(tmp_path, cfg, variables, dtype):
  hc.save(variables, cfg, str(tmp_path / dtype), dtype=dtype, max_shard_bytes=SHARD_BYTES)
  model, info = transformers.DeepseekV3ForCausalLM.from_pretrained(str(tmp_path / dtype), output_loading_info=True)
  assert not info["missing_keys"], info
  mtp = f"model.layers.{cfg.n_layers}."
  assert all(k.startswith(mtp) for k in info["unexpected_keys"]), info
  assert not info["mismatched_keys"], info
  ours = convert.params_to_hf(variables, cfg)["model.layers.0.mlp.gate_proj.weight"]
  theirs = model.model.layers[0].mlp.gate_proj.weight.detach().float().numpy()
  np.testing.assert_array_equal(theirs, ours.astype(ml_dtypes.bfloat16).astype(np.float32) if dtype == "bfloat16"
                                else ours)


def test_bf16_dequant_matches_deepseek_weight_dequant(fp8_dir):
  files = hc.open_checkpoint(fp8_dir)
  name = "model.layers.0.mlp.gate_proj.weight"
  w, scale = files[name], files[name + "_scale_inv"]
  w_t = torch.from_numpy(w.view(np.uint8).copy()).view(torch.float8_e4m3fn)
  s_t = torch.from_numpy(scale).repeat_interleave(128, 0).repeat_interleave(128, 1)[:w.shape[0], :w.shape[1]]
  expected = (w_t.float() * s_t).bfloat16().view(torch.int16).numpy()
  ours = hc.dequantize(w, scale, "bfloat16", name)
  np.testing.assert_array_equal(ours.view(np.int16), expected)


def test_quantize_clamps_zero_blocks_and_saturates():
  w = np.zeros((130, 260), np.float32)
  w[0, 0], w[129, 259] = 3.0, -1e3
  q, scale = hc.quantize(w)
  assert scale.shape == (2, 3) and np.all(np.isfinite(q.astype(np.float32)))
  assert scale[0, 1] == np.float32(1e-4 / 448)  # an all-zero block: amax clamped at 1e-4
  np.testing.assert_allclose(hc.dequantize(q, scale)[[0, 129], [0, 259]], [3.0, -1e3], rtol=1e-6)


def _rewrite(src, dst, edit):
  """A single-file copy of `src` with its tensor dict changed by `edit` (config.json kept)."""
  os.makedirs(dst)
  tensors = _tensors(src)
  edit(tensors)
  hc._write_file(os.path.join(dst, hc.SINGLE), tensors)
  shutil.copy(os.path.join(src, "config.json"), dst)
  return dst


O_PROJ = "model.layers.0.self_attn.o_proj.weight"


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.norm.weight"), "'model.norm.weight' is missing"),
    (lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}), "model.layers.0.extra.weight"),
    (lambda t: t.update({"lm_head.weight": np.zeros((128, 8), np.float32)}), "'lm_head.weight' has shape"),
    (lambda t: t.pop(O_PROJ + "_scale_inv"), f"FP8 tensor {O_PROJ!r} has no"),
    (lambda t: t.update({O_PROJ + "_scale_inv": np.ones((3, 3), np.float32)}), f"{O_PROJ + '_scale_inv'!r} has shape"),
    (lambda t: t.update({"model.norm.weight": np.ones(160, np.int32)}), "'model.norm.weight' has dtype I32"),
])
def test_bad_tensors_raise_naming_them(tmp_path, fp8_dir, cfg, edit, message):
  bad = _rewrite(fp8_dir, str(tmp_path / "bad"), edit)
  before = sorted(os.listdir(tmp_path))
  with pytest.raises(hc.ConversionError, match=message.replace("[", r"\[").replace("(", r"\(")):
    hc.load(bad, cfg)
  assert sorted(os.listdir(tmp_path)) == before


def test_truncated_shard_and_missing_shard_raise_naming_the_file(tmp_path, fp8_dir, cfg):
  copy = shutil.copytree(fp8_dir, tmp_path / "copy")
  shard = sorted(p for p in os.listdir(copy) if p.startswith("model-"))[1]
  with open(copy / shard, "r+b") as f:
    f.truncate(os.path.getsize(copy / shard) - 10)
  with pytest.raises(hc.ConversionError, match=f"{shard}: truncated"):
    hc.load(str(copy), cfg)
  os.remove(copy / shard)
  with pytest.raises(hc.ConversionError, match=f"shard '{shard}' named in .*{hc.INDEX}"):
    hc.load(str(copy), cfg)


def test_config_inconsistent_with_tensors_raises(tmp_path, fp8_dir):
  copy = shutil.copytree(fp8_dir, tmp_path / "copy")
  with open(copy / "config.json") as f:
    hf_config = json.load(f)
  hf_config["intermediate_size"] = 256
  with open(copy / "config.json", "w") as f:
    json.dump(hf_config, f)
  with pytest.raises(hc.ConversionError, match="'model.layers.0.mlp.gate_proj.weight' has shape"):
    hc.load(str(copy))


def test_save_refuses_non_empty_dir_and_leaves_nothing_when_interrupted(tmp_path, cfg, variables, monkeypatch):
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("keep")
  with pytest.raises(FileExistsError):
    hc.save(variables, cfg, str(tmp_path / "full"))
  def interrupted(*_):
    raise KeyboardInterrupt

  monkeypatch.setattr(hc, "_write_json", interrupted)
  with pytest.raises(KeyboardInterrupt):
    hc.save(variables, cfg, str(tmp_path / "out"))
  assert sorted(os.listdir(tmp_path)) == ["full"]


@pytest.mark.parametrize("dtype", ["fp8", "bfloat16"])
def test_orbax_round_trip_through_the_tool(tmp_path, fp8_dir, dtype):
  convert_hf.to_ours(fp8_dir, str(tmp_path / "ours"), dtype)
  assert sorted(os.listdir(tmp_path)) == ["ours"]
  convert_hf.to_hf(str(tmp_path / "ours"), str(tmp_path / "back"), dtype, SHARD_BYTES)
  if dtype == "fp8":
    _assert_same_bytes(fp8_dir, tmp_path / "back")
  else:
    w1 = hc.load(fp8_dir, dtype="bfloat16")["params"]["dense_layers"]["ffn"]["w1"]["kernel"][0]
    np.testing.assert_array_equal(_tensors(tmp_path / "back")["model.layers.0.mlp.gate_proj.weight"], w1.T)
