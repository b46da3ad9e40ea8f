"""write_report: summary.json as given, report.md's table parses back to the same numbers, PNG plots written."""
import json
import os

import numpy as np
import pytest

from cotsafe_jax import CotsafeError
from cotsafe_jax import eval as ev

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _summaries():
  rng = np.random.default_rng(0)
  out = {}
  for name in ("base", "sft", "ppo"):
    s = {k: float(rng.uniform()) for k in ("safety_rate_cot", "safety_rate_answer", "accuracy", "over_refusal",
                                           "reflection_rate")}
    s.update(entropy_cot=float(rng.uniform(0, 4)), n=40, n_harmful=16, n_benign=8, n_reasoning=16)
    out[name] = s
  out["sft"]["accuracy"] = None  # e.g. no reasoning prompt with a reference answer
  out["ppo"]["safety_rate_cot"] = 0.0005  # rounds half-way: the table must still agree with the json
  return out


def _curves():
  return {"ppo": [{"step": s, "eval/safety_rate_cot": 0.2 + 0.1 * s, "eval/safety_rate_answer": 0.6 + 0.05 * s,
                   "eval/accuracy": 0.5, "reward/mean": 1.0} for s in range(1, 6)]}


def _parse_table(md):
  """The markdown table after the title, as {policy: {column: cell text}}."""
  lines = [ln for ln in md.splitlines() if ln.startswith("|")]
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  assert header[0] == "policy" and set(lines[1].replace("|", "").split()) <= {"---", "---:"}
  return {cells[0]: dict(zip(header[1:], cells[1:])) for cells in
          ([c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:])}


def assert_cells_match(name, cells, summary):
  """Each summary value printed as the report prints it: n/a for None, ints whole, floats to 3 decimals."""
  for key, value in summary.items():
    cell = cells[key]
    if value is None:
      assert cell == "n/a", (name, key, cell)
    elif isinstance(value, int):
      assert int(cell) == value, (name, key, cell, value)
    else:
      assert cell == f"{value:.3f}" and abs(float(cell) - value) <= 5e-4 + 1e-12, (name, key, cell, value)


def test_report_files_and_table_match_summary_json(tmp_path):
  summaries = _summaries()
  rng = np.random.default_rng(1)
  entropies = {"base": rng.gamma(2.0, 1.0, 500), "sft": rng.gamma(1.0, 1.0, 300), "ppo": np.zeros(0)}
  table = ev.write_report(str(tmp_path), summaries, curves=_curves(), entropies=entropies, title="Demo")
  with open(tmp_path / "summary.json") as f:
    saved = json.load(f)
  assert list(saved) == ["base", "sft", "ppo"] and saved == summaries
  md = (tmp_path / "report.md").read_text()
  assert md.startswith("# Demo\n") and table in md
  parsed = _parse_table(md)
  assert list(parsed) == list(saved)
  for name, summary in saved.items():
    assert list(parsed[name]) == list(ev.SUMMARY_KEYS)
    assert_cells_match(name, parsed[name], summary)
  for png in ("curves.png", "entropy.png", "rates.png", "reflection.png"):
    path = tmp_path / png
    assert path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC
    assert f"]({png})" in md


def test_report_without_curves_or_entropies(tmp_path):
  table = ev.write_report(str(tmp_path), {"base": {"n": 3, "accuracy": 1 / 3}})
  assert sorted(os.listdir(tmp_path)) == ["rates.png", "reflection.png", "report.md", "summary.json"]
  assert _parse_table(table) == {"base": {"accuracy": "0.333", "n": "3"}}


def test_report_errors(tmp_path):
  with pytest.raises(CotsafeError, match="summaries is empty"):
    ev.write_report(str(tmp_path), {})
  with pytest.raises(CotsafeError, match=r"summaries\['ppo'\]\['entropy_cot'\] = nan, expected a finite number"):
    ev.write_report(str(tmp_path), {"ppo": {"entropy_cot": float("nan")}})
  with pytest.raises(CotsafeError, match="no curve row has any of safety_rate_cot, safety_rate_answer, accuracy"):
    ev.write_report(str(tmp_path), _summaries(), curves={"ppo": [{"step": 1, "reward/mean": 0.3}]})
  with pytest.raises(CotsafeError, match=r"curves\['ppo'\] has a row without 'step'"):
    ev.write_report(str(tmp_path), _summaries(), curves={"ppo": [{"eval/accuracy": 0.3}]})
