"""Safety-span rows (DATA.md) -> fixed-shape token arrays for the safety RM: ids, token and sequence labels.

The prompt is rendered with the tokenizer's chat template when it has one, as the policy's prompts are.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator

import numpy as np

from cotsafe_jax import models
from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.rewards.spans import labels_from_offsets, normalize_spans, tokenize_with_offsets

BAD_ROW_MODES = ("error", "skip")


def read_rows(path: str) -> Iterator[tuple[str, Any]]:
  """(where, row) pairs of a .jsonl file (one JSON object a line) or a .json list; where = "file:line"."""
  if not os.path.exists(path):
    raise CotsafeError(f"{path}: not found (expected a .jsonl or .json file of safety-span rows)")
  if path.endswith(".json"):
    with open(path, encoding="utf-8") as f:
      try:
        rows = json.load(f)
      except json.JSONDecodeError as e:
        raise CotsafeError(f"{path}:{e.lineno}: not valid JSON ({e.msg}), expected a list of row objects") from None
    if not isinstance(rows, list):
      raise CotsafeError(f"{path}:1: a {type(rows).__name__}, expected a list of row objects")
    for i, row in enumerate(rows):
      yield f"{path}: row {i}", row
    return
  if not path.endswith(".jsonl"):
    raise CotsafeError(f"{path}: unsupported file type, expected .jsonl or .json")
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        yield f"{path}:{n}", json.loads(line)
      except json.JSONDecodeError as e:
        raise CotsafeError(f"{path}:{n}: not valid JSON ({e.msg}), expected one JSON object per line") from None


@dataclasses.dataclass(frozen=True)
class SpanRow:
  prompt: str
  response: str
  spans: list[tuple[int, int]] | None  # None: sequence label only
  label: int  # 1 unsafe, 0 safe


def parse_row(row: Any, where: str) -> SpanRow:
  if not isinstance(row, dict):
    raise CotsafeError(f"{where}: a {type(row).__name__}, expected a JSON object with prompt, response, "
                       "unsafe_spans and/or label")
  for key in ("prompt", "response"):
    if not isinstance(row.get(key), str):
      raise CotsafeError(f"{where}: field {key!r} missing or not a string, expected a string")
  label = row.get("label")
  if label is not None and label not in ("safe", "unsafe"):
    raise CotsafeError(f"{where}: label {label!r}, expected \"safe\" or \"unsafe\"")
  raw_spans = row.get("unsafe_spans")
  if raw_spans is None and label is None:
    raise CotsafeError(f"{where}: neither \"unsafe_spans\" nor \"label\", expected at least one")
  spans = None if raw_spans is None else normalize_spans(raw_spans, length=len(row["response"]), where=where)
  if spans is not None and label == "safe" and spans:
    raise CotsafeError(f"{where}: label \"safe\" but {len(spans)} unsafe span(s), expected label \"unsafe\" "
                       "or no label")
  if spans is not None and label == "unsafe" and not spans:
    raise CotsafeError(f"{where}: label \"unsafe\" but unsafe_spans is empty, expected the unsafe spans "
                       "(or no unsafe_spans field for a sequence label only)")
  unsafe = bool(spans) if spans is not None else label == "unsafe"
  return SpanRow(row["prompt"], row["response"], spans, int(unsafe))


def render_prompt(tokenizer: Any, prompt: str, response: str) -> tuple[str, int]:
  """(prompt text, k): the chat-templated prompt (or prompt + newline without a template) and how many
  leading response characters the template already holds (an open `<think>\\n`), dropped from the response."""
  if getattr(tokenizer, "chat_template", None) is None:
    return prompt + "\n", 0
  text = models.apply_chat_template(tokenizer, prompt)
  for k in range(min(len(text), len(response), 16), 0, -1):
    if text.endswith(response[:k]) and "<think>" in response[:k]:
      return text, k
  return text, 0


@dataclasses.dataclass(frozen=True)
class Encoded:
  """N rows padded to max_len: tokens/mask [N, L]; token_labels [N, L] (-1 = no label); response_mask
  [N, L]; seq_labels [N]; has_token_labels [N]."""
  tokens: np.ndarray
  mask: np.ndarray
  token_labels: np.ndarray
  response_mask: np.ndarray
  seq_labels: np.ndarray
  has_token_labels: np.ndarray
  truncated: int
  skipped: int

  def __len__(self) -> int:
    return int(self.tokens.shape[0])

  def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
    return {"tokens": self.tokens[idx], "mask": self.mask[idx], "token_labels": self.token_labels[idx],
            "response_mask": self.response_mask[idx], "seq_labels": self.seq_labels[idx],
            "has_token_labels": self.has_token_labels[idx]}


def encode_row(tokenizer: Any, row: SpanRow, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
  """(ids, token_labels, response_mask, truncated). The response keeps precedence over the prompt: the
  prompt is cut from the left down to a quarter of max_len before the response is cut on the right."""
  prompt_text, k = render_prompt(tokenizer, row.prompt, row.response)
  response = row.response[k:]
  spans = None if row.spans is None else [(max(s - k, 0), e - k) for s, e in row.spans if e > k]
  p_ids = np.asarray(tokenizer(prompt_text, add_special_tokens=False)["input_ids"], np.int32)
  r_ids, offsets = tokenize_with_offsets(tokenizer, response)
  r_lab = labels_from_offsets(offsets, spans) if spans is not None else np.full(len(r_ids), -1, np.int32)
  truncated = len(p_ids) + len(r_ids) > max_len
  if truncated:
    keep_p = min(len(p_ids), max(max_len - len(r_ids), max_len // 4))
    p_ids = p_ids[len(p_ids) - keep_p:]
    r_ids, r_lab = r_ids[:max_len - keep_p], r_lab[:max_len - keep_p]
  ids = np.concatenate([p_ids, r_ids]).astype(np.int32)
  labels = np.concatenate([np.full(len(p_ids), -1, np.int32), r_lab])
  resp = np.concatenate([np.zeros(len(p_ids), bool), np.ones(len(r_ids), bool)])
  return ids, labels, resp, truncated


def encode_file(tokenizer: Any, path: str, *, max_len: int, on_bad_row: str = "error") -> Encoded:
  if on_bad_row not in BAD_ROW_MODES:
    raise CotsafeError(f"on_bad_row={on_bad_row!r}, expected one of {', '.join(BAD_ROW_MODES)}")
  rows, skipped = [], 0
  for where, raw in read_rows(path):
    try:
      rows.append(parse_row(raw, where))
    except CotsafeError:
      if on_bad_row == "error":
        raise
      skipped += 1
  if not rows:
    raise CotsafeError(f"{path}: no usable rows (skipped {skipped}), expected safety-span rows")
  n = len(rows)
  out = {"tokens": np.zeros((n, max_len), np.int32), "mask": np.zeros((n, max_len), bool),
         "token_labels": np.full((n, max_len), -1, np.int32), "response_mask": np.zeros((n, max_len), bool)}
  truncated = 0
  for i, row in enumerate(rows):
    ids, labels, resp, cut = encode_row(tokenizer, row, max_len)
    out["tokens"][i, :len(ids)], out["mask"][i, :len(ids)] = ids, True
    out["token_labels"][i, :len(ids)], out["response_mask"][i, :len(ids)] = labels, resp
    truncated += cut
  return Encoded(**out, seq_labels=np.array([r.label for r in rows], np.int32),
                 has_token_labels=np.array([r.spans is not None for r in rows]), truncated=truncated,
                 skipped=skipped)
