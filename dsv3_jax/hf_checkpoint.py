"""DeepSeek-V3 Hugging Face checkpoints on disk (safetensors, FP8 included) <-> our variables, streamed.

Files are read and written by `safetensors_file`: headers first, then any slice of a tensor, reading
only that slice's bytes.

FP8. A weight `W` [out, in] e4m3 comes with `W_scale_inv` fp32 [ceil(out/128), ceil(in/128)], a
multiplier per 128x128 block, edge blocks partial (numerics §6). Dequantising a slice reads only the
scale blocks it overlaps and gives `cast(fp32(W) * scale)`, for bf16 the same bits as DeepSeek's
`weight_dequant`. Quantising is `fp8.quantize_blocks`, DeepSeek's block scheme: amax per block clamped
at 1e-4, scale = amax / 448 (rounded up to a power of two for `scale_fmt: ue8m0`), clip to +-448, cast.

Loading (`load`) validates every header against the config first, then builds each of our leaves
from the checkpoint tensors it stacks (the table in `convert.py`):
  1. without shardings, as one numpy array, each tensor read straight into its slot;
  2. with a `jax.sharding.Sharding` per leaf, from this process's addressable devices' shard indices:
     each distinct index is read once (replicas share the block), put on its devices, and dropped,
     so the stacked leaf never exists on the host and no process reads what its devices don't own.
Keep mode (dtype "fp8") also returns the stored e4m3 weights and their scales in our [in, out]
orientation, as a tree that mirrors the params: `{...path...: {"weight", "scale_inv"}}`.

Saving (`save`) plans the files from shapes alone, writes each file's header first, then fetches one
tensor at a time from the variables (a device-side slice of a stacked leaf), converts it and appends
it, so the host holds about one tensor. The directory is built under a temporary name and renamed.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import logging

from dsv3_jax import config as config_lib
from dsv3_jax import convert
from dsv3_jax import fp8
from dsv3_jax import safetensors_file

ConversionError = convert.ConversionError
BLOCK = fp8.BLOCK
INDEX = safetensors_file.INDEX
SCALE_FMTS = (None, "ue8m0")
QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [BLOCK, BLOCK],
                       "activation_scheme": "dynamic"}
_FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
_BF16 = np.dtype(ml_dtypes.bfloat16)
_F32 = np.dtype(np.float32)
_ST_DTYPES, _ST_NAMES, _FLOATS = safetensors_file.DTYPES, safetensors_file.DTYPE_NAMES, safetensors_file.FLOATS
_SAVE_DTYPES = {"float32": _F32, "bfloat16": _BF16, "fp8": _BF16}
# e4m3 byte -> fp32, the same bits as ml_dtypes' cast and about 3x faster than it.
_FP8_TO_F32 = np.arange(256, dtype=np.uint8).view(_FP8).astype(np.float32)
# The linear weights DeepSeek stores in FP8: attention, dense MLP, routed and shared experts (not the
# router `mlp.gate`, the embedding/head, norms, the correction bias or MTP `eh_proj`).
_FP8_NAME = re.compile(r"\.(self_attn\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
                       r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight$")
SCALE = "_scale_inv"

Progress = Callable[[int, int], None]  # (bytes done, bytes in all)
Range = safetensors_file.Range
Index = tuple[Range, ...]


def is_fp8_name(name: str) -> bool:
  """Whether DeepSeek stores this HF tensor in FP8 (with a `_scale_inv`)."""
  return bool(_FP8_NAME.search(name))


CheckpointFiles = safetensors_file.CheckpointFiles


def open_checkpoint(hf_dir: str) -> CheckpointFiles:
  """Opens `model.safetensors.index.json` (or a single `model.safetensors`); reads headers only."""
  return CheckpointFiles(hf_dir)


# ---------------------------------------------------------------------------------------------------
# FP8 blocks.


def scale_shape(shape: tuple[int, ...]) -> tuple[int, int]:
  return (-(-shape[0] // BLOCK), -(-shape[1] // BLOCK))


def _blocks(span: Range) -> Range:
  """The 128-blocks that elements [start, stop) overlap."""
  return span[0] // BLOCK, -(-span[1] // BLOCK)


def dequantize(w_fp8: np.ndarray, scale_inv: np.ndarray, dtype="float32", name: str = "weight",
               origin: tuple[int, int] = (0, 0)) -> np.ndarray:
  """cast(fp32(w) * scale) per 128x128 block: DeepSeek's `weight_dequant`.

  `w_fp8` may be a slice whose first element sits at `origin` of the full tensor; `scale_inv` then holds
  just the blocks the slice overlaps.
  """
  expected = tuple(b - a for a, b in (_blocks((o, o + n)) for o, n in zip(origin, w_fp8.shape, strict=False)))
  if w_fp8.ndim != 2 or scale_inv.shape != expected:
    raise ConversionError(f"tensor {name + SCALE!r} has shape {tuple(scale_inv.shape)}; weight {name!r} of "
                          f"shape {tuple(w_fp8.shape)} needs {expected if w_fp8.ndim == 2 else '2-D'}")
  out = np.take(_FP8_TO_F32, w_fp8.view(np.uint8))
  r, c = origin[0] % BLOCK, origin[1] % BLOCK
  out *= np.repeat(np.repeat(scale_inv.astype(np.float32), BLOCK, 0), BLOCK, 1)[r:r + out.shape[0],
                                                                                c:c + out.shape[1]]
  return out.astype(_np_dtype(dtype), copy=False)


def quantize(w: np.ndarray, scale_fmt: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(e4m3 [out, in], fp32 scale_inv): `fp8.quantize_blocks`, DeepSeek's 128x128 block scheme.

  scale_fmt "ue8m0" rounds each scale up to a power of two (DeepSeek-V3.1's format).
  """
  if scale_fmt not in SCALE_FMTS:
    raise ValueError(f"scale_fmt {scale_fmt!r} is not one of {SCALE_FMTS}")
  q, scale = _quantize_blocks(jnp.asarray(w, jnp.float32), ue8m0=scale_fmt == "ue8m0")
  return np.asarray(q), np.asarray(scale)


