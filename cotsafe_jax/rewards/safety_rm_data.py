"""Safety-span rows (docs/data.md) -> fixed-shape token arrays for the safety RM: ids, token and sequence labels.

The prompt is rendered with the tokenizer's chat template when it has one, as the policy's prompts are, and a
whole response ends with the stop token, as the policy's finished completions do.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from cotsafe_jax import models
from cotsafe_jax.data import mixture as mixture_lib, pipeline as pipeline_lib
from cotsafe_jax.errors import CotsafeError
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
  [N, L]; seq_labels [N]; has_token_labels [N]. sources [N]: each row's source name (rows of a list of
  Sources) or the file; weights: the sources' mixture weights (None: rows drawn in proportion to sizes)."""
  tokens: np.ndarray
  mask: np.ndarray
  token_labels: np.ndarray
  response_mask: np.ndarray
  seq_labels: np.ndarray
  has_token_labels: np.ndarray
  truncated: int
  skipped: int
  sources: tuple[str, ...] = ()
  weights: dict[str, float] | None = None

  def __len__(self) -> int:
    return int(self.tokens.shape[0])

  def row_name(self, i: int) -> str:
    return f"{self.sources[i]} row {i + 1}" if self.sources else f"row {i + 1}"

  def batch(self, step: int, *, batch_size: int, seed: int) -> np.ndarray:
    """Row indices of training batch `step`, a function of (step, seed) only, so a resumed run sees the same
    batches: without weights, epoch e of the rows in the permutation default_rng([seed, e]) (batches straddle
    epochs); with weights, the weighted source mixture of data.make_pipeline at that step."""
    if self.weights is None:
      n, first, last = len(self), step * batch_size, (step + 1) * batch_size
      perms = {e: np.random.default_rng([seed, e]).permutation(n) for e in range(first // n, (last - 1) // n + 1)}
      return np.asarray([perms[i // n][i % n] for i in range(first, last)])
    if getattr(self, "_pipe", None) is None or self._pipe[0] != (batch_size, seed):
      rows = [{"i": i, "source": name} for i, name in enumerate(self.sources)]
      pipe = pipeline_lib.make_pipeline(rows, batch_size=batch_size, seed=seed, weights=self.weights,
                                        process_index=0, process_count=1)
      object.__setattr__(self, "_pipe", ((batch_size, seed), pipe))
    pipe = self._pipe[1]
    if pipe.step != step:
      pipe.seek(step)
    return np.asarray([r["i"] for r in next(pipe)])

  def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
    return {"tokens": self.tokens[idx], "mask": self.mask[idx], "token_labels": self.token_labels[idx],
            "response_mask": self.response_mask[idx], "seq_labels": self.seq_labels[idx],
            "has_token_labels": self.has_token_labels[idx]}


def stop_token(tokenizer: Any, stop_token_id: int | None = None) -> int:
  """The id a response ends with: stop_token_id, else the tokenizer's eos token (the policy's stop token)."""
  sid = tokenizer.eos_token_id if stop_token_id is None else stop_token_id
  if not isinstance(sid, int) or isinstance(sid, bool) or not 0 <= sid < len(tokenizer):
    raise CotsafeError(f"safety RM data: stop token id {sid!r} (tokenizer {getattr(tokenizer, 'name_or_path', '')!r}"
                       f" eos_token {tokenizer.eos_token!r}), expected a token id in [0, {len(tokenizer)}): the RM "
                       "must see the policy's stop token, on which PPO puts the sequence rewards; set stop_token_id")
  return sid


def encode_row(tokenizer: Any, row: SpanRow, max_len: int, *,
               stop_id: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
  """(ids, token_labels, response_mask, truncated). The response keeps precedence over the prompt: the
  prompt is cut from the left down to a quarter of max_len before the response is cut on the right.

  stop_id (the policy's stop token) follows a whole response, in the response mask, labelled safe (0) on
  rows with token labels and unlabelled (-1) on rows with a sequence label only. Why: in PPO the RM scores
  every completion token, the stop token included, and its P(unsafe) there is a token penalty on the stop
  action. A stop token has no text of its own (a span [s, e) never covers the position len(response), the
  rule labels_from_offsets applies to zero-width tokens), and labelling it like the last token would
  penalise stopping after unsafe text, teaching the policy to keep going; the sequence-level safety term
  judges the whole response. A response cut at max_len gets no stop token (it did not end), as a
  completion cut at max_new_tokens has none.
  """
  prompt_text, k = render_prompt(tokenizer, row.prompt, row.response)
  response = row.response[k:]
  spans = None if row.spans is None else [(max(s - k, 0), e - k) for s, e in row.spans if e > k]
  p_ids = np.asarray(tokenizer(prompt_text, add_special_tokens=False)["input_ids"], np.int32)
  r_ids, offsets = tokenize_with_offsets(tokenizer, response)
  r_lab = labels_from_offsets(offsets, spans) if spans is not None else np.full(len(r_ids), -1, np.int32)
  cut_ids, cut_lab = r_ids, r_lab  # what a cut keeps from: the response without a stop token
  if stop_id is not None:
    r_ids = np.concatenate([r_ids, [stop_id]]).astype(np.int32)
    r_lab = np.concatenate([r_lab, [0 if spans is not None else -1]]).astype(np.int32)
  truncated = len(p_ids) + len(r_ids) > max_len
  if truncated:
    keep_p = min(len(p_ids), max(max_len - len(r_ids), max_len // 4))
    p_ids = p_ids[len(p_ids) - keep_p:]
    room = max_len - keep_p
    if len(r_ids) > room:  # the response itself is cut: it did not end, no stop token
      r_ids, r_lab = cut_ids[:room], cut_lab[:room]
  ids = np.concatenate([p_ids, r_ids]).astype(np.int32)
  labels = np.concatenate([np.full(len(p_ids), -1, np.int32), r_lab])
  resp = np.concatenate([np.zeros(len(p_ids), bool), np.ones(len(r_ids), bool)])
  return ids, labels, resp, truncated


def encode_file(tokenizer: Any, source: Any, *, max_len: int, columns: Mapping[str, str] | str | None = None,
                on_bad_row: str = "raise", stop_token_id: int | None = None) -> Encoded:
  """Read safety-span rows (one file in any supported format, with "file:line: ..." errors; a list of
  data.Source; or a data.TrainingData) and encode; every whole response ends with
  `stop_token(tokenizer, stop_token_id)` (see `encode_row`)."""
  stop_id = stop_token(tokenizer, stop_token_id)
  loaded = mixture_lib.training_data(source, schema="spans", columns=columns, on_bad_row=on_bad_row,
                                     job="train_safety_rm")
  names = tuple(r.get("source", loaded.source) for r in loaded.rows)
  rows = [_span_row(r) for r in loaded.rows]
  n = len(rows)
  out = {"tokens": np.zeros((n, max_len), np.int32), "mask": np.zeros((n, max_len), bool),
         "token_labels": np.full((n, max_len), -1, np.int32), "response_mask": np.zeros((n, max_len), bool)}
  truncated = 0
  for i, row in enumerate(rows):
    ids, labels, resp, cut = encode_row(tokenizer, row, max_len, stop_id=stop_id)
    out["tokens"][i, :len(ids)], out["mask"][i, :len(ids)] = ids, True
    out["token_labels"][i, :len(ids)], out["response_mask"][i, :len(ids)] = labels, resp
    truncated += cut
  return Encoded(**out, seq_labels=np.array([r.label for r in rows], np.int32),
                 has_token_labels=np.array([r.spans is not None for r in rows]), truncated=truncated,
                 skipped=loaded.num_skipped, sources=names, weights=loaded.weights)
