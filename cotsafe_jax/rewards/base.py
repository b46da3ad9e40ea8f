"""What every reward function consumes (RewardBatch) and returns (TokenRewards), plus token/char alignment.

Sequence rewards go on each row's last completion token; token penalties go on the tokens they concern.
"""
from __future__ import annotations

import bisect
import dataclasses
from typing import Any, Protocol, Sequence, runtime_checkable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cotsafe_jax.errors import CotsafeError

KINDS = ("harmful", "benign", "reasoning")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@flax.struct.dataclass
class TokenRewards:
  """values_bt: float32 [B, T] per-token rewards, zero on padding. components: name -> the weighted
  contribution of that term ([B] for sequence terms, [B, T] for token terms), for logging; info: scalars.

  A reward that knows which of its terms judge the whole sequence also returns them apart (both or
  neither): sequence_b [B] (outcome terms) and token_bt [B, T] (terms on their tokens), with
  values_bt = token_bt + sequence_b on each row's last completion token. Token-level GRPO / RLOO
  (`rl.compute_advantages(sequence_rewards_b=..., token_rewards_bt=...)`) needs them; None: values_bt only.
  cost_bt: P(unsafe) of each completion token, unweighted and in none of the above (when asked for: the
  PPO-Lagrangian's cost).
  """
  values_bt: jax.Array
  components: dict[str, jax.Array]
  info: dict[str, jax.Array]
  sequence_b: jax.Array | None = None
  token_bt: jax.Array | None = None
  cost_bt: jax.Array | None = None  # [B, T] a safety cost apart from the reward (PPO-Lagrangian), or None


@dataclasses.dataclass(frozen=True)
class RewardBatch:
  """A batch of rollouts on the host: prompt tokens left-padded, completion tokens right-padded (mask 1 = real).

  `completions` are the decoded completion tokens; `reasoning` / `answers` their think/answer split and
  `answer_starts` the character offset in `completions` where the answer part begins (len(text) if none).
  `references` is each prompt's reference `answer` (None when it has none). `tokenizer` is the policy's.
  `finished_b` [B] bool: the row emitted a stop token (False: cut at max_new_tokens, its answer missing
  or partial); None = every row finished (callers without a sampler). See `finished`.
  """
  prompt_tokens_bp: np.ndarray
  prompt_mask_bp: np.ndarray
  completion_tokens_bt: np.ndarray
  completion_mask_bt: np.ndarray
  prompts: tuple[str, ...]
  completions: tuple[str, ...]
  reasoning: tuple[str, ...]
  answers: tuple[str, ...]
  answer_starts: tuple[int, ...]
  kinds: tuple[str, ...]
  references: tuple[str | None, ...]
  tokenizer: Any = None
  finished_b: np.ndarray | None = None

  @property
  def batch_size(self) -> int:
    return int(self.completion_tokens_bt.shape[0])

  @property
  def finished(self) -> np.ndarray:
    """[B] bool: which rows ended with a stop token (all of them when finished_b is None)."""
    if self.finished_b is None:
      return np.ones(self.batch_size, bool)
    return np.asarray(self.finished_b, bool)

  @classmethod
  def from_tokens(cls, *, tokenizer: Any, prompt_tokens_bp: Any, prompt_mask_bp: Any,
                  completion_tokens_bt: Any, completion_mask_bt: Any, kinds: Sequence[str],
                  references: Sequence[str | None] | None = None, prompts: Sequence[str] | None = None,
                  think_tags: tuple[str, str] = (THINK_OPEN, THINK_CLOSE),
                  finished_b: Any = None) -> "RewardBatch":
    """Decode prompts and completions with `tokenizer` and split each completion into reasoning / answer.

    finished_b: the sampler's [B] flags (`rollout.generate(...).finished_b`): a row cut at max_new_tokens
    is unfinished, and no reward scores its missing answer as safe.
    """
    p_tok, p_mask = np.asarray(prompt_tokens_bp), np.asarray(prompt_mask_bp).astype(bool)
    c_tok, c_mask = np.asarray(completion_tokens_bt), np.asarray(completion_mask_bt).astype(bool)
    b = c_tok.shape[0]
    if p_tok.shape != p_mask.shape or c_tok.shape != c_mask.shape or p_tok.shape[0] != b:
      raise CotsafeError(f"RewardBatch: shapes disagree: prompt tokens {p_tok.shape}, prompt mask "
                         f"{p_mask.shape}, completion tokens {c_tok.shape}, completion mask {c_mask.shape}")
    kinds = tuple(kinds)
    references = tuple(references) if references is not None else (None,) * b
    if len(kinds) != b or len(references) != b:
      raise CotsafeError(f"RewardBatch: {len(kinds)} kinds and {len(references)} references for {b} rows")
    if finished_b is not None:
      finished_b = np.asarray(finished_b)
      if finished_b.shape != (b,) or finished_b.dtype != bool:
        raise CotsafeError(f"RewardBatch: finished_b is {finished_b.dtype} {finished_b.shape}, expected bool "
                           f"[{b}] (the sampler's finished_b)")
    if prompts is None:
      prompts = tuple(decode(tokenizer, p_tok[i][p_mask[i]]) for i in range(b))
    completions = tuple(decode(tokenizer, c_tok[i][c_mask[i]]) for i in range(b))
    splits = [split_think(t, open_tag=think_tags[0], close_tag=think_tags[1]) for t in completions]
    return cls(prompt_tokens_bp=p_tok, prompt_mask_bp=p_mask, completion_tokens_bt=c_tok,
               completion_mask_bt=c_mask, prompts=tuple(prompts), completions=completions,
               reasoning=tuple(s[0] for s in splits), answers=tuple(s[1] for s in splits),
               answer_starts=tuple(s[2] for s in splits), kinds=kinds, references=references,
               tokenizer=tokenizer, finished_b=finished_b)


