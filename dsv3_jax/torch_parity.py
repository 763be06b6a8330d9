"""Side-by-side comparison with the PyTorch reference, transformers' `DeepseekV3ForCausalLM`.

Used by the parity tests and by `python -m experiments.compare_torch`. torch and transformers are
imported lazily: they are test/tool dependencies, not runtime ones.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import config as config_lib
from dsv3_jax import convert
from dsv3_jax import layers
from dsv3_jax import model as model_lib


def tiny_hf_model(cfg: config_lib.ModelConfig | None = None, seed: int = 0):
  """A random fp32 HF model whose routing and rope matter (numerics §11).

  Weights are re-drawn at O(1) activations (matrices ~ N(0, 1/fan_in), norms ~ 1 + 0.1 N(0, 1)) and
  the correction biases are non-zero, so a wrong expert choice or rope layout shows in the logits.
  """
  import torch
  import transformers

  cfg = cfg or config_lib.tiny()
  hf_config = transformers.DeepseekV3Config(**cfg.to_hf(), attn_implementation="eager")
  torch.manual_seed(seed)
  model = transformers.DeepseekV3ForCausalLM(hf_config).float().eval()
  with torch.no_grad():
    for _, p in model.named_parameters():
      p.copy_(1 + 0.1 * torch.randn_like(p) if p.dim() == 1 else torch.randn_like(p) / p.shape[-1] ** 0.5)
    for layer in model.model.layers[cfg.n_dense_layers:]:
      bias = layer.mlp.gate.e_score_correction_bias
      bias.copy_(0.1 * torch.randn_like(bias))
  return model


def tiny_hf_mtp(main_model, n_mtp_layers: int = 1, seed: int = 1):
  """HF's MTP model (`MtpModel`, sharing the main embedding and head), re-drawn like the main model."""
  import torch
  from transformers import modeling_layers

  mtp = modeling_layers.MtpModel(main_model, n_mtp_layers).float().eval()
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in mtp.named_parameters():
      if name.startswith("layers."):
        p.copy_(1 + 0.1 * torch.randn_like(p) if p.dim() == 1 else torch.randn_like(p) / p.shape[-1] ** 0.5)
    for layer in mtp.layers:
      bias = layer.mtp_block.mlp.gate.e_score_correction_bias
      bias.copy_(0.1 * torch.randn_like(bias))
  return mtp


def hf_state(main_model, mtp_model=None) -> dict[str, np.ndarray]:
  """The checkpoint-layout state dict (MTP depth k as layer n_layers + k) as numpy arrays."""
  state = {k: v.detach().float().numpy() for k, v in main_model.state_dict().items()}
  if mtp_model is not None:
    n_layers = main_model.config.num_hidden_layers
    for name, value in mtp_model.state_dict().items():
      if not name.startswith("layers."):
        continue  # the shared embedding and head
      _, k, rest = name.split(".", 2)
      rest = rest.removeprefix("mtp_block.").replace("post_norm.", "shared_head.norm.")
      state[f"model.layers.{n_layers + int(k)}.{rest}"] = value.detach().float().numpy()
  return state


def load_hf_dir(hf_dir: str):
  """A local HF checkpoint directory (config.json + safetensors) as (ModelConfig, torch model)."""
  import transformers

  with open(os.path.join(hf_dir, "config.json")) as f:
    cfg = config_lib.ModelConfig.from_hf(json.load(f), dtype="float32", n_mtp_layers=0)
  model = transformers.DeepseekV3ForCausalLM.from_pretrained(hf_dir, dtype="float32",
                                                             attn_implementation="eager").eval()
  return cfg, model


@dataclasses.dataclass
class Report:
  layer_hidden_max_diff: list[float]  # per decoder layer, output hidden state
  logits_max_diff: float
  top1_agreement: float
  kl: float  # mean KL(reference || ours) per position, nats
  expert_mismatches: list[int]  # per MoE layer, tokens whose selected expert set differs

  def ok(self, tol: float) -> bool:
    return self.logits_max_diff <= tol and not any(self.expert_mismatches)


def hf_forward(hf_model, tokens: np.ndarray):
  """Reference logits, per-layer outputs and per-MoE-layer selected experts (via forward hooks)."""
  import torch

  hidden, experts, hooks = [], [], []
  for layer in hf_model.model.layers:
    hooks.append(layer.register_forward_hook(
        lambda _m, _i, out: hidden.append((out[0] if isinstance(out, tuple) else out).detach().numpy())))
    if hasattr(layer.mlp, "gate"):
      hooks.append(layer.mlp.gate.register_forward_hook(lambda _m, _i, out: experts.append(out[2].numpy())))
  try:
    with torch.no_grad():
      out = hf_model(torch.as_tensor(tokens), output_hidden_states=True)
  finally:
    for h in hooks:
      h.remove()
  return out.logits.numpy(), out.hidden_states[-1].numpy(), hidden, experts


def ours_forward(variables, cfg: config_lib.ModelConfig, tokens: np.ndarray, impl: str = "auto"):
  """Our logits, per-layer outputs and per-MoE-layer selected experts [B, S, K]."""
  model = model_lib.Transformer(cfg, impl=impl)
  out, inter = model.apply(variables, jnp.asarray(tokens), with_mtp=False, mutable=["intermediates"])
  inter = inter["intermediates"]
  hidden = []
  for stack in ("dense_layers", "moe_layers"):
    if stack in inter:
      hidden.extend(np.asarray(inter[stack]["hidden"][0]))
  experts = list(np.asarray(inter["moe_layers"]["ffn"]["selected_experts"][0])) if "moe_layers" in inter else []
  return np.asarray(out.logits), hidden, experts


def compare(hf_model, variables, cfg: config_lib.ModelConfig, tokens: np.ndarray) -> Report:
  layers.check_token_ids(tokens, cfg.vocab_size, "--tokens")
  ref_logits, _, ref_hidden, ref_experts = hf_forward(hf_model, tokens)
  logits, hidden, experts = ours_forward(variables, cfg, tokens)
  ref_logp, logp = _log_softmax(ref_logits), _log_softmax(logits)
  return Report(
      layer_hidden_max_diff=[float(np.abs(a - b).max()) for a, b in zip(ref_hidden, hidden, strict=True)],
      logits_max_diff=float(np.abs(ref_logits - logits).max()),
      top1_agreement=float(np.mean(ref_logits.argmax(-1) == logits.argmax(-1))),
      kl=float(np.mean(np.sum(np.exp(ref_logp) * (ref_logp - logp), -1))),
      expert_mismatches=[int(np.sum(np.any(np.sort(r.reshape(e.shape), -1) != np.sort(e, -1), -1)))
                         for r, e in zip(ref_experts, experts, strict=True)],
  )


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def variables_from_hf(hf_model, cfg: config_lib.ModelConfig, mtp_model=None) -> dict:
  """Our variables (jnp) converted from the reference model through `convert.params_from_hf`."""
  abstract = jax.eval_shape(lambda: model_lib.init(cfg, jax.random.PRNGKey(0)))
  variables = convert.params_from_hf(hf_state(hf_model, mtp_model), cfg, abstract)
  return jax.tree.map(jnp.asarray, variables)
