"""Data pipeline: tokenizers, corpus splits, packing, loss masks and exact resume of the batch iterator."""

import json
import pathlib
import sysconfig

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers
from tokenizers import trainers

from dsv3_jax import data


def _rows(n_rows: int, row_len: int = 9) -> dict:
  """Packed rows whose tokens identify their row, so batches can be compared by content."""
  docs = [list(range(1, 6))] * (n_rows * row_len // 6 + 1)
  rows = data.pack(docs, row_len - 1, eos_id=0)
  rows = {k: v[:n_rows] for k, v in rows.items()}
  rows["tokens"] = rows["tokens"] + 100 * np.arange(n_rows, dtype=np.int32)[:, None]
  return rows


def _take(it, k: int) -> list[dict]:
  return [next(it) for _ in range(k)]


def _assert_batches_equal(a: list[dict], b: list[dict]):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for key in x:
      assert x[key].dtype == y[key].dtype
      np.testing.assert_array_equal(x[key], y[key])


# Tokenizers -----------------------------------------------------------------------------------------------------------


def test_byte_tokenizer_round_trip():
  tok = data.ByteTokenizer()
  text = "def f(x):\n  return 'naïve café ∑ 日本語 🙂'\n"
  ids = tok.encode(text)
  assert isinstance(ids, list) and max(ids) < 256 and tok.eos_id not in ids
  assert ids == list(text.encode("utf-8"))
  assert tok.decode(ids) == text
  assert tok.decode(ids + [tok.eos_id, 300] + ids) == text + text
  assert tok.decode([0xFF]) == "\ufffd"
  assert (tok.vocab_size, tok.eos_id, tok.name) == (257, 256, "bytes")


@pytest.fixture
def tokenizer_json(tmp_path):
  tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"], show_progress=False)
  tok.train_from_iterator(["hello world", "hello there", "the world is wide"] * 10, trainer)
  path = tmp_path / "tokenizer.json"
  tok.save(str(path))
  return path


def test_hf_tokenizer(tokenizer_json):
  tok = data.load_tokenizer(str(tokenizer_json))
  assert isinstance(tok, data.HFTokenizer)
  assert tok.eos_id == 1 and tok.vocab_size == tok._tok.get_vocab_size()
  ids = tok.encode("hello world")
  assert ids and tok.eos_id not in ids
  assert tok.decode(ids) == "hello world"
  assert tok.decode(ids + [tok.eos_id]) == "hello world"
  np.testing.assert_array_equal(tok.encode_batch(["hello world"])[0], ids)
  assert data.load_tokenizer(str(tokenizer_json), eos_token="<unk>").eos_id == 0


def test_hf_tokenizer_missing_eos(tokenizer_json):
  # Rename the special token so that none of the default EOS names exist.
  renamed = tokenizer_json.with_name("renamed_tokenizer.json")
  renamed.write_text(tokenizer_json.read_text().replace("<|endoftext|>", "<|sep|>"))
  with pytest.raises(ValueError, match=r"renamed_tokenizer\.json.*'</s>'.*'<\|endoftext\|>'"):
    data.load_tokenizer(str(renamed))
  with pytest.raises(ValueError, match="'<nope>'"):
    data.load_tokenizer(str(tokenizer_json), eos_token="<nope>")


def test_load_tokenizer_defaults_and_missing_file(tmp_path):
  assert isinstance(data.load_tokenizer(None), data.ByteTokenizer)
  assert isinstance(data.load_tokenizer("bytes"), data.ByteTokenizer)
  missing = str(tmp_path / "nope.json")
  with pytest.raises(FileNotFoundError, match="nope.json"):
    data.load_tokenizer(missing)


# Corpus ---------------------------------------------------------------------------------------------------------------


def test_stdlib_source_split_is_disjoint_and_deterministic():
  train = data.documents("stdlib", "train", 0.05, max_bytes=300_000)
  heldout = data.documents("stdlib", "heldout", 0.05, max_bytes=300_000)
  assert train and heldout
  assert 299_990 < sum(len(d.encode()) for d in train) <= 300_000
  # By content, ignoring short boilerplate files that may exist twice; the split by path is tested below.
  assert not {d for d in train if len(d) > 1000} & set(heldout)
  assert data.documents("stdlib", "train", 0.05, max_bytes=300_000) == train
  assert any("def " in d for d in train)


def test_stdlib_file_selection():
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = data._stdlib_files(root)
  assert files == sorted(files) and "os.py" in files
  parts = {p for f in files for p in f.split("/")[:-1]}
  assert not parts & {"site-packages", "test", "tests", "idlelib"}
  held = data._heldout_mask(files, 0.05)
  assert 0 < held.sum() < 0.15 * len(files)


def _write_corpus(root):
  (root / "sub").mkdir(parents=True)
  (root / ".hidden").mkdir()
  for i in range(40):
    (root / f"doc{i:02d}.txt").write_text(f"document number {i} ü\n")
  (root / "sub" / "a.md").write_text("# markdown\n")
  (root / "sub" / "b.jsonl").write_text(json.dumps({"text": "json one"}) + "\n\n" + json.dumps({"text": "json two"}))
  (root / "sub" / "ignored.csv").write_text("x,y\n")
  (root / ".hidden" / "secret.txt").write_text("never read\n")
  (root / "bad.txt").write_bytes(b"\xff\xfe not utf-8")


def test_directory_source(tmp_path):
  _write_corpus(tmp_path)
  train = data.documents(str(tmp_path), "train", 0.2)
  heldout = data.documents(str(tmp_path), "heldout", 0.2)
  everything = data.documents(str(tmp_path), "train", 0.0)
  assert heldout and not set(train) & set(heldout)
  assert sorted(train + heldout) == sorted(everything)
  assert {"json one", "json two", "# markdown\n"} <= set(everything)
  assert len(everything) == 43  # 40 .txt, the .md, two jsonl records; no .csv, hidden or non-UTF-8 file
  with pytest.raises(ValueError, match="heldout"):
    data.documents(str(tmp_path), "heldout", 0.0)


def test_heldout_is_never_empty(tmp_path):
  for i in range(3):
    (tmp_path / f"{i}.txt").write_text(f"text {i}")
  heldout = data.documents(str(tmp_path), "heldout", 0.001)
  train = data.documents(str(tmp_path), "train", 0.001)
  assert len(heldout) == 1 and len(train) == 2


def test_jsonl_file_source_and_bad_line(tmp_path):
  path = tmp_path / "corpus.jsonl"
  path.write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(50)) + "\n")
  train = data.documents(str(path), "train", 0.1)
  heldout = data.documents(str(path), "heldout", 0.1)
  assert sorted(train + heldout) == sorted(f"doc {i}" for i in range(50))
  assert heldout and not set(train) & set(heldout)
  path.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
  with pytest.raises(ValueError, match=r"corpus\.jsonl:2"):
    data.documents(str(path), "train", 0.1)
  path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
  with pytest.raises(ValueError, match=r"corpus\.jsonl:2.*'text'"):
    data.documents(str(path), "train", 0.1)


