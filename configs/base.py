"""Every key a training run reads, with its meaning; the other config files change values only.

Not a runnable recipe by itself: use tiny_cpu.py, small_cpu.py or deepseek_v3_671b.py.
"""

import dataclasses

import ml_collections

from dsv3_jax import config as model_config

# ModelConfig fields that the `precision` section sets instead (train.model_config puts them in).
PRECISION_FIELDS = ("precision", "fp8_impl")


def model_section(cfg: model_config.ModelConfig) -> ml_collections.ConfigDict:
  """The ModelConfig fields, each overridable as --config.model.<field>=... (see dsv3_jax/config.py)."""
  fields = dataclasses.asdict(cfg)
  for name in PRECISION_FIELDS:
    fields.pop(name)
  return ml_collections.ConfigDict(fields)


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # parameter init, data order and sampling all derive from it
  c.model = model_section(model_config.small(vocab_size=257))  # architecture; vocab must cover the tokenizer

  c.precision = ml_collections.ConfigDict()  # FP8 training (paper §3.3; docs/FP8.md)
  c.precision.recipe = "bf16"  # bf16: every matmul in model.dtype; fp8: the blocks' Linears in block-scaled FP8
  c.precision.impl = "auto"  # FP8 GEMM implementation (dsv3_jax/ops.py): auto (pallas on GPU, else xla) | xla | pallas

  c.data = ml_collections.ConfigDict()
  c.data.source = "stdlib"  # "stdlib" (this Python's own library sources) or a .txt/.md/.py/.jsonl file or directory
  c.data.tokenizer = "bytes"  # "bytes" (257 ids: bytes + EOS) or the path of a HF tokenizer.json
  c.data.eos_token = ""  # EOS token of a tokenizer.json ("" tries the common names)
  c.data.seq_len = 256  # tokens per training sequence
  c.data.batch_size = 16  # sequences per micro-batch (one forward/backward) over all devices; the mesh splits it
  c.data.heldout_fraction = 0.05  # share of documents (by file) held out for evaluation
  c.data.max_bytes = 0  # cap on the text read per split, 0 for all of it
  c.data.cross_document_loss = True  # False masks targets that start a new document
  c.data.attend_across_documents = True  # False keeps packed documents from attending to each other

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 2.2e-4  # peak learning rate (paper §4.2)
  c.optimizer.warmup_steps = 2000  # linear warmup from 0
  c.optimizer.decay_start_step = 100_000  # end of the constant phase, start of the cosine decay
  c.optimizer.decay_steps = 100_000  # length of the cosine decay
  c.optimizer.decay_end_lr = 2.2e-5  # learning rate at the end of the cosine decay
  c.optimizer.tail_start_step = 200_000  # start of the last constant phase
  c.optimizer.tail_lr = 7.3e-6  # learning rate of the last constant phase
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.1  # decoupled; norms are spared, the routing bias is not a parameter
  c.optimizer.grad_clip = 1.0  # global-norm clipping
  c.optimizer.bf16_moments = False  # store both AdamW moments in bf16 (paper §3.3)

  c.loss = ml_collections.ConfigDict()
  c.loss.mtp_lambda = 0.3  # MTP loss weight until mtp_switch_tokens (paper: first 10T tokens)
  c.loss.mtp_lambda_late = 0.1  # MTP loss weight afterwards
  c.loss.mtp_switch_tokens = 0  # tokens after which mtp_lambda_late applies; 0 never switches
  c.loss.balance_alpha = 1e-4  # weight of the sequence-wise balance loss (paper: 1e-4)

  c.balance = ml_collections.ConfigDict()
  c.balance.gamma = 1e-3  # bias update speed of aux-loss-free balancing (paper: 1e-3); 0 turns it off
  c.balance.stop_after_tokens = 0  # tokens after which gamma becomes 0 (paper: 14.3T); 0 never stops

  c.mesh = ml_collections.ConfigDict()  # device mesh (dsv3_jax/sharding.py); the axes must multiply to the devices
  c.mesh.pipe = 1  # pipeline ranks (the `pipeline` section says how they run); never splits the batch
  c.mesh.data = -1  # data parallelism (parameters replicated); -1: every device the other axes leave
  c.mesh.fsdp = 1  # fully sharded data parallelism: batch split, parameters sharded on their embed axis
  c.mesh.expert = 1  # expert parallelism: routed experts split; a batch axis for everything else
  c.mesh.tensor = 1  # tensor parallelism: heads, MLP hidden and vocabulary split
  c.mesh.zero1 = False  # ZeRO-1: optimizer state also split over the batch axes its parameter is replicated on

  c.pipeline = ml_collections.ConfigDict()  # pipeline parallelism over mesh.pipe (docs/PIPELINE.md)
  c.pipeline.schedule = "dualpipev"  # 1f1b | zb1p | dualpipe | dualpipev; used when mesh.pipe > 1
  c.pipeline.microbatches = 8  # micro-batches per step when mesh.pipe > 1 (replaces train.microbatches)

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000  # optimizer steps
  c.train.microbatches = 1  # micro-batches accumulated per step at full batch size
  c.train.warmup_microbatches = 0  # micro-batches per step at the start of batch-size warm-up; 0 for none
  c.train.batch_warmup_tokens = 0  # tokens over which micro-batches ramp to train.microbatches
  c.train.remat = "none"  # rematerialisation per layer: none | full | dots
  # Routed experts' GEMMs (dsv3_jax/ops.py): auto (the native BLAS call on CPU in fp32, else xla) | xla | native |
  # ragged_dot.
  c.train.impl = "auto"
  # Causal attention (dsv3_jax/mla.py): auto (the native CPU kernel in fp32, dsv3_jax/cpu_attention.py, else xla) |
  # xla | native.
  c.train.attention_impl = "auto"
  # The AdamW update (dsv3_jax/optimizer.py): auto (one native pass per parameter on CPU in fp32, csrc/adamw.cc,
  # else xla) | xla | native.
  c.train.optimizer_impl = "auto"
  c.train.log_every = 10  # steps between console/metrics lines
  c.train.eval_every = 100  # steps between held-out evaluations; 0 for the end only
  c.train.eval_batches = 4  # held-out micro-batches per evaluation
  c.train.checkpoint_every = 100  # steps between checkpoints; 0 for none
  c.train.keep_checkpoints = 2  # newest checkpoints kept
  c.train.max_nonfinite_steps = 5  # consecutive skipped (non-finite) steps before the run aborts
  c.train.plot = True  # write PNG plots into <workdir>/plots at the end

  c.sample = ml_collections.ConfigDict()
  c.sample.prompts = ("def ", "import os\n", "class ")  # prompts sampled after training
  c.sample.max_new_tokens = 160  # tokens generated per prompt
  c.sample.temperature = 0.8  # temperature of the sampled lines (greedy lines are printed too)
  c.sample.top_k = 0  # 0 samples from the whole vocabulary
  return c
