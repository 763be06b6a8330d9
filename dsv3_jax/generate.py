"""Generation over the latent cache: batched prefill, then decode, plain or MTP-speculative.

Prompts of different lengths share a batch, right-padded. Prefill runs every prompt from position
0 through the expanded attention path and writes the latents (`kv_norm(c_kv)`, roped `k_pe`) of
all positions into a preallocated cache; decode then feeds one token (plain) or two (speculative)
per sequence per step through the absorbed path, each sequence at its own positions. A key at
position t is visible only to queries at positions >= t, and every step writes its tokens' latents
before it attends, so cache entries past a sequence's end (prefill padding, rejected drafts) are
always overwritten before any query can see them: a decode never reads past the written cache.

Speculative decoding (paper §2.2, §5.4.3) with the first MTP depth, which has its own cache:

  state: n tokens t_0..t_{n-1}; the main cache holds positions < n-1, the MTP cache < n-2;
         d_n, the MTP draft for token n (from MTP position n-2).
  step:  main model on [t_{n-1}, d_n] at positions [n-1, n] -> t_n from position n-1; if the draft
         is accepted (t_n == d_n when greedy; the standard min(1, p/q) test when sampling, with a
         resample from max(p - q, 0) on rejection) t_{n+1} from position n as well.
         MTP on [t_n, t_{n+1}] with the main model's hidden states at positions [n-1, n]; the new
         draft comes from position n (accepted) or n-1 (rejected, the other slot being garbage that
         the next step overwrites).

Every step has the same static shapes, so the whole loop is one `lax.while_loop` (`generate`), or
one jitted step per host iteration when tokens are streamed (`stream`). Greedy speculative output
equals greedy plain output: only drafts the main model would itself have chosen are kept.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from dsv3_jax import config as config_lib
from dsv3_jax import layers
from dsv3_jax import model as model_lib
from dsv3_jax import sharding

_EXTRA_SLOTS = 2  # cache/buffer positions past the longest sequence that a final step may write


class Sampling(NamedTuple):
  """How a token is drawn from logits: greedy when temperature == 0."""

  temperature: float = 0.0
  top_k: int = 0  # 0 keeps every token
  top_p: float = 1.0  # nucleus: the smallest set of most likely tokens with probability >= top_p

  def check(self) -> Sampling:
    if self.temperature < 0:
      raise ValueError(f"temperature = {self.temperature}: must be >= 0")
    if self.top_k < 0:
      raise ValueError(f"top_k = {self.top_k}: must be >= 0")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p = {self.top_p}: must be in (0, 1]")
    return Sampling(float(self.temperature), int(self.top_k), float(self.top_p))


def filtered_logits(logits_BX: jax.Array, sampling: Sampling) -> jax.Array:
  """logits / temperature with everything outside the top-k and the top-p nucleus set to -inf."""
  logits_BX = logits_BX.astype(jnp.float32) / sampling.temperature
  if sampling.top_k and sampling.top_k < logits_BX.shape[-1]:
    kth_B1 = jax.lax.top_k(logits_BX, sampling.top_k)[0][:, -1:]
    logits_BX = jnp.where(logits_BX < kth_B1, -jnp.inf, logits_BX)
  if sampling.top_p < 1.0:
    sorted_BX = -jnp.sort(-logits_BX, axis=-1)
    probs_BX = jax.nn.softmax(sorted_BX, axis=-1)
    before_BX = jnp.cumsum(probs_BX, axis=-1) - probs_BX  # mass strictly ahead of each token
    cutoff_B1 = jnp.min(jnp.where(before_BX < sampling.top_p, sorted_BX, jnp.inf), -1, keepdims=True)
    logits_BX = jnp.where(logits_BX < cutoff_B1, -jnp.inf, logits_BX)
  return logits_BX


def sample_logits(logits_BX: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
  """One token id per row."""
  if sampling.temperature == 0.0:
    return jnp.argmax(logits_BX, -1).astype(jnp.int32)
  return jax.random.categorical(rng, filtered_logits(logits_BX, sampling)).astype(jnp.int32)


def cache_bytes_per_token(cfg: config_lib.ModelConfig, dtype=None, with_mtp: bool = False) -> int:
  """Latent-cache bytes one token occupies: (kv_lora_rank + qk_rope_head_dim) per cached layer."""
  itemsize = np.dtype(dtype or cfg.compute_dtype).itemsize
  layers_cached = cfg.n_layers + (1 if with_mtp else 0)
  return layers_cached * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * itemsize


class State(NamedTuple):
  """Everything a decode step reads and writes; leaves are [B, ...] arrays plus scalar counters."""

  tokens_BT: jax.Array  # int32 prompt + generated tokens at their positions (garbage past length)
  length_B: jax.Array  # int32 valid tokens; the newest (at length-1) is not yet in the main cache
  limit_B: jax.Array  # int32 prompt length + max_new_tokens
  done_B: jax.Array  # bool: a stop token was produced or the limit reached
  cache: dict
  rng: jax.Array
  draft_B: jax.Array | None  # int32 MTP draft for the token at length (speculative only)
  draft_probs_BX: jax.Array | None  # its sampling distribution (speculative, temperature > 0)
  drafted: jax.Array  # int32 drafts verified
  accepted: jax.Array  # int32 drafts accepted
  steps: jax.Array  # int32 decode steps taken


class Generation(NamedTuple):
  tokens: list[list[int]]  # per prompt, the generated tokens (without the stop token)
  steps: int  # decode steps after prefill
  drafted: int  # speculative: drafts verified
  accepted: int  # speculative: drafts accepted

  @property
  def acceptance(self) -> float:
    return self.accepted / self.drafted if self.drafted else float("nan")


def _apply(variables, cfg, *args, **kwargs):
  return model_lib.Transformer(cfg).apply(variables, *args, **kwargs)


def _draft(variables, cfg, next_tokens_BS, hidden_BSD, positions_BS, cache, prefill=False):
  return model_lib.Transformer(cfg).apply(variables, next_tokens_BS, hidden_BSD, positions_BS, cache, prefill,
                                          method=model_lib.Transformer.draft)


def _constrain_cache(cache: dict) -> dict:
  """Shards the cache's batch axis like the activations' when a mesh and its rules are active."""
  def one(a):
    names = ("layers",) * (a.ndim - 3) + ("batch", "length", None)
    return sharding.constrain(a, names)

  return jax.tree.map(one, cache)


def _is_stop(tokens_B: jax.Array, stop_ids: tuple[int, ...]) -> jax.Array:
  if not stop_ids:
    return jnp.zeros(tokens_B.shape, bool)
  return jnp.isin(tokens_B, jnp.asarray(stop_ids, jnp.int32))


def _write_tokens(tokens_BT, values_BS, start_B):
  return jax.vmap(lambda row, v, s: jax.lax.dynamic_update_slice(row, v, (s,)))(tokens_BT, values_BS, start_B)


def _draft_outputs(logits_BX, rng, sampling: Sampling):
  """The draft token and, when sampling, the distribution it was drawn from."""
  if sampling.temperature == 0.0:
    return jnp.argmax(logits_BX, -1).astype(jnp.int32), None
  probs_BX = jax.nn.softmax(filtered_logits(logits_BX, sampling), -1)
  return jax.random.categorical(rng, jnp.log(probs_BX)).astype(jnp.int32), probs_BX


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "stop_ids", "speculative"))
def prefill(variables, prompts_BS, lengths_B, limits_B, cache, rng, *, cfg, sampling, stop_ids,
            speculative) -> State:
  """Runs the padded prompts from position 0, fills the cache and samples each first new token."""
  batch, seq = prompts_BS.shape
  positions_BS = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
  out = _apply(variables, cfg, prompts_BS, positions_BS, cache=cache, prefill=True)
  last_BX = jnp.take_along_axis(out.logits, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
  rng, key, draft_key = jax.random.split(rng, 3)
  first_B = sample_logits(last_BX, key, sampling)
  total = jax.tree.leaves(cache)[0].shape[-2]  # every cache leaf is [..., B, T, X]
  tokens_BT = jnp.zeros((batch, total), jnp.int32).at[:, :seq].set(prompts_BS)
  tokens_BT = _write_tokens(tokens_BT, first_B[:, None], lengths_B)
  draft_B = draft_probs_BX = None
  cache = out.cache
  if speculative:  # MTP at positions 0..S-1: token i+1 (the first new token at L-1) and hidden i
    logits_BSX, cache["mtp_0"] = _draft(variables, cfg, tokens_BT[:, 1:seq + 1], out.hidden, positions_BS,
                                        cache["mtp_0"], prefill=True)
    draft_logits_BX = jnp.take_along_axis(logits_BSX, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    draft_B, draft_probs_BX = _draft_outputs(draft_logits_BX, draft_key, sampling)
  length_B = lengths_B + 1
  zero = jnp.zeros([], jnp.int32)
  return State(tokens_BT, length_B, limits_B, _is_stop(first_B, stop_ids) | (length_B >= limits_B),
               _constrain_cache(cache), rng, draft_B, draft_probs_BX, zero, zero, zero)


def _plain_step(variables, state: State, *, cfg, sampling, stop_ids) -> tuple[State, jax.Array, jax.Array]:
  active_B = ~state.done_B
  position_B = state.length_B - 1
  token_B = jnp.take_along_axis(state.tokens_BT, position_B[:, None], axis=1)
  out = _apply(variables, cfg, token_B, position_B[:, None], cache=state.cache)
  rng, key = jax.random.split(state.rng)
  new_B = sample_logits(out.logits[:, 0], key, sampling)
  tokens_BT = jnp.where(active_B[:, None], _write_tokens(state.tokens_BT, new_B[:, None], state.length_B),
                        state.tokens_BT)
  n_emit_B = active_B.astype(jnp.int32)
  length_B = state.length_B + n_emit_B
  done_B = state.done_B | (active_B & (_is_stop(new_B, stop_ids) | (length_B >= state.limit_B)))
  new_state = state._replace(tokens_BT=tokens_BT, length_B=length_B, done_B=done_B,
                             cache=_constrain_cache(out.cache), rng=rng, steps=state.steps + 1)
  return new_state, new_B[:, None], n_emit_B


def _verify(p_logits_BX, draft_B, draft_probs_BX, rng, sampling: Sampling):
  """(accepted, token at the drafted position): the main model's choice, or the draft if kept."""
  if sampling.temperature == 0.0:
    target_B = jnp.argmax(p_logits_BX, -1).astype(jnp.int32)
    return target_B == draft_B, target_B
  accept_key, resample_key = jax.random.split(rng)
  p_BX = jax.nn.softmax(filtered_logits(p_logits_BX, sampling), -1)
  p_d_B = jnp.take_along_axis(p_BX, draft_B[:, None], 1)[:, 0]
  q_d_B = jnp.take_along_axis(draft_probs_BX, draft_B[:, None], 1)[:, 0]
  accept_B = jax.random.uniform(accept_key, p_d_B.shape) * q_d_B < p_d_B  # u < p/q, without dividing by q
  residual_BX = jnp.maximum(p_BX - draft_probs_BX, 0.0)
  residual_BX = jnp.where(residual_BX.sum(-1, keepdims=True) > 0, residual_BX, p_BX)  # p == q: any is fine
  resampled_B = jax.random.categorical(resample_key, jnp.log(residual_BX)).astype(jnp.int32)
  return accept_B, jnp.where(accept_B, draft_B, resampled_B)


