"""MetricLogger: jsonl rows, TensorBoard events, phase timing, samples, resume truncation."""
import glob
import json
import os
import struct
import time

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from cotsafe_jax import CotsafeError
from cotsafe_jax import train


def _rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _tb_scalars(workdir):
  """{(tag, step): value} read from the raw TFRecord event files."""
  out = {}
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for v in event.summary.value:
        out[(v.tag, event.step)] = v.simple_value
  return out


def _metrics(step):
  return {"loss": jnp.float32(1.0 / step), "kl": np.float64(0.01 * step), "n": step, "ok": True}


def test_rows_tensorboard_and_phases(tmp_path):
  wd = str(tmp_path / "run")
  with train.MetricLogger(wd, total_steps=3, is_main=True, postfix_keys=("loss",), desc="sft") as log:
    assert log._bar.desc.startswith("sft")
    for step in (1, 2, 3):
      with log.phase("rollout"):
        time.sleep(0.02)
      with log.phase("update"):
        time.sleep(0.01)
      log.add_tokens(1000)
      row = log.write(step, {**_metrics(step), "ev": float("nan")})
    assert row["time/rollout_s"] >= 0.02 and row["time/update_s"] >= 0.01
    assert row["time/step_s"] >= row["time/rollout_s"] + row["time/update_s"]
    assert row["perf/tokens_per_s"] == pytest.approx(1000 / row["time/step_s"])
  rows = _rows(os.path.join(wd, "metrics.jsonl"))
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert rows[1]["loss"] == pytest.approx(0.5) and rows[2]["kl"] == pytest.approx(0.03)
  assert rows[0]["n"] == 1.0 and isinstance(rows[0]["n"], float) and rows[0]["ok"] == 1.0
  assert rows[0]["ev"] is None  # NaN written as null: strict JSON
  assert all(r["time/rollout_s"] >= 0.02 and r["perf/tokens_per_s"] > 0 for r in rows)
  tb = _tb_scalars(wd)
  assert tb[("loss", 2)] == pytest.approx(0.5) and tb[("kl", 3)] == pytest.approx(0.03)
  assert ("time/update_s", 1) in tb


def test_resume_truncates_to_match_uninterrupted_run(tmp_path):
  def strip(rows):  # wall times differ between runs; the rest must be identical
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in rows]

  full = str(tmp_path / "full")
  with train.MetricLogger(full, total_steps=8, is_main=True, tensorboard=False) as log:
    for step in range(1, 9):
      log.write(step, _metrics(step))
  crashed = str(tmp_path / "crashed")
  with train.MetricLogger(crashed, total_steps=8, is_main=True, tensorboard=False) as log:
    for step in range(1, 7):  # checkpoint after step 4, crash after step 6 ...
      log.write(step, _metrics(step))
  with open(os.path.join(crashed, "metrics.jsonl"), "a") as f:
    f.write('{"step": 7, "loss": 0.1')  # ... in the middle of writing step 7
  with train.MetricLogger(crashed, total_steps=8, is_main=True, tensorboard=True, resume_step=4) as log:
    assert [r["step"] for r in _rows(log.metrics_path)] == [1, 2, 3, 4]
    for step in range(5, 9):
      log.write(step, _metrics(step))
  resumed_rows = _rows(os.path.join(crashed, "metrics.jsonl"))
  assert strip(resumed_rows) == strip(_rows(os.path.join(full, "metrics.jsonl")))
  assert glob.glob(os.path.join(crashed, "events.out.tfevents.*"))
  # a fresh run in an old workdir starts the file over
  with train.MetricLogger(crashed, total_steps=8, is_main=True, tensorboard=False) as log:
    log.write(1, _metrics(1))
  assert [r["step"] for r in _rows(os.path.join(crashed, "metrics.jsonl"))] == [1]


def test_truncate_rejects_a_corrupt_middle_line(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  with open(path, "w") as f:
    f.write('{"step": 1}\nnot json\n{"step": 2}\n')
  with pytest.raises(CotsafeError, match=r"metrics.jsonl:2: not a metrics row with an integer 'step'"):
    train.truncate_metrics(path, last_step=5)


def test_samples_and_non_main(tmp_path):
  wd = str(tmp_path / "run")
  with train.MetricLogger(wd, total_steps=2, is_main=True, tensorboard=False) as log:
    path = log.write_samples(2, [
        {"prompt": "2+2?", "response": "<think>4</think>4", "reward": np.float32(1.5), "tokens": np.arange(3)},
        {"prompt": "é", "reward": 0.0}])
  assert path == os.path.join(wd, "samples", "step_2.jsonl")
  rows = _rows(path)
  assert rows[0] == {"prompt": "2+2?", "response": "<think>4</think>4", "reward": 1.5, "tokens": [0, 1, 2]}
  assert rows[1]["prompt"] == "é"
  other = str(tmp_path / "worker1")
  with train.MetricLogger(other, total_steps=2, is_main=False) as log:
    row = log.write(1, _metrics(1))
    assert log.write_samples(1, [{"a": 1}]) is None
  assert row["loss"] == 1.0 and not os.path.exists(other)


def test_bad_metric_names_itself(tmp_path):
  with train.MetricLogger(str(tmp_path), total_steps=1, is_main=True, tensorboard=False) as log:
    with pytest.raises(CotsafeError,
                       match=r"metric 'adv' must be a numeric scalar, got float32 of shape \(2,\)"):
      log.write(1, {"adv": np.zeros(2, np.float32)})