def test_missing_and_empty_sources(tmp_path):
  with pytest.raises(FileNotFoundError, match="does_not_exist"):
    data.documents(str(tmp_path / "does_not_exist"), "train")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="empty.*no train documents"):
    data.documents(str(tmp_path / "empty"), "train")


def test_max_bytes_cuts_at_a_character_boundary(tmp_path):
  (tmp_path / "a.txt").write_text("é" * 10)
  docs = data.documents(str(tmp_path / "a.txt"), "train", 0.0, max_bytes=5)
  assert docs == ["éé"]


# Packing and batches --------------------------------------------------------------------------------------------------


def test_pack_layout():
  rows = data.pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_len=3, eos_id=0)
  # stream: 1 2 3 E 4 5 E 6 7 8 9 E (12 tokens) -> 3 rows of 4
  np.testing.assert_array_equal(rows["tokens"], [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]])
  np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 1, 1], [1, 1, 1, 2], [1, 1, 1, 1]])
  assert rows["tokens"].dtype == rows["segment_ids"].dtype == np.int32
  rows = data.pack([[1, 2, 3], [4, 5]], seq_len=3, eos_id=0)  # 7 tokens: remainder of 3 dropped
  np.testing.assert_array_equal(rows["tokens"], [[1, 2, 3, 0]])
  with pytest.raises(ValueError, match="fewer than one row"):
    data.pack([[1]], seq_len=8, eos_id=0)


