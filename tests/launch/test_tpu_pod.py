"""launch/tpu_pod.sh offline: `gcloud` is a recording stand-in on PATH (no cloud here). The commands it would
send every worker are checked for bash syntax and content; `run` and `stop` are executed on this machine as a
one-worker pod whose launcher is a stand-in job that records its arguments and honours SIGTERM."""
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GCLOUD = f"""#!{sys.executable}
import json, os, shutil, subprocess, sys
argv = sys.argv[1:]
with open(os.environ["GCLOUD_LOG"], "a") as f:
  f.write(json.dumps(argv) + "\\n")
if "scp" in argv:
  shutil.copy(argv[argv.index("scp") + 1], os.path.join(os.environ["GCLOUD_SCP_TO"], "sent.tar.gz"))
elif "ssh" in argv and os.environ.get("GCLOUD_EXEC") == "1":  # one worker: this machine
  sys.exit(subprocess.run(["bash", "-c", argv[argv.index("--command") + 1]]).returncode)
"""

JOB = """import json, signal, sys, time
print(json.dumps(sys.argv[1:]), flush=True)
signal.signal(signal.SIGTERM, lambda *a: (print("stopped after the current step", flush=True), sys.exit(0)))
time.sleep(600)
"""


@pytest.fixture
def pod(tmp_path):
  repo = tmp_path / "repo"
  (repo / "launch").mkdir(parents=True)
  shutil.copy(os.path.join(ROOT, "launch", "tpu_pod.sh"), repo / "launch")
  (repo / "README.md").write_text("x\n")
  git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], check=True, capture_output=True)  # noqa: E731
  git("init", "-q")
  git("add", "-A")
  git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
  git("remote", "add", "origin", "https://example.com/cotsafe_jax.git")
  sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(GCLOUD)
  (bin_dir / "gcloud").chmod(0o755)
  home = tmp_path / "home"
  (home / "cotsafe_jax" / ".venv" / "bin").mkdir(parents=True)
  (home / "cotsafe_jax" / ".venv" / "bin" / "activate").write_text(f"PATH={os.path.dirname(sys.executable)}:$PATH\n")
  (home / "cotsafe_jax" / "launch").mkdir()
  (home / "cotsafe_jax" / "launch" / "tpu_run.py").write_text(JOB)
  log = tmp_path / "gcloud.log"
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", HOME=str(home), GCLOUD_LOG=str(log),
             GCLOUD_SCP_TO=str(tmp_path))

  def call(*args, execute=False, timeout=60):
    r = subprocess.run(["bash", str(repo / "launch" / "tpu_pod.sh"), *args], env={**env, "GCLOUD_EXEC": str(int(execute))},
                       capture_output=True, text=True, timeout=timeout)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    log.unlink(missing_ok=True)
    return r, calls
  return {"call": call, "sha": sha, "home": home, "tmp": tmp_path}


def _alive(pid):
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # an exited, unreaped process is a zombie
  except FileNotFoundError:
    return False


def _command(call):
  return call[call.index("--command") + 1]


def _bash_syntax_ok(command):
  r = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr


def test_setup_clones_the_same_commit_on_every_worker(pod):
  r, calls = pod["call"]("setup", "my-tpu", "us-central2-b", "--project=proj")
  assert r.returncode == 0, r.stderr
  (ssh,) = calls
  assert ssh[:5] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
  assert {"--worker=all", "--zone", "us-central2-b", "--project", "proj"} <= set(ssh)
  cmd = _command(ssh)
  _bash_syntax_ok(cmd)
  assert "git clone --quiet https://example.com/cotsafe_jax.git ~/cotsafe_jax" in cmd
  assert f"checkout --quiet --detach {pod['sha']}" in cmd
  assert "uv venv --quiet --seed --python 3.12 .venv" in cmd and "pip install --quiet -e '.[tpu]'" in cmd


def test_setup_copy_sends_the_commit_as_an_archive(pod):
  r, calls = pod["call"]("setup", "my-tpu", "zone-a", "--copy")
  assert r.returncode == 0, r.stderr
  scp, ssh = calls
  assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and scp[5] == "my-tpu:cotsafe_jax.tar.gz"
  assert "--worker=all" in scp
  with tarfile.open(pod["tmp"] / "sent.tar.gz") as t:
    assert {"launch/tpu_pod.sh", "README.md"} <= set(t.getnames())
  cmd = _command(ssh)
  _bash_syntax_ok(cmd)
  assert "tar -xzf ~/cotsafe_jax.tar.gz" in cmd and "git clone" not in cmd


def test_run_then_stop_on_a_one_worker_pod(pod):
  args = ["--gin_file=gin/experiments/r1_distill_qwen_7b_safety_ppo.gin", "--workdir=gs://bucket/run 1",
          "--gin_param=POLICY_DIR='gs://bucket/models/R1 7B'"]
  r, calls = pod["call"]("run", "my-tpu", "zone-a", "--no-follow", "--", *args, execute=True)
  assert r.returncode == 0, r.stderr
  (ssh,) = calls
  assert "--worker=all" in ssh
  run_dir = pod["home"] / "cotsafe_jax"
  deadline = time.time() + 30
  while time.time() < deadline and not (run_dir / "run.log").read_text().strip():
    time.sleep(0.05)
  assert json.loads((run_dir / "run.log").read_text().splitlines()[0]) == args  # quoting survives ssh + bash
  pid = int((run_dir / "run.pid").read_text())
  assert _alive(pid)  # running, detached from the ssh session
  r, _ = pod["call"]("run", "my-tpu", "zone-a", "--no-follow", "--", *args, execute=True)
  assert r.returncode != 0 and "a job is running" in r.stderr  # never two jobs on one worker
  r, calls = pod["call"]("stop", "my-tpu", "zone-a", execute=True)
  assert r.returncode == 0 and "stopped" in r.stdout, r.stderr
  assert "stopped after the current step" in (run_dir / "run.log").read_text()
  assert not _alive(pid)
  r, _ = pod["call"]("stop", "my-tpu", "zone-a", execute=True)
  assert "no job running" in r.stdout


def test_bad_usage_is_reported(pod):
  r, calls = pod["call"]("run", "my-tpu", "zone-a", "--gin_file=x.gin")
  assert r.returncode == 2 and "launcher arguments go after --" in r.stderr and not calls
  r, _ = pod["call"]("launch", "my-tpu", "zone-a")
  assert r.returncode == 2 and "setup" in r.stdout + r.stderr
