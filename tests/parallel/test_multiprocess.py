"""ppo_train, sft_train and evaluate as 2 processes x 4 CPU devices (one jax.distributed job over localhost, gloo
collectives) against 1 process x 8 devices, same global batch and seed: the same samples, metrics (within float32
summation order) and final params; a SIGTERM to one process stops both after the same step; checkpoints cross
between the two layouts. Each run goes through the launcher, as a user starts it."""
import json
import os
import shutil
import signal
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.eval import fixtures
from tests.parallel import multiproc

# tiny_ppo_cpu as shipped (16 prompts, 2 epochs x 2 minibatches), 3 steps of 16 new tokens; every sample logged
PPO = ["--gin_file=gin/experiments/tiny_ppo_cpu.gin", "--gin_param=ppo_train.num_steps=3",
       "--gin_param=RolloutConfig.max_new_tokens=16", "--gin_param=ppo_train.samples_every=1",
       "--gin_param=ppo_train.num_logged_samples=16", "--gin_param=ppo_train.save_interval_steps=1"]
# float32 reductions sum in another order across processes
TOL = dict(rtol=1e-4, atol=1e-5)
NOT_COMPARED = ("time/", "perf/")


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _assert_metrics_close(a, b):
  assert [r["step"] for r in a] == [r["step"] for r in b]
  for ra, rb in zip(a, b):
    assert ra.keys() == rb.keys()
    for k in ra:
      if k.startswith(NOT_COMPARED):
        continue
      if ra[k] is None or rb[k] is None:
        assert ra[k] is rb[k], (ra["step"], k)
      else:
        np.testing.assert_allclose(rb[k], ra[k], **TOL, err_msg=f"step {ra['step']} {k}")


def _assert_params_close(hf_a, hf_b, atol=1e-4):
  a, b = load_file(os.path.join(hf_a, "model.safetensors")), load_file(os.path.join(hf_b, "model.safetensors"))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(b[k], a[k], atol=atol, rtol=0, err_msg=k)


@pytest.fixture(scope="module")
def ppo_runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("ppo")
  out = {}
  for name, processes, devices in (("one", 1, 8), ("two", 2, 4)):
    results = multiproc.run(PPO + [f"--workdir={root / name}"], processes=processes, devices=devices)
    out[name] = {"dir": str(root / name), "results": results}
  return out


def test_ppo_two_processes_match_one(ppo_runs):
  one, two = ppo_runs["one"], ppo_runs["two"]
  for i, r in enumerate(two["results"]):  # every process says who it is and what it sees
    assert f"tpu_run: process {i} of 2: 4 local / 8 global cpu devices" in r.stdout
  assert "tpu_run: process 0 of 1: 8 local / 8 global cpu devices" in one["results"][0].stdout
  assert "ppo_train: done at step 3/3" in two["results"][0].stdout
  assert "ppo_train:" not in two["results"][1].stdout  # process 0 reports, writes logs and the export
  for step in (1, 2, 3):  # every sampled response of every step (the whole global batch)
    with open(os.path.join(one["dir"], "samples", f"step_{step}.jsonl")) as fa, \
         open(os.path.join(two["dir"], "samples", f"step_{step}.jsonl")) as fb:
      a, b = [json.loads(l) for l in fa], [json.loads(l) for l in fb]
    assert len(a) == 16 and [r["response"] for r in a] == [r["response"] for r in b], step
    np.testing.assert_allclose([r["reward"] for r in b], [r["reward"] for r in a], **TOL)
  _assert_metrics_close(_rows(one["dir"]), _rows(two["dir"]))
  _assert_params_close(os.path.join(one["dir"], "hf"), os.path.join(two["dir"], "hf"))


# about 2 minutes on 2 cores (two more 2-process PPO runs), the heaviest test of this file: slow (the CI suite keeps
# the 2-process PPO, SFT and checkpoint-layout tests)
@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_and_rerun_resumes(ppo_runs, tmp_path):
  workdir = tmp_path / "stopped"
  args = PPO + [f"--workdir={workdir}"]
  procs = multiproc.start(args, processes=2, devices=4)
  deadline = time.time() + 600
  while time.time() < deadline and not (os.path.exists(workdir / "metrics.jsonl") and _rows(workdir)):
    if any(p.poll() is not None for p in procs):
      break
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)  # one worker preempted, during step 2 (or right after step 1)
  results = multiproc.wait(procs)
  assert [r.returncode for r in results] == [0, 0], results[1].stderr[-3000:]
  logged = [r["step"] for r in _rows(workdir)]
  assert logged and logged[-1] < 3 and "stopped early" in results[0].stdout
  saved = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert saved[-1] == logged[-1]  # both finished the step in flight and saved it together

  multiproc.run(args, processes=2, devices=4)  # the same command again
  straight = ppo_runs["two"]["dir"]
  assert [r["step"] for r in _rows(workdir)] == [1, 2, 3]
  _assert_metrics_close(_rows(straight), _rows(workdir))
  _assert_params_close(os.path.join(straight, "hf"), str(workdir / "hf"), atol=0)


