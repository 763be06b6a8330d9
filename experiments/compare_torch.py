"""Compares our forward pass with transformers' DeepseekV3ForCausalLM on the same weights, in fp32.

  python -m experiments.compare_torch --tiny                 # a random tiny HF model built here
  python -m experiments.compare_torch --hf_dir=/path/to/hf   # a local HF checkpoint (bf16/fp32 weights)

Prints per-layer hidden-state max |diff|, logits max |diff|, top-1 agreement, KL and expert-choice
mismatches; exits 1 when the logits differ by more than --tol or any token's experts differ.
"""

from __future__ import annotations

import sys

import jax
import numpy as np
from absl import app
from absl import flags
from absl import logging

from dsv3_jax import config
from dsv3_jax import layers
from dsv3_jax import torch_parity

_TINY = flags.DEFINE_bool("tiny", False, "Build a random tiny HF model (numerics §11) instead of loading one.")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "Local HF checkpoint directory (config.json + safetensors).")
_TOKENS = flags.DEFINE_list("tokens", None, "Comma-separated token ids of one sequence (default: random).")
_BATCH = flags.DEFINE_integer("batch", 2, "Random sequences to compare when --tokens is not given.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 16, "Length of the random sequences.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for the random model and tokens.")
_TOL = flags.DEFINE_float("tol", 1e-5, "Largest allowed logits max |diff|.")


def _tokens(vocab_size: int) -> np.ndarray:
  if _TOKENS.value:
    try:
      tokens = np.array([[int(t) for t in _TOKENS.value]])
    except ValueError as e:
      raise app.UsageError(f"--tokens must be integers: {e}") from e
    try:
      layers.check_token_ids(tokens, vocab_size, "--tokens")
    except ValueError as e:
      raise app.UsageError(str(e)) from e
    return tokens
  return np.random.default_rng(_SEED.value).integers(0, vocab_size, (_BATCH.value, _SEQ_LEN.value))


def main(argv):
  del argv
  if _TINY.value == bool(_HF_DIR.value):
    raise app.UsageError("pass exactly one of --tiny or --hf_dir")
  logging.info("jax %s, %d process(es), %d device(s)", jax.__version__, jax.process_count(), jax.device_count())
  if _TINY.value:
    cfg = config.tiny(n_mtp_layers=0)
    hf_model = torch_parity.tiny_hf_model(cfg, seed=_SEED.value)
  else:
    cfg, hf_model = torch_parity.load_hf_dir(_HF_DIR.value)
  variables = torch_parity.variables_from_hf(hf_model, cfg)
  tokens = _tokens(cfg.vocab_size)
  report = torch_parity.compare(hf_model, variables, cfg, tokens)
  print(f"tokens {tokens.shape}, {cfg.n_layers} layers ({cfg.n_dense_layers} dense), fp32")
  for i, diff in enumerate(report.layer_hidden_max_diff):
    print(f"  layer {i:3d} hidden max|diff| {diff:.3e}")
  print(f"logits max|diff|   {report.logits_max_diff:.3e}  (tol {_TOL.value:.1e})")
  print(f"top-1 agreement    {report.top1_agreement:.4f}")
  print(f"KL(ref || ours)    {report.kl:.3e} nats/token")
  print(f"expert mismatches  {report.expert_mismatches} (tokens per MoE layer)")
  ok = report.ok(_TOL.value)
  print("PASS" if ok else "FAIL")
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  app.run(main)
