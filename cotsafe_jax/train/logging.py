"""Metric writers for a job's workdir: metrics.jsonl, TensorBoard events, tqdm progress, samples, and
(optional) Weights & Biases.

Only the main process writes; on resume, metrics.jsonl rows after the resumed step are dropped. The workdir
may be a cloud URL (gs://...): files go through cotsafe_jax.paths.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import time
import uuid
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
import tqdm
from tensorboardX import SummaryWriter

from cotsafe_jax import paths
from cotsafe_jax.errors import CotsafeError

# more destinations of every logged row: (step, row) -> None, called by the main process's MetricLogger.write
_SINKS: list[Callable[[int, Mapping[str, float]], None]] = []


def _to_float(name: str, value: Any) -> float:
  arr = np.asarray(value)
  if arr.size != 1 or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
    raise CotsafeError(f"MetricLogger: metric {name!r} must be a numeric scalar, got "
                       f"{arr.dtype} of shape {arr.shape}")
  return float(arr.reshape(()))


def _jsonable(value: Any) -> Any:
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    return _jsonable(np.asarray(value).tolist())
  if isinstance(value, float) and not math.isfinite(value):
    return None  # strict JSON has no NaN / Infinity
  return value


def _kept_rows(path: str, last_step: int) -> list[str]:
  lines = paths.read_text(path).splitlines()
  kept = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      step = int(row["step"])
    except (ValueError, KeyError, TypeError) as e:
      if i == len(lines) - 1:
        break
      raise CotsafeError(f"{path}:{i + 1}: not a metrics row with an integer 'step' ({e})") from e
    if step <= last_step:
      kept.append(line)
  return kept


def truncate_metrics(path: str, *, last_step: int) -> int:
  """Keep the rows of a metrics.jsonl with step <= last_step (atomic rewrite); returns rows kept.

  A torn last line (a crash mid-write) is dropped; a bad line elsewhere is an error.
  """
  kept = _kept_rows(path, last_step)
  paths.write_text(path, "".join(line + "\n" for line in kept))
  return len(kept)


class MetricLogger:
  """Per-step metrics to metrics.jsonl (+ TensorBoard, + a tqdm bar with ETA) under workdir.

  resume_step: None for a fresh run (an old metrics.jsonl is replaced); S when resuming from a
  checkpoint taken after step S was logged: rows with step > S are dropped and TensorBoard
  events from step S+1 on are purged, so the files match an uninterrupted run's.

  Time phases: `with logger.phase("rollout"): ...` adds the host wall time to `time/rollout_s` of
  the next `write`; block on the phase's outputs inside it (jax dispatch is asynchronous).
  `add_tokens(n)` counts tokens for `perf/tokens_per_s` = tokens / wall time since the last write.
  `desc` labels the progress bar (the demo runs two trainers at once).
  """

  def __init__(self, workdir: str, *, total_steps: int, is_main: bool | None = None,
               tensorboard: bool = True, resume_step: int | None = None,
               postfix_keys: Sequence[str] = (), desc: str = "train"):
    self.workdir = workdir
    self.is_main = (jax.process_index() == 0) if is_main is None else is_main
    self.metrics_path = paths.join(workdir, "metrics.jsonl")
    self.samples_dir = paths.join(workdir, "samples")
    self._postfix_keys = tuple(postfix_keys)
    self._phases: dict[str, float] = {}
    self._tokens = 0
    self._last_write = time.perf_counter()
    self._file = self._tb = self._bar = None
    if not self.is_main:
      return
    paths.makedirs(workdir)
    keep = ""
    if resume_step is not None and paths.exists(self.metrics_path):
      keep = "".join(line + "\n" for line in _kept_rows(self.metrics_path, resume_step))
    self._file = paths.AppendFile(self.metrics_path, keep=keep)
    if tensorboard:
      purge = None if resume_step is None else resume_step + 1
      paths.register_tensorboard(workdir)
      self._tb = SummaryWriter(logdir=paths.resolve(workdir), purge_step=purge, flush_secs=30)
    self._bar = tqdm.tqdm(total=total_steps, initial=resume_step or 0, dynamic_ncols=True,
                          desc=desc)

  @contextlib.contextmanager
  def phase(self, name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
      yield
    finally:
      self._phases[name] = self._phases.get(name, 0.0) + time.perf_counter() - start

  def add_tokens(self, n: int) -> None:
    self._tokens += int(n)

  def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
    """Log one step: named scalars plus the step's phase times and throughput. Returns the row."""
    now = time.perf_counter()
    row = {name: _to_float(name, v) for name, v in metrics.items()}
    step_s = now - self._last_write
    row["time/step_s"] = step_s
    for name, secs in self._phases.items():
      row[f"time/{name}_s"] = secs
    if self._tokens:
      row["perf/tokens_per_s"] = self._tokens / max(step_s, 1e-9)
    self._phases, self._tokens, self._last_write = {}, 0, now
    if self.is_main:
      self._file.write(json.dumps({"step": int(step), **_jsonable(row)}) + "\n")
      if self._tb is not None:
        for name, v in row.items():
          self._tb.add_scalar(name, v, global_step=int(step))
      self._bar.update(max(0, int(step) - self._bar.n))
      if self._postfix_keys:
        self._bar.set_postfix({k: f"{row[k]:.4g}" for k in self._postfix_keys if k in row})
      for sink in _SINKS:
        sink(int(step), row)
    return row

  def write_samples(self, step: int, rows: Sequence[Mapping[str, Any]]) -> str | None:
    """Write rows (dicts of JSON-able values, arrays allowed) to samples/step_{step}.jsonl."""
    if not self.is_main:
      return None
    path = paths.join(self.samples_dir, f"step_{int(step)}.jsonl")
    return paths.write_text(path, "".join(json.dumps(_jsonable(dict(row)), ensure_ascii=False) + "\n"
                                          for row in rows))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._file is not None:
      self._file.close()
    if self._bar is not None:
      self._bar.close()
    self._file = self._tb = self._bar = None

  def __enter__(self) -> "MetricLogger":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ---- Weights & Biases ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class WandbConfig:
  """Log a job's metrics (every row MetricLogger writes: training and val/ metrics) to Weights & Biases.

  mode: "online", "offline" (a local run dir under <workdir>/wandb, synced later with `wandb sync`; needs no
  network) or "disabled"; None: the WANDB_MODE environment variable, else online. name: the run's name
  (default: the workdir's basename). The run id is kept in <workdir>/wandb_run_id, so a resumed job continues
  the same run. Needs the wandb package (pip install 'cotsafe_jax[wandb]').
  """
  project: str = "cotsafe_jax"
  entity: str | None = None
  name: str | None = None
  mode: str | None = None
  tags: tuple[str, ...] = ()

  def __post_init__(self):
    if self.mode not in (None, "online", "offline", "disabled"):
      raise CotsafeError(f"WandbConfig.mode={self.mode!r}, expected 'online', 'offline', 'disabled' or None")


