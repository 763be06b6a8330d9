"""Parameter counts from the traced init against numerics §8 and Hugging Face's DeepseekV3ForCausalLM."""

import pytest

from dsv3_jax import config
from dsv3_jax import param_count


@pytest.fixture(scope="module")
def v3_shapes():
  return param_count.variable_shapes(config.deepseek_v3_671b())


def _hf_count(cfg: config.ModelConfig, device: str = "cpu") -> int:
  """HF's main-model size: parameters plus the e_score_correction_bias buffers (HF has no MTP module)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  with torch.device(device):
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**cfg.to_hf()))
  params = sum(p.numel() for p in model.parameters())
  return params + sum(b.numel() for name, b in model.named_buffers() if name.endswith("e_score_correction_bias"))


def test_671b_totals(v3_shapes):
  counts = param_count.count(config.deepseek_v3_671b(), v3_shapes)
  assert counts == param_count.ParamCount(
      total=671_026_419_200, activated=37_552_297_472, mtp=11_610_068_224, mtp_activated=688_100_608)


def test_671b_pieces(v3_shapes):
  assert param_count.pieces(config.deepseek_v3_671b(), v3_shapes) == {
      "embedding": 926_679_040,
      "head": 926_679_040,
      "attention": 187_107_328,
      "dense layer": 583_483_392,
      "moe layer": 11_507_286_272,
      "moe layer activated": 585_318_656,
      "expert": 44_040_192,
  }


def test_tiny_total_matches_hf():
  cfg = config.tiny()
  assert param_count.count(cfg).total == _hf_count(cfg)


def test_671b_total_matches_hf_on_meta_device():
  cfg = config.deepseek_v3_671b()
  assert _hf_count(cfg, device="meta") == param_count.count(cfg).total


def test_small_is_tens_of_millions():
  total = param_count.count(config.small()).total
  assert 10_000_000 <= total <= 99_999_999


def test_mtp_does_not_change_the_main_total():
  with_mtp, without = param_count.count(config.tiny()), param_count.count(config.tiny(n_mtp_layers=0))
  assert without.mtp == without.mtp_activated == 0
  assert (without.total, without.activated) == (with_mtp.total, with_mtp.activated)


def test_dense_model_activates_everything():
  counts = param_count.count(config.tiny(n_dense_layers=2, n_mtp_layers=0))
  assert counts.activated == counts.total
