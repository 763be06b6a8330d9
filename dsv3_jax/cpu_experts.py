"""The routed experts' SwiGLU on the CPU as one native call per pass: XLA FFI handlers over BLAS sgemm.

XLA's CPU runtime runs the `ops.grouped_swiglu` tile loop at about a third of a core's matmul rate: every
32-row tile slices its expert's three matrices out of the stack, runs small dots, and adds into the [E, D, F]
weight gradients, each a separate op (docs/BENCHMARKS.md). `csrc/grouped_swiglu.cc` does the same work as two
custom calls, forward and backward, on the same tile layout: one sgemm per run of an expert's consecutive tiles
(all its rows at once), the SwiGLU's elementwise work in between, transposed operands read in place and the
weight gradients accumulated straight into [E, ...]. Same semantics as the tile loop: tiles g < n_tiles compute,
the rest give zeros; float32 only. `native.py` builds and loads the library; `ops.grouped_swiglu` with impl="auto"
uses these kernels when lowering for the CPU with float32 operands and they are available, and the XLA tile loop
otherwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv3_jax import native
from dsv3_jax import ops  # ops imports this module back; each only calls the other at run time

FORWARD_TARGET = "dsv3_grouped_swiglu_forward"
FORWARD_SAVING_TARGET = "dsv3_grouped_swiglu_forward_saving"
BACKWARD_TARGET = "dsv3_grouped_swiglu_backward"


def supports(*operands: jax.Array) -> bool:
  """Whether these operands (x and the three weight stacks) can take the native path (`native.supports`)."""
  return native.supports("the routed experts' SwiGLU", *operands)


def _ints(tile_expert_G, n_tiles, live_rows_G):
  return tile_expert_G.astype(jnp.int32), jnp.asarray(n_tiles, jnp.int32), live_rows_G.astype(jnp.int32)


@jax.custom_vjp
def grouped_swiglu(x_GMD: jax.Array, w1_EDF: jax.Array, w3_EDF: jax.Array, w2_EFD: jax.Array,
                   tile_expert_G: jax.Array, n_tiles: jax.Array, live_rows_G: jax.Array) -> jax.Array:
  """y[g] = (silu(x[g] @ w1[e]) * (x[g] @ w3[e])) @ w2[e] with e = tile_expert[g], for g < n_tiles; else zeros.

  live_rows_G: the live rows at the start of each tile; the rest are padding, whose inputs must be zeros (as
  `moe.tile_layout` places them): they are skipped and give zeros, what the tile loop computes from them.
  """
  native.require()
  (y_GMD,) = native.call(FORWARD_TARGET, [x_GMD.shape], x_GMD, w1_EDF, w3_EDF, w2_EFD,
                         *_ints(tile_expert_G, n_tiles, live_rows_G))
  return y_GMD


def _forward(x_GMD, w1_EDF, w3_EDF, w2_EFD, tile_expert_G, n_tiles, live_rows_G):
  """The forward keeps x @ w1 and x @ w3 ([G, M, F] each) so that the backward does not recompute them."""
  native.require()
  ints = _ints(tile_expert_G, n_tiles, live_rows_G)
  hidden_GMF = (*x_GMD.shape[:2], w1_EDF.shape[2])
  y_GMD, a1_GMF, a3_GMF = native.call(FORWARD_SAVING_TARGET, [x_GMD.shape, hidden_GMF, hidden_GMF], x_GMD,
                                      w1_EDF, w3_EDF, w2_EFD, *ints)
  return y_GMD, (x_GMD, w1_EDF, w3_EDF, w2_EFD, ints, a1_GMF, a3_GMF)


def _backward(res, dy_GMD):
  x_GMD, w1_EDF, w3_EDF, w2_EFD, ints, a1_GMF, a3_GMF = res
  dx, dw1, dw3, dw2 = native.call(BACKWARD_TARGET, [x_GMD.shape, w1_EDF.shape, w3_EDF.shape, w2_EFD.shape],
                                  x_GMD, w1_EDF, w3_EDF, w2_EFD, *ints, a1_GMF, a3_GMF, dy_GMD)
  return (ops.summed_to(dx, x_GMD), ops.summed_to(dw1, w1_EDF), ops.summed_to(dw3, w3_EDF),
          ops.summed_to(dw2, w2_EFD), None, None, None)


grouped_swiglu.defvjp(_forward, _backward)
