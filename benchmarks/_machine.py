"""The machine a benchmark ran on, for its JSON: the accelerator kind, or the CPU model and core count."""
from __future__ import annotations

import os
import platform
import subprocess


def describe() -> str:
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
