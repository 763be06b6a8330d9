"""The tiny test model on a slice of the standard library: a smoke run and the resume tests.

  python -m experiments.train --config=configs/tiny_cpu.py --workdir=/tmp/tiny

Runtime: about a minute on a 2-core CPU. Expected: the loss falls from ln(257) = 5.55 to below the
corpus' unigram entropy within the 200 steps; samples are not yet readable.
"""

from configs import base
from dsv3_jax import config as model_config


def get_config():
  c = base.get_config()
  c.model = base.model_section(model_config.tiny(vocab_size=257))
  c.data.seq_len = 64
  c.data.batch_size = 8
  c.data.max_bytes = 1_000_000
  c.optimizer.lr = 3e-3
  c.optimizer.warmup_steps = 20
  c.optimizer.decay_start_step = 100
  c.optimizer.decay_steps = 100
  c.optimizer.decay_end_lr = 3e-4
  c.optimizer.tail_start_step = 200
  c.optimizer.tail_lr = 3e-4
  c.train.steps = 200
  c.train.log_every = 10
  c.train.eval_every = 100
  c.train.eval_batches = 2
  c.train.checkpoint_every = 50
  c.sample.max_new_tokens = 48
  return c
