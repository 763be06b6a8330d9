"""The benchmark suite: our training step beside transformers' (eager and torch.compile) on the same machine.

  make bench                                    # everything; about 5-6 minutes on a 2-core CPU
  python -m experiments.bench --quick           # two points per sweep, 2 repetitions, no decode
  python -m experiments.bench --sections=peak,train --repetitions=3
  python -m experiments.bench --sections=train --profile_dir=/tmp/prof    # also profiles our step

What runs, in one process unless said otherwise (fp32 throughout). Our step runs as the main job runs it: on
the run config's mesh over this process's devices, which --cpu_devices (default auto, as in experiments.train)
makes one per core the batch divides; transformers uses all cores as intra-op threads. It runs with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 and LD_PRELOAD="$(python -m dsv3_jax.keep_freed)" in the environment
(glibc's heap on huge pages, large freed blocks kept mapped: `make bench` sets both, and a process started
without them restarts itself with them unless DSV3_RESTART=0; dsv3_jax/host.py, dsv3_jax/keep_freed.py), which the
report records and which apply to both sides and to the child processes:
- peak: a large square fp32 matmul in jax and in torch; the faster median is the machine's peak.
- train: one optimizer step (forward + backward + clip + AdamW) of the run config's model (default
  configs/small_cpu.py: the small preset, vocab 257, 16 x 128 tokens), MTP off on both sides, on the
  same random tokens and the same weights: ours (`train.train_step`, jitted, state donated) against
  `DeepseekV3ForCausalLM` eager and under `torch.compile` (torch.optim.AdamW, fused). The three are
  timed round-robin so that a load change hits them alike, each after --settle_steps untimed steps of its
  own in every repetition (the first step after the other framework ran is slow). Ours is also timed with
  MTP on (the main job's setting), and its share of the matmul peak is computed from
  `metrics.model_flops_per_token`.
- floor: the same step's GEMMs alone (`experiments/gemm_floor.py`): every matrix product of one device's
  forward + backward on OpenBLAS (the native kernels' blocked GEMM and numpy's matmul, the faster kept), one thread
  per device, all at once; the time no amount of work on the rest of the step can go under with these kernels.
- seq: our step at each --seq_lens with --seq_tokens tokens per step (batch = tokens / length), each
  point in its own process so that its peak RSS is its own.
- experts: our step with --expert_counts routed experts at the config's top-k, with the optimizer
  update alone timed beside it (that part follows the parameter count, not the routing).
- moe: `experiments.bench_moe` (the MoE layer alone) in a child process, at this model's sizes.
- decode: `experiments.bench_decode` (ours against transformers' `generate`) in a child process.
Figures are the median of --repetitions timed repetitions after compilation and --warmup_steps steps,
with min and max. Results go to --json_path and, between its bench markers (bench_report.MARK_BEGIN, MARK_END), into
--markdown_path; --from_json re-renders that section from a saved report without measuring.
"""

from __future__ import annotations

import copy
import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from dsv3_jax import config as config_lib
from dsv3_jax import convert
from dsv3_jax import host
from dsv3_jax import keep_freed
from dsv3_jax import metrics
from dsv3_jax import optimizer
from dsv3_jax import param_count
from dsv3_jax import sharding
from dsv3_jax import train
from experiments import bench_profile
from experiments import bench_report
from experiments import gemm_floor

SECTIONS = ("peak", "train", "floor", "seq", "experts", "moe", "decode")
_RESULT_TAG = "BENCH_RESULT "
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(_REPO, "configs/small_cpu.py"), "Run config.")
_SECTIONS = flags.DEFINE_list("sections", list(SECTIONS), f"Parts to run, of {SECTIONS}.")
_QUICK = flags.DEFINE_bool("quick", False, "Two points per sweep, 2 repetitions, no decode: a smoke run.")
_REPETITIONS = flags.DEFINE_integer("repetitions", 5, "Timed repetitions per figure.")
_STEPS_PER_REP = flags.DEFINE_integer("steps_per_rep", 2, "Training steps in one timed repetition.")
_WARMUP = flags.DEFINE_integer("warmup_steps", 3, "Untimed steps after compilation.")
_SETTLE = flags.DEFINE_integer("settle_steps", 1, "Untimed steps before each variant's timed ones in every "
                               "repetition of the side-by-side training figures (see round_robin).")
