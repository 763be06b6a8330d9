"""Generation: cached decode equals the full forward (ours and the PyTorch reference's), ragged
batches, speculative decoding equals plain decoding, sampling filters, and bad requests.

Tolerances are fixed (STYLE rule 11): 1e-5 on fp32 logits.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import torch

from dsv3_jax import config
from dsv3_jax import generate
from dsv3_jax import loss as loss_lib
from dsv3_jax import model as model_lib
from dsv3_jax import sharding
from dsv3_jax import torch_parity

LOGITS_TOL = 1e-5


@functools.cache
def _tiny():
  cfg = config.tiny()
  return cfg, model_lib.init(cfg, jax.random.PRNGKey(0))


@functools.partial(jax.jit, static_argnames=("cfg", "prefill"))
def _apply(variables, cfg, tokens_BS, positions_BS=None, *, cache=None, prefill=False):
  return model_lib.Transformer(cfg).apply(variables, tokens_BS, positions_BS, cache=cache, prefill=prefill)


def _cached_logits(variables, cfg, sequences, prompt_lengths, chunk=1):
  """Logits of every position of each sequence: prefill of the (right-padded) prompts, then the
  remaining tokens `chunk` at a time, each sequence at its own positions. Returns a list of [N_b, X]."""
  batch, total = len(sequences), max(len(s) for s in sequences)
  lengths = np.array(prompt_lengths)
  prompts = np.zeros((batch, lengths.max()), np.int32)
  for b, s in enumerate(sequences):
    prompts[b, :lengths[b]] = s[:lengths[b]]
  cache = model_lib.init_cache(cfg, batch, total + chunk + 1)
  out = _apply(variables, cfg, prompts, cache=cache, prefill=True)
  cache = out.cache
  logits = [list(np.asarray(out.logits[b, :lengths[b]])) for b in range(batch)]
  position = lengths.copy()
  padded = np.zeros((batch, total + chunk), np.int32)
  for b, s in enumerate(sequences):
    padded[b, :len(s)] = s
  while any(position[b] < len(s) for b, s in enumerate(sequences)):
    idx = position[:, None] + np.arange(chunk)
    out = _apply(variables, cfg, np.take_along_axis(padded, idx, 1), idx, cache=cache)
    cache = out.cache
    for b, s in enumerate(sequences):
      n = min(chunk, len(s) - position[b])
      logits[b].extend(np.asarray(out.logits[b, :max(n, 0)]))
    position = np.minimum(position + chunk, [len(s) for s in sequences])
  return [np.stack(x) for x in logits]


@pytest.mark.parametrize("chunk", [1, 2])
def test_ragged_prefill_then_decode_equals_full_forward(chunk):
  cfg, variables = _tiny()
  rng = np.random.default_rng(0)
  sequences = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (11, 7, 14)]
  cached = _cached_logits(variables, cfg, sequences, [3, 6, 1], chunk=chunk)
  for s, got in zip(sequences, cached, strict=True):
    want = np.asarray(_apply(variables, cfg, np.array([s])).logits[0])
    np.testing.assert_allclose(got, want, atol=LOGITS_TOL, rtol=0)


def test_cached_decode_equals_the_pytorch_reference():
  cfg = config.tiny(n_mtp_layers=0)
  hf = torch_parity.tiny_hf_model(cfg)
  variables = torch_parity.variables_from_hf(hf, cfg)
  tokens = np.array([[1, 5, 9, 17, 33, 65, 100, 127, 4, 8], [3, 3, 7, 60, 2, 90, 11, 42, 0, 77]])
  ref = torch_parity.hf_forward(hf, tokens)[0]
  cached = _cached_logits(variables, cfg, tokens.tolist(), [4, 2])
  np.testing.assert_allclose(np.stack(cached), ref, atol=LOGITS_TOL, rtol=0)
  with torch.no_grad():
    hf_greedy = hf.generate(torch.as_tensor(tokens[:, :4]), max_new_tokens=8, do_sample=False,
                            attention_mask=torch.ones(2, 4, dtype=torch.long)).numpy()[:, 4:]
  ours = generate.generate(variables, cfg, tokens[:, :4].tolist(), 8, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(np.array(ours), hf_greedy)


def test_decode_never_reads_past_the_written_cache():
  """Entries past each sequence's last written position (prefill padding, never-written slots) are
  overwritten with large garbage: the next decode step's logits do not change at all."""
  cfg, variables = _tiny()
  prompts = np.array([[5, 9, 2, 0, 0], [7, 1, 3, 8, 6]], np.int32)
  lengths = np.array([3, 5])
  cache = _apply(variables, cfg, prompts, cache=model_lib.init_cache(cfg, 2, 12), prefill=True).cache
  positions = lengths[:, None]
  step = lambda c: np.asarray(_apply(variables, cfg, np.array([[11], [12]]), positions, cache=c).logits)
  visible_BT = np.arange(12)[None, :] < lengths[:, None]
  poison = lambda a: jnp.where(visible_BT[..., None], a, 1e4 * jax.random.normal(jax.random.PRNGKey(1), a.shape))
  np.testing.assert_array_equal(step(cache), step(jax.tree.map(poison, cache)))


