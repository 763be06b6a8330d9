"""HF safetensors checkpoints (FP8 included) <-> our variables, unsharded and streamed onto meshes.

The checkpoints are made here without our writer: transformers' `save_pretrained` of a random tiny
`DeepseekV3ForCausalLM` plus its MTP layer (layer n_layers, per-expert keys, with the embedding/head
copies) written with the `safetensors` library, and an FP8 copy quantised by this file in torch with
DeepSeek's block rule. dim=160 and inter_dim=200 give FP8 weights with partial 128x128 edge blocks in
both dimensions; three layers (one dense, two MoE) let a sharding split the layer axis.
"""

import io
import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.torch
import torch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from dsv3_jax import config
from dsv3_jax import convert
from dsv3_jax import hf_checkpoint as hc
from dsv3_jax import model as model_lib
from dsv3_jax import safetensors_file
from dsv3_jax import sharding
from dsv3_jax import torch_parity
from experiments import convert_hf

CFG = config.tiny(dim=160, inter_dim=200, n_layers=3)
LOGITS_TOL = 1e-5
TOKENS = np.array([[1, 5, 9, 17, 33, 65, 100, 127], [3, 3, 7, 60, 2, 90, 11, 42]])
SHARD_BYTES = 200_000
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
MTP = f"model.layers.{CFG.n_layers}."
COPIES = {MTP + "embed_tokens.weight", MTP + "shared_head.head.weight"}
MESHES = {"expert4_data2": {"expert": 4, "data": 2}, "fsdp4_expert2": {"fsdp": 4, "expert": 2}}


# ---------------------------------------------------------------------------------------------------
# Checkpoints written without our code.


def _torch_state(hf_dir) -> dict[str, torch.Tensor]:
  """Every tensor of a checkpoint directory, read with the `safetensors` library."""
  out = {}
  for name in sorted(os.listdir(hf_dir)):
    if name.endswith(".safetensors"):
      out.update(safetensors.torch.load_file(os.path.join(hf_dir, name)))
  return out


def _write_dir(out_dir, tensors: dict[str, torch.Tensor], hf_config: dict, n_files: int = 3) -> str:
  os.makedirs(out_dir)
  names, weight_map = list(tensors), {}
  for i in range(n_files):
    shard = f"model-{i + 1:05d}-of-{n_files:05d}.safetensors"
    part = {n: tensors[n].contiguous() for n in names[i::n_files]}
    safetensors.torch.save_file(part, os.path.join(out_dir, shard), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(part, shard))
  with open(os.path.join(out_dir, hc.INDEX), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_config, f)
  return str(out_dir)


