"""Token-level analysis of generated chains of thought: which completion tokens are reasoning, their
sampling entropy, and reflection dynamics (how often reflection phrases occur, the entropy where they start).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import numpy as np

from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.eval import reasoning

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def token_pieces(tokenizer: Any) -> Callable[[Sequence[int]], list[str]]:
  """pieces(ids) -> each token's own text (cached per id); special tokens (pad, eos, ...) are empty, but never
  the think tags, which some tokenizers mark special.

  For byte-level BPE (Llama 3, Qwen) the pieces join into the decoded text, except that a multi-byte
  character split over tokens reads as replacement characters: positions shift only inside non-ASCII text.
  Pieces map characters to tokens in one pass (bisecting decoded prefixes would decode log T prefixes per
  lookup: minutes on a real evaluation with long chains of thought).
  """
  keep = {tokenizer.convert_tokens_to_ids(t) for t in (THINK_OPEN, THINK_CLOSE)}
  drop = set(tokenizer.all_special_ids) - keep
  cache: dict[int, str] = {}

  def pieces(ids: Sequence[int]) -> list[str]:
    out = []
    for i in ids:
      i = int(i)
      if i not in cache:
        cache[i] = "" if i in drop else tokenizer.decode([i], skip_special_tokens=False)
      out.append(cache[i])
    return out

  return pieces


def _single_token(tokenizer: Any, text: str) -> int | None:
  ids = tokenizer(text, add_special_tokens=False)["input_ids"]
  return int(ids[0]) if len(ids) == 1 else None


def _starts(pieces: Sequence[str]) -> np.ndarray:
  """[T + 1] character offset where each token starts in "".join(pieces) (the last entry: its length)."""
  return np.concatenate([[0], np.cumsum([len(p) for p in pieces], dtype=np.int64)])


def _token_at(starts: np.ndarray, char_pos: int) -> int:
  """Index of the token holding character `char_pos` (empty tokens never hold one)."""
  return int(np.searchsorted(starts, char_pos, side="right")) - 1


def _reasoning_length_by_text(pieces: Sequence[str], close_tag: str) -> int:
  """Tokens before the one where `close_tag` starts in the joined text (all when it never appears)."""
  pos = "".join(pieces).find(close_tag)
  return len(pieces) if pos < 0 else _token_at(_starts(pieces), pos)


def completion_lengths(mask_nt: np.ndarray) -> np.ndarray:
  """Generated tokens per row; the mask must be a prefix of each row, as `rollout.generate` returns it."""
  mask_nt = np.asarray(mask_nt, bool)
  n_n = mask_nt.sum(axis=1)
  if not (mask_nt == (np.arange(mask_nt.shape[1])[None, :] < n_n[:, None])).all():
    raise CotsafeError("analysis: completion mask is not a prefix of each row (expected generate's mask_bt)")
  return n_n


def reasoning_lengths(tokenizer: Any, tokens_nt: np.ndarray, mask_nt: np.ndarray, *, stop_ids: Sequence[int] = (),
                      close_tag: str = THINK_CLOSE) -> np.ndarray:
  """Reasoning tokens per row [N]: completion tokens before the first `close_tag` (all of them when the row
  never closes its think block), a final stop token excluded. Reasoning is always a prefix of the row.

  When `close_tag` is one token of the vocabulary it is found by id; otherwise (e.g. a Llama 3 tokenizer
  spelling "</think>" in several tokens) by its character position in the joined `token_pieces`.
  """
  tokens_nt = np.asarray(tokens_nt)
  n_n = completion_lengths(mask_nt)
  stop = {int(i) for i in stop_ids}
  close_id = _single_token(tokenizer, close_tag)
  pieces = None if close_id is not None else token_pieces(tokenizer)
  out = np.zeros(len(n_n), np.int64)
  for i, n in enumerate(n_n):
    ids = tokens_nt[i, :n]
    if n and int(ids[-1]) in stop:
      ids = ids[:-1]
    if close_id is not None:
      hits = np.flatnonzero(ids == close_id)
      out[i] = hits[0] if hits.size else len(ids)
    else:
      out[i] = _reasoning_length_by_text(pieces(ids), close_tag)
  return out


def reasoning_mask(lengths_n: np.ndarray, num_tokens: int) -> np.ndarray:
  """[N, T] bool: True on each row's first lengths_n[i] columns."""
  return np.arange(num_tokens)[None, :] < np.asarray(lengths_n)[:, None]


def reasoning_entropies(entropy_nt: np.ndarray, lengths_n: np.ndarray) -> np.ndarray:
  """Per-token entropies of every row's reasoning tokens, concatenated row by row (float32, flat)."""
  entropy_nt = np.asarray(entropy_nt, np.float32)
  return entropy_nt[reasoning_mask(lengths_n, entropy_nt.shape[1])]


def phrase_start_tokens(pieces: Sequence[str], *, regex: re.Pattern) -> list[int]:
  """Token index where each match of `regex` in "".join(pieces) starts (the token holding its first character)."""
  starts = _starts(pieces)
  return [_token_at(starts, m.start()) for m in regex.finditer("".join(pieces))]


def reflection_dynamics(tokenizer: Any, tokens_nt: np.ndarray, entropy_nt: np.ndarray, lengths_n: np.ndarray, *,
                        patterns: Sequence[str] = reasoning.REFLECTION_PATTERNS) -> dict[str, float | int | None]:
  """Reflection phrases in the reasoning tokens of each row and the sampling entropy where they start.

  reflections_per_response: phrases per row; reflection_tokens: how many reasoning tokens start one;
  entropy_at_reflection / entropy_elsewhere: mean entropy at those tokens / at the other reasoning tokens
  (None when there are none). High entropy at "wait" marks it as a point where the policy chooses to reflect.
  """
  regex = reasoning.reflection_regex(patterns)
  pieces = token_pieces(tokenizer)
  tokens_nt, entropy_nt = np.asarray(tokens_nt), np.asarray(entropy_nt, np.float32)
  at_nt = np.zeros(tokens_nt.shape, bool)
  phrases = 0
  for i, n in enumerate(np.asarray(lengths_n)):
    starts = phrase_start_tokens(pieces(tokens_nt[i, :n]), regex=regex)
    phrases += len(starts)
    at_nt[i, starts] = True
  mask_nt = reasoning_mask(lengths_n, tokens_nt.shape[1])
  at, other = entropy_nt[at_nt], entropy_nt[mask_nt & ~at_nt]
  return {"reflections_per_response": phrases / max(len(tokens_nt), 1), "reflection_tokens": int(at.size),
          "entropy_at_reflection": float(at.mean()) if at.size else None,
          "entropy_elsewhere": float(other.mean()) if other.size else None}