_quantize_blocks = jax.jit(fp8.quantize_blocks, static_argnames="ue8m0")


def _np_dtype(dtype) -> np.dtype:
  return _BF16 if dtype == "bfloat16" else np.dtype(dtype)


# ---------------------------------------------------------------------------------------------------
# Validation (headers and config.json only).


def expected_shapes(cfg: config_lib.ModelConfig, abstract: dict | None = None) -> dict[str, tuple[int, ...]]:
  """Every HF tensor name (checkpoint layout, per-expert) this config needs, with its shape."""
  return convert.hf_shapes(cfg, abstract if abstract is not None else convert.abstract_variables(cfg))


def validate(files: CheckpointFiles, cfg: config_lib.ModelConfig, abstract: dict | None = None) -> None:
  """Checks names, shapes, dtypes and FP8 scales from the headers alone, before any tensor is read."""
  required = expected_shapes(cfg, abstract)
  expected = {**{copy: required[main] for copy, main in convert.mtp_copies(cfg).items()}, **required}
  missing = sorted(set(required) - set(files))
  if missing:
    raise ConversionError(f"tensor {missing[0]!r} is missing from the checkpoint {files.hf_dir}"
                          f"{f' ({len(missing)} missing in all)' if len(missing) > 1 else ''}")
  for name in files:
    weight = name.removesuffix(SCALE)
    if weight != name and weight in files and files.dtype_name(weight) == "F8_E4M3":
      continue  # checked with its weight
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
  scale = name + SCALE
  if scale not in files:
    raise ConversionError(f"FP8 tensor {name!r} has no {scale!r}")
  if len(files.shape(name)) != 2 or files.shape(scale) != scale_shape(files.shape(name)):
    raise ConversionError(f"tensor {scale!r} has shape {files.shape(scale)}; weight {name!r} of shape "
                          f"{files.shape(name)} needs {scale_shape(files.shape(name))}")
  if files.dtype_name(scale) not in _FLOATS - {"F8_E4M3"}:
    raise ConversionError(f"tensor {scale!r} has dtype {files.dtype_name(scale)}, expected F32")


