"""ModelConfig: presets, validation errors that name the field, and HF config interop (numerics §1, §3.4, §10)."""

import copy

import pytest

from dsv3_jax import config
from dsv3_jax.config import ConfigError
from dsv3_jax.config import ModelConfig

# The DeepSeek-V3 hub config.json, written out from the numerics reference §1 table.
HUB_V3_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekV3Config",
        "AutoModel": "modeling_deepseek.DeepseekV3Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
    },
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}


def _hf_config_cls():
  return pytest.importorskip("transformers").DeepseekV3Config


def _hub(**changes) -> dict:
  out = copy.deepcopy(HUB_V3_CONFIG)
  out.update(changes)
  return out


@pytest.mark.parametrize("name", sorted(config.PRESETS))
def test_every_preset_validates(name):
  cfg = config.preset(name)
  assert isinstance(cfg, ModelConfig)
  assert cfg.replace() == cfg  # re-validates through __post_init__


def test_unknown_preset_is_refused():
  with pytest.raises(ConfigError, match="preset"):
    config.preset("deepseek_v4")


@pytest.mark.parametrize("changes, field", [
    (dict(n_routed_experts=6), "n_expert_groups"),  # 6 experts do not split into 4 groups
    (dict(n_activated_experts=9), "n_activated_experts"),  # more than the 8 routed experts
    (dict(n_limited_groups=5), "n_limited_groups"),  # more than the 4 groups
    (dict(n_routed_experts=4, n_activated_experts=1, n_limited_groups=1), "n_expert_groups"),  # 1 per group
    (dict(n_activated_experts=5), "n_activated_experts"),  # the 2 kept groups hold only 4 experts
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(dtype="float8"), "dtype"),
    (dict(param_dtype="int8"), "param_dtype"),
    (dict(n_dense_layers=3), "n_dense_layers"),  # tiny has 2 layers
    (dict(dim=-64), "dim"),
    (dict(n_heads=0), "n_heads"),
    (dict(moe_inter_dim=-1), "moe_inter_dim"),
    (dict(n_shared_experts=-1), "n_shared_experts"),
    (dict(q_lora_rank=-1), "q_lora_rank"),
    (dict(n_mtp_layers=-1), "n_mtp_layers"),
    (dict(vocab_size=1.5), "vocab_size"),
    (dict(score_func="relu"), "score_func"),
    (dict(rope_factor=0.5), "rope_factor"),
    (dict(beta_fast=0.5), "beta_fast"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps"),
])
def test_invalid_config_names_the_field(changes, field):
  with pytest.raises(ConfigError, match=rf"\b{field}\b"):
    config.tiny(**changes)


def test_divisibility_error_names_both_fields():
  with pytest.raises(ConfigError, match="n_routed_experts") as err:
    config.tiny(n_routed_experts=6)
  assert "n_expert_groups" in str(err.value)


def test_config_error_is_a_value_error():
  assert issubclass(ConfigError, ValueError)


def test_single_group_skips_the_group_checks():
  # Without group-limited routing there are no group scores, so any expert count works.
  cfg = config.tiny(n_routed_experts=3, n_expert_groups=1, n_limited_groups=1, n_activated_experts=3)
  assert cfg.experts_per_group == 3


def test_softmax_scale_671b():
  assert config.deepseek_v3_671b().softmax_scale == pytest.approx(0.1352337789, abs=1e-9)


def test_softmax_scale_tiny_matches_hf():
  assert config.tiny().softmax_scale == pytest.approx(0.38249888831204115, rel=1e-15)


def test_softmax_scale_without_yarn_is_plain():
  assert config.tiny(rope_factor=1.0).softmax_scale == pytest.approx(24**-0.5, rel=1e-15)


@pytest.mark.parametrize("name", sorted(config.PRESETS))
def test_to_hf_from_hf_round_trip(name):
  cfg = config.preset(name)
  assert ModelConfig.from_hf(cfg.to_hf()) == cfg


@pytest.mark.parametrize("name", sorted(config.PRESETS))
def test_round_trip_through_transformers(name):
  cfg = config.preset(name)
  assert ModelConfig.from_hf(_hf_config_cls()(**cfg.to_hf()).to_dict()) == cfg


