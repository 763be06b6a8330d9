"""Multi-Token Prediction modules (paper §2.2), sharing the main model's embedding and output head.

Depth k predicts token i+k+1 at position i:
  x = eh_proj(concat[enorm(Emb(t_{i+k})), hnorm(h^{k-1}_i)])   (embedding first, as the released
      weights expect; numerics §5.2)
  h^k = norm(Block_k(x)),  logits^k = head(h^k)
h^0 is the main model's output after its final norm; each depth feeds its normed output to the next.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax import block as block_lib
from dsv3_jax import config as config_lib
from dsv3_jax import layers
from dsv3_jax import mla


class MTPModule(nn.Module):
  """One MTP depth: its own projection, norms and decoder layer (an MoE layer, like layer 61)."""

  cfg: config_lib.ModelConfig
  impl: str = "auto"
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, emb_BSD: jax.Array, h_BSD: jax.Array, positions_BS: jax.Array, mask_BST: jax.Array | None,
               cache: mla.LatentCache | None = None) -> tuple[jax.Array, dict[str, jax.Array], mla.LatentCache | None]:
    """Returns (normed output, load statistics, updated cache); with a cache attention is absorbed."""
    c = self.cfg
    e = layers.RMSNorm(c, c.dim, name="enorm")(emb_BSD)
    h = layers.RMSNorm(c, c.dim, name="hnorm")(h_BSD)
    eh_proj = layers.Linear(c, 2 * c.dim, c.dim, ("mlp", "embed"), quantized=False, name="eh_proj")  # BF16 in V3
    x = eh_proj(jnp.concatenate([e, h], -1))
    block = block_lib.Block(c, moe=True, impl=self.impl, attention_impl=self.attention_impl, name="block")
    x, (stats, cache) = block(x, cache, positions_BS, mask_BST)
    return layers.RMSNorm(c, c.dim, name="norm")(x), stats, cache


def shifted_tokens(tokens_BS: jax.Array, depth: int) -> jax.Array:
  """t_{i+depth} at position i; the last `depth` positions get token 0 and carry no loss."""
  return jnp.concatenate([tokens_BS[:, depth:], jnp.zeros_like(tokens_BS[:, :depth])], axis=1)
