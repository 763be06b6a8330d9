"""Decode benchmark: ours against transformers' `generate`, on the same model, batch and machine.

  python -m experiments.bench_decode --checkpoint=workdir/small_cpu --config=configs/small_cpu.py

For each batch size, every prompt is `--prompt_len` bytes of held-out text and every sequence gets
exactly `--new_tokens` greedy tokens (no stop token), fp32. Figures are medians of `--repeats` timed
runs after a warm-up (compilation excluded), with min and max:
- prefill tokens/s: prompt tokens over the time to fill the cache and sample the first token;
- decode tokens/s: the remaining new tokens over the rest of the time;
- ours plain and speculative (MTP drafts, with the acceptance rate), transformers `generate`
  (`DynamicCache`, eager attention) and, where it runs, transformers' own MTP generation;
- latent-cache bytes per token, ours against what transformers' cache holds;
- with --fp8_weights, ours again with the FP8-eligible weights kept in FP8 (dsv3_jax/fp8_weights.py: block-
  quantized from the checkpoint, GEMMs through the FP8 path), with the variables' bytes either way.
Without --checkpoint the model is randomly initialised and the speculative figures mean little.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time

import jax
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from dsv3_jax import config as config_lib
from dsv3_jax import convert
from dsv3_jax import data
from dsv3_jax import fp8_weights
from dsv3_jax import generate
from dsv3_jax import hf_checkpoint
from dsv3_jax import keep_freed
from dsv3_jax import model as model_lib
from dsv3_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/small_cpu.py", "Run config of the model.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir to load; random weights without it.")
_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes to measure.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens per sequence.")
_NEW = flags.DEFINE_integer("new_tokens", 128, "Generated tokens per sequence.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions per figure.")
_HF = flags.DEFINE_bool("hf", True, "Also time transformers.")
_JSON = flags.DEFINE_string("json_out", None, "Write the figures here as JSON.")
_FP8_WEIGHTS = flags.DEFINE_bool("fp8_weights", True, "Also time ours with FP8-stored weights (plain decode).")


def _timed(fn, repeats: int) -> list[float]:
  fn()  # warm-up: compilation, allocator
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def _rate(tokens: int, times: list[float]) -> dict:
  """tokens/s: the median run's, and the range (the fastest run gives the max rate)."""
  return {k: tokens / v for k, v in (("median", statistics.median(times)), ("min", max(times)),
                                     ("max", min(times)))}


def ours(variables, cfg, prompts: np.ndarray, new_tokens: int, speculative: bool, repeats: int) -> dict:
  """Prefill and decode timed separately in every repetition (each phase blocked on)."""
  request = generate.prepare(cfg, prompts.tolist(), new_tokens, speculative=speculative)
  rng = jax.random.PRNGKey(0)
  prefill_s, decode_s, results = [], [], []
  for _ in range(repeats + 1):  # the first is the warm-up
    start = time.perf_counter()
    state = jax.block_until_ready(generate.start(variables, request, rng))
    middle = time.perf_counter()
    state = jax.block_until_ready(generate.decode_to_end(variables, state, **request.kwargs))
    prefill_s.append(middle - start)
    decode_s.append(time.perf_counter() - middle)
    results.append(generate.collect(state, request))
  prefill_s, decode_s = prefill_s[1:], decode_s[1:]
  batch = len(prompts)
  out = {"prefill_tokens_per_s": _rate(prompts.size, prefill_s),
         "decode_tokens_per_s": _rate(batch * (new_tokens - 1), decode_s),
         "tokens": results[-1].tokens}
  if speculative:
    out["acceptance"] = results[-1].acceptance
    out["decode_steps"] = results[-1].steps
  return out


def _hf_model(variables, cfg, hf_dir: str | None = None):
  import torch
  import transformers

  if hf_dir is not None:
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    # transformers' MtpModel finds the MTP layer through this pattern, which names layer 61 (the
    # 671B model's); point it at this model's MTP layer, layer n_layers.
    model._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{cfg.n_layers}\..*"]
    return model
  hf_config = transformers.DeepseekV3Config(**cfg.to_hf(), attn_implementation="eager")
  model = transformers.DeepseekV3ForCausalLM(hf_config).float().eval()
  state = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in
           convert.params_to_hf(variables, cfg, fused_experts=True).items() if not _is_mtp(k, cfg)}
  model.load_state_dict(state, strict=True)
  return model


def _is_mtp(name: str, cfg) -> bool:
  index = convert.hf_layer_index(name)
  return index is not None and index >= cfg.n_layers


