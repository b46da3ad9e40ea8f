"""The CPU demo end to end on its reduced configuration (gin/demo_ci.gin), through the README's launcher: the study's
design for one seed (every arm, every test split), its summary.json and report, resuming, and a changed
configuration refused in the same workdir. The demo and the study share one design (gin/study_base.gin)."""
import json
import os
import re
import subprocess
import sys

import pytest

from cotsafe_jax.study import summary as summary_lib
from tests.eval.test_report import PNG_MAGIC

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POLICIES = ["base", "sft", "rft", "ppo", "ppo_seq"]


def _launch(workdir, *params, check=True):
  # one CPU device, as on a laptop; the suite's persistent XLA cache (tests/conftest.py) comes along in the
  # environment, so a second run compiles little
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "tpu_run.py"), "--gin_file=gin/demo_ci.gin",
                      f"--workdir={workdir}", *[f"--gin_param={p}" for p in params]], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=600)
  if check:
    assert r.returncode == 0, r.stderr[-4000:]
  return r


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("demo"))
  r = _launch(workdir)
  with open(os.path.join(workdir, "summary.json")) as f:
    return {"dir": workdir, "stdout": r.stdout, "summary": json.load(f)}


def test_demo_runs_every_arm_on_every_split(run):
  s = run["summary"]
  assert list(s["policies"]) == POLICIES and s["seeds"] == [0] and s["heldout_categories"] == ["vosh"]
  assert s["hyperparameters"]["fixed"] and s["hyperparameters"]["chosen"]["ppo"] == {"learning_rate": 1e-4, "steps": 2}
  for name, e in s["policies"].items():
    ms = e["metrics"]
    for key in ("safety_rate_cot", "safety_rate_answer", "accuracy", "over_refusal", "reflection_rate", "entropy_cot",
                "safety_rate_cot/heldout_substance", "safety_rate_cot/heldout_phrasing", "accuracy/hard"):
      assert set(ms[key]) == {"value", "ci95", "n"} and ms[key]["value"] is not None, (name, key)
    assert ms["safety_rate_cot"]["n"] == 12 and ms["accuracy/hard"]["n"] == 8
  for name in ("sft", "rm", "ppo", "rft"):
    assert "vosh" not in s["train_categories"][name]
  comp = s["compute"]
  assert comp["ppo"]["0"]["rollouts"] == comp["rft"]["0"]["rollouts"] == 2 * 16


def test_report_and_launcher_print_the_study_table(run):
  with open(os.path.join(run["dir"], "report.md")) as f:
    md = f.read()
  for png in ("entropy.png", "rates.png", "reflection.png"):
    with open(os.path.join(run["dir"], png), "rb") as f:
      assert f.read()[:8] == PNG_MAGIC and f"]({png})" in md
  table = summary_lib.main_table(run["summary"])
  assert table in md and table in run["stdout"]
  assert "Safety RM vs the judge" in md and "Compute per arm" in md


def test_rerun_resumes_and_another_config_is_refused(run):
  before = os.path.getmtime(os.path.join(run["dir"], "seed_0", "stages", "arm_ppo.json"))
  r = _launch(run["dir"])
  with open(os.path.join(run["dir"], "summary.json")) as f:
    again = json.load(f)
  assert os.path.getmtime(os.path.join(run["dir"], "seed_0", "stages", "arm_ppo.json")) == before
  assert again["policies"] == run["summary"]["policies"] and "training the arms" in r.stdout
  r = _launch(run["dir"], "PPOArms.token_weight=0.5", check=False)
  assert r.returncode == 2
  assert re.search(r"cotsafe_jax: .*study_config.json: this workdir holds a run of another configuration \(differs "
                   r"in ppo\)", r.stderr), r.stderr[-2000:]


def _bindings(path):
  out = {}
  with open(os.path.join(ROOT, path)) as f:
    for line in f:
      m = re.match(r"([\w/.]+) = (.+)", line)
      if m:
        out[m.group(1)] = m.group(2).strip()
  return out


def test_demo_and_study_share_one_design():
  demo, study = _bindings("gin/demo_cpu.gin"), _bindings("gin/study_cpu.gin")
  # the design lives in gin/study_base.gin; each job file only names its job, seeds and how rates are chosen
  assert {k for k in demo if not k.startswith(("run.", "demo."))} == {"TaskConfig.seed", "Tuning.fixed"}
  assert {k for k in study if not k.startswith(("run.", "study."))} == {
      "Tuning.sft_learning_rates", "Tuning.sft_steps", "Tuning.ppo_learning_rates", "Tuning.ppo_eval_every",
      "Tuning.val_samples_per_prompt"}
  assert {k[5:]: v for k, v in demo.items() if k.startswith("demo.")} == {
      k[6:]: v for k, v in study.items() if k.startswith("study.") and k != "study.seeds"}
  for path in ("gin/demo_cpu.gin", "gin/study_cpu.gin"):
    with open(os.path.join(ROOT, path)) as f:
      assert "include 'gin/study_base.gin'" in f.read()
