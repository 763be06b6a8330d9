"""Training data: tokenizers, text corpora, document packing and a resumable grain batch iterator."""

from __future__ import annotations

import functools
import json
import operator
import os
import pathlib
import sysconfig
import zlib
from collections.abc import Callable
from collections.abc import Sequence

import grain
import numpy as np
import tokenizers

DEFAULT_EOS_TOKENS = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>")
CORPUS_SUFFIXES = (".txt", ".md", ".py", ".jsonl")
# Test suites and IDLE are dominated by fixtures and deliberately odd code; site-packages is not the stdlib.
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"})
# index_shuffle takes 32-bit seeds.
_MAX_SEED = 2**32

# --------------------------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------------------------


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255 plus EOS = 256: needs no vocabulary file and never fails on any text."""

  name = "bytes"
  vocab_size = 257
  eos_id = 256

  def encode(self, text: str) -> list[int]:
    return self.encode_array(text).tolist()

  def encode_array(self, text: str) -> np.ndarray:
    """int32 ids as a numpy array: the fast path load_split uses (no per-character Python work)."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [self.encode_array(t) for t in texts]

  def decode(self, ids) -> str:
    arr = np.asarray(ids, dtype=np.int64).ravel()
    return arr[(arr >= 0) & (arr < 256)].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class HFTokenizer:
  """A user `tokenizer.json` (HuggingFace `tokenizers`); encode/decode add no special tokens."""

  def __init__(self, path: str, eos_token: str | None = None):
    self.path = str(path)
    self._tok = tokenizers.Tokenizer.from_file(self.path)
    self.vocab_size = self._tok.get_vocab_size()
    self.eos_id = self._find_eos(eos_token)
    self.name = f"hf:{os.path.basename(self.path)}"

  def _find_eos(self, eos_token: str | None) -> int:
    candidates = (eos_token,) if eos_token is not None else DEFAULT_EOS_TOKENS
    for token in candidates:
      token_id = self._tok.token_to_id(token)
      if token_id is not None:
        return token_id
    raise ValueError(
      f"tokenizer {self.path} has no EOS token: tried {', '.join(repr(t) for t in candidates)}; "
      "pass the right one as eos_token"
    )

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in np.asarray(ids).ravel()], skip_special_tokens=True)


def load_tokenizer(path: str | None, eos_token: str | None = None) -> ByteTokenizer | HFTokenizer:
  """None or "bytes" -> ByteTokenizer; otherwise the tokenizer.json at `path`."""
  if path is None or path == "bytes":
    return ByteTokenizer()
  if not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer file not found: {path}")
  return HFTokenizer(path, eos_token)


# --------------------------------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------------------------------

# A corpus unit that is assigned to one split as a whole: (stable key, loader of its documents).
_Item = tuple[str, Callable[[], list[str]]]


def documents(source: str, split: str, heldout_fraction: float = 0.05, max_bytes: int | None = None) -> list[str]:
  """The `split` ("train" or "heldout") documents of `source` ("stdlib", a file or a directory), in sorted order."""
  if split not in ("train", "heldout"):
    raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
  if not 0.0 <= heldout_fraction < 1.0:
    raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
  if max_bytes is not None and max_bytes <= 0:
    raise ValueError(f"max_bytes must be positive or None, got {max_bytes}")
  items = _source_items(source)
  heldout = _heldout_mask([key for key, _ in items], heldout_fraction)
  chosen = [item for item, held in zip(items, heldout, strict=True) if held == (split == "heldout")]
  docs = _take(chosen, max_bytes)
  if not docs:
    raise ValueError(
      f"data source {source!r} has no {split} documents (heldout_fraction={heldout_fraction}; "
      f"files are .txt/.md/.py/.jsonl in UTF-8, a single text file is one document)"
    )
  return docs


def _source_items(source: str) -> list[_Item]:
  if source == "stdlib":
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return _file_items(root, _stdlib_files(root))
  path = pathlib.Path(source)
  if not path.exists():
    raise FileNotFoundError(f"data source not found: {source}")
  if path.is_dir():
    return _file_items(path, _corpus_files(path))
  # A single file is one unit of reading, so the split is by document index instead of by path.
  docs = _read_file(path)
  return [(str(i), functools.partial(list, (doc,))) for i, doc in enumerate(docs or [])]


