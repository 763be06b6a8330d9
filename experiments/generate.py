"""Generates text from a trained or converted checkpoint, streaming the tokens of a single prompt.

  python -m experiments.generate --checkpoint=workdir/small_cpu --config=configs/small_cpu.py --prompt='def '
  python -m experiments.generate --checkpoint=/path/converted --tokenizer=/path/tokenizer.json \
      --prompts_file=prompts.jsonl --temperature=0.7 --top_p=0.9 --speculative

--checkpoint is a training workdir (its newest checkpoint), one step directory of it, or a directory
written by experiments.convert_hf. The model config comes from --config (a run config file, which also
names the tokenizer) or from the checkpoint's config.json. A prompts file holds one prompt per line, or
one JSON string (or {"prompt": ...}) per line when it ends in .jsonl. With --speculative the MTP module
drafts a token per step (greedy output is identical, only faster); the acceptance rate is reported.
With --fp8_weights the blocks' Linears and routed experts keep their weights in FP8 (dsv3_jax/fp8_weights.py)
and run through the FP8 GEMM: a checkpoint converted with `experiments.convert_hf --dtype=fp8` supplies its
stored e4m3 bytes and scales; any other is block-quantized (128x128) after loading.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
from absl import app
from absl import flags
from ml_collections import config_flags

from dsv3_jax import config as config_lib
from dsv3_jax import data
from dsv3_jax import fp8_weights
from dsv3_jax import generate
from dsv3_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file the checkpoint was trained with.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir, step directory or converted checkpoint.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "'bytes' or a tokenizer.json; default: the run config's.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt; repeat for a batch.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "One prompt per line (.jsonl: one JSON string per line).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 200, "Tokens generated per prompt at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens; 0 for all.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Sample from the smallest set of tokens holding this probability.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_SPECULATIVE = flags.DEFINE_bool("speculative", False, "Draft with the MTP module, verify with the main model.")
_STOP = flags.DEFINE_multi_string("stop", [], "A stop token, as text that encodes to exactly one token.")
_FP8_WEIGHTS = flags.DEFINE_bool("fp8_weights", False, "Keep the FP8-eligible weights in FP8 and run their GEMMs "
                                 "in FP8 (the stored bytes of a --dtype=fp8 conversion, else quantized on load).")


def read_prompts(prompts: list[str], path: str | None) -> list[str]:
  out = list(prompts)
  if path:
    with open(path, encoding="utf-8") as f:
      for number, line in enumerate(f, start=1):
        line = line.rstrip("\n")
        if not line.strip():
          continue
        if not path.endswith(".jsonl"):
          out.append(line)
          continue
        try:
          item = json.loads(line)
        except json.JSONDecodeError as e:
          raise app.UsageError(f"{path}:{number}: not JSON ({e})") from e
        item = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(item, str):
          raise app.UsageError(f"{path}:{number}: expected a string or {{\"prompt\": string}}")
        out.append(item)
  if not out:
    raise app.UsageError("give --prompt or --prompts_file")
  return out


def model_and_tokenizer(checkpoint: str, run_config, tokenizer_flag: str | None):
  """(ModelConfig, tokenizer) from the run config, or from a converted checkpoint's config.json."""
  if run_config is not None:
    d = run_config.data
    tokenizer = data.load_tokenizer(tokenizer_flag or (None if d.tokenizer == "bytes" else d.tokenizer),
                                    d.eos_token or None)
    return train.model_config(run_config, tokenizer.vocab_size), tokenizer
  config_json = os.path.join(checkpoint, "config.json")
  if not os.path.isfile(config_json):
    raise app.UsageError(f"{checkpoint} has no config.json: pass the run config the model was trained with (--config)")
  with open(config_json) as f:
    cfg = config_lib.ModelConfig.from_hf(json.load(f))
  tokenizer = data.load_tokenizer(tokenizer_flag or "bytes")
  if tokenizer.vocab_size > cfg.vocab_size:
    raise app.UsageError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model only {cfg.vocab_size}")
  return cfg, tokenizer