@dataclasses.dataclass(frozen=True)
class SafetyScores:
  """P(unsafe) from a safety scorer. token_unsafe_bt: [B, T] over completion tokens (0 on padding), or None
  for a scorer without token resolution; sequence_unsafe_b: the whole response; parts: reasoning / answer."""
  token_unsafe_bt: np.ndarray | None
  sequence_unsafe_b: np.ndarray
  parts: dict[str, np.ndarray]


@runtime_checkable
class RewardFn(Protocol):
  def __call__(self, batch: RewardBatch) -> TokenRewards: ...


@runtime_checkable
class SafetyScorer(Protocol):
  token_level: bool

  def score(self, batch: RewardBatch) -> SafetyScores: ...


def check_kinds(kinds: Sequence[str]) -> None:
  for i, k in enumerate(kinds):
    if k not in KINDS:
      raise CotsafeError(f"rewards: row {i}: unknown kind {k!r}, expected one of {', '.join(KINDS)}")


def last_token_index(mask_bt: np.ndarray) -> np.ndarray:
  """Index of each row's last real token; -1 for a row with none."""
  mask_bt = np.asarray(mask_bt, bool)
  t = mask_bt.shape[1]
  idx = t - 1 - np.argmax(mask_bt[:, ::-1], axis=1)
  return np.where(mask_bt.any(axis=1), idx, -1)


def place_at_last_token(values_b: np.ndarray, mask_bt: np.ndarray) -> np.ndarray:
  """[B] -> [B, T] float32 with each row's value on its last real token (dropped for an empty row)."""
  out = np.zeros(np.shape(mask_bt), np.float32)
  last = last_token_index(mask_bt)
  rows = np.nonzero(last >= 0)[0]
  out[rows, last[rows]] = np.asarray(values_b, np.float32)[rows]
  return out


