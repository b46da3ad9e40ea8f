"""Evaluation: judges (synthetic ground truth, rules + guard scorer), `evaluate_policy` (k samples per prompt
over a suite of benchmarks), metrics with bootstrap intervals, reasoning-token analysis (entropy, reflection
dynamics) and the workdir report (summary.json, report.md, PNG plots)."""
from cotsafe_jax.eval.analysis import (reasoning_entropies, reasoning_lengths, reasoning_mask,
                                       reflection_dynamics)
from cotsafe_jax.eval.evaluate import (CHOICE_INSTRUCTION, DEFAULT_PROMPT_TEMPLATES, R1_MATH_INSTRUCTION, EvalConfig,
                                       EvalResult, apply_prompt_template, default_buckets, evaluate_policy,
                                       score_completions, write_samples)
from cotsafe_jax.eval.metrics import (aggregate, bootstrap_ci, flat, majority_index, metric_names, part_status,
                                      pass_at_k)
from cotsafe_jax.eval.reasoning import REFLECTION_PATTERNS, count_reflections, is_correct, reflection_regex
from cotsafe_jax.eval.report import (CURVE_KEYS, check_summary, flat_values, format_table, summary_of, write_report,
                                     write_training_report)
from cotsafe_jax.eval.safety import VERDICT_KEYS, Judge, RuleJudge, SafetyScorer, SyntheticJudge, prompt_text

__all__ = ["CHOICE_INSTRUCTION", "CURVE_KEYS", "DEFAULT_PROMPT_TEMPLATES", "EvalConfig", "EvalResult", "Judge",
           "R1_MATH_INSTRUCTION", "REFLECTION_PATTERNS", "RuleJudge", "SafetyScorer", "SyntheticJudge",
           "VERDICT_KEYS", "aggregate", "apply_prompt_template", "bootstrap_ci", "check_summary",
           "count_reflections", "default_buckets", "evaluate_policy", "flat", "flat_values", "format_table",
           "is_correct", "majority_index", "metric_names", "part_status", "pass_at_k", "prompt_text",
           "reasoning_entropies", "reasoning_lengths", "reasoning_mask", "reflection_dynamics", "reflection_regex",
           "score_completions", "summary_of", "write_report", "write_samples", "write_training_report"]
