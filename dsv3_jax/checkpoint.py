"""Training checkpoints (orbax): the train state plus a JSON record of the host-side position.

A checkpoint directory is written under a temporary name and renamed when complete, so a process
killed mid-write leaves the previous checkpoint as the latest one; `cleanup_tmp_directories`
removes the debris on the next start.

A sharded state is written by every process (each its own shards) and restored onto whatever mesh and
process count `target` describes: orbax reshards on read.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpoints:
  """Async save every `every` steps, keep the newest `keep`, restore the latest."""

  def __init__(self, directory: str, every: int, keep: int):
    self.every = every
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                             cleanup_tmp_directories=True, create=True),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def due(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def save(self, step: int, state: Any, host: dict[str, Any]) -> bool:
    """Starts an async save; a failure is logged and leaves the previous checkpoint in place."""
    try:
      return self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            host=ocp.args.JsonSave(host)))
    except Exception as e:  # noqa: BLE001 - a failed save must not end the run
      logging.error("checkpoint at step %d failed (%s: %s); the previous one stays the latest",
                    step, type(e).__name__, e)
      return False

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), host=ocp.args.JsonRestore()))
    return restored["state"], restored["host"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract(tree: Any) -> Any:
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)), tree)


def target(abstract_tree: Any, shardings: Any) -> Any:
  """A restore target: the shapes of `abstract_tree` placed by `shardings` (any mesh, any process count)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)