_MATMUL = flags.DEFINE_integer("matmul_size", 2048, "Side of the square fp32 matmul of the peak figure.")
_TORCH_COMPILE = flags.DEFINE_bool("torch_compile", True, "Also time transformers under torch.compile.")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["512", "1024", "2048", "4096"], "Sequence lengths of the seq sweep.")
_SEQ_TOKENS = flags.DEFINE_integer("seq_tokens", 4096, "Tokens per step in the seq sweep (batch = this / length).")
_EXPERTS = flags.DEFINE_list("expert_counts", ["8", "32", "128", "256"], "Routed experts of the experts sweep.")
_DECODE_BATCHES = flags.DEFINE_list("decode_batch_sizes", ["1", "8"], "Batch sizes of the decode figures.")
_DECODE_NEW = flags.DEFINE_integer("decode_new_tokens", 64, "Generated tokens per sequence in the decode figures.")
_CPU_DEVICES = flags.DEFINE_string("cpu_devices", "auto",
                                   "XLA CPU devices for our step, as in experiments.train: 'auto' (one per core that "
                                   "the batch divides) or a count. The seq sweep's points run on one.")
_PROFILE_DIR = flags.DEFINE_string("profile_dir", None, "Write a jax.profiler trace of our step here and summarise it.")
_JSON_PATH = flags.DEFINE_string("json_path", os.path.join(_REPO, "docs/bench.json"), "Results as JSON.")
_MD_PATH = flags.DEFINE_string("markdown_path", os.path.join(_REPO, "docs/BENCHMARKS.md"),
                               "Document whose generated section (between the bench markers) is replaced; '' for none.")
_FROM_JSON = flags.DEFINE_string("from_json", None, "Measure nothing: rewrite the markdown from this saved report.")
_WORKER = flags.DEFINE_string("worker_config", None, "Internal: run one seq point from this JSON config, print it.")


# ---------------------------------------------------------------------------------------------------------------
# Timing helpers.


def summary(values: list[float]) -> dict[str, float]:
  return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def matmul_peak(framework: str, shape: tuple[int, int, int], repetitions: int) -> dict[str, float]:
  """GFLOP/s of an fp32 [m, k] @ [k, n] matmul, shape = (m, k, n), per repetition (2 untimed runs first)."""
  m, k, n = shape
  if framework == "jax":
    a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    run = lambda: jax.block_until_ready(dot(a, b))
  elif framework == "torch":
    import torch

    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=generator), torch.randn(k, n, generator=generator)
    run = lambda: torch.mm(a, b)
  else:
    raise ValueError(f"matmul_peak framework {framework!r} is not 'jax' or 'torch'")
  for _ in range(2):
    run()
  rates = []
  for _ in range(repetitions):
    start = time.perf_counter()
    run()
    rates.append(2 * m * k * n / (time.perf_counter() - start) / 1e9)
  return summary(rates)


def round_robin(runners: dict[str, Any], repetitions: int, steps: int, settle: int = 0) -> dict[str, list[float]]:
  """Seconds per step of each runner, `repetitions` times, the runners interleaved within each repetition.

  `settle` untimed steps precede each runner's timed ones in every repetition. Switching frameworks in one
  process costs the next step: on the 2-core CPU our first MTP-on step after a transformers step measured
  291-644 ms against mostly 288-331 for the ones after it (not the peer's threads spinning: a 0.3 s pause did not
  help), so without them each figure would include a switch that a training run never makes.
  """
  times = {name: [] for name in runners}
  for _ in range(repetitions):
    for name, runner in runners.items():
      for _ in range(settle):
        runner.step()
      runner.sync()
      start = time.perf_counter()
      for _ in range(steps):
        runner.step()
      runner.sync()
      times[name].append((time.perf_counter() - start) / steps)
  return times


def random_tokens(vocab_size: int, batch: int, seq_len: int, seed: int = 0) -> np.ndarray:
  """[batch, seq_len + 1] token ids: inputs are [:, :-1], targets [:, 1:]."""
  return np.random.default_rng(seed).integers(0, vocab_size, (batch, seq_len + 1)).astype(np.int32)


def bench_config(config: ml_collections.ConfigDict, **model_changes) -> ml_collections.ConfigDict:
  """A copy of the run config with model fields changed (e.g. n_mtp_layers=0, n_routed_experts=8)."""
  out = copy.deepcopy(config)
  with out.unlocked():
    for key, value in model_changes.items():
      if key not in out.model:
        raise ValueError(f"config.model has no field {key!r}")
      out.model[key] = value
  return out


