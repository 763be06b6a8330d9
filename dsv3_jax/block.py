"""The decoder layer, and the scanned stacks of them that the Transformer is made of.

A layer's parameters are one slice of its stack, so `Block(cfg, moe).apply(slice, ...)` runs any
single layer on its own (pipeline stages slice the dense and MoE stacks this way).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from dsv3_jax import config as config_lib
from dsv3_jax import fp8_weights
from dsv3_jax import layers
from dsv3_jax import mla
from dsv3_jax import moe as moe_lib
from dsv3_jax import sharding

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nn.Module):
  """Pre-norm decoder layer: x + MLA(attn_norm(x)), then + FFN(ffn_norm(x)), FFN dense or MoE."""

  cfg: config_lib.ModelConfig
  moe: bool
  impl: str = "auto"
  attention_impl: str = "auto"  # mla.ATTENTION_IMPLS

  @nn.compact
  def __call__(self, x_BSD: jax.Array, cache: mla.LatentCache | None, positions_BS: jax.Array,
               mask_BST: jax.Array | None):
    """Returns (x, (load statistics, updated cache)).

    Attention: no cache, the expanded path under mask_BST; a cache and a mask (prefill), the
    expanded path that also writes the latents; a cache without a mask (decode), the absorbed path.
    """
    c = self.cfg
    attn = mla.MLA(c, attention_impl=self.attention_impl, name="attn")
    h_BSD = layers.RMSNorm(c, c.dim, name="attn_norm")(x_BSD)
    if cache is None:
      x_BSD = x_BSD + attn(h_BSD, positions_BS, mask_BST)
    else:
      if mask_BST is None:
        out_BSD, cache = attn.absorbed(h_BSD, positions_BS, cache)
      else:
        out_BSD, cache = attn(h_BSD, positions_BS, mask_BST, cache)
      x_BSD = x_BSD + out_BSD
    h_BSD = layers.RMSNorm(c, c.dim, name="ffn_norm")(x_BSD)
    if self.moe:
      ffn_BSD, stats = moe_lib.MoE(c, impl=self.impl, name="ffn")(h_BSD)
    else:
      ffn_BSD, stats = layers.MLP(c, c.inter_dim, name="ffn")(h_BSD), {}
    x_BSD = sharding.constrain(x_BSD + ffn_BSD, ("batch", "length", "embed"))
    self.sow("intermediates", "hidden", x_BSD)
    return x_BSD, (stats, cache)


# With unroll=True, stacks of at most this many layers are unrolled inside their scan (the parameters keep their
# stacked layout). The training step of the small model (one dense + three MoE layers, 16 x 128 tokens, 2-core
# CPU) went from 417-425 ms to 395-400 ms, compile time unchanged; deeper stacks stay rolled, so compile time does
# not grow with depth. Not for decoding: with a latent cache, the unrolled prefill of 64 tokens ran at about half
# the speed of the rolled one (its per-layer cache slices and restacking are copies).
UNROLL_MAX_LAYERS = 8


def stack(cfg: config_lib.ModelConfig, *, moe: bool, length: int, impl: str, remat: str, name: str,
          unroll: bool = False, attention_impl: str = "auto"):
  """`length` Blocks scanned over a leading layer axis of every parameter and variable; with `unroll`, a stack of
  at most UNROLL_MAX_LAYERS layers runs unrolled."""
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat policy {remat!r} is not one of {sorted(REMAT_POLICIES)}")
  layer = Block
  if remat != "none":
    layer = nn.remat(Block, policy=REMAT_POLICIES[remat], prevent_cse=False)
  scanned = nn.scan(
      layer,
      variable_axes={"params": 0, moe_lib.ROUTING: 0, "intermediates": 0, fp8_weights.STORED: 0},
      split_rngs={"params": True},
      in_axes=(0, nn.broadcast, nn.broadcast),
      length=length,
      unroll=True if unroll and length <= UNROLL_MAX_LAYERS else 1,
      metadata_params={nn.PARTITION_NAME: "layers"},
  )
  return scanned(cfg, moe=moe, impl=impl, attention_impl=attention_impl, name=name)
