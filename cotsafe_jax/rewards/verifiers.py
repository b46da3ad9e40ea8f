"""Answer extraction and equivalence (the verifiable-reasoning reward and the evaluation's graders) and the
think-format check.

Math: numbers compare exactly as fractions (1e-9 relative tolerance for long decimals), other answers as
normalised LaTeX strings, and what those miss goes to `math-verify` (symbolic: sqrt forms, sets, reordered
sums), the verifier TRL, verl and open-r1 use. Multiple choice: the chosen letter against the reference's.
"""
from __future__ import annotations

import functools
import logging
import re
import threading
from fractions import Fraction

from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.rewards.base import THINK_CLOSE, THINK_OPEN

_BOXED = re.compile(r"\\(?:boxed|fbox)")
_HASHES = re.compile(r"####\s*([^\n]*)")
_ANSWER_IS = re.compile(r"(?:final\s+)?answer\s*(?:is|:|=)\s*:?\s*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?=\s|$)")
_REL_TOL = 1e-9


def _braced(text: str, start: int) -> tuple[str, int] | None:
  """The content of the brace group opening at text[start] == '{' (nested braces kept), and its end."""
  depth = 0
  for i in range(start, len(text)):
    if text[i] == "{" and text[i - 1:i] != "\\":
      depth += 1
    elif text[i] == "}" and text[i - 1:i] != "\\":
      depth -= 1
      if depth == 0:
        return text[start + 1:i], i + 1
  return None


def _last_boxed(text: str) -> str | None:
  for m in reversed(list(_BOXED.finditer(text))):
    i = m.end()
    while i < len(text) and text[i] == " ":
      i += 1
    if i < len(text) and text[i] == "{":
      got = _braced(text, i)
      if got is not None:
        return got[0]
    elif i > m.end():  # "\boxed 5": the argument runs to the next space or math delimiter
      arg = re.match(r"[^\s$]+", text[i:])
      if arg:
        return arg.group(0)
  return None


def extract_answer(text: str) -> str | None:
  """The final answer in `text`: the last \\boxed{...} (nested braces), else the last `#### x` line, else
  the last "the answer is x" up to the end of its sentence. None when there is none."""
  if not text:
    return None
  boxed = _last_boxed(text)
  if boxed is not None and boxed.strip():
    return boxed.strip()
  hashes = _HASHES.findall(text)
  if hashes and hashes[-1].strip():
    return hashes[-1].strip().rstrip(".").strip()
  matches = list(_ANSWER_IS.finditer(text))
  if matches:
    rest = text[matches[-1].end():].split("\n", 1)[0]
    end = _SENTENCE_END.search(rest)
    rest = (rest[:end.start()] if end else rest).strip().strip("*").strip()
    return rest or None
  return None


def _unwrap_text(s: str) -> str:
  """\\text{X} -> " X" (a unit after a number stays separated by a space)."""
  out = []
  i = 0
  while True:
    m = re.compile(r"\\(?:text|textbf|mbox|mathrm|textrm)\s*\{").search(s, i)
    if not m:
      out.append(s[i:])
      return "".join(out)
    got = _braced(s, m.end() - 1)
    if got is None:
      out.append(s[i:])
      return "".join(out)
    out.append(s[i:m.start()] + " " + got[0])
    i = got[1]


# characters models and datasets write for ASCII LaTeX: a unicode minus reads as a hyphen to no parser
_UNICODE = {"\u2212": "-", "\u2013": "-", "\u00d7": "\\times ", "\u22c5": "\\cdot ", "\u00b7": "\\cdot ",
            "\u00f7": "\\div ", "\u221e": "\\infty ", "\u03c0": "\\pi ", "\u2264": "\\le ", "\u2265": "\\ge ",
            "\u2260": "\\ne ", "\u00a0": " ", "\u2009": " ", "\u202f": " "}
_UNICODE_RE = re.compile("|".join(map(re.escape, _UNICODE)))


def _ascii_math(s: str) -> str:
  s = _UNICODE_RE.sub(lambda m: _UNICODE[m.group(0)], s)
  return re.sub(r"\u221a\s*(\d+|\w)", r"\\sqrt{\1}", s)  # a unicode root over a number or a letter


