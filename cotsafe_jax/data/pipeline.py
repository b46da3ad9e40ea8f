"""A grain pipeline over rows: seeded shuffle, repeat, global batches (optionally mixed by kind), host shards.

The position is one integer (the next batch index), so a resumed run sees exactly the same next batches.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from cotsafe_jax.errors import CotsafeError

_KINDS = ("harmful", "benign", "reasoning")
_ENDLESS = 2**62


def kind_counts(mixture: Mapping[str, float], batch_size: int) -> dict[str, int]:
  """Rows of each kind in every batch: largest-remainder rounding of batch_size * proportion."""
  bad = [k for k in mixture if k not in _KINDS]
  if bad:
    raise CotsafeError(f"mixture kind {bad[0]!r}, expected one of {'|'.join(_KINDS)}")
  weights = {k: float(w) for k, w in mixture.items()}
  if any(not math.isfinite(w) or w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
    raise CotsafeError(f"mixture {dict(mixture)}, expected non-negative proportions with a positive sum")
  total = sum(weights.values())
  exact = {k: batch_size * w / total for k, w in weights.items()}
  counts = {k: int(v) for k, v in exact.items()}
  order = sorted(weights, key=lambda k: (counts[k] - exact[k], _KINDS.index(k)))
  for k in order[:batch_size - sum(counts.values())]:
    counts[k] += 1
  for k, w in weights.items():
    if w > 0 and counts[k] == 0:
      raise CotsafeError(f"mixture {dict(mixture)} gives kind {k!r} no row in a batch of {batch_size}, "
                         "expected a batch size large enough for every kind with a positive proportion")
  return counts


class _BatchLayout(grain.transforms.DatasetSelectionMap):
  """Global index -> (kind dataset, index in it): each batch holds exactly `counts` rows per kind,
  spread evenly over the batch so every host's contiguous shard gets its share of every kind."""

  def __init__(self, counts: Sequence[int], batch_size: int):
    self._counts = tuple(counts)
    self._batch_size = batch_size
    slots = sorted(((r + 0.5) / c, k, r) for k, c in enumerate(counts) for r in range(c))
    self._slots = tuple((k, r) for _, k, r in slots)

  def __len__(self) -> int:
    return (_ENDLESS // self._batch_size) * self._batch_size  # endless, and a whole number of batches

  def __getitem__(self, index: int) -> tuple[int, int]:
    b, j = divmod(index, self._batch_size)
    k, r = self._slots[j]
    return k, b * self._counts[k] + r


class _Shuffled:
  """Index -> row: every epoch of the rows in its own seeded permutation (numpy, cached per epoch).

  grain's `shuffle` permutes one index at a time (about 1 ms each on a busy CPU); a whole numpy permutation
  per epoch costs microseconds and gives the same guarantees: each epoch visits every row once.
  """

  def __init__(self, rows: Sequence[dict[str, Any]], seed: Sequence[int]):
    self._rows, self._seed = list(rows), tuple(seed)
    self._cache: dict[int, np.ndarray] = {}

  def __call__(self, index: int) -> dict[str, Any]:
    epoch, j = divmod(index, len(self._rows))
    perm = self._cache.get(epoch)
    if perm is None:
      if len(self._cache) > 2:
        self._cache.clear()
      perm = self._cache[epoch] = np.random.default_rng([*self._seed, epoch]).permutation(len(self._rows))
    return dict(self._rows[perm[j]])  # a copy: consumers may edit their batch


def _fingerprint(rows: Sequence[Mapping[str, Any]], **config: Any) -> str:
  h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
  for row in rows:
    h.update(json.dumps(row, sort_keys=True, default=str).encode())
  return h.hexdigest()[:16]


@dataclasses.dataclass
class BatchIterator:
  """Iterates this process's shard of every global batch. `get_state()` / `set_state()` checkpoint it."""
  dataset: grain.MapDataset  # this process's batches, random access by batch index
  fingerprint: str
  kind_counts: dict[str, int] | None
  step: int = 0

  def __iter__(self) -> "BatchIterator":
    return self

  def __next__(self) -> list[dict[str, Any]]:
    if self.step >= len(self.dataset):
      raise StopIteration
    batch = self.dataset[self.step]
    self.step += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"step": self.step, "fingerprint": self.fingerprint}

  def set_state(self, state: Mapping[str, Any]) -> None:
    if not isinstance(state, Mapping) or not isinstance(state.get("step"), (int, np.integer)) or state["step"] < 0:
      raise CotsafeError(f"data position {state!r}, expected {{'step': int >= 0, 'fingerprint': str}}")
    if state.get("fingerprint") != self.fingerprint:
      raise CotsafeError(f"data position was saved by a different pipeline (fingerprint "
                         f"{state.get('fingerprint')}, this one {self.fingerprint}), expected the same rows, "
                         "seed, batch_size, mixture and num_epochs")
    self.step = int(state["step"])