def to_token_rewards(values_bt: np.ndarray, components: dict[str, np.ndarray], info: dict[str, float], *,
                     sequence_b: np.ndarray | None = None, token_bt: np.ndarray | None = None,
                     cost_bt: np.ndarray | None = None) -> TokenRewards:
  if (sequence_b is None) != (token_bt is None):
    raise CotsafeError("to_token_rewards: sequence_b and token_bt go together (values_bt = token_bt + "
                       "sequence_b on the last token)")
  f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)  # noqa: E731
  return TokenRewards(values_bt=f32(values_bt), components={k: f32(v) for k, v in components.items()},
                      info={k: f32(v) for k, v in info.items()}, sequence_b=f32(sequence_b), token_bt=f32(token_bt),
                      cost_bt=f32(cost_bt))


def split_think(text: str, *, open_tag: str = THINK_OPEN, close_tag: str = THINK_CLOSE) -> tuple[str, str, int]:
  """(reasoning, answer, answer_start): split at the first close tag; no close tag -> all reasoning.

  answer_start is the character offset right after the close tag (len(text) when there is none).
  """
  close = text.find(close_tag)
  if close < 0:
    reasoning, answer, start = text, "", len(text)
  else:
    reasoning, answer, start = text[:close], text[close + len(close_tag):], close + len(close_tag)
  stripped = reasoning.lstrip()
  if stripped.startswith(open_tag):
    reasoning = stripped[len(open_tag):]
  return reasoning.strip(), answer.strip(), start


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
  """The one decoding every reward uses, so character offsets agree across modules."""
  return tokenizer.decode([int(i) for i in ids], skip_special_tokens=True,
                          clean_up_tokenization_spaces=False)


class TokenCharMap:
  """Maps character offsets of decode(ids) back to token indices, by bisection over decoded prefixes.

  Decoding a prefix of a byte-level sequence gives a prefix of the full text (up to a replacement character
  for a cut multi-byte character), so prefix length is monotone in the number of tokens.
  """

  def __init__(self, tokenizer: Any, ids: Sequence[int]):
    self._tok, self._ids = tokenizer, [int(i) for i in ids]
    self._memo: dict[int, int] = {0: 0}

  def __len__(self) -> int:
    return len(self._ids)

  def prefix_len(self, t: int) -> int:
    if t not in self._memo:
      self._memo[t] = len(decode(self._tok, self._ids[:t]))
    return self._memo[t]

  def first_token_from(self, char_pos: int) -> int:
    """The index of the first token that starts at or after `char_pos` (len(ids) if none)."""
    return bisect.bisect_left(range(len(self._ids) + 1), char_pos, key=self.prefix_len)

  def token_at(self, char_pos: int) -> int:
    """The index of the token that holds character `char_pos` (a token straddling it counts)."""
    t = bisect.bisect_right(range(len(self._ids) + 1), char_pos, key=self.prefix_len) - 1
    return min(max(t, 0), max(len(self._ids) - 1, 0))


def part_masks(batch: RewardBatch) -> tuple[np.ndarray, np.ndarray]:
  """(reasoning_bt, answer_bt) bool masks over completion tokens: a token straddling the close tag is reasoning."""
  mask_bt = np.asarray(batch.completion_mask_bt, bool)
  reasoning_bt = np.zeros_like(mask_bt)
  answer_bt = np.zeros_like(mask_bt)
  for i in range(batch.batch_size):
    pos = np.nonzero(mask_bt[i])[0]
    if batch.answer_starts[i] >= len(batch.completions[i]):
      reasoning_bt[i, pos] = True
      continue
    if batch.tokenizer is None:
      raise CotsafeError("rewards: RewardBatch.tokenizer is needed to map the answer part to tokens")
    n_reason = TokenCharMap(batch.tokenizer, batch.completion_tokens_bt[i][pos]).first_token_from(
        batch.answer_starts[i])
    reasoning_bt[i, pos[:n_reason]] = True
    answer_bt[i, pos[n_reason:]] = True
  return reasoning_bt, answer_bt