def check_quantization_config(hf_config: dict, where: str) -> None:
  """Refuses a `quantization_config` this reader does not implement (it would mis-scale silently)."""
  q = hf_config.get("quantization_config")
  if q is None:
    return
  problems = [f"{key} {q.get(key)!r}" for key, ok in (
      ("quant_method", q.get("quant_method") == "fp8"),
      ("fmt", q.get("fmt", "e4m3") == "e4m3"),
      ("weight_block_size", list(q.get("weight_block_size", [BLOCK, BLOCK])) == [BLOCK, BLOCK]),
      ("scale_fmt", q.get("scale_fmt") in SCALE_FMTS)) if not ok]
  if problems:
    raise ConversionError(f"{where}: quantization_config has {', '.join(problems)}; only DeepSeek's FP8 "
                          f"(e4m3, 128x128 blocks, scale_fmt None or ue8m0) is supported")


def read_hf_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, "config.json")
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ConversionError(f"{path}: not readable ({type(e).__name__}: {e})") from e


def read_config(hf_dir: str, **overrides) -> config_lib.ModelConfig:
  return config_lib.ModelConfig.from_hf(read_hf_config(hf_dir), **overrides)


# ---------------------------------------------------------------------------------------------------
# Loading.


@dataclasses.dataclass(frozen=True)
class _Leaf:
  """One array `load` builds: `key` in its output tree, from the checkpoint tensors in `group`."""

  key: tuple  # ("variables", collection, *path) or ("fp8", *path, "weight" | "scale_inv")
  group: tuple[convert.Entry, ...]
  shape: tuple[int, ...]
  dtype: np.dtype
  raw: bool  # the stored values (e4m3 weight, scale) rather than dequantised ones


