"""Training data from one file or a list of Sources: rows decontaminated against evaluation prompts, a
batch pipeline mixed by source weight, and the mixture's statistics (the jobs' dry run prints them).
"""
from __future__ import annotations

import dataclasses
import math
import re
import unicodedata
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from cotsafe_jax.data import pipeline as pipeline_lib
from cotsafe_jax.data.sources import KINDS, Source, load_rows, load_sources
from cotsafe_jax.errors import CotsafeError

_NON_ALNUM = re.compile(r"[\W_]+", re.UNICODE)


# ---- decontamination ---------------------------------------------------------------------------------------
def normalize_words(text: str) -> tuple[str, ...]:
  """The words of a text as compared for duplicates: Unicode NFKC, case-folded, every run of characters that
  are not letters or digits a word break (punctuation, spacing and markup do not count)."""
  return tuple(_NON_ALNUM.sub(" ", unicodedata.normalize("NFKC", text).casefold()).split())


def word_ngrams(words: Sequence[str], n: int) -> set[tuple[str, ...]]:
  """The set of contiguous n-word sequences; a text of fewer than n words is one gram, all its words."""
  if len(words) <= n:
    return {tuple(words)} if words else set()
  return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def prompt_of(row: Mapping[str, Any]) -> str:
  """The user text of a row: `prompt`, or its user messages joined by blank lines."""
  if row.get("messages"):
    return "\n\n".join(m["content"] for m in row["messages"] if m.get("role") == "user")
  return str(row.get("prompt", ""))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Dedup:
  """Which training rows to drop as duplicates, and how they are found.

  against: evaluation Sources (e.g. the suite of gin/eval/*.gin): a training row whose prompt duplicates one
  of their prompts (all rows of each, whatever its max_rows) is dropped. within: also drop a training row whose
  prompt exactly repeats an earlier training row's (in source order). Two prompts are compared as
  normalize_words gives them:
    exact:  the same word sequence;
    near:   overlap(G(a), G(b)) = |G(a) & G(b)| / min(|G(a)|, |G(b)|) >= threshold, with G the set of word
            `ngram`-grams (word_ngrams), so a training prompt that contains an evaluation prompt (a jailbreak
            wrapped around it) or is contained in one counts; prompts shorter than `ngram` words are compared
            exactly only.
  Response texts are not compared (evaluation sets hold prompts).
  """
  against: Sequence[Source] = ()
  within: bool = False
  ngram: int = 8
  threshold: float = 0.5

  def __post_init__(self):
    if self.ngram < 1 or not 0.0 < self.threshold <= 1.0:
      raise CotsafeError(f"Dedup: ngram={self.ngram}, threshold={self.threshold}, expected ngram >= 1 and "
                         "0 < threshold <= 1")
    bad = [s for s in self.against if not isinstance(s, Source)]
    if bad:
      raise CotsafeError(f"Dedup.against: {bad[0]!r} is not a Source (in gin: a list of @Source())")


class EvalIndex:
  """The prompts of evaluation rows, indexed for `match`: exact word sequences, and word n-grams -> prompts."""

  def __init__(self, rows: Sequence[Mapping[str, Any]], *, ngram: int, threshold: float):
    self.ngram, self.threshold = ngram, threshold
    self.exact: dict[tuple[str, ...], str] = {}
    self.grams: list[int] = []  # number of grams of each eval prompt
    self.names: list[str] = []
    self.index: dict[tuple[str, ...], list[int]] = {}
    for row in rows:
      words = normalize_words(prompt_of(row))
      if not words:
        continue
      self.exact.setdefault(words, str(row.get("source", "")))
      grams = word_ngrams(words, ngram)
      if len(words) < ngram:
        continue  # short prompts: exact matches only
      k = len(self.grams)
      self.grams.append(len(grams))
      self.names.append(str(row.get("source", "")))
      for g in grams:
        self.index.setdefault(g, []).append(k)

  def match(self, text: str) -> tuple[str, str] | None:
    """("exact" | "near", the evaluation source) for a duplicate of an indexed prompt, else None."""
    words = normalize_words(text)
    if words in self.exact:
      return "exact", self.exact[words]
    if len(words) < self.ngram:
      return None
    grams = word_ngrams(words, self.ngram)
    shared: dict[int, int] = {}
    for g in grams:
      for k in self.index.get(g, ()):
        shared[k] = shared.get(k, 0) + 1
    for k, n in shared.items():
      if n / min(len(grams), self.grams[k]) >= self.threshold:
        return "near", self.names[k]
    return None


