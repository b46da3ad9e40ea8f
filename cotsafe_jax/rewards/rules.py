"""A rule-based dense reward: a bonus on every completion token whose text is one of given words.

Easy to learn from scratch, so smoke runs and tests of the PPO loop see the reward rise.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.rewards.base import RewardBatch, TokenRewards, to_token_rewards


class TokenSetReward:
  """r_t = bonus if the t-th completion token decodes (stripped, lower-cased) to one of `words` (or its id is
  in `token_ids`), else -cost. Word ids are resolved from the batch's tokenizer once."""

  def __init__(self, *, words: Sequence[str] = (), token_ids: Sequence[int] = (), bonus: float = 1.0,
               cost: float = 0.0):
    if not words and not token_ids:
      raise CotsafeError("TokenSetReward: words and token_ids are both empty, expected at least one")
    self.words = tuple(w.strip().lower() for w in words)
    self.bonus, self.cost = float(bonus), float(cost)
    self._extra_ids = tuple(int(i) for i in token_ids)
    self._ids: np.ndarray | None = None

  def _target_ids(self, tokenizer) -> np.ndarray:
    if self._ids is None:
      vocab = tokenizer.get_vocab()
      ids = {i for i in vocab.values() if self.words and tokenizer.decode([i]).strip().lower() in self.words}
      ids |= set(self._extra_ids)
      if not ids:
        raise CotsafeError(f"TokenSetReward: no token of the tokenizer decodes to any of {list(self.words)}")
      self._ids = np.array(sorted(ids))
    return self._ids

  def __call__(self, batch: RewardBatch) -> TokenRewards:
    if batch.tokenizer is None:
      raise CotsafeError("TokenSetReward: the batch carries no tokenizer")
    mask_bt = np.asarray(batch.completion_mask_bt, bool)
    hit_bt = np.isin(np.asarray(batch.completion_tokens_bt), self._target_ids(batch.tokenizer)) & mask_bt
    values_bt = np.where(hit_bt, self.bonus, -self.cost) * mask_bt
    info = {"target_token_rate": float(hit_bt.sum() / max(mask_bt.sum(), 1))}
    return to_token_rewards(values_bt.astype(np.float32), {"token_set": values_bt.astype(np.float32)}, info)


class TokenSetScorer:
  """A rule-based SafetyScorer with token resolution: P(unsafe) = 1 on every completion token whose id is in
  `token_ids` (or that decodes to one of `words`), else 0; sequences and parts pooled by max. For smoke runs
  and tests of the safety terms (e.g. the PPO-Lagrangian cost) without a trained model."""
  token_level = True

  def __init__(self, *, words: Sequence[str] = (), token_ids: Sequence[int] = ()):
    self._set = TokenSetReward(words=words, token_ids=token_ids)

  def score(self, batch: RewardBatch):
    from cotsafe_jax.rewards.base import SafetyScores, part_masks
    mask_bt = np.asarray(batch.completion_mask_bt, bool)
    p_bt = (np.isin(np.asarray(batch.completion_tokens_bt), self._set._target_ids(batch.tokenizer))
            & mask_bt).astype(np.float32)
    reasoning_bt, answer_bt = part_masks(batch)
    pool = lambda m: np.where(m, p_bt, 0.0).max(axis=1) if p_bt.size else np.zeros(len(p_bt))  # noqa: E731
    return SafetyScores(token_unsafe_bt=p_bt, sequence_unsafe_b=pool(mask_bt),
                        parts={"reasoning": pool(reasoning_bt), "answer": pool(answer_bt)})
