"""The composite reward: a weighted sum of safety, correctness, format and refusal terms, routed by prompt kind.

Token terms land on their tokens, sequence terms on each row's last completion token; all are reported.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.rewards import verifiers
from cotsafe_jax.rewards.base import (KINDS, RewardBatch, SafetyScorer, SafetyScores, TokenRewards, check_kinds,
                                      place_at_last_token, to_token_rewards)
from cotsafe_jax.rewards.refusal import RefusalDetector

COMPONENTS = ("token_safety", "sequence_safety", "correctness", "format", "refusal", "over_refusal")
SEQUENCE_PARTS = ("response", "reasoning", "answer", "max")

DEFAULT_WEIGHTS: dict[str, dict[str, float]] = {
    "harmful": {"token_safety": 1.0, "sequence_safety": 1.0, "refusal": 0.5, "format": 0.1},
    "benign": {"token_safety": 1.0, "sequence_safety": 1.0, "over_refusal": 1.0, "format": 0.1},
    "reasoning": {"token_safety": 1.0, "correctness": 1.0, "over_refusal": 1.0, "format": 0.1},
}


class CompositeReward:
  """r_t = tok_t + [t = last] * seq, k = the row's prompt kind:
    tok_t = -w_tok[k] * P_unsafe(t)                                       (token_bt: on its token)
    seq   = -w_seq[k] * P_unsafe(part) + w_cor[k] * correct + w_fmt[k] * format_ok
            + w_ref[k] * refused * finished - w_over[k] * refused                  (sequence_b)
  each clipped to [-clip, clip] when `clip` is set; both parts are returned apart for token-level GRPO.
  Weights are non-negative; a term with weight 0 for every kind in the batch is not computed.

  A row cut at max_new_tokens (batch.finished_b False) has no finished answer, and a missing answer is
  never safe: its sequence-safety P_unsafe is raised to at least `unfinished_unsafe` (default 1: scored
  unsafe), whatever the scorer said about the text so far, and it earns no refusal reward (a refusal
  that was cut off may still turn into compliance). Its token-level terms are unchanged.

  token_cost=True also returns cost_bt = P_unsafe(t) of the token_safety scorer, unweighted, whatever
  w_tok: the PPO-Lagrangian's cost, kept out of the reward (set w_tok to 0 then, or it is counted twice).
  """

  def __init__(self, *, weights: Mapping[str, Mapping[str, float]] = DEFAULT_WEIGHTS,
               token_safety: SafetyScorer | None = None, sequence_safety: SafetyScorer | None = None,
               sequence_part: str = "response", refusal: RefusalDetector | None = None,
               clip: float | None = None, require_open_tag: bool = False,
               think_tags: tuple[str, str] = ("<think>", "</think>"), unfinished_unsafe: float = 1.0,
               token_cost: bool = False):
    for kind, table in weights.items():
      if kind not in KINDS:
        raise CotsafeError(f"CompositeReward.weights: unknown kind {kind!r}, expected one of {', '.join(KINDS)}")
      for name, w in table.items():
        if name not in COMPONENTS:
          raise CotsafeError(f"CompositeReward.weights[{kind!r}]: unknown component {name!r}, "
                             f"expected one of {', '.join(COMPONENTS)}")
        if not float(w) >= 0.0:
          raise CotsafeError(f"CompositeReward.weights[{kind!r}][{name!r}] = {w}: must be >= 0 "
                             "(each term already has its sign)")
    uses = lambda name: any(float(t.get(name, 0.0)) for t in weights.values())  # noqa: E731
    if uses("token_safety") and token_safety is None:
      raise CotsafeError("CompositeReward: weights use token_safety but no token_safety scorer is given")
    if token_safety is not None and not token_safety.token_level:
      raise CotsafeError(f"CompositeReward: token_safety scorer {type(token_safety).__name__} has no token "
                         "resolution (use a safety RM, or a guard judge in 'parts' or 'stepwise' mode)")
    if uses("sequence_safety") and sequence_safety is None:
      raise CotsafeError("CompositeReward: weights use sequence_safety but no sequence_safety scorer is given")
    if token_cost and token_safety is None:
      raise CotsafeError("CompositeReward: token_cost=True needs a token_safety scorer (the cost is its P(unsafe))")
    if sequence_part not in SEQUENCE_PARTS:
      raise CotsafeError(f"CompositeReward: sequence_part={sequence_part!r}, expected one of "
                         f"{', '.join(SEQUENCE_PARTS)}")
    if clip is not None and not clip > 0:
      raise CotsafeError(f"CompositeReward: clip={clip} must be > 0 (or None)")
    if not 0.0 < unfinished_unsafe <= 1.0:
      raise CotsafeError(f"CompositeReward: unfinished_unsafe={unfinished_unsafe} must be in (0, 1] (the "
                         "P(unsafe) an unfinished completion's missing answer gets at least; 0 would score it safe)")
    self.unfinished_unsafe = float(unfinished_unsafe)
    self.token_cost = bool(token_cost)
    self.weights = {k: {c: float(weights.get(k, {}).get(c, 0.0)) for c in COMPONENTS} for k in KINDS}
    self.token_safety, self.sequence_safety = token_safety, sequence_safety
    self.sequence_part = sequence_part
    self.refusal = refusal if refusal is not None else RefusalDetector()
    self.clip = clip
    self.require_open_tag = require_open_tag
    self.think_tags = think_tags

  def _weights_b(self, kinds: tuple[str, ...]) -> dict[str, np.ndarray]:
    return {c: np.array([self.weights[k][c] for k in kinds], np.float32) for c in COMPONENTS}

  def _sequence_unsafe(self, scores: SafetyScores) -> np.ndarray:
    if self.sequence_part == "response":
      return scores.sequence_unsafe_b
    needed = ("reasoning", "answer") if self.sequence_part == "max" else (self.sequence_part,)
    missing = [p for p in needed if p not in scores.parts]
    if missing:
      raise CotsafeError(f"CompositeReward: sequence_part={self.sequence_part!r} but the sequence_safety scorer "
                         f"{type(self.sequence_safety).__name__} gives no {', '.join(missing)} score "
                         "(a guard judge in 'response' mode scores the whole response only)")
    if self.sequence_part == "max":
      return np.maximum(scores.parts["reasoning"], scores.parts["answer"])
    return scores.parts[self.sequence_part]

  def __call__(self, batch: RewardBatch) -> TokenRewards:
    check_kinds(batch.kinds)
    mask_bt = np.asarray(batch.completion_mask_bt, bool)
    w = self._weights_b(batch.kinds)
    kinds = np.array(batch.kinds)
    finished = batch.finished
    comps: dict[str, np.ndarray] = {}
    info: dict[str, float] = {"unfinished_rate": float(1.0 - finished.mean()) if len(finished) else 0.0}

    scored: dict[int, SafetyScores] = {}

    def score(scorer: SafetyScorer) -> SafetyScores:
      if id(scorer) not in scored:  # one pass when the same scorer serves both terms
        scored[id(scorer)] = scorer.score(batch)
      return scored[id(scorer)]

    cost_bt = None
    if w["token_safety"].any() or self.token_cost:
      p_bt = np.where(mask_bt, np.asarray(score(self.token_safety).token_unsafe_bt, np.float32), 0.0)
      if w["token_safety"].any():
        comps["token_safety"] = -w["token_safety"][:, None] * p_bt
      info["token_unsafe_mean"] = float(p_bt.sum() / max(mask_bt.sum(), 1))
      cost_bt = p_bt if self.token_cost else None
    seq_b: dict[str, np.ndarray] = {}
    if w["sequence_safety"].any():
      p_b = np.asarray(self._sequence_unsafe(score(self.sequence_safety)), np.float32)
      p_b = np.where(finished, p_b, np.maximum(p_b, self.unfinished_unsafe)).astype(np.float32)
      seq_b["sequence_safety"] = -w["sequence_safety"] * p_b
      info["sequence_unsafe_mean"] = float(p_b.mean())
    if w["correctness"].any():
      correct = np.zeros(batch.batch_size, np.float32)
      for i in np.nonzero(w["correctness"])[0]:
        if batch.references[i] is None:
          raise CotsafeError(f"rewards: row {i} (kind {batch.kinds[i]}): the correctness term needs the "
                             "prompt's reference `answer`, none given")
        correct[i] = verifiers.is_equivalent(verifiers.extract_answer(batch.answers[i]), batch.references[i])
      seq_b["correctness"] = w["correctness"] * correct
      rows = w["correctness"] > 0
      info["accuracy"] = float(correct[rows].mean())
    if w["format"].any():
      ok = np.array([verifiers.check_think_format(t, open_tag=self.think_tags[0], close_tag=self.think_tags[1],
                                                  require_open_tag=self.require_open_tag)
                     for t in batch.completions], np.float32)
      seq_b["format"] = w["format"] * ok
      info["format_ok_rate"] = float(ok.mean())
    if w["refusal"].any() or w["over_refusal"].any():
      refused = self.refusal(batch.answers).astype(np.float32)
      seq_b["refusal"] = w["refusal"] * refused * finished  # a cut-off refusal is not a refusal yet
      seq_b["over_refusal"] = -w["over_refusal"] * refused
      for kind in KINDS:
        if (kinds == kind).any():
          info[f"refusal_rate/{kind}"] = float(refused[kinds == kind].mean())

    token_bt = comps.get("token_safety", np.zeros(mask_bt.shape, np.float32)).astype(np.float32)
    sequence_b = (sum(seq_b.values()) if seq_b else np.zeros(batch.batch_size)).astype(np.float32)
    if self.clip is not None:
      token_bt, sequence_b = np.clip(token_bt, -self.clip, self.clip), np.clip(sequence_b, -self.clip, self.clip)
    token_bt = np.where(mask_bt, token_bt, 0.0).astype(np.float32)
    sequence_b = np.where(mask_bt.any(axis=1), sequence_b, 0.0).astype(np.float32)  # an empty row holds none
    values_bt = token_bt + place_at_last_token(sequence_b, mask_bt)
    comps.update(seq_b)
    info["reward_sum_mean"] = float(values_bt.sum(axis=1).mean())
    info["empty_rows"] = float((~mask_bt.any(axis=1)).sum())
    return to_token_rewards(values_bt, comps, info, sequence_b=sequence_b, token_bt=token_bt, cost_bt=cost_bt)
