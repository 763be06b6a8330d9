"""Parity with the PyTorch reference (transformers DeepseekV3ForCausalLM / MtpModel), fp32.

Weights go HF -> ours through `convert.params_from_hf`, so these tests also pin the name table.
Tolerances are fixed (STYLE rule 11): 1e-5 on logits, 1e-4 on composite hidden states.
"""

import jax
import numpy as np
import pytest
import torch

from dsv3_jax import config
from dsv3_jax import convert
from dsv3_jax import model as model_lib
from dsv3_jax import torch_parity

LOGITS_TOL = 1e-5
HIDDEN_TOL = 1e-4
TOKENS = np.array([[1, 5, 9, 17, 33, 65, 100, 127], [3, 3, 7, 60, 2, 90, 11, 42]])


@pytest.fixture(scope="module")
def reference():
  cfg = config.tiny()
  hf = torch_parity.tiny_hf_model(cfg)
  mtp = torch_parity.tiny_hf_mtp(hf, cfg.n_mtp_layers)
  return cfg, hf, mtp, torch_parity.variables_from_hf(hf, cfg, mtp)


def test_reference_is_yarn_with_mscale(reference):
  cfg, hf, _, _ = reference
  assert hf.config.rope_parameters["rope_type"] == "yarn"
  assert hf.model.layers[0].self_attn.scaling == pytest.approx(cfg.softmax_scale, rel=1e-12)
  assert cfg.softmax_scale == pytest.approx(0.38249888831204115, rel=1e-12)


@pytest.mark.parametrize("tokens", [TOKENS, np.random.default_rng(0).integers(0, 128, (3, 24)),
                                    # longer than one attention block: our blockwise causal attention
                                    np.random.default_rng(1).integers(0, 128, (1, 700))])
def test_logits_hidden_and_experts_match(reference, tokens):
  cfg, hf, _, variables = reference
  report = torch_parity.compare(hf, variables, cfg, tokens)
  assert report.logits_max_diff <= LOGITS_TOL, report
  assert max(report.layer_hidden_max_diff) <= HIDDEN_TOL, report
  assert report.expert_mismatches == [0] * cfg.n_moe_layers, report
  assert report.top1_agreement == 1.0


@pytest.mark.parametrize("overrides", [
    dict(q_lora_rank=0, n_expert_groups=1, n_limited_groups=1),  # direct wq, no group limit
    dict(rope_factor=1.0, n_layers=3, n_dense_layers=1, n_shared_experts=2),  # plain RoPE, 2 MoE layers
])
def test_variant_architectures_match(overrides):
  cfg = config.tiny(n_mtp_layers=0, **overrides)
  hf = torch_parity.tiny_hf_model(cfg, seed=3)
  report = torch_parity.compare(hf, torch_parity.variables_from_hf(hf, cfg), cfg, TOKENS)
  assert report.logits_max_diff <= LOGITS_TOL, report
  assert not any(report.expert_mismatches), report


def _decode(variables, cfg, tokens, prefill):
  """Prefill `prefill` tokens, then decode the rest one at a time; returns logits of every step."""
  model = model_lib.Transformer(cfg)
  step_fn = jax.jit(lambda v, t, p, c: model.apply(v, t, p, cache=c))
  batch, seq = tokens.shape
  positions = np.broadcast_to(np.arange(seq), (batch, seq))
  out = step_fn(variables, tokens[:, :prefill], positions[:, :prefill], model_lib.init_cache(cfg, batch, seq))
  logits, cache = [out.logits], out.cache
  for t in range(prefill, seq):
    out = step_fn(variables, tokens[:, t:t + 1], positions[:, t:t + 1], cache)
    logits.append(out.logits)
    cache = out.cache
  return np.concatenate(logits, axis=1)


def test_absorbed_decode_matches_reference_and_full_forward(reference):
  cfg, hf, _, variables = reference
  decoded = _decode(variables, cfg, TOKENS, prefill=5)
  with torch.no_grad():
    ref = hf(torch.as_tensor(TOKENS)).logits.numpy()
  full = np.asarray(model_lib.Transformer(cfg).apply(variables, TOKENS, with_mtp=False).logits)
  np.testing.assert_allclose(decoded, ref, atol=LOGITS_TOL, rtol=0)
  np.testing.assert_allclose(decoded, full, atol=LOGITS_TOL, rtol=0)


