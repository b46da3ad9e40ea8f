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


def _stream_seed(name: str) -> int:
  """A stream's shuffle seed from its name: adding or dropping another source leaves its order alone."""
  return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:4], "little")


@dataclasses.dataclass
class _Stream:
  """One source's rows (of one kind, with a kind mixture) in endless seeded epochs, drawn at a fixed share."""
  name: str
  rows: _Shuffled
  size: int
  share: float  # of its group's rows per batch


class _WeightedBatches:
  """Global batch b of a weighted mixture. Every group (a kind with a kind mixture, else the whole batch) of
  n rows gives each of its streams floor(n * share) rows per batch plus, in turn, the rows left over: the
  streams with the largest carried remainder sum(n * share - rows given) get one more. So after b batches a
  stream has had its b * n * share rows to within one, and every stream with a positive share gets rows
  even when n * share < 1. Each stream continues where it stopped (offset); batches are built in order, and
  state() / restore() hold the offsets and remainders."""

  def __init__(self, groups: Sequence[tuple[int, Sequence[_Stream]]], batch_size: int):
    self.groups = [(n, list(streams)) for n, streams in groups]
    self.batch_size = batch_size
    self.streams = [st for _, streams in self.groups for st in streams]
    self.offset = {st.name: 0 for st in self.streams}
    self.carry = {st.name: 0.0 for st in self.streams}
    self.step = 0

  def _counts(self) -> dict[str, int]:
    """Rows of each stream in the next batch; advances the carried remainders."""
    counts = {}
    for n, streams in self.groups:
      base = {st.name: int(n * st.share) for st in streams}
      left = n - sum(base.values())
      for st in streams:
        self.carry[st.name] += n * st.share - base[st.name]
      order = sorted(range(len(streams)), key=lambda j: (-self.carry[streams[j].name], j))
      for j in order[:left]:
        base[streams[j].name] += 1
        self.carry[streams[j].name] -= 1.0
      counts.update(base)
    return counts

  def next(self) -> list[dict[str, Any]]:
    counts = self._counts()
    # slots spread evenly over the batch, so every host's contiguous shard gets its share of every stream
    slots = sorted(((r + 0.5) / c, j, r) for j, st in enumerate(self.streams)
                   for c in [counts[st.name]] for r in range(c))
    batch = [self.streams[j].rows(self.offset[self.streams[j].name] + r) for _, j, r in slots]
    for st in self.streams:
      self.offset[st.name] += counts[st.name]
    self.step += 1
    return batch

  def seek(self, step: int) -> None:
    """Replay the layout (counts only, no rows) from the start to batch `step`."""
    self.offset = {st.name: 0 for st in self.streams}
    self.carry = {st.name: 0.0 for st in self.streams}
    for _ in range(step):
      for name, c in self._counts().items():
        self.offset[name] += c
    self.step = step

  def state(self) -> dict[str, dict[str, float]]:
    return {st.name: {"offset": self.offset[st.name], "carry": self.carry[st.name]} for st in self.streams}

  def restore(self, step: int, streams: Mapping[str, Mapping[str, Any]]) -> None:
    if set(streams) != set(self.offset):
      raise CotsafeError(f"data position holds streams {sorted(streams)}, this pipeline {sorted(self.offset)}, "
                         "expected the same sources")
    self.offset = {k: int(v["offset"]) for k, v in streams.items()}
    self.carry = {k: float(v["carry"]) for k, v in streams.items()}
    self.step = step