class _Loader:
  """Reads blocks of leaves from the files, counting bytes and checking the MTP copies on the way."""

  def __init__(self, files: CheckpointFiles, cfg: config_lib.ModelConfig, progress: Progress | None):
    self.files, self.progress, self.total = files, progress, 0
    self.copies = collections.defaultdict(list)
    for copy, main in convert.mtp_copies(cfg).items():
      if copy in files:
        self.copies[main].append(copy)
    self.warned: set[str] = set()

  def reads(self, leaf: _Leaf, index: Index) -> Iterator[tuple[convert.Entry, tuple, Range, Range | None]]:
    """(entry, slot in the block, HF rows, HF cols) of each checkpoint tensor the block overlaps."""
    lead = len(leaf.group[0].index)
    by_index = {e.index: e for e in leaf.group}
    for position in itertools.product(*(range(a, b) for a, b in index[:lead])):
      entry = by_index[position]
      own = index[lead:][::-1] if entry.transpose else index[lead:]
      yield entry, tuple(p - a for p, (a, _) in zip(position, index[:lead], strict=True)), own[0], (
          own[1] if len(own) > 1 else None)

  def planned_bytes(self, leaves: list[_Leaf], index: Index) -> int:
    """What `block(leaves, index)` will read, in bytes."""
    total = 0
    for entry, _, rows, cols in self.reads(leaves[0], index):
      total += sum(_span_bytes(self.files, n, rows, cols) for n in (entry.name, *self.copies.get(entry.name, ())))
      if self._needs_scale(leaves, entry):
        total += _span_bytes(self.files, entry.name + SCALE, _blocks(rows), _blocks(cols))
    return total

  def _needs_scale(self, leaves: list[_Leaf], entry: convert.Entry) -> bool:
    return self.files.dtype_name(entry.name) == "F8_E4M3" and any(not leaf.raw for leaf in leaves)

  def block(self, leaves: list[_Leaf], index: Index) -> list[np.ndarray]:
    """The block `index` of each of `leaves` (same tensors, same shape), reading each tensor slice once."""
    shape = tuple(b - a for a, b in index)
    outs = [np.empty(shape, leaf.dtype) for leaf in leaves]
    for entry, slot, rows, cols in self.reads(leaves[0], index):
      stored = self.files.read(entry.name, rows, cols)
      self._check_copies(entry.name, stored, rows, cols)
      scale = None
      if self._needs_scale(leaves, entry):
        scale = self.files.read(entry.name + SCALE, _blocks(rows), _blocks(cols))
      for leaf, out in zip(leaves, outs, strict=True):
        value = self._convert(leaf, entry.name, stored, scale, (rows[0], cols[0] if cols else 0))
        out[slot] = value.T if entry.transpose else value
      if self.progress:
        self.progress(self.files.bytes_read, self.total)
    return outs

  def _convert(self, leaf: _Leaf, name: str, stored: np.ndarray, scale, origin) -> np.ndarray:
    if leaf.raw:
      if stored.dtype != leaf.dtype:
        raise ConversionError(f"tensor {name!r} is {_ST_NAMES[stored.dtype]}; keep mode needs every tensor of "
                              f"{'/'.join(leaf.key[1:-1])} in {_ST_NAMES[leaf.dtype]}")
      return stored
    if stored.dtype == _FP8:
      return dequantize(stored, scale, leaf.dtype, name, origin)
    return stored.astype(leaf.dtype, copy=False)

  def _check_copies(self, main: str, stored: np.ndarray, rows: Range, cols: Range | None) -> None:
    for copy in self.copies.get(main, ()):
      same = np.array_equal(self.files.read(copy, rows, cols).astype(np.float32), stored.astype(np.float32))
      if not same and copy not in self.warned:
        logging.warning("%s differs from %s; the MTP module uses the main model's", copy, main)
        self.warned.add(copy)


def _span_bytes(files: CheckpointFiles, name: str, rows: Range, cols: Range | None) -> int:
  shape = files.shape(name)
  width = (cols[1] - cols[0]) if cols else math.prod(shape[1:])
  return (rows[1] - rows[0]) * width * _ST_DTYPES[files.dtype_name(name)].itemsize


def _leaves(files: CheckpointFiles, cfg: config_lib.ModelConfig, abstract: dict, dtype: str) -> list[list[_Leaf]]:
  """What `load` builds, as lists of leaves read together (a kernel and, in keep mode, its e4m3 weight)."""
  keep = dtype == "fp8"
  jobs = []
  for leaf, group in convert.by_leaf(convert.entries(cfg)).items():
    shape = tuple(convert.get_leaf(abstract, leaf).shape)
    value_dtype = _F32 if keep or leaf[0] == "routing" else _SAVE_DTYPES[dtype]
    job = [_Leaf(("variables", leaf[0], *leaf[1]), tuple(group), shape, value_dtype, False)]
    fp8 = [files.dtype_name(e.name) == "F8_E4M3" for e in group]
    if keep and any(fp8):
      if not all(fp8):
        odd = group[fp8.index(False)].name
        raise ConversionError(f"tensor {odd!r} is {files.dtype_name(odd)} while other tensors of "
                              f"{'/'.join(leaf[1])} are F8_E4M3; keep mode needs all of them in FP8")
      scales = tuple(dataclasses.replace(e, name=e.name + SCALE) for e in group)
      lead = len(group[0].index)
      scale_dims = scale_shape(shape[lead:][::-1])[::-1]
      job.append(_Leaf(("fp8", *leaf[1], "weight"), tuple(group), shape, _FP8, True))
      jobs.append(job)
      jobs.append([_Leaf(("fp8", *leaf[1], "scale_inv"), scales, (*shape[:lead], *scale_dims), _F32, True)])
    else:
      jobs.append(job)
  return jobs


