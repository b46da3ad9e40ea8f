"""Prompt / SFT / safety-span rows from jsonl, json, csv, tsv, parquet, `datasets` dirs and tfds (local paths or
gs:// URLs, read through cotsafe_jax.paths).

A `columns` map (or a named preset for a public set) renames source fields to ours; every row is validated.
A list of `Source`s (an evaluation suite or a training mixture) loads into one list of rows tagged by source.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import sys
from typing import Any, Iterator, Mapping, Sequence

from cotsafe_jax.data.presets import PRESETS, BadRow as _BadRow, ColumnPreset
from cotsafe_jax import paths
from cotsafe_jax.errors import CotsafeError

KINDS = ("harmful", "benign", "reasoning")
SCHEMAS = ("prompts", "sft", "spans")
GRADERS = ("math", "choice")  # how a reasoning row's answer is checked: math equivalence | a choice letter
ROLES = ("system", "user", "assistant")
_LABELS = ("safe", "unsafe")
_FORMATS = ".jsonl, .json, .csv, .tsv, .parquet, a datasets save_to_disk dir, a prepared tfds dir or tfds:NAME"
_log = logging.getLogger(__name__)
_WS = re.compile(r"\s*")


@dataclasses.dataclass(frozen=True)
class Rows:
  """Validated rows of one source, with how many bad rows were skipped (on_bad_row='skip')."""
  rows: list[dict[str, Any]]
  num_skipped: int
  source: str
  skipped: tuple[str, ...] = ()  # the first few reasons, for the log


# ---- readers: yield (line, raw row or _BadRow) ---------------------------------------------------------
def _jsonl(path: str) -> Iterator[tuple[int, Any]]:
  with paths.open_file(path, "rb") as f:  # decoded line by line: a bad byte is that line's error, not the file's
    for line_no, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
      except UnicodeDecodeError as e:
        yield line_no, _BadRow(f"not UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)",
                               "UTF-8 text")
        continue
      if not line.strip():
        continue
      try:
        yield line_no, json.loads(line)
      except json.JSONDecodeError as e:
        yield line_no, _BadRow(f"invalid JSON ({e.msg} at column {e.colno})", "one JSON object per line")


def _json(path: str) -> Iterator[tuple[int, Any]]:
  text = paths.read_bytes(path).decode("utf-8-sig")
  pos = _WS.match(text).end()
  if not text.startswith("[", pos):  # `datasets` writes .json files as JSON lines
    yield from _jsonl(path)
    return
  decoder, pos = json.JSONDecoder(), _WS.match(text, pos + 1).end()
  line, counted = 1, 0
  while not text.startswith("]", pos):
    line, counted = line + text.count("\n", counted, pos), pos
    try:
      obj, pos = decoder.raw_decode(text, pos)
    except json.JSONDecodeError as e:
      raise CotsafeError(f"{path}:{e.lineno}: invalid JSON ({e.msg}), expected a JSON array of objects")
    yield line, obj
    pos = _WS.match(text, pos).end()
    if text.startswith(",", pos):
      pos = _WS.match(text, pos + 1).end()
    elif not text.startswith("]", pos):
      raise CotsafeError(f"{path}:{1 + text.count(chr(10), 0, pos)}: invalid JSON (no ',' or ']' after a row), "
                         "expected a JSON array of objects")


def _csv(path: str, delimiter: str) -> Iterator[tuple[int, Any]]:
  csv.field_size_limit(max(csv.field_size_limit(), min(sys.maxsize, 2**31 - 1)))  # prompts can be long
  with io.TextIOWrapper(paths.open_file(path, "rb"), encoding="utf-8-sig", newline="") as f:
    reader = csv.reader(f, delimiter=delimiter)
    header = next(reader, None)
    if header is None:
      return
    start = reader.line_num + 1
    for cells in reader:
      line, start = start, reader.line_num + 1
      if not cells:
        continue
      if len(cells) != len(header):
        yield line, _BadRow(f"{len(cells)} cells", f"{len(header)} (as in the header)")
      else:
        yield line, {k: v for k, v in zip(header, cells) if v != ""}  # an empty cell is an absent field


def _parquet(path: str) -> Iterator[tuple[int, Any]]:
  import pyarrow.parquet as pq

  with paths.open_file(path, "rb") as f:
    table = pq.read_table(f)
  for i, row in enumerate(table.to_pylist(), 1):
    yield i, row


def _hf_dir(path: str, split: str | None) -> Iterator[tuple[int, Any]]:
  import datasets

  ds = datasets.load_from_disk(path)
  if isinstance(ds, datasets.DatasetDict):
    if split is None and len(ds) == 1:
      split = next(iter(ds))
    if split not in ds:
      raise CotsafeError(f"{path}: split {split!r} not found, expected one of {sorted(ds)}")
    ds = ds[split]
  for i, row in enumerate(ds, 1):
    yield i, row


def _tfds(source: str, split: str | None, data_dir: str | None) -> Iterator[tuple[int, Any]]:
  import tensorflow_datasets as tfds

  split = split or "train"
  try:
    if source.startswith("tfds:"):
      ds = tfds.data_source(source[5:], split=split, data_dir=data_dir, download=False)
    else:
      ds = tfds.builder_from_directory(source).as_data_source(split=split)
  except Exception as e:  # tfds raises many types for a missing dataset / split / file format
    raise CotsafeError(f"{source}: cannot open split {split!r} as a prepared array_record tfds dataset "
                       f"(data_dir={data_dir}): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
  for i in range(len(ds)):
    yield i + 1, _from_numpy(ds[i])


def _from_numpy(value: Any, *, top: bool = True) -> Any:
  """tfds elements (bytes, numpy arrays, dicts of arrays) as plain Python values."""
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, dict):
    out = {k: _from_numpy(v, top=False) for k, v in value.items()}
    lists = [v for v in out.values() if isinstance(v, list)]
    if not top and out and len(lists) == len(out) and len({len(v) for v in lists}) == 1:
      return [dict(zip(out, vals)) for vals in zip(*out.values())]  # a tfds Sequence of dicts, e.g. messages
    return out
  if hasattr(value, "tolist"):
    return _from_numpy(value.tolist(), top=False)
  if isinstance(value, list):
    return [_from_numpy(v, top=False) for v in value]
  return value


def _utf8(source: str, rows: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, Any]]:
  """json / csv decode whole blocks: a bad byte there is an error for the file (jsonl names the line)."""
  try:
    yield from rows
  except UnicodeDecodeError as e:
    raise CotsafeError(f"{source}: not UTF-8 text ({e.reason}: byte 0x{e.object[e.start]:02x}), expected "
                       "UTF-8") from None


def _read(source: str, split: str | None, data_dir: str | None) -> Iterator[tuple[int, Any]]:
  if source.startswith("tfds:"):
    return _tfds(source, split, data_dir)
  if paths.isdir(source):  # datasets and tfds read gs:// dirs themselves (fsspec / epath)
    if paths.exists(paths.join(source, "features.json")):
      return _tfds(source, split, data_dir)
    if any(paths.exists(paths.join(source, f)) for f in ("dataset_dict.json", "state.json")):
      return _hf_dir(source, split)
    raise CotsafeError(f"{source}: a directory that is neither a datasets save_to_disk dir nor a prepared "
                       f"tfds dataset, expected one of {_FORMATS}")
  if not paths.exists(source):
    raise CotsafeError(f"{source}: no such file, expected one of {_FORMATS}")
  ext = os.path.splitext(source)[1].lower()
  readers = {".jsonl": _jsonl, ".json": _json, ".parquet": _parquet,
             ".csv": lambda p: _csv(p, ","), ".tsv": lambda p: _csv(p, "\t")}
  if ext not in readers:
    raise CotsafeError(f"{source}: unknown file type {ext!r}, expected one of {_FORMATS}")
  return _utf8(source, readers[ext](source))


# ---- validation: raw row -> our row, or _BadRow -----------------------------------------------------------
def _text(row: dict, field: str, *, required: bool) -> str | None:
  if field not in row or row[field] is None:
    if required:
      raise _BadRow(f'field "{field}" missing', "a string")
    return None
  value = row[field]
  if isinstance(value, bool) or not isinstance(value, (str, int, float)):
    raise _BadRow(f'field "{field}" is a {type(value).__name__}', "a string")
  if isinstance(value, float):
    if not math.isfinite(value):
      raise _BadRow(f'field "{field}" is {value}', "a string or a finite number")
    value = int(value) if value.is_integer() else value
  value = str(value)
  if required and not value.strip():
    raise _BadRow(f'field "{field}" is empty', "a non-empty string")
  return value


def _messages(row: dict, *, last_role: str | None, need_role: str | None) -> list[dict[str, str]]:
  msgs = row["messages"]
  if not isinstance(msgs, list) or not msgs:
    raise _BadRow('field "messages" is not a non-empty list', "a list of {role, content}")
  out = []
  for i, m in enumerate(msgs):
    if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
      raise _BadRow(f"messages[{i}] is {json.dumps(m, default=str)[:80]}",
                    f"{{role: {'|'.join(ROLES)}, content: string}}")
    out.append({"role": m["role"], "content": m["content"]})
  if last_role is not None and out[-1]["role"] != last_role:
    raise _BadRow(f'the last message is from "{out[-1]["role"]}"', f'the last from "{last_role}"')
  if need_role is not None and not any(m["role"] == need_role for m in out):
    raise _BadRow(f'no "{need_role}" message', f'at least one "{need_role}" turn')
  return out


def _spans(row: dict, response: str) -> list[list[int]]:
  spans = row["unsafe_spans"]
  if isinstance(spans, str):  # csv cells hold the list as JSON text
    try:
      spans = json.loads(spans)
    except json.JSONDecodeError:
      raise _BadRow(f'field "unsafe_spans" is {spans[:40]!r}', "a list of [start, end) character offsets")
  if not isinstance(spans, list):
    raise _BadRow(f'field "unsafe_spans" is a {type(spans).__name__}', "a list of [start, end) offsets")
  clean = []
  for span in spans:
    ok = isinstance(span, (list, tuple)) and len(span) == 2
    if not ok or any(isinstance(x, bool) or not isinstance(x, int) for x in span):
      raise _BadRow(f"span {json.dumps(span, default=str)[:40]} is not two integers", "[start, end)")
    start, end = span
    if start > end:
      raise _BadRow(f"span [{start}, {end}) is inverted", "start < end")
    if start == end:
      raise _BadRow(f"span [{start}, {end}) is empty", "start < end")
    if start < 0 or end > len(response):
      raise _BadRow(f"span [{start}, {end}) is out of range",
                    f"offsets within the {len(response)}-character response")
    clean.append([start, end])
  merged: list[list[int]] = []
  for start, end in sorted(clean):  # overlapping or touching spans mark the same characters: merge them
    if merged and start <= merged[-1][1]:
      merged[-1][1] = max(merged[-1][1], end)
    else:
      merged.append([start, end])
  return merged


def _common(row: dict, out: dict, *, kind_required: bool) -> dict:
  for field in ("id", "category"):
    value = _text(row, field, required=False)
    if value is not None:
      out[field] = value
  kind = row.get("kind")
  if kind is None and kind_required:
    raise _BadRow('field "kind" missing', "|".join(KINDS))
  if kind is not None:
    if kind not in KINDS:
      raise _BadRow(f'field "kind" is {json.dumps(kind, default=str)[:40]}', "|".join(KINDS))
    out["kind"] = kind
  return out


def _prompt_row(row: dict) -> dict:
  out = _common(row, {}, kind_required=True)
  if "messages" in row and "prompt" in row:
    raise _BadRow('both "prompt" and "messages"', "one of them")
  if "messages" in row:
    out["messages"] = _messages(row, last_role="user", need_role=None)
  else:
    if "prompt" not in row:
      raise _BadRow('field "prompt" missing', '"prompt" or "messages"')
    out["prompt"] = _text(row, "prompt", required=True)
  answer = _text(row, "answer", required=False)
  if answer is not None:
    out["answer"] = answer
  grader = row.get("grader")
  if grader is not None:
    if grader not in GRADERS:
      raise _BadRow(f'field "grader" is {json.dumps(grader, default=str)[:40]}', "|".join(GRADERS))
    out["grader"] = grader
  return out


def _sft_row(row: dict) -> dict:
  out = _common(row, {}, kind_required=False)
  if "messages" in row:
    out["messages"] = _messages(row, last_role="assistant", need_role="user")
    return out
  if "prompt" not in row or "response" not in row:
    missing = "prompt" if "prompt" not in row else "response"
    raise _BadRow(f'field "{missing}" missing', '"messages" or "prompt" + "response"')
  out["prompt"] = _text(row, "prompt", required=True)
  out["response"] = _text(row, "response", required=True)
  return out


def _span_row(row: dict) -> dict:
  out = _common(row, {}, kind_required=False)
  out["prompt"] = _text(row, "prompt", required=True)
  out["response"] = response = _text(row, "response", required=True)
  label = row.get("label")
  if label is not None and label not in _LABELS:
    raise _BadRow(f'field "label" is {json.dumps(label, default=str)[:40]}', "safe|unsafe")
  if row.get("unsafe_spans") is None:
    if label is None:
      raise _BadRow('field "unsafe_spans" missing', 'a list of [start, end) offsets, or a "label"')
    spans = []
  else:
    spans = _spans(row, response)
  if label == "safe" and spans:
    raise _BadRow(f'label "safe" with {len(spans)} unsafe spans', "no spans on a safe row")
  out["unsafe_spans"] = spans
  out["label"] = label or ("unsafe" if spans else "safe")
  return out


_VALIDATORS = {"prompts": _prompt_row, "sft": _sft_row, "spans": _span_row}


def _apply_preset(row: dict, preset: ColumnPreset, default_kind: str | None) -> list[tuple[str, dict]]:
  """(label, row) pairs: the preset's transform, column map, kind, answer and choices applied."""
  out = []
  for label, one in (preset.transform(row) if preset.transform is not None else [("", row)]):
    try:
      out.append((label, _map_row(one, preset, default_kind)))
    except _BadRow as e:
      raise _BadRow(f"({label}) {e.what}" if label else e.what, e.expected) from None
  return out


