"""Multi-process start-up: jax.distributed on TPU pods, GPU clusters or explicit flags; a no-op on one host.

Also process-0-only writing and host-local -> global batch assembly.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from cotsafe_jax.errors import CotsafeError

_initialized = False


def _multi_host_environment() -> bool:
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if "," in hosts:  # a multi-host TPU slice (GCP TPU VM pod)
    return True
  if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
    return True
  if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return True
  return bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))


def initialize(*, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: list[int] | None = None) -> bool:
  """Start jax.distributed when running multi-process; returns whether it did. Call before any JAX op."""
  global _initialized
  if _initialized:
    return True
  explicit = coordinator_address is not None or num_processes is not None or process_id is not None
  if explicit:
    if coordinator_address is None or num_processes is None or process_id is None:
      raise CotsafeError("distributed: --coordinator_address, --num_processes and --process_id must be "
                         f"given together (got {coordinator_address!r}, {num_processes!r}, {process_id!r})")
    if not 0 <= process_id < num_processes:
      raise CotsafeError(f"distributed: process_id={process_id} outside [0, num_processes={num_processes})")
    if num_processes == 1:
      return False
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids)
  elif _multi_host_environment():
    jax.distributed.initialize()  # cluster auto-detection (TPU pod metadata, SLURM, Open MPI)
  else:
    return False
  _initialized = True
  return True


def is_main_process() -> bool:
  return jax.process_index() == 0


def host_local_to_global(local_batch: Any, shardings: Any) -> Any:
  """Assemble global arrays from each process's local rows (the leading dim is this host's share)."""
  if jax.process_count() == 1:
    return jax.device_put(local_batch, shardings)

  def one(x, s: NamedSharding):
    return jax.make_array_from_process_local_data(s, np.asarray(x))
  return jax.tree.map(one, local_batch, shardings)
