"""Causal attention on the CPU as one native call per pass: the FlashAttention algorithm over BLAS sgemm.

`flash_attention.causal_attention` in XLA runs every [block, block] score tile of every head as separate ops in
a loop, on one core whatever the thread pool holds, its scores and exponentials bound by memory traffic
(docs/BENCHMARKS.md). `csrc/causal_attention.cc` does the same math in two custom calls: the forward spreads
(sequence, head, 64-query tile) tasks over the thread pool, each an online softmax over 256-key tiles that stay
in cache (scores by one sgemm, exponentials in place, their product with v by another); the backward, one task
per (sequence, head), recomputes each tile's probabilities from the saved log-sum-exp and accumulates dq, dk and
dv with four sgemms per tile. q, k and v are read in place through their row strides. Same semantics as the XLA
version (keys after a query tile's last row are never visited; masked scores are float32's lowest value); float32
only. `native.py` builds and loads the library.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv3_jax import native
from dsv3_jax import ops

FORWARD_TARGET = "dsv3_causal_attention_forward"
BACKWARD_TARGET = "dsv3_causal_attention_backward"


def supports(*operands: jax.Array) -> bool:
  """Whether q, k and v can take the native path (`native.supports`)."""
  return native.supports("causal attention", *operands)


def _forward_call(q_BSHK, k_BSHK, v_BSHV, mask_BSS):
  native.require()
  batch, seq, heads, _ = q_BSHK.shape
  out_BSHV, lse_BHS = native.call(FORWARD_TARGET, [v_BSHV.shape, (batch, heads, seq)], q_BSHK, k_BSHK, v_BSHV,
                                  mask_BSS.astype(jnp.bool_))
  return out_BSHV, lse_BHS


@jax.custom_vjp
def causal_attention(q_BSHK: jax.Array, k_BSHK: jax.Array, v_BSHV: jax.Array, mask_BSS: jax.Array) -> jax.Array:
  """out[b, s, h] = sum_t softmax_t(q[b, s, h] . k[b, t, h], masked) v[b, t, h], [B, S, H, V] float32.

  The queries carry the softmax scale; mask_BSS [B, S, S] must never allow a key after its query.
  """
  return _forward_call(q_BSHK, k_BSHK, v_BSHV, mask_BSS)[0]


def _forward(q_BSHK, k_BSHK, v_BSHV, mask_BSS):
  out_BSHV, lse_BHS = _forward_call(q_BSHK, k_BSHK, v_BSHV, mask_BSS)
  return out_BSHV, (q_BSHK, k_BSHK, v_BSHV, mask_BSS, out_BSHV, lse_BHS)


def _backward(res, dout_BSHV):
  q_BSHK, k_BSHK, v_BSHV, mask_BSS, out_BSHV, lse_BHS = res
  dq, dk, dv = native.call(BACKWARD_TARGET, [q_BSHK.shape, k_BSHK.shape, v_BSHV.shape], q_BSHK, k_BSHK, v_BSHV,
                           mask_BSS.astype(jnp.bool_), out_BSHV, lse_BHS, dout_BSHV)
  return ops.summed_to(dq, q_BSHK), ops.summed_to(dk, k_BSHK), ops.summed_to(dv, v_BSHV), None


causal_attention.defvjp(_forward, _backward)
