"""Multi-head Latent Attention (paper §2.1.1): low-rank queries, a compressed KV latent, decoupled RoPE.

Two paths with the same math (numerics §2.6):
- `__call__`, the training/prefill path: expands the latent into per-head keys and values. Under the training
  path's `CausalMask`, attention runs as one native call per pass on the CPU in float32 (`cpu_attention`; the
  `attention_impl` choice), else, past 256 tokens, blockwise in XLA (`flash_attention`): no [S, S] scores.
- `absorbed`, the decode path: caches only kv_norm(c_kv) [B,T,C] and the roped shared key [B,T,R],
  and folds wkv_b into the query and the output, so no per-head key or value is ever formed.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from dsv3_jax import config as config_lib
from dsv3_jax import cpu_attention
from dsv3_jax import flash_attention
from dsv3_jax import layers
from dsv3_jax import native as native_lib
from dsv3_jax import rope
from dsv3_jax import sharding

LatentCache = dict[str, jax.Array]  # {"kv": [B, T, C], "pe": [B, T, R]}

# Blockwise causal attention (`flash_attention`) for sequences longer than the smaller block: 256-row blocks up to
# 512 tokens, 512-row blocks beyond. Measured on a 2-core CPU, training step of the small model: 512 tokens x 8
# ran 888 ms with 256-row blocks against 1076 ms whole; 1024 x 4 953 ms with 512 against 994 ms with 256; 4096 x 1
# 1829 ms with 512 against 1967 ms with 256. At 128 tokens, 64-row blocks gained nothing measurable.
CAUSAL_BLOCKS = (256, 512)

# How causal attention (the training path's) runs: "native" the CPU kernel of `cpu_attention` (float32 only), "xla"
# plain JAX (`flash_attention` or the whole score matrix), "auto" the native kernel when lowering for the CPU with
# float32 operands where it can be built, else XLA. Other masks always take XLA.
ATTENTION_IMPLS = ("auto", "xla", "native")


def causal_block(seq: int) -> int | None:
  """Rows per block of causal attention over `seq` tokens; None: form the whole score matrix."""
  small, large = CAUSAL_BLOCKS
  if seq <= small:
    return None
  return small if seq <= large else large


@flax.struct.dataclass
class CausalMask:
  """An attention mask [B, S, T] known to allow key t for query s only when t <= s (by index, with S == T).

  The training path's: positions 0..S-1, optionally narrowed to documents. Its type tells attention, at trace
  time, that every key after a query block's last query is masked for the whole block, so that part of the
  S x T scores need not be computed at all.
  """

  allowed_BST: jax.Array


def init_cache(cfg: config_lib.ModelConfig, batch: int, length: int, dtype=None) -> LatentCache:
  """An empty latent cache for one layer."""
  dtype = dtype or cfg.compute_dtype
  return {"kv": jnp.zeros((batch, length, cfg.kv_lora_rank), dtype),
          "pe": jnp.zeros((batch, length, cfg.qk_rope_head_dim), dtype)}


class MLA(nn.Module):
  """Multi-head Latent Attention with parameter names from DeepSeek's `inference/model.py`."""

  cfg: config_lib.ModelConfig
  attention_impl: str = "auto"  # one of ATTENTION_IMPLS

  def setup(self):
    c = self.cfg
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl {self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
    if c.q_lora_rank:
      self.wq_a = layers.Linear(c, c.dim, c.q_lora_rank, ("embed", "q_lora"))
      self.q_norm = layers.RMSNorm(c, c.q_lora_rank, "q_lora")
      self.wq_b = layers.Linear(c, c.q_lora_rank, c.n_heads * c.qk_head_dim, ("q_lora", "heads"))
    else:
      self.wq = layers.Linear(c, c.dim, c.n_heads * c.qk_head_dim, ("embed", "heads"))
    self.wkv_a = layers.Linear(c, c.dim, c.kv_lora_rank + c.qk_rope_head_dim, ("embed", "kv_lora"))
    self.kv_norm = layers.RMSNorm(c, c.kv_lora_rank, "kv_lora")
    self.wkv_b = layers.Linear(c, c.kv_lora_rank, c.n_heads * (c.qk_nope_head_dim + c.v_head_dim),
                               ("kv_lora", "heads"))
    self.wo = layers.Linear(c, c.n_heads * c.v_head_dim, c.dim, ("heads", "embed"))

  def _queries(self, x_BSD, cos, sin):
    """q_nope [B,S,H,K] and roped q_pe [B,S,H,R]."""
    c = self.cfg
    q = self.wq_b(self.q_norm(self.wq_a(x_BSD))) if c.q_lora_rank else self.wq(x_BSD)
    q_BSHK = q.reshape(*x_BSD.shape[:2], c.n_heads, c.qk_head_dim)
    q_nope, q_pe = jnp.split(q_BSHK, [c.qk_nope_head_dim], axis=-1)
    return q_nope, rope.apply(q_pe, cos, sin)

  def _latents(self, x_BSD, cos, sin):
    """kv_norm(c_kv) [B,S,C] and the roped shared key k_pe [B,S,R]."""
    kv_latent, k_pe = jnp.split(self.wkv_a(x_BSD), [self.cfg.kv_lora_rank], axis=-1)
    return self.kv_norm(kv_latent), rope.apply(k_pe, cos, sin)

  def _probs(self, scores_BHST, mask_BST, scale: float):
    """Scaled (by `scale`; 1 when the queries carry it), masked softmax in fp32, cast to the activation dtype."""
    scores = scores_BHST.astype(jnp.float32)
    if scale != 1.0:
      scores = scores * scale
    scores = jnp.where(mask_BST[:, None], scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1).astype(self.cfg.compute_dtype)

  def _attend(self, q_BSHK, k_BTHK, v_BTHV, mask_BST, causal: bool):
    """softmax(q k^T, masked) v per head, [B, S, H, V]; the queries carry the softmax scale.

    With a causal mask: the native CPU kernel (`cpu_attention`, per `attention_impl`), each device on its own
    sequences and heads; else, past the smallest block (`causal_block`), `flash_attention.causal_attention`, which
    skips the blocks above the diagonal and never forms the [B, H, S, T] scores. Otherwise the scores are formed
    whole.
    """
    operands = (q_BSHK, k_BTHK, v_BTHV, mask_BST)
    impl = self.attention_impl
    if not causal or impl == "xla" or (impl == "auto" and not cpu_attention.supports(*operands[:3])):
      return self._xla_attend(*operands, causal)
    if impl == "native":
      native_lib.check_float32("attention_impl", q=q_BSHK, k=k_BTHK, v=v_BTHV)
    qkv_axes = ("batch", "length", "heads", "head_dim")
    native = lambda *a: sharding.per_shard(cpu_attention.causal_attention, a, (qkv_axes,) * 3 +
                                           (("batch", "length", None),), qkv_axes)
    if impl == "native":
      return native(*operands)
    return jax.lax.platform_dependent(*operands, cpu=native, default=lambda *a: self._xla_attend(*a, causal))

  def _xla_attend(self, q_BSHK, k_BTHK, v_BTHV, mask_BST, causal: bool):
    block = causal_block(q_BSHK.shape[1]) if causal else None
    if block:
      return flash_attention.causal_attention(q_BSHK, k_BTHK, v_BTHV, mask_BST, block)
    scores = jnp.einsum("bshk,bthk->bhst", q_BSHK, k_BTHK)
    return jnp.einsum("bhst,bthv->bshv", self._probs(scores, mask_BST, 1.0), v_BTHV)

  def __call__(self, x_BSD: jax.Array, positions_BS: jax.Array, mask_BST: jax.Array | CausalMask,
               cache: LatentCache | None = None) -> jax.Array | tuple[jax.Array, LatentCache]:
    """Training/prefill path; mask_BST[b, s, t] says whether query s may attend to key t (a `CausalMask`
    when that is known to hold only for t <= s, which lets long sequences skip the masked blocks).

    With a cache (prefill): the tokens attend among themselves as in training, and their latents
    are also written into the cache at their positions; returns (output, cache).
    """
    c = self.cfg
    causal = isinstance(mask_BST, CausalMask)
    if causal:
      mask_BST = mask_BST.allowed_BST
    cos, sin = rope.rotation(c, positions_BS)
    q_nope_BSHK, q_pe_BSHR = self._queries(x_BSD, cos, sin)
    kv_latent_BTC, k_pe_BTR = self._latents(x_BSD, cos, sin)
    if cache is not None:
      cache = _write_cache(cache, kv_latent_BTC, k_pe_BTR, positions_BS[:, 0])
    kv_BTHK = self.wkv_b(kv_latent_BTC).reshape(*kv_latent_BTC.shape[:2], c.n_heads, -1)
    k_nope_BTHK, v_BTHV = jnp.split(kv_BTHK, [c.qk_nope_head_dim], axis=-1)
    # One score matmul over [nope | rope] per head (the shared roped key broadcast to every head), with the
    # softmax scale folded into the queries: the [B, H, S, T] scores are written once, instead of twice,
    # then added and scaled (the passes over S x T that dominate at long sequences).
    q_BSHK = jnp.concatenate([q_nope_BSHK, q_pe_BSHR], axis=-1) * jnp.asarray(c.softmax_scale, q_pe_BSHR.dtype)
    k_pe_BTHR = jnp.broadcast_to(k_pe_BTR[:, :, None, :], (*k_pe_BTR.shape[:2], c.n_heads, c.qk_rope_head_dim))
    k_BTHK = jnp.concatenate([k_nope_BTHK, k_pe_BTHR.astype(k_nope_BTHK.dtype)], axis=-1)
    out_BSHV = self._attend(q_BSHK, k_BTHK, v_BTHV, mask_BST, causal)
    out_BSD = self.wo(out_BSHV.reshape(*x_BSD.shape[:2], -1))
    return out_BSD if cache is None else (out_BSD, cache)

  def absorbed(self, x_BSD: jax.Array, positions_BS: jax.Array,
               cache: LatentCache) -> tuple[jax.Array, LatentCache]:
    """Decode/prefill over the latent cache (paper §2.1.1, "absorb" in DeepSeek's model.py).

    1. Write kv_norm(c_kv) and rope(k_pe) of the new tokens into the cache at their positions
       (each sequence's new tokens are contiguous, starting at positions_BS[b, 0]).
    2. Absorb W_UK into the query: q_abs[s,h] = q_nope[s,h] @ W_UK[h] (K -> C).
    3. Score against the cache: q_abs . kv[t] + q_pe . pe[t], keys t <= the query's position.
    4. Attend over latents, ctx[s,h] = sum_t P kv[t] (C), then apply W_UV[h] (C -> V) and wo.
    """
    c = self.cfg
    cos, sin = rope.rotation(c, positions_BS)
    q_nope_BSHK, q_pe_BSHR = self._queries(x_BSD, cos, sin)
    kv_latent_BSC, k_pe_BSR = self._latents(x_BSD, cos, sin)
    cache = _write_cache(cache, kv_latent_BSC, k_pe_BSR, positions_BS[:, 0])
    w_kv_CHK = self.wkv_b.weight().reshape(c.kv_lora_rank, c.n_heads, -1)
    w_uk_CHK, w_uv_CHV = jnp.split(w_kv_CHK, [c.qk_nope_head_dim], axis=-1)
    q_abs_BSHC = jnp.einsum("bshk,chk->bshc", q_nope_BSHK, w_uk_CHK)
    kv_BTC, pe_BTR = cache["kv"].astype(c.compute_dtype), cache["pe"].astype(c.compute_dtype)
    scores = (jnp.einsum("bshc,btc->bhst", q_abs_BSHC, kv_BTC)
              + jnp.einsum("bshr,btr->bhst", q_pe_BSHR, pe_BTR))
    key_pos_T = jnp.arange(kv_BTC.shape[1])
    mask_BST = key_pos_T[None, None, :] <= positions_BS[:, :, None]
    ctx_BSHC = jnp.einsum("bhst,btc->bshc", self._probs(scores, mask_BST, c.softmax_scale), kv_BTC)
    out_BSHV = jnp.einsum("bshc,chv->bshv", ctx_BSHC, w_uv_CHV)
    return self.wo(out_BSHV.reshape(*x_BSD.shape[:2], -1)), cache


def _write_cache(cache: LatentCache, kv_BSC, pe_BSR, start_B) -> LatentCache:
  def write(buf_TX, new_SX, start):
    return jax.lax.dynamic_update_slice(buf_TX, new_SX.astype(buf_TX.dtype), (start, 0))

  return {"kv": jax.vmap(write)(cache["kv"], kv_BSC, start_B),
          "pe": jax.vmap(write)(cache["pe"], pe_BSR, start_B)}