def make_pipeline(rows: Sequence[Mapping[str, Any]], *, batch_size: int, seed: int,
                  mixture: Mapping[str, float] | None = None, num_epochs: int | None = None,
                  process_index: int | None = None, process_count: int | None = None) -> BatchIterator:
  """Batches of rows (lists of dicts) for this process.

  batch_size: the global batch; process p of P gets rows [p*B/P, (p+1)*B/P) of each global batch (default
  p, P from jax), so the global stream, and a saved position, do not depend on P.
  Without `mixture`: the rows are shuffled with `seed`, reshuffled every epoch and repeated `num_epochs`
  times (None: forever); a batch may straddle two epochs; a last partial batch is dropped.
  With `mixture` (e.g. {"harmful": 0.4, "benign": 0.2, "reasoning": 0.4}): every batch holds
  kind_counts(mixture, batch_size) rows of each kind, each kind shuffled and repeated on its own, forever;
  a kind with proportion 0 is left out.
  """
  if process_index is None or process_count is None:
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not rows:
    raise CotsafeError("make_pipeline: no rows, expected at least one")
  if batch_size < 1 or process_count < 1 or batch_size % process_count:
    raise CotsafeError(f"make_pipeline: batch_size={batch_size} over {process_count} processes, expected a "
                       "positive multiple of the process count")
  if not 0 <= process_index < process_count:
    raise CotsafeError(f"make_pipeline: process_index={process_index}, expected 0 <= it < {process_count}")
  if seed < 0:
    raise CotsafeError(f"make_pipeline: seed={seed}, expected seed >= 0")
  if num_epochs is not None and (num_epochs < 1 or mixture is not None):
    raise CotsafeError(f"make_pipeline: num_epochs={num_epochs}, expected None or >= 1, and None with a "
                       "mixture (mixed streams are endless)")
  rows = [dict(r) for r in rows]
  counts = None
  if mixture is None:
    length = len(rows) * num_epochs if num_epochs is not None else _ENDLESS
    ds = grain.MapDataset.range(length).map(_Shuffled(rows, [seed]))
  else:
    counts = kind_counts(mixture, batch_size)
    by_kind = {k: [r for r in rows if r.get("kind") == k] for k in _KINDS}
    stray = sorted({str(r.get("kind")) for r in rows} - set(mixture))
    if stray:
      raise CotsafeError(f"make_pipeline: rows of kind {stray[0]} have no mixture proportion, expected "
                         f"one for every kind in the rows (0 leaves a kind out)")
    used = [k for k in _KINDS if counts.get(k, 0) > 0]
    for k in used:
      if not by_kind[k]:
        raise CotsafeError(f"make_pipeline: mixture gives kind {k!r} proportion {mixture[k]}, but no row "
                           "has that kind")
    parts = [grain.MapDataset.range(_ENDLESS).map(_Shuffled(by_kind[k], [seed, 1 + _KINDS.index(k)]))
             for k in used]
    ds = grain.MapDataset.select_from_datasets(parts, _BatchLayout([counts[k] for k in used], batch_size))
  local = batch_size // process_count
  lo = process_index * local
  # whole batches only: fixed shapes, one jit
  ds = ds.batch(batch_size, drop_remainder=True, batch_fn=list)
  ds = ds.map(lambda batch: batch[lo:lo + local])
  fp = _fingerprint(rows, batch_size=batch_size, seed=seed, mixture=counts, num_epochs=num_epochs)
  return BatchIterator(ds, fp, counts)
