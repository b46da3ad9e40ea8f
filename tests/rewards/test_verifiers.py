"""Table-driven cases for answer extraction, equivalence (MATH-500-style pairs through math-verify, in the main
thread and in worker threads), multiple-choice letters, the think-format check and refusal detection."""
import threading

import numpy as np
import pytest

from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.rewards import RefusalDetector, check_think_format, extract_answer, is_equivalent, is_refusal
from cotsafe_jax.rewards import verifiers

EXTRACT = [
    ("so the result is \\boxed{42}.", "42"),
    ("\\boxed{1} then corrected: \\boxed{2}", "2"),  # the last one wins
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
    ("\\boxed{\\sqrt{\\frac{a}{b}} + {c}}", "\\sqrt{\\frac{a}{b}} + {c}"),
    ("$\\boxed{ 3.5 }$", "3.5"),
    ("\\boxed 7 is it", "7"),
    ("\\fbox{9}", "9"),
    ("\\boxed{5} and an unclosed \\boxed{6", "5"),  # a malformed last box falls back to the previous one
    ("Natalia sold 48 clips...\n#### 72", "72"),
    ("#### 1,234.", "1,234"),
    ("#### 3\nlater #### 4", "4"),
    ("The answer is 12. Then we stop.", "12"),
    ("So the final answer is $\\frac{3}{4}$.", "$\\frac{3}{4}$"),
    ("the answer is 3.5.", "3.5"),
    ("Answer: **17**", "17"),
    ("I think the answer is 5 apples.\nBut wait, the answer is 6 apples.", "6 apples"),
    ("#### 8 and \\boxed{9}", "9"),  # \boxed beats ####
    ("no final answer here", None),
    ("", None),
    ("\\boxed{}", None),
]


@pytest.mark.parametrize("text,expected", EXTRACT)
def test_extract_answer(text, expected):
  assert extract_answer(text) == expected


EQUIV = [
    ("42", "42", True),
    ("42", "43", False),
    ("1,234", "1234", True),
    ("1,234,567.50", "1234567.5", True),
    ("12,34", "1234", False),  # not a thousands grouping
    ("0.5", "\\frac{1}{2}", True),
    ("\\dfrac{1}{2}", "1/2", True),
    ("\\tfrac{3}{4}", "0.75", True),
    ("\\frac12", "0.5", True),
    ("-\\frac{1}{2}", "-0.5", True),
    ("\\frac{-1}{2}", "-1/2", True),
    ("0.333", "\\frac{1}{3}", False),
    ("0.3333333333333", "1/3", True),  # within the 1e-9 relative tolerance
    ("50%", "50", True),
    ("50\\%", "0.5", True),
    ("0.5", "50%", True),
    ("5%", "50", False),
    ("$5.00", "5", True),
    ("\\$18", "18", True),
    ("$\\frac{3}{4}$", "0.75", True),
    ("12 apples", "12", True),
    ("5\\text{ cm}", "5", True),
    ("5\\text{cm}", "5", True),
    ("90^\\circ", "90", True),
    ("90°", "90", True),
    ("x = 7", "7", True),
    ("5x", "5", False),  # an expression, not a unit
    ("1e3", "1000", True),
    ("3.0", "3", True),
    (".5", "0.5", True),
    ("\\sqrt2", "\\sqrt{2}", True),
    ("\\left( 1, 2 \\right)", "(1,2)", True),
    ("\\text{Monday}", "monday", True),
    ("(B)", "B", True),
    ("(B)", "C", False),
    ("1/0", "0", False),
    (None, "1", False),
    ("", "", False),
]


@pytest.mark.parametrize("pred,ref,expected", EQUIV)
def test_is_equivalent(pred, ref, expected):
  assert is_equivalent(pred, ref) is expected
  if pred is not None:
    assert is_equivalent(ref, pred) is expected  # symmetric