def theirs(hf_model, prompts: np.ndarray, new_tokens: int, repeats: int, **generate_kwargs) -> dict:
  import torch

  ids = torch.as_tensor(prompts, dtype=torch.long)
  mask = torch.ones_like(ids)
  config = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, attention_mask=mask,
                pad_token_id=0, eos_token_id=None, **generate_kwargs)
  with torch.inference_mode():
    prefill_s = _timed(lambda: hf_model(ids, attention_mask=mask, use_cache=True), repeats)
    outputs = []
    total_s = _timed(lambda: outputs.append(hf_model.generate(ids, return_dict_in_generate=True, **config)), repeats)
  decode_s = [t - statistics.median(prefill_s) for t in total_s]  # generate() does not time its phases
  out = outputs[-1]
  cache_bytes = sum(t.numel() * t.element_size() for t in _tensors(out.past_key_values))
  cached_tokens = out.sequences.shape[1] - 1  # the last token is never fed back
  return {"prefill_tokens_per_s": _rate(prompts.size, prefill_s),
          "decode_tokens_per_s": _rate(len(prompts) * (new_tokens - 1), decode_s),
          "tokens": out.sequences[:, prompts.shape[1]:].numpy().tolist(),
          "cache_bytes_per_token": cache_bytes / (len(prompts) * cached_tokens)}


def _tensors(obj):
  """Every tensor inside a transformers cache object (layers of key/value-like tensors)."""
  import torch

  if isinstance(obj, torch.Tensor):
    yield obj
  elif isinstance(obj, (list, tuple)):
    for item in obj:
      yield from _tensors(item)
  elif isinstance(obj, dict):
    for item in obj.values():
      yield from _tensors(item)
  elif hasattr(obj, "__dict__"):
    for item in vars(obj).values():
      yield from _tensors(item)


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
  """Share of sequences whose greedy continuations are identical."""
  return float(np.mean([x == y for x, y in zip(a, b, strict=True)]))


def _prompts(config, tokenizer, batch: int, length: int) -> np.ndarray:
  docs = data.documents(config.data.source, "heldout", config.data.heldout_fraction, max_bytes=4_000_000)
  texts = [d for d in docs if len(d) >= 4 * length]
  if len(texts) < batch:
    raise app.UsageError(f"the held-out split has {len(texts)} documents of >= {4 * length} bytes; need {batch}")
  return np.array([tokenizer.encode(t)[:length] for t in texts[:batch]], np.int32)


def _fmt(rate: dict) -> str:
  return f"{rate['median']:10.1f} [{rate['min']:.1f}, {rate['max']:.1f}]"


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as tmp_dir:
    run(tmp_dir)