def _map_row(row: dict, preset: ColumnPreset, default_kind: str | None) -> dict:
  out = dict(row)
  for src, ours in preset.columns.items():
    if src in row:
      value = out.pop(src)
      out[ours] = value
  if preset.kind_from is not None and row.get(preset.kind_from) is not None:
    value = row[preset.kind_from]
    if preset.kind_values is not None:
      if value not in preset.kind_values:
        raise _BadRow(f'field "{preset.kind_from}" is {json.dumps(value, default=str)[:40]}',
                      "|".join(preset.kind_values))
      value = preset.kind_values[value]
    out["kind"] = value
  if out.get("kind") is None and (default_kind or preset.kind) is not None:
    out["kind"] = default_kind or preset.kind
  if preset.choices is not None:
    _multiple_choice(row, out, preset.choices)
  if preset.answer_after is not None and isinstance(out.get("answer"), str):
    if preset.answer_after not in out["answer"]:
      raise _BadRow(f'field "answer" has no "{preset.answer_after}"',
                    f'the final answer after "{preset.answer_after}"')
    out["answer"] = out["answer"].rsplit(preset.answer_after, 1)[1].strip()
  return out


CHOICE_LETTERS = "ABCDEFGHIJ"


def _multiple_choice(row: dict, out: dict, fields: tuple[str, ...]) -> None:
  """prompt <- the question and its options lettered A), B), ... in an order seeded by the question text (the
  same on every run and machine, whatever the file order); answer <- the correct option's letter."""
  options = []
  for field in fields:
    value = row.get(field)
    if not isinstance(value, str) or not value.strip():
      raise _BadRow(f'option field "{field}" missing or empty', "the text of every option")
    options.append(value.strip())
  question = out.get("prompt")
  if not isinstance(question, str) or not question.strip():
    raise _BadRow('the question is missing or empty', "a question with its options")
  order = list(range(len(options)))
  seed = int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:8], "little")
  random.Random(seed).shuffle(order)
  letters = CHOICE_LETTERS[:len(options)]
  out["prompt"] = question.strip() + "\n\n" + "\n".join(f"{letters[j]}) {options[i]}" for j, i in enumerate(order))
  out["answer"] = letters[order.index(0)]
  out["grader"] = "choice"
  for field in fields:
    out.pop(field, None)


