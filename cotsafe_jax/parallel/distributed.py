"""Several processes, one program: jax.distributed start-up (TPU VMs and pods, SLURM, Open MPI, explicit flags),
and the few operations every job needs across processes: global arrays from host data, host copies of
global arrays, one agreed flag, a barrier, and process-0-only writing.

A process only holds the shards of its own devices. So host data becomes a global array either from every
process's own rows (`host_local_to_global`) or from the same full value on every process (`global_array`),
and a global array is read on a host through `to_host` (an all-gather when its shards live on several
processes). With one process each of these is the plain jax call.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import urllib.error
import urllib.request
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from cotsafe_jax.errors import CotsafeError

_initialized = False
_GOOGLE_PCI_VENDOR = "0x1ae0"  # Cloud TPU chips sit on the PCI bus under Google's vendor id, with these device ids
_TPU_PCI_DEVICES = {"0x0027": "v2/v3", "0x0056": "v4i", "0x005e": "v4", "0x0062": "v5p", "0x0063": "v5e",
                    "0x006f": "v6e", "0x0076": "tpu7x"}  # (gVNIC, 0x0042, is Google's too and is not a TPU)


# ---- is this a Cloud TPU VM, and one of several workers? ---------------------------------------------------
def tpu_vm_reason(*, environ: dict[str, str] | None = None, sys_root: str = "/") -> str | None:
  """Why this host looks like a Cloud TPU VM, or None. Two things must hold: libtpu is installed (what jax
  drives TPUs with), and TPU chips are attached: TPU devices on the PCI bus (Google's vendor id and a TPU
  device id, as jax's own check), /dev/accel* (v2-v4) or /dev/vfio/N (v5e and later) device files, or the
  TPU_* variables GKE and the TPU runtime set. No backend is started (jax.distributed must be initialised
  before one is). Being a TPU VM is not being one of several: see tpu_worker_count."""
  env = os.environ if environ is None else environ
  if importlib.util.find_spec("libtpu") is None and not env.get("TPU_LIBRARY_PATH"):
    return None
  chips: list[str] = []
  for dev in glob.glob(os.path.join(sys_root, "sys/bus/pci/devices/*")):
    try:
      with open(os.path.join(dev, "vendor")) as f, open(os.path.join(dev, "device")) as g:
        vendor, device = f.read().strip(), g.read().strip()
    except OSError:
      continue
    if vendor == _GOOGLE_PCI_VENDOR and device in _TPU_PCI_DEVICES:
      chips.append(_TPU_PCI_DEVICES[device])
  if chips:
    return f"libtpu and {len(chips)} TPU {chips[0]} chip(s) on the PCI bus"
  accel = glob.glob(os.path.join(sys_root, "dev/accel*")) + glob.glob(os.path.join(sys_root, "dev/vfio/[0-9]*"))
  if accel:
    return f"libtpu and {len(accel)} TPU device file(s) ({os.path.basename(accel[0])})"
  named = sorted(k for k in ("TPU_WORKER_ID", "TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "TPU_PROCESS_ADDRESSES")
                 if env.get(k))
  if named:
    return f"libtpu and {', '.join(named)}"
  return None


def _metadata(key: str, env: dict[str, str], timeout: float) -> str | None:
  """A TPU VM's instance attribute from the GCE metadata server (GCE_METADATA_IP overrides its address)."""
  host = env.get("GCE_METADATA_IP", "metadata.google.internal")
  req = urllib.request.Request(f"http://{host}/computeMetadata/v1/instance/attributes/{key}",
                               headers={"Metadata-Flavor": "Google"})
  try:
    with urllib.request.urlopen(req, timeout=timeout) as r:
      return r.read().decode() if r.status == 200 else None
  except (urllib.error.URLError, OSError, ValueError):
    return None


def tpu_worker_count(*, environ: dict[str, str] | None = None, timeout: float = 5.0) -> int | None:
  """How many hosts (workers) the TPU slice has: from TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES (GKE), else
  the GCE metadata server's worker-network-endpoints (TPU VMs created with gcloud, which set no variable).
  None when neither answers (e.g. a Colab TPU runtime: one host)."""
  env = os.environ if environ is None else environ
  for key in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
    if env.get(key):
      return len([h for h in env[key].split(",") if h.strip()])
  if env.get("TPU_SKIP_MDS_QUERY"):
    return None
  endpoints = _metadata("worker-network-endpoints", env, timeout)
  if not endpoints:
    return None
  return len([w for w in endpoints.strip().split(",") if w.strip()])


def _cluster_reason(env: dict[str, str]) -> str | None:
  """Why this process is one of several that jax.distributed.initialize() can find on its own, or None."""
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
    return f"SLURM with {env['SLURM_NTASKS']} tasks"
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return f"Open MPI with {env['OMPI_COMM_WORLD_SIZE']} ranks"
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS is set"
  tpu = tpu_vm_reason(environ=env)
  if tpu is not None:
    workers = tpu_worker_count(environ=env)
    if workers is not None and workers > 1:
      return f"a Cloud TPU VM ({tpu}) in a slice of {workers} workers"
  return None


def initialize(*, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: list[int] | None = None) -> str | None:
  """Start jax.distributed when this is one of several processes; returns why it did (None: one process).
  Call it before any other JAX call.

  Explicit --coordinator_address --num_processes --process_id (GPU clusters, CPU processes); else on its own on
  a multi-host Cloud TPU slice (tpu_vm_reason + tpu_worker_count: jax reads the workers and this worker's
  index from the TPU metadata), under SLURM or Open MPI. CPU processes exchange data through gloo.
  """
  global _initialized
  if _initialized:
    return "already initialised"
  explicit = coordinator_address is not None or num_processes is not None or process_id is not None
  if explicit:
    if coordinator_address is None or num_processes is None or process_id is None:
      raise CotsafeError("distributed: --coordinator_address, --num_processes and --process_id must be "
                         f"given together (got {coordinator_address!r}, {num_processes!r}, {process_id!r})")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise CotsafeError(f"distributed: process_id={process_id} outside [0, num_processes={num_processes})")
    if num_processes == 1:
      return None
    reason = f"--coordinator_address={coordinator_address} --num_processes={num_processes} --process_id={process_id}"
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id,
                  local_device_ids=local_device_ids)
  else:
    reason = _cluster_reason(os.environ)
    if reason is None:
      return None
    kwargs = {}  # jax's cluster detection: TPU metadata, SLURM, Open MPI
  if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
    # CPU devices of different processes talk through gloo (no effect on TPU / GPU collectives)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(**kwargs)
  except (RuntimeError, ValueError) as e:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise CotsafeError(f"distributed: jax.distributed.initialize failed ({reason}): {first}") from e
  _initialized = True
  return reason


