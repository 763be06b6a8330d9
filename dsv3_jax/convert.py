"""Hugging Face DeepSeek-V3 tensor names <-> our variables, in one table used in both directions.

HF weights are [out, in]; our kernels are [in, out]. HF layer i is our `dense_layers[i]` (i <
n_dense_layers) or `moe_layers[i - n_dense_layers]`; HF layer n_layers + k is our MTP depth `mtp_k`.

The table is a list of `Entry`s, one per checkpoint tensor: the tensor `name` is `leaf[index]` of one
of our stacked leaves (`index` picks the layer and, for routed experts, the expert), transposed when
`transpose`. Everything else reads it: `params_from_hf` and `params_to_hf` for whole state dicts, and
`hf_checkpoint` for streaming a checkpoint on disk slice by slice onto a mesh.

Routed experts come per expert (`mlp.experts.{e}.gate_proj.weight`, the checkpoint layout) or fused
(`mlp.experts.gate_up_proj` [E, 2F, D] and `down_proj` [E, D, F], transformers 5.x in memory).
The MTP layer's copies of the embedding and head are checked against the main ones, never loaded.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterator
from collections.abc import Mapping

import jax
import numpy as np

from dsv3_jax import config as config_lib
from dsv3_jax import model as model_lib

Path = tuple[str, ...]
Leaf = tuple[str, Path]  # (collection, path inside it), e.g. ("params", ("moe_layers", "ffn", "experts", "w1"))

# (HF name inside a decoder layer, our path inside a Block, is a [out, in] matrix)
_ATTENTION = (
    ("input_layernorm.weight", ("attn_norm", "weight"), False),
    ("post_attention_layernorm.weight", ("ffn_norm", "weight"), False),
    ("self_attn.q_a_proj.weight", ("attn", "wq_a", "kernel"), True),
    ("self_attn.q_a_layernorm.weight", ("attn", "q_norm", "weight"), False),
    ("self_attn.q_b_proj.weight", ("attn", "wq_b", "kernel"), True),
    ("self_attn.q_proj.weight", ("attn", "wq", "kernel"), True),
    ("self_attn.kv_a_proj_with_mqa.weight", ("attn", "wkv_a", "kernel"), True),
    ("self_attn.kv_a_layernorm.weight", ("attn", "kv_norm", "weight"), False),
    ("self_attn.kv_b_proj.weight", ("attn", "wkv_b", "kernel"), True),
    ("self_attn.o_proj.weight", ("attn", "wo", "kernel"), True),
)
_DENSE_MLP = (
    ("mlp.gate_proj.weight", ("ffn", "w1", "kernel"), True),
    ("mlp.up_proj.weight", ("ffn", "w3", "kernel"), True),
    ("mlp.down_proj.weight", ("ffn", "w2", "kernel"), True),
)
_MOE = (
    ("mlp.gate.weight", ("ffn", "gate", "kernel"), True),
    ("mlp.shared_experts.gate_proj.weight", ("ffn", "shared_experts", "w1", "kernel"), True),
    ("mlp.shared_experts.up_proj.weight", ("ffn", "shared_experts", "w3", "kernel"), True),
    ("mlp.shared_experts.down_proj.weight", ("ffn", "shared_experts", "w2", "kernel"), True),
)
_EXPERTS = (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))
_BIAS = "mlp.gate.e_score_correction_bias"
_MTP = (
    ("enorm.weight", ("enorm", "weight"), False),
    ("hnorm.weight", ("hnorm", "weight"), False),
    ("eh_proj.weight", ("eh_proj", "kernel"), True),
    ("shared_head.norm.weight", ("norm", "weight"), False),
)
_MTP_COPIES = (("embed_tokens.weight", "model.embed_tokens.weight"), ("shared_head.head.weight", "lm_head.weight"))
_FUSED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


class ConversionError(ValueError):
  """A checkpoint that does not fit the config; the message names the tensor."""


@dataclasses.dataclass(frozen=True)
class Entry:
  """One checkpoint tensor: `leaf[index]` of our variables, transposed when `transpose`."""

  name: str
  leaf: Leaf
  index: tuple[int, ...]  # leading (layer[, expert]) indices into the stacked leaf; () for unstacked leaves
  transpose: bool

  def hf_shape(self, leaf_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The checkpoint tensor's shape, given the shape of the whole leaf."""
    own = tuple(leaf_shape[len(self.index):])
    return own[::-1] if self.transpose else own


def entries(cfg: config_lib.ModelConfig) -> list[Entry]:
  """Every checkpoint tensor this config has (per-expert keys, MTP as layers n_layers + k), in file order."""
  out = [Entry("model.embed_tokens.weight", ("params", ("embed", "embedding")), (), False),
         Entry("model.norm.weight", ("params", ("norm", "weight")), (), False),
         Entry("lm_head.weight", ("params", ("head",)), (), True)]
  for stack, n, moe in _stacks(cfg):
    for i in range(n):
      out += _block_entries(cfg, _hf_layer_name(cfg, stack, i), (stack,), (i,), moe)
  for k in range(cfg.n_mtp_layers):
    prefix = f"model.layers.{cfg.n_layers + k}."
    out += _block_entries(cfg, prefix, (f"mtp_{k}", "block"), (), True)
    out += [Entry(prefix + hf, ("params", (f"mtp_{k}", *path)), (), t) for hf, path, t in _MTP]
  return out


