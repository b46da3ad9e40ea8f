"""Orbax checkpoints of a whole run: train state (params, optimizer states, step, rng, controllers) plus the
data pipeline position and small JSON extras, with interval, max_to_keep and async save.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from cotsafe_jax.errors import CotsafeError


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs with shardings: the restore target that puts each array back on its devices."""
  def one(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x
  return jax.tree.map(one, tree)


class Checkpointer:
  """Saves every `save_interval_steps` steps (and when forced), keeps the newest `max_to_keep`."""

  def __init__(self, directory: str, *, save_interval_steps: int = 100, max_to_keep: int | None = 3,
               async_save: bool = True):
    if save_interval_steps < 1:
      raise CotsafeError(f"checkpointing: save_interval_steps={save_interval_steps} must be >= 1")
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(save_interval_steps=save_interval_steps, max_to_keep=max_to_keep,
                                           enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data", "extra"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, *, data: dict[str, Any] | None = None,
           extra: dict[str, Any] | None = None, force: bool = False) -> bool:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data or {}),
                              extra=ocp.args.JsonSave(extra or {}))
    return self._manager.save(step, args=args, force=force)

  def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(state, data, extra) of `step`; `target` (a live state or abstract_like of one) gives the shardings."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_like(target)), data=ocp.args.JsonRestore(),
                              extra=ocp.args.JsonRestore())
    out = self._manager.restore(step, args=args)
    return out["state"], dict(out["data"] or {}), dict(out["extra"] or {})

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
