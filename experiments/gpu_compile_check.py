"""Compiles an expert-parallel MoE training step for 8 H100s on a CPU-only host and reports its collectives.

  make gpu-compile-check                      # = python -m experiments.gpu_compile_check; about 1 minute
  make gpu-compile-check GPU_CHECK_FLAGS="--pipeline=dualpipev --batch=8 --seq_len=128"   # the pipelined step
  python -m experiments.gpu_compile_check --mesh=data=2,expert=4 --dump_dir=/tmp/ep_hlo

Needs the CUDA plugin beside JAX (`pip install jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2`, the
jaxlib version; no GPU, driver or CUDA libraries are used). XLA's GPU compiler then builds the real
program for a deviceless 8-GPU topology: SPMD partitioning, fusion, and the latency-hiding scheduler,
which turns every collective into an async start/done pair and places independent work between them.

The step: a tiny-ish DeepSeek-V3 (bf16; 1 dense and 2 MoE layers plus 1 MTP depth; 32 routed experts,
top-4 of 4 groups keep 2) with its parameters sharded by `sharding.LOGICAL_RULES`; forward, objective,
backward, an SGD update and the routing-bias update from the global expert loads. On a GPU mesh the
expert-parallel dispatch takes the ragged all-to-all exchange.

With --pipeline=<schedule> the step is the pipelined one instead (`pipeline.stages.gradients`: the executor's
scan over lockstep ticks, ppermutes between pipe ranks, the expert all-to-alls inside each stage; one dense
and one MoE layer per stage), on --mesh (default pipe=4,expert=2); docs/PIPELINE.md reads its report.

The report lists, from the scheduled HLO, every async all-to-all / ragged all-to-all / all-gather /
reduce-scatter / all-reduce / collective-permute pair: where it sits (entry or a loop body), its size, the
JAX operation it came from (fwd/bwd), and the compute scheduled between its start and done: gemms, loops
(the grouped expert matmul is a loop over tiles) and other fusions. Work placed there cannot depend on the
collective's result, so it is what the collective can overlap.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from absl import logging
from jax.experimental import topologies

from dsv3_jax import balance
from dsv3_jax import config
from dsv3_jax import loss as loss_lib
from dsv3_jax import model as model_lib
from dsv3_jax import sharding
from dsv3_jax.pipeline import schedules
from dsv3_jax.pipeline import stages
from experiments import mesh_flag

_DEFAULT_MESH = "expert=8"  # without --mesh
_DEFAULT_PIPELINE_MESH = "pipe=4,expert=2"  # without --mesh, with --pipeline
_BATCH = flags.DEFINE_integer("batch", 16, "Sequences per step.")
_SEQ = flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
_DUMP_DIR = flags.DEFINE_string("dump_dir", None, "Optional directory for XLA's dumps (HLO passes, PTX).")
_PIPELINE = flags.DEFINE_string("pipeline", None, "Compile the pipelined step with this schedule (1f1b, zb1p, "
                                "dualpipe, dualpipev) on a mesh with a pipe axis (default --mesh=pipe=4,expert=2).")
_MICROBATCHES = flags.DEFINE_integer("microbatches", 8, "Pipeline micro-batches per step (with --pipeline).")

PLUGIN_MODULE = "jax_plugins.xla_cuda12"

# GpuTargetConfigProto of an H100 SXM (80 GB HBM3), in the fields jaxlib 0.10.2's parser accepts.
H100_TARGET = {
    "threads_per_block_limit": 1024, "threads_per_warp": 32, "shared_memory_per_block": 49152,
    "shared_memory_per_core": 233472, "threads_per_core_limit": 2048, "core_count": 132, "fpus_per_core": 128,
    "block_dim_limit_x": 2147483647, "block_dim_limit_y": 65535, "block_dim_limit_z": 65535,
    "memory_bandwidth": 3352320000000, "l2_cache_size": 52428800, "clock_rate_ghz": 1.98,
    "device_memory_size": 84942979072, "shared_memory_per_block_optin": 232448,
    "registers_per_core_limit": 65536, "registers_per_block_limit": 65536,
}

ASYNC_COLLECTIVES = ("all-to-all", "ragged-all-to-all", "all-gather", "reduce-scatter", "all-reduce",
                     "collective-permute")
# Instructions that move no data through the GPU's cores: never counted as overlapping compute.
_BOOKKEEPING = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "partition-id", "replica-id",
                "after-all", "opt-barrier", "add-dependency", "copy-start", "copy-done"}
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def plugin_installed() -> bool:
  """Whether JAX's CUDA plugin (which carries XLA's GPU compiler) is importable."""
  try:
    return importlib.util.find_spec(PLUGIN_MODULE) is not None
  except ModuleNotFoundError:  # no jax_plugins namespace at all
    return False


def h100_target_config() -> str:
  info = "\n".join(f"  {k}: {v}" for k, v in H100_TARGET.items())
  return (f"gpu_device_info {{\n{info}\n  cuda_compute_capability {{\n    major: 9\n  }}\n}}\n"
          'platform_name: "CUDA"\ndnn_version_info {\n  major: 9\n  minor: 8\n}\n'
          'device_description_str: "NVIDIA H100 80GB HBM3"\n')


# Scheduled-HLO analysis.


@dataclasses.dataclass(frozen=True)
class Instruction:
  name: str
  opcode: str
  type: str
  text: str  # everything after the opcode: operands and attributes


@dataclasses.dataclass(frozen=True)
class AsyncCollective:
  computation: str  # ENTRY or the computation (e.g. a while body) it is scheduled in
  kind: str  # one of ASYNC_COLLECTIVES
  start: str
  result_bytes: int
  source: str  # the JAX operation it came from, with fwd/bwd
  between: tuple[str, ...]  # compute scheduled between start and done: "gemm", "loop", "fusion", ...
  sync: bool  # XLA marked it to run synchronously
  between_phases: tuple[str, ...] = ()  # "fwd" / "bwd" of each item of `between` that carries JAX metadata

  @property
  def overlapped(self) -> bool:
    return bool(self.between) and not self.sync


def parse_computations(hlo: str) -> dict[str, list[Instruction]]:
  """Computation name -> its instructions in schedule order (a scheduled module prints them so)."""
  computations, current = {}, None
  for line in hlo.splitlines():
    header = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if header and not line.startswith(" "):
      current = "ENTRY" if header.group(1) else header.group(2)
      computations[current] = []
    elif line.startswith("}"):
      current = None
    elif current is not None:
      instruction = _parse_instruction(line)
      if instruction:
        computations[current].append(instruction)
  return computations


def _parse_instruction(line: str) -> Instruction | None:
  m = re.match(r"^\s+(?:ROOT )?%([\w.\-]+) = (.*)$", line)
  if not m:
    return None
  name, rest = m.groups()
  if rest.startswith("("):  # tuple type: up to the matching parenthesis
    depth = np.cumsum([{"(": 1, ")": -1}.get(ch, 0) for ch in rest])
    end = int(np.argmax(depth == 0)) + 1
    type_, rest = rest[:end], rest[end:]
  else:
    type_, _, rest = rest.partition(" ")
  op = re.match(r"\s*([a-z][a-z0-9\-]*)\((.*)$", rest)
  return Instruction(name, op.group(1), type_, op.group(2)) if op else None


def _result_bytes(type_: str) -> int:
  total = 0
  for dtype, dims in re.findall(r"([a-z]+[0-9a-z]*)\[([0-9,]*)\]", type_):
    total += _DTYPE_BYTES.get(dtype, 0) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
  return total


def _source(*instructions: Instruction) -> str:
  for ins in instructions:
    m = re.search(r'op_name="([^"]+)"', ins.text)
    if m:
      name = m.group(1)
      phase = "bwd" if "transpose(" in name else "fwd"
      path = [p for p in name.split("/") if not re.match(r"^(jit|jvp|transpose|closed_call|while|body)\b", p)]
      tail = "/".join(path[-4:])
      return f"{phase} {tail.rstrip(')') if tail.count(')') > tail.count('(') else tail}"
  return "(no metadata)"


def _kind_of_work(ins: Instruction) -> str | None:
  if ins.opcode in _BOOKKEEPING or ins.opcode.endswith(("-start", "-done")):
    return None
  if ins.opcode in ("dot", "convolution") or "gemm" in ins.name or "__cublas$gemm" in ins.text:
    return "gemm"
  if ins.opcode in ("while", "conditional", "call"):
    return "loop" if ins.opcode == "while" else ins.opcode
  return "fusion" if ins.opcode == "fusion" else ins.opcode


def async_collectives(hlo: str) -> list[AsyncCollective]:
  """Every async collective start/done pair and the compute scheduled between them."""
  computations = parse_computations(hlo)
  found = []
  for computation, instructions in computations.items():
    open_ = {}
    for i, ins in enumerate(instructions):
      kind = ins.opcode.removesuffix("-start")
      if ins.opcode.endswith("-start") and kind in ASYNC_COLLECTIVES:
        open_[ins.name] = (i, ins)
      elif ins.opcode.endswith("-done") and ins.opcode.removesuffix("-done") in ASYNC_COLLECTIVES:
        start_name = re.match(r"\s*%([\w.\-]+)", ins.text).group(1)
        j, start = open_.pop(start_name)
        busy = [w for w in instructions[j + 1:i] if _kind_of_work(w)]
        work = tuple(map(_kind_of_work, busy))
        phases = tuple(_source(w).split()[0] for w in busy if _source(w) != "(no metadata)")
        sync = '"is_sync":true' in start.text
        found.append(AsyncCollective(_label(computation, computations), ins.opcode.removesuffix("-done"),
                                     start.name, _result_bytes(ins.type), _source(start, ins), work, sync, phases))
    if open_:
      raise ValueError(f"computation {computation}: collectives started and never done: {sorted(open_)}")
  return found


def _label(computation: str, computations: dict[str, list[Instruction]]) -> str:
  """ENTRY, 'loop (<fwd|bwd> <op>)' for a while body, named by the JAX operation of its while loop, or
  'branch k of (<op>)' for a branch of a conditional (lax.switch/cond: k indexes the branches in order)."""
  ref = rf"%{re.escape(computation)}(?![\w.\-])"
  for instructions in computations.values():
    for ins in instructions:
      if ins.opcode == "while" and re.search(rf"body={ref}", ins.text):
        source = _source(ins)
        return f"loop {computation}" if source == "(no metadata)" else f"loop ({source})"
      if ins.opcode == "conditional" and re.search(ref, ins.text):
        branches = re.search(r"branch_computations=\{([^}]*)\}", ins.text)
        names = ([b.strip().lstrip("%") for b in branches.group(1).split(",")] if branches else
                 [re.search(rf"{kind}_computation=%([\w.\-]+)", ins.text).group(1) for kind in ("true", "false")])
        if computation in names:
          return f"branch {names.index(computation)} of ({_source(ins)})"
  return computation


def synchronous_collectives(hlo: str) -> list[tuple[str, str]]:
  """(computation, opcode) of collectives left synchronous (no start/done pair)."""
  return [(c, ins.opcode) for c, instructions in parse_computations(hlo).items() for ins in instructions
          if ins.opcode in ASYNC_COLLECTIVES]


def format_report(collectives: list[AsyncCollective], sync: list[tuple[str, str]]) -> str:
  lines = ["| computation | collective | bytes | from | compute between start and done | overlaps |",
           "|---|---|---:|---|---|---|"]
  for c in collectives:
    counts = {w: c.between.count(w) for w in dict.fromkeys(c.between)}
    between = ", ".join(f"{n} {w}" for w, n in counts.items()) or "none"
    if c.between_phases:  # which half of the computation that work belongs to (an F&B pair mixes both)
      between += " (" + ", ".join(f"{p} {c.between_phases.count(p)}" for p in sorted(set(c.between_phases))) + ")"
    overlap = "sync" if c.sync else "yes" if c.overlapped else "no"
    lines.append(f"| {c.computation} | {c.kind} | {c.result_bytes:,} | {c.source} | {between} | {overlap} |")
  n_overlapped = sum(c.overlapped for c in collectives)
  lines.append("")
  lines.append(f"{len(collectives)} async collectives, {n_overlapped} with compute scheduled between start and done; "
               f"{len(sync)} synchronous collectives{': ' + str(sync) if sync else ''}.")
  by_kind = {}
  for c in collectives:
    total, overlapped = by_kind.get(c.kind, (0, 0))
    by_kind[c.kind] = (total + 1, overlapped + c.overlapped)
  lines.append("By kind (overlapped / total): " + ", ".join(f"{k} {o}/{t}" for k, (t, o) in sorted(by_kind.items())))
  return "\n".join(lines)


# The step.


def deviceless_mesh(mesh_sizes: dict[str, int]) -> jax.sharding.Mesh:
  """A mesh of the project's axes over a deviceless H100 topology of as many GPUs as the sizes multiply to."""
  n_devices = int(np.prod(list(mesh_sizes.values())))
  topology = topologies.get_topology_desc(platform="cuda", topology=f"1x1x{n_devices}",
                                          target_config=h100_target_config())
  shape = [mesh_sizes.get(a, 1) for a in sharding.MESH_AXES]
  return jax.sharding.Mesh(np.array(topology.devices).reshape(shape), sharding.MESH_AXES)


