"""DeepSeek-V3's pre-training recipe (paper §4.2) on the 671B architecture, as far as a config says it.

  python -m experiments.train --config=configs/deepseek_v3_671b.py --workdir=gs://... \
      --config.data.source=/path/to/corpus --config.data.tokenizer=/path/to/tokenizer.json

Runtime: the paper's run took 2.664M H800 GPU-hours for 14.8T tokens; this repository cannot run it
yet: its mesh needs the pipeline (mesh.pipe = 16), and FP8 training is still to come. Expected result:
the paper's. Per-device memory of this config on its mesh: `python -m experiments.plan
--config=configs/deepseek_v3_671b.py` (docs/SHARDING.md).

Token-based boundaries assume 4096-token sequences and 15360 sequences per step after the
batch-size warm-up (62.9M tokens/step): 10T tokens is step ~159,000, 4.3T more is ~68,400 steps.
"""

from configs import base
from dsv3_jax import config as model_config


def get_config():
  c = base.get_config()
  c.model = base.model_section(model_config.deepseek_v3_671b())
  c.data.tokenizer = "tokenizer.json"  # DeepSeek-V3's tokenizer (vocab 128K)
  c.data.seq_len = 4096
  c.data.batch_size = 3072  # sequences per micro-batch: the warm-up batch; 5 micro-batches make 15360
  c.optimizer.lr = 2.2e-4
  c.optimizer.warmup_steps = 2000
  c.optimizer.decay_start_step = 159_000  # 10T tokens
  c.optimizer.decay_steps = 68_400  # 4.3T tokens
  c.optimizer.decay_end_lr = 2.2e-5
  c.optimizer.tail_start_step = 232_700  # after a further 333B tokens at 2.2e-5
  c.optimizer.tail_lr = 7.3e-6  # the last 167B tokens
  c.optimizer.bf16_moments = True
  c.loss.mtp_lambda = 0.3
  c.loss.mtp_lambda_late = 0.1
  c.loss.mtp_switch_tokens = 10_000_000_000_000
  c.loss.balance_alpha = 1e-4
  c.balance.gamma = 1e-3
  c.balance.stop_after_tokens = 14_300_000_000_000
  c.train.steps = 235_300  # 14.8T tokens
  c.train.microbatches = 5
  c.train.warmup_microbatches = 1
  c.train.batch_warmup_tokens = 469_000_000_000
  c.train.remat = "full"
  c.mesh.pipe = 16  # the paper's 2048 H800s: PP16 x EP64 x DP2 with ZeRO-1; training needs the pipeline first
  c.mesh.data = 2  # with the expert axis, 128-way data parallelism for everything but the routed experts
  c.mesh.expert = 64  # 4 of the 256 routed experts per device
  c.mesh.zero1 = True  # optimizer state split over the batch axes (the paper's ZeRO-1 data parallelism)
  c.sample.max_new_tokens = 0  # no sampling: it would need a replicated copy of the model on one device
  c.train.checkpoint_every = 1000
  c.train.eval_every = 1000
  return c