def _preset(columns: Mapping[str, str] | str | None, schema: str) -> ColumnPreset:
  if isinstance(columns, str):
    if columns not in PRESETS:
      raise CotsafeError(f"unknown column preset {columns!r}, expected one of {', '.join(sorted(PRESETS))}")
    preset = PRESETS[columns]
    if schema not in preset.schemas:
      raise CotsafeError(f"column preset {columns!r} is for {' or '.join(preset.schemas)} rows, not {schema} rows")
    return preset
  return ColumnPreset(dict(columns or {}), schema=schema)


def load_rows(source: str, *, schema: str, columns: Mapping[str, str] | str | None = None,
              kind: str | None = None, split: str | None = None, data_dir: str | None = None,
              on_bad_row: str = "raise") -> Rows:
  """Read and validate every row of `source` for `schema` (prompts | sft | spans).

  columns: a {source field: our field} map or a preset name (PRESETS).  kind: the kind of rows that have
  none (a preset's kind_by_split gives the kind of a named split).  split / data_dir: for `datasets` dirs and
  tfds.  on_bad_row: 'raise' stops at the first bad row
  with "file:line: what is wrong, expected what"; 'skip' drops bad rows, counts and logs them.
  Fields outside the schema are dropped.
  """
  if schema not in SCHEMAS:
    raise CotsafeError(f"schema {schema!r}, expected one of {'|'.join(SCHEMAS)}")
  if on_bad_row not in ("raise", "skip"):
    raise CotsafeError(f"on_bad_row={on_bad_row!r}, expected 'raise' or 'skip'")
  if kind is not None and kind not in KINDS:
    raise CotsafeError(f"kind={kind!r}, expected one of {'|'.join(KINDS)}")
  preset, validate = _preset(columns, schema), _VALIDATORS[schema]
  if kind is None and split is not None and preset.kind_by_split:
    kind = preset.kind_by_split.get(split)
  label = source if split is None else f"{source}[{split}]"
  rows, skipped, num_skipped = [], [], 0
  for line, raw in _read(source, split, data_dir):
    try:
      if isinstance(raw, _BadRow):
        raise raw
      if not isinstance(raw, dict):
        raise _BadRow(f"row is a {type(raw).__name__}", "an object with named fields")
      got = []
      for part, row in _apply_preset(raw, preset, kind):
        try:
          got.append(validate(row))
        except _BadRow as e:
          raise _BadRow(f"({part}) {e.what}" if part else e.what, e.expected) from None
      rows.extend(got)
    except _BadRow as e:
      message = f"{label}:{line}: {e}"
      if on_bad_row == "raise":
        raise CotsafeError(message) from None
      num_skipped += 1
      if len(skipped) < 10:
        skipped.append(message)
  if num_skipped:
    _log.warning("%s: skipped %d bad rows; first: %s", label, num_skipped, skipped[0])
  if not rows:
    raise CotsafeError(f"{label}: no valid {schema} rows ({num_skipped} skipped), expected at least one")
  return Rows(rows, num_skipped, label, tuple(skipped))


