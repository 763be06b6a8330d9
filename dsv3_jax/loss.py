"""The training objective (paper §2.1.2, §2.2): next-token cross-entropy + lambda * MTP + alpha * balance.

All losses are computed in fp32 and are means over the unmasked target tokens of the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv3_jax import model as model_lib


def token_cross_entropy(logits_BSX: jax.Array, targets_BS: jax.Array) -> jax.Array:
  """-log p(target) per position, in fp32."""
  logits = logits_BSX.astype(jnp.float32)
  target_logit = jnp.take_along_axis(logits, targets_BS[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits, axis=-1) - target_logit


def masked_mean(values_BS: jax.Array, mask_BS: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(mean over mask, number of masked-in positions); an empty mask gives 0, not NaN."""
  count = jnp.sum(mask_BS)
  return jnp.sum(values_BS * mask_BS) / jnp.maximum(count, 1.0), count


def mtp_targets(targets_BS: jax.Array, loss_mask_BS: jax.Array, segment_ids_BS: jax.Array | None, depth: int):
  """Targets and mask for MTP depth k: position i predicts targets[i + k] (token i + k + 1).

  Positions whose shifted target falls off the sequence, is masked out, or (with segment ids)
  lies in another document are masked.
  """
  seq = targets_BS.shape[1]
  valid_S = jnp.arange(seq) < seq - depth
  shifted = jnp.roll(targets_BS, -depth, axis=1)
  mask = jnp.roll(loss_mask_BS, -depth, axis=1) * loss_mask_BS * valid_S
  if segment_ids_BS is not None:
    mask = mask * (jnp.roll(segment_ids_BS, -depth, axis=1) == segment_ids_BS)
  return shifted, mask


def objective(out: model_lib.Output, batch: dict[str, jax.Array], mtp_lambda: jax.Array | float,
              balance_alpha: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss and its parts. `batch` has targets, loss_mask and optionally segment_ids [B, S]."""
  mask = batch["loss_mask"].astype(jnp.float32)
  ce, n_tokens = masked_mean(token_cross_entropy(out.logits, batch["targets"]), mask)
  parts = {"ce": ce, "tokens": n_tokens}
  total = ce
  if out.mtp_logits is not None and out.mtp_logits.shape[0]:
    mtp = []
    for k in range(out.mtp_logits.shape[0]):
      targets, mtp_mask = mtp_targets(batch["targets"], mask, batch.get("segment_ids"), k + 1)
      mtp.append(masked_mean(token_cross_entropy(out.mtp_logits[k], targets), mtp_mask)[0])
    parts["mtp"] = jnp.mean(jnp.stack(mtp))
    total = total + mtp_lambda * parts["mtp"]
  # Summed over MoE layers (the MTP modules' MoE layers included), as each layer has its own term.
  parts["balance"] = jnp.sum(out.stats["seq_balance"])
  total = total + balance_alpha * parts["balance"]
  parts["loss"] = total
  return total, parts
