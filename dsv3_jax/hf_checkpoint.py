"""DeepSeek-V3 Hugging Face checkpoints on disk (safetensors, FP8 included) <-> our variables.

Reading parses the safetensors header by hand (8-byte little-endian length, JSON, raw bytes) so that
float8_e4m3fn tensors load as ml_dtypes arrays, one tensor at a time, and a truncated or corrupt file
fails with its name. FP8 weights are `W` [out, in] e4m3 with `W_scale_inv` fp32
[ceil(out/128), ceil(in/128)], a multiplier per 128x128 block (numerics §6). Names go through the one
table in `convert.py`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Iterator
from collections.abc import Mapping

import jax
import ml_dtypes
import numpy as np
from absl import logging

from dsv3_jax import config as config_lib
from dsv3_jax import convert
from dsv3_jax import model as model_lib

ConversionError = convert.ConversionError
BLOCK = 128
FP8_MAX = 448.0
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [BLOCK, BLOCK],
                       "activation_scheme": "dynamic"}
_FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
_BF16 = np.dtype(ml_dtypes.bfloat16)
_ST_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": _BF16,
              "F8_E4M3": _FP8, "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
              "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_)}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_FLOATS = {"F64", "F32", "F16", "BF16", "F8_E4M3"}
_SAVE_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": _BF16, "fp8": _BF16}
# The linear weights DeepSeek stores in FP8: attention, dense MLP, routed and shared experts (not the
# router `mlp.gate`, the embedding/head, norms, the correction bias or MTP `eh_proj`).
_FP8_NAME = re.compile(r"\.(self_attn\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
                       r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight$")
_BIAS_NAME = re.compile(r"\.mlp\.gate\.e_score_correction_bias$")


def is_fp8_name(name: str) -> bool:
  """Whether DeepSeek stores this HF tensor in FP8 (with a `_scale_inv`)."""
  return bool(_FP8_NAME.search(name))


# ---------------------------------------------------------------------------------------------------
# safetensors files.


def _read_header(path: str) -> dict[str, dict]:
  """{name: {"dtype", "shape", "offset", "nbytes"}}, offsets absolute; validates against the file size."""
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      raw_len = f.read(8)
      if len(raw_len) < 8:
        raise ConversionError(f"{path}: truncated safetensors file ({size} bytes, no header)")
      header_len = int.from_bytes(raw_len, "little")
      if 8 + header_len > size:
        raise ConversionError(f"{path}: truncated safetensors file (header of {header_len} bytes, file {size})")
      header = json.loads(f.read(header_len))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConversionError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
  header.pop("__metadata__", None)
  out = {}
  for name, info in header.items():
    if info.get("dtype") not in _ST_DTYPES:
      raise ConversionError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
    start, end = info["data_offsets"]
    nbytes = math.prod(info["shape"]) * _ST_DTYPES[info["dtype"]].itemsize
    if end - start != nbytes:
      raise ConversionError(f"{path}: tensor {name!r} spans {end - start} bytes, its shape needs {nbytes}")
    if 8 + header_len + end > size:
      raise ConversionError(f"{path}: truncated safetensors file; tensor {name!r} ends at byte "
                            f"{8 + header_len + end} of {size}")
    out[name] = {"dtype": info["dtype"], "shape": tuple(info["shape"]), "offset": 8 + header_len + start,
                 "nbytes": nbytes}
  return out


class CheckpointFiles(Mapping):
  """A HF checkpoint directory as {tensor name: numpy array}, each tensor read from disk on access."""

  def __init__(self, hf_dir: str):
    self.hf_dir = hf_dir
    index_path, single = os.path.join(hf_dir, INDEX), os.path.join(hf_dir, SINGLE)
    if os.path.exists(index_path):
      with open(index_path) as f:
        weight_map = json.load(f)["weight_map"]
      for shard in sorted(set(weight_map.values())):
        if not os.path.exists(os.path.join(hf_dir, shard)):
          raise ConversionError(f"shard {shard!r} named in {index_path} does not exist")
    elif os.path.exists(single):
      weight_map = None
    else:
      raise ConversionError(f"{hf_dir}: neither {INDEX} nor {SINGLE} exists")
    self.info: dict[str, dict] = {}
    for shard in sorted(set(weight_map.values())) if weight_map else [SINGLE]:
      path = os.path.join(hf_dir, shard)
      for name, info in _read_header(path).items():
        if weight_map is not None and weight_map.get(name) != shard:
          raise ConversionError(f"tensor {name!r} is in {path} but {index_path} maps it to {weight_map.get(name)!r}")
        self.info[name] = {**info, "path": path}
    missing = sorted(set(weight_map or ()) - set(self.info))
    if missing:
      raise ConversionError(f"tensor {missing[0]!r} is in {index_path} but not in {weight_map[missing[0]]!r}")
    self.bytes_read = 0

  def __getitem__(self, name: str) -> np.ndarray:
    info = self.info[name]
    dtype = _ST_DTYPES[info["dtype"]]
    data = np.fromfile(info["path"], dtype=np.uint8, count=info["nbytes"], offset=info["offset"])
    if data.size != info["nbytes"]:
      raise ConversionError(f"{info['path']}: truncated while reading tensor {name!r}")
    self.bytes_read += info["nbytes"]
    return data.view(dtype).reshape(info["shape"])

  def __iter__(self) -> Iterator[str]:
    return iter(self.info)

  def __len__(self) -> int:
    return len(self.info)

  def shape(self, name: str) -> tuple[int, ...]:
    return self.info[name]["shape"]

  def dtype_name(self, name: str) -> str:
    return self.info[name]["dtype"]


def open_checkpoint(hf_dir: str) -> CheckpointFiles:
  """Opens `model.safetensors.index.json` (or a single `model.safetensors`); reads headers only."""
  return CheckpointFiles(hf_dir)


def _plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
  shards, current, used = [], [], 0
  for name, size in sizes.items():
    if current and used + size > max_shard_bytes:
      shards.append(current)
      current, used = [], 0
    current.append(name)
    used += size
  return shards + [current] if current else shards


def _write_file(path: str, tensors: dict[str, np.ndarray]) -> None:
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for name, a in tensors.items():
    header[name] = {"dtype": _ST_NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # safetensors pads the header so the data starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for a in tensors.values():
      f.write(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)


# ---------------------------------------------------------------------------------------------------
# FP8 blocks.


def scale_shape(shape: tuple[int, ...]) -> tuple[int, int]:
  return (-(-shape[0] // BLOCK), -(-shape[1] // BLOCK))


def _expand(scale_inv: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  return np.repeat(np.repeat(scale_inv, BLOCK, 0), BLOCK, 1)[:shape[0], :shape[1]]


def dequantize(w_fp8: np.ndarray, scale_inv: np.ndarray, dtype="float32", name: str = "weight") -> np.ndarray:
  """fp32(w) * scale per 128x128 block (edge blocks partial), then cast: DeepSeek's `weight_dequant`."""
  if w_fp8.ndim != 2 or scale_inv.shape != scale_shape(w_fp8.shape):
    raise ConversionError(f"tensor {name + '_scale_inv'!r} has shape {tuple(scale_inv.shape)}; weight {name!r} of "
                          f"shape {tuple(w_fp8.shape)} needs {scale_shape(w_fp8.shape) if w_fp8.ndim == 2 else '2-D'}")
  out = w_fp8.astype(np.float32) * _expand(scale_inv.astype(np.float32), w_fp8.shape)
  return out.astype(np.dtype(dtype) if dtype != "bfloat16" else _BF16)


def quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(e4m3 [out, in], fp32 scale_inv) with amax per 128x128 block clamped at 1e-4 and scale = amax/448."""
  w = np.asarray(w, np.float32)
  rows, cols = scale_shape(w.shape)
  padded = np.zeros((rows * BLOCK, cols * BLOCK), np.float32)
  padded[:w.shape[0], :w.shape[1]] = np.abs(w)
  amax = padded.reshape(rows, BLOCK, cols, BLOCK).max(axis=(1, 3))
  scale = (np.maximum(amax, 1e-4) / FP8_MAX).astype(np.float32)
  # ml_dtypes gives NaN above 464 where torch saturates (numerics §7): clip first.
  q = np.clip(w / _expand(scale, w.shape), -FP8_MAX, FP8_MAX).astype(_FP8)
  return q, scale


# ---------------------------------------------------------------------------------------------------
# Loading.


def _zero_strided(abstract: dict) -> dict:
  # Shape-only stand-ins (no memory) so that `params_to_hf` yields every expected name and shape.
  return jax.tree.map(lambda s: np.broadcast_to(np.zeros((), np.float32), s.shape), abstract)


def expected_shapes(cfg: config_lib.ModelConfig, abstract: dict | None = None) -> dict[str, tuple[int, ...]]:
  """Every HF tensor name (checkpoint layout, per-expert) this config needs, with its shape."""
  abstract = abstract or jax.eval_shape(lambda: model_lib.init(cfg, jax.random.PRNGKey(0)))
  return {k: tuple(v.shape) for k, v in convert.params_to_hf(_zero_strided(abstract), cfg).items()}


def _optional_shapes(cfg: config_lib.ModelConfig) -> dict[str, tuple[int, ...]]:
  # The MTP layers' copies of the embedding and head: optional, checked against the main ones.
  return {f"model.layers.{cfg.n_layers + k}.{copy}": (cfg.vocab_size, cfg.dim) for k in range(cfg.n_mtp_layers)
          for copy in ("embed_tokens.weight", "shared_head.head.weight")}


def validate(files: CheckpointFiles, cfg: config_lib.ModelConfig, abstract: dict | None = None) -> None:
  """Checks names, shapes, dtypes and FP8 scales from the headers alone, before any tensor is read."""
  required = expected_shapes(cfg, abstract)
  expected = {**_optional_shapes(cfg), **required}
  missing = sorted(set(required) - set(files))
  if missing:
    raise ConversionError(f"tensor {missing[0]!r} is missing from the checkpoint {files.hf_dir}"
                          f"{f' ({len(missing)} missing in all)' if len(missing) > 1 else ''}")
  for name in files:
    if name.endswith("_scale_inv") and files.dtype_name(name.removesuffix("_scale_inv")) == "F8_E4M3":
      continue
    if name not in expected:
      raise ConversionError(f"checkpoint tensor {name!r} is not used by this config")
    if files.dtype_name(name) not in _FLOATS:
      raise ConversionError(f"tensor {name!r} has dtype {files.dtype_name(name)}, expected a float type")
    if files.shape(name) != expected[name]:
      raise ConversionError(f"tensor {name!r} has shape {files.shape(name)}, expected {expected[name]} "
                            f"(config.json and the tensors disagree)")
    if files.dtype_name(name) == "F8_E4M3":
      _validate_scale(files, name)


def _validate_scale(files: CheckpointFiles, name: str) -> None:
  scale = name + "_scale_inv"
  if scale not in files:
    raise ConversionError(f"FP8 tensor {name!r} has no {scale!r}")
  if len(files.shape(name)) != 2 or files.shape(scale) != scale_shape(files.shape(name)):
    raise ConversionError(f"tensor {scale!r} has shape {files.shape(scale)}; weight {name!r} of shape "
                          f"{files.shape(name)} needs {scale_shape(files.shape(name))}")


class _Dequantized(Mapping):
  """The checkpoint's weights (no `_scale_inv` entries) in `dtype`, FP8 dequantised on access."""

  def __init__(self, files: CheckpointFiles, dtype: str, keep_fp8: dict | None, log_every: int = 200):
    self.files, self.dtype, self.keep_fp8 = files, np.dtype(_SAVE_DTYPES[dtype]), keep_fp8
    self.names = [n for n in files if not (n.endswith("_scale_inv") and n.removesuffix("_scale_inv") in files)]
    self.reads, self.start, self.log_every = 0, time.perf_counter(), log_every

  def __getitem__(self, name: str) -> np.ndarray:
    raw = self.files[name]
    if raw.dtype == _FP8:
      scale = self.files[name + "_scale_inv"]
      if self.keep_fp8 is not None:
        self.keep_fp8[name] = (raw, scale)
      out = dequantize(raw, scale, self.dtype, name)
    else:
      out = raw.astype(np.float32 if _BIAS_NAME.search(name) else self.dtype)
    self.reads += 1
    if self.reads % self.log_every == 0:
      log_progress("read", self.reads, len(self.names), self.files.bytes_read, self.start)
    return out

  def __iter__(self) -> Iterator[str]:
    return iter(self.names)

  def __len__(self) -> int:
    return len(self.names)