def load_prompts(source: str, *, columns: Mapping[str, str] | str | None = None, kind: str | None = None,
                 split: str | None = None, data_dir: str | None = None, on_bad_row: str = "raise") -> Rows:
  """Prompt rows (RL, evaluation): `prompt` or `messages`, `kind`, optional `answer`, `category`, `id`."""
  return load_rows(source, schema="prompts", columns=columns, kind=kind, split=split, data_dir=data_dir,
                   on_bad_row=on_bad_row)


def load_sft(source: str, *, columns: Mapping[str, str] | str | None = None, split: str | None = None,
             data_dir: str | None = None, on_bad_row: str = "raise") -> Rows:
  """SFT rows: `messages`, or `prompt` + `response`; optional `kind`, `category`, `id`."""
  return load_rows(source, schema="sft", columns=columns, split=split, data_dir=data_dir, on_bad_row=on_bad_row)


def load_spans(source: str, *, columns: Mapping[str, str] | str | None = None, split: str | None = None,
               data_dir: str | None = None, on_bad_row: str = "raise") -> Rows:
  """Safety-span rows: `prompt`, `response`, `unsafe_spans` ([start, end) into response, merged), `label`."""
  return load_rows(source, schema="spans", columns=columns, split=split, data_dir=data_dir,
                   on_bad_row=on_bad_row)