def _normalize(s: str) -> str:
  s = _ascii_math(s).strip()
  for left, right in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
    while len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
      s = s[len(left):len(s) - len(right)].strip()
  s = _unwrap_text(s)
  s = re.sub(r"\\[dt]frac", r"\\frac", s)
  s = re.sub(r"\\(?:left|right)\b", "", s)
  s = re.sub(r"\\[!,;: ]", " ", s).replace("~", " ")
  s = s.replace("\\%", "%").replace("\\$", "").replace("$", "")
  s = re.sub(r"\^\s*\{?\\circ\}?|°", "", s)
  s = re.sub(r"\\sqrt\s*(\w)", r"\\sqrt{\1}", s)
  s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s.strip())  # "x = 5" -> "5"
  s = s.strip().rstrip(".").strip()
  letter = re.fullmatch(r"\(?([A-Ea-e])\)", s) or re.fullmatch(r"\(([A-Ea-e])\)?", s)
  return letter.group(1).upper() if letter else s


_NUMBER = re.compile(
    r"(?P<sign>[-+]?)\s*(?:"
    r"\\frac\s*\{\s*(?P<fn>[-+]?\d+)\s*\}\s*\{\s*(?P<fd>[-+]?\d+)\s*\}"  # \frac{a}{b}
    r"|\\frac\s*(?P<sn>\d)(?P<sd>\d)"  # \frac12
    r"|(?P<num>\d+)\s*/\s*(?P<den>\d+)"  # a/b
    r"|(?P<thou>\d{1,3}(?:,\d{3})+(?:\.\d+)?)"  # 1,234,567.5
    r"|(?P<dec>\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)"  # 12, 12.5, .5, 1e3
    r")\s*(?P<pct>%?)(?P<unit>(?:\s+[a-zA-Z][a-zA-Z.]*)*)\s*")


def _to_number(s: str) -> tuple[Fraction, bool] | None:
  """(value, was_percent) when `s` is one number, optionally with a % sign or trailing unit words."""
  m = _NUMBER.fullmatch(s)
  if not m:
    return None
  g = m.groupdict()
  try:
    if g["fn"] is not None:
      value = Fraction(int(g["fn"]), int(g["fd"]))
    elif g["sn"] is not None:
      value = Fraction(int(g["sn"]), int(g["sd"]))
    elif g["num"] is not None:
      value = Fraction(int(g["num"]), int(g["den"]))
    elif g["thou"] is not None:
      value = Fraction(g["thou"].replace(",", ""))
    else:
      value = Fraction(g["dec"])
  except ZeroDivisionError:
    return None
  return (-value if g["sign"] == "-" else value), bool(g["pct"])


def _close(a: Fraction, b: Fraction) -> bool:
  return a == b or abs(a - b) <= _REL_TOL * max(1, abs(a), abs(b))


def _canonical(s: str) -> str:
  return re.sub(r"\s+", "", s).lower()


def _normaliser_equal(a: str, b: str) -> bool:
  x, y = _to_number(a), _to_number(b)
  if x is not None and y is not None:
    (xv, xp), (yv, yp) = x, y
    if _close(xv, yv):
      return True
    return (xp and _close(xv / 100, yv)) or (yp and _close(xv, yv / 100))
  return _canonical(a) == _canonical(b)


def _timeout() -> int | None:
  """math-verify's time limit per parse / comparison: 5 s in the main thread; None (no limit) elsewhere,
  because its limit is a SIGALRM, which Python delivers only to the main thread (signal.signal raises in any
  other: the demo evaluates in worker threads). Detected as threading.current_thread() is main_thread()."""
  return 5 if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=8192)
def _mv_parse(text: str, timeout: int | None):
  import math_verify  # sympy and the LaTeX grammar load on first use
  logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # it logs every string it cannot parse
  try:
    return tuple(math_verify.parse("$" + text + "$", parsing_timeout=timeout))
  except Exception:  # noqa: BLE001 - a parser failure (or its timeout) means "cannot tell", never a crash
    return ()


@functools.lru_cache(maxsize=65536)
def _math_verify_equal(pred: str, ref: str) -> bool:
  """math-verify's verdict with the reference as gold; False when either side does not parse."""
  timeout = _timeout()
  gold, target = _mv_parse(ref, timeout), _mv_parse(pred, timeout)
  if not gold or not target:
    return False
  import math_verify
  try:
    return bool(math_verify.verify(list(gold), list(target), timeout_seconds=timeout))
  except Exception:  # noqa: BLE001 - as above
    return False