def fp8_variables(checkpoint: str, variables: dict, cfg: config_lib.ModelConfig):
  """(variables with FP8-stored kernels, cfg with the fp8 recipe): a keep-mode conversion's bytes, else quantized."""
  before = fp8_weights.nbytes(variables)
  stored = generate.restore_fp8_weights(checkpoint)
  if stored is not None:
    variables, source = fp8_weights.from_hf(variables, stored), "stored in"
  else:
    variables, source = fp8_weights.store(variables), "quantized from"
  print(f"[FP8 weights {source} {checkpoint}: variables {before / 2**20:.1f} MiB -> "
        f"{fp8_weights.nbytes(variables) / 2**20:.1f} MiB]", file=sys.stderr)
  return variables, dataclasses.replace(cfg, precision="fp8")


def stop_ids(tokenizer, stops: list[str]) -> list[int]:
  ids = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
  for s in stops:
    encoded = tokenizer.encode(s)
    if len(encoded) != 1:
      raise app.UsageError(f"--stop={s!r} encodes to {len(encoded)} tokens {encoded}; a stop must be one token")
    ids.extend(encoded)
  return ids


class _Printer:
  """Writes a stream of token ids as text, holding back an incomplete UTF-8 character."""

  def __init__(self, tokenizer):
    self.tokenizer, self.ids, self.printed = tokenizer, [], 0

  def add(self, ids: list[int], final: bool = False) -> None:
    self.ids.extend(ids)
    text = self.tokenizer.decode(self.ids)
    end = len(text) if final or not text.endswith("\ufffd") else len(text) - 1
    sys.stdout.write(text[self.printed:end])
    sys.stdout.flush()
    self.printed = max(self.printed, end)


def main(argv):
  del argv
  try:
    run()
  except (generate.CheckpointMismatch, FileNotFoundError, ValueError) as e:  # bad input: the message says it all
    sys.exit(f"error: {e}")


def run():
  if not _CHECKPOINT.value:
    raise app.UsageError("--checkpoint is required")
  cfg, tokenizer = model_and_tokenizer(_CHECKPOINT.value, _CONFIG.value, _TOKENIZER.value)
  prompts = read_prompts(_PROMPT.value, _PROMPTS_FILE.value)
  variables = generate.restore_variables(_CHECKPOINT.value, cfg)
  if _FP8_WEIGHTS.value:
    variables, cfg = fp8_variables(_CHECKPOINT.value, variables, cfg)
  encoded = [tokenizer.encode(p) for p in prompts]
  kw = dict(temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
            stop_ids=stop_ids(tokenizer, _STOP.value), speculative=_SPECULATIVE.value)
  rng = jax.random.PRNGKey(_SEED.value)
  start = time.perf_counter()
  if len(prompts) == 1:
    printer = _Printer(tokenizer)
    sys.stdout.write(prompts[0])
    n_tokens = 0
    for chunk in generate.stream(variables, cfg, encoded, _MAX_NEW.value, rng, **kw):
      printer.add(chunk[0])
      n_tokens += len(chunk[0])
    printer.add([], final=True)
    sys.stdout.write("\n")
    print(f"[{n_tokens} tokens in {time.perf_counter() - start:.2f} s, compilation included]", file=sys.stderr)
    return
  result = generate.generate(variables, cfg, encoded, _MAX_NEW.value, rng, details=True, **kw)
  elapsed = time.perf_counter() - start
  for prompt, tokens in zip(prompts, result.tokens, strict=True):
    print(f"--- {prompt!r}\n{prompt}{tokenizer.decode(tokens)}")
  n_tokens = sum(len(t) for t in result.tokens)
  line = (f"[{len(prompts)} prompts, {n_tokens} tokens, {result.steps} decode steps in {elapsed:.2f} s, "
          "compilation included")
  if _SPECULATIVE.value:
    line += f"; drafts accepted {result.accepted}/{result.drafted} = {result.acceptance:.1%}"
  print(line + "]", file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
