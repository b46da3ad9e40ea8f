"""The study end to end on its reduced configuration (gin/study_ci.gin) through the launcher: every arm, two seeds,
tuning on seed 0's validation split; summary.json in the issue's schema, the held-out category absent from every
training file written, the numbers recomputed from the samples written."""
import json
import os
import re
import subprocess
import sys

import pytest

from cotsafe_jax.eval import metrics as eval_metrics
from cotsafe_jax.study import task as T
from tests.eval.test_report import PNG_MAGIC

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POLICIES = ["base", "sft", "rft", "ppo", "ppo_seq"]
REQUIRED = ("safety_rate_cot", "safety_rate_answer", "accuracy", "over_refusal", "reflection_rate", "entropy_cot")


def _launch(workdir, *params, check=True):
  # one CPU device, as on a laptop
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "tpu_run.py"), "--gin_file=gin/study_ci.gin",
                      f"--workdir={workdir}", *[f"--gin_param={p}" for p in params]], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=900)
  if check:
    assert r.returncode == 0, r.stderr[-4000:]
  return r


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("study_ci"))
  r = _launch(workdir)
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  return {"dir": workdir, "stdout": r.stdout, "summary": summary}


def _metric_ok(m):
  assert set(m) == {"value", "ci95", "n"} and isinstance(m["n"], int) and m["n"] >= 0
  assert m["value"] is None or isinstance(m["value"], float)
  assert m["ci95"] is None or (len(m["ci95"]) == 2 and m["ci95"][0] <= m["ci95"][1])


def test_summary_follows_the_schema(run):
  s = run["summary"]
  assert list(s["policies"]) == POLICIES and s["seeds"] == [0, 1] and s["heldout_categories"] == ["vosh"]
  assert set(s["train_categories"]) >= {"sft", "rm", "ppo", "rft"}
  for name, entry in s["policies"].items():
    for key in REQUIRED:
      _metric_ok(entry["metrics"][key])
      assert entry["metrics"][key]["value"] is not None, (name, key)
    for key in ("safety_rate_cot/heldout_substance", "safety_rate_cot/heldout_phrasing", "accuracy/hard",
                "reflection_rate/harmful", "reflection_rate/reasoning", "entropy_cot/harmful"):
      _metric_ok(entry["metrics"][key])
    assert entry["metrics"]["safety_rate_cot"]["n"] == 24  # 12 in-distribution harmful test prompts x 2 seeds
    assert {"harmful/vosh", "harmful/heldout_phrasing", "reasoning/4-step"} <= set(entry["by_category"])
    for ms in entry["by_category"].values():
      for m in ms.values():
        _metric_ok(m)
    assert set(entry["by_seed"]) == {"0", "1"} and set(entry["greedy"]["metrics"]) >= set(REQUIRED)
  for pair in ("ppo - sft", "ppo - rft", "ppo - ppo_seq"):
    d = s["paired_differences"][pair]["safety_rate_cot"]
    assert set(d["by_seed"]) == {"0", "1"} and d["n"] == 24
  assert s["decoding"]["samples_per_prompt"] == 2 and s["decoding"]["rates"].startswith("sampled")
  comp = s["compute"]
  for sd in ("0", "1"):
    assert comp["rft"][sd]["rollouts"] == s["rollout_budget"]["ppo_max"] == 2 * 16
    assert comp["ppo"][sd]["rollouts"] == comp["ppo"][sd]["steps"] * 16 and comp["sft"][sd]["rollouts"] == 0
    assert all(comp[a][sd]["seconds"] > 0 for a in ("sft", "rft", "ppo", "ppo_seq"))
  assert all(v["near_duplicates"] == 0 for v in s["near_duplicate_check"].values())


def test_heldout_category_absent_from_every_training_file_written(run):
  s = run["summary"]
  for name in ("sft", "rm", "ppo", "rft"):
    assert "vosh" not in s["train_categories"][name] and s["train_categories"][name], name
  assert "vosh" in s["train_categories"]["warm_start"]  # the "pretrained" warm start knows it
  for sd in (0, 1):
    data = os.path.join(run["dir"], f"seed_{sd}", "data")
    rm = os.path.join(run["dir"], f"seed_{sd}", "safety_rm")
    files = [os.path.join(data, n) for n in ("train_prompts.jsonl", "sft_safe.jsonl", "rm_spans.jsonl", "rft.jsonl")]
    files += [os.path.join(rm, n) for n in ("train_spans.jsonl", "eval_spans.jsonl")]
    for path in files:
      with open(path) as f:
        text = f.read()
      assert text and not re.search(r"\bvosh\b", text), path
      assert all(p < T.NUM_TRAIN_PHRASINGS for p in T.phrasings_in(path)), path
    tests = T.read_jsonl(os.path.join(data, "test_prompts.jsonl"))
    assert sum(r["split"] == "heldout_substance" for r in tests) == 12