def _walk(root: pathlib.Path, skip_dir: Callable[[str], bool], suffixes: tuple[str, ...]) -> list[str]:
  """Relative POSIX paths of the matching files under root, sorted so every machine sees the same order."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if not skip_dir(d)]
    rel_dir = pathlib.Path(dirpath).relative_to(root)
    found.extend((rel_dir / f).as_posix() for f in filenames if f.endswith(suffixes))
  return sorted(found)


def _stdlib_files(root: pathlib.Path) -> list[str]:
  return _walk(root, lambda d: d in _STDLIB_SKIP_DIRS, (".py",))


def _corpus_files(root: pathlib.Path) -> list[str]:
  # Hidden directories (.git, .venv, ...) are tooling, not corpus.
  return _walk(root, lambda d: d.startswith("."), CORPUS_SUFFIXES)


def _file_items(root: pathlib.Path, rel_paths: list[str]) -> list[_Item]:
  return [(rel, functools.partial(_read_file, root / rel)) for rel in rel_paths]


def _read_file(path: pathlib.Path) -> list[str] | None:
  """The documents of one file, or None if it is not valid UTF-8."""
  try:
    text = path.read_bytes().decode("utf-8")
  except UnicodeDecodeError:
    return None
  if path.suffix == ".jsonl":
    return _jsonl_documents(path, text)
  return [text]


def _jsonl_documents(path: pathlib.Path, text: str) -> list[str]:
  docs = []
  # split("\n"), not splitlines(): JSON strings may hold raw U+2028 and friends, which splitlines would cut.
  for lineno, line in enumerate(text.split("\n"), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
      raise ValueError(f"{path}:{lineno}: expected a JSON object with a string 'text' field")
    docs.append(record["text"])
  return docs


def _heldout_mask(keys: list[str], fraction: float) -> np.ndarray:
  """Held-out units by a hash of their key, so a unit stays on its side whatever else the corpus holds."""
  hashes = np.array([zlib.crc32(k.encode("utf-8")) for k in keys], dtype=np.uint64)
  mask = hashes < np.uint64(int(fraction * 2**32))
  if fraction > 0 and len(keys) and not mask.any():
    mask[np.argmin(hashes)] = True
  return mask


def _take(items: list[_Item], max_bytes: int | None) -> list[str]:
  """Documents of the items in order until max_bytes of UTF-8 text; the last one is cut to fit exactly."""
  docs, total = [], 0
  for _, load in items:
    for doc in load() or []:
      size = len(doc.encode("utf-8"))
      if max_bytes is not None and total + size > max_bytes:
        doc = doc.encode("utf-8")[: max_bytes - total].decode("utf-8", errors="ignore")
        if doc:
          docs.append(doc)
        return docs
      if doc:
        docs.append(doc)
        total += size
  return docs


# --------------------------------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------------------------------


def pack(docs_ids: Sequence[Sequence[int]], seq_len: int, eos_id: int) -> dict[str, np.ndarray]:
  """Documents each followed by EOS, concatenated and cut into rows of seq_len + 1 tokens (remainder dropped).

  Returns {"tokens", "segment_ids"}, both int32 [n, seq_len + 1]; segment ids number the documents within each row
  from 1, and an EOS belongs to the document it ends.
  """
  if seq_len < 1:
    raise ValueError(f"seq_len must be >= 1, got {seq_len}")
  row_len = seq_len + 1
  lengths = np.fromiter((len(d) + 1 for d in docs_ids), dtype=np.int64, count=len(docs_ids))
  total = int(lengths.sum())
  n_rows = total // row_len
  if n_rows == 0:
    raise ValueError(f"corpus has {total} tokens including EOS separators, fewer than one row of {row_len}")
  stream = np.full(total, eos_id, dtype=np.int32)
  is_text = np.ones(total, dtype=bool)
  is_text[np.cumsum(lengths) - 1] = False
  stream[is_text] = np.concatenate([np.asarray(d, dtype=np.int32).ravel() for d in docs_ids])
  doc_index = np.repeat(np.arange(len(docs_ids), dtype=np.int64), lengths)
  keep = n_rows * row_len
  tokens = stream[:keep].reshape(n_rows, row_len)
  doc_index = doc_index[:keep].reshape(n_rows, row_len)
  segment_ids = (doc_index - doc_index[:, :1] + 1).astype(np.int32)
  return {"tokens": tokens, "segment_ids": segment_ids}


def load_split(
  source: str,
  split: str,
  tokenizer: ByteTokenizer | HFTokenizer,
  seq_len: int,
  heldout_fraction: float = 0.05,
  max_bytes: int | None = None,
) -> dict[str, np.ndarray]:
  """Tokenised, packed rows of one split of a source (see `documents` and `pack`)."""
  docs = documents(source, split, heldout_fraction, max_bytes)
  if hasattr(tokenizer, "encode_batch"):
    ids = tokenizer.encode_batch(docs)
  else:
    ids = [tokenizer.encode(d) for d in docs]
  return pack(ids, seq_len, tokenizer.eos_id)


def unigram_entropy(rows_tokens: np.ndarray, vocab_size: int) -> float:
  """Entropy in nats of the target-token frequencies: the loss of a model that knows only unigram statistics."""
  tokens = np.asarray(rows_tokens)
  targets = (tokens[:, 1:] if tokens.ndim == 2 else tokens).ravel()
  if targets.size == 0:
    raise ValueError("no target tokens")
  if targets.min() < 0 or targets.max() >= vocab_size:
    raise ValueError(f"token ids outside [0, {vocab_size})")
  counts = np.bincount(targets, minlength=vocab_size).astype(np.float64)
  p = counts[counts > 0] / targets.size
  return float(-(p * np.log(p)).sum())


# --------------------------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------------------------


def _assemble(tokens: np.ndarray, segment_ids: np.ndarray, cross_document_loss: bool, rows: np.ndarray) -> dict:
  """Model inputs for the packed rows at indices `rows`."""
  toks, segs = tokens[rows], segment_ids[rows]
  loss_mask = np.ones(toks[:, 1:].shape, dtype=np.float32)
  if not cross_document_loss:
    # The target starts another document: predicting it from the previous document only teaches noise.
    loss_mask = (segs[:, 1:] == segs[:, :-1]).astype(np.float32)
  return {
    "inputs": toks[:, :-1],
    "targets": toks[:, 1:],
    "segment_ids": segs[:, :-1],
    "loss_mask": loss_mask,
  }


class BatchIterator:
  """Endless batches of packed rows, reshuffled each epoch; `get_state`/`set_state` resume it bitwise.

  A grain MapDataset is random access, so the whole iterator position is the batch index: batch k is a pure
  function of (rows, batch_size, seed, shuffle, k), whatever happened before.

  `local_rows = (start, stop)` yields only those rows of each global batch: on a multi-host mesh every host
  assembles just its own block of the batch, and the position (hence a checkpoint) is the same on every host.
  """

  def __init__(self, rows: dict, batch_size: int, seed: int, shuffle: bool = True, cross_document_loss: bool = True,
               local_rows: tuple[int, int] | None = None):
    tokens = np.ascontiguousarray(rows["tokens"], dtype=np.int32)
    segment_ids = np.ascontiguousarray(rows["segment_ids"], dtype=np.int32)
    if tokens.ndim != 2 or tokens.shape[1] < 2 or segment_ids.shape != tokens.shape:
      raise ValueError(
        f"rows need tokens and segment_ids of one shape [n, seq_len + 1], got {tokens.shape}, {segment_ids.shape}"
      )
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if tokens.shape[0] < batch_size:
      raise ValueError(
        f"corpus yields {tokens.shape[0]} rows of {tokens.shape[1]} tokens, fewer than one batch of {batch_size}: "
        "raise max_bytes or lower batch_size / seq_len"
      )
    if not 0 <= seed < _MAX_SEED:
      raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    start, stop = (0, batch_size) if local_rows is None else local_rows
    if not 0 <= start < stop <= batch_size:
      raise ValueError(f"local_rows {local_rows} is not a non-empty row range of a batch of {batch_size}")
    dataset = grain.MapDataset.range(tokens.shape[0])
    if shuffle:
      dataset = dataset.shuffle(seed=seed)
    # batch before repeat: each epoch is a fresh permutation cut into whole batches, its remainder dropped.
    dataset = dataset.batch(batch_size, drop_remainder=True).repeat()
    assemble = functools.partial(_assemble, tokens, segment_ids, cross_document_loss)
    self._dataset = dataset.map(lambda batch_rows: assemble(batch_rows[start:stop]))
    self.batches_per_epoch = tokens.shape[0] // batch_size
    self._step = 0
    # What a saved position is only valid for: restoring it against other data or settings would not be exact.
    self._identity = {
      "seed": int(seed),
      "shuffle": bool(shuffle),
      "batch_size": int(batch_size),
      "num_rows": int(tokens.shape[0]),
      "row_len": int(tokens.shape[1]),
      "data_crc32": zlib.crc32(tokens),
    }

  @property
  def step(self) -> int:
    """Batches yielded so far."""
    return self._step

  @property
  def epoch(self) -> int:
    return self._step // self.batches_per_epoch

  def __iter__(self) -> BatchIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self._dataset[self._step]
    self._step += 1
    return batch

  def get_state(self) -> dict:
    """JSON-serialisable position plus what it is valid for."""
    return {"step": self._step, **self._identity}

  def set_state(self, state: dict) -> None:
    mismatched = {k: (state.get(k), v) for k, v in self._identity.items() if state.get(k) != v}
    if mismatched:
      detail = ", ".join(f"{k}: saved {saved!r} vs now {now!r}" for k, (saved, now) in mismatched.items())
      raise ValueError(f"data iterator state does not match this data pipeline ({detail})")
    try:
      # operator.index also takes numpy integers, which a checkpoint library may hand back.
      step = operator.index(state.get("step"))
    except TypeError:
      step = -1
    if step < 0:
      raise ValueError(f"data iterator state has a bad step: {state.get('step')!r}")
    self._step = step


def make_batches(
  rows: dict,
  batch_size: int,
  seed: int,
  shuffle: bool = True,
  cross_document_loss: bool = True,
  local_rows: tuple[int, int] | None = None,
) -> BatchIterator:
  """Resumable iterator of {"inputs", "targets", "segment_ids", "loss_mask"} batches over packed rows (this host's
  `local_rows` of each batch when given)."""
  return BatchIterator(rows, batch_size, seed, shuffle, cross_document_loss, local_rows)
