"""safetensors files read slice by slice and written tensor by tensor, without the safetensors package.

A file is an 8-byte little-endian header length, a JSON header ({name: {"dtype", "shape",
"data_offsets"}}, offsets relative to the end of the header) and the raw little-endian bytes.
Parsing it here lets float8_e4m3fn tensors load as ml_dtypes arrays, lets a truncated or corrupt
file fail with its name before any tensor is read, and lets a reader take any row range of a tensor
(one contiguous `os.preadv`) or any column range of a 2-D tensor (one read per row), so it touches
only the bytes of its slice. A checkpoint directory is one file or several named by
`model.safetensors.index.json`. Writing puts the header first, planned from names, dtypes and
shapes alone, then appends one tensor at a time.
"""

from __future__ import annotations

import collections
import json
import math
import os
from collections.abc import Iterator
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from dsv3_jax import convert

ConversionError = convert.ConversionError
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
          "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
          "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_)}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOATS = {"F64", "F32", "F16", "BF16", "F8_E4M3"}
Range = tuple[int, int]  # [start, stop) along one dimension


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
    header.pop("__metadata__", None)
    return {name: _tensor_info(path, name, info, 8 + header_len, size) for name, info in header.items()}
  except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as e:
    if isinstance(e, ConversionError):
      raise
    raise ConversionError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e


def _tensor_info(path: str, name: str, info: dict, data_start: int, size: int) -> dict:
  if info.get("dtype") not in DTYPES:
    raise ConversionError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
  start, end = (int(x) for x in info["data_offsets"])
  shape = tuple(int(n) for n in info["shape"])
  nbytes = math.prod(shape) * DTYPES[info["dtype"]].itemsize
  if end - start != nbytes or start < 0 or min(shape, default=0) < 0:
    raise ConversionError(f"{path}: tensor {name!r} spans bytes [{start}, {end}), its shape {shape} needs {nbytes}")
  if data_start + end > size:
    raise ConversionError(f"{path}: truncated safetensors file; tensor {name!r} ends at byte "
                          f"{data_start + end} of {size}")
  return {"dtype": info["dtype"], "shape": shape, "offset": data_start + start, "nbytes": nbytes}


class CheckpointFiles(Mapping):
  """A HF checkpoint directory as {tensor name: numpy array}, each tensor (or slice) read on access.

  `bytes_read` and `bytes_by_name` count what was read from the files.
  """

  def __init__(self, hf_dir: str):
    self.hf_dir = hf_dir
    index_path, single = os.path.join(hf_dir, INDEX), os.path.join(hf_dir, SINGLE)
    if os.path.exists(index_path):
      weight_map = _read_weight_map(index_path)
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
    self.bytes_by_name: collections.Counter[str] = collections.Counter()
    self._fds: dict[str, int] = {}

  def read(self, name: str, rows: Range | None = None, cols: Range | None = None) -> np.ndarray:
    """Rows [r0, r1) (and, for a 2-D tensor, columns [c0, c1)) as stored; reads only those bytes."""
    info = self.info[name]
    dtype, shape = DTYPES[info["dtype"]], info["shape"]
    if not shape:
      return self._read_into(name, np.empty((), dtype), info["offset"])
    r0, r1 = rows or (0, shape[0])
    c0, c1 = cols or (0, shape[1]) if len(shape) == 2 else (0, 0)
    if not (0 <= r0 <= r1 <= shape[0] and 0 <= c0 <= c1 <= (shape[1] if len(shape) == 2 else 0)):
      raise ValueError(f"rows {rows}, cols {cols} are outside tensor {name!r} of shape {shape}")
    row_bytes = dtype.itemsize * math.prod(shape[1:])
    if len(shape) != 2 or (c0, c1) == (0, shape[1]):
      return self._read_into(name, np.empty((r1 - r0, *shape[1:]), dtype), info["offset"] + r0 * row_bytes)
    out = np.empty((r1 - r0, c1 - c0), dtype)
    for i in range(r1 - r0):
      self._read_into(name, out[i], info["offset"] + (r0 + i) * row_bytes + c0 * dtype.itemsize)
    return out

  def _read_into(self, name: str, out: np.ndarray, offset: int) -> np.ndarray:
    path = self.info[name]["path"]
    if path not in self._fds:
      self._fds[path] = os.open(path, os.O_RDONLY)
    buffer, done = out.reshape(-1).view(np.uint8), 0  # a view: the read lands in `out`
    while done < out.nbytes:  # one call returns at most about 2 GiB on Linux
      n = os.preadv(self._fds[path], [buffer[done:]], offset + done)
      if n == 0:
        raise ConversionError(f"{path}: truncated while reading tensor {name!r}")
      done += n
    self.bytes_read += out.nbytes
    self.bytes_by_name[name] += out.nbytes
    return out

  def close(self) -> None:
    for fd in self._fds.values():
      os.close(fd)
    self._fds.clear()

  def __enter__(self) -> CheckpointFiles:
    return self

  def __exit__(self, *_) -> None:
    self.close()

  def __getitem__(self, name: str) -> np.ndarray:
    return self.read(name)

  def __contains__(self, name) -> bool:
    return name in self.info  # Mapping's default would read the tensor

  def __iter__(self) -> Iterator[str]:
    return iter(self.info)

  def __len__(self) -> int:
    return len(self.info)

  def shape(self, name: str) -> tuple[int, ...]:
    return self.info[name]["shape"]

  def dtype_name(self, name: str) -> str:
    return self.info[name]["dtype"]


def _read_weight_map(index_path: str) -> dict[str, str]:
  try:
    with open(index_path) as f:
      weight_map = json.load(f)["weight_map"]
  except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
    raise ConversionError(f"{index_path}: not a readable index ({type(e).__name__}: {e})") from e
  if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
    raise ConversionError(f"{index_path}: weight_map must map tensor names to shard file names")
  return weight_map


class FileWriter:
  """One safetensors file, used as a context manager: the header of the planned (name, dtype, shape)
  list first, then `write` each tensor in that order."""

  def __init__(self, path: str, planned: list[tuple[str, str, tuple[int, ...]]]):
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, st_dtype, shape in planned:
      nbytes = math.prod(shape) * DTYPES[st_dtype].itemsize
      header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
      offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header so the data starts 8-byte aligned
    self.path, self.planned, self.done = path, planned, 0
    self.file = open(path, "wb")  # noqa: SIM115 - closed on leaving the `with` block
    self.file.write(len(raw).to_bytes(8, "little"))
    self.file.write(raw)

  def __enter__(self) -> FileWriter:
    return self

  def __exit__(self, error_type, *_) -> None:
    self.file.close()
    if error_type is None and self.done != len(self.planned):
      raise ConversionError(f"{self.path}: {len(self.planned) - self.done} planned tensors were not written")

  def write(self, name: str, array: np.ndarray) -> None:
    expected = self.planned[self.done]
    if (name, DTYPE_NAMES.get(array.dtype), tuple(array.shape)) != expected:
      raise ConversionError(f"{self.path}: tensor {name!r} is {array.dtype}{list(array.shape)}, "
                            f"the plan says {expected}")
    self.file.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
    self.done += 1