def _per_expert(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """transformers' fused expert tensors [E, 2F, D] / [E, D, F] as the checkpoint's per-expert keys."""
  out = {}
  for name, value in state.items():
    prefix, fused, rest = name.partition("mlp.experts.")
    if not fused:
      out[name] = value
    elif rest == "gate_up_proj":
      half = value.shape[1] // 2
      for e in range(value.shape[0]):
        out[f"{prefix}mlp.experts.{e}.gate_proj.weight"] = value[e, :half]
        out[f"{prefix}mlp.experts.{e}.up_proj.weight"] = value[e, half:]
    else:
      for e in range(value.shape[0]):
        out[f"{prefix}mlp.experts.{e}.down_proj.weight"] = value[e]
  return out


def _deepseek_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
  """DeepSeek's 128x128 block FP8: amax clamped at 1e-4, scale = amax / 448, clip, cast."""
  rows, cols = -(-w.shape[0] // 128), -(-w.shape[1] // 128)
  padded = torch.zeros(rows * 128, cols * 128)
  padded[:w.shape[0], :w.shape[1]] = w.float().abs()
  scale = padded.view(rows, 128, cols, 128).amax(dim=(1, 3)).clamp(min=1e-4) / 448
  q = (w.float() / _expand(scale, w.shape)).clamp(-448, 448).to(torch.float8_e4m3fn)
  return q, scale


def _expand(scale: torch.Tensor, shape) -> torch.Tensor:
  return scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:shape[0], :shape[1]]


def _deepseek_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
  """Element (i, j) times the scale of block (i // 128, j // 128), partial edge blocks included."""
  return q.float() * _expand(scale, q.shape)


@pytest.fixture(scope="module")
def reference():
  hf = torch_parity.tiny_hf_model(CFG)
  return hf, torch_parity.tiny_hf_mtp(hf, CFG.n_mtp_layers)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, reference):
  """transformers' save_pretrained (fp32, sharded) plus the MTP layer with its embedding/head copies."""
  hf, mtp = reference
  out = tmp_path_factory.mktemp("ckpt") / "hf"
  hf.save_pretrained(out, max_shard_size="200KB")
  state = {k: torch.from_numpy(np.ascontiguousarray(v))
           for k, v in _per_expert(torch_parity.hf_state(hf, mtp)).items() if k.startswith(MTP)}
  state[MTP + "embed_tokens.weight"] = hf.model.embed_tokens.weight.detach().clone()
  state[MTP + "shared_head.head.weight"] = hf.lm_head.weight.detach().clone()
  safetensors.torch.save_file(state, out / "model-mtp.safetensors", metadata={"format": "pt"})
  with open(out / hc.INDEX) as f:
    index = json.load(f)
  index["weight_map"].update(dict.fromkeys(state, "model-mtp.safetensors"))
  with open(out / hc.INDEX, "w") as f:
    json.dump(index, f)
  return str(out)


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory, hf_dir):
  """The same weights as DeepSeek ships them: FP8 linear weights + block scales, rest bf16, bias fp32."""
  tensors = {}
  for name, value in _torch_state(hf_dir).items():
    if hc.is_fp8_name(name):
      tensors[name], tensors[name + "_scale_inv"] = _deepseek_quantize(value)
    else:
      tensors[name] = value.float() if name.endswith("e_score_correction_bias") else value.bfloat16()
  hf_config = {**CFG.to_hf(), "quantization_config": FP8_CONFIG, "torch_dtype": "bfloat16"}
  return _write_dir(tmp_path_factory.mktemp("ckpt") / "fp8", tensors, hf_config)


@pytest.fixture(scope="module")
def plain_loads(fp8_dir):
  """Unsharded loads of the FP8 checkpoint, per dtype, to compare the sharded ones with."""
  return {dtype: hc.load(fp8_dir, CFG, dtype) for dtype in ("float32", "bfloat16", "fp8")}


def _same_tensors(dir_a, dir_b, ignore=frozenset()):
  a, b = _torch_state(dir_a), _torch_state(dir_b)
  assert sorted(set(a) - ignore) == sorted(set(b) - ignore)
  for name in set(a) - ignore:
    assert (a[name].dtype, a[name].shape) == (b[name].dtype, b[name].shape), name
    assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name


def _assert_trees_identical(a, b):
  """Same leaves, dtypes, shapes and bytes; a tuple (keep mode's (variables, fp8)) is compared item by item."""
  flat_a, flat_b = (convert.flatten(dict(enumerate(x)) if isinstance(x, tuple) else x) for x in (a, b))
  assert sorted(flat_a) == sorted(flat_b)
  for path in flat_a:
    x, y = np.asarray(flat_a[path]), np.asarray(flat_b[path])
    assert (x.dtype, x.shape) == (y.dtype, y.shape), path
    assert x.tobytes() == y.tobytes(), path


# ---------------------------------------------------------------------------------------------------
# Unsharded loading and writing.


def test_save_pretrained_checkpoint_loads_like_the_in_memory_state(tmp_path, hf_dir, reference):
  hf, mtp = reference
  expected = convert.params_from_hf(torch_parity.hf_state(hf, mtp), CFG)  # fused experts, in memory
  _assert_trees_identical(hc.load(hf_dir, CFG), expected)
  os.makedirs(tmp_path / "single")
  safetensors.torch.save_file(_torch_state(hf_dir), tmp_path / "single" / "model.safetensors")  # no index
  _assert_trees_identical(hc.load(str(tmp_path / "single"), CFG), expected)


