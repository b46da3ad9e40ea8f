"""Shared by the benchmark scripts: the machine they ran on, and writing their JSON next to them."""
from __future__ import annotations

import json
import os
import platform
import subprocess


def describe() -> str:
  """The accelerator kind, or the CPU model and core count."""
  import jax  # after the caller has chosen its platform (JAX_PLATFORMS)

  backend = jax.default_backend()
  if backend != "cpu":
    return f"{backend}: {jax.devices()[0].device_kind}"
  try:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    model = next(l.split(":", 1)[1].strip() for l in lscpu.splitlines() if "Model name" in l)
  except (OSError, subprocess.CalledProcessError, StopIteration):
    model = platform.processor() or "unknown CPU"
  return f"cpu: {model}, {os.cpu_count()} cores"


def write_json(result: dict, out: str | None, default_name: str) -> str:
  """Writes `result` to `out`, or to benchmarks/`default_name` when `out` is None; prints and returns the path."""
  out = out or os.path.join(os.path.dirname(os.path.abspath(__file__)), default_name)
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {out}")
  return out