def abstract_variables(cfg: config.ModelConfig, mesh: jax.sharding.Mesh) -> dict:
  """The model's variables as ShapeDtypeStructs laid out on `mesh` by the logical-axis rules."""
  shapes = jax.eval_shape(lambda: model_lib.init(cfg, jax.random.key(0)))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                      model_lib.variable_shardings(cfg, mesh))


def step_config() -> config.ModelConfig:
  return config.tiny(dim=256, n_heads=4, inter_dim=512, moe_inter_dim=128, n_layers=3, n_dense_layers=1,
                     n_routed_experts=32, n_activated_experts=4, n_expert_groups=4, n_limited_groups=2,
                     dtype="bfloat16", vocab_size=1024)


def compile_step(mesh_sizes: dict[str, int], batch: int, seq_len: int, cfg: config.ModelConfig | None = None,
                 dump_dir: str | None = None) -> str:
  """Scheduled GPU HLO of one training step on a deviceless H100 mesh of the given axis sizes."""
  cfg = cfg or step_config()
  mesh = deviceless_mesh(mesh_sizes)
  abstract = abstract_variables(cfg, mesh)
  model = model_lib.Transformer(cfg)
  batch_spec = nn.logical_to_mesh_axes(("batch", "length"), sharding.LOGICAL_RULES)
  tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=jax.sharding.NamedSharding(mesh, batch_spec))

  def step(params, routing, tokens_BS):
    def loss_fn(p):
      out = model.apply({"params": p, "routing": routing}, tokens_BS)
      targets = {"targets": jnp.roll(tokens_BS, -1, axis=1), "loss_mask": jnp.ones_like(tokens_BS)}
      return loss_lib.objective(out, targets, 0.3, 1e-4)[0], out.stats["expert_load"]

    (loss, load_LE), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    params = jax.tree.map(lambda p, g: p - 1e-3 * g.astype(p.dtype), params, grads)
    return params, balance.update_bias(routing, load_LE, 1e-3, cfg), loss

  return _scheduled_hlo(step, mesh, (abstract["params"], abstract["routing"], tokens), dump_dir)


