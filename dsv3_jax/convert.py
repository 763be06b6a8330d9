"""Hugging Face DeepSeek-V3 tensor names <-> our variables, in one table used in both directions.

HF weights are [out, in]; our kernels are [in, out]. HF layer i is our `dense_layers[i]` (i <
n_dense_layers) or `moe_layers[i - n_dense_layers]`; HF layer n_layers + k is our MTP depth `mtp_k`.
Routed experts come per expert (`mlp.experts.{e}.gate_proj.weight`, the checkpoint layout) or fused
(`mlp.experts.gate_up_proj` [E, 2F, D] and `down_proj` [E, D, F], transformers 5.x in memory).
The MTP layer's copies of the embedding and head are checked against the main ones, never loaded.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import numpy as np

from dsv3_jax import config as config_lib

Path = tuple[str, ...]

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


class ConversionError(ValueError):
  """A checkpoint that does not fit the config; the message names the tensor."""


def _layer_rules(cfg: config_lib.ModelConfig, moe: bool):
  unused = {"wq_a", "q_norm", "wq_b"} if cfg.q_lora_rank == 0 else {"wq"}
  rules = [r for r in _ATTENTION if not (r[1][0] == "attn" and r[1][1] in unused)]
  return rules + list(_MOE if moe else _DENSE_MLP)


def _hf_layer_name(cfg: config_lib.ModelConfig, stack: str, index: int) -> str:
  if stack == "dense_layers":
    return f"model.layers.{index}."
  if stack == "moe_layers":
    return f"model.layers.{cfg.n_dense_layers + index}."
  return f"model.layers.{cfg.n_layers + int(stack.removeprefix('mtp_'))}."


class _Reader:
  """Takes tensors from a HF state dict by name, remembering which were used."""

  def __init__(self, state: Mapping[str, np.ndarray]):
    self.state, self.used = state, set()

  def __call__(self, name: str, shape: tuple[int, ...] | None = None, transpose: bool = False) -> np.ndarray:
    if name not in self.state:
      raise ConversionError(f"tensor {name!r} is missing from the checkpoint")
    self.used.add(name)
    array = np.asarray(self.state[name])
    array = array.T if transpose else array
    if shape is not None and array.shape != shape:
      raise ConversionError(f"tensor {name!r} has shape {array.T.shape if transpose else array.shape}, "
                            f"expected {shape[::-1] if transpose else shape}")
    return array


def _expert_tensors(read: _Reader, prefix: str, cfg: config_lib.ModelConfig):
  """Yields (path, expert index, array): one expert's matrix at a time, or all of them when fused."""
  e, d, f = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim
  if prefix + "mlp.experts.gate_up_proj" in read.state:
    gate_up = read(prefix + "mlp.experts.gate_up_proj", (e, 2 * f, d))
    yield ("ffn", "experts", "w1"), slice(None), gate_up[:, :f].transpose(0, 2, 1)
    yield ("ffn", "experts", "w3"), slice(None), gate_up[:, f:].transpose(0, 2, 1)
    yield ("ffn", "experts", "w2"), slice(None), read(prefix + "mlp.experts.down_proj", (e, d, f)).transpose(0, 2, 1)
    return
  for hf, ours in _EXPERTS:
    shape = (f, d) if ours == "w2" else (d, f)
    for i in range(e):
      yield ("ffn", "experts", ours), i, read(f"{prefix}mlp.experts.{i}.{hf}.weight", shape, transpose=True)


def _block_tensors(read: _Reader, prefix: str, cfg: config_lib.ModelConfig, moe: bool, shapes):
  """Yields (collection, path, expert index or None, array) for one decoder layer, one tensor at a time."""
  for hf, path, t in _layer_rules(cfg, moe):
    yield "params", path, None, read(prefix + hf, shapes.get(path), transpose=t)
  if moe:
    for path, expert, value in _expert_tensors(read, prefix, cfg):
      yield "params", path, expert, value
    yield "routing", ("ffn", "gate", "bias"), None, read(prefix + _BIAS, (cfg.n_routed_experts,)).astype(np.float32)


def _put(out: dict, col: str, path: Path, index: tuple, expert, value: np.ndarray, n_experts: int, lead=()) -> None:
  """Writes one tensor into its slot of the (preallocated on first use) output array."""
  if path not in out[col]:
    per_expert = isinstance(expert, int)
    out[col][path] = np.empty((*lead, *((n_experts,) if per_expert else ()), *value.shape), value.dtype)
  slot = (*index, *(() if expert is None else (expert,)))
  if out[col][path][slot].shape != value.shape:
    raise ConversionError(f"{'/'.join(path)} at {slot}: shape {value.shape} differs from the other layers' "
                          f"{out[col][path][slot].shape}")
  out[col][path][slot] = value


def _read_stack(read: _Reader, cfg: config_lib.ModelConfig, stack: str, n: int, moe: bool, shapes) -> dict:
  """A layer stack, written tensor by tensor into [n_layers, ...] arrays (no per-layer copies)."""
  out = {"params": {}, "routing": {}}
  for i in range(n):
    for col, path, expert, value in _block_tensors(read, _hf_layer_name(cfg, stack, i), cfg, moe, shapes):
      _put(out, col, path, (i,), expert, value, cfg.n_routed_experts, lead=(n,))
  return out