def _speculative_step(variables, state: State, *, cfg, sampling, stop_ids) -> tuple[State, jax.Array, jax.Array]:
  active_B = ~state.done_B
  n_B = state.length_B
  positions_B2 = (n_B - 1)[:, None] + jnp.arange(2)
  last_B = jnp.take_along_axis(state.tokens_BT, (n_B - 1)[:, None], axis=1)[:, 0]
  out = _apply(variables, cfg, jnp.stack([last_B, state.draft_B], 1), positions_B2, cache=state.cache)
  rng, verify_key, bonus_key, draft_key = jax.random.split(state.rng, 4)
  accept_B, token_n_B = _verify(out.logits[:, 0], state.draft_B, state.draft_probs_BX, verify_key, sampling)
  bonus_B = sample_logits(out.logits[:, 1], bonus_key, sampling)
  stop_n_B = _is_stop(token_n_B, stop_ids)
  n_emit_B = jnp.where(accept_B & ~stop_n_B, 2, 1)
  n_emit_B = jnp.minimum(n_emit_B, state.limit_B - n_B) * active_B
  emitted_B2 = jnp.stack([token_n_B, bonus_B], 1)
  tokens_BT = jnp.where(active_B[:, None], _write_tokens(state.tokens_BT, emitted_B2, n_B), state.tokens_BT)
  length_B = n_B + n_emit_B
  stopped_B = stop_n_B | ((n_emit_B == 2) & _is_stop(bonus_B, stop_ids))
  done_B = state.done_B | (active_B & (stopped_B | (length_B >= state.limit_B)))
  cache = out.cache
  draft_logits_B2X, cache["mtp_0"] = _draft(variables, cfg, emitted_B2, out.hidden, positions_B2, cache["mtp_0"])
  slot_B = jnp.where(accept_B, 1, 0)
  draft_logits_BX = jnp.take_along_axis(draft_logits_B2X, slot_B[:, None, None], axis=1)[:, 0]
  draft_B, draft_probs_BX = _draft_outputs(draft_logits_BX, draft_key, sampling)
  new_state = state._replace(
      tokens_BT=tokens_BT, length_B=length_B, done_B=done_B, cache=_constrain_cache(cache), rng=rng,
      draft_B=draft_B, draft_probs_BX=draft_probs_BX, steps=state.steps + 1,
      drafted=state.drafted + active_B.sum(dtype=jnp.int32),
      accepted=state.accepted + (active_B & accept_B).sum(dtype=jnp.int32))
  return new_state, emitted_B2, n_emit_B