def test_ragged_batch_decode_matches_each_sequence_alone(reference):
  """Two prompts of different lengths share a batch: padding never leaks into attention."""
  cfg, _, _, variables = reference
  model = model_lib.Transformer(cfg)
  step_fn = jax.jit(lambda v, t, p, c: model.apply(v, t, p, cache=c))
  full_fn = jax.jit(lambda v, t: model.apply(v, t, with_mtp=False).logits)
  lengths, steps = [3, 6], 3
  padded = np.zeros((2, 6), np.int32)
  for b, n in enumerate(lengths):
    padded[b, :n] = TOKENS[b, :n]
  positions = np.broadcast_to(np.arange(6), (2, 6))
  cache = step_fn(variables, padded, positions, model_lib.init_cache(cfg, 2, 6 + steps)).cache
  next_tok = np.array([TOKENS[b, n - 1] for b, n in enumerate(lengths)])  # any token works as a probe
  for step in range(steps):
    out = step_fn(variables, next_tok[:, None], np.array([[n + step] for n in lengths]), cache)
    cache = out.cache
    for b, n in enumerate(lengths):
      alone = np.concatenate([TOKENS[b, :n], np.repeat(next_tok[b], step + 1)])[None]
      np.testing.assert_allclose(out.logits[b, 0], full_fn(variables, alone)[0, -1], atol=LOGITS_TOL, rtol=0)


def test_padded_prefill_logits_match_unpadded(reference):
  """Right padding with a token mask leaves the real positions' logits unchanged."""
  cfg, _, _, variables = reference
  model = model_lib.Transformer(cfg)
  padded = np.concatenate([TOKENS[:, :5], np.zeros((2, 3), np.int64)], axis=1)
  mask = np.concatenate([np.ones((2, 5)), np.zeros((2, 3))], axis=1)
  got = model.apply(variables, padded, token_mask_BS=mask, with_mtp=False).logits[:, :5]
  want = model.apply(variables, TOKENS[:, :5], with_mtp=False).logits
  np.testing.assert_allclose(got, want, atol=LOGITS_TOL, rtol=0)


def test_mtp_matches_hf_mtp_model(reference):
  """Depth 1 at position i (fed h_i and Emb(t_{i+1})) equals HF's MtpModel layer + shared head."""
  cfg, hf, mtp, variables = reference
  out = model_lib.Transformer(cfg).apply(variables, TOKENS)
  seq = TOKENS.shape[1]
  with torch.no_grad():
    h_main = hf(torch.as_tensor(TOKENS), output_hidden_states=True).hidden_states[-1]
    positions = torch.arange(1, seq).expand(TOKENS.shape[0], -1)
    h_mtp = mtp.forward_layer(0, h_main[:, :-1], positions, None, input_ids=torch.as_tensor(TOKENS[:, 1:]))
    ref = mtp._project_to_logits(h_mtp).numpy()
  np.testing.assert_allclose(out.mtp_logits[0, :, :-1], ref, atol=LOGITS_TOL, rtol=0)


def test_state_dict_round_trips_through_our_variables(reference):
  cfg, hf, mtp, variables = reference
  state = torch_parity.hf_state(hf, mtp)
  back = convert.params_to_hf(jax.tree.map(np.asarray, variables), cfg, fused_experts=True)
  assert set(back) == set(state)
  for name, value in state.items():
    np.testing.assert_array_equal(back[name], value, err_msg=name)
  per_expert = convert.params_to_hf(jax.tree.map(np.asarray, variables), cfg)
  again = convert.params_from_hf(per_expert, cfg)
  jax.tree.map(np.testing.assert_array_equal, again, jax.tree.map(np.asarray, variables))


def test_conversion_errors_name_the_tensor(reference):
  cfg, hf, mtp, _ = reference
  state = torch_parity.hf_state(hf, mtp)
  missing = dict(state)
  del missing["model.layers.1.self_attn.kv_b_proj.weight"]
  with pytest.raises(convert.ConversionError, match="model.layers.1.self_attn.kv_b_proj.weight"):
    convert.params_from_hf(missing, cfg)
  wrong = {**state, "model.norm.weight": np.ones(3, np.float32)}
  with pytest.raises(convert.ConversionError, match="model.norm.weight"):
    convert.params_from_hf(wrong, cfg)
  extra = {**state, "model.layers.9.mlp.gate.weight": np.ones(3, np.float32)}
  with pytest.raises(convert.ConversionError, match="model.layers.9.mlp.gate.weight"):
    convert.params_from_hf(extra, cfg)


def test_out_of_vocab_token_ids_are_refused(reference):
  cfg, _, _, variables = reference
  bad = TOKENS.copy()
  bad[1, 4] = cfg.vocab_size
  with pytest.raises(ValueError, match=r"id 128 at index \(1, 4\)"):
    model_lib.Transformer(cfg).apply(variables, bad)
  with pytest.raises(ValueError, match="id -1"):
    model_lib.Transformer(cfg).apply(variables, -np.ones((1, 2), np.int32))


def test_compare_tool_loads_a_saved_hf_checkpoint(tmp_path):
  """`compare_torch --hf_dir` path: a checkpoint written by save_pretrained loads and matches."""
  cfg = config.tiny(n_mtp_layers=0)
  hf = torch_parity.tiny_hf_model(cfg, seed=5)
  hf.save_pretrained(tmp_path)
  loaded_cfg, loaded = torch_parity.load_hf_dir(str(tmp_path))
  assert loaded_cfg == cfg
  report = torch_parity.compare(loaded, torch_parity.variables_from_hf(loaded, loaded_cfg), loaded_cfg, TOKENS)
  assert report.ok(LOGITS_TOL), report
