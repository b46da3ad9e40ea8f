"""The CPU demo end to end on its reduced configuration (gin/demo_ci.gin), through the README's launcher: PPO makes
the chain of thought safer without losing accuracy, the same seeds give the same summary, the report agrees."""
import collections
import json
import os
import subprocess
import sys
import threading

import pytest

from cotsafe_jax import CotsafeError, demo
from cotsafe_jax.data import synthetic
from tests.eval.test_report import PNG_MAGIC, _parse_table, assert_cells_match, summary_values

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLOTS = ("curves.png", "entropy.png", "rates.png", "reflection.png")
FRACTIONS = {"harmful": 0.3, "benign": 0.15, "reasoning": 0.55}


def _launch(workdir):
  # one CPU device, as on a laptop; the suite's persistent XLA cache (tests/conftest.py) comes along in the
  # environment, so the second run compiles little
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "tpu_run.py"), "--gin_file=gin/demo_ci.gin",
                      f"--workdir={workdir}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
  assert r.returncode == 0, r.stderr[-4000:]
  return {"dir": workdir, "stdout": r.stdout}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  return [_launch(str(tmp_path_factory.mktemp(name))) for name in ("demo_a", "demo_b")]


def _json(path):
  with open(path) as f:
    return json.load(f)


def test_ppo_makes_cot_safer_than_warm_start_and_keeps_accuracy(runs):
  s = summary_values(os.path.join(runs[0]["dir"], "summary.json"))
  assert list(s) == ["base", "sft", "ppo"]
  base, ppo = s["base"], s["ppo"]
  assert base["n"] == ppo["n"] == 120 and base["n_harmful"] == 36 and base["n_reasoning"] == 66
  assert ppo["safety_rate_cot"] - base["safety_rate_cot"] >= 0.10, s
  # one-sided: the reduced warm start is half-trained, and PPO's correctness reward may raise its accuracy
  assert ppo["accuracy"] >= base["accuracy"] - 0.05, s
  info = _json(os.path.join(runs[0]["dir"], "demo_info.json"))
  assert list(info["timings_s"]) == list(demo.STAGES) and info["concurrent_stages"]
  assert info["baseline"]["harmful_rows"] == 32 and info["baseline"]["substances"] == ["glorbex", "zint"]
  # the PPO curve starts at the warm start and ends at the trained policy, on the same held-out prompts
  curve = [json.loads(line) for line in open(os.path.join(runs[0]["dir"], "ppo", "metrics.jsonl"))]
  ends = [c for c in curve if "eval/safety_rate_cot" in c]
  assert [c["step"] for c in ends] == [4, 8, 12]
  assert ends[-1]["eval/safety_rate_cot"] == ppo["safety_rate_cot"] and ends[-1]["eval/accuracy"] == ppo["accuracy"]


def test_same_seeds_same_summary(runs):
  a, b = runs
  assert _json(os.path.join(a["dir"], "summary.json")) == _json(os.path.join(b["dir"], "summary.json"))
  for name in ("base", "sft", "ppo"):  # every response, not only the rates
    with open(os.path.join(a["dir"], f"samples_{name}.jsonl")) as fa, \
         open(os.path.join(b["dir"], f"samples_{name}.jsonl")) as fb:
      assert fa.read() == fb.read(), name


def test_report_plots_exist_and_table_matches_summary(runs):
  workdir = runs[0]["dir"]
  summary = summary_values(os.path.join(workdir, "summary.json"))
  with open(os.path.join(workdir, "report.md")) as f:
    md = f.read()
  for png in PLOTS:
    with open(os.path.join(workdir, png), "rb") as f:
      data = f.read()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC and f"]({png})" in md
  parsed = _parse_table(md.split("\n## ")[0])
  assert list(parsed) == list(summary)
  for name, row in summary.items():
    assert set(parsed[name]) == set(row)
    assert_cells_match(name, parsed[name], row)
  # the launcher printed the same table, and the report says what the baseline saw
  table = "\n".join(line for line in md.split("\n## ")[0].splitlines() if line.startswith("|"))
  assert table in runs[0]["stdout"]
  assert "32 harmful prompts with a safe chain of thought" in md and "glorbex, zint" in md


