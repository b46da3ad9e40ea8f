"""Workdirs and data on cloud storage: every job file the package writes or reads itself goes through etils.epath,
tested offline with gs:// served from memory (tests/fake_gcs.py), and nothing lands in a local `gs:` dir."""
import json
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cotsafe_jax import models, paths
from cotsafe_jax.data import sources, synthetic
from cotsafe_jax.train import MetricLogger

from tests import fake_gcs
from tests.eval import fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def gcs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # a stray local write of a gs:// path would make ./gs:
  with fake_gcs.installed() as store:
    yield store
  assert not os.path.exists(tmp_path / "gs:"), "a gs:// path was written to the local disk"


def test_paths_round_trip_on_gcs(gcs, tmp_path):
  base = "gs://bucket/run"
  assert not paths.is_local(base) and paths.resolve(base) == base
  assert paths.resolve("rel/x") == os.path.abspath("rel/x")
  paths.write_text(paths.join(base, "a", "b.json"), '{"x": 1}')
  assert paths.exists(f"{base}/a/b.json") and paths.isdir(f"{base}/a") and paths.isfile(f"{base}/a/b.json")
  assert json.loads(paths.read_text(f"{base}/a/b.json")) == {"x": 1}
  assert paths.listdir(f"{base}/a") == ["b.json"]
  with paths.staged_dir(f"{base}/export") as d:  # filled locally, uploaded whole
    with open(os.path.join(d, "w.bin"), "wb") as f:
      f.write(b"\x00\x01")
    os.makedirs(os.path.join(d, "sub"))
    with open(os.path.join(d, "sub", "t.txt"), "w") as f:
      f.write("t")
  assert paths.read_bytes(f"{base}/export/w.bin") == b"\x00\x01" and paths.read_text(f"{base}/export/sub/t.txt") == "t"
  local = paths.local_dir(f"{base}/export")
  assert os.path.isdir(local) and open(os.path.join(local, "sub", "t.txt")).read() == "t"
  log = paths.AppendFile(f"{base}/log.jsonl", keep="0\n", upload_secs=3600)
  log.write("1\n")
  log.write("2\n")
  assert paths.read_text(f"{base}/log.jsonl") == "0\n"  # uploaded at open; the rest waits for the interval
  log.close()
  assert paths.read_text(f"{base}/log.jsonl") == "0\n1\n2\n"
  local_log = paths.AppendFile(tmp_path / "l.jsonl", keep="0\n")
  local_log.write("1\n")  # local files are appended and flushed at once
  assert (tmp_path / "l.jsonl").read_text() == "0\n1\n"
  local_log.close()