def by_leaf(table: list[Entry]) -> dict[Leaf, list[Entry]]:
  """The table grouped by our leaf, in first-appearance order."""
  out: dict[Leaf, list[Entry]] = {}
  for entry in table:
    out.setdefault(entry.leaf, []).append(entry)
  return out


def mtp_copies(cfg: config_lib.ModelConfig) -> dict[str, str]:
  """{MTP layer's copy of the embedding/head: the main tensor it must equal}; never loaded."""
  return {f"model.layers.{cfg.n_layers + k}.{copy}": main for k in range(cfg.n_mtp_layers)
          for copy, main in _MTP_COPIES}


def abstract_variables(cfg: config_lib.ModelConfig) -> dict:
  """Shapes and dtypes of our variables {"params", "routing"} for this config (no memory)."""
  return jax.eval_shape(lambda: model_lib.init(cfg, jax.random.PRNGKey(0)))


def get_leaf(tree: Mapping, leaf: Leaf):
  """`tree[collection][path...]`; a missing key raises KeyError."""
  node = tree[leaf[0]]
  for key in leaf[1]:
    node = node[key]
  return node


def hf_shapes(cfg: config_lib.ModelConfig, abstract: Mapping) -> dict[str, tuple[int, ...]]:
  """Every checkpoint tensor name with its shape, from the shapes of our (abstract) variables."""
  return {e.name: e.hf_shape(tuple(get_leaf(abstract, e.leaf).shape)) for e in entries(cfg)}


def _block_entries(cfg, prefix: str, root: Path, index: tuple[int, ...], moe: bool) -> list[Entry]:
  out = [Entry(prefix + hf, ("params", (*root, *path)), index, t) for hf, path, t in _layer_rules(cfg, moe)]
  if moe:
    out.append(Entry(prefix + _BIAS, ("routing", (*root, "ffn", "gate", "bias")), index, False))
    for hf, ours in _EXPERTS:
      out += [Entry(f"{prefix}mlp.experts.{e}.{hf}.weight", ("params", (*root, "ffn", "experts", ours)),
                    (*index, e), True) for e in range(cfg.n_routed_experts)]
  return out


def _layer_rules(cfg: config_lib.ModelConfig, moe: bool):
  unused = {"wq_a", "q_norm", "wq_b"} if cfg.q_lora_rank == 0 else {"wq"}
  rules = [r for r in _ATTENTION if not (r[1][0] == "attn" and r[1][1] in unused)]
  return rules + list(_MOE if moe else _DENSE_MLP)


def _hf_layer_name(cfg: config_lib.ModelConfig, stack: str, index: int) -> str:
  if stack == "dense_layers":
    return f"model.layers.{index}."
  return f"model.layers.{cfg.n_dense_layers + index}."


def _stacks(cfg):
  return [(s, n, moe) for s, n, moe in (("dense_layers", cfg.n_dense_layers, False),
                                          ("moe_layers", cfg.n_moe_layers, True)) if n]


# ---------------------------------------------------------------------------------------------------
# Whole state dicts (numpy, in memory).


class _PerExpert(Mapping):
  """A state dict with any fused expert tensors shown under per-expert names (views, no copies)."""

  def __init__(self, state: Mapping[str, np.ndarray]):
    self.state, self.split, self.fused = state, {}, set()
    for name in state:
      if name.endswith(_FUSED[0]):
        prefix = name.removesuffix(_FUSED[0])
        self.fused.update(prefix + f for f in _FUSED)
        for e in range(np.shape(state[name])[0]):
          for hf, _ in _EXPERTS:
            self.split[f"{prefix}mlp.experts.{e}.{hf}.weight"] = (prefix, e, hf)

  def __getitem__(self, name: str) -> np.ndarray:
    if name not in self.split:
      return self.state[name]
    prefix, e, hf = self.split[name]
    if hf == "down_proj":
      return np.asarray(self.state[prefix + _FUSED[1]])[e]
    gate_up = np.asarray(self.state[prefix + _FUSED[0]])[e]
    half = gate_up.shape[0] // 2
    return gate_up[:half] if hf == "gate_proj" else gate_up[half:]

  def __contains__(self, name) -> bool:
    return name in self.split or (name in self.state and name not in self.fused)

  def __iter__(self) -> Iterator[str]:
    yield from (n for n in self.state if n not in self.fused)
    yield from self.split

  def __len__(self) -> int:
    return len(self.state) - len(self.fused & set(self.state)) + len(self.split)


