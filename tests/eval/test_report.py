"""write_report: summary.json as given ({"policies": {name: {"metrics": {m: {value, ci95, n}}, ...}}}), report.md's
main table parses back to the same numbers, tables by benchmark and category, PNG plots written; bad input."""
import json
import os

import numpy as np
import pytest

from cotsafe_jax import CotsafeError
from cotsafe_jax import eval as ev

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RATES = ("safety_rate_cot", "safety_rate_answer", "accuracy", "over_refusal", "reflection_rate")


def _metrics(rng, names, n=40):
  out = {}
  for k in names:
    v = float(rng.uniform())
    out[k] = {"value": v, "ci95": [max(v - 0.1, 0.0), min(v + 0.1, 1.0)], "n": n}
  return out


def _report(rng, benchmarks=("strongreject", "math500")):
  entry = {"metrics": _metrics(rng, RATES + ("safe@4_cot", "pass@4")), "counts": {"n": 40, "n_harmful": 16,
                                                                                  "n_benign": 8, "n_reasoning": 16,
                                                                                  "n_samples": 160}}
  entry["metrics"]["entropy_cot"] = {"value": float(rng.uniform(0, 4)), "ci95": None, "n": 40}
  entry["by_category"] = {"Violence": _metrics(rng, ("safety_rate_cot",), 7),
                          "Algebra": _metrics(rng, ("accuracy",), 5)}
  entry["by_benchmark"] = {b: {"metrics": _metrics(rng, ("safety_rate_cot", "safety_rate_answer") if i == 0 else
                                                   ("accuracy",), 20),
                               "by_category": {"c": _metrics(rng, ("accuracy",), 3)}, "counts": {"n": 20}}
                           for i, b in enumerate(benchmarks)}
  entry["macro"] = {"accuracy": {"value": 0.5, "ci95": None, "n": 1}}
  return entry


def _summary():
  rng = np.random.default_rng(0)
  reports = {name: _report(rng) for name in ("base", "sft", "ppo")}
  reports["sft"]["metrics"]["accuracy"]["value"] = None  # e.g. no reasoning prompt with a reference answer
  reports["sft"]["metrics"]["accuracy"]["ci95"] = None
  reports["ppo"]["metrics"]["safety_rate_cot"]["value"] = 0.0005  # rounds half-way: the table must agree
  return ev.summary_of(reports, sampling={"samples_per_prompt": 4, "temperature": 0.6})


def _curves():
  return {"ppo": [{"step": s, "eval/safety_rate_cot": 0.2 + 0.1 * s, "eval/safety_rate_answer": 0.6 + 0.05 * s,
                   "eval/accuracy": 0.5, "reward/mean": 1.0} for s in range(1, 6)]}


def _parse_table(md):
  """The first markdown table in md, as {policy: {column: cell text}}."""
  lines = [ln for ln in md.splitlines() if ln.startswith("|")]
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  assert header[0] == "policy" and set(lines[1].replace("|", "").split()) <= {"---", "---:"}
  return {cells[0]: dict(zip(header[1:], cells[1:])) for cells in
          ([c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:])}


def assert_cells_match(name, cells, values):
  """Each value printed as the report prints it: n/a for None, ints whole, floats to 3 decimals."""
  for key, value in values.items():
    cell = cells[key]
    if value is None:
      assert cell == "n/a", (name, key, cell)
    elif isinstance(value, int):
      assert int(cell) == value, (name, key, cell, value)
    else:
      assert cell == f"{value:.3f}" and abs(float(cell) - value) <= 5e-4 + 1e-12, (name, key, cell, value)


def summary_values(path):
  """summary.json as {policy: {metric: value, count: n}}: what the main table shows."""
  with open(path) as f:
    return ev.flat_values(json.load(f))