def test_mtp_copy_that_differs_is_reported_not_loaded(tmp_path, hf_dir, caplog):
  def edit(tensors):
    tensors[MTP + "embed_tokens.weight"] = tensors[MTP + "embed_tokens.weight"] + 1

  changed = _rewrite(hf_dir, tmp_path / "changed", edit)
  loaded = hc.load(changed, CFG, shardings=_layout("fsdp4_expert2"))  # each device's slice is compared
  assert [r.getMessage() for r in caplog.records if "differs from" in r.getMessage()] == [
      f"{MTP}embed_tokens.weight differs from model.embed_tokens.weight; the MTP module uses the main model's"]
  _assert_trees_identical(loaded, hc.load(hf_dir, CFG))


def test_fp32_round_trip_is_bit_exact(tmp_path, hf_dir):
  hc.save(hc.load(hf_dir, CFG), CFG, str(tmp_path / "back"), dtype="float32", max_shard_bytes=SHARD_BYTES)
  _same_tensors(hf_dir, tmp_path / "back", ignore=COPIES)  # the copies are checked, never written


def test_bf16_round_trip_is_bit_exact(tmp_path, hf_dir):
  tensors = {n: v.float() if n.endswith("e_score_correction_bias") else v.bfloat16()
             for n, v in _torch_state(hf_dir).items()}
  bf16 = _write_dir(tmp_path / "bf16", tensors, {**CFG.to_hf(), "torch_dtype": "bfloat16"})
  hc.save(hc.load(bf16, CFG, "bfloat16"), CFG, str(tmp_path / "back"), dtype="bfloat16")
  _same_tensors(bf16, tmp_path / "back", ignore=COPIES)


def test_fp8_keep_mode_round_trip_keeps_bytes_and_scales(tmp_path, fp8_dir):
  variables, fp8 = hc.load(fp8_dir, CFG, dtype="fp8")
  kernel = fp8["moe_layers"]["ffn"]["experts"]["w1"]
  assert kernel["weight"].dtype == ml_dtypes.float8_e4m3fn and kernel["weight"].shape == (2, 8, 160, 32)
  assert kernel["scale_inv"].shape == (2, 8, 2, 1)
  hc.save(variables, CFG, str(tmp_path / "again"), dtype="fp8", fp8_weights=fp8, max_shard_bytes=SHARD_BYTES)
  _same_tensors(fp8_dir, tmp_path / "again", ignore=COPIES)
  with open(tmp_path / "again" / "config.json") as f:
    assert json.load(f)["quantization_config"] == FP8_CONFIG


def test_fp8_checkpoint_logits_match_transformers_on_deepseek_dequantised_weights(tmp_path, fp8_dir):
  tensors = _torch_state(fp8_dir)
  gate = tensors["model.layers.0.mlp.gate_proj.weight"]  # [200, 160]: partial blocks in both dimensions
  assert gate.dtype == torch.float8_e4m3fn and tensors["model.layers.0.mlp.gate_proj.weight_scale_inv"].shape == (2, 2)
  dense = {n: _deepseek_dequantize(v, tensors[n + "_scale_inv"]) if v.dtype == torch.float8_e4m3fn else v.float()
           for n, v in tensors.items() if not n.endswith("_scale_inv") and not n.startswith(MTP)}
  oracle_dir = _write_dir(tmp_path / "oracle", dense, {**CFG.to_hf(), "torch_dtype": "float32"}, n_files=1)
  _, oracle = torch_parity.load_hf_dir(oracle_dir)
  report = torch_parity.compare(oracle, hc.load(fp8_dir, CFG, dtype="float32"), CFG, TOKENS)
  assert report.logits_max_diff <= LOGITS_TOL, report
  assert not any(report.expert_mismatches), report