def test_greedy_generation_stops_and_limits():
  cfg, variables = _tiny()
  prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10]]
  full = generate.generate(variables, cfg, prompts, 10, jax.random.PRNGKey(0))
  assert [len(t) for t in full] == [10, 10, 10]
  stop = full[0][4]
  first = full[0].index(stop)
  stopped = generate.generate(variables, cfg, prompts, 10, jax.random.PRNGKey(0), stop_ids=[stop])
  assert stopped[0] == full[0][:first]
  for want, got in zip(full[1:], stopped[1:], strict=True):  # the others stop at `stop` too, if they make it
    assert got == (want[:want.index(stop)] if stop in want else want)
  # A prompt gets the same tokens alone as in a batch padded to 6: no attention to padding.
  assert generate.generate(variables, cfg, [prompts[1]], 10, jax.random.PRNGKey(0))[0] == full[1]


def test_stream_yields_what_generate_returns():
  cfg, variables = _tiny()
  prompts = [[1, 2, 3], [4], [5, 6, 7, 8]]
  for speculative in (False, True):
    want = generate.generate(variables, cfg, prompts, 9, jax.random.PRNGKey(3), temperature=0.7,
                             speculative=speculative)
    chunks = list(generate.stream(variables, cfg, prompts, 9, jax.random.PRNGKey(3), temperature=0.7,
                                  speculative=speculative))
    assert [sum((c[b] for c in chunks), []) for b in range(3)] == want


def _markov_batches(vocab: int, batch: int, seq: int, seed: int):
  """Sequences of a fixed random Markov chain with two successors per token (probabilities 0.7 and
  0.3): learnable, but not so predictable that every draft is right."""
  rng = np.random.default_rng(seed)
  succ = rng.integers(0, vocab, (vocab, 2))
  while True:
    tokens = np.zeros((batch, seq + 1), np.int32)
    tokens[:, 0] = rng.integers(0, vocab, batch)
    for i in range(seq):
      tokens[:, i + 1] = succ[tokens[:, i], (rng.random(batch) < 0.3).astype(int)]
    yield {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((batch, seq), np.float32)}


@functools.cache
def _trained_tiny():
  cfg = config.tiny(vocab_size=32)
  variables = model_lib.init(cfg, jax.random.PRNGKey(0))
  tx = optax.adam(1e-2)
  opt = tx.init(variables["params"])

  @jax.jit
  def step(params, opt, batch):
    def loss_fn(p):
      out = model_lib.Transformer(cfg).apply({"params": p, "routing": variables["routing"]}, batch["inputs"])
      return loss_lib.objective(out, batch, 1.0, 0.0)[0]

    grads = jax.grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt)
    return optax.apply_updates(params, updates), opt

  params, batches = variables["params"], _markov_batches(32, 16, 32, 0)
  for _ in range(150):
    params, opt = step(params, opt, next(batches))
  return cfg, {"params": params, "routing": variables["routing"]}