# ---- SFT ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
  from cotsafe_jax.data import synthetic
  root = tmp_path_factory.mktemp("sft")
  task = synthetic.write_task(synthetic.make_task(seed=0, n_train=48, n_eval=0), str(root / "task"))
  # constant schedule: a run extended from a checkpoint equals a straight one (cosine depends on num_steps)
  args = ["--gin_file=gin/experiments/tiny_sft_cpu.gin", f"--gin_param=SFT_DATA='{task['sft_warm']}'",
          "--gin_param=SFTConfig.num_steps=4", "--gin_param=SFTConfig.log_every=1",
          "--gin_param=SFTConfig.schedule='constant'", "--gin_param=SFTConfig.warmup_steps=0",
          "--gin_param=sft_train.save_interval_steps=2"]
  out = {"args": args, "root": root}
  for name, processes, devices in (("one", 1, 8), ("two", 2, 4)):
    multiproc.run(args + [f"--workdir={root / name}"], processes=processes, devices=devices)
    out[name] = {"dir": str(root / name)}
  return out


def test_sft_two_processes_match_one(sft_runs):
  one, two = sft_runs["one"]["dir"], sft_runs["two"]["dir"]
  _assert_metrics_close(_rows(one), _rows(two))
  _assert_params_close(os.path.join(one, "hf"), os.path.join(two, "hf"))
  with open(os.path.join(two, "summary.json")) as f:
    assert json.load(f)["step"] == 4


def _resume_from_step_2(src: str, dst: str) -> None:
  """dst: a copy of src's workdir as it was after step 2 (its checkpoint 2, metrics through step 2)."""
  shutil.copytree(src, dst)
  shutil.rmtree(os.path.join(dst, "checkpoints", "4"))
  shutil.rmtree(os.path.join(dst, "hf"))


@pytest.mark.parametrize("writer,reader", [("two", "one"), ("one", "two")])
def test_checkpoint_crosses_process_layouts(sft_runs, tmp_path, writer, reader):
  """A checkpoint written by 2 processes x 4 devices resumes in 1 process x 8 devices, and back: steps 3-4
  then match the reader's own straight run."""
  workdir = str(tmp_path / f"{writer}_then_{reader}")
  _resume_from_step_2(sft_runs[writer]["dir"], workdir)
  processes, devices = (1, 8) if reader == "one" else (2, 4)
  multiproc.run(sft_runs["args"] + [f"--workdir={workdir}"], processes=processes, devices=devices)
  assert [r["step"] for r in _rows(workdir)] == [1, 2, 3, 4]
  _assert_metrics_close(_rows(sft_runs[reader]["dir"]), _rows(workdir))
  _assert_params_close(os.path.join(sft_runs[reader]["dir"], "hf"), os.path.join(workdir, "hf"))


# ---- evaluate -------------------------------------------------------------------------------------------
@pytest.mark.slow  # about a minute on 2 cores
def test_evaluate_two_processes_match_one(tmp_path):
  """The safety + reasoning suite (8 benchmark files, K=2 sampled responses, the guard model judging every
  sample in windows) as 2 processes and as 1: the same samples.jsonl and summary.json."""
  files = {"benchmarks": fixtures.write_benchmarks(str(tmp_path / "benchmarks")),
           "policy": fixtures.make_policy_dir(str(tmp_path / "policy"), seed=0),
           "guard": fixtures.make_guard_dir(str(tmp_path / "guard"))}
  b = {name: repr(path) for name, path in files["benchmarks"].items()}
  b.update({"POLICY_DIR": repr(files["policy"]), "GUARD_DIR": repr(files["guard"]),
            "EvalConfig.samples_per_prompt": 2, "EvalConfig.max_new_tokens": 8, "EvalConfig.batch_size": 8,
            "EvalConfig.max_prompt_len": 256, "EvalConfig.prompt_buckets": (256,), "EvalConfig.num_resamples": 100,
            "EvalConfig.progress": False, "evaluate.dtype": "'float32'", "load_guard_judge.dtype": "'float32'",
            "load_guard_judge.max_len": 512, "load_guard_judge.length_bucket": 512,
            "load_guard_judge.window_tokens": 96, "load_guard_judge.window_overlap": 32,
            "load_guard_judge.progress": False})
  args = ["--gin_file=gin/eval/safety_reasoning.gin"] + [f"--gin_param={k}={v}" for k, v in b.items()]
  for name, processes, devices in (("one", 1, 8), ("two", 2, 4)):
    multiproc.run(args + [f"--workdir={tmp_path / name}"], processes=processes, devices=devices)
  one, two = tmp_path / "one", tmp_path / "two"
  # every text, verdict and count equal; floats (the guard's probabilities, entropies) to float32 rounding: the
  # two layouts compile the same maths into programs that may sum in another order
  _assert_same_json(json.loads((one / "summary.json").read_text()), json.loads((two / "summary.json").read_text()))
  a = [json.loads(l) for l in (one / "samples.jsonl").read_text().splitlines()]
  c = [json.loads(l) for l in (two / "samples.jsonl").read_text().splitlines()]
  assert len(a) == len(c) == 28
  _assert_same_json(a, c)
  assert (two / "report.md").exists() and (two / "rates.png").exists()


def _assert_same_json(a, b, where="$"):
  assert type(a) is type(b) or {type(a), type(b)} <= {int, float}, where
  if isinstance(a, dict):
    assert list(a) == list(b), where
    for k in a:
      _assert_same_json(a[k], b[k], f"{where}.{k}")
  elif isinstance(a, list):
    assert len(a) == len(b), where
    for i, (x, y) in enumerate(zip(a, b)):
      _assert_same_json(x, y, f"{where}[{i}]")
  elif isinstance(a, float):
    assert b == pytest.approx(a, rel=1e-5, abs=1e-6), where
  else:
    assert a == b, where
