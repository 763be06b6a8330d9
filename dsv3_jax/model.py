"""The DeepSeek-V3 Transformer, read top to bottom:

  tokens -> embed -> n_dense_layers dense Blocks -> n_moe_layers MoE Blocks -> norm -> head -> logits
                                                        '-> n_mtp_layers MTP modules -> head -> MTP logits

- Attention (MLA, both the expanded and the absorbed latent-cache path): `mla.py`.
- The routed + shared experts, the router and its correction bias: `moe.py`.
- A decoder layer and the scanned layer stacks: `block.py`. MTP depths: `mtp.py`.

Parameters: {embed, dense_layers, moe_layers, norm, head, mtp_<k>}; the two stacks carry a leading
layer axis. The `routing` collection holds the MoE correction biases (state, not parameters).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax import block as block_lib
from dsv3_jax import config as config_lib
from dsv3_jax import layers
from dsv3_jax import mla
from dsv3_jax import mtp as mtp_lib
from dsv3_jax import sharding


class Output(NamedTuple):
  logits: jax.Array  # [B, S, vocab] fp32
  mtp_logits: jax.Array | None  # [n_mtp_layers, B, S, vocab] fp32; depth k at i predicts token i+k+1
  stats: dict[str, jax.Array]  # expert_load [n_moe + n_mtp, E], seq_balance [n_moe + n_mtp]
  cache: dict[str, mla.LatentCache] | None  # updated latent cache when one was passed in
  hidden: jax.Array | None = None  # [B, S, D] main-model output after the final norm (feeds MTP)


class Transformer(nn.Module):
  """DeepSeek-V3. `impl` picks the routed experts' GEMM implementation (`moe.EXPERT_IMPLS`), `attention_impl` causal
  attention's (`mla.ATTENTION_IMPLS`), `remat` the rematerialisation, `unroll` whether short layer stacks run
  unrolled (training: faster; `block.UNROLL_MAX_LAYERS`)."""

  cfg: config_lib.ModelConfig
  impl: str = "auto"
  attention_impl: str = "auto"
  remat: str = "none"
  unroll: bool = False

  def setup(self):
    c = self.cfg
    self.embed = layers.Embed(c)
    if c.n_dense_layers:
      self.dense_layers = block_lib.stack(c, moe=False, length=c.n_dense_layers, impl=self.impl,
                                          remat=self.remat, name="dense_layers", unroll=self.unroll,
                                          attention_impl=self.attention_impl)
    if c.n_moe_layers:
      self.moe_layers = block_lib.stack(c, moe=True, length=c.n_moe_layers, impl=self.impl,
                                        remat=self.remat, name="moe_layers", unroll=self.unroll,
                                        attention_impl=self.attention_impl)
    self.norm = layers.RMSNorm(c, c.dim)
    self.head = self.param("head", nn.with_logical_partitioning(nn.initializers.normal(c.init_std),
                                                                ("embed", "vocab")),
                           (c.dim, c.vocab_size), c.weight_dtype)
    self.mtp = [mtp_lib.MTPModule(c, impl=self.impl, attention_impl=self.attention_impl)  # mtp_0, mtp_1, ...
                for _ in range(c.n_mtp_layers)]

  def __call__(self, tokens_BS: jax.Array, positions_BS: jax.Array | None = None,
               token_mask_BS: jax.Array | None = None, *, segment_ids_BS: jax.Array | None = None,
               cache: dict[str, mla.LatentCache] | None = None, prefill: bool = False,
               with_mtp: bool = True) -> Output:
    """Forward pass.

    Without a cache: causal attention over the given tokens (positions default to 0..S-1;
    token_mask hides padding keys; segment_ids, when given, keep packed documents from attending to
    each other). With a cache (see `init_cache`): the new tokens are written at their positions and
    attend over the cache through the absorbed path; MTP is skipped. With a cache and prefill=True:
    the tokens are each sequence's first ones (positions from 0); they attend among themselves
    through the expanded path, as without a cache, and their latents fill the cache.
    """
    batch, seq = tokens_BS.shape
    causal = positions_BS is None  # positions 0..S-1: the mask allows no key after its query
    if causal:
      positions_BS = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    mask_BST = None
    if cache is None or prefill:
      mask_BST = positions_BS[:, None, :] <= positions_BS[:, :, None]
      if token_mask_BS is not None:
        mask_BST = mask_BST & token_mask_BS[:, None, :].astype(bool)
      if segment_ids_BS is not None:
        mask_BST = mask_BST & (segment_ids_BS[:, None, :] == segment_ids_BS[:, :, None])
      if causal:
        mask_BST = mla.CausalMask(mask_BST)
    h_BSD, stats, cache = self._trunk(self.embed(tokens_BS), positions_BS, mask_BST, cache)
    h_BSD = self.norm(h_BSD)
    logits = layers.head_logits(h_BSD, self.head)
    mtp_logits = None
    if with_mtp and cache is None and self.mtp:
      mtp_logits, mtp_stats = self._mtp(tokens_BS, h_BSD, positions_BS, mask_BST)
      stats = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), stats, mtp_stats)
    return Output(logits, mtp_logits, stats, cache, h_BSD)

  def draft(self, next_tokens_BS: jax.Array, hidden_BSD: jax.Array, positions_BS: jax.Array,
            cache: mla.LatentCache, prefill: bool = False) -> tuple[jax.Array, mla.LatentCache]:
    """The first MTP depth over its own latent cache: logits for token i+2 at each position i.

    next_tokens_BS[b, s] is token i+1 and hidden_BSD[b, s] the main model's normed output at
    position i = positions_BS[b, s]. Speculative decoding drafts from these logits. prefill as in
    `__call__`.
    """
    if not self.mtp:
      raise ValueError("this model has no MTP module (n_mtp_layers = 0) to draft with")
    mask_BST = (positions_BS[:, None, :] <= positions_BS[:, :, None]) if prefill else None
    h_BSD, _, cache = self.mtp[0](self.embed(next_tokens_BS), hidden_BSD, positions_BS, mask_BST, cache)
    return layers.head_logits(h_BSD, self.head), cache

  def _trunk(self, x_BSD, positions_BS, mask_BST, cache):
    """The dense stack, then the MoE stack; returns hidden states, MoE statistics and the cache."""
    cache = cache or {}
    new_cache = {k: v for k, v in cache.items() if k.startswith("mtp_")}
    stats = {}
    for name in ("dense_layers", "moe_layers"):
      if not hasattr(self, name):
        continue
      x_BSD, (layer_stats, new_cache[name]) = getattr(self, name)(x_BSD, cache.get(name), positions_BS, mask_BST)
      stats = layer_stats or stats
    if not stats:  # no MoE layer at all
      stats = {"expert_load": jnp.zeros((0, self.cfg.n_routed_experts)), "seq_balance": jnp.zeros((0,))}
    return x_BSD, stats, (new_cache if cache else None)

  def _mtp(self, tokens_BS, h_BSD, positions_BS, mask_BST):
    logits, stats = [], []
    for depth, module in enumerate(self.mtp, start=1):
      emb_BSD = self.embed(mtp_lib.shifted_tokens(tokens_BS, depth))
      h_BSD, layer_stats, _ = module(emb_BSD, h_BSD, positions_BS, mask_BST)
      logits.append(layers.head_logits(h_BSD, self.head))
      stats.append(layer_stats)
    return jnp.stack(logits), jax.tree.map(lambda *xs: jnp.stack(xs), *stats)


def init_cache(cfg: config_lib.ModelConfig, batch: int, length: int, dtype=None,
               with_mtp: bool = False) -> dict[str, mla.LatentCache]:
  """An empty latent cache for every layer: {stack name: {"kv": [L, B, T, C], "pe": [L, B, T, R]}}.

  with_mtp adds {"mtp_0": {"kv": [B, T, C], "pe": [B, T, R]}} for the first MTP depth (drafting);
  `Transformer.__call__` ignores that entry and `Transformer.draft` uses only it.
  """
  cache = {}
  if with_mtp:
    cache["mtp_0"] = mla.init_cache(cfg, batch, length, dtype)
  for name, n in (("dense_layers", cfg.n_dense_layers), ("moe_layers", cfg.n_moe_layers)):
    if n:
      one = mla.init_cache(cfg, batch, length, dtype)
      cache[name] = jax.tree.map(lambda a, n=n: jnp.broadcast_to(a, (n, *a.shape)), one)
  return cache


def init(cfg: config_lib.ModelConfig, rng: jax.Array, **model_kwargs) -> dict:
  """Initial variables {"params", "routing"} (unboxed from their logical-partitioning metadata)."""
  model = Transformer(cfg, **model_kwargs)
  return jax.jit(lambda r: nn.unbox(model.init(r, jnp.zeros((1, 2), jnp.int32))))(rng)


def variable_shardings(cfg: config_lib.ModelConfig, mesh: jax.sharding.Mesh) -> dict:
  """Each variable's sharding on `mesh`, from the model's logical axes and the rules table (nothing allocated)."""
  model = Transformer(cfg)
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))
  return sharding.logical_shardings(boxed, mesh)