def test_our_fp8_output_is_deepseeks_quantisation(tmp_path, hf_dir, fp8_dir):
  hc.save(hc.load(hf_dir, CFG), CFG, str(tmp_path / "ours"), dtype="fp8", max_shard_bytes=SHARD_BYTES)
  _same_tensors(fp8_dir, tmp_path / "ours", ignore=COPIES)  # same e4m3 bytes and scales as the torch rule
  with open(tmp_path / "ours" / "config.json") as f:
    assert json.load(f)["quantization_config"] == FP8_CONFIG


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_transformers_loads_our_output(tmp_path, hf_dir, dtype):
  import transformers

  variables = hc.load(hf_dir, CFG)
  hc.save(variables, CFG, str(tmp_path / dtype), dtype=dtype, max_shard_bytes=SHARD_BYTES)
  model, info = transformers.DeepseekV3ForCausalLM.from_pretrained(str(tmp_path / dtype), output_loading_info=True)
  assert not info["missing_keys"] and not info["mismatched_keys"], info
  assert all(k.startswith(MTP) for k in info["unexpected_keys"]), info
  ours = variables["params"]["dense_layers"]["ffn"]["w1"]["kernel"][0].T
  theirs = model.model.layers[0].mlp.gate_proj.weight.detach().float().numpy()
  np.testing.assert_array_equal(theirs, ours.astype(ml_dtypes.bfloat16).astype(np.float32) if dtype == "bfloat16"
                                else ours)


def test_bf16_dequant_matches_deepseek_weight_dequant_whole_and_sliced(fp8_dir):
  files = hc.open_checkpoint(fp8_dir)
  name = "model.layers.0.mlp.gate_proj.weight"
  w, scale = files[name], files[name + "_scale_inv"]
  w_t = torch.from_numpy(w.view(np.uint8).copy()).view(torch.float8_e4m3fn)
  expected = _deepseek_dequantize(w_t, torch.from_numpy(scale)).bfloat16().view(torch.int16).numpy()
  np.testing.assert_array_equal(hc.dequantize(w, scale, "bfloat16", name).view(np.int16), expected)
  part = hc.dequantize(files.read(name, (100, 200), (40, 160)), files.read(name + "_scale_inv", (0, 2), (0, 2)),
                       "bfloat16", name, origin=(100, 40))
  np.testing.assert_array_equal(part.view(np.int16), expected[100:200, 40:160])
  with pytest.raises(hc.ConversionError, match="_scale_inv' has shape"):
    hc.dequantize(w[130:], scale, origin=(130, 0))  # needs only the second row of blocks


def test_quantize_clamps_zero_blocks_and_saturates():
  w = np.zeros((130, 260), np.float32)
  w[0, 0], w[129, 259] = 3.0, -1e3
  q, scale = hc.quantize(w)
  assert scale.shape == (2, 3) and np.all(np.isfinite(q.astype(np.float32)))
  assert scale[0, 1] == np.float32(1e-4 / 448)  # an all-zero block: amax clamped at 1e-4
  np.testing.assert_allclose(hc.dequantize(q, scale)[[0, 129], [0, 259]], [3.0, -1e3], rtol=1e-6)


def test_ue8m0_scales_are_powers_of_two_and_round_trip(tmp_path, hf_dir):
  w = np.random.default_rng(0).standard_normal((200, 300)).astype(np.float32)
  q, scale = hc.quantize(w, scale_fmt="ue8m0")
  mantissa, _ = np.frexp(scale)
  assert np.all(mantissa == 0.5)
  _, plain = hc.quantize(w)
  assert np.all(scale >= plain) and np.all(scale < 2 * plain)  # the next power of two up
  assert np.abs(hc.dequantize(q, scale) - w).max() <= 2 * np.abs(w).max() / 16  # 3 mantissa bits, twice the step
  hc.save(hc.load(hf_dir, CFG), CFG, str(tmp_path / "ue8m0"), dtype="fp8", scale_fmt="ue8m0")
  with open(tmp_path / "ue8m0" / "config.json") as f:
    assert json.load(f)["quantization_config"]["scale_fmt"] == "ue8m0"
  variables, fp8 = hc.load(str(tmp_path / "ue8m0"), CFG, dtype="fp8")
  assert np.all(np.frexp(fp8["dense_layers"]["ffn"]["w1"]["kernel"]["scale_inv"])[0] == 0.5)
  hc.save(variables, CFG, str(tmp_path / "again"), dtype="fp8", fp8_weights=fp8, scale_fmt="ue8m0")
  _same_tensors(tmp_path / "ue8m0", tmp_path / "again")


