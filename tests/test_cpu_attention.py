"""The native CPU causal attention (dsv3_jax/cpu_attention.py): output and gradients against the float64 softmax,
the choice MLA's attention_impl="auto" makes, each device on its own block under a mesh, and the kernel's checks.

The reference and inputs are tests/attention_reference.py's (the textbook formula in float64; random documents, so
that the mask is causal and block-diagonal), as for tests/test_flash_attention.py.
"""

import attention_reference
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dsv3_jax import config
from dsv3_jax import cpu_attention
from dsv3_jax import mla
from dsv3_jax import model as model_lib
from dsv3_jax import native
from dsv3_jax import sharding


def _got(q, k, v, mask, dout):
  out, vjp = jax.vjp(lambda q, k, v: cpu_attention.causal_attention(q, k, v, jnp.asarray(mask)),
                     *(jnp.asarray(a, jnp.float32) for a in (q, k, v)))
  return (out, *vjp(jnp.asarray(dout, jnp.float32)))


# Lengths around the kernel's 64-row query tiles and 256-key tiles: one row, one partial tile, exact tiles, several
# key tiles with a partial last one.
@pytest.mark.parametrize("batch, seq", [(1, 1), (2, 45), (2, 64), (1, 256), (2, 300), (1, 700)])
def test_output_and_gradients_match_the_whole_softmax(batch, seq):
  assert native.available(), native.unavailable_reason()
  q, k, v, mask = attention_reference.inputs(batch, seq, seed=seq)
  dout = np.random.default_rng(1).normal(size=(*q.shape[:3], v.shape[-1]))
  want = attention_reference.softmax(q, k, v, mask, dout)
  for name, g, w in zip(("out", "dq", "dk", "dv"), _got(q, k, v, mask, dout), want, strict=True):
    np.testing.assert_allclose(np.asarray(g), w, rtol=2e-5, atol=2e-5, err_msg=name)


def test_padding_queries_with_no_allowed_key_stay_finite():
  """Queries with no allowed key (padding) give finite values, and, with zero cotangents (a loss mask), add
  nothing to the gradients: those equal the reference over the other queries."""
  q, k, v, mask = attention_reference.inputs(1, 200, seed=3, documents=1)
  mask[:, :, :10] = False  # the first ten keys are padding: queries 0..9 have no allowed key
  dout = np.ones((*q.shape[:3], v.shape[-1]))
  dout[:, :10] = 0
  got = _got(q, k, v, mask, dout)
  assert all(np.isfinite(np.asarray(a)).all() for a in got)
  out, dq, dk, dv = attention_reference.softmax(q[:, 10:], k, v, mask[:, 10:], dout[:, 10:])
  for name, g, w in zip(("out", "dq", "dk", "dv"), (got[0][:, 10:], got[1][:, 10:], *got[2:]), (out, dq, dk, dv),
                        strict=True):
    np.testing.assert_allclose(np.asarray(g), w, rtol=2e-5, atol=2e-5, err_msg=name)


def _attend(impl, dtype="float32", seq=40):
  """(MLA of the tiny model in this dtype with this attention_impl, its variables, inputs, a CausalMask)."""
  cfg = config.tiny(dtype=dtype)
  layer = mla.MLA(cfg, attention_impl=impl)
  x = jax.random.normal(jax.random.key(0), (2, seq, cfg.dim), dtype)
  positions = jnp.broadcast_to(jnp.arange(seq), (2, seq))
  mask = mla.CausalMask(positions[:, None, :] <= positions[:, :, None])
  return layer, layer.init(jax.random.key(1), x, positions, mask), x, positions, mask


def test_auto_calls_native_for_float32_causal_attention_only():
  """"auto" stages the kernel for the training path's CausalMask in float32; bfloat16 and plain masks (prefill)
  take XLA alone; "xla" never stages it."""
  def staged(impl, dtype="float32", causal=True):
    layer, variables, x, positions, mask = _attend(impl, dtype)
    mask = mask if causal else mask.allowed_BST
    return "ffi_call" in str(jax.make_jaxpr(lambda v: layer.apply(v, x, positions, mask))(variables))

  assert staged("auto") and staged("native")
  assert not staged("auto", "bfloat16") and not staged("auto", causal=False) and not staged("xla")