def log_progress(what: str, done: int, total: int, nbytes: int, start: float) -> None:
  seconds = max(time.perf_counter() - start, 1e-9)
  logging.info("%s %d/%d tensors, %.1f MB, %.1f MB/s", what, done, total, nbytes / 1e6, nbytes / 1e6 / seconds)


def read_config(hf_dir: str, **overrides) -> config_lib.ModelConfig:
  with open(os.path.join(hf_dir, "config.json")) as f:
    return config_lib.ModelConfig.from_hf(json.load(f), **overrides)


def load(hf_dir: str, cfg: config_lib.ModelConfig | None = None, dtype: str = "float32"):
  """Our variables {"params", "routing"} (numpy) from a HF checkpoint directory.

  dtype "float32"/"bfloat16" dequantises FP8 weights to that dtype. dtype "fp8" (keep mode) returns
  `(variables dequantised to float32, fp8_weights)` with `fp8_weights = {hf name: (e4m3, scale_inv)}`,
  the bytes as stored, which `save(..., dtype="fp8", fp8_weights=...)` writes back unchanged.
  cfg defaults to `ModelConfig.from_hf(config.json)`.
  """
  if dtype not in _SAVE_DTYPES:
    raise ValueError(f"dtype {dtype!r} is not one of {sorted(_SAVE_DTYPES)}")
  cfg = cfg or read_config(hf_dir)
  files = open_checkpoint(hf_dir)
  abstract = jax.eval_shape(lambda: model_lib.init(cfg, jax.random.PRNGKey(0)))
  validate(files, cfg, abstract)
  keep = {} if dtype == "fp8" else None
  state = _Dequantized(files, "float32" if dtype == "fp8" else dtype, keep)
  variables = convert.params_from_hf(state, cfg, abstract)
  log_progress("loaded", state.reads, len(state), files.bytes_read, state.start)
  return (variables, keep) if dtype == "fp8" else variables