# ---------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the tensor or file, nothing written.


def _rewrite(src, dst, edit):
  """A copy of `src` with its tensors changed by `edit` (config.json kept)."""
  tensors = _torch_state(src)
  edit(tensors)
  with open(os.path.join(src, "config.json")) as f:
    return _write_dir(dst, tensors, json.load(f), n_files=1)


O_PROJ = "model.layers.0.self_attn.o_proj.weight"


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.norm.weight"), "'model.norm.weight' is missing"),
    (lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(3)}), "'model.layers.0.extra.weight' is not used"),
    (lambda t: t.update({"model.layers.0.extra_scale_inv": torch.zeros(3)}), "'model.layers.0.extra_scale_inv' is not"),
    (lambda t: t.update({"lm_head.weight": torch.zeros(128, 8)}), "'lm_head.weight' has shape"),
    (lambda t: t.pop(O_PROJ + "_scale_inv"), f"FP8 tensor {O_PROJ!r} has no"),
    (lambda t: t.update({O_PROJ + "_scale_inv": torch.ones(3, 3)}), f"{O_PROJ + '_scale_inv'!r} has shape"),
    (lambda t: t.update({"model.norm.weight": torch.ones(160, dtype=torch.int32)}), "'model.norm.weight' has dtype"),
])
def test_bad_tensors_raise_naming_them(tmp_path, fp8_dir, edit, message):
  bad = _rewrite(fp8_dir, tmp_path / "bad", edit)
  with pytest.raises(hc.ConversionError, match=message.replace("[", r"\[").replace("(", r"\(")):
    hc.load(bad, CFG)
  with pytest.raises(hc.ConversionError, match=message.replace("[", r"\[").replace("(", r"\(")):
    convert_hf.to_ours(bad, str(tmp_path / "out"), "bfloat16")
  assert sorted(os.listdir(tmp_path)) == ["bad"]


def test_truncated_corrupt_and_missing_shards_raise_naming_the_file(tmp_path, fp8_dir):
  copy = shutil.copytree(fp8_dir, tmp_path / "copy")
  shard = sorted(p for p in os.listdir(copy) if p.startswith("model-"))[1]
  data = (copy / shard).read_bytes()
  (copy / shard).write_bytes(data[:-10])
  with pytest.raises(hc.ConversionError, match=f"{shard}: truncated"):
    hc.load(str(copy), CFG)
  (copy / shard).write_bytes(data[:8] + b"{not json" + data[17:])
  with pytest.raises(hc.ConversionError, match=f"{shard}: not a readable safetensors file"):
    hc.load(str(copy), CFG)
  os.remove(copy / shard)
  with pytest.raises(hc.ConversionError, match=f"shard '{shard}' named in .*{hc.INDEX}"):
    hc.load(str(copy), CFG)
  (copy / hc.INDEX).write_text('{"weight_map": ')
  with pytest.raises(hc.ConversionError, match=f"{hc.INDEX}: not a readable index"):
    hc.load(str(copy), CFG)


@pytest.mark.parametrize("key, value, message", [
    ("intermediate_size", 256, r"'model.layers.0.mlp.\w+_proj.weight' has shape .*config.json and the tensors"),
    ("quantization_config", {**FP8_CONFIG, "weight_block_size": [64, 64]}, "config.json: quantization_config has "
     "weight_block_size"),
])
def test_config_inconsistent_with_tensors_raises(tmp_path, fp8_dir, key, value, message):
  copy = shutil.copytree(fp8_dir, tmp_path / "copy")
  with open(copy / "config.json") as f:
    hf_config = json.load(f)
  hf_config[key] = value
  with open(copy / "config.json", "w") as f:
    json.dump(hf_config, f)
  with pytest.raises(hc.ConversionError, match=message.replace("[", r"\[")):
    hc.load(str(copy))


