"""Rewards for chain-of-thought safety: token-level safety RM, guard judge, math verifier, refusal, composite."""
from cotsafe_jax.rewards.base import (KINDS, RewardBatch, RewardFn, SafetyScorer, SafetyScores, TokenCharMap,
                                      TokenRewards, last_token_index, part_masks, place_at_last_token,
                                      split_think)
from cotsafe_jax.rewards.composite import COMPONENTS, DEFAULT_WEIGHTS, CompositeReward
from cotsafe_jax.rewards.guard_judge import (LLAMA_GUARD_3, QWEN3_GUARD, TEMPLATES as GUARD_TEMPLATES,
                                             GuardJudge, GuardTemplate, load_guard_judge, verdict_probability)
from cotsafe_jax.rewards.refusal import DEFAULT_REFUSAL_PATTERNS, RefusalDetector, is_refusal
from cotsafe_jax.rewards.safety_rm import SEQ_POOLS, SafetyRM, init_safety_rm, load_safety_rm
from cotsafe_jax.rewards.safety_rm_trainer import evaluate_rm, train_safety_rm
from cotsafe_jax.rewards.spans import normalize_spans, spans_to_token_labels, tokenize_with_offsets
from cotsafe_jax.rewards.verifiers import check_think_format, extract_answer, is_equivalent

__all__ = ["COMPONENTS", "CompositeReward", "DEFAULT_REFUSAL_PATTERNS", "DEFAULT_WEIGHTS", "GUARD_TEMPLATES",
           "GuardJudge", "GuardTemplate", "KINDS", "LLAMA_GUARD_3", "QWEN3_GUARD", "RefusalDetector",
           "RewardBatch", "RewardFn", "SEQ_POOLS", "SafetyRM", "SafetyScorer", "SafetyScores", "TokenCharMap",
           "TokenRewards", "check_think_format", "evaluate_rm", "extract_answer", "init_safety_rm",
           "is_equivalent", "is_refusal", "last_token_index", "load_guard_judge", "load_safety_rm",
           "normalize_spans", "part_masks", "place_at_last_token", "spans_to_token_labels", "split_think",
           "tokenize_with_offsets", "train_safety_rm", "verdict_probability"]