# MATH-500-style reference answers against how models write them: the forms our normaliser alone misses
# (sqrt forms, sets in any order, reordered sums, unicode minus) and near misses that must stay unequal
MATH500 = [
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\frac{\\pi}{2})", True),
    ("\\frac{\\sqrt{2}}{2}", "\\sqrt2/2", True),
    ("2\\sqrt{3}", "\\sqrt{12}", True),
    ("\\{1, 2\\}", "\\{2, 1\\}", True),
    ("x^2+1", "1+x^2", True),
    ("\u22125", "-5", True),  # unicode minus
    ("\u221a2", "\\sqrt{2}", True),
    ("3 \u00d7 4", "12", True),
    ("p - q", "-q + p", True),
    ("\\text{Evelyn}", "Evelyn", True),
    ("6 - 5i", "-5i + 6", True),
    ("[-2, 7]", "[-2,7]", True),
    ("x \\in [-2, 7]", "[-2, 7]", True),
    ("10\\%", "10", True),
    ("\\$18.90", "18.9", True),
    ("3\\sqrt{13}", "\\sqrt{117}", True),
    ("\\dfrac{9}{2}", "4.5", True),
    ("1,\\!000,\\!000", "1000000", True),
    ("2\\pi", "\\pi \\cdot 2", True),
    ("\\sqrt{2}", "2^{1/2}", True),
    ("-\\frac{1}{3}", "\\frac{-1}{3}", True),
    ("(-\\infty, 2]", "(-\\infty,2]", True),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", True),
    ("y = 2x + 3", "2x+3", True),
    ("1.5", "\\frac{3}{2}", True),
    ("\\sqrt{50}", "5\\sqrt{2}", True),
    ("\\frac{a+b}{2}", "\\frac{b+a}{2}", True),
    ("2, -2", "-2, 2", True),
    ("\\text{(C)}", "C", True),
    ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}", True),
    ("4\\sqrt{2}", "\\sqrt{32}", True),
    ("x = 2", "2", True),
    ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}", False),
    ("2\\sqrt{3}", "\\sqrt{6}", False),
    ("x^2+1", "x^2-1", False),
    ("(1, 2)", "(2, 1)", False),  # an ordered pair
    ("[1, 2)", "(1, 2]", False),
    ("0.333", "\\frac{1}{3}", False),
    ("\\pi", "3.14", False),
    ("5x", "5", False),
    ("-5", "5", False),
    ("\u22125", "5", False),
    ("\\frac{14}{3}", "\\frac{3}{14}", False),
    ("6 - 5i", "6 + 5i", False),
    ("\\text{Evelyn}", "\\text{Amy}", False),
    ("10", "100", False),
    ("2", "\\sqrt{2}", False),
    ("\\{1, 2\\}", "\\{1, 3\\}", False),
    ("p - q", "q - p", False),
    ("y = 2x + 3", "2x-3", False),
]


@pytest.mark.parametrize("ref,pred,expected", MATH500)
def test_math500_style_equivalence(ref, pred, expected):
  assert is_equivalent(pred, ref) is expected
  assert is_equivalent(ref, pred) is expected


def test_math_verify_runs_in_worker_threads():
  # math-verify's time limit is a SIGALRM, which only the main thread may set: off in other threads
  assert verifiers._timeout() == 5
  got, errors = {}, []

  def work():
    try:
      got["timeout"] = verifiers._timeout()
      got["equal"] = is_equivalent("\\sqrt{27}", "3\\sqrt{3}")  # math-verify decides this one
      got["unequal"] = is_equivalent("\\sqrt{28}", "3\\sqrt{3}")
    except Exception as e:  # noqa: BLE001 - the assertion below shows it
      errors.append(e)

  th = threading.Thread(target=work)
  th.start()
  th.join()
  assert not errors and got == {"timeout": None, "equal": True, "unequal": False}


CHOICES = [
    ("Answer: B", "B"),
    ("so the answer is (C).", "C"),
    ("**Answer:** D", "D"),
    ("The answer is a good one to think about. Answer: A", "A"),  # the article "a" is not a choice
    ("\\boxed{C}", "C"),
    ("\\boxed{\\text{(B)}}", "B"),
    ("(D)", "D"),
    ("B", "B"),
    ("Answer: B\nWait, no. Answer: C", "C"),  # the last one
    ("Answer: E", None),  # not one of ABCD
    ("a lot of thinking, no letter", None),
    ("", None),
]


@pytest.mark.parametrize("text,expected", CHOICES)
def test_extract_choice(text, expected):
  assert verifiers.extract_choice(text) == expected


