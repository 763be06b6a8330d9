"""Building blocks shared by attention, MoE and MTP: RMSNorm, Linear, the SwiGLU MLP, the embedding.

`Linear` is the seam of the precision policy (cfg.precision, paper §3.3): every projection the paper
runs in FP8 is a `Linear` (MLA's wq_a, wq_b, wkv_a, wkv_b, wo; the dense MLP and the shared experts'
w1, w2, w3), so under the "fp8" recipe they all run `fp8.linear` (Fprop, Dgrad and Wgrad in FP8) and
under "bf16" a matmul in cfg.dtype. `shared_input`, which runs Linears that read the same input as one
matmul (the MLP's w1 and w3), is the only other place their kernels are multiplied; under "fp8" it
runs each Linear on its own, so each kernel keeps its own 128x128 blocks. A Linear built with
`quantized=False` stays in cfg.dtype (MTP's eh_proj, outside the blocks). The embedding, output head,
router, norms and attention math never go through either. The routed experts follow the same recipe
in moe.py.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import config as config_lib
from dsv3_jax import fp8
from dsv3_jax import fp8_weights

Axes = tuple[str | None, ...]


def _normal_init(cfg: config_lib.ModelConfig, axes: Axes):
  return nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), axes)


class RMSNorm(nn.Module):
  """x * rsqrt(mean(x^2) + eps) * weight, statistics in fp32 (HF order: cast, then scale)."""

  cfg: config_lib.ModelConfig
  dim: int
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                        (self.dim,), self.cfg.weight_dtype)
    # Over rows [N, dim]: XLA CPU's reduction fusions run several times slower over [1, S, dim] (one sequence per
    # device) than over the same elements without the unit axis.
    x32 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.rms_norm_eps)
    return (normed.astype(x.dtype) * weight.astype(x.dtype)).reshape(x.shape)


class Linear(nn.Module):
  """y = x @ kernel with kernel [in, out]: in FP8 under the "fp8" recipe when `quantized`, else in cfg.dtype.

  With an FP8-stored kernel in the variables (fp8_weights.STORED) there is no "kernel" parameter: the stored
  e4m3 bytes and block scales serve instead (fp8_weights.py, inference only).
  """

  cfg: config_lib.ModelConfig
  in_features: int
  out_features: int
  axes: Axes = ("embed", "mlp")
  quantized: bool = True  # False keeps this Linear in cfg.dtype whatever the recipe

  def setup(self):
    self.stored = None
    if self.has_variable(fp8_weights.STORED, "kernel"):
      self.stored = fp8_weights.Stored(**self.get_variable(fp8_weights.STORED, "kernel"))
    else:
      self.kernel = self.param("kernel", _normal_init(self.cfg, self.axes),
                               (self.in_features, self.out_features), self.cfg.weight_dtype)

  def weight(self) -> jax.Array:
    """The kernel as the matmul sees it (for paths that fold it into other weights, e.g. absorbed MLA)."""
    if self.stored is not None:
      return self.stored.dequantize(self.cfg.compute_dtype)
    return jnp.asarray(self.kernel, self.cfg.compute_dtype)

  @property
  def in_fp8(self) -> bool:
    return self.quantized and self.cfg.precision == "fp8"

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.cfg.compute_dtype)
    if self.in_fp8 and self.stored is not None:
      return fp8_weights.linear(x, self.stored, self.cfg.fp8_impl)
    if self.in_fp8:  # quantized from the stored (fp32 master) kernel, whose Wgrad stays fp32
      return fp8.linear(x, jnp.asarray(self.kernel), impl=self.cfg.fp8_impl)
    return jnp.einsum("...i,io->...o", x, self.weight())


class MLP(nn.Module):
  """SwiGLU: w2(silu(w1 x) * w3 x). Used for the dense layers and the shared experts."""

  cfg: config_lib.ModelConfig
  hidden: int

  @nn.compact
  def __call__(self, x_WD: jax.Array) -> jax.Array:
    dim = self.cfg.dim
    w1 = Linear(self.cfg, dim, self.hidden, ("embed", "mlp"), name="w1")
    w3 = Linear(self.cfg, dim, self.hidden, ("embed", "mlp"), name="w3")
    gate_WF, up_WF = shared_input(x_WD, (w1, w3))
    return Linear(self.cfg, self.hidden, dim, ("mlp", "embed"), name="w2")(nn.silu(gate_WF) * up_WF)


def shared_input(x: jax.Array, linears: tuple[Linear, ...]) -> tuple[jax.Array, ...]:
  """Each Linear applied to the same x, as one matmul over their kernels stacked [in, n, out].

  One GEMM with n times the columns instead of n small ones (measured in docs/BENCHMARKS.md). The new axis
  sits before `out`, so kernels sharded on their output axis keep that sharding: no re-layout under a mesh.
  FP8 Linears run one by one: each kernel is quantized in its own 128x128 blocks, as stored by DeepSeek.
  """
  if any(linear.in_fp8 for linear in linears):
    return tuple(linear(x) for linear in linears)
  kernel_INO = jnp.stack([linear.weight() for linear in linears], axis=1)
  y = jnp.einsum("...i,ino->...no", x.astype(linears[0].cfg.compute_dtype), kernel_INO)
  return tuple(y[..., n, :] for n in range(len(linears)))


class Embed(nn.Module):
  """Token embedding table [vocab, dim]; also the MTP modules' embedding (shared, not copied)."""

  cfg: config_lib.ModelConfig

  @nn.compact
  def __call__(self, tokens_BS: jax.Array) -> jax.Array:
    table = self.param("embedding", _normal_init(self.cfg, ("vocab", "embed")),
                       (self.cfg.vocab_size, self.cfg.dim), self.cfg.weight_dtype)
    check_token_ids(tokens_BS, self.cfg.vocab_size)
    return jnp.take(table, tokens_BS, axis=0).astype(self.cfg.compute_dtype)


def check_token_ids(tokens, vocab_size: int, what: str = "token ids") -> None:
  """Refuses ids outside [0, vocab_size) when they are concrete (a jitted gather would clamp them)."""
  if isinstance(tokens, jax.core.Tracer):
    return
  ids = np.asarray(tokens)
  if not np.issubdtype(ids.dtype, np.integer):
    raise TypeError(f"{what} must be integers, got dtype {ids.dtype}")
  bad = np.argwhere((ids < 0) | (ids >= vocab_size))
  if bad.size:
    where = tuple(int(i) for i in bad[0])
    raise ValueError(f"{what}: id {int(ids[where])} at index {where} is outside the vocabulary "
                     f"[0, {vocab_size}) ({len(bad)} offending ids in all)")


def head_logits(x_BSD: jax.Array, kernel_DX: jax.Array) -> jax.Array:
  """Output projection, returned in fp32 for the loss and for parity checks."""
  return jnp.einsum("bsd,dx->bsx", x_BSD, kernel_DX.astype(x_BSD.dtype)).astype(jnp.float32)