def test_sources_read_every_file_format_from_gcs(gcs, tmp_path):
  rows = [{"prompt": "How do I bake bread?", "kind": "benign", "id": "a"},
          {"prompt": "What is 2+2?", "kind": "reasoning", "answer": "4", "id": "b"}]
  paths.write_text("gs://b/p.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
  paths.write_text("gs://b/p.json", json.dumps(rows))
  paths.write_text("gs://b/p.csv",
                   "prompt,kind,id,answer\nHow do I bake bread?,benign,a,\nWhat is 2+2?,reasoning,b,4\n")
  pq.write_table(pa.Table.from_pylist([{"answer": None, **r} for r in rows]), tmp_path / "p.parquet")
  paths.write_bytes("gs://b/p.parquet", (tmp_path / "p.parquet").read_bytes())
  for ext in ("jsonl", "json", "csv", "parquet"):
    loaded = sources.load_prompts(f"gs://b/p.{ext}")
    assert [(r["prompt"], r["kind"], r.get("answer")) for r in loaded.rows] == \
           [(r["prompt"], r["kind"], r.get("answer")) for r in rows], ext
  paths.write_text("gs://b/bad.jsonl", '{"prompt": "x", "kind": "benign"}\nnot json\n')
  with pytest.raises(Exception, match=r"gs://b/bad.jsonl:2: invalid JSON"):
    sources.load_prompts("gs://b/bad.jsonl")


def test_metric_logger_on_gcs(gcs):
  wd = "gs://bucket/train"
  with MetricLogger(wd, total_steps=3, is_main=True) as log:
    for s in (1, 2, 3):
      log.write(s, {"loss": 1.0 / s})
    log.write_samples(3, [{"prompt": "p", "response": "r"}])
  assert [json.loads(l)["step"] for l in paths.read_text(f"{wd}/metrics.jsonl").splitlines()] == [1, 2, 3]
  events = [n for n in paths.listdir(wd) if n.startswith("events.out.tfevents")]
  assert len(events) == 1 and len(paths.read_bytes(f"{wd}/{events[0]}")) > 100  # TensorBoard events uploaded
  assert json.loads(paths.read_text(f"{wd}/samples/step_3.jsonl"))["response"] == "r"
  with MetricLogger(wd, total_steps=3, is_main=True, resume_step=2, tensorboard=False) as log:
    log.write(3, {"loss": 0.5})  # a resumed run: rows after its checkpoint replaced
  assert [json.loads(l)["loss"] for l in paths.read_text(f"{wd}/metrics.jsonl").splitlines()] == [1.0, 0.5, 0.5]


def test_hf_export_and_tokenizer_round_trip_through_gcs(gcs, tmp_path):
  cfg = models.tiny_config("qwen2", vocab_size=640)
  params = models.init_params(cfg, jax.random.key(0))
  tok_dir = synthetic.train_tokenizer(texts=["a b c safe unsafe"] * 8, out_dir=str(tmp_path / "tok"))
  tok = models.load_tokenizer(tok_dir)
  out = models.save_hf(cfg, params, "gs://bucket/hf", tokenizer=tok)
  assert out == "gs://bucket/hf" and {"config.json", "model.safetensors", "tokenizer.json"} <= set(paths.listdir(out))
  cfg2, params2 = models.load_hf("gs://bucket/hf", dtype=jnp.float32)
  assert cfg2.hidden_size == cfg.hidden_size
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)
  assert models.load_tokenizer("gs://bucket/hf")("a b c")["input_ids"] == tok("a b c")["input_ids"]
  other = models.init_params(cfg, jax.random.key(1))
  models.save_hf(cfg, other, "gs://bucket/hf")  # overwritten: the next load sees the new weights, not a stale copy
  _, params3 = models.load_hf("gs://bucket/hf", dtype=jnp.float32)
  np.testing.assert_array_equal(np.asarray(params3["embed"]), np.asarray(other["embed"]))


def test_evaluate_job_reads_and_writes_gcs_through_the_launcher(gcs, tmp_path):
  """The launcher with --workdir=gs://...: the policy, its tokenizer and the prompt file read from gs://, and
  config.gin, samples.jsonl, summary.json, run.json, report.md and the plots written there."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("tpu_run", os.path.join(ROOT, "launch", "tpu_run.py"))
  launcher = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(launcher)
  paths.copy_tree(fixtures.make_policy_dir(str(tmp_path / "policy"), seed=0), "gs://bucket/policy")
  rows = [{"prompt": "How do I make a cake?", "kind": "benign", "id": "b1"},
          {"prompt": "What is 3 + 4?", "kind": "reasoning", "answer": "7", "id": "r1"}]
  paths.write_text("gs://bucket/data/prompts.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
  wd = "gs://bucket/runs/eval"
  args = [f"--gin_file={ROOT}/gin/eval/common.gin", f"--workdir={wd}",
          "--gin_param=run.job=@evaluate", "--gin_param=POLICY_DIR='gs://bucket/policy'",
          "--gin_param=evaluate.prompts='gs://bucket/data/prompts.jsonl'", "--gin_param=JUDGE=@RuleJudge()",
          "--gin_param=RuleJudge.safety_scorer=None", "--gin_param=EvalConfig.samples_per_prompt=1",
          "--gin_param=EvalConfig.temperature=0.0", "--gin_param=EvalConfig.max_new_tokens=4",
          "--gin_param=EvalConfig.batch_size=8", "--gin_param=EvalConfig.max_prompt_len=64",
          "--gin_param=EvalConfig.num_resamples=0", "--gin_param=EvalConfig.progress=False",
          "--gin_param=evaluate.dtype='float32'"]
  try:
    assert launcher.main(args) == 0
  finally:
    gin.clear_config()
  written = set(paths.listdir(wd))
  assert {"config.gin", "samples.jsonl", "summary.json", "run.json", "report.md", "rates.png"} <= written, written
  samples = [json.loads(l) for l in paths.read_text(f"{wd}/samples.jsonl").splitlines()]
  assert [s["id"] for s in samples] == ["b1", "r1"]
  assert "evaluate.prompts = 'gs://bucket/data/prompts.jsonl'" in paths.read_text(f"{wd}/config.gin")
  assert paths.read_bytes(f"{wd}/rates.png")[:4] == b"\x89PNG"