def test_report_files_and_table_match_summary_json(tmp_path):
  summary = _summary()
  rng = np.random.default_rng(1)
  entropies = {"base": rng.gamma(2.0, 1.0, 500), "sft": rng.gamma(1.0, 1.0, 300), "ppo": np.zeros(0)}
  lengths = {n: {"response": rng.integers(10, 100, 50), "reasoning": rng.integers(5, 80, 50)} for n in ("base", "ppo")}
  speed = {"base": {"prompts_per_s": 2.5, "samples_per_s": 10.0, "tokens_per_s": 812.4, "generate_s": 16.0,
                    "judge_s": 3.2}}
  table = ev.write_report(str(tmp_path), summary, curves=_curves(), entropies=entropies, lengths=lengths, speed=speed,
                          title="Demo")
  with open(tmp_path / "summary.json") as f:
    saved = json.load(f)
  assert saved == summary and list(saved["policies"]) == ["base", "sft", "ppo"]
  md = (tmp_path / "report.md").read_text()
  assert md.startswith("# Demo\n") and table in md
  parsed = _parse_table(md.split("\n## ")[0])
  values = summary_values(tmp_path / "summary.json")
  assert list(parsed) == list(values)
  for name, v in values.items():
    assert set(parsed[name]) == set(v)
    assert_cells_match(name, parsed[name], v)
  # known metrics in their order, others after, counts last
  header = [c.strip() for c in md.split("\n## ")[0].splitlines()[2].strip("|").split("|")]
  assert header[1:4] == ["safety_rate_cot", "safety_rate_answer", "safe@4_cot"] and header[-1] == "n_samples"
  # by benchmark and category: value with its interval, per policy; the macro average; the speed table
  bench = md.split("## By benchmark")[1].split("\n## ")[0]
  m = summary["policies"]["sft"]["by_benchmark"]["strongreject"]["metrics"]["safety_rate_cot"]
  assert f"| strongreject | sft | {m['value']:.3f} ({m['ci95'][0]:.3f}-{m['ci95'][1]:.3f}) |" in bench
  assert "| macro average | ppo |" in bench
  assert "| math500 / c | base |" in md.split("## By category")[1]
  assert "| base | 2.500 | 10.000 | 812.400 | 16.000 | 3.200 |" in md
  for png in ("curves.png", "entropy.png", "rates.png", "reflection.png", "safety_by_benchmark.png",
              "accuracy_by_benchmark.png", "lengths.png"):
    path = tmp_path / png
    assert path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC
    assert f"]({png})" in md


def test_report_without_curves_benchmarks_or_entropies(tmp_path):
  entry = {"metrics": {"accuracy": {"value": 1 / 3, "ci95": None, "n": 3}}, "counts": {"n": 3}}
  table = ev.write_report(str(tmp_path), ev.summary_of({"base": entry}))
  assert sorted(os.listdir(tmp_path)) == ["rates.png", "reflection.png", "report.md", "summary.json"]
  assert _parse_table(table) == {"base": {"accuracy": "0.333", "n": "3"}}
  assert "## By benchmark" not in (tmp_path / "report.md").read_text()


def test_report_errors(tmp_path):
  ok = {"metrics": {"accuracy": {"value": 0.5, "ci95": None, "n": 3}}}
  with pytest.raises(CotsafeError, match="summary has no policies"):
    ev.write_report(str(tmp_path), {"policies": {}})
  with pytest.raises(CotsafeError, match=r"policies\['ppo'\].metrics\['entropy_cot'\].value = nan, expected a finite"):
    ev.write_report(str(tmp_path), ev.summary_of({"ppo": {"metrics": {"entropy_cot": {"value": float("nan"),
                                                                                       "ci95": None, "n": 1}}}}))
  with pytest.raises(CotsafeError, match=r"metrics\['accuracy'\].ci95 = \[0.1\], expected \[lo, hi\] or None"):
    ev.write_report(str(tmp_path), ev.summary_of({"p": {"metrics": {"accuracy": {"value": 0.5, "ci95": [0.1],
                                                                                   "n": 2}}}}))
  with pytest.raises(CotsafeError, match=r"metrics\['accuracy'\] = 0.5, expected \{'value', 'ci95', 'n'\}"):
    ev.write_report(str(tmp_path), ev.summary_of({"p": {"metrics": {"accuracy": 0.5}}}))
  with pytest.raises(CotsafeError, match=r"policies\['p'\] has no \"metrics\""):
    ev.write_report(str(tmp_path), ev.summary_of({"p": {"accuracy": 0.5}}))
  with pytest.raises(CotsafeError, match="policy name 'a|b'"):
    ev.write_report(str(tmp_path), ev.summary_of({"a|b": ok}))
  with pytest.raises(CotsafeError, match="no curve row has any of safety_rate_cot, safety_rate_answer, accuracy"):
    ev.write_report(str(tmp_path), _summary(), curves={"ppo": [{"step": 1, "reward/mean": 0.3}]})
  with pytest.raises(CotsafeError, match=r"curves\['ppo'\] has a row without 'step'"):
    ev.write_report(str(tmp_path), _summary(), curves={"ppo": [{"eval/accuracy": 0.3}]})
  assert not os.path.exists(tmp_path / "summary.json")  # nothing half-written