# ---------------------------------------------------------------------------------------------------------------
# The three training steps.


class OursStep:
  """Our train_step on a fixed batch, jitted as the main job jits it (`train.compile_steps` on the run's mesh);
  `step` dispatches one step, `sync` waits for the state.

  The mesh holds as many of this process's devices (at most `max_devices`) as split the batch evenly: with
  --cpu_devices, the host's cores, on the `data` axis.
  """

  def __init__(self, config: ml_collections.ConfigDict, tokens_BS1: np.ndarray, max_devices: int | None = None):
    self.cfg = train.model_config(config, vocab_needed=0)  # config.model with config.precision's recipe
    self.tx = optimizer.make(config.optimizer)
    self.config = config
    batch, seq = tokens_BS1.shape[0], tokens_BS1.shape[1] - 1
    available = jax.device_count() if max_devices is None else min(max_devices, jax.device_count())
    self.mesh = train.mesh_from_config(config, self.cfg, jax.devices()[:host.auto_device_count(batch, available)])
    _, shardings = train.state_shardings(self.cfg, config, self.tx, self.mesh)
    self.state = train.init_state(self.cfg, config, self.tx, shardings)
    # What the peers start from (the routing biases start at zero, on both sides).
    self.initial_variables = jax.tree.map(np.asarray, {"params": self.state.params, "routing": self.state.routing})
    self.batch = train.place_batch({"inputs": tokens_BS1[None, :, :-1], "targets": tokens_BS1[None, :, 1:],
                                    "segment_ids": np.ones((1, batch, seq), np.int32),
                                    "loss_mask": np.ones((1, batch, seq), np.float32)}, self.mesh, batch, leading=1)
    self.hparams = {"mtp_lambda": np.float32(config.loss.mtp_lambda), "gamma": np.float32(config.balance.gamma)}
    fn, _ = train.compile_steps(self.cfg, config, self.tx, self.mesh, shardings)
    start = time.perf_counter()
    with sharding.use_mesh(self.mesh):
      self.compiled = fn.lower(self.state, self.batch, self.hparams).compile()
    self.compile_s = time.perf_counter() - start
    self.state, first = self.compiled(self.state, self.batch, self.hparams)
    self.first_ce = float(first["ce"])
    self.temp_bytes = int(self.compiled.memory_analysis().temp_size_in_bytes)
    self.flops_per_step = metrics.model_flops_per_token(self.cfg, seq) * batch * seq

  def step(self) -> None:
    self.state, _ = self.compiled(self.state, self.batch, self.hparams)

  def sync(self) -> None:
    jax.block_until_ready(self.state)


def hf_model(variables: dict, cfg: config_lib.ModelConfig):
  """transformers' DeepseekV3ForCausalLM (its default attention and experts kernels) holding our weights."""
  import torch
  import transformers

  if cfg.n_mtp_layers:
    raise ValueError("the transformers peer has no MTP in training; use a config with n_mtp_layers = 0")
  model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**cfg.to_hf())).float()
  state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in
           convert.params_to_hf(variables, cfg, fused_experts=True).items()}
  model.load_state_dict(state, strict=True)
  return model.train()


class TorchStep:
  """transformers' model + torch.optim.AdamW (fused) on the same batch; compiled=True wraps it in torch.compile."""

  def __init__(self, config: ml_collections.ConfigDict, variables: dict, tokens_BS1: np.ndarray, compiled: bool):
    import torch

    torch.set_num_threads(os.cpu_count())
    cfg = config_lib.ModelConfig(**config.model.to_dict())
    self.model = hf_model(variables, cfg)
    self.implementation = {"attention": self.model.config._attn_implementation,
                           "experts": self.model.config._experts_implementation}
    self.forward = torch.compile(self.model) if compiled else self.model
    opt = config.optimizer
    self.params = [p for p in self.model.parameters() if p.requires_grad]
    self.optimizer = torch.optim.AdamW(self.params, lr=opt.lr, betas=(opt.b1, opt.b2), eps=opt.eps,
                                       weight_decay=opt.weight_decay, fused=True)
    self.grad_clip = opt.grad_clip
    tokens = torch.from_numpy(tokens_BS1.astype(np.int64))
    self.inputs, self.targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    start = time.perf_counter()
    self.first_ce = float(self._step())  # compiles under torch.compile
    self.compile_s = time.perf_counter() - start

  def _step(self):
    import torch

    logits = self.forward(input_ids=self.inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), self.targets.flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
    self.optimizer.step()
    self.optimizer.zero_grad(set_to_none=True)
    return loss.detach()

  def step(self) -> None:
    self._step()

  def sync(self) -> None:
    pass  # CPU torch runs synchronously


