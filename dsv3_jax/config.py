"""The architecture of a DeepSeek-V3-style model: one frozen dataclass, presets, HF config interop.

Field names follow DeepSeek's `inference/model.py` `ModelArgs`; `from_hf`/`to_hf` translate to and from
a Hugging Face `config.json` (`DeepseekV3Config`). Run configuration (optimizer, mesh, data) lives in
`configs/*.py`, not here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_SCORE_FUNCS = ("sigmoid", "softmax")
PRECISION_RECIPES = ("bf16", "fp8")  # the run config's precision.recipe (docs/FP8.md)
FP8_IMPLS = ("auto", "xla", "pallas")  # the run config's precision.impl: "auto" or one of ops.FP8_GEMM_IMPLS


class ConfigError(ValueError):
  """An invalid model configuration; the message names the offending field."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """DeepSeek-V3 architecture. Defaults are the 671B model (reference numerics §1)."""

  vocab_size: int = 129280
  dim: int = 7168
  inter_dim: int = 18432  # hidden size of the dense SwiGLU MLP (first n_dense_layers layers)
  moe_inter_dim: int = 2048  # hidden size of each routed and shared expert
  n_layers: int = 61
  n_dense_layers: int = 3
  n_heads: int = 128
  # DeepSeekMoE.
  n_routed_experts: int = 256
  n_shared_experts: int = 1
  n_activated_experts: int = 8
  n_expert_groups: int = 8
  n_limited_groups: int = 4
  # Node-limited routing (paper §2.1.2, M = 4): the routed experts sit on n_nodes nodes in contiguous
  # blocks and each token reaches at most n_limited_nodes of them; n_nodes = 1 turns the limit off.
  # DeepSeek-V3 leaves it off: its 8 groups are its 8 nodes (EP64 over 8 nodes, 32 experts each), so
  # keeping n_limited_groups = 4 groups already is the M = 4 node limit.
  n_nodes: int = 1
  n_limited_nodes: int = 1
  score_func: str = "sigmoid"
  route_scale: float = 2.5
  # MLA. q_lora_rank == 0 means a direct query projection (no low-rank path).
  q_lora_rank: int = 1536
  kv_lora_rank: int = 512
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = 64
  v_head_dim: int = 128
  # RoPE with YaRN. rope_factor == 1 is plain RoPE (every YaRN term reduces to the identity).
  max_seq_len: int = 163840
  original_seq_len: int = 4096
  rope_theta: float = 10000.0
  rope_factor: float = 40.0
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float = 1.0  # YaRN mscale applied to cos/sin as get_mscale(mscale)/get_mscale(mscale_all_dim)
  mscale_all_dim: float = 1.0  # softmax scale is multiplied by get_mscale(mscale_all_dim)**2
  rms_norm_eps: float = 1e-6
  # Multi-token prediction depth (HF num_nextn_predict_layers).
  n_mtp_layers: int = 1
  # Numerics: activations/matmuls in `dtype`, parameters stored in `param_dtype`.
  dtype: str = "bfloat16"
  param_dtype: str = "float32"
  # Precision recipe of the transformer blocks' Linears (MLA projections, dense MLP, shared and routed
  # experts; paper §3.3): "bf16" multiplies in `dtype`, "fp8" runs their three GEMMs in block-scaled FP8
  # (dsv3_jax/fp8.py) through `fp8_impl`. Set from the run config's `precision` section, not `model`.
  precision: str = "bf16"
  fp8_impl: str = "auto"  # "auto": the Pallas kernels on GPU, XLA elsewhere (ops.fp8_impl)
  init_std: float = 0.006  # paper §4.2: weights drawn from N(0, 0.006^2)
  bos_token_id: int = 0
  eos_token_id: int = 1

  def __post_init__(self):
    _validate(self)

  # Derived sizes.
  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def n_moe_layers(self) -> int:
    return self.n_layers - self.n_dense_layers

  @property
  def experts_per_group(self) -> int:
    return self.n_routed_experts // self.n_expert_groups

  @property
  def experts_per_node(self) -> int:
    return self.n_routed_experts // self.n_nodes

  @property
  def node_limit_is_group_limit(self) -> bool:
    """True when the node step selects exactly what the group step does (nodes = groups, same M, top-2)."""
    return (self.n_nodes == self.n_expert_groups and self.n_limited_nodes == self.n_limited_groups
            and -(-self.n_activated_experts // self.n_limited_nodes) == 2)

  @property
  def compute_dtype(self) -> Any:
    return _DTYPES[self.dtype]

  @property
  def weight_dtype(self) -> Any:
    return _DTYPES[self.param_dtype]

  @property
  def softmax_scale(self) -> float:
    """(qk_nope + qk_rope)^-0.5, times YaRN's mscale^2 when YaRN is on (numerics §2.5)."""
    scale = self.qk_head_dim**-0.5
    if self.rope_factor > 1.0 and self.mscale_all_dim:
      scale *= yarn_get_mscale(self.rope_factor, self.mscale_all_dim) ** 2
    return scale

  def replace(self, **changes) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  # Hugging Face interop.
  @classmethod
  def from_hf(cls, hf: dict[str, Any], **overrides) -> ModelConfig:
    """Builds a config from a HF `config.json` dict (hub `rope_scaling` or 5.x `rope_parameters`)."""
    return cls(**{**_fields_from_hf(hf), **overrides})

  def to_hf(self) -> dict[str, Any]:
    """A HF `config.json` dict that `DeepseekV3Config` loads into the same architecture."""
    if self.n_nodes > 1 and not self.node_limit_is_group_limit:
      raise ConfigError(f"ModelConfig.n_nodes = {self.n_nodes} (node-limited routing to {self.n_limited_nodes} "
                        "nodes) has no Hugging Face config key; the exported model would route differently")
    out = {hf_key: getattr(self, ours) for hf_key, ours in _HF_TO_OURS.items()}
    out.update(
        architectures=["DeepseekV3ForCausalLM"],
        model_type="deepseek_v3",
        q_lora_rank=self.q_lora_rank or None,
        num_key_value_heads=self.n_heads,
        topk_method="noaux_tc",
        norm_topk_prob=True,
        hidden_act="silu",
        attention_bias=False,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        moe_layer_freq=1,
        ep_size=1,
        rope_interleave=True,
        torch_dtype=self.dtype,
    )
    if self.rope_factor > 1.0:
      out["rope_scaling"] = {
          "type": "yarn",
          "factor": self.rope_factor,
          "original_max_position_embeddings": self.original_seq_len,
          "beta_fast": self.beta_fast,
          "beta_slow": self.beta_slow,
          "mscale": self.mscale,
          "mscale_all_dim": self.mscale_all_dim,
      }
    else:
      out["rope_scaling"] = None
    return out


