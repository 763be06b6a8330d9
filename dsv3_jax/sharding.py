"""The device mesh, logical axes and the one table that maps them onto the mesh.

Shape-suffix key, used for local tensor names and einsum strings throughout the package:

  B batch            S query positions      T key/cache positions   D model dim (`dim`)
  H attention heads  K qk nope head dim     R qk rope head dim      V v head dim
  Q q latent (`q_lora_rank`)  C kv latent (`kv_lora_rank`)          F MLP hidden
  E routed experts   G expert groups        N routed slots (tokens x top-k)
  M rows of one expert tile   X vocabulary  L layers                W token positions, flattened (B*S)

This is the only module that names mesh axes. The mesh has five axes, in this order:

  pipe    pipeline ranks (dsv3_jax/pipeline): model stages, never a batch split; inside the pipeline's
          shard_map every axis is manual, and `constrain` is a no-op there
  data    data parallelism: parameters replicated, the batch split
  fsdp    fully sharded data parallelism: the batch split and parameters sharded on their `embed` axis
  expert  expert parallelism: routed experts split; for everything else it is one more batch axis
  tensor  tensor parallelism: heads, MLP hidden and vocabulary split

Parameters carry logical axis names (`nn.with_logical_partitioning`); `LOGICAL_RULES` maps them to mesh
axes, and activations are constrained through the same names at block boundaries (`constrain`). Flax
assigns a mesh axis at most once per array, so an activation [batch, length, embed] keeps `embed`
whole because `batch` already took `fsdp`: parameters are gathered for compute, activations never are.

Optimizer state follows its parameter. With ZeRO-1 (`mesh.zero1`) each moment is further split over
every batch axis (data, fsdp, expert) its parameter is replicated over, on the largest dimension that
stays divisible; the update then runs on that slice and XLA gathers the new parameters.

Multi-host meshes put the intra-host factor of each axis on the innermost axes first (tensor, expert,
fsdp, data, pipe) and the inter-host factor outside it, so fast links carry the chattiest axes and every
host owns one contiguous block of the batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import PartitionSpec as P

MESH_AXES = ("pipe", "data", "fsdp", "expert", "tensor")
PIPE_AXIS = "pipe"  # pipeline stages (dsv3_jax/pipeline): never splits the batch
EXPERT_AXIS = "expert"  # routed experts (expert_parallel.py)
BATCH_AXES = ("data", "fsdp", "expert")  # the mesh axes that split the batch

# Logical axis -> mesh axes. Parameters and activations speak only logical names.
LOGICAL_RULES = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("head_dim", None),
    ("q_lora", None),
    ("kv_lora", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("layers", None),
)


class MeshError(ValueError):
  """A mesh that cannot run this model or batch; the message names the offending axis."""


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
  """Constrains an activation's sharding by logical axes; a no-op outside a mesh + rules context, and inside a
  `shard_map` over every mesh axis (the pipeline's: each device already holds exactly its own part)."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.are_all_axes_manual:
    return x
  return nn.with_logical_constraint(x, logical_axes)


def mesh_axes(logical: Sequence[str | None], mesh) -> tuple[tuple[str, ...], ...]:
  """The mesh axes each logical dim maps to under the rules in context (`LOGICAL_RULES` outside one), keeping those
  this mesh has."""
  rules = tuple(nn.get_logical_axis_rules()) or LOGICAL_RULES
  entries = [() if e is None else (e,) if isinstance(e, str) else tuple(e)
             for e in nn.logical_to_mesh_axes(tuple(logical), rules)]
  return tuple(tuple(a for a in e if a in mesh.axis_names) for e in entries)


def per_shard(fn: Callable[..., jax.Array], operands: Sequence[jax.Array],
              in_axes: Sequence[tuple[str | None, ...]], out_axes: tuple[str | None, ...]) -> jax.Array:
  """fn run by each device on its own block of the operands: a `shard_map` over the context mesh's axes that their
  logical axes (`in_axes`, one tuple per operand; `out_axes` for the result) map to.

  For ops XLA cannot partition (custom calls, which it would otherwise run on gathered operands). fn is applied
  directly outside a mesh, inside a `shard_map` already manual over those axes, when no axis longer than 1
  splits the operands, or when one does not divide its dimension.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(*operands)
  spec = lambda logical: tuple(tuple(a for a in e if mesh.shape[a] > 1) for e in mesh_axes(logical, mesh))
  in_specs = [spec(axes) for axes in in_axes]
  used = {a for s in in_specs for e in s for a in e}
  divides = all(x.shape[i] % math.prod(mesh.shape[a] for a in e) == 0 for x, s in zip(operands, in_specs, strict=True)
                for i, e in enumerate(s))
  if not used or used & set(mesh.manual_axes) or not divides:
    return fn(*operands)
  as_p = lambda s: P(*(e or None for e in s))
  return jax.shard_map(fn, mesh=mesh, in_specs=tuple(as_p(s) for s in in_specs), out_specs=as_p(spec(out_axes)),
                       axis_names=used)(*operands)


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh) -> Iterator[None]:
  """The context every sharded trace runs in: `mesh` as the context mesh plus `LOGICAL_RULES`."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    yield


# --------------------------------------------------------------------------------------------------------------------
# Mesh sizes, validation and construction
# --------------------------------------------------------------------------------------------------------------------


def mesh_sizes(mesh_config: Mapping[str, Any], n_devices: int | None = None) -> dict[str, int]:
  """Axis sizes from `mesh.{pipe,data,fsdp,expert,tensor}`; one axis may be -1: all devices the others leave."""
  sizes = {}
  for axis in MESH_AXES:
    value = mesh_config[axis]
    if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
      raise MeshError(f"mesh.{axis} = {value!r}: must be a positive integer, or -1 for the devices left over")
    sizes[axis] = value
  fill = [axis for axis in MESH_AXES if sizes[axis] == -1]
  if len(fill) > 1:
    raise MeshError(f"mesh.{fill[1]} = -1: only one axis may be -1 (mesh.{fill[0]} already is)")
  if fill:
    rest = math.prod(v for v in sizes.values() if v != -1)
    if n_devices is None:
      raise MeshError(f"mesh.{fill[0]} = -1 needs a device count to fill")
    if n_devices % rest:
      raise MeshError(f"mesh.{fill[0]} = -1: the other axes' product {rest} does not divide the {n_devices} devices")
    sizes[fill[0]] = n_devices // rest
  return sizes


def parse_sizes(spec: str) -> dict[str, int]:
  """'fsdp=4,expert=2' -> {"fsdp": 4, "expert": 2}, the command-line form of a mesh (unnamed axes are 1)."""
  sizes = {}
  for part in filter(None, spec.split(",")):
    axis, _, size = part.partition("=")
    if axis not in MESH_AXES or not size.isdigit() or int(size) < 1 or axis in sizes:
      raise MeshError(f"mesh entry {part!r}: want <axis>=<size> with a positive size and a new axis of {MESH_AXES}")
    sizes[axis] = int(size)
  return sizes


def mesh_from_spec(spec: str, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """The mesh of a 'fsdp=4,expert=2' spec over all devices (the axes must multiply to the device count)."""
  return make_mesh({axis: 1 for axis in MESH_AXES} | parse_sizes(spec), devices)


def describe(sizes: Mapping[str, int]) -> str:
  """'pipe=16 x data=2 x expert=64' (size-1 axes left out)."""
  parts = [f"{axis}={sizes[axis]}" for axis in MESH_AXES if sizes[axis] > 1]
  return " x ".join(parts) or "one device"


def batch_shards(sizes: Mapping[str, int]) -> int:
  return math.prod(sizes[axis] for axis in BATCH_AXES)


def check_mesh(cfg, sizes: Mapping[str, int], batch_size: int, n_devices: int, *, allow_pipe: bool = False) -> None:
  """Refuses a mesh that cannot run `cfg` on batches of `batch_size` sequences; errors name the axis.

  Run before anything is compiled. The pipe axis never splits the batch. `allow_pipe` accepts any pipe size for
  planning (training pipelines refuse tensor > 1).
  """
  product = math.prod(sizes[axis] for axis in MESH_AXES)
  if product != n_devices:
    raise MeshError(f"mesh {describe(sizes)}: the axes multiply to {product} but there are {n_devices} devices "
                    "(set one axis to -1 to use all devices)")
  if sizes["pipe"] > 1 and sizes["tensor"] > 1 and not allow_pipe:
    raise MeshError(f"mesh.tensor = {sizes['tensor']} with mesh.pipe = {sizes['pipe']}: pipeline stages run per "
                    "device over whole (not tensor-split) weights; use mesh.tensor = 1 with a pipeline")
  if sizes["pipe"] > cfg.n_layers:
    raise MeshError(f"mesh.pipe = {sizes['pipe']}: more stages than the model's {cfg.n_layers} layers")
  _need_divides(sizes, "expert", {"n_routed_experts": cfg.n_routed_experts})
  tensor_dims = {"n_heads": cfg.n_heads, "inter_dim": cfg.inter_dim, "moe_inter_dim": cfg.moe_inter_dim,
                 "vocab_size": cfg.vocab_size}
  if cfg.n_mtp_layers:
    tensor_dims["2 x dim (the MTP projection's input)"] = 2 * cfg.dim
  _need_divides(sizes, "tensor", tensor_dims)
  _need_divides(sizes, "fsdp", {"dim": cfg.dim})
  shards = batch_shards(sizes)
  if batch_size % shards:
    raise MeshError(f"mesh.data x mesh.fsdp x mesh.expert = {sizes['data']} x {sizes['fsdp']} x {sizes['expert']} "
                    f"= {shards} does not divide the batch of {batch_size} sequences (config.data.batch_size)")


def _need_divides(sizes: Mapping[str, int], axis: str, dims: Mapping[str, int]) -> None:
  for name, size in dims.items():
    if size % sizes[axis]:
      raise MeshError(f"mesh.{axis} = {sizes[axis]} does not divide the model's {name} = {size}")


def hybrid_shapes(sizes: Mapping[str, int], n_processes: int, local_devices: int) -> tuple[list[int], list[int]]:
  """(per-host shape, across-host shape) of the mesh: local devices fill the innermost axes first.

  Taking gcd(axis, devices left) axis by axis always places all of a host's devices when the axes multiply
  to hosts x devices per host (every prime power of the host size is found in some axis).
  """
  product = math.prod(sizes[axis] for axis in MESH_AXES)
  if product != n_processes * local_devices:
    raise MeshError(f"mesh {describe(sizes)}: the axes multiply to {product}, not to {n_processes} hosts x "
                    f"{local_devices} devices")
  ici, left = [], local_devices
  for axis in reversed(MESH_AXES):
    factor = math.gcd(sizes[axis], left)
    ici.append(factor)
    left //= factor
  ici.reverse()
  return ici, [sizes[axis] // f for axis, f in zip(MESH_AXES, ici, strict=True)]


def make_mesh(mesh_config: Mapping[str, Any], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """The ('pipe', 'data', 'fsdp', 'expert', 'tensor') mesh of `devices` (all by default), axes in Auto mode."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_sizes(mesh_config, len(devices))
  shape = [sizes[axis] for axis in MESH_AXES]
  if math.prod(shape) != len(devices):
    raise MeshError(f"mesh {describe(sizes)}: the axes multiply to {math.prod(shape)} but there are "
                    f"{len(devices)} devices")
  per_process = {}
  for d in devices:
    per_process[d.process_index] = per_process.get(d.process_index, 0) + 1
  if len(per_process) > 1:
    if len(set(per_process.values())) != 1:
      raise MeshError(f"hosts hold different numbers of devices ({per_process}); a hybrid mesh needs equal hosts")
    ici, dcn = hybrid_shapes(sizes, len(per_process), len(devices) // len(per_process))
    array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=True)
  else:
    try:
      array = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError) as e:  # topology-aware placement is an optimisation only
      logging.warning("no topology-aware layout for mesh %s (%s); using device order", describe(sizes), e)
      array = np.asarray(devices).reshape(shape)
  return jax.sharding.Mesh(array, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def abstract_mesh(sizes: Mapping[str, int]) -> jax.sharding.AbstractMesh:
  """A mesh of the given sizes without devices: shardings and shard shapes for planning."""
  return jax.sharding.AbstractMesh(tuple(sizes[axis] for axis in MESH_AXES), MESH_AXES,
                                   axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def sizes_of(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh) -> dict[str, int]:
  return dict(mesh.shape)


# --------------------------------------------------------------------------------------------------------------------
# Parameter, optimizer-state and batch shardings
# --------------------------------------------------------------------------------------------------------------------


def logical_shardings(abstract_boxed_tree: Any, mesh) -> Any:
  """NamedShardings for a tree as returned by `eval_shape(model.init)` (boxes with logical names).

  The result is shaped like the unboxed tree; leaves without logical names are replicated.
  """
  specs = nn.get_partition_spec(abstract_boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)


def zero1_spec(spec: P, shape: Sequence[int], sizes: Mapping[str, int]) -> P:
  """`spec` further split over every batch axis it leaves replicated, each on the largest dimension that
  stays divisible; an axis that fits nowhere leaves the leaf replicated over it."""
  dims = [_axes_of(entry) for entry in (*spec, *[None] * (len(shape) - len(spec)))]
  used = {axis for entry in dims for axis in entry}
  for axis in BATCH_AXES:
    if axis in used or sizes[axis] == 1:
      continue
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in order:
      if shape[i] % (math.prod(sizes[a] for a in dims[i]) * sizes[axis]) == 0:
        dims[i] = (*dims[i], axis)
        break
  return P(*[None if not entry else entry[0] if len(entry) == 1 else entry for entry in dims])


def _axes_of(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def optimizer_shardings(opt_state: Any, params: Any, param_shardings: Any, mesh, zero1: bool) -> Any:
  """Shardings for an optimizer state: subtrees shaped like `params` (moments) follow the parameters
  (split further over the batch axes under ZeRO-1); anything else (step counts) is replicated."""
  params_def = jax.tree.structure(params)
  replicated = jax.sharding.NamedSharding(mesh, P())

  def like_params(node) -> bool:
    return jax.tree.structure(node) == params_def

  def assign(node):
    if not like_params(node):
      return replicated
    if not zero1:
      return param_shardings
    sizes = sizes_of(mesh)
    return jax.tree.map(lambda s, leaf: jax.sharding.NamedSharding(mesh, zero1_spec(s.spec, leaf.shape, sizes)),
                        param_shardings, node)

  return jax.tree.map(assign, opt_state, is_leaf=like_params)


def batch_sharding(mesh, ndim: int, leading: int = 0) -> jax.sharding.NamedSharding:
  """Batch leaves [*leading, B, ...]: B split over the batch axes, everything else whole."""
  return jax.sharding.NamedSharding(mesh, P(*[None] * leading, BATCH_AXES, *[None] * (ndim - leading - 1)))


def process_rows(sharding: jax.sharding.NamedSharding, global_shape: Sequence[int], dim: int) -> tuple[int, int]:
  """[start, stop) of dimension `dim` that this process's devices hold; it must be one contiguous block."""
  index_map = sharding.addressable_devices_indices_map(tuple(global_shape))
  spans = sorted({(idx[dim].start or 0, global_shape[dim] if idx[dim].stop is None else idx[dim].stop)
                  for idx in index_map.values()})
  start, stop = spans[0]
  for lo, hi in spans[1:]:
    if lo > stop:
      raise MeshError(f"process {jax.process_index()} holds non-contiguous batch rows {spans}")
    stop = max(stop, hi)
  return start, stop


def shard_shape(shape: Sequence[int], spec: P, sizes: Mapping[str, int]) -> tuple[int, ...]:
  """The per-device shape of a global `shape` split by `spec` over a mesh of `sizes` (exact division only)."""
  out = []
  for i, dim in enumerate(shape):
    parts = math.prod(sizes[a] for a in _axes_of(spec[i] if i < len(spec) else None))
    if dim % parts:
      raise MeshError(f"dimension {i} of shape {tuple(shape)} ({dim}) does not split into {parts} parts "
                      f"({spec[i]})")
    out.append(dim // parts)
  return tuple(out)