def describe() -> str:
  """One line naming this process and the devices it sees (the launcher prints it on every process)."""
  return (f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local / "
          f"{jax.device_count()} global {jax.devices()[0].platform} devices")


def is_main_process() -> bool:
  return jax.process_index() == 0


# ---- data across processes ----------------------------------------------------------------------------------
def _row_span(sharding: NamedSharding, shape: tuple[int, ...]) -> tuple[int, int] | None:
  """[start, stop) of the leading-dim rows this process's devices hold, or None if not one contiguous run."""
  spans = sorted({(idx[0].indices(shape[0])[:2]) for d, idx in sharding.devices_indices_map(shape).items()
                  if d.process_index == jax.process_index()})
  start, stop = spans[0]
  for a, b in spans[1:]:
    if a > stop:
      return None
    stop = max(stop, b)
  return start, stop


def host_local_to_global(local_batch: Any, shardings: Any) -> Any:
  """Global arrays from each process's own rows: process p of P holds rows [p*n, (p+1)*n) of the global batch
  (n = its local rows), as `data.pipeline` hands them out. When a process's devices do not hold exactly those
  rows (e.g. a mesh axis that replicates the batch across hosts), the rows are all-gathered first."""
  if jax.process_count() == 1:
    return jax.device_put(local_batch, shardings)
  p = jax.process_index()

  def one(x, s: NamedSharding):
    x = np.asarray(x)
    shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    if _row_span(s, shape) == (p * x.shape[0], (p + 1) * x.shape[0]):
      return jax.make_array_from_process_local_data(s, x, shape)
    return global_array(to_host(x, tiled=True), s)
  return jax.tree.map(one, local_batch, shardings)


def global_array(value: Any, sharding: Any) -> Any:
  """A global array from a host value that every process holds in full (the same on each): each process
  places only its own devices' shards. Pytrees map leaf by leaf (sharding: one, or a matching tree)."""
  if jax.process_count() == 1:
    return jax.device_put(value, sharding)

  def one(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
  if isinstance(sharding, jax.sharding.Sharding):
    return jax.tree.map(lambda x: one(x, sharding), value)
  return jax.tree.map(one, value, sharding)


def to_host(tree: Any, *, tiled: bool = False) -> Any:
  """Numpy copies of a pytree of arrays on every process. A global array whose shards live on several
  processes is all-gathered (every process must call this together); other arrays are copied as they are.
  tiled=True also concatenates a host-local numpy value over the processes (process order)."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    if tiled and jax.process_count() > 1:
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(one, tree)


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is True on any (e.g. a stop signal that reached one worker)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.int32(bool(flag)))))


def barrier(name: str) -> None:
  """Wait until every process gets here (e.g. after process 0 wrote files the others read)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