def params_from_hf(state: Mapping[str, np.ndarray], cfg: config_lib.ModelConfig,
                   abstract: dict | None = None) -> dict:
  """Our variables {"params", "routing"} from a HF state dict (numpy arrays, any float dtype).

  `state` may be lazy (tensors read on access): each tensor is read once and written straight into
  its slot of the output, so at most one checkpoint tensor is held besides the output.
  `abstract` (e.g. `jax.eval_shape` of the init) supplies expected shapes; every checkpoint tensor
  must be used, except the MTP layers' embedding/head copies, and those must match the main ones.
  """
  read = _Reader(state)
  expected = _block_shapes(abstract)
  params = {"embed": {"embedding": read("model.embed_tokens.weight", (cfg.vocab_size, cfg.dim))},
            "norm": {"weight": read("model.norm.weight", (cfg.dim,))},
            "head": read("lm_head.weight", (cfg.dim, cfg.vocab_size), transpose=True)}
  routing = {}
  for stack, n, moe in _stacks(cfg):
    stacked = _read_stack(read, cfg, stack, n, moe, expected.get(stack, {}))
    _nest(params, stack, stacked["params"])
    _nest(routing, stack, stacked["routing"])
  for k in range(cfg.n_mtp_layers):
    prefix = f"model.layers.{cfg.n_layers + k}."
    block = {"params": {}, "routing": {}}
    for col, path, expert, value in _block_tensors(read, prefix, cfg, True, {}):
      _put(block, col, ("block", *path), (), expert, value, cfg.n_routed_experts)
    block["params"].update({path: read(prefix + hf, transpose=t) for hf, path, t in _MTP})
    _nest(params, f"mtp_{k}", block["params"])
    _nest(routing, f"mtp_{k}", block["routing"])
    _check_mtp_copies(read, prefix)
  unused = sorted(set(state) - read.used)
  if unused:
    raise ConversionError(f"checkpoint tensors not used by this config: {unused[:5]}"
                          f"{' ...' if len(unused) > 5 else ''} ({len(unused)} in all)")
  return {"params": params, "routing": routing}


def _check_mtp_copies(read: _Reader, prefix: str) -> None:
  for copy, main in _MTP_COPIES:
    if prefix + copy in read.state:
      if not np.array_equal(read(prefix + copy), read(main)):
        logging.warning("%s differs from %s; the MTP module uses the main model's", prefix + copy, main)


def params_to_hf(variables: dict, cfg: config_lib.ModelConfig, fused_experts: bool = False) -> dict[str, np.ndarray]:
  """A HF state dict from our variables; per-expert keys (the checkpoint layout) unless fused_experts."""
  params, routing = variables["params"], variables.get("routing", {})
  out = {"model.embed_tokens.weight": np.asarray(params["embed"]["embedding"]),
         "model.norm.weight": np.asarray(params["norm"]["weight"]),
         "lm_head.weight": np.asarray(params["head"]).T}
  for stack, n, moe in _stacks(cfg):
    for i in range(n):
      block = _flatten(params[stack], lambda a, i=i: np.asarray(a[i]))
      block_routing = _flatten(routing.get(stack, {}), lambda a, i=i: np.asarray(a[i]))
      out.update(_write_block(_hf_layer_name(cfg, stack, i), cfg, moe, block, block_routing, fused_experts))
  for k in range(cfg.n_mtp_layers):
    prefix = f"model.layers.{cfg.n_layers + k}."
    mtp = _flatten(params[f"mtp_{k}"])
    block = {p[1:]: v for p, v in mtp.items() if p[0] == "block"}
    block_routing = {p[1:]: v for p, v in _flatten(routing.get(f"mtp_{k}", {})).items()}
    out.update(_write_block(prefix, cfg, True, block, block_routing, fused_experts))
    out.update({prefix + hf: mtp[path].T if t else mtp[path] for hf, path, t in _MTP})
  return out


def _write_block(prefix, cfg, moe, block, block_routing, fused_experts) -> dict[str, np.ndarray]:
  out = {prefix + hf: block[path].T if t else block[path] for hf, path, t in _layer_rules(cfg, moe)}
  if moe:
    out[prefix + _BIAS] = block_routing[("ffn", "gate", "bias")]
    w = {ours: block[("ffn", "experts", ours)] for _, ours in _EXPERTS}
    if fused_experts:
      out[prefix + "mlp.experts.gate_up_proj"] = np.concatenate([w["w1"], w["w3"]], -1).transpose(0, 2, 1)
      out[prefix + "mlp.experts.down_proj"] = w["w2"].transpose(0, 2, 1)
    else:
      for hf, ours in _EXPERTS:
        for e in range(cfg.n_routed_experts):
          out[f"{prefix}mlp.experts.{e}.{hf}.weight"] = w[ours][e].T
  return out


def hf_layer_index(name: str) -> int | None:
  """The decoder-layer index of a HF tensor name (None for embedding, norm and head)."""
  match = re.match(r"model\.layers\.(\d+)\.", name)
  return int(match.group(1)) if match else None


def _stacks(cfg):
  return [(s, n, moe) for s, n, moe in (("dense_layers", cfg.n_dense_layers, False),
                                          ("moe_layers", cfg.n_moe_layers, True)) if n]


def _block_shapes(abstract: dict | None) -> dict[str, dict[Path, tuple[int, ...]]]:
  if abstract is None:
    return {}
  params = abstract["params"]
  return {s: {p: tuple(v.shape[1:]) for p, v in _flatten(params[s], lambda a: a).items()}
          for s in ("dense_layers", "moe_layers") if s in params}


def _flatten(tree: Mapping, fn=np.asarray, prefix: Path = ()) -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, fn, (*prefix, key)))
    else:
      out[(*prefix, key)] = fn(value)
  return out


def _nest(tree: dict, root: str, flat: dict[Path, np.ndarray]) -> None:
  for path, value in flat.items():
    node = tree.setdefault(root, {})
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