def pipeline_step_config(n_stages: int) -> config.ModelConfig:
  """step_config with one dense layer and one MoE layer per pipeline stage."""
  return dataclasses.replace(step_config(), n_layers=1 + n_stages)


def compile_pipelined_step(mesh_sizes: dict[str, int], schedule: str, microbatches: int, batch: int, seq_len: int,
                           dump_dir: str | None = None) -> str:
  """Scheduled GPU HLO of the pipelined gradient (`stages.gradients`: the executor's scan over lockstep ticks,
  ppermutes between pipe ranks, expert all-to-alls inside each stage) plus an SGD update, on a deviceless mesh."""
  from configs import tiny_cpu  # the run config's data/loss keys; the model is pipeline_step_config

  run_config = tiny_cpu.get_config()
  run_config.pipeline.schedule, run_config.pipeline.microbatches = schedule, microbatches
  cfg = pipeline_step_config(schedules.generate(schedule, mesh_sizes["pipe"], microbatches).n_stages)
  mesh = deviceless_mesh(mesh_sizes)
  abstract = abstract_variables(cfg, mesh)
  batch_sharding = sharding.batch_sharding(mesh, 3, leading=1)
  tokens = jax.ShapeDtypeStruct((microbatches, batch, seq_len), jnp.int32, sharding=batch_sharding)
  batch_tree = {k: tokens for k in ("inputs", "targets", "loss_mask", "segment_ids")}

  def step(params, routing, batch_MBS):
    grads, parts, load_LE = stages.gradients(params, routing, batch_MBS, 0.3, cfg=cfg, config=run_config)
    params = jax.tree.map(lambda p, g: p - 1e-3 * g.astype(p.dtype), params, grads)
    return params, balance.update_bias(routing, load_LE, 1e-3, cfg), parts["loss"]

  return _scheduled_hlo(step, mesh, (abstract["params"], abstract["routing"], batch_tree), dump_dir)