# ---- training data -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TrainingData:
  """Validated training rows (tagged with `source` when they come from Sources) and what was done to them.

  stats: source name -> {path, available (valid rows), skipped (bad rows), rows (kept), weight (as given),
  dropped_eval_exact, dropped_eval_near, dropped_repeat, kinds {kind: rows}}. weights: {source: weight} when
  the sources set weights (a weighted mixture), else None (rows drawn in proportion to the sources' sizes).
  dropped: up to 20 examples of dropped rows {source, reason, matched}.
  """
  rows: list[dict[str, Any]]
  stats: dict[str, dict[str, Any]]
  weights: dict[str, float] | None
  source: str
  num_skipped: int
  dropped: tuple[dict[str, Any], ...] = ()

  def make_pipeline(self, *, batch_size: int, seed: int, mixture: Mapping[str, float] | None = None,
                    num_epochs: int | None = None, rows: Sequence[Mapping[str, Any]] | None = None,
                    process_index: int | None = None,
                    process_count: int | None = None) -> pipeline_lib.BatchIterator:
    """data.make_pipeline over these rows (or `rows`, the same rows with more fields) with the sources' weights."""
    rows = self.rows if rows is None else rows
    if len(rows) != len(self.rows):
      raise CotsafeError(f"TrainingData.make_pipeline: {len(rows)} rows given for {len(self.rows)}")
    return pipeline_lib.make_pipeline(rows, batch_size=batch_size, seed=seed, mixture=mixture, num_epochs=num_epochs,
                                      weights=self.weights, process_index=process_index, process_count=process_count)


def _is_sources(data: Any) -> bool:
  return isinstance(data, (list, tuple)) and all(isinstance(s, Source) for s in data) and bool(data)


def training_data(data: Any, *, schema: str, columns: Mapping[str, str] | str | None = None,
                  kind: str | None = None, split: str | None = None, data_dir: str | None = None,
                  on_bad_row: str = "raise", dedup: Dedup | None = None, seed: int = 0,
                  job: str = "training") -> TrainingData:
  """A job's training rows from `data`: one file or dataset dir (the one-file form; `columns`, `kind`, `split`,
  `data_dir` apply to it), a list of Sources (each with its own preset, split, kind, max_rows, weight), or a
  TrainingData already built. Rows are then decontaminated by `dedup`."""
  if isinstance(data, TrainingData):
    return data
  if _is_sources(data):
    if any(x is not None for x in (columns, split, data_dir)) or kind is not None:
      raise CotsafeError(f"{job}: columns / split / data_dir / kind are for the one-file form; with a list of "
                         "Sources set them on each Source")
    given = [s.weight is not None for s in data]
    if any(given) and not all(given):
      names = [s.label for s in data if s.weight is None]
      raise CotsafeError(f"{job}: Source.weight is set on some sources but not on {', '.join(names)}, expected a "
                         "weight on every source of a mixture (or on none: rows in proportion to source sizes)")
    loaded = load_sources(data, on_bad_row=on_bad_row, seed=seed, schema=schema)
    rows = loaded.rows
    stats = {name: {"path": st["path"], "available": st["available"], "skipped": st["skipped"],
                    "sampled": st["rows"], "weight": s.weight} for (name, st), s in zip(loaded.stats.items(), data)}
    weights = {s.label: float(s.weight) for s in data} if all(given) else None
    label = f"{len(data)} sources ({', '.join(s.label for s in data)})"
    skipped = sum(st["skipped"] for st in loaded.stats.values())
  elif isinstance(data, str) and data:
    got = load_rows(data, schema=schema, columns=columns, kind=kind, split=split, data_dir=data_dir,
                    on_bad_row=on_bad_row)
    rows, weights, label, skipped = got.rows, None, got.source, got.num_skipped
    stats = {got.source: {"path": got.source, "available": len(got.rows), "skipped": got.num_skipped,
                          "sampled": len(got.rows), "weight": None}}
  else:
    raise CotsafeError(f"{job}: data {data!r}, expected a file or dataset dir, or a list of @Source()")
  single = None if weights is not None or _is_sources(data) else label
  rows, dropped = _decontaminate(rows, dedup, on_bad_row=on_bad_row, seed=seed, stats=stats, single=single)
  for name, st in stats.items():
    mine = [r for r in rows if r.get("source", single) == name]
    st["rows"] = len(mine)
    st["kinds"] = {k: sum(r.get("kind") == k for r in mine) for k in KINDS if any(r.get("kind") == k for r in mine)}
    if schema == "spans":  # sequence labels, and how many unsafe rows locate their unsafe text
      st["labels"] = {"safe": sum(r["label"] == "safe" for r in mine),
                      "unsafe": sum(r["label"] == "unsafe" for r in mine),
                      "unsafe_with_spans": sum(bool(r["unsafe_spans"]) for r in mine)}
  if not rows:
    raise CotsafeError(f"{job}: no training rows left after deduplication ({len(dropped)} dropped), expected at "
                       "least one")
  return TrainingData(rows, stats, weights, label, skipped, tuple(dropped[:20]))


