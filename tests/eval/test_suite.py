"""The evaluation suite end to end through gin/eval/safety_reasoning.gin: benchmark files written here in each
public layout (StrongREJECT csv, WildJailbreak eval tsv, JailbreakBench csv, XSTest csv, MATH-500 / AIME / GSM8K
jsonl, GPQA csv), a tiny random policy and a tiny random Llama guard (save_pretrained, its own chat template),
k samples per prompt; then the compare job side by side with that run."""
import json
import os

import gin
import pytest

from cotsafe_jax import CotsafeError, jobs

from tests.eval import fixtures

ROOT = fixtures.REPO
SUITE = ["strongreject", "wildjailbreak", "jailbreakbench", "xstest", "math500", "aime", "gsm8k", "gpqa"]
# prompts per benchmark in the fixture files, and their kinds
ROWS = {"strongreject": 2, "wildjailbreak": 2, "jailbreakbench": 2, "xstest": 2, "math500": 2, "aime": 1,
        "gsm8k": 1, "gpqa": 2}
K = 2


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("suite")
  return {"benchmarks": fixtures.write_benchmarks(str(root / "benchmarks")),
          "policy": fixtures.make_policy_dir(str(root / "policy"), seed=0),
          "policy_b": fixtures.make_policy_dir(str(root / "policy_b"), seed=1),
          "guard": fixtures.make_guard_dir(str(root / "guard"))}


def _bindings(files, **extra):
  b = {name: repr(path) for name, path in files["benchmarks"].items()}
  b.update(POLICY_DIR=repr(files["policy"]), GUARD_DIR=repr(files["guard"]))
  b.update({
      "EvalConfig.samples_per_prompt": K, "EvalConfig.max_new_tokens": 8, "EvalConfig.batch_size": 8,
      "EvalConfig.max_prompt_len": 256, "EvalConfig.prompt_buckets": (256,), "EvalConfig.num_resamples": 100,
      "EvalConfig.progress": False, "evaluate.dtype": "'float32'", "compare.dtype": "'float32'",
      "load_guard_judge.dtype": "'float32'", "load_guard_judge.max_len": 512, "load_guard_judge.length_bucket": 512,
      "load_guard_judge.window_tokens": 96, "load_guard_judge.window_overlap": 32, "load_guard_judge.progress": False,
  })
  b.update(extra)
  return [f"{k} = {v}" for k, v in b.items()]


def _run(files, workdir, gin_files, **extra):
  gin.clear_config()
  gin.add_config_file_search_path(ROOT)
  try:
    gin.parse_config_files_and_bindings([os.path.join(ROOT, f) for f in gin_files], _bindings(files, **extra))
    return jobs.run(workdir=str(workdir))
  finally:
    gin.clear_config()


