"""Parameter counts read off the shapes of the real model init (`jax.eval_shape`: nothing is allocated).

Counting the traced init, rather than a formula, keeps the figures true to whatever the modules create.
Both the 'params' and the 'routing' collection count: HF's totals include the MoE correction biases
(`e_score_correction_bias` buffers), so ours do too (numerics §8).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any
from typing import NamedTuple

import jax

from dsv3_jax import config as config_lib
from dsv3_jax import model as model_lib
from dsv3_jax import moe as moe_lib

_COLLECTIONS = ("params", moe_lib.ROUTING)
_EXPERT_WEIGHTS = ("w1", "w2", "w3")


@dataclasses.dataclass(frozen=True)
class ParamCount:
  """Totals for the main model and the MTP modules; 'activated' is what one token uses."""

  total: int  # main model: everything outside the mtp_* subtrees
  activated: int  # main model, routed experts at n_activated/n_routed, the rest (embedding included) fully
  mtp: int  # the MTP modules' own parameters; the embedding and head are shared, so not counted
  mtp_activated: int


class _Leaf(NamedTuple):
  path: tuple[str, ...]  # keys below the collection, e.g. ("moe_layers", "ffn", "experts", "w1")
  size: int
  active: int  # the share of `size` one token uses


def variable_shapes(cfg: config_lib.ModelConfig) -> dict[str, Any]:
  """ShapeDtypeStructs of the initial variables {"params", "routing"}, traced without allocating."""
  return jax.eval_shape(lambda: model_lib.init(cfg, jax.random.key(0)))


def count(cfg: config_lib.ModelConfig, shapes: dict[str, Any] | None = None) -> ParamCount:
  """Main-model and MTP totals, full and activated per token."""
  leaves = _leaves(cfg, shapes or variable_shapes(cfg))
  main = [leaf for leaf in leaves if not _is_mtp(leaf.path)]
  mtp = [leaf for leaf in leaves if _is_mtp(leaf.path)]
  return ParamCount(
      total=sum(leaf.size for leaf in main),
      activated=sum(leaf.active for leaf in main),
      mtp=sum(leaf.size for leaf in mtp),
      mtp_activated=sum(leaf.active for leaf in mtp),
  )


def pieces(cfg: config_lib.ModelConfig, shapes: dict[str, Any] | None = None) -> dict[str, int]:
  """Per-layer figures as in numerics §8: attention, dense layer, MoE layer (full, activated), expert, embedding."""
  leaves = _leaves(cfg, shapes or variable_shapes(cfg))

  def per(prefix: tuple[str, ...], n: int, active: bool = False) -> int:
    # Stacked leaves carry a leading layer (and expert) axis, so the division is exact.
    return sum(leaf.active if active else leaf.size for leaf in leaves if leaf.path[:len(prefix)] == prefix) // n

  out = {"embedding": per(("embed",), 1), "head": per(("head",), 1)}
  stack, n = ("moe_layers", cfg.n_moe_layers) if cfg.n_moe_layers else ("dense_layers", cfg.n_dense_layers)
  out["attention"] = per((stack, "attn"), n)
  if cfg.n_dense_layers:
    out["dense layer"] = per(("dense_layers",), cfg.n_dense_layers)
  if cfg.n_moe_layers:
    out["moe layer"] = per(("moe_layers",), cfg.n_moe_layers)
    out["moe layer activated"] = per(("moe_layers",), cfg.n_moe_layers, active=True)
    out["expert"] = per(("moe_layers", "ffn", "experts"), cfg.n_moe_layers * cfg.n_routed_experts)
  return out


def _leaves(cfg: config_lib.ModelConfig, shapes: dict[str, Any]) -> list[_Leaf]:
  out = []
  for collection in _COLLECTIONS:
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes.get(collection, {}))[0]:
      keys = tuple(str(getattr(k, "key", k)) for k in path)
      size = math.prod(leaf.shape)
      # A routed-expert stack has the expert axis, so size is a multiple of n_routed_experts.
      active = size // cfg.n_routed_experts * cfg.n_activated_experts if _is_routed_expert(keys) else size
      out.append(_Leaf(keys, size, active))
  return out


def _is_mtp(path: tuple[str, ...]) -> bool:
  return path[0].startswith("mtp_")


def _is_routed_expert(path: tuple[str, ...]) -> bool:
  return path[-3:-1] == ("ffn", "experts") and path[-1] in _EXPERT_WEIGHTS