# ---------------------------------------------------------------------------------------------------
# Saving.


def _to_disk(name: str, array: np.ndarray, dtype: str, fp8_weights: dict | None) -> dict[str, np.ndarray]:
  """The tensors stored for one HF name: itself in `dtype`, or an e4m3 weight and its scale."""
  if dtype == "fp8" and is_fp8_name(name):
    if fp8_weights is not None and name in fp8_weights:
      w, scale = fp8_weights[name]
      if tuple(w.shape) != tuple(array.shape):
        raise ConversionError(f"fp8_weights[{name!r}] has shape {w.shape}, the variables {array.shape}")
    else:
      w, scale = quantize(array)
    return {name: np.asarray(w), name + "_scale_inv": np.asarray(scale, np.float32)}
  out_dtype = np.float32 if _BIAS_NAME.search(name) else _SAVE_DTYPES[dtype]
  return {name: np.asarray(array).astype(out_dtype)}


def _stored_bytes(name: str, shape: tuple[int, ...], dtype: str) -> int:
  if dtype == "fp8" and is_fp8_name(name):
    return math.prod(shape) + 4 * math.prod(scale_shape(shape))
  itemsize = 4 if _BIAS_NAME.search(name) else _SAVE_DTYPES[dtype].itemsize
  return math.prod(shape) * itemsize


def _prepare_out_dir(out_dir: str, overwrite: bool) -> str:
  out_dir = os.path.abspath(out_dir)
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True to replace it")
  tmp = f"{out_dir}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  return tmp


def save(variables: dict, cfg: config_lib.ModelConfig, out_dir: str, dtype: str = "bfloat16",
         max_shard_bytes: int = 5 * 2**30, fp8_weights: dict | None = None, overwrite: bool = False) -> None:
  """Writes a HF checkpoint directory: config.json, sharded safetensors (per-expert keys) and the index.

  dtype "fp8" stores the linear weights DeepSeek stores in FP8 as e4m3 + `_scale_inv` (taken from
  `fp8_weights` when given, else quantised per 128x128 block) and the rest in bf16; the correction
  bias is always fp32. The directory is built under a temporary name and renamed when complete.
  """
  if dtype not in _SAVE_DTYPES:
    raise ValueError(f"dtype {dtype!r} is not one of {sorted(_SAVE_DTYPES)}")
  state = convert.params_to_hf(variables, cfg)
  sizes = {name: _stored_bytes(name, tuple(a.shape), dtype) for name, a in state.items()}
  shards = _plan_shards(sizes, max_shard_bytes)
  tmp = _prepare_out_dir(out_dir, overwrite)
  try:
    weight_map, start, written = {}, time.perf_counter(), 0
    for i, names in enumerate(shards):
      shard = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      tensors = {}
      for name in names:
        tensors.update(_to_disk(name, state[name], dtype, fp8_weights))
      _write_file(os.path.join(tmp, shard), tensors)
      weight_map.update(dict.fromkeys(tensors, shard))
      written += sum(a.nbytes for a in tensors.values())
      log_progress("wrote", len(weight_map), len(weight_map), written, start)
    _write_json(os.path.join(tmp, INDEX), {"metadata": {"total_size": written}, "weight_map": weight_map})
    hf_config = cfg.to_hf()
    if dtype == "fp8":
      hf_config.update(quantization_config=QUANTIZATION_CONFIG, torch_dtype="bfloat16")
    else:
      hf_config["torch_dtype"] = dtype
    _write_json(os.path.join(tmp, "config.json"), hf_config)
    _move_into_place(tmp, os.path.abspath(out_dir))
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _write_json(path: str, obj: dict) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)


def _move_into_place(tmp: str, out_dir: str) -> None:
  if os.path.isdir(out_dir):
    shutil.rmtree(out_dir)  # empty, or the caller passed overwrite=True
  os.replace(tmp, out_dir)