def yarn_get_mscale(factor: float, mscale: float = 1.0) -> float:
  """YaRN attention temperature: 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
  if factor <= 1.0:
    return 1.0
  return 0.1 * mscale * math.log(factor) + 1.0


# HF key -> our field, for keys that translate one to one.
_HF_TO_OURS = {
    "vocab_size": "vocab_size",
    "hidden_size": "dim",
    "intermediate_size": "inter_dim",
    "moe_intermediate_size": "moe_inter_dim",
    "num_hidden_layers": "n_layers",
    "first_k_dense_replace": "n_dense_layers",
    "num_attention_heads": "n_heads",
    "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts",
    "num_experts_per_tok": "n_activated_experts",
    "n_group": "n_expert_groups",
    "topk_group": "n_limited_groups",
    "scoring_func": "score_func",
    "routed_scaling_factor": "route_scale",
    "kv_lora_rank": "kv_lora_rank",
    "qk_nope_head_dim": "qk_nope_head_dim",
    "qk_rope_head_dim": "qk_rope_head_dim",
    "v_head_dim": "v_head_dim",
    "max_position_embeddings": "max_seq_len",
    "rope_theta": "rope_theta",
    "rms_norm_eps": "rms_norm_eps",
    "num_nextn_predict_layers": "n_mtp_layers",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
}

# HF settings this architecture fixes; any other value is a different model.
_HF_REQUIRED = {
    "topk_method": "noaux_tc",
    "hidden_act": "silu",
    "attention_bias": False,
    "tie_word_embeddings": False,
    "moe_layer_freq": 1,
    "rope_interleave": True,
}


def _fields_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
  for key, want in _HF_REQUIRED.items():
    if key in hf and hf[key] is not None and hf[key] != want:
      raise ConfigError(f"HF config key {key!r} = {hf[key]!r} is not supported (DeepSeek-V3 uses {want!r})")
  if hf.get("scoring_func", "sigmoid") == "sigmoid" and hf.get("norm_topk_prob") is False:
    raise ConfigError("HF config key 'norm_topk_prob' = False is not supported with sigmoid scoring")
  fields = {ours: hf[key] for key, ours in _HF_TO_OURS.items() if key in hf and hf[key] is not None}
  if "num_mtp_layers" in hf and "num_nextn_predict_layers" not in hf:
    fields["n_mtp_layers"] = hf["num_mtp_layers"]
  fields["q_lora_rank"] = hf.get("q_lora_rank") or 0
  for key in ("bos_token_id", "eos_token_id"):
    if isinstance(fields.get(key), list):
      fields[key] = fields[key][0]
  dtype = hf.get("dtype", hf.get("torch_dtype"))
  if dtype is not None:
    fields["dtype"] = str(dtype).removeprefix("torch.")
  fields.update(_rope_from_hf(hf))
  return fields


def _rope_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
  """Reads YaRN settings from `rope_scaling` (hub) or `rope_parameters` (transformers 5.x)."""
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  fields = {}
  if "rope_theta" in rope:
    fields["rope_theta"] = rope["rope_theta"]
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind == "default":
    return {**fields, "rope_factor": 1.0}
  if kind != "yarn":
    raise ConfigError(f"HF config key 'rope_scaling.type' = {kind!r} is not supported (use 'yarn' or none)")
  for key in ("factor", "original_max_position_embeddings", "mscale", "mscale_all_dim"):
    if rope.get(key) is None:
      # HF silently changes the numerics when the mscale keys are missing (numerics §3.4).
      raise ConfigError(f"HF config key 'rope_scaling.{key}' is missing; DeepSeek-V3 YaRN needs it explicitly")
  fields.update(
      rope_factor=float(rope["factor"]),
      original_seq_len=int(rope["original_max_position_embeddings"]),
      beta_fast=float(rope.get("beta_fast", 32.0)),
      beta_slow=float(rope.get("beta_slow", 1.0)),
      mscale=float(rope["mscale"]),
      mscale_all_dim=float(rope["mscale_all_dim"]),
  )
  return fields


def _validate(c: ModelConfig) -> None:
  def need(ok: bool, field: str, why: str):
    if not ok:
      raise ConfigError(f"ModelConfig.{field} = {getattr(c, field)!r}: {why}")

  for f in ("vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_heads", "kv_lora_rank",
            "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_seq_len", "original_seq_len",
            "n_routed_experts", "n_activated_experts", "n_expert_groups", "n_limited_groups"):
    need(isinstance(getattr(c, f), int) and getattr(c, f) > 0, f, "must be a positive integer")
  for f in ("n_dense_layers", "n_shared_experts", "q_lora_rank", "n_mtp_layers"):
    need(isinstance(getattr(c, f), int) and getattr(c, f) >= 0, f, "must be a non-negative integer")
  need(c.n_dense_layers <= c.n_layers, "n_dense_layers", f"exceeds n_layers = {c.n_layers}")
  need(c.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even (RoPE rotates pairs)")
  need(c.score_func in _SCORE_FUNCS, "score_func", f"must be one of {_SCORE_FUNCS}")
  need(c.dtype in _DTYPES, "dtype", f"must be one of {tuple(_DTYPES)}")
  need(c.param_dtype in _DTYPES, "param_dtype", f"must be one of {tuple(_DTYPES)}")
  need(c.precision in PRECISION_RECIPES, "precision",
       f"(run config key precision.recipe) must be one of {PRECISION_RECIPES}")
  need(c.fp8_impl in FP8_IMPLS, "fp8_impl", f"(run config key precision.impl) must be one of {FP8_IMPLS}")
  need(c.n_routed_experts % c.n_expert_groups == 0, "n_expert_groups",
       f"must divide n_routed_experts = {c.n_routed_experts}")
  need(c.n_limited_groups <= c.n_expert_groups, "n_limited_groups",
       f"exceeds n_expert_groups = {c.n_expert_groups}")
  need(c.n_activated_experts <= c.n_routed_experts, "n_activated_experts",
       f"exceeds n_routed_experts = {c.n_routed_experts}")
  if c.n_expert_groups > 1:
    need(c.experts_per_group >= 2, "n_expert_groups",
         f"leaves {c.experts_per_group} expert per group; group scores sum the top-2 experts of each group")
    need(c.n_activated_experts <= c.n_limited_groups * c.experts_per_group, "n_activated_experts",
         f"exceeds the {c.n_limited_groups * c.experts_per_group} experts in the n_limited_groups kept groups")
  _validate_node_limit(c, need)
  need(c.route_scale > 0, "route_scale", "must be positive")
  need(c.rope_theta > 0, "rope_theta", "must be positive")
  need(c.rope_factor >= 1.0, "rope_factor", "must be >= 1 (1 disables YaRN)")
  need(c.beta_fast > c.beta_slow > 0, "beta_fast", f"must exceed beta_slow = {c.beta_slow} > 0")
  need(c.rms_norm_eps > 0, "rms_norm_eps", "must be positive")
  need(c.init_std > 0, "init_std", "must be positive")


def _validate_node_limit(c: ModelConfig, need) -> None:
  for f in ("n_nodes", "n_limited_nodes"):
    need(isinstance(getattr(c, f), int) and getattr(c, f) > 0, f, "must be a positive integer")
  need(c.n_limited_nodes <= c.n_nodes, "n_limited_nodes", f"exceeds n_nodes = {c.n_nodes}")
  need(c.n_routed_experts % c.n_nodes == 0, "n_nodes", f"must divide n_routed_experts = {c.n_routed_experts}")
  if c.n_nodes == 1:
    return
  need(c.n_expert_groups == 1 or c.n_expert_groups % c.n_nodes == 0, "n_nodes",
       f"must divide n_expert_groups = {c.n_expert_groups} (groups nest in nodes)")
  reachable = c.n_limited_nodes * c.experts_per_node
  if c.n_expert_groups > 1:
    groups = min(c.n_limited_groups, c.n_limited_nodes * c.n_expert_groups // c.n_nodes)
    reachable = groups * c.experts_per_group
  need(c.n_activated_experts <= reachable, "n_activated_experts",
       f"exceeds the {reachable} experts that the node and group limits leave a token")


def deepseek_v3_671b(**overrides) -> ModelConfig:
  """The released DeepSeek-V3 (671B total, 37B activated per token)."""
  return ModelConfig(**overrides)


def tiny(**overrides) -> ModelConfig:
  """A two-layer model for tests: one dense and one MoE layer, YaRN on, fp32 (numerics §11)."""
  return ModelConfig(**{
      **dict(vocab_size=128, dim=64, inter_dim=128, moe_inter_dim=32, n_layers=2, n_dense_layers=1,
             n_heads=4, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, n_expert_groups=4,
             n_limited_groups=2, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
             v_head_dim=16, n_mtp_layers=1, dtype="float32"),
      **overrides,
  })


def small(**overrides) -> ModelConfig:
  """15M parameters, 6M activated (4 layers, 32 experts top-2) plus 3.5M of MTP: trains on a laptop CPU."""
  return ModelConfig(**{
      **dict(vocab_size=8192, dim=256, inter_dim=768, moe_inter_dim=128, n_layers=4, n_dense_layers=1,
             n_heads=4, n_routed_experts=32, n_shared_experts=1, n_activated_experts=2, n_expert_groups=4,
             n_limited_groups=2, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
             v_head_dim=32, n_mtp_layers=1, dtype="float32"),
      **overrides,
  })


PRESETS = {"deepseek_v3_671b": deepseek_v3_671b, "small": small, "tiny": tiny}


def preset(name: str, **overrides) -> ModelConfig:
  if name not in PRESETS:
    raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[name](**overrides)
