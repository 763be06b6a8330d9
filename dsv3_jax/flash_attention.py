"""Causal attention in blocks with an online softmax (the FlashAttention algorithm), in plain JAX.

    out[b, s, h] = sum_t softmax_t(q[b, s, h] . k[b, t, h], masked) v[b, t, h]

for a mask that never allows a key after its query (t > s). The sequence is cut into blocks of `block` rows.
Query block i visits key blocks 0..i only, the rest being masked for all of its queries, keeping a running
row max m, row sum l and output accumulator:

    m' = max(m, rowmax(s_ij)),  p = exp(s_ij - m'),  l' = l e^(m - m') + rowsum(p),  acc' = acc e^(m - m') + p v_j

and ends with out = acc / l and the log-sum-exp lse = m + log l, the only per-row state kept for the backward.
The backward recomputes p = exp(s_ij - lse) block by block:

    dv_j += p^T do_i,  ds = p (do_i v_j^T - D_i),  dq_i += ds k_j,  dk_j += ds^T q_i,  D_i = rowsum(do_i o_i)

So no [S, T] array is ever formed: every intermediate is a [B, H, block, block] tile, the blocks above the
diagonal are skipped (half the work at long lengths), and the memory it keeps for the backward is O(S), not
O(S^2), besides the [B, S, S] bool mask it was given (built once by the model and shared by every layer).
Scores, softmax and accumulators are fp32; the matmul inputs keep their dtype. Rows whose keys are all masked
(only padding queries have them) average the keys their blocks visited, as the expanded path averages all keys;
their outputs are meaningless in both.

The queries carry the softmax scale. q [B, S, H, K], k [B, S, H, K], v [B, S, H, V], mask [B, S, S] bool.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dsv3_jax import ops

_MASKED = jnp.finfo(jnp.float32).min


def causal_attention(q_BSHK: jax.Array, k_BSHK: jax.Array, v_BSHV: jax.Array, mask_BSS: jax.Array,
                     block: int = 512) -> jax.Array:
  """Attention output [B, S, H, V] in q's dtype; S is padded to whole blocks with masked keys."""
  seq = q_BSHK.shape[1]
  pad = -seq % block
  if pad:
    q_BSHK, k_BSHK, v_BSHV = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (q_BSHK, k_BSHK, v_BSHV))
    mask_BSS = jnp.pad(mask_BSS, ((0, 0), (0, pad), (0, pad)))
  return _attention(q_BSHK, k_BSHK, v_BSHV, mask_BSS, block)[:, :seq]


def _varying_as(tree, *refs):
  """Loop carries typed as varying like the operands inside `shard_map` (a no-op outside it)."""
  return jax.tree.map(lambda z: ops.varying_as(z, *refs), tree)


def _block(a, i, block):
  """Rows i*block .. (i+1)*block of a [B, S, ...]."""
  return jax.lax.dynamic_slice_in_dim(a, i * block, block, 1)


def _scores(q_i, k_j, mask_BSS, i, j, block):
  """Masked fp32 scores [B, H, block, block] of query block i against key block j."""
  allowed = jax.lax.dynamic_slice(mask_BSS, (0, i * block, j * block), (mask_BSS.shape[0], block, block))
  scores = jnp.einsum("bshk,bthk->bhst", q_i, k_j, preferred_element_type=jnp.float32)
  return jnp.where(allowed[:, None], scores, _MASKED)


