"""Model-level properties: causality, sliceable layer stacks, remat, dtypes, full-size shapes."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import block as block_lib
from dsv3_jax import config
from dsv3_jax import model as model_lib

TOKENS = np.array([[1, 5, 9, 17, 33, 65, 100, 127], [3, 3, 7, 60, 2, 90, 11, 42]])


@pytest.fixture(scope="module")
def tiny():
  cfg = config.tiny(n_layers=3, n_dense_layers=1, n_mtp_layers=2)
  variables = model_lib.init(cfg, jax.random.PRNGKey(0))
  # O(1) weights so that every path visibly matters.
  variables = jax.tree.map(lambda a: a * 30 if a.ndim >= 2 else a, variables)
  return cfg, variables


@functools.cache
def _forward(cfg, remat="none"):
  return jax.jit(lambda v, t: model_lib.Transformer(cfg, remat=remat).apply(v, t))


def test_causal(tiny):
  cfg, variables = tiny
  base = _forward(cfg)(variables, TOKENS)
  for j in (0, 3, 7):
    changed = TOKENS.copy()
    changed[:, j] = (changed[:, j] + 1) % cfg.vocab_size
    out = _forward(cfg)(variables, changed)
    np.testing.assert_array_equal(out.logits[:, :j], base.logits[:, :j])
    assert not np.allclose(out.logits[:, j], base.logits[:, j])
    # MTP depth k at position i reads tokens up to i + k.
    for k in range(cfg.n_mtp_layers):
      np.testing.assert_array_equal(out.mtp_logits[k, :, :max(j - k - 1, 0)],
                                    base.mtp_logits[k, :, :max(j - k - 1, 0)])


def test_layers_apply_one_slice_at_a_time(tiny):
  """A pipeline stage can run any single layer from its slice of the stacked parameters."""
  cfg, variables = tiny
  model = model_lib.Transformer(cfg)
  want = model.apply(variables, TOKENS, with_mtp=False).logits
  positions = jnp.broadcast_to(jnp.arange(TOKENS.shape[1]), TOKENS.shape)
  mask = positions[:, None, :] <= positions[:, :, None]
  params, routing = variables["params"], variables["routing"]
  x = model.apply(variables, TOKENS, method=lambda m, t: m.embed(t))
  for stack, n, moe in (("dense_layers", cfg.n_dense_layers, False), ("moe_layers", cfg.n_moe_layers, True)):
    for i in range(n):
      layer = {"params": jax.tree.map(lambda a, i=i: a[i], params[stack])}
      if moe:
        layer["routing"] = jax.tree.map(lambda a, i=i: a[i], routing[stack])
      x, _ = block_lib.Block(cfg, moe=moe).apply(layer, x, None, positions, mask)
  got = model.apply(variables, x, method=lambda m, h: jnp.einsum("bsd,dx->bsx", m.norm(h), m.head))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def _loss(cfg, remat, params, routing):
  out = model_lib.Transformer(cfg, remat=remat).apply({"params": params, "routing": routing}, TOKENS)
  return jnp.mean(out.logits ** 2) + jnp.mean(out.mtp_logits ** 2)


def test_remat_policies_keep_values_and_gradients():
  cfg = config.tiny()
  variables = model_lib.init(cfg, jax.random.PRNGKey(1))
  grad = jax.jit(jax.value_and_grad(_loss, argnums=2), static_argnums=(0, 1))
  want_loss, want = grad(cfg, "none", variables["params"], variables["routing"])
  for remat in ("full", "dots"):
    got_loss, got = grad(cfg, remat, variables["params"], variables["routing"])
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), got, want)


def test_unknown_remat_policy_is_refused():
  with pytest.raises(ValueError, match="remat policy 'some'"):
    model_lib.init(config.tiny(), jax.random.PRNGKey(0), remat="some")


def test_bf16_forward_is_finite_and_near_fp32(tiny):
  cfg, variables = tiny
  full = _forward(cfg)(variables, TOKENS).logits
  half = _forward(cfg.replace(dtype="bfloat16"))(variables, TOKENS).logits
  assert half.dtype == jnp.float32  # logits come back in fp32 for the loss
  assert np.all(np.isfinite(half))
  # bf16 keeps ~3 significant digits; expert choices may flip, so compare in bulk.
  assert np.mean(np.abs(half - full)) < 0.05 * np.mean(np.abs(full))


def test_full_size_forward_shapes_without_allocation():
  cfg = config.deepseek_v3_671b()
  abstract = jax.eval_shape(lambda: model_lib.init(cfg, jax.random.PRNGKey(0)))
  out = jax.eval_shape(lambda v, t: model_lib.Transformer(cfg).apply(v, t), abstract,
                       jax.ShapeDtypeStruct((1, 16), jnp.int32))
  assert out.logits.shape == (1, 16, 129280)
  assert out.mtp_logits.shape == (1, 1, 16, 129280)
  assert out.stats["expert_load"].shape == (58 + 1, 256)
  assert abstract["params"]["moe_layers"]["ffn"]["experts"]["w1"].shape == (58, 256, 7168, 2048)
  assert abstract["routing"]["moe_layers"]["ffn"]["gate"]["bias"].dtype == jnp.float32


def test_latent_cache_is_576_values_per_token_per_layer():
  """Cost contract: 61 layers x (512 + 64) values = 70,272 bytes per token in bf16."""
  cfg = config.deepseek_v3_671b()
  cache = jax.eval_shape(lambda: model_lib.init_cache(cfg, batch=1, length=1, dtype=jnp.bfloat16))
  assert sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache)) == 70_272


def test_params_carry_logical_axes():
  cfg = config.tiny()
  boxed = jax.eval_shape(lambda: model_lib.Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))
  specs = nn.get_partition_spec(boxed)
  assert tuple(specs["params"]["moe_layers"]["ffn"]["experts"]["w1"]) == ("layers", "expert", "embed", "mlp")
  assert tuple(specs["params"]["embed"]["embedding"]) == ("vocab", "embed")