def test_batch_fields_and_loss_mask():
  rows = data.pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_len=3, eos_id=0)
  batch = next(data.make_batches(rows, batch_size=3, seed=0, shuffle=False, cross_document_loss=False))
  np.testing.assert_array_equal(batch["inputs"], rows["tokens"][:, :-1])
  np.testing.assert_array_equal(batch["targets"], rows["tokens"][:, 1:])
  np.testing.assert_array_equal(batch["segment_ids"], rows["segment_ids"][:, :-1])
  # Only row 1's last target (6, a new document's first token after EOS) crosses a document boundary.
  expected = np.ones((3, 3), np.float32)
  expected[1, 2] = 0
  np.testing.assert_array_equal(batch["loss_mask"], expected)
  assert batch["loss_mask"].dtype == np.float32 and batch["inputs"].dtype == np.int32
  full = next(data.make_batches(rows, batch_size=3, seed=0, shuffle=False))
  np.testing.assert_array_equal(full["loss_mask"], np.ones((3, 3), np.float32))


def test_loss_mask_marks_exactly_the_cross_document_targets():
  rng = np.random.default_rng(0)
  docs = [rng.integers(0, 50, size=rng.integers(0, 30)).tolist() for _ in range(200)]
  rows = data.pack(docs, seq_len=31, eos_id=99)
  it = data.make_batches(rows, batch_size=8, seed=0, cross_document_loss=False)
  for batch in _take(it, 10):
    # A target belongs to another document exactly when the input is the EOS that ends the previous one.
    np.testing.assert_array_equal(batch["loss_mask"], (batch["inputs"] != 99).astype(np.float32))


def test_iterator_determinism_and_epochs():
  rows = _rows(10)
  a = _take(data.make_batches(rows, 4, seed=1), 6)
  _assert_batches_equal(a, _take(data.make_batches(rows, 4, seed=1), 6))
  b = _take(data.make_batches(rows, 4, seed=2), 6)
  assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, b, strict=True))
  # 2 batches per epoch (2 rows dropped each epoch), rows distinct within an epoch, epochs reshuffled.
  row_ids = [x["inputs"][:, 0] // 100 for x in a]
  epochs = [np.concatenate(row_ids[i : i + 2]) for i in range(0, 6, 2)]
  assert all(len(set(e.tolist())) == 8 for e in epochs)
  assert not all(np.array_equal(epochs[0], e) for e in epochs[1:])


def test_resume_is_exact_across_epoch_boundary():
  rows = _rows(10)
  it = data.make_batches(rows, 4, seed=3, cross_document_loss=False)
  _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 5)
  fresh = data.make_batches(rows, 4, seed=3, cross_document_loss=False)
  fresh.set_state(state)
  assert fresh.epoch == 1
  _assert_batches_equal(_take(fresh, 5), expected)


def test_resume_refuses_other_data_or_settings():
  state = data.make_batches(_rows(10), 4, seed=3).get_state()
  with pytest.raises(ValueError, match="seed"):
    data.make_batches(_rows(10), 4, seed=4).set_state(state)
  with pytest.raises(ValueError, match="num_rows"):
    data.make_batches(_rows(12), 4, seed=3).set_state(state)


def test_too_small_corpus():
  with pytest.raises(ValueError, match="fewer than one batch"):
    data.make_batches(_rows(3), batch_size=4, seed=0)


def test_load_split_and_unigram_entropy(tmp_path):
  (tmp_path / "a.txt").write_text("abab" * 100)
  rows = data.load_split(str(tmp_path / "a.txt"), "train", data.ByteTokenizer(), 15, heldout_fraction=0.0)
  assert rows["tokens"].shape == (25, 16)
  assert data.unigram_entropy(rows["tokens"], 257) == pytest.approx(np.log(2), abs=0.01)
  assert data.unigram_entropy(np.array([[0, 5, 5, 5, 5]]), 257) == 0.0