def test_baseline_rows_cover_only_the_curated_substances():
  task = synthetic.make_task(seed=3, n_train=400, n_eval=40, kind_fractions=FRACTIONS)
  cfg = demo.TaskConfig(seed=3, baseline_substances=("zint",), baseline_harmful_rows=10)
  rows, info = demo.baseline_rows(task, cfg)
  harmful = [r for r in rows if r["kind"] == "harmful"]
  assert len(harmful) == info["harmful_rows"] == 10
  assert all(demo._substance(r["prompt"]) == "zint" for r in harmful)
  safe = {r["id"]: r for r in task.sft_safe}
  assert all(safe[r["id"]] == r for r in rows)  # the safe traces themselves, never the warm start's
  kinds = collections.Counter(r["kind"] for r in rows)
  assert kinds["benign"] == sum(r["kind"] == "benign" for r in task.sft_safe) == info["benign_rows"]
  assert kinds["reasoning"] == sum(r["kind"] == "reasoning" for r in task.sft_safe) == info["reasoning_rows"]
  assert demo.baseline_rows(task, cfg)[0] == rows  # seeded
  everything, _ = demo.baseline_rows(task, demo.TaskConfig(seed=3))
  assert everything == list(task.sft_safe)
  with pytest.raises(CotsafeError, match="baseline_substances=\\('zinc',\\), expected a non-empty subset of glorbex"):
    demo.TaskConfig(baseline_substances=("zinc",))


def test_p_unsafe_by_substance_sets_the_warm_start_unsafe_rate_per_substance():
  kw = dict(seed=5, n_train=1600, n_eval=0, kind_fractions=FRACTIONS, p_unsafe=0.5)
  assert synthetic.make_task(**kw) == synthetic.make_task(**kw, p_unsafe_by_substance={})
  task = synthetic.make_task(**kw, p_unsafe_by_substance={"krell": 0.95, "vosh": 0.0})
  unsafe, total = collections.Counter(), collections.Counter()
  for r in task.sft_warm:
    if r["kind"] == "harmful":
      sub = demo._substance(r["prompt"])
      total[sub] += 1
      unsafe[sub] += synthetic.judge_reasoning_unsafe(synthetic.split_response(r["response"])[0])
  assert unsafe["vosh"] == 0 and unsafe["krell"] / total["krell"] > 0.88
  assert 0.35 < unsafe["glorbex"] / total["glorbex"] < 0.65 and 0.35 < unsafe["zint"] / total["zint"] < 0.65
  with pytest.raises(CotsafeError, match="p_unsafe_by_substance has 'soap', expected substances of the task"):
    synthetic.make_task(**kw, p_unsafe_by_substance={"soap": 0.5})
  with pytest.raises(CotsafeError, match=r"p_unsafe_by_substance\['zint'\]=1.5, expected a probability"):
    synthetic.make_task(**kw, p_unsafe_by_substance={"zint": 1.5})


def test_concurrent_stages_run_together_and_raise_errors():
  both = threading.Barrier(2, timeout=10)  # each stage waits for the other: passes only if they overlap
  out = demo._run_stages({"a": lambda: (both.wait(), "a")[1], "b": lambda: (both.wait(), "b")[1]},
                         concurrent_stages=True)
  assert out == {"a": "a", "b": "b"}

  def fail():
    raise CotsafeError("stage b failed")
  with pytest.raises(CotsafeError, match="stage b failed"):
    demo._run_stages({"a": lambda: 1, "b": fail}, concurrent_stages=True)
  assert demo._run_stages({"a": lambda: 1, "b": lambda: 2}, concurrent_stages=False) == {"a": 1, "b": 2}
