"""The launcher runs jobs from .gin files in a subprocess; errors are one line with exit code 2."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _launch(*args, cwd=ROOT, devices=1):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "tpu_run.py"), *args], cwd=cwd,
                        env=env, capture_output=True, text=True, timeout=300)


def test_model_info_from_gin_file(tmp_path):
  r = _launch("--gin_file=gin/model_info_tiny.gin", f"--workdir={tmp_path}", cwd=str(tmp_path))
  assert r.returncode == 0, r.stderr
  info = json.load(open(tmp_path / "model_info.json"))
  assert info["num_params"] == 156_224  # tiny.gin: 2 layers, d=64, V=640, qkv bias, untied
  assert info["param_bytes_total"] == 2 * 156_224
  assert "model.info" not in r.stderr
  assert "model_info.model = %MODEL" in open(tmp_path / "config.gin").read()


def test_model_info_bytes_per_device_under_mesh(tmp_path):
  r = _launch("--gin_file=gin/models/r1_distill_qwen_7b.gin", "--gin_param=run.job=@model_info",
              "--gin_param=model_info.model=%MODEL", "--gin_param=model_info.mesh=@make_mesh()",
              "--gin_param=make_mesh.fsdp=4", "--gin_param=make_mesh.tensor=2", f"--workdir={tmp_path}",
              devices=8)
  assert r.returncode == 0, r.stderr
  info = json.load(open(tmp_path / "model_info.json"))
  assert info["num_params"] == 7_615_616_512
  # everything big is sharded 8 ways; only norms and biases are replicated
  assert info["param_bytes_total"] / 8 < info["param_bytes_per_device"] < info["param_bytes_total"] / 7.9


@pytest.mark.parametrize("param,message", [
    ("model_inf.dtype='x'", "cotsafe_jax: gin: unknown configurable 'model_inf' (did you mean: model_info"),
    ("model_info.dtyp='x'", "cotsafe_jax: gin: 'model_info' has no parameter 'dtyp' (did you mean: dtype?)"),
])
def test_unknown_gin_binding_is_one_line_error(tmp_path, param, message):
  r = _launch("--gin_file=gin/model_info_tiny.gin", f"--gin_param={param}", f"--workdir={tmp_path}")
  assert r.returncode == 2
  lines = [l for l in r.stderr.splitlines() if l.startswith("cotsafe_jax:")]
  assert len(lines) == 1 and lines[0].startswith(message), r.stderr
  assert "Traceback" not in r.stderr


def test_missing_paths_are_errors_and_debug_shows_traceback(tmp_path):
  r = _launch("--gin_file=gin/nope.gin", f"--workdir={tmp_path}")
  assert r.returncode == 2 and "cotsafe_jax: gin/nope.gin: gin file not found" in r.stderr
  args = ("--gin_file=gin/export_hf.gin", f"--gin_param=export_hf.hf_dir='{tmp_path}/missing'",
          f"--workdir={tmp_path}")
  r = _launch(*args)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1] == (f"cotsafe_jax: {tmp_path}/missing: model dir not found "
                                               "(expected a local Hugging Face checkpoint dir)")
  r = _launch(*args, "--debug")
  assert r.returncode != 0 and "Traceback" in r.stderr


def test_export_hf_job_casts_to_bfloat16(tmp_path):
  from tests.models.hf_fixtures import make_hf_model
  make_hf_model("llama", str(tmp_path / "src"))
  r = _launch("--gin_file=gin/export_hf.gin", f"--gin_param=export_hf.hf_dir='{tmp_path}/src'",
              f"--workdir={tmp_path}/w")
  assert r.returncode == 0, r.stderr
  from safetensors import safe_open
  with safe_open(str(tmp_path / "w" / "hf_export" / "model.safetensors"), "np") as f:
    assert str(f.get_tensor("model.embed_tokens.weight").dtype) == "bfloat16"
  assert json.load(open(tmp_path / "w" / "hf_export" / "config.json"))["dtype"] == "bfloat16"
