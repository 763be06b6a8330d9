"""Logical axes, the table that maps them onto the mesh, and the activation-constraint helper.

Shape-suffix key, used for local tensor names and einsum strings throughout the package:

  B batch            S query positions      T key/cache positions   D model dim (`dim`)
  H attention heads  K qk nope head dim     R qk rope head dim      V v head dim
  Q q latent (`q_lora_rank`)  C kv latent (`kv_lora_rank`)          F MLP hidden
  E routed experts   G expert groups        N routed slots (tokens x top-k)
  M rows of one expert tile   X vocabulary  L layers                W token positions, flattened (B*S)

This is the only module that names mesh axes.
"""

from __future__ import annotations

import flax.linen as nn
import jax

MESH_AXES = ("pipe", "data", "fsdp", "expert", "tensor")

# Logical axis -> mesh axes. Parameters and activations speak only logical names.
LOGICAL_RULES = (
    ("batch", ("data", "fsdp", "expert")),
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


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
  """Constrains an activation's sharding by logical axes; a no-op outside a mesh + rules context."""
  return nn.with_logical_constraint(x, logical_axes)