def _scheduled_hlo(step, mesh: jax.sharding.Mesh, args: tuple, dump_dir: str | None) -> str:
  """`step` lowered on `args` under the mesh and the logical-axis rules, compiled with the latency-hiding
  scheduler: the scheduled GPU HLO as text."""
  options = {"xla_gpu_enable_latency_hiding_scheduler": True}
  if dump_dir:
    options["xla_dump_to"] = dump_dir
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    lowered = jax.jit(step).lower(*args)
  return lowered.compile(compiler_options=options).as_text()


def main(argv):
  del argv
  jax.config.update("jax_platforms", "cpu")  # the GPU is only a compile target
  if not plugin_installed():
    raise SystemExit("the CUDA plugin is not installed beside JAX: pip install jax-cuda12-plugin==0.10.2 "
                     "jax-cuda12-pjrt==0.10.2 (in a separate environment; see docs/EXPERT_PARALLEL.md)")
  default_mesh = _DEFAULT_PIPELINE_MESH if _PIPELINE.value else _DEFAULT_MESH
  mesh_sizes = {a: 1 for a in sharding.MESH_AXES} | sharding.parse_sizes(mesh_flag.MESH.value or default_mesh)
  logging.info("jax %s, process %d of %d, host devices %s; compiling for %s H100s, mesh %s", jax.__version__,
               jax.process_index(), jax.process_count(), jax.devices(), int(np.prod(list(mesh_sizes.values()))),
               mesh_sizes)
  if _PIPELINE.value:
    hlo = compile_pipelined_step(mesh_sizes, _PIPELINE.value, _MICROBATCHES.value, _BATCH.value, _SEQ.value,
                                 dump_dir=_DUMP_DIR.value)
    schedule = schedules.generate(_PIPELINE.value, mesh_sizes["pipe"], _MICROBATCHES.value)
    _, table = stages.plan(pipeline_step_config(schedule.n_stages), _PIPELINE.value, mesh_sizes["pipe"],
                           _MICROBATCHES.value)
    print(f"mesh {mesh_sizes}, {_PIPELINE.value} with {_MICROBATCHES.value} micro-batches of {_BATCH.value} x "
          f"{_SEQ.value} tokens, {step_config().n_routed_experts} experts; the executor's per-tick op is its "
          f"lax.switch branch k of {dict(enumerate(table.branches))}\n")
  else:
    hlo = compile_step(mesh_sizes, _BATCH.value, _SEQ.value, dump_dir=_DUMP_DIR.value)
    print(f"mesh {mesh_sizes}, batch {_BATCH.value} x {_SEQ.value} tokens, {step_config().n_routed_experts} "
          "experts\n")
  print(format_report(async_collectives(hlo), synchronous_collectives(hlo)))


if __name__ == "__main__":
  app.run(main)
