"""FP8-stored weights for inference (dsv3_jax/fp8_weights.py): the forward, generation, HF keep mode, bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import config
from dsv3_jax import fp8_weights
from dsv3_jax import generate
from dsv3_jax import hf_checkpoint
from dsv3_jax import model as model_lib
from dsv3_jax import sharding
from experiments import convert_hf

# Blocks partial on every axis (dim 160 = 128 + 32); enough tokens that the routed experts take the tile path.
CFG = config.tiny(dim=160, inter_dim=200, moe_inter_dim=48, vocab_size=300)
FP8 = dataclasses.replace(CFG, precision="fp8", fp8_impl="xla")
TOKENS = jax.random.randint(jax.random.key(1), (2, 16), 0, CFG.vocab_size)


@pytest.fixture(scope="module")
def variables():
  return model_lib.init(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def stored(variables):
  return fp8_weights.store(variables)


def _logits(variables, cfg, tokens=TOKENS):
  return np.asarray(model_lib.Transformer(cfg).apply(variables, tokens).logits)


def test_store_moves_exactly_the_fp8_kernels(variables, stored):
  flat = lambda tree: {"/".join(map(str, (getattr(k, "key", k) for k in p))) for p, _ in
                       jax.tree_util.tree_flatten_with_path(tree)[0]}
  moved = flat(variables["params"]) - flat(stored["params"])
  assert "moe_layers/ffn/experts/w1" in moved and "dense_layers/attn/wkv_b/kernel" in moved
  assert "moe_layers/ffn/shared_experts/w2/kernel" in moved and "mtp_0/block/attn/wo/kernel" in moved
  kept = flat(stored["params"])
  assert {"head", "embed/embedding", "moe_layers/ffn/gate/kernel", "mtp_0/eh_proj/kernel"} <= kept
  assert not any(k.endswith("/w1") or "attn/w" in k for k in kept)
  leaf = stored[fp8_weights.STORED]["moe_layers"]["ffn"]["experts"]["w1"]
  assert leaf["weight"].dtype == jnp.float8_e4m3fn and leaf["weight"].shape == (1, 8, 160, 48)
  assert leaf["scale_inv"].shape == (1, 8, 2, 1)
  ratio = fp8_weights.nbytes(stored) / fp8_weights.nbytes(variables)
  print(f"variables: {fp8_weights.nbytes(variables):,} B fp32 -> {fp8_weights.nbytes(stored):,} B with FP8 "
        f"kernels ({ratio:.2f}x)")
  assert ratio < 0.45  # embedding, head, router, norms and eh_proj stay fp32 in this tiny model


def test_stored_forward_equals_the_fp8_recipe_forward(variables, stored):
  """The stored bytes are the ones the recipe quantizes on the fly, so both forwards compute the same thing."""
  np.testing.assert_allclose(_logits(stored, FP8), _logits(variables, FP8), rtol=1e-6, atol=1e-6)


def test_stored_weights_dequantize_under_the_bf16_recipe(variables, stored):
  ours = _logits(stored, CFG)
  dequantized = jax.tree.map(np.asarray, variables)
  for path, leaf in _stored_leaves(stored):
    node = dequantized["params"]
    for key in path[:-1]:
      node = node[key]
    node[path[-1]] = np.asarray(fp8_weights.Stored(**leaf).dequantize(jnp.float32))
  np.testing.assert_allclose(ours, _logits(jax.tree.map(jnp.asarray, dequantized), CFG), rtol=1e-6, atol=1e-6)
  error = np.linalg.norm(ours - _logits(variables, CFG)) / np.linalg.norm(_logits(variables, CFG))
  assert 1e-4 < error < 5e-2  # FP8 weight rounding: present, and small


def _stored_leaves(stored):
  out = []

  def walk(node, path):
    if set(node) == {"weight", "scale_inv"}:
      out.append((path, node))
      return
    for key, child in node.items():
      walk(child, (*path, key))

  walk(stored[fp8_weights.STORED], ())
  return out


def test_generation_with_fp8_weights_decodes_what_the_full_forward_predicts(stored):
  """Prefill + decode (absorbed MLA with the dequantized wkv_b, as DeepSeek's inference code does; the routed
  experts' gathered path reading each slot's FP8 slice) against the full FP8 forward of the same tokens."""
  prompts = [list(map(int, TOKENS[0, :7])), list(map(int, TOKENS[1, :4]))]
  out = generate.generate(stored, FP8, prompts, 6, jax.random.key(0), details=True)
  assert [len(t) for t in out.tokens] == [6, 6]
  for prompt, new in zip(prompts, out.tokens, strict=True):
    full = _logits(stored, FP8, jnp.asarray([prompt + new]))[0]
    # Greedy: each generated token is the full forward's argmax, up to FP8's activation rounding on near-ties.
    agree = np.mean(np.argmax(full[len(prompt) - 1:-1], -1) == np.asarray(new))
    assert agree >= 5 / 6


def test_hf_keep_mode_weights_run_as_stored(tmp_path, variables):
  """An FP8 HF checkpoint converted in keep mode (what `experiments.generate --fp8_weights` reads) runs on its
  stored bytes: the same logits as the dequantized load under the bf16 recipe, and as our own quantization of
  that load under the fp8 recipe."""
  hf_checkpoint.save(variables, CFG, str(tmp_path / "hf"), dtype="fp8")
  convert_hf.to_ours(str(tmp_path / "hf"), str(tmp_path / "ours"), "fp8")
  assert generate.restore_fp8_weights(str(tmp_path / "hf")) is None  # no keep-mode tree there
  fp8_tree = generate.restore_fp8_weights(str(tmp_path / "ours"))
  loaded = jax.tree.map(jnp.asarray, hf_checkpoint.load(str(tmp_path / "hf"), CFG, dtype="float32"))
  from_hf = fp8_weights.from_hf(loaded, fp8_tree)
  assert "wq_a" not in from_hf["params"]["moe_layers"]["attn"]  # its only parameter was the kernel
  np.testing.assert_allclose(_logits(from_hf, CFG), _logits(loaded, CFG), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(_logits(from_hf, FP8), _logits(fp8_weights.store(loaded), FP8), rtol=1e-6, atol=1e-6)


def test_fp8_stored_experts_refuse_an_expert_parallel_mesh(stored):
  mesh = sharding.mesh_from_spec("expert=8")
  with sharding.use_mesh(mesh), pytest.raises(ValueError, match="FP8-stored routed experts"):
    model_lib.Transformer(FP8).apply(stored, jnp.zeros((8, 4), jnp.int32))
