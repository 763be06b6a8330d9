"""The attention tests' shared reference: random inputs with a causal, block-diagonal mask, and the textbook
softmax attention with its gradients in float64 (the closed form of the softmax Jacobian)."""

import numpy as np


def inputs(batch, seq, heads=3, k=12, v=8, seed=0, documents=3):
  """(q, k, v, mask) in float64 / bool: a causal mask narrowed to random documents (sorted segment ids)."""
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(batch, seq, heads, k)) * 0.5
  kk = rng.normal(size=(batch, seq, heads, k))
  vv = rng.normal(size=(batch, seq, heads, v))
  pos = np.arange(seq)
  segments = np.sort(rng.integers(0, documents, (batch, seq)), axis=1)
  mask = (pos[None, None, :] <= pos[None, :, None]) & (segments[:, None, :] == segments[:, :, None])
  return q, kk, vv, mask


def softmax(q, k, v, mask, dout):
  """(out, dq, dk, dv) in float64."""
  s = np.einsum("bshk,bthk->bhst", q, k)
  s = np.where(mask[:, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out = np.einsum("bhst,bthv->bshv", p, v)
  dp = np.einsum("bshv,bthv->bhst", dout, v)
  ds = p * (dp - np.sum(dp * p, -1, keepdims=True))
  return (out, np.einsum("bhst,bthk->bshk", ds, k), np.einsum("bhst,bshk->bthk", ds, q),
          np.einsum("bhst,bshv->bthv", p, dout))