def test_speculative_greedy_equals_plain_greedy_on_a_trained_model():
  cfg, variables = _trained_tiny()
  prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11], [12, 13], [30, 31, 0, 1]]
  plain = generate.generate(variables, cfg, prompts, 40, jax.random.PRNGKey(0), details=True)
  spec = generate.generate(variables, cfg, prompts, 40, jax.random.PRNGKey(0), speculative=True, details=True)
  assert spec.tokens == plain.tokens and spec.accepted > 0
  # An untrained drafter (the MTP module at its initial weights) is mostly wrong: its rejected drafts change nothing.
  untrained = {**variables, "params": {**variables["params"],
                                       "mtp_0": model_lib.init(cfg, jax.random.PRNGKey(1))["params"]["mtp_0"]}}
  wrong = generate.generate(untrained, cfg, prompts, 40, jax.random.PRNGKey(0), speculative=True, details=True)
  assert wrong.tokens == plain.tokens and wrong.accepted < wrong.drafted
  alone = generate.generate(variables, cfg, prompts[:1], 40, jax.random.PRNGKey(0), speculative=True, details=True)
  assert alone.tokens == plain.tokens[:1] and alone.accepted > 0
  assert alone.steps + alone.accepted in (39, 40)  # every accepted draft saves a step (the last may be cut)
  stop = plain.tokens[0][6]
  plain = generate.generate(variables, cfg, prompts, 40, jax.random.PRNGKey(0), stop_ids=[stop])
  assert generate.generate(variables, cfg, prompts, 40, jax.random.PRNGKey(0), stop_ids=[stop],
                           speculative=True) == plain


def test_speculative_sampling_keeps_the_model_distribution():
  """One prompt repeated 3000 times: the joint distribution of the first three sampled tokens is
  the same with and without speculation (total-variation distance within sampling noise)."""
  cfg, variables = _trained_tiny()
  prompts = [[3, 7]] * 3000

  def joint(speculative, seed):
    out = np.array(generate.generate(variables, cfg, prompts, 3, jax.random.PRNGKey(seed), temperature=1.0,
                                     speculative=speculative))
    codes = out[:, 1] * cfg.vocab_size + out[:, 2]  # tokens 2 and 3: the ones speculation decides
    return np.bincount(codes, minlength=cfg.vocab_size ** 2) / len(codes)

  noise = 0.5 * np.abs(joint(False, 1) - joint(False, 2)).sum()
  tv = 0.5 * np.abs(joint(False, 1) - joint(True, 3)).sum()
  assert tv < max(2 * noise, 0.05), (tv, noise)


def test_sampling_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keep = lambda s: np.isfinite(np.asarray(generate.filtered_logits(logits, s)))[0].tolist()
  assert keep(generate.Sampling(1.0, 2, 1.0)) == [True, True, False, False]
  assert keep(generate.Sampling(1.0, 0, 0.5)) == [True, False, False, False]
  assert keep(generate.Sampling(1.0, 0, 0.79)) == [True, True, False, False]
  assert keep(generate.Sampling(1.0, 0, 0.81)) == [True, True, True, False]
  draws = generate.sample_logits(jnp.tile(logits, (4000, 1)), jax.random.PRNGKey(0), generate.Sampling(1.0, 0, 0.81))
  freq = np.bincount(np.asarray(draws), minlength=4) / 4000
  np.testing.assert_allclose(freq, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0], atol=0.03)