def _step_fn(speculative: bool) -> Callable:
  return _speculative_step if speculative else _plain_step


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "stop_ids", "speculative"), donate_argnames=("state",))
def decode_step(variables, state: State, *, cfg, sampling, stop_ids, speculative):
  """One step: (state, emitted tokens [B, 1 or 2], how many of them count per sequence)."""
  return _step_fn(speculative)(variables, state, cfg=cfg, sampling=sampling, stop_ids=stop_ids)


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "stop_ids", "speculative"), donate_argnames=("state",))
def decode_to_end(variables, state: State, *, cfg, sampling, stop_ids, speculative) -> State:
  """Steps until every sequence is done, in one compiled loop."""
  step = functools.partial(_step_fn(speculative), variables, cfg=cfg, sampling=sampling, stop_ids=stop_ids)
  return jax.lax.while_loop(lambda s: ~jnp.all(s.done_B), lambda s: step(s)[0], state)


class Request(NamedTuple):
  """A checked batch of prompts with its empty cache; `kwargs` are the static jit arguments."""

  prompts_BS: np.ndarray  # right-padded
  lengths_B: np.ndarray
  limits_B: np.ndarray
  cache: dict
  kwargs: dict


def prepare(cfg: config_lib.ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
            sampling: Sampling | None = None, stop_ids: Sequence[int] = (), speculative: bool = False,
            cache_dtype=None) -> Request:
  """Checks the request on the host (naming the offending prompt) and allocates the cache."""
  if not prompts:
    raise ValueError("no prompts given")
  for i, p in enumerate(prompts):
    if len(p) == 0:
      raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens = {max_new_tokens}: must be >= 1")
  if speculative and cfg.n_mtp_layers < 1:
    raise ValueError("speculative decoding needs an MTP module; this model has n_mtp_layers = 0")
  sampling = (sampling or Sampling()).check()
  for s in stop_ids:
    if not 0 <= s < cfg.vocab_size:
      raise ValueError(f"stop token id {s} is outside the vocabulary [0, {cfg.vocab_size})")
  lengths = np.array([len(p) for p in prompts], np.int32)
  for i, n in enumerate(lengths):
    if n + max_new_tokens > cfg.max_seq_len:
      raise ValueError(f"prompt {i}: {n} tokens + max_new_tokens {max_new_tokens} = {n + max_new_tokens} exceeds "
                       f"the model's max_seq_len {cfg.max_seq_len}")
  tokens = np.zeros((len(prompts), lengths.max()), np.int32)
  for b, p in enumerate(prompts):
    tokens[b, :len(p)] = p
  layers.check_token_ids(tokens, cfg.vocab_size, "prompt token ids")
  limits = lengths + max_new_tokens
  cache = model_lib.init_cache(cfg, len(prompts), int(limits.max()) + _EXTRA_SLOTS, cache_dtype,
                               with_mtp=speculative)
  kwargs = dict(cfg=cfg, sampling=sampling, stop_ids=tuple(int(s) for s in stop_ids), speculative=bool(speculative))
  return Request(tokens, lengths, limits, cache, kwargs)