def _sharding_map(shardings, keep: bool, jobs: list[list[_Leaf]]) -> dict[tuple, jax.sharding.Sharding | None]:
  """{leaf key: sharding}; checks the tree against the leaves before anything is read."""
  keys = [leaf.key for job in jobs for leaf in job]
  if shardings is None:
    return dict.fromkeys(keys)
  if isinstance(shardings, tuple) and not keep:
    raise ValueError("shardings: a (variables, fp8) pair is for dtype 'fp8' only")
  variables, fp8 = shardings if keep and isinstance(shardings, tuple) else (shardings, None)
  out = {("variables", *path): s for path, s in convert.flatten(variables).items()}
  if keep and fp8 is None:
    fp8 = fp8_shardings(variables, convert.unflatten({leaf.key[1:]: leaf for job in jobs for leaf in job
                                                       if leaf.key[0] == "fp8"}))
  out.update({("fp8", *path): s for path, s in convert.flatten(fp8 or {}).items()})
  for key in sorted(set(keys) ^ set(out)):
    problem = "is not a leaf of what load returns" if key in out else "is missing"
    raise ValueError(f"shardings: {'/'.join(map(str, key))} {problem}")
  shapes = {leaf.key: leaf.shape for job in jobs for leaf in job}
  for key, s in out.items():
    if not isinstance(s, jax.sharding.Sharding):
      raise TypeError(f"shardings: {'/'.join(map(str, key))} is {type(s).__name__}, not a jax.sharding.Sharding")
    try:
      s.shard_shape(shapes[key])
    except Exception as e:  # noqa: BLE001 - re-raised with the leaf's name
      raise ValueError(f"shardings: {'/'.join(map(str, key))} of shape {shapes[key]}: {e}") from e
  return out


def fp8_shardings(variable_shardings: Mapping, fp8_tree: Mapping) -> dict:
  """Shardings for a keep-mode tree (leaves with `.shape`): each e4m3 weight laid out as its kernel, each
  scale likewise minus the mesh axes that do not divide its block count."""
  out = {}
  for (*path, part), leaf in convert.flatten(fp8_tree).items():
    try:
      kernel = convert.get_leaf(variable_shardings, ("params", tuple(path)))
    except KeyError:
      raise ValueError(f"shardings: params/{'/'.join(path)} is missing") from None
    out[(*path, part)] = kernel if part == "weight" else _divisible(kernel, tuple(leaf.shape))
  return convert.unflatten(out)


def _divisible(sharding, shape: tuple[int, ...]):
  if sharding is None or sharding.is_fully_replicated or not isinstance(sharding, jax.sharding.NamedSharding):
    return sharding
  spec = []
  for dim, axes in zip(shape, tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec)), strict=True):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    spec.append(axes if dim % math.prod(sharding.mesh.shape[a] for a in names) == 0 else None)
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))


def _device_groups(shape: tuple[int, ...], sharding) -> dict[Index, list]:
  """{distinct shard index: this process's devices holding it}; one full block when unsharded."""
  if sharding is None:
    return {tuple((0, n) for n in shape): []}
  groups: dict[Index, list] = {}
  for device, index in sharding.addressable_devices_indices_map(shape).items():
    groups.setdefault(tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True)), []).append(device)
  return groups


def _build(loader: _Loader, job: list[_Leaf], sharding, groups: dict[Index, list]) -> list:
  """The job's arrays: numpy without a sharding, else jax arrays put shard by shard."""
  if sharding is None:
    return loader.block(job, next(iter(groups)))
  per_leaf = [[] for _ in job]
  for index, devices in groups.items():
    for arrays, block in zip(per_leaf, loader.block(job, index), strict=True):
      arrays.extend(jax.device_put(block, d) for d in devices)
  return [jax.make_array_from_single_device_arrays(leaf.shape, sharding, arrays, dtype=leaf.dtype)
          for leaf, arrays in zip(job, per_leaf, strict=True)]