def test_cache_bytes_per_token():
  assert generate.cache_bytes_per_token(config.deepseek_v3_671b(), jnp.bfloat16) == 70_272
  cfg = config.small()
  cache = model_lib.init_cache(cfg, batch=2, length=10)
  measured = sum(a.nbytes for a in jax.tree.leaves(cache)) / 20
  assert measured == generate.cache_bytes_per_token(cfg) == 4 * 80 * 4


@pytest.mark.parametrize("prompts, kwargs, message", [
    ([[1, 2], []], {}, "prompt 1 is empty"),
    ([], {}, "no prompts"),
    ([[1, 128]], {}, "prompt token ids"),
    ([[1, -3]], {}, "prompt token ids"),
    ([[1] * 10], {"max_new_tokens": 163_835}, "prompt 0: 10 tokens"),
    ([[1]], {"stop_ids": [500]}, "stop token id 500"),
    ([[1]], {"top_p": 0.0}, "top_p"),
    ([[1]], {"temperature": -1.0}, "temperature"),
    ([[1]], {"max_new_tokens": 0}, "max_new_tokens"),
])
def test_bad_requests_fail_clearly(prompts, kwargs, message):
  cfg, variables = _tiny()
  kwargs = {"max_new_tokens": 4, **kwargs}
  with pytest.raises(ValueError, match=message):
    generate.generate(variables, cfg, prompts, rng=jax.random.PRNGKey(0), **kwargs)


def test_speculative_needs_an_mtp_module():
  cfg = config.tiny(n_mtp_layers=0)
  variables = model_lib.init(cfg, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="n_mtp_layers = 0"):
    generate.generate(variables, cfg, [[1]], 4, jax.random.PRNGKey(0), speculative=True)


@pytest.mark.parametrize("sizes", [{"data": 8}, {"data": 2, "expert": 4}, {"fsdp": 4, "expert": 2}])
def test_generation_on_a_mesh_shards_the_cache_and_matches_one_device(sizes):
  cfg, variables = _tiny()
  prompts = [[i + 1] * (i % 3 + 1) for i in range(8)]
  want = generate.generate(variables, cfg, prompts, 6, jax.random.PRNGKey(0), speculative=True)
  shape = [sizes.get(a, 1) for a in sharding.MESH_AXES]
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(shape), sharding.MESH_AXES)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    state = generate.start(variables, generate.prepare(cfg, prompts, 6, speculative=True), jax.random.PRNGKey(0))
    got = generate.generate(variables, cfg, prompts, 6, jax.random.PRNGKey(0), speculative=True)
  batch_axes = tuple(a for a in ("data", "fsdp", "expert") if a in sizes)
  for leaf in jax.tree.leaves(state.cache):
    spec = leaf.sharding.spec
    assert tuple(spec[leaf.ndim - 3] if isinstance(spec[leaf.ndim - 3], tuple) else (spec[leaf.ndim - 3],)) == \
        batch_axes, spec
  assert got == want


def test_restore_checks_the_checkpoint_against_the_config(tmp_path):
  cfg, variables = _tiny()
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "ckpt" / "variables", variables)
  restored = generate.restore_variables(str(tmp_path / "ckpt"), cfg)
  jax.tree.map(np.testing.assert_array_equal, restored, variables)
  with pytest.raises(generate.CheckpointMismatch, match=r"params/embed/embedding has shape \(128, 64\)"):
    generate.restore_variables(str(tmp_path / "ckpt"), config.tiny(vocab_size=130))
  with pytest.raises(generate.CheckpointMismatch, match="params/mtp_0/.* has no place in the model config"):
    generate.restore_variables(str(tmp_path / "ckpt"), config.tiny(n_mtp_layers=0))
  with pytest.raises(generate.CheckpointMismatch, match="params/mtp_1/.* is not in the checkpoint"):
    generate.restore_variables(str(tmp_path / "ckpt"), config.tiny(n_mtp_layers=2))
  with pytest.raises(FileNotFoundError, match="no checkpoint at"):
    generate.restore_variables(str(tmp_path), cfg)
