"""Builds a model from a preset, prints its parameter counts and runs one jitted forward pass.

  python -m experiments.forward --preset=small --batch=4 --seq_len=256
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from absl import logging

from dsv3_jax import config
from dsv3_jax import model as model_lib
from dsv3_jax import param_count

_PRESET = flags.DEFINE_enum("preset", "small", sorted(config.PRESETS), "Model preset.")
_BATCH = flags.DEFINE_integer("batch", 4, "Sequences per batch.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
_SEED = flags.DEFINE_integer("seed", 0, "Initialisation and token seed.")


def main(argv):
  del argv
  logging.info("jax %s, %d process(es), %d device(s)", jax.__version__, jax.process_count(), jax.device_count())
  cfg = config.preset(_PRESET.value)
  counts = param_count.count(cfg)
  print(f"{_PRESET.value}: {counts.total:,} parameters ({counts.activated:,} activated per token), "
        f"MTP {counts.mtp:,}")
  variables = model_lib.init(cfg, jax.random.PRNGKey(_SEED.value))
  tokens = np.random.default_rng(_SEED.value).integers(0, cfg.vocab_size, (_BATCH.value, _SEQ_LEN.value))
  forward = jax.jit(lambda v, t: model_lib.Transformer(cfg).apply(v, t))
  start = time.perf_counter()
  out = jax.block_until_ready(forward(variables, tokens))
  compile_and_run = time.perf_counter() - start
  start = time.perf_counter()
  out = jax.block_until_ready(forward(variables, tokens))
  step = time.perf_counter() - start
  logp = jax.nn.log_softmax(out.logits[:, :-1])
  nll = -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))
  print(f"logits {out.logits.shape}, next-token loss at init {float(nll):.3f} "
        f"(ln vocab = {np.log(cfg.vocab_size):.3f})")
  print(f"forward: first call {compile_and_run:.2f}s (with compile), then {step * 1e3:.1f} ms "
        f"= {_BATCH.value * _SEQ_LEN.value / step:,.0f} tokens/s")


if __name__ == "__main__":
  app.run(main)