def _split_jobs(jobs: list[list[_Leaf]], shardings: dict) -> list[list[_Leaf]]:
  # A kernel and its e4m3 weight share reads only when they share a layout.
  out = []
  for job in jobs:
    if len(job) > 1 and shardings[job[0].key] != shardings[job[1].key]:
      out.extend([leaf] for leaf in job)
    else:
      out.append(job)
  return out


def load(hf_dir: str, cfg: config_lib.ModelConfig | None = None, dtype: str = "float32", shardings=None,
         progress: Progress | None = None):
  """Our variables {"params", "routing"} from a HF checkpoint directory.

  dtype "float32"/"bfloat16" dequantises FP8 weights to that dtype (routing biases stay fp32). dtype
  "fp8" (keep mode) returns `(variables in float32, fp8)` where `fp8` mirrors the params of the
  FP8-stored kernels with `{"weight": e4m3 [..., in, out], "scale_inv": fp32 [..., in/128, out/128]}`,
  the bytes as stored, which `save(..., dtype="fp8", fp8_weights=fp8)` writes back unchanged.

  `shardings`: None (numpy arrays), or a tree of `jax.sharding.Sharding` matching the variables (in
  keep mode, the pair matching `(variables, fp8)`, or the variables' alone: the fp8 tree then follows
  its kernels, dropping mesh axes that do not divide a scale's block count). Each process then reads
  only the slices its addressable devices own. `progress(bytes read, bytes to read)` is called as the
  load goes. cfg defaults to `ModelConfig.from_hf(config.json)`.
  """
  if dtype not in _SAVE_DTYPES:
    raise ValueError(f"dtype {dtype!r} is not one of {sorted(_SAVE_DTYPES)}")
  if cfg is None or os.path.exists(os.path.join(hf_dir, "config.json")):
    hf_config = read_hf_config(hf_dir)
    check_quantization_config(hf_config, os.path.join(hf_dir, "config.json"))
    cfg = cfg or config_lib.ModelConfig.from_hf(hf_config)
  abstract = convert.abstract_variables(cfg)
  start = time.perf_counter()
  with open_checkpoint(hf_dir) as files:
    validate(files, cfg, abstract)
    jobs = _leaves(files, cfg, abstract, dtype)
    layout = _sharding_map(shardings, dtype == "fp8", jobs)
    jobs = _split_jobs(jobs, layout)
    loader = _Loader(files, cfg, progress)
    groups = [_device_groups(job[0].shape, layout[job[0].key]) for job in jobs]
    loader.total = sum(loader.planned_bytes(job, index) for job, g in zip(jobs, groups, strict=True) for index in g)
    built = {}
    for job, g in zip(jobs, groups, strict=True):
      built.update(zip((leaf.key for leaf in job), _build(loader, job, layout[job[0].key], g), strict=True))
    logging.info("read %.1f MB from %s in %.1f s", files.bytes_read / 1e6, hf_dir, time.perf_counter() - start)
  variables = convert.unflatten({key[1:]: value for key, value in built.items() if key[0] == "variables"})
  if dtype != "fp8":
    return variables
  return variables, convert.unflatten({key[1:]: value for key, value in built.items() if key[0] == "fp8"})


# ---------------------------------------------------------------------------------------------------
# Saving.