def _strip_delimiters(s: str) -> str:
  s = _ascii_math(s).strip()
  for left, right in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
    while len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
      s = s[len(left):len(s) - len(right)].strip()
  return s


def is_equivalent(pred: str | None, ref: str | None) -> bool:
  """Whether a predicted final answer matches the reference answer (`ref` is the gold side).

  First our normaliser: as numbers (thousands separators, decimals, fractions, \\frac / \\dfrac, percentages:
  "50%" matches 50 and 0.5; currency and unit words ignored), else as normalised strings (math delimiters,
  \\text, \\left / \\right and spacing removed). What it does not match goes to math-verify, which compares
  symbolically (\\frac{\\sqrt2}{2} = \\sqrt2/2, 2\\sqrt3 = \\sqrt{12}, sets in any order, x^2+1 = 1+x^2,
  intervals). Unicode minus, times, pi, root signs are read as their LaTeX."""
  if pred is None or ref is None:
    return False
  a, b = _normalize(str(pred)), _normalize(str(ref))
  if not a or not b:
    return False
  if _normaliser_equal(a, b):
    return True
  return _math_verify_equal(_strip_delimiters(str(pred)), _strip_delimiters(str(ref)))


# ---- multiple choice ------------------------------------------------------------------------------------
# "Answer: B", "the answer is (C)", "**Answer:** D", "answer: $\\text{A}$"; the letter must be a capital
_CHOICE_ANSWER = re.compile(r"(?i:answer)\s*(?:is|:)?\s*:?\s*(?:\*\*)?\s*:?\s*\(?\s*\$?\s*(?:\\text\{\s*)?"
                            r"([A-J])(?![A-Za-z0-9'-])")
_LONE_LETTER = re.compile(r"\(?\s*([A-J])\s*\)?\.?")


def _letter(text: str, letters: str) -> str | None:
  m = _LONE_LETTER.fullmatch(_unwrap_text(text).strip().strip("*$").strip())
  return m.group(1) if m and m.group(1) in letters else None


def extract_choice(text: str, *, letters: str = "ABCD") -> str | None:
  """The option letter an answer chooses: the last \\boxed{X}, else the last "Answer: X" / "the answer is
  (X)" (the format GPQA prompts ask for), else the answer when it is a lone letter. None when there is none."""
  if not text:
    return None
  boxed = _last_boxed(text)
  if boxed is not None and _letter(boxed, letters):
    return _letter(boxed, letters)
  for m in reversed(list(_CHOICE_ANSWER.finditer(text))):
    if m.group(1) in letters:
      return m.group(1)
  return _letter(text, letters)


def predicted_answer(answer: str, *, grader: str = "math") -> str | None:
  """The final answer a response's answer part gives, as `grade` reads it (None when it gives none)."""
  if grader == "choice":
    return extract_choice(answer, letters="ABCDEFGHIJ")
  if grader != "math":
    raise CotsafeError(f"grader={grader!r}, expected math or choice")
  pred = extract_answer(answer)
  if pred is None:
    pred = answer.strip() or None
  return pred


def grade(answer: str, reference: str, *, grader: str = "math") -> bool:
  """Whether a response's answer part is correct: math (the extracted final answer, else the whole answer,
  equivalent to `reference`) or choice (the chosen letter equals the reference letter)."""
  pred = predicted_answer(answer, grader=grader)
  if grader == "choice":
    return pred is not None and pred == str(reference).strip().upper()
  return is_equivalent(pred, reference)


def same_answer(a: str | None, b: str | None, *, grader: str = "math") -> bool:
  """Whether two predicted answers agree (majority voting): letters equal, or math equivalence."""
  if a is None or b is None:
    return False
  return a == b if grader == "choice" else (a == b or is_equivalent(a, b))


def check_think_format(text: str, *, open_tag: str = THINK_OPEN, close_tag: str = THINK_CLOSE,
                       require_open_tag: bool = True) -> bool:
  """One `<think>...</think>` block at the start (the open tag may live in the prompt when
  require_open_tag=False) followed by a non-empty answer."""
  n_open, n_close = text.count(open_tag), text.count(close_tag)
  if n_close != 1 or n_open > 1 or (require_open_tag and n_open != 1):
    return False
  close = text.find(close_tag)
  if n_open == 1:
    start = text.find(open_tag)
    if start > close or text[:start].strip():
      return False
  return bool(text[close + len(close_tag):].strip())