# ---- sources: one type for evaluation suites and training mixtures ------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class Source:
  """One data source of an evaluation suite or a training mixture.

  path: a file or dataset dir (any format load_rows reads) or tfds:NAME.  preset: a PRESETS name, or
  columns: a {source field: our field} map (not both).  kind: the kind of rows that carry none.  split,
  data_dir: for `datasets` dirs and tfds.  max_rows: keep at most this many rows, a subset seeded by
  `load_sources(seed=...)` in file order (None: all).  weight: in a training mixture, the source's share of
  every batch (relative to the other sources' weights; None on every source: rows drawn in proportion to
  the sources' sizes, as if the files were one), in an evaluation its weight in the macro average (None:
  1).  name: how rows, reports and mixtures name it (default: the preset, else the file's stem).  schema:
  prompts | sft | spans (None: the reading job's).  grader: math | choice, for reasoning prompt rows that
  name none (presets for multiple-choice sets set it per row).
  """
  path: str
  name: str | None = None
  preset: str | None = None
  columns: Mapping[str, str] | None = None
  kind: str | None = None
  split: str | None = None
  data_dir: str | None = None
  max_rows: int | None = None
  weight: float | None = None
  schema: str | None = None
  grader: str | None = None

  def __post_init__(self):
    where = f"Source({self.name or self.preset or self.path!r})"
    if not isinstance(self.path, str) or not self.path:
      raise CotsafeError(f"{where}: path={self.path!r}, expected a local file, dataset dir or tfds:NAME")
    if self.preset is not None and self.columns is not None:
      raise CotsafeError(f"{where}: both preset={self.preset!r} and columns are set, expected one of them")
    if self.preset is not None and self.preset not in PRESETS:
      raise CotsafeError(f"{where}: unknown preset {self.preset!r}, expected one of {', '.join(sorted(PRESETS))}")
    if self.kind is not None and self.kind not in KINDS:
      raise CotsafeError(f"{where}: kind={self.kind!r}, expected one of {'|'.join(KINDS)}")
    if self.schema is not None and self.schema not in SCHEMAS:
      raise CotsafeError(f"{where}: schema={self.schema!r}, expected one of {'|'.join(SCHEMAS)}")
    if self.grader is not None and self.grader not in GRADERS:
      raise CotsafeError(f"{where}: grader={self.grader!r}, expected one of {'|'.join(GRADERS)}")
    if self.max_rows is not None and (isinstance(self.max_rows, bool) or not isinstance(self.max_rows, int)
                                      or self.max_rows < 1):
      raise CotsafeError(f"{where}: max_rows={self.max_rows!r}, expected a positive int or None")
    if self.weight is not None and (isinstance(self.weight, bool) or not isinstance(self.weight, (int, float))
                                    or not math.isfinite(self.weight) or self.weight < 0):
      raise CotsafeError(f"{where}: weight={self.weight!r}, expected a finite number >= 0 or None")
    if self.name is not None and (not isinstance(self.name, str) or not self.name.strip() or
                                  any(c in self.name for c in "|\n/")):
      raise CotsafeError(f"{where}: name={self.name!r}, expected a non-empty name without '|', '/' or newlines")

  @property
  def label(self) -> str:
    """The name rows and reports use."""
    if self.name:
      return self.name
    if self.preset:
      return self.preset
    base = os.path.basename(self.path.rstrip("/")) or self.path
    return base.removeprefix("tfds:").split(".")[0] or base