def run(tmp_dir: str) -> None:
  config = _CONFIG.value
  tokenizer = data.load_tokenizer(None if config.data.tokenizer == "bytes" else config.data.tokenizer)
  cfg = train.model_config(config, tokenizer.vocab_size)
  if _CHECKPOINT.value:
    variables = generate.restore_variables(_CHECKPOINT.value, cfg)
  else:
    print("no --checkpoint: random weights (speculative acceptance is meaningless)")
    variables = model_lib.init(cfg, jax.random.PRNGKey(0))
  report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "jax": jax.__version__,
            "backend": jax.default_backend(), "model": cfg.to_hf(), "prompt_len": _PROMPT_LEN.value,
            "new_tokens": _NEW.value, "repeats": _REPEATS.value, "checkpoint": _CHECKPOINT.value, "runs": []}
  report["cache_bytes_per_token"] = {"ours": generate.cache_bytes_per_token(cfg),
                                     "ours_with_mtp": generate.cache_bytes_per_token(cfg, with_mtp=True),
                                     "deepseek_v3_671b_bf16": generate.cache_bytes_per_token(
                                         config_lib.deepseek_v3_671b(), "bfloat16")}
  if _FP8_WEIGHTS.value:
    fp8_variables = fp8_weights.store(variables)
    fp8_cfg = dataclasses.replace(cfg, precision="fp8")
    report["variable_bytes"] = {"ours": fp8_weights.nbytes(variables), "fp8_weights": fp8_weights.nbytes(fp8_variables)}
  hf_model = hf_mtp_model = None
  if _HF.value:
    import torch
    import transformers

    report["torch"], report["transformers"] = torch.__version__, transformers.__version__
    torch.set_num_threads(os.cpu_count())
    hf_model = _hf_model(variables, cfg)
    try:  # transformers' MTP generation reads the MTP layer from the checkpoint directory itself
      hf_checkpoint.save(variables, cfg, os.path.join(tmp_dir, "hf"), dtype="float32")
      hf_mtp_model = _hf_model(variables, cfg, os.path.join(tmp_dir, "hf"))
    except Exception as e:  # noqa: BLE001 - reported, the rest of the benchmark still runs
      report["hf_mtp_error"] = f"loading: {type(e).__name__}: {e}"
  for batch in (int(b) for b in _BATCHES.value):
    prompts = _prompts(config, tokenizer, batch, _PROMPT_LEN.value)
    row = {"batch": batch}
    for name, speculative in (("ours", False), ("ours_speculative", True)):
      row[name] = ours(variables, cfg, prompts, _NEW.value, speculative, _REPEATS.value)
    if _FP8_WEIGHTS.value:
      row["ours_fp8_weights"] = ours(fp8_variables, fp8_cfg, prompts, _NEW.value, False, _REPEATS.value)
      row["fp8_weights_greedy_agreement"] = _agreement(row["ours"]["tokens"], row["ours_fp8_weights"]["tokens"])
      row["fp8_weights_decode_ratio"] = (row["ours_fp8_weights"]["decode_tokens_per_s"]["median"]
                                         / row["ours"]["decode_tokens_per_s"]["median"])
    if hf_model is not None:
      row["transformers"] = theirs(hf_model, prompts, _NEW.value, _REPEATS.value)
      row["greedy_agreement_with_transformers"] = _agreement(row["ours"]["tokens"], row["transformers"]["tokens"])
      row["decode_ratio_vs_transformers"] = (row["ours"]["decode_tokens_per_s"]["median"]
                                             / row["transformers"]["decode_tokens_per_s"]["median"])
      row["prefill_ratio_vs_transformers"] = (row["ours"]["prefill_tokens_per_s"]["median"]
                                              / row["transformers"]["prefill_tokens_per_s"]["median"])
      if hf_mtp_model is not None and batch == 1:
        try:
          row["transformers_mtp"] = theirs(hf_mtp_model, prompts, _NEW.value, _REPEATS.value, use_mtp=True)
          row["greedy_agreement_with_transformers_mtp"] = _agreement(row["ours"]["tokens"],
                                                                     row["transformers_mtp"]["tokens"])
        except Exception as e:  # noqa: BLE001
          row["transformers_mtp"] = {"error": f"{type(e).__name__}: {e}"}
    row["speculative_speedup"] = (row["ours_speculative"]["decode_tokens_per_s"]["median"]
                                  / row["ours"]["decode_tokens_per_s"]["median"])
    row["speculative_equals_plain"] = row["ours_speculative"]["tokens"] == row["ours"]["tokens"]
    report["runs"].append(row)
    _print_row(row)
  print(f"cache bytes per token: {report['cache_bytes_per_token']}")
  if "variable_bytes" in report:
    print(f"variables' bytes: {report['variable_bytes']}")
  if "transformers" in report["runs"][0]:
    print(f"transformers' cache bytes per token: {report['runs'][0]['transformers']['cache_bytes_per_token']:.0f}")
  if _JSON.value:
    for row in report["runs"]:
      for entry in row.values():
        if isinstance(entry, dict):
          entry.pop("tokens", None)
    with open(_JSON.value, "w") as f:
      json.dump(report, f, indent=2)
    print(f"wrote {_JSON.value}")


def _print_row(row: dict) -> None:
  print(f"\nbatch {row['batch']}: tokens/s, median [min, max]")
  print(f"{'':24s} {'prefill':>30s} {'decode':>30s}")
  for name in ("ours", "ours_speculative", "ours_fp8_weights", "transformers", "transformers_mtp"):
    entry = row.get(name)
    if entry is None:
      continue
    if "error" in entry:
      print(f"{name:24s} did not run: {entry['error']}")
      continue
    extra = f"  acceptance {entry['acceptance']:.1%}" if "acceptance" in entry else ""
    print(f"{name:24s} {_fmt(entry['prefill_tokens_per_s']):>30s} {_fmt(entry['decode_tokens_per_s']):>30s}{extra}")
  if "decode_ratio_vs_transformers" in row:
    print(f"ours / transformers: decode {row['decode_ratio_vs_transformers']:.2f}x, "
          f"prefill {row['prefill_ratio_vs_transformers']:.2f}x; identical greedy output for "
          f"{row['greedy_agreement_with_transformers']:.0%} of sequences")
  if "greedy_agreement_with_transformers_mtp" in row:
    print(f"transformers' MTP generation: identical greedy output for "
          f"{row['greedy_agreement_with_transformers_mtp']:.0%} of sequences")
  print(f"speculative / plain decode: {row['speculative_speedup']:.2f}x; identical output: "
        f"{row['speculative_equals_plain']}")
  if "fp8_weights_decode_ratio" in row:
    print(f"FP8 weights / fp32 weights decode: {row['fp8_weights_decode_ratio']:.2f}x; identical greedy output for "
          f"{row['fp8_weights_greedy_agreement']:.0%} of sequences")


if __name__ == "__main__":
  keep_freed.restart_with_fast_malloc()  # glibc on huge pages, large freed blocks kept mapped (DSV3_RESTART=0: not)
  app.run(main)