def _decontaminate(rows: list[dict[str, Any]], dedup: Dedup | None, *, on_bad_row: str, seed: int,
                   stats: dict[str, dict[str, Any]], single: str | None) -> tuple[list[dict[str, Any]], list]:
  for st in stats.values():
    st.update(dropped_eval_exact=0, dropped_eval_near=0, dropped_repeat=0)
  if dedup is None or (not dedup.against and not dedup.within):
    return rows, []
  index = None
  if dedup.against:
    # every prompt of each evaluation file: a cap on how many an evaluation samples does not shrink the index
    evals = load_sources([dataclasses.replace(src, max_rows=None) for src in dedup.against], on_bad_row=on_bad_row,
                         seed=seed, schema="prompts")
    index = EvalIndex(evals.rows, ngram=dedup.ngram, threshold=dedup.threshold)
  seen: set[tuple[str, ...]] = set()
  kept, dropped = [], []
  for row in rows:
    name = row.get("source", single)
    text = prompt_of(row)
    hit = index.match(text) if index is not None else None
    if hit is not None:
      stats[name][f"dropped_eval_{hit[0]}"] += 1
      dropped.append({"source": name, "reason": f"eval_{hit[0]}", "matched": hit[1], "prompt": text[:200]})
      continue
    if dedup.within:
      words = normalize_words(text)
      if words in seen:
        stats[name]["dropped_repeat"] += 1
        dropped.append({"source": name, "reason": "repeat", "matched": name, "prompt": text[:200]})
        continue
      seen.add(words)
    kept.append(row)
  return kept, dropped


# ---- statistics --------------------------------------------------------------------------------------------
def _summary(lengths: Sequence[int]) -> dict[str, float]:
  x = np.asarray(lengths, np.float64)
  if not x.size:
    return {}
  return {"min": int(x.min()), "mean": float(x.mean()), "p50": float(np.percentile(x, 50)),
          "p95": float(np.percentile(x, 95)), "max": int(x.max())}


def mixture_stats(data: TrainingData, *, batch_size: int, num_steps: int | None,
                  mixture: Mapping[str, float] | None = None,
                  length_of: Callable[[Mapping[str, Any]], int] | None = None, max_len: int | None = None,
                  length_what: str = "tokens") -> dict[str, Any]:
  """The mixture as a job will draw it: per source its rows (after sampling and deduplication) by kind, the
  drops, its weight and expected share of each batch, the epochs of it over num_steps, and (with length_of)
  its token lengths after the chat template and how many exceed max_len."""
  total = len(data.rows)
  names = list(data.stats)
  shares: dict[str, float] = {}
  if data.weights is None and mixture is None:
    shares = {n: data.stats[n]["rows"] / total for n in names}
  elif data.weights is None:  # kind shares, rows of a kind in proportion to the sources' sizes
    m = {k: float(v) for k, v in mixture.items() if float(v) > 0}
    per_kind = {k: sum(st["kinds"].get(k, 0) for st in data.stats.values()) for k in m}
    mt = sum(m.values())
    shares = {n: sum(m[k] / mt * data.stats[n]["kinds"].get(k, 0) / per_kind[k] for k in m if per_kind[k])
              for n in names}
  else:
    wsum = sum(w for n, w in data.weights.items() if data.stats[n]["rows"] and w > 0)
    if mixture is None:
      shares = {n: (data.weights[n] / wsum if data.stats[n]["rows"] and wsum else 0.0) for n in names}
    else:
      m = {k: float(v) for k, v in mixture.items() if float(v) > 0}
      mt = sum(m.values())
      for n in names:
        share = 0.0
        for k in m:
          having = sum(data.weights[o] for o in names if data.stats[o]["kinds"].get(k) and data.weights[o] > 0)
          if data.stats[n]["kinds"].get(k) and data.weights[n] > 0 and having:
            share += m[k] / mt * data.weights[n] / having
        shares[n] = share
  out_sources = {}
  for n in names:
    st = dict(data.stats[n])
    st["share"] = shares.get(n, 0.0)
    st["rows_per_batch"] = st["share"] * batch_size
    if num_steps is not None and st["rows"]:
      st["epochs"] = st["rows_per_batch"] * num_steps / st["rows"]
    out_sources[n] = st
  out: dict[str, Any] = {"rows": total, "batch_size": batch_size, "num_steps": num_steps,
                         "mixture": dict(mixture) if mixture else None,
                         "weighted": data.weights is not None, "skipped": data.num_skipped,
                         "dropped_examples": list(data.dropped), "sources": out_sources}
  if length_of is not None:
    by_source: dict[str, list[int]] = {n: [] for n in names}
    single = names[0] if len(names) == 1 else None
    for row in data.rows:
      by_source[row.get("source", single)].append(int(length_of(row)))
    for n, lengths in by_source.items():
      out_sources[n][length_what] = _summary(lengths)
      if max_len is not None:
        out_sources[n]["truncated"] = int(sum(x > max_len for x in lengths))
    everything = [x for v in by_source.values() for x in v]
    out[length_what] = _summary(everything)
    out["max_len"] = max_len
    if max_len is not None:
      out["truncated"] = int(sum(x > max_len for x in everything))
  return out


