"""Weights kept in FP8 for inference: e4m3 bytes with 128x128 block scales, as DeepSeek-V3 ships them.

Variables may hold, beside "params" and "routing", a collection `STORED` that mirrors the params of the
kernels DeepSeek stores in FP8 (the blocks' Linears and the routed experts; not the router, MTP's eh_proj,
the head, the embedding or the norms), each as {"weight": e4m3 [..., in, out], "scale_inv": fp32
[..., ceil(in/128), ceil(out/128)]}: the layout of `hf_checkpoint.load(..., dtype="fp8")`'s second result.
Those kernels are then absent from "params", so the model holds one byte per weight (plus 4 bytes per
16,384 weights of scales) instead of two (bf16) or four (fp32). A Linear or the routed experts use a
stored weight in place of their parameter:

1. Under the "fp8" recipe, through the FP8 GEMM (`ops.fp8_gemm`, `ops.grouped_fp8_gemm`: the XLA
   definition or the Pallas kernels): the activations are quantized in 1x128 tiles on the fly and the
   stored bytes and scales are used as they are. Forward only: stored weights are for inference.
2. Under the "bf16" recipe, and where a path folds a weight into another (absorbed MLA's wkv_b),
   dequantized per 128x128 block to cfg.dtype (DeepSeek's `weight_dequant`).
3. The routed experts' decode path (no more routed slots than experts) gathers each slot's expert bytes
   and scales and dequantizes only those, so the experts' weights are read in FP8.

`store` makes such variables from ordinary ones by block-quantizing each FP8 kernel: the bytes the "fp8"
recipe computes from the same master weights on the fly, so a stored forward equals the recipe's forward.
`from_hf` takes a keep-mode HF load. Expert parallelism over FP8-stored experts is not supported (refused).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import traverse_util

from dsv3_jax import fp8
from dsv3_jax import ops

STORED = "fp8_weights"  # the variable collection of FP8-stored kernels
_EXPERT_WEIGHTS = ("w1", "w2", "w3")
_HIGH_PRECISION_LINEARS = ("gate", "eh_proj")  # "kernel" params that DeepSeek keeps in BF16


class Stored(NamedTuple):
  """One FP8-stored kernel: e4m3 [..., in, out] and its fp32 block scales [..., ceil(in/128), ceil(out/128)]."""

  weight: jax.Array
  scale_inv: jax.Array

  @property
  def shape(self) -> tuple[int, ...]:
    return self.weight.shape

  def dequantize(self, dtype) -> jax.Array:
    return fp8.dequantize_blocks(self.weight, self.scale_inv, dtype)

  def take(self, index: jax.Array) -> Stored:
    """The kernels at `index` of the leading (expert) axis."""
    return Stored(self.weight[index], self.scale_inv[index])


def is_fp8_kernel(path: tuple[str, ...]) -> bool:
  """Whether a params path names a kernel that DeepSeek stores in FP8."""
  name, parent = path[-1], (path[-2] if len(path) > 1 else "")
  if name == "kernel":
    return parent not in _HIGH_PRECISION_LINEARS
  return name in _EXPERT_WEIGHTS and parent == "experts"


def _split(params: dict, chosen) -> tuple[dict, dict]:
  """(params without the leaves whose path `chosen(path)` picks, {path: leaf} of those)."""
  flat = traverse_util.flatten_dict(params)
  kept = {path: leaf for path, leaf in flat.items() if not chosen(path)}
  return traverse_util.unflatten_dict(kept), {path: leaf for path, leaf in flat.items() if chosen(path)}


def store(variables: dict, *, ue8m0: bool = False) -> dict:
  """Variables with every FP8 kernel block-quantized into the `STORED` collection and dropped from params."""
  params, picked = _split(variables["params"], is_fp8_kernel)
  quantize = jax.jit(fp8.quantize_blocks, static_argnames="ue8m0")
  stored = {path: dict(zip(("weight", "scale_inv"), quantize(w, ue8m0=ue8m0), strict=True))
            for path, w in picked.items()}
  return {**variables, "params": params, STORED: traverse_util.unflatten_dict(stored)}


def from_hf(variables: dict, fp8_tree: dict) -> dict:
  """Variables from `hf_checkpoint.load(..., dtype="fp8")`'s pair: the kernels in `fp8_tree` leave params."""
  stored = {path[:-1] for path in traverse_util.flatten_dict(fp8_tree)}  # drop "weight" / "scale_inv"
  params, _ = _split(variables["params"], lambda path: path in stored)
  return {**variables, "params": params, STORED: fp8_tree}


def nbytes(variables: dict) -> int:
  """Bytes of all the variables' arrays."""
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(variables))


def linear(x: jax.Array, stored: Stored, impl: str) -> jax.Array:
  """x [..., in] @ the stored kernel in FP8 (x quantized 1x128, the stored blocks as they are); x's dtype out."""
  x_q, x_scale = fp8.quantize_rows(x.reshape(-1, x.shape[-1]))
  y = ops.fp8_gemm(x_q, x_scale, stored.weight.T, stored.scale_inv.T, out_dtype=x.dtype, impl=impl)
  return y.reshape(*x.shape[:-1], y.shape[-1])


def grouped_linear(x_GMD: jax.Array, stored: Stored, tile_expert_G: jax.Array, n_tiles: jax.Array,
                   impl: str) -> jax.Array:
  """The routed experts' GEMM over expert-contiguous tiles (moe.TileLayout) with FP8-stored [E, D, F] kernels."""
  x_q, x_scale = fp8.quantize_rows(x_GMD)
  return ops.grouped_fp8_gemm(x_q, x_scale, jnp.swapaxes(stored.weight, 1, 2), jnp.swapaxes(stored.scale_inv, 1, 2),
                              tile_expert_G, n_tiles, out_dtype=x_GMD.dtype, impl=impl)