def test_summary_numbers_recompute_from_the_written_samples(run):
  s = run["summary"]
  for sd in ("0", "1"):
    path = os.path.join(run["dir"], f"seed_{sd}", "eval", "samples_ppo_sampled.jsonl")
    samples = T.read_jsonl(path)
    by_prompt = {}
    for x in samples:
      if x["split"] == "id" and x["kind"] == "harmful":
        by_prompt.setdefault(x["prompt_index"], []).append(
            eval_metrics.part_status(x["reasoning_unsafe"], x["finished"]) == "safe")
    want = sum(sum(v) / len(v) for v in by_prompt.values()) / len(by_prompt)
    assert s["policies"]["ppo"]["by_seed"][sd]["safety_rate_cot"]["value"] == pytest.approx(want)
    # the judge's verdicts are the task's ground truth of the text, the RM's are on the sample too
    for x in samples[:20]:
      v = T.judge_response(x["response"], kind=x["kind"], answer=x.get("reference"))
      assert v["reasoning_unsafe"] == x["reasoning_unsafe"] and 0.0 <= x["p_rm_reasoning_unsafe"] <= 1.0
  per_seed = [s["policies"]["ppo"]["by_seed"][sd]["safety_rate_cot"]["value"] for sd in ("0", "1")]
  assert s["policies"]["ppo"]["metrics"]["safety_rate_cot"]["value"] == pytest.approx(sum(per_seed) / 2)


def test_tuning_on_seed_0_validation_and_the_report(run):
  s = run["summary"]
  h = s["hyperparameters"]
  assert h["seed"] == 0 and set(h["chosen"]) == {"sft", "rft", "ppo", "ppo_seq"}
  assert [p["steps"] for p in h["runs"]["sft"]] == [2, 4] and [p["steps"] for p in h["runs"]["ppo"]] == [1, 2]
  for arm, chosen in h["chosen"].items():  # seed 1 trained with seed 0's choice
    with open(os.path.join(run["dir"], "seed_1", "stages", f"arm_{arm}.json")) as f:
      got = json.load(f)
    assert (got["learning_rate"], got["steps"]) == (chosen["learning_rate"], chosen["steps"]), arm
  with open(os.path.join(run["dir"], "report.md")) as f:
    md = f.read()
  for png in ("curves.png", "entropy.png", "rates.png"):
    with open(os.path.join(run["dir"], png), "rb") as f:
      assert f.read()[:8] == PNG_MAGIC and f"]({png})" in md
  table = md.split("| policy | CoT safe |")[1].split("\n\n")[0]
  row = next(line for line in table.splitlines() if line.startswith("| ppo |"))
  m = s["policies"]["ppo"]["metrics"]["safety_rate_cot"]
  assert row.split("|")[2].strip() == f"{m['value']:.2f} [{m['ci95'][0]:.2f}, {m['ci95'][1]:.2f}]"
  assert "| n (prompts) | 24 |" in md and "Paired differences" in md
  assert "Intervals: 95% percentile bootstrap over seeds and, within each drawn seed, over test prompts" in md


def test_the_study_keeps_its_compiled_programs_in_the_workdir(tmp_path):
  """Without a configured cache the study uses <workdir>/xla_cache (a program compiled there is stored) and puts
  the setting back after; a configured one (the tests' JAX_COMPILATION_CACHE_DIR) is left alone."""
  import jax
  import jax.numpy as jnp
  from jax.experimental.compilation_cache import compilation_cache
  from cotsafe_jax.study import run as study_run
  configured = jax.config.jax_compilation_cache_dir
  min_time = jax.config.jax_persistent_cache_min_compile_time_secs
  if configured:
    assert study_run._CompileCache(str(tmp_path)).dir is None
  try:
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # store even this tiny program
    cache = study_run._CompileCache(str(tmp_path))
    assert cache.dir == str(tmp_path / "xla_cache") and jax.config.jax_compilation_cache_dir == cache.dir
    jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.25)(jnp.arange(7.0)).block_until_ready()
    assert any(n.startswith("jit_") for n in os.listdir(cache.dir))
    cache.close()
    assert jax.config.jax_compilation_cache_dir is None
  finally:
    jax.config.update("jax_compilation_cache_dir", configured)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
    compilation_cache.reset_cache()


def test_rerun_resumes_and_another_config_is_refused(run):
  stage = os.path.join(run["dir"], "seed_1", "stages", "arm_ppo.json")
  before = os.path.getmtime(stage)
  r = _launch(run["dir"])
  with open(os.path.join(run["dir"], "summary.json")) as f:
    again = json.load(f)
  assert os.path.getmtime(stage) == before and again["policies"] == run["summary"]["policies"]
  r = _launch(run["dir"], "PPOArms.token_weight=0.5", check=False)
  assert r.returncode == 2
  assert re.search(r"cotsafe_jax: .*study_config.json: this workdir holds a run of another configuration \(differs "
                   r"in ppo\)", r.stderr), r.stderr[-2000:]
