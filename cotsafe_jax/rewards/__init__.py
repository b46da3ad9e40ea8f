"""Rewards for chain-of-thought safety: token-level safety RM, guard judge, math verifier, refusal, composite."""
from cotsafe_jax.rewards.base import (KINDS, RewardBatch, RewardFn, SafetyScorer, SafetyScores, TokenCharMap,
                                      TokenRewards, last_token_index, part_masks, place_at_last_token,
                                      split_think)
from cotsafe_jax.rewards.composite import COMPONENTS, DEFAULT_WEIGHTS, CompositeReward
from cotsafe_jax.rewards.refusal import DEFAULT_REFUSAL_PATTERNS, RefusalDetector, is_refusal
from cotsafe_jax.rewards.spans import normalize_spans, spans_to_token_labels, tokenize_with_offsets
from cotsafe_jax.rewards.verifiers import check_think_format, extract_answer, is_equivalent

__all__ = ["COMPONENTS", "CompositeReward", "DEFAULT_REFUSAL_PATTERNS", "DEFAULT_WEIGHTS", "KINDS",
           "RefusalDetector", "RewardBatch", "RewardFn", "SafetyScorer", "SafetyScores", "TokenCharMap",
           "TokenRewards", "check_think_format", "extract_answer", "is_equivalent", "is_refusal",
           "last_token_index", "normalize_spans", "part_masks", "place_at_last_token", "split_think",
           "spans_to_token_labels", "tokenize_with_offsets"]