def test_save_checks_everything_before_writing_and_leaves_nothing_when_interrupted(tmp_path, hf_dir, monkeypatch):
  variables = hc.load(hf_dir, CFG)
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("keep")
  with pytest.raises(FileExistsError):
    hc.save(variables, CFG, str(tmp_path / "full"))
  wrong = {**variables, "params": {**variables["params"], "head": variables["params"]["head"][:, :3]}}
  with pytest.raises(hc.ConversionError, match="params/head has shape"):
    hc.save(wrong, CFG, str(tmp_path / "out"))
  no_scale = {"dense_layers": {"ffn": {"w1": {"kernel": {"weight": np.zeros((1, 160, 200), ml_dtypes.float8_e4m3fn)}}}}}
  with pytest.raises(hc.ConversionError, match="fp8_weights: dense_layers/ffn/w1/kernel/scale_inv is missing"):
    hc.save(variables, CFG, str(tmp_path / "out"), dtype="fp8", fp8_weights=no_scale)

  def interrupted(*_):
    raise KeyboardInterrupt

  monkeypatch.setattr(hc, "_write_json", interrupted)
  with pytest.raises(KeyboardInterrupt):
    hc.save(variables, CFG, str(tmp_path / "out"))
  assert sorted(os.listdir(tmp_path)) == ["full"]


# ---------------------------------------------------------------------------------------------------
# Sharded loading onto meshes of the 8 fake CPU devices, and writing from them.


def _mesh(axes: dict[str, int]) -> jax.sharding.Mesh:
  assert set(axes) <= set(sharding.MESH_AXES)
  shape = [axes.get(a, 1) for a in sharding.MESH_AXES]
  return jax.sharding.Mesh(np.array(jax.devices()).reshape(shape), sharding.MESH_AXES)


def _layout(name: str):
  """Shardings from the rules table; "+layers" also splits the MoE layer axis over 'data'."""
  mesh = _mesh(MESHES[name.removesuffix("+layers")])
  shardings = model_lib.variable_shardings(CFG, mesh)
  if name.endswith("+layers"):
    flat = convert.flatten(shardings)
    shardings = convert.unflatten({p: NamedSharding(mesh, PartitionSpec("data", *s.spec[1:])) if p[1] == "moe_layers"
                                   else s for p, s in flat.items()})
  return shardings


@pytest.mark.parametrize("layout", ["expert4_data2", "fsdp4_expert2", "expert4_data2+layers"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "fp8"])
def test_sharded_load_equals_unsharded_bit_for_bit(fp8_dir, plain_loads, layout, dtype):
  shardings = _layout(layout)
  loaded = hc.load(fp8_dir, CFG, dtype, shardings=shardings)
  variables, fp8 = loaded if dtype == "fp8" else (loaded, None)
  plain_variables, plain_fp8 = plain_loads[dtype] if dtype == "fp8" else (plain_loads[dtype], None)
  _assert_trees_identical(variables, plain_variables)
  layouts = convert.flatten(shardings)
  for path, array in convert.flatten(variables).items():
    assert isinstance(array, jax.Array) and array.sharding == layouts[path], path
  if dtype == "fp8":
    _assert_trees_identical(fp8, plain_fp8)
    w1 = fp8["moe_layers"]["ffn"]["experts"]["w1"]
    assert w1["weight"].sharding == layouts[("params", "moe_layers", "ffn", "experts", "w1")]
    assert len(w1["scale_inv"].sharding.device_set) == 8