def start(variables: dict, request: Request, rng: jax.Array) -> State:
  """Prefill of a prepared request."""
  return prefill(variables, request.prompts_BS, request.lengths_B, request.limits_B, request.cache, rng,
                 **request.kwargs)


def collect(state: State, request: Request) -> Generation:
  """The generated tokens of a finished state, on the host."""
  tokens, lengths = np.asarray(state.tokens_BT), np.asarray(state.length_B)
  out = []
  for b, start in enumerate(request.lengths_B):
    seq = tokens[b, start:lengths[b]].tolist()
    if seq and seq[-1] in request.kwargs["stop_ids"]:
      seq = seq[:-1]
    out.append(seq)
  return Generation(out, int(state.steps), int(state.drafted), int(state.accepted))


def generate(variables: dict, cfg: config_lib.ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             rng: jax.Array, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             eos_id: int | None = None, stop_ids: Sequence[int] = (), speculative: bool = False,
             cache_dtype=None, details: bool = False) -> list[list[int]] | Generation:
  """Continues each prompt by up to max_new_tokens tokens, stopping early at eos_id or any stop id.

  Returns the new tokens per prompt (stop token excluded), or with details=True a `Generation`
  with the step count and, when speculative, the draft acceptance figures.
  """
  stops = tuple(stop_ids) + (() if eos_id is None else (eos_id,))
  request = prepare(cfg, prompts, max_new_tokens, Sampling(temperature, top_k, top_p), stops, speculative,
                    cache_dtype)
  state = start(variables, request, rng)
  state = decode_to_end(variables, state, **request.kwargs)
  result = collect(state, request)
  return result if details else result.tokens