def train_figures(config: ml_collections.ConfigDict, peak: float | None, repetitions: int, steps: int,
                  warmup: int, torch_compile: bool, profile_dir: str | None = None, settle: int = 1) -> dict[str, Any]:
  """Tokens/s of ours, transformers eager and compiled (MTP off), and ours with MTP on; ratios and MFU.

  The variants are timed round-robin in this process, `settle` untimed steps before each one's timed steps.
  """
  off = bench_config(config, n_mtp_layers=0)
  batch, seq = config.data.batch_size, config.data.seq_len
  tokens = random_tokens(config.model.vocab_size, batch, seq)
  runners = {"ours": OursStep(off, tokens)}
  runners["transformers_eager"] = TorchStep(off, runners["ours"].initial_variables, tokens, compiled=False)
  if torch_compile:
    runners["transformers_compiled"] = TorchStep(off, runners["ours"].initial_variables, tokens, compiled=True)
  if config.model.n_mtp_layers:
    runners["ours_with_mtp"] = OursStep(config, tokens)
  for runner in runners.values():
    for _ in range(warmup):
      runner.step()
    runner.sync()
  load = os.getloadavg()[0]
  times = round_robin(runners, repetitions, steps, settle=settle)
  out = {"batch": batch, "seq_len": seq, "tokens_per_step": batch * seq, "settle_steps": settle, "load_before": load,
         "load_after": os.getloadavg()[0], "runs": {}}
  for name, runner in runners.items():
    cfg = runner.cfg if isinstance(runner, OursStep) else config_lib.ModelConfig(**off.model.to_dict())
    flops = metrics.model_flops_per_token(cfg, seq)
    rate = summary([batch * seq / t for t in times[name]])
    entry = {"tokens_per_s": rate, "step_ms": summary([1e3 * t for t in times[name]]), "compile_s": runner.compile_s,
             "first_step_ce": runner.first_ce, "model_flops_per_token": flops,
             "model_gflops_per_s": rate["median"] * flops / 1e9, "mtp": bool(cfg.n_mtp_layers)}
    if peak:
      entry["mfu"] = entry["model_gflops_per_s"] / peak
    if isinstance(runner, TorchStep):
      entry["implementation"] = runner.implementation
    out["runs"][name] = entry
  peers = [out["runs"][n]["tokens_per_s"]["median"] for n in ("transformers_eager", "transformers_compiled")
           if n in out["runs"]]
  out["ours_vs_faster_torch"] = out["runs"]["ours"]["tokens_per_s"]["median"] / max(peers)
  if profile_dir:
    out["profile"] = bench_profile.profile(runners["ours"], profile_dir, steps=3)
  return out


# ---------------------------------------------------------------------------------------------------------------
# Cost growth: sequence length (one child process per point) and routed experts.


def _peak_rss_bytes() -> int:
  """This process's peak resident set (VmHWM; getrusage's maxrss would include the parent's, kept across exec)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  raise OSError("no VmHWM line in /proc/self/status (peak RSS needs Linux)")


def seq_point(config: ml_collections.ConfigDict, repetitions: int, warmup: int) -> dict[str, Any]:
  """Our step at the config's (batch, seq_len), MTP as configured; peak RSS of this process before and after."""
  seq, batch = config.data.seq_len, config.data.batch_size
  rss_start = _peak_rss_bytes()
  # One device at every length (the 4096 point's batch of 1 cannot be split): the sweep is about how the model's
  # cost grows, not about the host's cores.
  runner = OursStep(config, random_tokens(config.model.vocab_size, batch, seq), max_devices=1)
  for _ in range(warmup):
    runner.step()
  runner.sync()
  times = round_robin({"ours": runner}, repetitions, 1)["ours"]
  return {"seq_len": seq, "batch": batch, "step_ms": summary([1e3 * t for t in times]),
          "tokens_per_s": batch * seq / statistics.median(times),
          "model_flops_per_token": metrics.model_flops_per_token(runner.cfg, seq), "compile_s": runner.compile_s,
          "xla_temp_bytes": runner.temp_bytes, "peak_rss_bytes": _peak_rss_bytes(),
          "peak_rss_before_model_bytes": rss_start, "load": os.getloadavg()[0]}


