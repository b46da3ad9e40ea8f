"""A run that cannot silently go wrong: non-finite steps skipped, counted and logged, and a stop after several
in a row; loss spikes (above the running median + `mads` median absolute deviations) counted.

Each trainer's jitted step leaves params and optimizer state unchanged when its loss or gradients are not
finite; this host-side record keeps the counts, writes the offending rows' ids to <workdir>/nonfinite.jsonl
and says when to stop.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Sequence

import numpy as np

from cotsafe_jax import parallel
from cotsafe_jax.errors import CotsafeError

NONFINITE_LOG = "nonfinite.jsonl"
_log = logging.getLogger(__name__)


class StepGuard:
  """Per-step bookkeeping of non-finite steps and loss spikes for one job."""

  def __init__(self, workdir: str, *, job: str, max_nonfinite_steps: int = 3, window: int = 100,
               mads: float = 6.0, min_history: int = 10):
    if max_nonfinite_steps < 1:
      raise CotsafeError(f"{job}.max_nonfinite_steps={max_nonfinite_steps}, expected >= 1")
    self.workdir, self.job, self.max_nonfinite_steps = workdir, job, max_nonfinite_steps
    self.window, self.mads, self.min_history = window, mads, min_history
    self.run = self.total = self.spikes = 0
    self.history: list[float] = []

  def is_spike(self, loss: float) -> bool:
    """loss > median + mads * MAD of the last `window` finite losses (after `min_history` of them)."""
    h = self.history[-self.window:]
    if len(h) < self.min_history or not math.isfinite(loss):
      return False
    med = float(np.median(h))
    mad = float(np.median(np.abs(np.asarray(h) - med)))
    return loss > med + self.mads * max(mad, 1e-12)

  def observe(self, step: int, *, finite: bool, loss: float, row_ids: Sequence[Any] = ()) -> dict[str, float]:
    """Record one step; returns its guard metrics. `finite`: the step's update was applied."""
    self.spikes += int(finite and self.is_spike(loss))
    if finite and math.isfinite(loss):
      self.history.append(float(loss))
    self.run = 0 if finite else self.run + 1
    self.total += int(not finite)
    if not finite:
      _log.warning("%s: step %d has non-finite losses or gradients: skipped (params unchanged); rows %s",
                   self.job, step, list(row_ids)[:16])
      if parallel.is_main_process():
        with open(os.path.join(self.workdir, NONFINITE_LOG), "a") as f:
          f.write(json.dumps({"step": step, "row_ids": [str(i) for i in row_ids], "loss": _num(loss)}) + "\n")
    return {"guard/nonfinite_steps": float(self.total), "guard/skipped": float(not finite),
            "guard/loss_spikes": float(self.spikes)}

  @property
  def must_stop(self) -> bool:
    return self.run >= self.max_nonfinite_steps

  def error(self, step: int) -> CotsafeError:
    return CotsafeError(f"{self.job}: {self.run} steps in a row with non-finite losses or gradients (steps "
                        f"{step + 1 - self.run}-{step}; their rows in {os.path.join(self.workdir, NONFINITE_LOG)}); "
                        f"params unchanged since step {step - self.run}, the last checkpoint intact: lower the "
                        "learning rate, or check the data and rewards")

  def state(self) -> dict[str, Any]:
    return {"run": self.run, "total": self.total, "spikes": self.spikes, "history": self.history[-self.window:]}

  def restore(self, saved: dict[str, Any] | None) -> None:
    if saved:
      self.run, self.total, self.spikes = int(saved["run"]), int(saved["total"]), int(saved["spikes"])
      self.history = [float(x) for x in saved.get("history", [])]


def _num(x: float) -> float | str:
  return float(x) if math.isfinite(x) else str(x)
