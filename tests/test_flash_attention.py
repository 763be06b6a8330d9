"""Blockwise causal attention (`flash_attention`) against the whole-matrix softmax, and the model path that uses it.

The reference (tests/attention_reference.py) is the textbook formula in numpy float64: masked scores, softmax over
each row, times v; its gradients come from the float64 closed form of the softmax Jacobian. Rows with no allowed
key are excluded (see the module docstring: their outputs are meaningless on every path).
"""

import math

import attention_reference
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import ad_checkpoint  # saved_residuals, as dsv3_jax/plan.py uses it
from jax.sharding import PartitionSpec as P

from dsv3_jax import block as block_lib
from dsv3_jax import config
from dsv3_jax import flash_attention
from dsv3_jax import mla
from dsv3_jax import model as model_lib


@pytest.mark.parametrize("seq, block", [(256, 64), (300, 128), (96, 128)])
def test_output_and_gradients_match_the_whole_softmax(seq, block):
  q, k, v, mask = attention_reference.inputs(2, seq)
  dout = np.random.default_rng(1).normal(size=(*q.shape[:3], v.shape[-1]))
  f = lambda q, k, v: flash_attention.causal_attention(q, k, v, jnp.asarray(mask), block)
  args = [jnp.asarray(a, jnp.float32) for a in (q, k, v)]
  out, vjp = jax.vjp(f, *args)
  got = (out, *vjp(jnp.asarray(dout, jnp.float32)))
  want = attention_reference.softmax(q, k, v, mask, dout)
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
    np.testing.assert_allclose(np.asarray(g), w, rtol=2e-5, atol=2e-5, err_msg=name)


def test_bfloat16_inputs_keep_their_dtype_and_fp32_softmax():
  q, k, v, mask = attention_reference.inputs(1, 384, seed=2)
  args = [jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)]
  out = flash_attention.causal_attention(*args, jnp.asarray(mask), 128)
  assert out.dtype == jnp.bfloat16
  want = attention_reference.softmax(*(np.asarray(a, np.float64) for a in args), mask, np.zeros((1, 384, 3, 8)))[0]
  np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=2e-2)  # bf16 rounding of p and out


def test_padding_queries_with_no_allowed_key_stay_finite():
  q, k, v, mask = attention_reference.inputs(1, 200, seed=3, documents=1)
  mask[:, :, :10] = False  # the first ten keys are padding: queries 0..9 have no allowed key
  out, vjp = jax.vjp(lambda q, k, v: flash_attention.causal_attention(q, k, v, jnp.asarray(mask), 64),
                     *(jnp.asarray(a, jnp.float32) for a in (q, k, v)))
  dout = np.ones(out.shape, np.float32)
  dout[:, :10] = 0  # what a loss mask does to those rows
  grads = vjp(jnp.asarray(dout))
  assert all(np.isfinite(np.asarray(a)).all() for a in (out, *grads))
  with np.errstate(invalid="ignore"):  # the reference's rows 0..9 are 0/0
    want = attention_reference.softmax(q, k, v, mask, np.asarray(dout, np.float64))[0]
  np.testing.assert_allclose(np.asarray(out)[:, 10:], want[:, 10:], rtol=2e-5, atol=2e-5)


def test_runs_inside_shard_map_over_the_batch():
  q, k, v, mask = attention_reference.inputs(8, 160, seed=4)
  mesh = jax.make_mesh((8,), ("data",))
  f = lambda q, k, v, m: flash_attention.causal_attention(q, k, v, m, 64)
  loss = lambda f: (lambda q, k, v, m: jnp.sum(jnp.sin(f(q, k, v, m))))
  sharded = jax.shard_map(f, mesh=mesh, in_specs=P("data"), out_specs=P("data"))
  args = [jnp.asarray(a, jnp.float32) for a in (q, k, v)] + [jnp.asarray(mask)]
  want = jax.grad(loss(f), argnums=(0, 1, 2))(*args)
  with jax.set_mesh(mesh):
    args = [jax.device_put(a, jax.NamedSharding(mesh, P("data"))) for a in args]
    got = jax.jit(jax.grad(loss(sharded), argnums=(0, 1, 2)))(*args)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)  # fp32 sums, other fusion