def _child(args: list[str], what: str, timeout_s: float) -> subprocess.CompletedProcess:
  proc = subprocess.run([sys.executable, *args], cwd=_REPO, capture_output=True, text=True, timeout=timeout_s)
  if proc.returncode:
    raise RuntimeError(f"{what} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
  return proc


def seq_sweep(config: ml_collections.ConfigDict, seq_lens: list[int], tokens: int, repetitions: int,
              warmup: int) -> dict[str, Any]:
  """One child process per sequence length, `tokens` per step; ratios of step time and FLOPs to the first."""
  points = []
  for seq in seq_lens:
    point = bench_config(config, n_mtp_layers=0)
    point.data.seq_len, point.data.batch_size = seq, tokens // seq
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
      f.write(point.to_json())
    try:
      proc = _child(["-m", "experiments.bench", f"--worker_config={f.name}", f"--repetitions={repetitions}",
                     f"--warmup_steps={warmup}"], f"seq point {seq}", timeout_s=1800)
    finally:
      os.unlink(f.name)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_RESULT_TAG)]
    points.append(json.loads(lines[-1][len(_RESULT_TAG):]))
    print(f"  seq {seq}: {points[-1]['step_ms']['median']:.0f} ms/step", flush=True)
  base = points[0]
  for p in points:
    p["time_ratio"] = p["step_ms"]["median"] / base["step_ms"]["median"]
    p["flop_ratio"] = p["model_flops_per_token"] / base["model_flops_per_token"]
  return {"tokens_per_step": tokens, "batch": "tokens_per_step / seq_len", "mtp": False, "points": points}


def _optimizer_update_ms(runner: OursStep, repetitions: int) -> dict[str, float]:
  """The optimizer update alone as the step runs it (clip + AdamW + decay, `train.optimizer_impl`; a copy of the
  parameters as the gradients, the parameters and state donated as in the step)."""
  tx, config = runner.tx, runner.config

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def update(params, opt_state, grads):
    return optimizer.update(tx, config.optimizer, grads, opt_state, params, impl=config.train.optimizer_impl)

  params, opt_state, grads = jax.tree.map(jnp.copy, (runner.state.params, runner.state.opt_state,
                                                     runner.state.params))
  times = []
  with sharding.use_mesh(runner.mesh):
    for i in range(repetitions + 1):
      start = time.perf_counter()
      params, opt_state = jax.block_until_ready(update(params, opt_state, grads))
      if i:  # the first call compiles
        times.append(1e3 * (time.perf_counter() - start))
  return summary(times)


def expert_sweep(config: ml_collections.ConfigDict, counts: list[int], repetitions: int, steps: int,
                 warmup: int) -> dict[str, Any]:
  """Our step (MTP off) at each routed-expert count and fixed top-k, beside the optimizer update alone."""
  batch, seq = config.data.batch_size, config.data.seq_len
  tokens = random_tokens(config.model.vocab_size, batch, seq)
  points = []
  for n_experts in counts:
    runner = OursStep(bench_config(config, n_mtp_layers=0, n_routed_experts=n_experts), tokens)
    for _ in range(warmup):
      runner.step()
    times = round_robin({"ours": runner}, repetitions, steps)["ours"]
    step_ms = summary([1e3 * t for t in times])
    opt_ms = _optimizer_update_ms(runner, repetitions)
    counted = param_count.count(runner.cfg)
    points.append({"experts": n_experts, "params": counted.total, "activated": counted.activated, "step_ms": step_ms,
                   "optimizer_ms": opt_ms, "rest_ms": step_ms["median"] - opt_ms["median"],
                   "load": os.getloadavg()[0]})
    print(f"  E={n_experts}: {step_ms['median']:.0f} ms/step, optimizer {opt_ms['median']:.0f} ms", flush=True)
    del runner
  for p in points:
    p["step_ratio"] = p["step_ms"]["median"] / points[0]["step_ms"]["median"]
    p["rest_ratio"] = p["rest_ms"] / points[0]["rest_ms"]
  return {"top_k": config.model.n_activated_experts, "tokens_per_step": batch * seq, "mtp": False, "points": points}


