"""Safety-span rows (DATA.md) -> fixed-shape token arrays for the safety RM: ids, token and sequence labels.

The prompt is rendered with the tokenizer's chat template when it has one, as the policy's prompts are.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from cotsafe_jax import models
from cotsafe_jax.data.sources import load_spans
from cotsafe_jax.rewards.spans import labels_from_offsets, tokenize_with_offsets

@dataclasses.dataclass(frozen=True)
class SpanRow:
  prompt: str
  response: str
  spans: list[tuple[int, int]] | None  # None: a sequence label only
  label: int  # 1 unsafe, 0 safe


def _span_row(row: dict) -> SpanRow:
  """An unsafe row without spans has a sequence label only; a safe row's tokens are all safe."""
  spans = [tuple(s) for s in row["unsafe_spans"]]
  unsafe = row["label"] == "unsafe"
  return SpanRow(row["prompt"], row["response"], None if unsafe and not spans else spans, int(unsafe))


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


def encode_file(tokenizer: Any, source: str, *, max_len: int, columns: Mapping[str, str] | str | None = None,
                on_bad_row: str = "raise") -> Encoded:
  """Read safety-span rows with data.load_spans (any supported format; "file:line: ..." errors) and encode."""
  loaded = load_spans(source, columns=columns, on_bad_row=on_bad_row)
  rows = [_span_row(r) for r in loaded.rows]
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
                 skipped=loaded.num_skipped)