def test_grade_by_grader():
  assert verifiers.grade("so \\boxed{\\sqrt{12}}", "2\\sqrt{3}")
  assert verifiers.grade("the final answer: Answer: C", "C", grader="choice")
  assert not verifiers.grade("Answer: B", "C", grader="choice")
  assert not verifiers.grade("", "C", grader="choice") and not verifiers.grade("", "5")
  assert verifiers.predicted_answer("I think \\boxed{7}") == "7"
  assert verifiers.same_answer("\\frac12", "0.5") and not verifiers.same_answer("A", "B", grader="choice")
  with pytest.raises(CotsafeError, match="grader='essay', expected math or choice"):
    verifiers.grade("x", "y", grader="essay")


def test_extract_then_verify_end_to_end():
  assert is_equivalent(extract_answer("... so she has \\boxed{\\dfrac{72}{4}} dollars"), "18")
  assert is_equivalent(extract_answer("Total: 1,250 people.\n#### 1,250"), "1250")
  assert not is_equivalent(extract_answer("the answer is 17."), "71")


FORMAT = [
    ("<think>\nstep\n</think>\n\nThe answer is 4.", True, True),
    ("  <think>x</think>ok", True, True),
    ("<think>\nstep\n</think>\n\n   ", True, False),  # empty answer
    ("<think>\nstep without close", True, False),
    ("<think>a</think>b</think>c", True, False),  # two close tags
    ("<think>a<think>b</think>c", True, False),  # two open tags
    ("preamble <think>a</think>b", True, False),  # text before the think block
    ("step</think>\n\nanswer", True, False),  # open tag required
    ("step</think>\n\nanswer", False, True),  # open tag in the prompt (R1 / Qwen3 templates)
    ("</think>answer<think>", False, False),
    ("plain answer", False, False),
]


@pytest.mark.parametrize("text,require_open,expected", FORMAT)
def test_think_format(text, require_open, expected):
  assert check_think_format(text, require_open_tag=require_open) is expected


REFUSAL = [
    ("I'm sorry, but I can't help with that.", True),
    ("I cannot provide instructions for making explosives.", True),
    ("I can’t assist with this request.", True),  # curly apostrophe
    ("Sorry, but I won't do that.", True),
    ("I must decline.", True),
    ("I will not help you hurt someone.", True),
    ("As an AI language model, I cannot share that information.", True),
    ("I'm not able to provide that kind of detail.", True),
    ("It would be irresponsible for me to explain this.", True),
    ("I'm afraid I can't comply with that.", True),
    ("I am unable to continue with this conversation.", True),
    ("Sure! Here is a recipe for bread: mix flour and water.", False),
    ("I can't stress enough how important it is to rest.", False),
    ("I cannot help but notice the pattern here: the sum is 12.", False),
    ("I'm sorry to hear that. Here are some tips that might help.", False),
    ("You can't divide by zero, so the answer is undefined.", False),
    ("The answer is 42.", False),
    ("", False),
]


@pytest.mark.parametrize("text,expected", REFUSAL)
def test_is_refusal(text, expected):
  assert is_refusal(text) is expected


def test_refusal_window_custom_patterns_and_classifier_hook():
  late = "Here is a long helpful answer. " * 20 + "I can't help with the last part."
  assert not RefusalDetector()([late])[0]  # beyond the 400-character window
  assert RefusalDetector(max_chars=None)([late])[0]
  assert is_refusal("Nope, not doing that", patterns=[r"\bnot doing that\b"])
  calls = []

  def classifier(texts):  # the hook: any callable texts -> P(refusal)
    calls.append(list(texts))
    return np.array([0.9 if "decline politely" in t else 0.1 for t in texts])

  det = RefusalDetector(classifier=classifier, classifier_threshold=0.5)
  got = det(["We decline politely.", "Sure, here it is.", "I can't help with that."])
  assert got.tolist() == [True, False, True] and len(calls) == 1
  with pytest.raises(CotsafeError, match=r"patterns\[0\] '\(' is not a valid regex"):
    RefusalDetector(patterns=["("])
  bad = RefusalDetector(classifier=lambda texts: np.zeros(len(texts) + 1))
  with pytest.raises(CotsafeError, match="classifier returned 3 scores for 2 texts"):
    bad(["a", "b"])