# ---------------------------------------------------------------------------------------------------------------
# The other benchmarks, run as they are in child processes.


def moe_layer(config: ml_collections.ConfigDict, counts: list[int], repetitions: int) -> dict[str, Any]:
  """experiments.bench_moe at this model's dim, expert size, top-k and tokens per step."""
  m, d = config.model, config.data
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "moe.json")
    _child(["-m", "experiments.bench_moe", f"--tokens={d.batch_size * d.seq_len}", f"--batch={d.batch_size}",
            f"--experts={','.join(map(str, counts))}", "--impls=auto,xla", f"--dim={m.dim}",
            f"--moe_inter_dim={m.moe_inter_dim}", f"--top_k={m.n_activated_experts}",
            f"--n_shared_experts={m.n_shared_experts}", f"--reps={repetitions}", f"--json_out={path}"],
           "experiments.bench_moe", timeout_s=1800)
    with open(path) as f:
      return json.load(f)


def decode(batch_sizes: list[int], new_tokens: int, repetitions: int) -> dict[str, Any]:
  """experiments.bench_decode (random weights of configs/small_cpu.py) against transformers' generate."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "decode.json")
    _child(["-m", "experiments.bench_decode", "--config=configs/small_cpu.py",
            f"--batch_sizes={','.join(map(str, batch_sizes))}", f"--new_tokens={new_tokens}",
            f"--repeats={repetitions}", f"--json_out={path}"], "experiments.bench_decode", timeout_s=1800)
    with open(path) as f:
      return json.load(f)


# ---------------------------------------------------------------------------------------------------------------
# Report.


def machine() -> dict[str, Any]:
  import flax
  import jaxlib

  info = {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
          "python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "flax": flax.__version__,
          "backend": jax.default_backend(), "devices": jax.device_count(),
          "malloc_huge_pages": host.huge_page_malloc(), "malloc_keep_freed": keep_freed.active(),
          "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
          "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}
  try:
    with open("/proc/cpuinfo") as f:
      info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    with open("/proc/meminfo") as f:
      info["memory_gib"] = int(f.readline().split()[1]) / 2**20
  except (OSError, StopIteration):
    pass
  try:
    import torch
    import transformers

    info.update(torch=torch.__version__, transformers=transformers.__version__, torch_threads=torch.get_num_threads())
  except ImportError:
    pass
  return info


# ---------------------------------------------------------------------------------------------------------------
# Entry point.


def _ints(values: list[str], flag: str) -> list[int]:
  try:
    out = [int(v) for v in values]
  except ValueError as e:
    raise app.UsageError(f"--{flag}: {e}") from e
  if not out or min(out) <= 0:
    raise app.UsageError(f"--{flag}={','.join(values)}: needs positive integers")
  return out


def _plan() -> dict[str, Any]:
  """Flag values after --quick, checked before anything runs."""
  sections = _SECTIONS.value
  unknown = sorted(set(sections) - set(SECTIONS))
  if unknown:
    raise app.UsageError(f"--sections: unknown {unknown}; choose from {SECTIONS}")
  plan = dict(sections=sections, repetitions=_REPETITIONS.value, seq_lens=_ints(_SEQ_LENS.value, "seq_lens"),
              experts=_ints(_EXPERTS.value, "expert_counts"), decode_batches=_ints(_DECODE_BATCHES.value,
                                                                                     "decode_batch_sizes"))
  if _QUICK.value:
    plan.update(repetitions=2, seq_lens=plan["seq_lens"][:2], experts=plan["experts"][:2],
                sections=[s for s in sections if s != "decode"])
  bad = [s for s in plan["seq_lens"] if _SEQ_TOKENS.value % s]
  if bad:
    raise app.UsageError(f"--seq_tokens={_SEQ_TOKENS.value} is not a multiple of --seq_lens {bad}")
  for name in ("repetitions", "steps_per_rep"):
    if flags.FLAGS[name].value <= 0:
      raise app.UsageError(f"--{name} must be positive")
  if _WARMUP.value < 0:
    raise app.UsageError("--warmup_steps must be >= 0")
  if _SETTLE.value < 0:
    raise app.UsageError("--settle_steps must be >= 0")
  if _MD_PATH.value:
    bench_report.check_markdown(_MD_PATH.value)
  if not os.path.isdir(os.path.dirname(os.path.abspath(_JSON_PATH.value))):
    raise app.UsageError(f"--json_path={_JSON_PATH.value}: its directory does not exist")
  return plan


def run(config: ml_collections.ConfigDict, plan: dict[str, Any]) -> dict[str, Any]:
  reps, warmup, steps = plan["repetitions"], _WARMUP.value, _STEPS_PER_REP.value
  report = {"machine": machine(), "config": os.path.relpath(flags.FLAGS["config"].config_filename, _REPO),
            "load_at_start": os.getloadavg()[0],
            "model": ", ".join(f"{k} {config.model[k]}" for k in ("dim", "n_layers", "n_routed_experts",
                                                                   "n_activated_experts", "vocab_size")),
            "repetitions": reps, "warmup_steps": warmup, "steps_per_rep": steps, "sections": plan["sections"]}
  peak = None
  if "peak" in plan["sections"]:
    square = (_MATMUL.value,) * 3
    # The dense MLP's first matmul at this config's tokens per step: what the model's own shapes allow.
    model_shape = (config.data.batch_size * config.data.seq_len, config.model.dim, config.model.inter_dim)
    report["peak"] = {"size": _MATMUL.value, "jax": matmul_peak("jax", square, max(reps, 5)),
                      "torch": matmul_peak("torch", square, max(reps, 5)), "model_shape": model_shape,
                      "model_shape_jax": matmul_peak("jax", model_shape, max(reps, 5) * 4)}
    peak = report["peak"]["gflops"] = max(report["peak"]["jax"]["median"], report["peak"]["torch"]["median"])
    print(f"matmul peak: {peak:.0f} GFLOP/s", flush=True)
  if "train" in plan["sections"]:
    report["train"] = train_figures(config, peak, reps, steps, warmup, _TORCH_COMPILE.value, _PROFILE_DIR.value,
                                    settle=_SETTLE.value)
    print(f"training step: ours / faster transformers = {report['train']['ours_vs_faster_torch']:.2f}x", flush=True)
  if "floor" in plan["sections"]:
    report["floor"] = gemm_floor.for_run(config, max(reps, 5))
    print(f"the step's GEMMs alone: {report['floor']['ms']['median']:.0f} ms", flush=True)
  if "seq" in plan["sections"]:
    report["seq"] = seq_sweep(config, plan["seq_lens"], _SEQ_TOKENS.value, reps, min(warmup, 1))
  if "experts" in plan["sections"]:
    report["experts"] = expert_sweep(config, plan["experts"], reps, steps, min(warmup, 1))
  if "moe" in plan["sections"]:
    report["moe"] = moe_layer(config, plan["experts"], reps)
  if "decode" in plan["sections"]:
    report["decode"] = decode(plan["decode_batches"], _DECODE_NEW.value, min(reps, 3))
  report["goals"] = bench_report.goals(report)
  return report


def _worker() -> None:
  with open(_WORKER.value) as f:
    config = ml_collections.ConfigDict(json.load(f))
  print(_RESULT_TAG + json.dumps(seq_point(config, _REPETITIONS.value, _WARMUP.value)), flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    host.set_cpu_devices(_CPU_DEVICES.value, _CONFIG.value.data.batch_size, may_split=not _WORKER.value)
  except ValueError as e:
    raise app.UsageError(f"--cpu_devices: {e}") from None
  if _WORKER.value:
    return _worker()
  if _FROM_JSON.value:
    with open(_FROM_JSON.value) as f:
      report = json.load(f)
    report["goals"] = bench_report.goals(report)
    return _write(report, json_path=None)
  plan = _plan()
  print(f"jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} device(s), {os.cpu_count()} CPUs; "
        f"sections {plan['sections']}; load average {os.getloadavg()[0]:.2f}", flush=True)
  _write(run(_CONFIG.value, plan), json_path=_JSON_PATH.value)


def _write(report: dict[str, Any], json_path: str | None) -> None:
  section = bench_report.markdown(report)
  print(section)
  if json_path:
    bench_report.write_atomic(json_path, json.dumps(report, indent=1) + "\n")
    print(f"wrote {json_path}")
  if _MD_PATH.value:
    bench_report.replace_section(_MD_PATH.value, section)
    print(f"wrote the generated section of {_MD_PATH.value}")


if __name__ == "__main__":
  keep_freed.restart_with_fast_malloc()  # glibc on huge pages, large freed blocks kept mapped (DSV3_RESTART=0: not)
  app.run(main)
