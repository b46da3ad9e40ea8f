"""Text-level reasoning checks for evaluation: is a final answer correct, does a chain of thought reflect.

Correctness reuses the reward's math verifier, so training and evaluation agree on what "correct" means.
"""
from __future__ import annotations

import re
from typing import Sequence

from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.rewards import verifiers

_LET_ME = r"let me (?:double[- ]?)?(?:check|verify|recheck|re-check|reconsider|re-examine|rethink|think again)\b"
# phrases with which reasoning models re-examine their own steps ("aha" / self-verification markers); one
# phrase may run on ("wait, let me check" counts once). "wait" covers the synthetic task's reflections.
REFLECTION_PATTERNS: tuple[str, ...] = (
    rf"\b(?:but\s+)?(?:wait|hmm+)\b(?:[,.!]?\s*{_LET_ME})?",
    rf"\b{_LET_ME}",
    r"\bdouble[- ]check\b",
    r"\bon second thought\b",
    r"\bi (?:made|think i made) (?:a|an) (?:mistake|error)\b",
    r"\bthat(?:'s| is) (?:not right|wrong|incorrect)\b",
    r"\balternatively\b",
)


def reflection_regex(patterns: Sequence[str] = REFLECTION_PATTERNS) -> re.Pattern:
  """One case-insensitive regex matching any of `patterns`."""
  if not patterns:
    raise CotsafeError("reflection patterns: empty (expected at least one regex)")
  for i, p in enumerate(patterns):
    try:
      re.compile(p)
    except re.error as e:
      raise CotsafeError(f"reflection patterns[{i}] {p!r} is not a valid regex ({e})") from None
  return re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE)


def count_reflections(text: str, *, regex: re.Pattern | None = None) -> int:
  """Number of reflection phrases in `text` (non-overlapping matches)."""
  return sum(1 for _ in (regex or _DEFAULT_REGEX).finditer(text))


def is_correct(answer: str, reference: str, *, grader: str = "math") -> bool:
  """Whether a final answer matches the reference answer. math: its extracted answer (the last \\boxed{...},
  `#### x` or "the answer is x"), else the whole answer text, is equivalent to `reference` (our normaliser,
  then math-verify); choice: the letter it chooses ("Answer: B", \\boxed{B}) is the reference letter."""
  return verifiers.grade(answer, reference, grader=grader)


_DEFAULT_REGEX = reflection_regex()
