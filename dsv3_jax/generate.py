"""Sampling from the latent-cache (absorbed MLA) decode path: prefill once, then one token per step.

Prompts of different lengths share a batch: they are right-padded, every sequence decodes at its
own positions, and the cache entries a padded prefill wrote past a prompt's end are overwritten
before any query can see them (a key at position t is visible only to queries at positions >= t).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import config as config_lib
from dsv3_jax import layers
from dsv3_jax import model as model_lib


def sample_logits(logits_BX: jax.Array, rng: jax.Array, temperature: float, top_k: int) -> jax.Array:
  """Greedy when temperature == 0; else softmax(logits / temperature), optionally over the top-k only."""
  if temperature == 0.0:
    return jnp.argmax(logits_BX, -1).astype(jnp.int32)
  logits_BX = logits_BX / temperature
  if top_k:
    kth = jax.lax.top_k(logits_BX, top_k)[0][:, -1:]
    logits_BX = jnp.where(logits_BX < kth, -jnp.inf, logits_BX)
  return jax.random.categorical(rng, logits_BX).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "temperature", "top_k"))
def _prefill(variables, tokens_BS, lengths_B, cache, rng, *, cfg, temperature, top_k):
  batch, seq = tokens_BS.shape
  positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
  out = model_lib.Transformer(cfg).apply(variables, tokens_BS, positions, cache=cache)
  last_BX = jnp.take_along_axis(out.logits, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
  return sample_logits(last_BX, rng, temperature, top_k), out.cache


@functools.partial(jax.jit, static_argnames=("cfg", "temperature", "top_k"), donate_argnames=("cache",))
def _step(variables, token_B, position_B, cache, rng, *, cfg, temperature, top_k):
  out = model_lib.Transformer(cfg).apply(variables, token_B[:, None], position_B[:, None], cache=cache)
  return sample_logits(out.logits[:, 0], rng, temperature, top_k), out.cache


def generate(variables: dict, cfg: config_lib.ModelConfig, prompts: list[list[int]], max_new_tokens: int,
             rng: jax.Array, temperature: float = 0.0, top_k: int = 0,
             eos_id: int | None = None) -> list[list[int]]:
  """Continues each prompt by up to max_new_tokens tokens (fewer when eos_id is produced)."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  lengths = np.array([len(p) for p in prompts], np.int32)
  tokens = np.zeros((len(prompts), lengths.max()), np.int32)
  for b, p in enumerate(prompts):
    tokens[b, :len(p)] = p
  layers.check_token_ids(tokens, cfg.vocab_size, "prompt token ids")
  if lengths.max() + max_new_tokens > cfg.max_seq_len:
    raise ValueError(f"prompt + max_new_tokens = {lengths.max() + max_new_tokens} exceeds "
                     f"max_seq_len {cfg.max_seq_len}")
  cache = model_lib.init_cache(cfg, len(prompts), int(lengths.max()) + max_new_tokens)
  kw = dict(cfg=cfg, temperature=float(temperature), top_k=int(top_k))
  rng, key = jax.random.split(rng)
  token, cache = _prefill(variables, tokens, lengths, cache, key, **kw)
  out = [token]  # stays on device: no host sync per token
  for t in range(max_new_tokens - 1):
    rng, key = jax.random.split(rng)
    token, cache = _step(variables, token, jnp.asarray(lengths + t), cache, key, **kw)
    out.append(token)
  return [_until_eos(seq, eos_id) for seq in np.asarray(jnp.stack(out, 1)).tolist()]


def _until_eos(seq: list[int], eos_id: int | None) -> list[int]:
  return seq[:seq.index(eos_id)] if eos_id is not None and eos_id in seq else seq
