"""Character spans of unsafe text (docs/data.md safety-span rows) -> per-token labels via the offset mapping.

A token is unsafe when its character range overlaps a span; overlapping spans are merged.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from cotsafe_jax.errors import CotsafeError


def normalize_spans(spans: Any, *, length: int, where: str = "response") -> list[tuple[int, int]]:
  """Validated, sorted, merged [start, end) spans; an error names `where` and the bad span."""
  if spans is None:
    return []
  if not isinstance(spans, (list, tuple)):
    raise CotsafeError(f"{where}: unsafe_spans is {type(spans).__name__}, expected a list of [start, end)")
  out = []
  for j, span in enumerate(spans):
    if (not isinstance(span, (list, tuple)) or len(span) != 2
        or not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in span)):
      raise CotsafeError(f"{where}: unsafe_spans[{j}] = {span!r}, expected [start, end) integer character offsets")
    s, e = int(span[0]), int(span[1])
    if s > e:
      raise CotsafeError(f"{where}: unsafe_spans[{j}] = [{s}, {e}] is inverted, expected start < end")
    if s < 0 or e > length or s == e:
      raise CotsafeError(f"{where}: unsafe_spans[{j}] = [{s}, {e}] is out of range, expected "
                         f"0 <= start < end <= {length} (the response's length in characters)")
    out.append((s, e))
  out.sort()
  merged: list[tuple[int, int]] = []
  for s, e in out:
    if merged and s <= merged[-1][1]:
      merged[-1] = (merged[-1][0], max(merged[-1][1], e))
    else:
      merged.append((s, e))
  return merged


def tokenize_with_offsets(tokenizer: Any, text: str) -> tuple[np.ndarray, np.ndarray]:
  """(ids [N] int32, offsets [N, 2] character ranges) without special tokens; needs a fast tokenizer."""
  if not getattr(tokenizer, "is_fast", False):
    raise CotsafeError(f"{type(tokenizer).__name__} has no offset mapping: span labels need a fast "
                       "(Rust `tokenizers`) tokenizer")
  enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
  ids = np.asarray(enc["input_ids"], np.int32).reshape(-1)
  offsets = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
  return ids, offsets


def labels_from_offsets(offsets: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
  """1 where a token's [start, end) overlaps a span. A zero-width token (start == end) is unsafe when its
  position lies inside a span, so a token without characters of its own follows its surroundings."""
  labels = np.zeros(len(offsets), np.int32)
  for s, e in spans:
    ts, te = offsets[:, 0], offsets[:, 1]
    overlap = (ts < e) & (s < te)
    zero_inside = (ts == te) & (s <= ts) & (ts < e)
    labels |= (overlap | zero_inside).astype(np.int32)
  return labels


def spans_to_token_labels(tokenizer: Any, response: str, unsafe_spans: Any, *,
                          where: str = "response") -> np.ndarray:
  """Per-token 0/1 labels [N] for `tokenizer(response, add_special_tokens=False)` tokens."""
  spans = normalize_spans(unsafe_spans, length=len(response), where=where)
  _, offsets = tokenize_with_offsets(tokenizer, response)
  return labels_from_offsets(offsets, spans)