def stream(variables: dict, cfg: config_lib.ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
           rng: jax.Array, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           stop_ids: Sequence[int] = (), speculative: bool = False, cache_dtype=None) -> Iterator[list[list[int]]]:
  """Yields, after prefill and after every decode step, the tokens each prompt gained (stop tokens
  excluded) until every prompt is done. The next step is dispatched before the host reads the
  current one, so device work overlaps the host's."""
  stops = tuple(stop_ids)
  request = prepare(cfg, prompts, max_new_tokens, Sampling(temperature, top_k, top_p), stops, speculative,
                    cache_dtype)
  state = start(variables, request, rng)
  first = np.asarray(jnp.take_along_axis(state.tokens_BT, jnp.asarray(request.lengths_B)[:, None], axis=1))[:, 0]
  length, done = request.lengths_B + 1, np.isin(first, stops) | (request.lengths_B + 1 >= request.limits_B)
  yield [[] if t in stops else [int(t)] for t in first]
  state, *pending = decode_step(variables, state, **request.kwargs)
  while not done.all():
    state, *following = decode_step(variables, state, **request.kwargs)  # runs while this step is read
    emitted, n_emit = (np.asarray(a) for a in pending)
    new = [emitted[b, :n_emit[b]].tolist() for b in range(len(n_emit))]
    length = length + n_emit
    done = done | (length >= request.limits_B) | np.array([any(t in stops for t in seq) for seq in new])
    yield [[t for t in seq if t not in stops] for seq in new]
    pending = following