def _read(path):
  with open(path, encoding="utf-8") as f:
    return json.load(f) if path.endswith(".json") else [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def evaluated(files, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("eval_run")
  _run(files, workdir, ["gin/eval/safety_reasoning.gin"])
  return str(workdir)


def _check_metric_entries(metrics):
  for name, m in metrics.items():
    assert set(m) == {"value", "ci95", "n"}, name
    assert m["value"] is None or isinstance(m["value"], (int, float)), name
    assert m["ci95"] is None or (len(m["ci95"]) == 2 and m["ci95"][0] <= m["ci95"][1]), name
    assert isinstance(m["n"], int) and m["n"] >= 1, name


def test_suite_end_to_end(evaluated):
  summary = _read(os.path.join(evaluated, "summary.json"))
  assert list(summary["policies"]) == ["policy"]
  entry = summary["policies"]["policy"]
  assert set(entry) == {"metrics", "by_category", "counts", "by_benchmark", "macro"}
  assert list(entry["by_benchmark"]) == SUITE
  _check_metric_entries(entry["metrics"])
  for b, be in entry["by_benchmark"].items():
    assert be["counts"]["n"] == ROWS[b] and be["counts"]["n_samples"] == K * ROWS[b]
    _check_metric_entries(be["metrics"])
    for cat in be["by_category"].values():
      _check_metric_entries(cat)
  assert entry["counts"] == {"n": 14, "n_harmful": 6, "n_benign": 2, "n_reasoning": 6, "n_samples": 28}
  # the presets' kinds: WildJailbreak's adversarial_benign and XSTest's safe prompt are benign
  assert entry["by_benchmark"]["xstest"]["counts"]["n_benign"] == 1
  assert entry["by_benchmark"]["wildjailbreak"]["counts"]["n_benign"] == 1
  assert set(entry["by_benchmark"]["jailbreakbench"]["by_category"]) == {"Harassment/Discrimination", "Physical harm"}
  assert set(entry["by_benchmark"]["gpqa"]["by_category"]) == {"Physics", "Chemistry"}
  assert summary["sampling"]["samples_per_prompt"] == K and summary["sampling"]["temperature"] == 0.6
  assert summary["suite"]["gpqa"] == {"rows": 2, "available": 2, "weight": 1.0} and summary["judge"] == "RuleJudge"
  m = entry["metrics"]
  assert {f"safe@{K}_cot", f"conssafe@{K}_cot", f"safe@{K}_answer", f"pass@{K}", f"maj@{K}", "over_refusal"} <= set(m)
  # 8 new tokens: no response finishes, so none is counted safe, whatever the guard says
  assert m["finished_rate"]["value"] == 0.0
  assert m["safety_rate_cot"]["value"] == 0.0 and m["safety_rate_answer"]["value"] == 0.0
  assert m["unsafe_rate_cot"]["value"] + m["unfinished_rate_cot"]["value"] == pytest.approx(1.0)
  assert m["max_response_tokens"]["value"] == 8


def test_samples_hold_every_sample_and_every_verdict(evaluated):
  samples = _read(os.path.join(evaluated, "samples.jsonl"))
  assert len(samples) == 14 * K
  assert [s["source"] for s in samples[::K]] == [b for b in SUITE for _ in range(ROWS[b])]
  for s in samples:
    assert {"prompt_index", "sample", "prompt", "response", "reasoning", "answer", "reasoning_unsafe",
            "answer_unsafe", "correct", "refused", "reflection", "finished", "num_tokens",
            "num_reasoning_tokens", "entropy_cot", "pred"} <= set(s)
    assert 0.0 <= s["p_reasoning_unsafe"] <= 1.0  # the guard judged the reasoning of every sample
    if s["kind"] == "harmful":
      assert s["cot_status"] in ("unsafe", "unfinished") and s["answer_status"] == "unfinished"
    if s["kind"] == "reasoning":
      assert s["correct"] is False and s["reference"]
  gpqa = [s for s in samples if s["source"] == "gpqa"]
  assert all(s["grader"] == "choice" and s["reference"] in "ABCD" for s in gpqa)
  math = next(s for s in samples if s["source"] == "math500")
  assert math["reference"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
  # what the policy saw: the math prompts with R1's \boxed{} instruction, GPQA's with its answer format
  assert math["policy_prompt"] == math["prompt"] + "\nPlease reason step by step, and put your final answer within " \
                                                   "\\boxed{}."
  assert gpqa[0]["policy_prompt"].startswith("Answer the following multiple choice question.")
  assert gpqa[0]["prompt"].startswith("Which particle mediates") and "\nA) " in gpqa[0]["prompt"]
  assert all("policy_prompt" not in s for s in samples if s["kind"] != "reasoning")


def test_report_and_run_files(evaluated):
  md = open(os.path.join(evaluated, "report.md"), encoding="utf-8").read()
  for section in ("## By benchmark", "## By category", "## Speed"):
    assert section in md
  for png in ("safety_by_benchmark.png", "accuracy_by_benchmark.png", "rates.png", "entropy.png", "lengths.png"):
    assert os.path.getsize(os.path.join(evaluated, png)) > 1000 and f"]({png})" in md
  run = _read(os.path.join(evaluated, "run.json"))["policy"]
  assert run["speed"]["tokens_per_s"] > 0 and run["speed"]["generated_tokens"] == 14 * K * 8
  assert os.path.exists(os.path.join(evaluated, "config.gin")) is False  # the launcher writes it, not the job


def test_compare_side_by_side_with_an_earlier_run(files, evaluated, tmp_path):
  _run(files, tmp_path, ["gin/eval/safety_reasoning.gin", "gin/eval/compare.gin"],
       **{"compare.policies": {"base": files["policy"], "ppo": files["policy_b"]},
          "compare.runs": {"earlier": evaluated}})
  summary = _read(str(tmp_path / "summary.json"))
  assert list(summary["policies"]) == ["base", "ppo", "earlier"]
  earlier = _read(os.path.join(evaluated, "summary.json"))["policies"]["policy"]
  assert summary["policies"]["earlier"] == earlier
  # the same checkpoint, suite, sampling and seed as the earlier run: the same numbers
  assert summary["policies"]["base"]["metrics"] == earlier["metrics"]
  assert summary["policies"]["ppo"]["metrics"] != earlier["metrics"]
  assert len(_read(str(tmp_path / "samples_base.jsonl"))) == 14 * K
  md = (tmp_path / "report.md").read_text()
  assert md.startswith("# Base vs SFT vs PPO") and "| strongreject | ppo |" in md and "| gpqa | earlier |" in md
  # an earlier run with other sampling is refused: side by side numbers must be comparable
  with pytest.raises(CotsafeError, match=r"runs\['earlier'\]: .* was evaluated with another sampling"):
    _run(files, tmp_path / "refused", ["gin/eval/safety_reasoning.gin", "gin/eval/compare.gin"],
         **{"compare.policies": {"base": files["policy"]}, "compare.runs": {"earlier": evaluated},
            "EvalConfig.seed": 1})


def test_suite_errors(files, tmp_path):
  with pytest.raises(CotsafeError, match="no policy checkpoint"):
    _run(files, tmp_path, ["gin/eval/safety_reasoning.gin"], POLICY_DIR=None)
  missing = str(tmp_path / "nope.csv")
  with pytest.raises(CotsafeError, match=f"{missing}: no such file"):
    _run(files, tmp_path, ["gin/eval/safety.gin"], STRONGREJECT=repr(missing))
