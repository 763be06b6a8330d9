"""Rotary position embedding with YaRN context extension, in DeepSeek's interleaved-pair layout."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import config as config_lib


def inv_frequencies(cfg: config_lib.ModelConfig) -> np.ndarray:
  """YaRN inverse frequencies for the qk_rope_head_dim/2 rotated pairs (numerics §3.1).

  1. theta_i = base^(-2i/d), in fp32 as the reference computes it.
  2. corr(r) = d ln(L0 / (2 pi r)) / (2 ln base) finds the pair index whose wavelength fits r
     rotations in the original context L0; low = floor(corr(beta_fast)), high = ceil(corr(beta_slow)).
  3. Pairs below `low` keep theta_i (extrapolate), pairs above `high` use theta_i / factor
     (interpolate), and a linear ramp blends the ones in between.
  With rope_factor == 1 every pair keeps theta_i: plain RoPE.
  """
  d, base = cfg.qk_rope_head_dim, cfg.rope_theta
  theta = (1.0 / (np.float32(base) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))).astype(np.float32)
  if cfg.rope_factor <= 1.0:
    return theta

  def corr_dim(rotations: float) -> float:
    return d * math.log(cfg.original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low = max(math.floor(corr_dim(cfg.beta_fast)), 0)
  high = min(math.ceil(corr_dim(cfg.beta_slow)), d - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(d // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
  smooth = 1 - ramp
  return (theta / np.float32(cfg.rope_factor) * (1 - smooth) + theta * smooth).astype(np.float32)


def attention_factor(cfg: config_lib.ModelConfig) -> float:
  """YaRN's factor on cos/sin: get_mscale(mscale) / get_mscale(mscale_all_dim) (1.0 for V3)."""
  return (config_lib.yarn_get_mscale(cfg.rope_factor, cfg.mscale)
          / config_lib.yarn_get_mscale(cfg.rope_factor, cfg.mscale_all_dim))


def rotation(cfg: config_lib.ModelConfig, positions_BS: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos and sin of the rotation angles, [B, S, R/2] in fp32."""
  angles = positions_BS.astype(jnp.float32)[..., None] * jnp.asarray(inv_frequencies(cfg))
  factor = attention_factor(cfg)
  return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply(x_BS_R: jax.Array, cos_BS: jax.Array, sin_BS: jax.Array) -> jax.Array:
  """Rotates the interleaved pairs (x[2i], x[2i+1]) of the last axis, in fp32.

  `x` is [B, S, R] or [B, S, H, R]; cos/sin are [B, S, R/2] and broadcast over heads.
  """
  if x_BS_R.ndim == 4:
    cos_BS, sin_BS = cos_BS[:, :, None, :], sin_BS[:, :, None, :]
  x = x_BS_R.astype(jnp.float32).reshape(*x_BS_R.shape[:-1], -1, 2)
  even, odd = x[..., 0], x[..., 1]
  rotated = jnp.stack([even * cos_BS - odd * sin_BS, even * sin_BS + odd * cos_BS], axis=-1)
  return rotated.reshape(x_BS_R.shape).astype(x_BS_R.dtype)