@pytest.mark.parametrize("changes", [
    dict(rope_factor=1.0),
    dict(rope_theta=50000.0),
    dict(q_lora_rank=0),
    dict(score_func="softmax", n_mtp_layers=2, bos_token_id=5, eos_token_id=7),
    dict(rope_factor=4.0, original_seq_len=1024, max_seq_len=4096, beta_fast=16.0, beta_slow=2.0, mscale=0.707,
         mscale_all_dim=0.707),
])
def test_round_trip_through_transformers_variants(changes):
  cfg = config.tiny(**changes)
  assert ModelConfig.from_hf(_hf_config_cls()(**cfg.to_hf()).to_dict()) == cfg


def test_transformers_reads_to_hf_as_yarn_with_mscale():
  rope = _hf_config_cls()(**config.deepseek_v3_671b().to_hf()).rope_parameters
  assert rope["rope_type"] == "yarn"
  assert rope["factor"] == 40.0
  assert rope["original_max_position_embeddings"] == 4096
  assert rope["mscale"] == 1.0 and rope["mscale_all_dim"] == 1.0


def test_transformers_attention_scaling_matches_softmax_scale():
  pytest.importorskip("torch")
  from transformers import DeepseekV3ForCausalLM

  cfg = config.tiny()
  hf_model = DeepseekV3ForCausalLM(_hf_config_cls()(**cfg.to_hf()))
  assert hf_model.model.layers[0].self_attn.scaling == pytest.approx(cfg.softmax_scale, rel=1e-12)
  assert hf_model.model.rotary_emb.attention_scaling == 1.0  # mscale / mscale_all_dim = 1


def test_hub_config_maps_to_671b():
  assert ModelConfig.from_hf(HUB_V3_CONFIG) == config.deepseek_v3_671b()


def test_hub_config_through_transformers_maps_to_671b():
  hf = _hf_config_cls()(**HUB_V3_CONFIG).to_dict()
  assert ModelConfig.from_hf(hf) == config.deepseek_v3_671b()


def test_hub_dtype_is_read_and_can_be_overridden():
  assert ModelConfig.from_hf(_hub(torch_dtype="float32")).dtype == "float32"
  assert ModelConfig.from_hf(HUB_V3_CONFIG, dtype="float32") == config.deepseek_v3_671b(dtype="float32")


@pytest.mark.parametrize("missing", ["mscale", "mscale_all_dim"])
def test_rope_scaling_without_mscale_is_refused(missing):
  hub = _hub()
  del hub["rope_scaling"][missing]
  with pytest.raises(ConfigError, match=rf"'rope_scaling\.{missing}'"):
    ModelConfig.from_hf(hub)


def test_rope_parameters_without_mscale_is_refused():
  rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096}
  with pytest.raises(ConfigError, match=r"'rope_scaling\.mscale'"):
    ModelConfig.from_hf(_hub(rope_scaling=None, rope_parameters=rope))


@pytest.mark.parametrize("rope", [None, {"type": "default"}, {"rope_type": "default", "rope_theta": 10000.0}])
def test_default_rope_type_means_no_yarn(rope):
  cfg = ModelConfig.from_hf(_hub(rope_scaling=rope))
  assert cfg.rope_factor == 1.0
  assert cfg.softmax_scale == pytest.approx(192**-0.5, rel=1e-15)


def test_unknown_rope_type_is_refused():
  with pytest.raises(ConfigError, match=r"rope_scaling\.type"):
    ModelConfig.from_hf(_hub(rope_scaling={"type": "linear", "factor": 2.0}))


@pytest.mark.parametrize("key, value", [
    ("tie_word_embeddings", True),
    ("topk_method", "greedy"),
    ("topk_method", "group_limited_greedy"),
    ("hidden_act", "gelu"),
    ("rope_interleave", False),
    ("norm_topk_prob", False),
])
def test_unsupported_hf_settings_are_refused(key, value):
  with pytest.raises(ConfigError, match=key):
    ModelConfig.from_hf(_hub(**{key: value}))


def test_hf_q_lora_rank_none_means_direct_query():
  assert ModelConfig.from_hf(_hub(q_lora_rank=None)).q_lora_rank == 0