def _check_variables(variables: Mapping, cfg: config_lib.ModelConfig, abstract: dict) -> None:
  """Every leaf present with its shape and readable from this process; nothing extra."""
  expected = {(leaf[0], *leaf[1]) for leaf in convert.by_leaf(convert.entries(cfg))}
  given = {(col, *path): a for col in variables for path, a in convert.flatten(variables[col]).items()}
  for key in sorted(expected ^ set(given)):
    problem = "is not part of this config" if key in given else "is missing"
    raise ConversionError(f"variables: {'/'.join(key)} {problem}")
  for key, array in given.items():
    want = tuple(convert.get_leaf(abstract, (key[0], key[1:])).shape)
    if tuple(np.shape(array)) != want:
      raise ConversionError(f"variables: {'/'.join(key)} has shape {tuple(np.shape(array))}, this config needs {want}")
    if isinstance(array, jax.Array) and not array.is_fully_addressable:
      raise ValueError(f"variables: {'/'.join(key)} spans several processes; save runs in one process that can "
                       f"read every array")


def _check_fp8_weights(nodes: dict[convert.Path, dict], abstract: dict) -> None:
  """Each kernel's stored e4m3 weight and scales: a kernel of this config, with its shapes and dtypes."""
  for path, node in sorted(nodes.items()):
    try:
      kernel = tuple(convert.get_leaf(abstract, ("params", path)).shape)
    except KeyError:
      raise ConversionError(f"fp8_weights: {'/'.join(path)} is not a kernel of this config") from None
    lead = len(kernel) - 2
    want = {"weight": (kernel, _FP8), "scale_inv": ((*kernel[:lead], *scale_shape(kernel[lead:])), _F32)}
    for part in sorted(set(node) | set(want)):
      array, (shape, dtype) = node.get(part), want.get(part, ((), None))
      if array is None or tuple(array.shape) != shape or np.dtype(array.dtype) != dtype:
        got = "missing" if array is None else f"{np.dtype(array.dtype)}{list(array.shape)}"
        raise ConversionError(f"fp8_weights: {'/'.join(path)}/{part} is {got}, expected "
                              f"{f'{dtype}{list(shape)}' if dtype else 'weight and scale_inv only'}")


def _stored(entry: convert.Entry, shape: tuple[int, ...], dtype: str, fp8: bool) -> list[tuple[str, str, tuple]]:
  """(name, safetensors dtype, shape) of what one checkpoint tensor is stored as."""
  if fp8:
    return [(entry.name, "F8_E4M3", shape), (entry.name + SCALE, "F32", scale_shape(shape))]
  return [(entry.name, "F32" if entry.leaf[0] == "routing" else _ST_NAMES[_SAVE_DTYPES[dtype]], shape)]


def _to_disk(entry: convert.Entry, variables: Mapping, fp8_nodes: dict, planned: list,
             scale_fmt: str | None) -> list[tuple[str, np.ndarray]]:
  """The arrays stored for one checkpoint tensor, fetched from the (possibly sharded) variables."""
  node = fp8_nodes.get(entry.leaf[1]) if len(planned) == 2 else None
  if node is not None:
    return [(entry.name, convert.take(node["weight"], entry)),
            (entry.name + SCALE, convert.take(node["scale_inv"], entry))]
  value = convert.fetch(variables, entry)
  if len(planned) == 2:
    w, scale = quantize(value, scale_fmt)
    return [(entry.name, w), (entry.name + SCALE, scale)]
  return [(entry.name, value.astype(_ST_DTYPES[planned[0][1]], copy=False))]


def _plan_shards(sizes: list[int], max_shard_bytes: int) -> list[list[int]]:
  shards, current, used = [], [], 0
  for i, size in enumerate(sizes):
    if current and used + size > max_shard_bytes:
      shards.append(current)
      current, used = [], 0
    current.append(i)
    used += size
  return shards + [current] if current else shards