def _num(x: Any, digits: int = 1) -> str:
  if x is None:
    return "-"
  if isinstance(x, float) and not math.isfinite(x):
    return "-"
  if isinstance(x, int):
    return f"{x:,}"
  return f"{x:,.{digits}f}"


def format_stats(stats: Mapping[str, Any], *, title: str = "data") -> str:
  """The statistics as a markdown table, one row per source, then the totals."""
  lw = next((k for k in ("tokens",) if k in stats), None)
  spans = any("labels" in st for st in stats["sources"].values())
  head = ["source", "rows", "skipped", "dropped eval exact / near / repeat",
          "safe / unsafe (with spans)" if spans else "harmful / benign / reasoning", "weight", "share", "epochs"]
  if lw:
    head += ["tokens mean / p95 / max", f"over max_len={stats.get('max_len')}"]
  lines = [f"{title}: {stats['rows']:,} rows in batches of {stats['batch_size']}"
           + (f" x {stats['num_steps']:,} steps" if stats.get("num_steps") else "")
           + (f", kinds mixed {stats['mixture']}" if stats.get("mixture") else "")
           + (", sources mixed by weight" if stats.get("weighted") else ", sources in proportion to their rows"),
           "", "| " + " | ".join(head) + " |", "|" + " --- |" + " ---: |" * (len(head) - 1)]
  for name, st in stats["sources"].items():
    if spans:
      lab = st.get("labels", {})
      kinds = f"{lab.get('safe', 0)} / {lab.get('unsafe', 0)} ({lab.get('unsafe_with_spans', 0)})"
    else:
      kinds = " / ".join(str(st.get("kinds", {}).get(k, 0)) for k in KINDS)
    cells = [name.replace("|", "/"), _num(st["rows"]), _num(st["skipped"]),
             f"{st['dropped_eval_exact']} / {st['dropped_eval_near']} / {st['dropped_repeat']}", kinds,
             _num(st["weight"], 2) if st["weight"] is not None else "by size", _num(st["share"], 3),
             _num(st.get("epochs"), 2)]
    if lw:
      t = st.get(lw) or {}
      cells += [f"{_num(t.get('mean'))} / {_num(t.get('p95'))} / {_num(t.get('max'))}", _num(st.get("truncated"))]
    lines.append("| " + " | ".join(cells) + " |")
  if lw:
    t = stats[lw]
    lines += ["", f"all rows: {lw} min {_num(t.get('min'))}, mean {_num(t.get('mean'))}, p50 {_num(t.get('p50'))}, "
                  f"p95 {_num(t.get('p95'))}, max {_num(t.get('max'))}; {stats.get('truncated', 0):,} over "
                  f"max_len={stats.get('max_len')}"]
  for d in stats.get("dropped_examples", [])[:5]:
    lines.append(f"dropped ({d['reason']}, {d['source']} ~ {d['matched']}): {d['prompt'][:100]!r}")
  return "\n".join(lines)