def _forward(q_BSHK, k_BSHK, v_BSHV, mask_BSS, block):
  """(out [B, S, H, V], lse [n, B, H, block]) with n = S / block query blocks."""
  batch, seq, heads, _ = q_BSHK.shape
  width = v_BSHV.shape[-1]

  def query_block(_, i):
    q_i = _block(q_BSHK, i, block)

    def key_block(j, carry):
      m, total, acc = carry
      scores = _scores(q_i, _block(k_BSHK, j, block), mask_BSS, i, j, block)
      m_new = jnp.maximum(m, scores.max(-1))
      p = jnp.exp(scores - m_new[..., None])
      decay = jnp.exp(m - m_new)
      pv = jnp.einsum("bhst,bthv->bhsv", p.astype(v_BSHV.dtype), _block(v_BSHV, j, block),
                      preferred_element_type=jnp.float32)
      return m_new, total * decay + p.sum(-1), acc * decay[..., None] + pv

    init = (jnp.full((batch, heads, block), _MASKED), jnp.zeros((batch, heads, block)),
            jnp.zeros((batch, heads, block, width)))
    init = _varying_as(init, q_BSHK, k_BSHK, v_BSHV, mask_BSS)
    m, total, acc = jax.lax.fori_loop(0, i + 1, key_block, init)
    return None, ((acc / total[..., None]).astype(q_BSHK.dtype), m + jnp.log(total))

  _, (out_nBHbV, lse) = jax.lax.scan(query_block, None, jnp.arange(seq // block))
  return out_nBHbV.transpose(1, 0, 3, 2, 4).reshape(batch, seq, heads, width), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q_BSHK, k_BSHK, v_BSHV, mask_BSS, block):
  return _forward(q_BSHK, k_BSHK, v_BSHV, mask_BSS, block)[0]


def _attention_fwd(q_BSHK, k_BSHK, v_BSHV, mask_BSS, block):
  out, lse = _forward(q_BSHK, k_BSHK, v_BSHV, mask_BSS, block)
  return out, (q_BSHK, k_BSHK, v_BSHV, mask_BSS, out, lse)


def _attention_bwd(block, residuals, dout_BSHV):
  q_BSHK, k_BSHK, v_BSHV, mask_BSS, out_BSHV, lse = residuals
  batch, seq, heads, _ = q_BSHK.shape
  delta_BHnb = jnp.einsum("bshv,bshv->bhs", dout_BSHV.astype(jnp.float32),
                          out_BSHV.astype(jnp.float32)).reshape(batch, heads, -1, block)

  def query_block(carry, i):
    q_i, dout_i = _block(q_BSHK, i, block), _block(dout_BSHV, i, block)
    lse_i, delta_i = lse[i], jax.lax.dynamic_index_in_dim(delta_BHnb, i, 2, keepdims=False)

    def key_block(j, carry):
      dq_i, dk, dv = carry
      k_j, v_j = _block(k_BSHK, j, block), _block(v_BSHV, j, block)
      p = jnp.exp(_scores(q_i, k_j, mask_BSS, i, j, block) - lse_i[..., None])
      dv_j = jnp.einsum("bhst,bshv->bthv", p.astype(dout_i.dtype), dout_i, preferred_element_type=jnp.float32)
      dp = jnp.einsum("bshv,bthv->bhst", dout_i, v_j, preferred_element_type=jnp.float32)
      ds = p * (dp - delta_i[..., None])
      dq_i = dq_i + jnp.einsum("bhst,bthk->bshk", ds.astype(k_j.dtype), k_j, preferred_element_type=jnp.float32)
      dk_j = jnp.einsum("bhst,bshk->bthk", ds.astype(q_i.dtype), q_i, preferred_element_type=jnp.float32)
      dk = jax.lax.dynamic_update_slice_in_dim(dk, _block(dk, j, block) + dk_j, j * block, 1)
      dv = jax.lax.dynamic_update_slice_in_dim(dv, _block(dv, j, block) + dv_j, j * block, 1)
      return dq_i, dk, dv

    dq_i = _varying_as(jnp.zeros(q_i.shape, jnp.float32), q_i, dout_i, k_BSHK)
    dq_i, dk, dv = jax.lax.fori_loop(0, i + 1, key_block, (dq_i, *carry))
    return (dk, dv), dq_i.astype(q_BSHK.dtype)

  zeros = _varying_as((jnp.zeros(k_BSHK.shape, jnp.float32), jnp.zeros(v_BSHV.shape, jnp.float32)),
                         q_BSHK, k_BSHK, v_BSHV, dout_BSHV, mask_BSS)
  (dk, dv), dq_nBbHK = jax.lax.scan(query_block, zeros, jnp.arange(seq // block))
  dq = dq_nBbHK.transpose(1, 0, 2, 3, 4).reshape(q_BSHK.shape)
  return (ops.summed_to(dq, q_BSHK), ops.summed_to(dk, k_BSHK).astype(k_BSHK.dtype),
          ops.summed_to(dv, v_BSHV).astype(v_BSHV.dtype), None)


_attention.defvjp(_attention_fwd, _attention_bwd)