def save(variables: Mapping, cfg: config_lib.ModelConfig, out_dir: str, dtype: str = "bfloat16",
         max_shard_bytes: int = 5 * 2**30, fp8_weights: Mapping | None = None, overwrite: bool = False,
         scale_fmt: str | None = None, progress: Progress | None = None) -> None:
  """Writes a HF checkpoint directory: config.json, sharded safetensors (per-expert keys) and the index.

  dtype "fp8" stores the linear weights DeepSeek stores in FP8 (and any kernel in `fp8_weights`, the
  keep-mode tree of `load`) as e4m3 + `_scale_inv`: from `fp8_weights` when given, else quantised per
  128x128 block (`scale_fmt="ue8m0"`: power-of-two scales); the rest in bf16. The correction bias is
  always fp32. Variables may be numpy or jax arrays (sharded included): one tensor is fetched at a
  time. Everything is checked before the first byte is written; the directory is built under a
  temporary name and renamed when complete. `progress(bytes written, bytes to write)`.
  """
  if dtype not in _SAVE_DTYPES:
    raise ValueError(f"dtype {dtype!r} is not one of {sorted(_SAVE_DTYPES)}")
  if scale_fmt not in SCALE_FMTS or (scale_fmt and dtype != "fp8"):
    raise ValueError(f"scale_fmt {scale_fmt!r}: one of {SCALE_FMTS}, and only with dtype 'fp8'")
  abstract = convert.abstract_variables(cfg)
  _check_variables(variables, cfg, abstract)
  fp8_nodes = _fp8_nodes(fp8_weights, abstract)
  table = convert.entries(cfg)
  shapes = convert.hf_shapes(cfg, abstract)
  plan = [_stored(e, shapes[e.name], dtype, dtype == "fp8" and (is_fp8_name(e.name) or e.leaf[1] in fp8_nodes))
          for e in table]
  sizes = [sum(math.prod(shape) * _ST_DTYPES[st].itemsize for _, st, shape in p) for p in plan]
  shards = _plan_shards(sizes, max_shard_bytes)
  tmp = _prepare_out_dir(out_dir, overwrite)
  try:
    weight_map, written = {}, 0
    for i, members in enumerate(shards):
      shard = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      with safetensors_file.FileWriter(os.path.join(tmp, shard), [t for m in members for t in plan[m]]) as writer:
        for m in members:
          for name, array in _to_disk(table[m], variables, fp8_nodes, plan[m], scale_fmt):
            writer.write(name, array)
            weight_map[name] = shard
          written += sizes[m]
          if progress:
            progress(written, sum(sizes))
    _write_json(os.path.join(tmp, INDEX), {"metadata": {"total_size": written}, "weight_map": weight_map})
    _write_json(os.path.join(tmp, "config.json"), _hf_config(cfg, dtype, scale_fmt))
    _move_into_place(tmp, os.path.abspath(out_dir))
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _fp8_nodes(fp8_weights: Mapping | None, abstract: dict) -> dict[convert.Path, dict]:
  """{kernel path: {"weight", "scale_inv"}} of a keep-mode tree, checked against this config."""
  nodes = collections.defaultdict(dict)
  for (*path, part), array in convert.flatten(fp8_weights or {}).items():
    nodes[tuple(path)][part] = array
  _check_fp8_weights(nodes, abstract)
  return dict(nodes)


def _hf_config(cfg: config_lib.ModelConfig, dtype: str, scale_fmt: str | None) -> dict:
  hf_config = cfg.to_hf()
  if dtype == "fp8":
    quantization = {**QUANTIZATION_CONFIG, **({"scale_fmt": scale_fmt} if scale_fmt else {})}
    hf_config.update(quantization_config=quantization, torch_dtype="bfloat16")
  else:
    hf_config["torch_dtype"] = dtype
  return hf_config


def _prepare_out_dir(out_dir: str, overwrite: bool) -> str:
  out_dir = os.path.abspath(out_dir)
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True to replace it")
  tmp = f"{out_dir}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  return tmp


def _write_json(path: str, obj: dict) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)


def _move_into_place(tmp: str, out_dir: str) -> None:
  if os.path.isdir(out_dir):
    shutil.rmtree(out_dir)  # empty, or the caller passed overwrite=True
  os.replace(tmp, out_dir)