class _Reader:
  """Takes tensors from a HF state dict by name, remembering which were used."""

  def __init__(self, state: Mapping[str, np.ndarray]):
    self.state, self.used = state, set()

  def __call__(self, name: str, shape: tuple[int, ...] | None = None, transpose: bool = False) -> np.ndarray:
    if name not in self.state:
      raise ConversionError(f"tensor {name!r} is missing from the checkpoint")
    self.used.add(name)
    array = np.asarray(self.state[name])
    if shape is not None and array.shape != shape:
      raise ConversionError(f"tensor {name!r} has shape {array.shape}, expected {shape}")
    return array.T if transpose else array


def params_from_hf(state: Mapping[str, np.ndarray], cfg: config_lib.ModelConfig,
                   abstract: dict | None = None) -> dict:
  """Our variables {"params", "routing"} from a HF state dict (numpy arrays, any float dtype).

  `state` may be lazy (tensors read on access): each tensor is read once and written straight into
  its slot of the output, so at most one checkpoint tensor is held besides the output.
  `abstract` (`abstract_variables(cfg)` when not given) supplies the expected shapes; every checkpoint
  tensor must be used, except the MTP layers' embedding/head copies, and those must match the main ones.
  """
  abstract = abstract if abstract is not None else abstract_variables(cfg)
  per_expert = _PerExpert(state)
  read = _Reader(per_expert)
  out: dict = {"params": {}, "routing": {}}
  for leaf, group in by_leaf(entries(cfg)).items():
    _set_leaf(out, leaf, _stack(read, group, tuple(get_leaf(abstract, leaf).shape)))
  for copy, main in mtp_copies(cfg).items():
    if copy in per_expert and not np.array_equal(read(copy), read(main)):
      logging.warning("%s differs from %s; the MTP module uses the main model's", copy, main)
  unused = sorted(set(per_expert) - read.used)
  if unused:
    raise ConversionError(f"checkpoint tensors not used by this config: {unused[:5]}"
                          f"{' ...' if len(unused) > 5 else ''} ({len(unused)} in all)")
  return out


def _stack(read: _Reader, group: list[Entry], shape: tuple[int, ...]) -> np.ndarray:
  """One leaf, each of its checkpoint tensors written straight into its slot (no per-layer copies)."""
  out = None
  for entry in group:
    value = read(entry.name, entry.hf_shape(shape), entry.transpose)
    if entry.leaf[0] == "routing":
      value = value.astype(np.float32)  # routing state is fp32 whatever the checkpoint stores
    if out is None:
      out = np.empty(shape, value.dtype)
    out[entry.index] = value
  return out


def _set_leaf(tree: dict, leaf: Leaf, value) -> None:
  node = tree.setdefault(leaf[0], {})
  for key in leaf[1][:-1]:
    node = node.setdefault(key, {})
  node[leaf[1][-1]] = value


def take(leaf, entry: Entry) -> np.ndarray:
  """One checkpoint tensor from its stacked leaf (numpy or jax): only that slice leaves the device."""
  value = np.asarray(leaf[entry.index] if entry.index else leaf)
  return value.T if entry.transpose else value


def fetch(variables: Mapping, entry: Entry) -> np.ndarray:
  """One checkpoint tensor from our variables {"params", "routing"}."""
  return take(get_leaf(variables, entry.leaf), entry)


def params_to_hf(variables: dict, cfg: config_lib.ModelConfig, fused_experts: bool = False) -> dict[str, np.ndarray]:
  """A HF state dict from our variables; per-expert keys (the checkpoint layout) unless fused_experts."""
  variables = {"routing": {}, **variables}
  out = {e.name: fetch(variables, e) for e in entries(cfg)}
  return _fuse_experts(out, cfg.n_routed_experts) if fused_experts else out


def _fuse_experts(state: dict[str, np.ndarray], n_experts: int) -> dict[str, np.ndarray]:
  """Per-expert keys -> transformers 5.x fused `gate_up_proj` [E, 2F, D] and `down_proj` [E, D, F]."""
  prefixes = sorted({n.split("mlp.experts.")[0] for n in state if ".mlp.experts." in n})
  for prefix in prefixes:
    w = {hf: np.stack([state.pop(f"{prefix}mlp.experts.{e}.{hf}.weight") for e in range(n_experts)])
         for hf, _ in _EXPERTS}
    state[prefix + _FUSED[0]] = np.concatenate([w["gate_proj"], w["up_proj"]], 1)
    state[prefix + _FUSED[1]] = w["down_proj"]
  return state


def hf_layer_index(name: str) -> int | None:
  """The decoder-layer index of a HF tensor name (None for embedding, norm and head)."""
  match = re.match(r"model\.layers\.(\d+)\.", name)
  return int(match.group(1)) if match else None


def flatten(tree: Mapping, prefix: Path = ()) -> dict[Path, object]:
  """{path: leaf} of a nested mapping (anything not a Mapping is a leaf)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(flatten(value, (*prefix, key)))
    else:
      out[(*prefix, key)] = value
  return out


def unflatten(flat: Mapping[Path, object]) -> dict:
  """The inverse of `flatten`."""
  out: dict = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out
