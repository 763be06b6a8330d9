"""Auxiliary-loss-free load balancing (paper §2.1.2): the routing bias update after each step.

b_i += gamma * sign(mean_load - load_i), from the expert loads of the whole global batch (all
devices and micro-batches). The bias only steers selection; it never enters the optimizer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv3_jax import config as config_lib


def update_bias(routing: dict, expert_load_LE: jax.Array, gamma: jax.Array | float,
                cfg: config_lib.ModelConfig) -> dict:
  """New `routing` collection; expert_load rows are the MoE stack's layers, then the MTP depths."""
  delta_LE = gamma * jnp.sign(jnp.mean(expert_load_LE, axis=-1, keepdims=True) - expert_load_LE)
  routing = jax.tree.map(lambda a: a, routing)  # a fresh container; leaves are replaced below
  rows = 0
  if cfg.n_moe_layers:
    gate = routing["moe_layers"]["ffn"]["gate"]
    gate["bias"] = gate["bias"] + delta_LE[:cfg.n_moe_layers]
    rows = cfg.n_moe_layers
  for k in range(cfg.n_mtp_layers):
    gate = routing[f"mtp_{k}"]["block"]["ffn"]["gate"]
    gate["bias"] = gate["bias"] + delta_LE[rows + k]
  return routing