@contextlib.contextmanager
def wandb_run(config: WandbConfig | None, *, workdir: str, job: str,
              run_config: Mapping[str, Any] | None = None) -> Iterator[Any]:
  """While open, every MetricLogger row of this process (the main one only) also goes to a W&B run in
  `workdir` (see WandbConfig); a no-op when config is None."""
  if config is None or jax.process_index() != 0:
    yield None
    return
  try:
    import wandb
  except ImportError:
    raise CotsafeError("W&B logging is on (WandbConfig) but the wandb package is not installed, expected "
                       "pip install wandb (or 'cotsafe_jax[wandb]')") from None
  id_path = paths.join(workdir, "wandb_run_id")  # the run resumes under its id when the job does
  run_id = paths.read_text(id_path).strip() if paths.exists(id_path) else uuid.uuid4().hex[:8]
  paths.write_text(id_path, run_id + "\n")
  # wandb keeps its own files on a local disk: the workdir itself, or a temp dir when it is a cloud URL
  local = paths.resolve(workdir) if paths.is_local(workdir) else tempfile.mkdtemp(prefix="cotsafe_wandb_")
  run = wandb.init(project=config.project, entity=config.entity, name=config.name or os.path.basename(
      paths.resolve(workdir).rstrip("/")), dir=local, mode=config.mode, id=run_id, resume="allow", job_type=job,
      tags=list(config.tags), config=dict(run_config or {}))

  def sink(step: int, row: Mapping[str, float]) -> None:
    run.log(dict(row), step=step)

  _SINKS.append(sink)
  try:
    yield run
  finally:
    _SINKS.remove(sink)
    run.finish()