def test_sharded_reads_touch_only_their_slices(fp8_dir, monkeypatch):
  calls, opened = [], []
  read = hc.CheckpointFiles.read

  def recording_read(self, name, rows=None, cols=None):
    out = read(self, name, rows, cols)
    calls.append((name, out.nbytes))
    return out

  monkeypatch.setattr(hc.CheckpointFiles, "read", recording_read)
  monkeypatch.setattr(hc, "open_checkpoint", lambda d: opened.append(hc.CheckpointFiles(d)) or opened[-1])
  expert = "model.layers.2.mlp.experts.5.gate_proj.weight"  # FP8 [32, 160]; ours [160, 32] of w1 [2, 8, 160, 32]
  bias = "model.layers.1.mlp.gate.e_score_correction_bias"  # replicated on all 8 devices
  for layout, pieces in (("expert4_data2", 1), ("fsdp4_expert2", 4)):
    calls.clear()
    hc.load(fp8_dir, CFG, "bfloat16", shardings=_layout(layout))
    files = opened[-1]
    # each expert sits on 2 of the 8 devices (replicated over data, or split in 4 columns by fsdp)
    assert [n for n, _ in calls if n == expert] == [expert] * pieces
    assert files.bytes_by_name[expert] == 32 * 160  # the tensor once, not once per device
    assert {b for n, b in calls if n == expert} == {32 * 160 // pieces}
    assert files.bytes_by_name[bias] == 8 * 4
  weights = [n for n in files.info if not n.endswith("_scale_inv")]
  assert sum(files.bytes_by_name[n] for n in weights) == sum(files.info[n]["nbytes"] for n in weights)


def test_keep_mode_shardings_explicit_and_bad(fp8_dir, plain_loads):
  shardings = _layout("fsdp4_expert2")
  mesh = _mesh(MESHES["fsdp4_expert2"])
  _, plain_fp8 = plain_loads["fp8"]
  replicated = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), plain_fp8)
  variables, fp8 = hc.load(fp8_dir, CFG, "fp8", shardings=(shardings, replicated))
  _assert_trees_identical(fp8, plain_fp8)
  assert fp8["moe_layers"]["ffn"]["experts"]["w2"]["weight"].sharding.is_fully_replicated
  del replicated["moe_layers"]["ffn"]["experts"]["w2"]["scale_inv"]
  with pytest.raises(ValueError, match="fp8/moe_layers/ffn/experts/w2/scale_inv is missing"):
    hc.load(fp8_dir, CFG, "fp8", shardings=(shardings, replicated))
  bad = convert.unflatten({**convert.flatten(shardings),
                           ("params", "head"): NamedSharding(mesh, PartitionSpec(None, "fsdp", "expert"))})
  with pytest.raises(ValueError, match="variables/params/head of shape"):
    hc.load(fp8_dir, CFG, "bfloat16", shardings=bad)


class _SlicesOnly:
  """A stacked leaf that hands out one layer/expert slice at a time and refuses to be read whole."""

  def __init__(self, array, sizes: list[int]):
    self.array, self.sizes = np.asarray(array), sizes
    self.shape, self.dtype = self.array.shape, self.array.dtype

  def __getitem__(self, index):
    self.sizes.append(self.array[index].size)
    return self.array[index]

  def __array__(self, dtype=None, copy=None):
    raise AssertionError("save read a whole stacked leaf")


def test_save_from_sharded_variables_fetches_one_tensor_at_a_time(tmp_path, fp8_dir, hf_dir):
  variables, fp8 = hc.load(fp8_dir, CFG, "fp8", shardings=_layout("expert4_data2+layers"))
  hc.save(variables, CFG, str(tmp_path / "fp8"), dtype="fp8", fp8_weights=fp8, max_shard_bytes=SHARD_BYTES)
  _same_tensors(fp8_dir, tmp_path / "fp8", ignore=COPIES)
  sizes = []
  plain = hc.load(hf_dir, CFG)
  stacked = {p: _SlicesOnly(a, sizes) if p[1] in ("dense_layers", "moe_layers") else a
             for p, a in convert.flatten(plain).items()}
  hc.save(convert.unflatten(stacked), CFG, str(tmp_path / "sliced"), dtype="float32")
  _same_tensors(hf_dir, tmp_path / "sliced", ignore=COPIES)
  largest = max(int(np.prod(shape)) for shape in hc.expected_shapes(CFG).values())
  assert sizes and max(sizes) <= largest


# ---------------------------------------------------------------------------------------------------
# The conversion tool.


