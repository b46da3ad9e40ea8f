"""Run the launcher as N local processes that form one jax.distributed job (CPU devices, gloo collectives), or
as one process: what the multi-process tests compare."""
from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCHER = os.path.join(ROOT, "launch", "tpu_run.py")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@dataclasses.dataclass
class Result:
  returncode: int
  stdout: str
  stderr: str


def start(args: list[str], *, processes: int, devices: int, cwd: str = ROOT) -> list[subprocess.Popen]:
  """`processes` launcher processes with `devices` CPU devices each; with more than one they join one job
  through a coordinator on a free localhost port (process 0 listens there)."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  env.pop("JAX_CPU_COLLECTIVES_IMPLEMENTATION", None)  # the launcher picks gloo for CPU processes
  flags = [[]]
  if processes > 1:
    port = free_port()
    flags = [[f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}", f"--process_id={i}"]
             for i in range(processes)]
  return [subprocess.Popen([sys.executable, LAUNCHER, *args, *f], cwd=cwd, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) for f in flags]


def wait(procs: list[subprocess.Popen], *, timeout: float = 600) -> list[Result]:
  """Each process's exit code and output; all are killed if any is still running after `timeout` seconds."""
  deadline = time.time() + timeout
  out = []
  try:
    for p in procs:
      so, se = p.communicate(timeout=max(deadline - time.time(), 1))
      out.append(Result(p.returncode, so, se))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  return out


def run(args: list[str], *, processes: int, devices: int, timeout: float = 600) -> list[Result]:
  results = wait(start(args, processes=processes, devices=devices), timeout=timeout)
  for i, r in enumerate(results):
    assert r.returncode == 0, f"process {i} of {processes} exited {r.returncode}:\n{r.stderr[-4000:]}"
  return results