def test_the_three_impls_agree_in_a_layer():
  layer, variables, x, positions, mask = _attend("auto", seq=300)
  outs = {}
  for impl in mla.ATTENTION_IMPLS:
    fn = lambda v, x, impl=impl: jnp.sum(jnp.sin(mla.MLA(layer.cfg, attention_impl=impl).apply(v, x, positions, mask)))
    outs[impl] = jax.value_and_grad(fn, argnums=(0, 1))(variables, x)
  for impl in ("auto", "native"):
    for g, w in zip(jax.tree.leaves(outs[impl]), jax.tree.leaves(outs["xla"]), strict=True):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6, err_msg=impl)


def test_bad_impls_and_dtypes_are_named():
  layer, variables, x, positions, mask = _attend("xla", "bfloat16")
  with pytest.raises(ValueError, match="float32 only.*bfloat16"):
    mla.MLA(layer.cfg, attention_impl="native").apply(variables, x, positions, mask)
  layer, variables, x, positions, mask = _attend("auto")
  with pytest.raises(ValueError, match="attention_impl 'flash' is not one of"):
    mla.MLA(layer.cfg, attention_impl="flash").apply(variables, x, positions, mask)


def test_each_device_runs_its_own_sequences_and_heads():
  """Under a mesh that splits the batch and the heads, the kernel runs per device (no all-gather of q, k or v
  around it) and gives the unsharded result."""
  q, k, v, mask = attention_reference.inputs(4, 96, heads=4, seed=5)
  args = [jnp.asarray(a, jnp.float32) for a in (q, k, v)] + [jnp.asarray(mask)]
  qkv_axes = ("batch", "length", "heads", "head_dim")
  attend = lambda *a: sharding.per_shard(cpu_attention.causal_attention, a, (qkv_axes,) * 3 +
                                         (("batch", "length", None),), qkv_axes)
  loss = lambda *a: jnp.sum(jnp.sin(attend(*a)))
  want = jax.grad(loss, argnums=(0, 1, 2))(*args)
  mesh = sharding.mesh_from_spec("data=4,tensor=2")
  with sharding.use_mesh(mesh):
    specs = [P("data", None, "tensor")] * 3 + [P("data")]
    args = [jax.device_put(a, jax.NamedSharding(mesh, s)) for a, s in zip(args, specs, strict=True)]
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    hlo = grad.lower(*args).compile().as_text()
    got = grad(*args)
  assert "all-gather" not in hlo
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


def test_kernel_names_mismatched_shapes():
  q = jnp.zeros((1, 8, 2, 4))
  with pytest.raises(Exception, match="k, v or mask shapes do not match q"):
    jax.block_until_ready(jax.jit(cpu_attention.causal_attention)(q, q, jnp.zeros((1, 8, 2, 3)),
                                                                  jnp.ones((1, 8, 7), bool)))


def test_model_trains_through_the_kernel():
  """The tiny model's loss gradient with attention_impl auto equals XLA's (the default training path)."""
  cfg = config.tiny()
  variables = model_lib.init(cfg, jax.random.key(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 48)), jnp.int32)

  def grads(impl):
    model = model_lib.Transformer(cfg, attention_impl=impl)
    return jax.grad(lambda p: jnp.mean(model.apply({**variables, "params": p}, tokens).logits ** 2))(
        variables["params"])

  for g, w in zip(jax.tree.leaves(grads("auto")), jax.tree.leaves(grads("xla")), strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-7)


def test_a_gpu_lowering_of_the_model_has_no_native_call():
  """`platform_dependent` keeps the native calls (attention and experts) out of a program lowered for CUDA from this
  CPU host, and in a program lowered for the CPU."""
  cfg = config.tiny(n_mtp_layers=0)
  variables = model_lib.init(cfg, jax.random.key(0))
  tokens = jnp.zeros((2, 300), jnp.int32)
  grad = jax.jit(jax.grad(lambda v: jnp.mean(model_lib.Transformer(cfg).apply(v, tokens).logits)))
  lowered = {p: grad.trace(variables).lower(lowering_platforms=(p,)).as_text() for p in ("cuda", "cpu")}
  for target in (cpu_attention.FORWARD_TARGET, cpu_attention.BACKWARD_TARGET, "dsv3_grouped_swiglu"):
    assert target not in lowered["cuda"] and target in lowered["cpu"]