# ---------------------------------------------------------------------------------------------------
# Checkpoints to generate from.


class CheckpointMismatch(ValueError):
  """A checkpoint whose parameters do not fit the model config; the message names the parameter."""


def find_checkpoint(path: str) -> str:
  """The variables directory to restore: `<path>/variables` (a converted checkpoint), the newest
  `<step>/state` under a training workdir or its `checkpoints` directory, or `<path>/state`."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "variables")):
    return os.path.join(path, "variables")
  if os.path.isdir(os.path.join(path, "state")):
    return os.path.join(path, "state")
  root = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
  steps = sorted(int(d) for d in (os.listdir(root) if os.path.isdir(root) else ())
                 if d.isdigit() and os.path.isdir(os.path.join(root, d, "state")))
  if not steps:
    raise FileNotFoundError(f"no checkpoint at {path}: expected <dir>/variables (convert_hf), a training workdir, "
                            f"its checkpoints/ directory, or one <step>/ directory of it")
  return os.path.join(root, str(steps[-1]), "state")


def restore_variables(path: str, cfg: config_lib.ModelConfig) -> dict:
  """{"params", "routing"} for cfg from a training or converted checkpoint (see `find_checkpoint`).

  Every stored shape is checked against cfg before anything is read; optimizer state in a training
  checkpoint is not read at all.
  """
  directory = find_checkpoint(path)
  checkpointer = ocp.PyTreeCheckpointer()
  stored = _flat(checkpointer.metadata(directory).item_metadata.tree)
  abstract = jax.eval_shape(lambda: model_lib.init(cfg, jax.random.PRNGKey(0)))
  expected = _flat(abstract)
  for key, want in expected.items():
    if key not in stored:
      raise CheckpointMismatch(f"{directory}: parameter {'/'.join(key)} {tuple(want.shape)} that the model config "
                               f"needs is not in the checkpoint; does the config match the checkpoint?")
    if tuple(stored[key].shape) != tuple(want.shape):
      raise CheckpointMismatch(f"{directory}: parameter {'/'.join(key)} has shape {tuple(stored[key].shape)} in "
                               f"the checkpoint but the model config gives {tuple(want.shape)}")
  for key in stored:
    if key[0] in ("params", "routing") and key not in expected:
      raise CheckpointMismatch(f"{directory}: parameter {'/'.join(key)} in the checkpoint has no place in the model "
                               f"config; does the config match the checkpoint?")
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(restore_type=jax.Array, sharding=device), abstract)
  return checkpointer.restore(directory, args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args,
                                                                     partial_restore=True))


def restore_fp8_weights(path: str) -> dict | None:
  """The keep-mode FP8 tree (`<path>/fp8`: e4m3 weights and block scales, fp8_weights.STORED's layout) that
  `experiments.convert_hf --dtype=fp8` writes beside the variables, or None when there is none."""
  directory = os.path.join(os.path.abspath(path), "fp8")
  if not os.path.isdir(directory):
    return None
  checkpointer = ocp.PyTreeCheckpointer()
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                          checkpointer.metadata(directory).item_metadata.tree)
  return jax.tree.map(jnp.asarray, checkpointer.restore(directory, restore_args=as_numpy))


def _flat(tree) -> dict[tuple[str, ...], object]:
  return {tuple(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