@dataclasses.dataclass
class BatchIterator:
  """Iterates this process's shard of every global batch. `get_state()` / `set_state()` checkpoint it.

  The state holds the next batch's index, a fingerprint of the rows and settings, and, when rows name their
  `source`, each source's position: `sources[name]` = {rows_seen (rows of it in the global batches so far),
  rows (its size), epoch (rows_seen // rows)}; a weighted mixture adds each stream's offset and carried
  remainder (`streams`), from which it resumes."""
  dataset: Any  # global batches by index (grain MapDataset), or a _WeightedBatches
  fingerprint: str
  kind_counts: dict[str, int] | None
  step: int = 0
  lo: int = 0
  local: int = 0
  source_sizes: dict[str, int] = dataclasses.field(default_factory=dict)
  rows_seen: dict[str, int] = dataclasses.field(default_factory=dict)

  def __iter__(self) -> "BatchIterator":
    return self

  def _global(self) -> list[dict[str, Any]]:
    if isinstance(self.dataset, _WeightedBatches):
      if self.dataset.step != self.step:
        self.dataset.seek(self.step)
      return self.dataset.next()
    if self.step >= len(self.dataset):
      raise StopIteration
    return self.dataset[self.step]

  def __next__(self) -> list[dict[str, Any]]:
    batch = self._global()
    self.step += 1
    for row in batch:
      if "source" in row:
        self.rows_seen[row["source"]] = self.rows_seen.get(row["source"], 0) + 1
    return batch[self.lo:self.lo + self.local]

  def positions(self) -> dict[str, dict[str, int]]:
    """Each source's position: rows of it drawn so far (all processes), its size, the epoch it is in."""
    return {name: {"rows_seen": self.rows_seen.get(name, 0), "rows": n, "epoch": self.rows_seen.get(name, 0) // n}
            for name, n in self.source_sizes.items()}

  def get_state(self) -> dict[str, Any]:
    state: dict[str, Any] = {"step": self.step, "fingerprint": self.fingerprint}
    if self.source_sizes:
      state["sources"] = self.positions()
    if isinstance(self.dataset, _WeightedBatches):
      if self.dataset.step != self.step:
        self.dataset.seek(self.step)
      state["streams"] = self.dataset.state()
    return state

  def set_state(self, state: Mapping[str, Any]) -> None:
    if not isinstance(state, Mapping) or not isinstance(state.get("step"), (int, np.integer)) or state["step"] < 0:
      raise CotsafeError(f"data position {state!r}, expected {{'step': int >= 0, 'fingerprint': str}}")
    if state.get("fingerprint") != self.fingerprint:
      raise CotsafeError(f"data position was saved by a different pipeline (fingerprint "
                         f"{state.get('fingerprint')}, this one {self.fingerprint}), expected the same rows, "
                         "seed, batch_size, mixture, weights and num_epochs")
    self.seek(int(state["step"]), saved=state)

  def seek(self, step: int, *, saved: Mapping[str, Any] | None = None) -> None:
    """Position the iterator before global batch `step` (each source's position too): from a saved state's
    per-source positions when given, else by replaying the batch layout."""
    if isinstance(self.dataset, _WeightedBatches):
      if saved is not None and "streams" in saved:
        self.dataset.restore(step, saved["streams"])
      else:
        self.dataset.seek(step)
    if saved is not None and "sources" in saved:
      self.rows_seen = {name: int(p["rows_seen"]) for name, p in saved["sources"].items()}
    elif self.source_sizes:  # replay: count the sources of every earlier global batch
      self.rows_seen = {}
      replay = self.dataset if not isinstance(self.dataset, _WeightedBatches) else None
      if replay is None:
        for name, p in self.dataset.offset.items():
          src = name.split("|")[0]
          self.rows_seen[src] = self.rows_seen.get(src, 0) + p
      else:
        for b in range(step):
          for row in replay[b]:
            if "source" in row:
              self.rows_seen[row["source"]] = self.rows_seen.get(row["source"], 0) + 1
    self.step = step


def _weighted_groups(rows: Sequence[Mapping[str, Any]], weights: Mapping[str, float], counts: dict[str, int] | None,
                     batch_size: int, seed: int) -> list[tuple[int, list[_Stream]]]:
  """Streams of a weighted mixture: one per source (with a kind mixture: one per source and kind, the kind's
  rows shared among its sources by weight). Sources of weight 0 are left out."""
  by_source: dict[str, list[dict[str, Any]]] = {}
  for r in rows:
    if "source" not in r:
      raise CotsafeError("make_pipeline: weights are given but a row has no \"source\" field, expected rows "
                         "tagged by load_sources")
    by_source.setdefault(r["source"], []).append(r)
  unknown = sorted(set(by_source) - set(weights))
  if unknown:
    raise CotsafeError(f"make_pipeline: source {unknown[0]!r} has rows but no weight, expected a weight for "
                       f"every source ({sorted(weights)})")
  for name, w in weights.items():
    if not math.isfinite(float(w)) or float(w) < 0:
      raise CotsafeError(f"make_pipeline: weight {w} of source {name!r}, expected a finite number >= 0")
  groups: list[tuple[int, list[tuple[str, list, float]]]] = []
  if counts is None:
    parts = [(name, by_source[name], float(weights[name])) for name in weights
             if name in by_source and float(weights[name]) > 0]
    groups.append((batch_size, parts))
  else:
    for kind, n in counts.items():
      parts = [(f"{name}|{kind}", [r for r in by_source.get(name, []) if r.get("kind") == kind], float(w))
               for name, w in weights.items() if float(w) > 0]
      parts = [p for p in parts if p[1]]
      if not parts:
        raise CotsafeError(f"make_pipeline: the mixture gives kind {kind!r} {n} rows per batch, but no source "
                           "with a positive weight has rows of that kind")
      groups.append((n, parts))
  out = []
  for n, parts in groups:
    total = sum(w for _, _, w in parts)
    if not parts or total <= 0:
      raise CotsafeError(f"make_pipeline: weights {dict(weights)} give no source a positive share, expected at "
                         "least one weight > 0")
    out.append((n, [_Stream(name, _Shuffled(part, [seed, _stream_seed(name)]), len(part), w / total)
                    for name, part, w in parts]))
  return out


def make_pipeline(rows: Sequence[Mapping[str, Any]], *, batch_size: int, seed: int,
                  mixture: Mapping[str, float] | None = None, num_epochs: int | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  weights: Mapping[str, float] | None = None) -> BatchIterator:
  """Batches of rows (lists of dicts) for this process.

  batch_size: the global batch; process p of P gets rows [p*B/P, (p+1)*B/P) of each global batch (default
  p, P from jax), so the global stream, and a saved position, do not depend on P.
  Without `mixture`: the rows are shuffled with `seed`, reshuffled every epoch and repeated `num_epochs`
  times (None: forever); a batch may straddle two epochs; a last partial batch is dropped.
  With `mixture` (e.g. {"harmful": 0.4, "benign": 0.2, "reasoning": 0.4}): every batch holds
  kind_counts(mixture, batch_size) rows of each kind, each kind shuffled and repeated on its own, forever;
  a kind with proportion 0 is left out.
  With `weights` ({source name: weight}; rows carry `source`): every source is its own stream, shuffled and
  repeated on its own (seeded by `seed` and its name), and gives each batch its share weight / sum of
  weights of the rows (of each kind's rows, with a mixture), in whole rows: see _WeightedBatches. Endless.
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
  if num_epochs is not None and (num_epochs < 1 or mixture is not None or weights is not None):
    raise CotsafeError(f"make_pipeline: num_epochs={num_epochs}, expected None or >= 1, and None with a "
                       "mixture or source weights (mixed streams are endless: set a number of steps)")
  rows = [dict(r) for r in rows]
  counts = None
  if mixture is not None:
    counts = kind_counts(mixture, batch_size)
    stray = sorted({str(r.get("kind")) for r in rows} - set(mixture))
    if stray:
      raise CotsafeError(f"make_pipeline: rows of kind {stray[0]} have no mixture proportion, expected "
                         f"one for every kind in the rows (0 leaves a kind out)")
  used = None if counts is None else {k: counts[k] for k in _KINDS if counts.get(k, 0) > 0}
  if weights is not None:
    groups = _weighted_groups(rows, weights, used, batch_size, seed)
    ds: Any = _WeightedBatches(groups, batch_size)
  elif mixture is None:
    length = len(rows) * num_epochs if num_epochs is not None else _ENDLESS
    ds = grain.MapDataset.range(length).map(_Shuffled(rows, [seed]))
  else:
    by_kind = {k: [r for r in rows if r.get("kind") == k] for k in _KINDS}
    for k in used:
      if not by_kind[k]:
        raise CotsafeError(f"make_pipeline: mixture gives kind {k!r} proportion {mixture[k]}, but no row "
                           "has that kind")
    parts = [grain.MapDataset.range(_ENDLESS).map(_Shuffled(by_kind[k], [seed, 1 + _KINDS.index(k)]))
             for k in used]
    ds = grain.MapDataset.select_from_datasets(parts, _BatchLayout(list(used.values()), batch_size))
  if not isinstance(ds, _WeightedBatches):
    # whole batches only: fixed shapes, one jit
    ds = ds.batch(batch_size, drop_remainder=True, batch_fn=list)
  local = batch_size // process_count
  sizes: dict[str, int] = {}
  for r in rows:
    if "source" in r:
      sizes[r["source"]] = sizes.get(r["source"], 0) + 1
  config: dict[str, Any] = dict(batch_size=batch_size, seed=seed, mixture=counts, num_epochs=num_epochs)
  if weights is not None:
    config["weights"] = {k: float(v) for k, v in sorted(weights.items())}
  fp = _fingerprint(rows, **config)
  return BatchIterator(ds, fp, counts, lo=process_index * local, local=local, source_sizes=sizes)