@dataclasses.dataclass(frozen=True)
class SourceRows:
  """Rows of several sources, each tagged with its source's name in a `source` field, in source order.
  stats: name -> {rows (kept), available (valid rows in the source), skipped (bad rows), weight (None read
  as 1), path}."""
  rows: list[dict[str, Any]]
  stats: dict[str, dict[str, Any]]

  @property
  def weights(self) -> dict[str, float]:
    return {name: s["weight"] for name, s in self.stats.items()}


def load_sources(sources: Sequence[Source], *, on_bad_row: str = "raise", seed: int = 0,
                 schema: str | None = None) -> SourceRows:
  """Load every source (see `Source`) into one list of validated rows with a `source` field per row.

  A source with max_rows keeps a subset of that size drawn with `seed` (and its name), in file order, so the
  same suite and seed give the same rows. Names must be unique. schema: the rows the caller reads (a job's
  schema); a source that names another schema is an error, one that names none reads this one (None:
  each source's own, else prompts).
  """
  sources = list(sources)
  if not sources:
    raise CotsafeError("load_sources: no sources, expected at least one Source")
  bad = [s for s in sources if not isinstance(s, Source)]
  if bad:
    raise CotsafeError(f"load_sources: {bad[0]!r} is not a Source (in gin: @Source() with path=...)")
  names = [s.label for s in sources]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise CotsafeError(f"load_sources: source name {dup[0]!r} is used twice, expected unique names (set "
                       "Source.name)")
  rows: list[dict[str, Any]] = []
  stats: dict[str, dict[str, Any]] = {}
  for src, name in zip(sources, names):
    if schema is not None and src.schema is not None and src.schema != schema:
      raise CotsafeError(f"load_sources: Source({name!r}) has schema={src.schema!r}, but these rows are read as "
                         f"{schema} rows (leave Source.schema unset, or set it to {schema!r})")
    src_schema = src.schema or schema or "prompts"
    got = load_rows(src.path, schema=src_schema, columns=src.columns if src.columns is not None else src.preset,
                    kind=src.kind, split=src.split, data_dir=src.data_dir, on_bad_row=on_bad_row)
    kept = got.rows
    if src.max_rows is not None and len(kept) > src.max_rows:
      key = int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little")
      pick = sorted(random.Random(key).sample(range(len(kept)), src.max_rows))
      kept = [kept[i] for i in pick]
    for row in kept:
      row = dict(row, source=name)
      if src.grader is not None and src_schema == "prompts" and row.get("kind") == "reasoning":
        row.setdefault("grader", src.grader)
      rows.append(row)
    stats[name] = {"rows": len(kept), "available": len(got.rows), "skipped": got.num_skipped,
                   "weight": 1.0 if src.weight is None else float(src.weight), "path": got.source}
  return SourceRows(rows, stats)
