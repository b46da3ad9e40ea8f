"""Orbax checkpoints of a whole run: train state (params, optimizer states, step, rng, controllers) plus the
data pipeline position and small JSON extras, with interval, max_to_keep and async save.

Multi-process: every process calls save / restore together; orbax writes each array's shards from the process
that holds them and the JSON items and metadata from process 0. A checkpoint restores under any number of
processes and any mesh (the target's shardings decide where each shard goes). The directory may be a local
path or a gs:// URL (orbax writes there through TensorStore).
"""
from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp

from cotsafe_jax import paths
from cotsafe_jax.errors import CotsafeError


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs with shardings: the restore target that puts each array back on its devices."""
  def one(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x
  return jax.tree.map(one, tree)


def _key(entry: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(_key(e) for e in path): tuple(getattr(x, "shape", ())) for path, x in leaves}


class Checkpointer:
  """Saves every `save_interval_steps` steps (and when forced), keeps the newest `max_to_keep`.

  A save is written into `<step>.orbax-checkpoint-tmp` and renamed to `<step>` once complete, so a process
  killed mid-save (kill -9, preemption) leaves the previous step as the latest, restorable; the unfinished
  temporary dir is deleted when the next Checkpointer opens the directory.
  """

  def __init__(self, directory: str, *, save_interval_steps: int = 100, max_to_keep: int | None = 3,
               async_save: bool = True):
    if save_interval_steps < 1:
      raise CotsafeError(f"checkpointing: save_interval_steps={save_interval_steps} must be >= 1")
    self.directory = paths.resolve(directory)  # absolute when local; a gs:// URL as it is
    options = ocp.CheckpointManagerOptions(save_interval_steps=save_interval_steps, max_to_keep=max_to_keep,
                                           enable_async_checkpointing=async_save, create=True,
                                           cleanup_tmp_directories=True)
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                "extra": ocp.JsonCheckpointHandler()}  # known up front: a restore can read the saved shapes
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, *, data: dict[str, Any] | None = None,
           extra: dict[str, Any] | None = None, force: bool = False) -> bool:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data or {}),
                              extra=ocp.args.JsonSave(extra or {}))
    return self._manager.save(step, args=args, force=force)

  def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(state, data, extra) of `step`; `target` (a live state or abstract_like of one) gives the shardings.

    A checkpoint whose tree or shapes differ from `target` (another model, optimizer or run config) is a
    CotsafeError naming the step dir and, where it can, the first differing array.
    """
    where = paths.join(self.directory, str(step))

    def error(detail: str) -> CotsafeError:
      return CotsafeError(f"{where}: checkpoint does not fit this run's state ({detail}), expected a checkpoint "
                          "of the same model, optimizer and config; use a new workdir to start over")
    # checked before orbax reads anything: its failed reads leave noisy "Exception ignored" reports on stderr
    mismatch = self._mismatch(step, target)
    if mismatch is not None:
      raise error(mismatch)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_like(target)), data=ocp.args.JsonRestore(),
                              extra=ocp.args.JsonRestore())
    try:
      out = self._manager.restore(step, args=args)
    except (ValueError, KeyError, TypeError) as e:  # orbax: tree structure, shape or dtype mismatch
      raise error(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    return out["state"], dict(out["data"] or {}), dict(out["extra"] or {})

  def _mismatch(self, step: int, target: Any) -> str | None:
    """The first array whose path or shape differs between the saved state and `target`; None when they
    agree or the saved shapes cannot be read (orbax then checks on its own)."""
    try:
      saved = _shapes_by_path(self._manager.item_metadata(step)["state"])
    except Exception:  # noqa: BLE001 - only for a clearer message; the caller has orbax's own
      return None
    wanted = _shapes_by_path(target)
    problems = []  # (depth, path, text): the shallowest first, so params show before their optimizer moments
    for path in set(saved) | set(wanted):
      if path not in saved:
        text = f"{path} {list(wanted[path])} is not in the checkpoint"
      elif path not in wanted:
        text = f"the checkpoint has {path} {list(saved[path])}, this run has none"
      elif saved[path] != wanted[path]:
        text = f"{path} is {list(saved[path])} in the checkpoint, {list(wanted[path])} in this run"
      else:
        continue
      problems.append((path.count("/"), path, text))
    if not problems:
      return None
    problems.sort()
    more = f"; {len(problems) - 1} more arrays differ" if len(problems) > 1 else ""
    return problems[0][2] + more

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
