"""Evaluation: judges (synthetic ground truth, rules + guard scorer), `evaluate_policy`, reasoning-token
analysis (entropy, reflection dynamics) and the workdir report (summary.json, report.md, PNG plots)."""
from cotsafe_jax.eval.analysis import (reasoning_entropies, reasoning_lengths, reasoning_mask,
                                       reflection_dynamics)
from cotsafe_jax.eval.evaluate import (SUMMARY_KEYS, EvalResult, evaluate_policy, score_completions, summarize,
                                       write_samples)
from cotsafe_jax.eval.reasoning import REFLECTION_PATTERNS, count_reflections, is_correct, reflection_regex
from cotsafe_jax.eval.report import CURVE_KEYS, format_table, write_report
from cotsafe_jax.eval.safety import VERDICT_KEYS, Judge, RuleJudge, SafetyScorer, SyntheticJudge, prompt_text

__all__ = ["CURVE_KEYS", "EvalResult", "Judge", "REFLECTION_PATTERNS", "RuleJudge", "SUMMARY_KEYS", "SafetyScorer",
           "SyntheticJudge", "VERDICT_KEYS", "count_reflections", "evaluate_policy", "format_table", "is_correct",
           "prompt_text", "reasoning_entropies", "reasoning_lengths", "reasoning_mask", "reflection_dynamics",
           "reflection_regex", "score_completions", "summarize", "write_report", "write_samples"]