@pytest.mark.parametrize("dtype", ["fp8", "bfloat16"])
def test_orbax_round_trip_through_the_tool(tmp_path, fp8_dir, plain_loads, dtype):
  convert_hf.to_ours(fp8_dir, str(tmp_path / "ours"), dtype)
  assert sorted(os.listdir(tmp_path)) == ["ours"]
  cfg, variables, fp8, quantization = convert_hf.restore(str(tmp_path / "ours"))
  assert cfg == CFG.replace(dtype="bfloat16")  # config.json's torch_dtype
  _assert_trees_identical((variables, fp8) if dtype == "fp8" else variables, plain_loads[dtype])
  assert quantization == (FP8_CONFIG if dtype == "fp8" else None)
  convert_hf.to_hf(str(tmp_path / "ours"), str(tmp_path / "back"), dtype, SHARD_BYTES)
  if dtype == "fp8":
    _same_tensors(fp8_dir, tmp_path / "back", ignore=COPIES)
  else:
    w1 = plain_loads[dtype]["params"]["dense_layers"]["ffn"]["w1"]["kernel"][0]
    np.testing.assert_array_equal(hc.open_checkpoint(str(tmp_path / "back"))["model.layers.0.mlp.gate_proj.weight"],
                                  w1.T)


def test_tool_on_a_mesh_round_trips_sharded(tmp_path, fp8_dir, plain_loads):
  # Two devices keep orbax's per-shard work small; the 8-device layouts are covered by the load tests.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]).reshape([2 if a == "expert" else 1 for a in sharding.MESH_AXES]),
                           sharding.MESH_AXES)
  convert_hf.to_ours(fp8_dir, str(tmp_path / "ours"), "fp8", mesh=mesh)
  _, variables, fp8, _ = convert_hf.restore(str(tmp_path / "ours"), mesh)
  _assert_trees_identical((variables, fp8), plain_loads["fp8"])
  w2 = variables["params"]["moe_layers"]["ffn"]["experts"]["w2"]
  assert w2.sharding.spec == PartitionSpec(None, "expert", "tensor", "fsdp") and len(w2.sharding.device_set) == 2
  assert fp8["moe_layers"]["ffn"]["experts"]["w2"]["weight"].sharding == w2.sharding
  _, host_variables, host_fp8, _ = convert_hf.restore(str(tmp_path / "ours"))  # no mesh: host numpy arrays
  assert isinstance(host_variables["params"]["head"], np.ndarray)
  _assert_trees_identical((host_variables, host_fp8), plain_loads["fp8"])


def test_interrupted_conversion_leaves_nothing_that_looks_complete(tmp_path, fp8_dir, monkeypatch):
  def interrupted(*_):
    raise KeyboardInterrupt

  with monkeypatch.context() as patch:
    patch.setattr(convert_hf, "_write_json", interrupted)  # after orbax wrote the variables
    with pytest.raises(KeyboardInterrupt):
      convert_hf.to_ours(fp8_dir, str(tmp_path / "ours"), "fp8")
  assert os.listdir(tmp_path) == []
  convert_hf.to_ours(fp8_dir, str(tmp_path / "ours"), "bfloat16")
  writes = []

  def fail_on_third(self, name, array):
    writes.append(name)
    if len(writes) == 3:
      raise OSError("disk full")
    return write(self, name, array)

  write = safetensors_file.FileWriter.write
  monkeypatch.setattr(safetensors_file.FileWriter, "write", fail_on_third)
  with pytest.raises(OSError, match="disk full"):
    convert_hf.to_hf(str(tmp_path / "ours"), str(tmp_path / "back"), "bfloat16", SHARD_BYTES)
  assert os.listdir(tmp_path) == ["ours"]


def test_progress_line_reports_percent_and_rate():
  stream = io.StringIO()
  progress = convert_hf.Progress("read", stream, every_s=0.0)
  for done in (0, 250_000_000, 1_000_000_000, 1_000_000_000):
    progress(done, 1_000_000_000)
  lines = stream.getvalue().splitlines()
  assert len(lines) == 3 and lines[1].startswith("read: 0.25/1.00 GB (25%), ") and "MB/s" in lines[1]
  assert "(100%)" in lines[-1]
  with pytest.raises(Exception, match="--mesh=fsdp=3"):
    convert_hf.parse_mesh("fsdp=3")