def test_block_size_follows_the_length():
  small, large = mla.CAUSAL_BLOCKS
  assert [mla.causal_block(n) for n in (1, small, small + 1, large, large + 1, 8 * large)] == [
      None, None, small, small, large, large]


@pytest.mark.parametrize("seq", [mla.CAUSAL_BLOCKS[0] + 45, mla.CAUSAL_BLOCKS[1] + 77])
def test_model_takes_the_blockwise_path_past_one_block_and_matches_the_whole_matrix(seq):
  """Default positions (a CausalMask) and explicit ones (a plain mask, whole scores) give the same model."""
  cfg = config.tiny(n_mtp_layers=0)
  variables = model_lib.init(cfg, jax.random.PRNGKey(0))
  tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, seq))
  segments = np.sort(np.random.default_rng(6).integers(0, 3, (2, seq)), axis=1)
  positions = np.broadcast_to(np.arange(seq), (2, seq))
  model = model_lib.Transformer(cfg)

  def loss(v, positions):
    out = model.apply(v, tokens, positions, segment_ids_BS=segments)
    return jnp.mean(jax.nn.log_softmax(out.logits)[..., 0]), out.logits

  (_, blockwise), g_blockwise = jax.value_and_grad(loss, has_aux=True)(variables, None)
  (_, whole), g_whole = jax.value_and_grad(loss, has_aux=True)(variables, positions)
  np.testing.assert_allclose(np.asarray(blockwise), np.asarray(whole), rtol=1e-5, atol=1e-5)
  for g, w in zip(jax.tree.leaves(g_blockwise), jax.tree.leaves(g_whole), strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-7)
  uses_blockwise = lambda positions: "name=_attention" in str(jax.make_jaxpr(loss)(variables, positions))
  assert uses_blockwise(None) and not uses_blockwise(positions)


def test_a_layer_keeps_no_sequence_squared_residual_for_its_backward():
  """Under the training path's CausalMask, nothing the layer saves for its backward grows with S^2 (XLA's path; the
  native one is checked on the compiled program below)."""
  cfg = config.tiny(n_mtp_layers=0)
  seq = 4 * mla.CAUSAL_BLOCKS[1]
  x = jax.ShapeDtypeStruct((1, seq, cfg.dim), jnp.float32)
  positions = jax.ShapeDtypeStruct((1, seq), jnp.int32)

  def largest_residual(mask):
    layer = block_lib.Block(cfg, moe=True, attention_impl="xla")
    variables = jax.eval_shape(layer.init, jax.random.PRNGKey(0), x, None, positions, mask)
    fn = lambda v, x, p, m: jnp.sum(layer.apply(v, x, None, p, m)[0])
    saved = ad_checkpoint.saved_residuals(fn, variables, x, positions, mask)
    return max(math.prod(aval.shape) for aval, source in saved if not source.startswith("from the argument"))

  plain = jax.ShapeDtypeStruct((1, seq, seq), jnp.bool_)
  assert largest_residual(plain) >= cfg.n_heads * seq * seq  # the whole path keeps its [B, H, S, S] probabilities
  assert largest_residual(mla.CausalMask(plain)) < seq * seq


@pytest.mark.parametrize("attention_impl", ["auto", "xla"])
def test_training_memory_grows_linearly_with_length(attention_impl):
  """The compiled gradient of a 6-layer model keeps no per-layer S^2 buffer: scratch(2S) - 2 scratch(S), its S^2
  part, stays under what one more [1, S, S] bool mask would add (2 S^2 bytes); a copy of the mask per layer would
  add six times that. With the native kernel the mask passes through `platform_dependent`'s branches and is a
  residual of the layer in the jaxpr: this checks that XLA does not copy it."""
  cfg = config.tiny(n_mtp_layers=0, n_layers=6)
  variables = model_lib.init(cfg, jax.random.PRNGKey(0))
  model = model_lib.Transformer(cfg, attention_impl=attention_impl, unroll=True)
  loss = lambda v, tokens, segments: jnp.mean(model.apply(v, tokens, segment_ids_BS=segments).logits)

  def scratch(seq):
    ids = jnp.zeros((1, seq), jnp.int32)  # segment ids as data: the mask is computed, not a constant
    return jax.jit(jax.grad(loss)).lower(variables, ids, ids).compile().memory_analysis().temp_size_in_bytes

  seq = 1024
  assert scratch(2 * seq) - 2 * scratch(seq) < 2 * seq * seq
