"""Accelerator targets by their vendor names: chips, HBM per chip, and the compile-only devices of a slice.

TPU slices come from libtpu's topology descriptions, NVIDIA GPUs from the CUDA plugin's deviceless
topology over a GpuTargetConfigProto written from the chip's published figures. Nothing here needs the
accelerator: programs for these devices are compiled on a CPU host.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from cotsafe_jax.errors import CotsafeError

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Target:
  """One slice or host: `chips` devices of `chip`, each with `hbm_bytes` of HBM."""
  name: str
  platform: str  # "tpu" | "cuda"
  chip: str
  chips: int
  hbm_bytes: int
  topology: str  # libtpu topology name, or the CUDA plugin's "slices x hosts x devices"


# Google names v4 / v5p slices by TensorCores (2 per chip) and v5e / v6e slices by chips.
_TPU = {
    "v5e": ("TPU v5e", 16 * GIB, {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}, 1),
    "v6e": ("TPU v6e", 32 * GIB, {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}, 1),
    "v5p": ("TPU v5p", 95 * GIB, {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
                                  256: "4x8x8"}, 2),
}

# The fields XLA reads from a GpuTargetConfigProto, from NVIDIA's published H100 SXM / H200 figures
# (Hopper sm_90: 132 SMs, 228 KiB shared memory per SM of which 227 KiB opt-in per block, 50 MiB L2).
_HOPPER = """gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  shared_memory_per_block_optin: 232448
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  thread_dim_limit_x: 1024
  thread_dim_limit_y: 1024
  thread_dim_limit_z: 64
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  memory_bandwidth: {bandwidth}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {memory}
  cuda_compute_capability {{ major: 9 minor: 0 }}
  device_vendor: "NVIDIA Corporation"
  name: "{name}"
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 patch: 0 }}
device_description_str: "{name}"
"""
_GPU = {  # name -> (description, HBM bytes, memory bandwidth bytes/s)
    "H100": ("NVIDIA H100 80GB HBM3", 84_942_979_072, 3_352_320_000_000),
    "H200": ("NVIDIA H200 141GB HBM3e", 151_397_597_184, 4_800_000_000_000),
}


def parse_target(name: str) -> Target:
  """'v5e-8' (8 chips), 'v5p-64' (32 chips), 'v6e-16', '8xH100', '8xH200' -> Target."""
  if "x" in name and name.split("x", 1)[1] in _GPU:
    count, model = name.split("x", 1)
    if not count.isdigit() or int(count) < 1:
      raise CotsafeError(f"plan: target {name!r}, expected N x GPU such as '8xH100'")
    desc, memory, _ = _GPU[model]
    return Target(name, "cuda", desc, int(count), memory, f"1x1x{int(count)}")
  gen, _, size = name.partition("-")
  if gen not in _TPU or not size.isdigit():
    raise CotsafeError(f"plan: unknown target {name!r}, expected a TPU slice ({', '.join(_tpu_names())}) or "
                       f"N x GPU ({', '.join('8x' + g for g in _GPU)})")
  chip, hbm, shapes, per_chip = _TPU[gen]
  chips = int(size) // per_chip
  if chips not in shapes:
    raise CotsafeError(f"plan: target {name!r} is not a {gen} slice size here, expected one of "
                       f"{', '.join(f'{gen}-{c * per_chip}' for c in shapes)}")
  return Target(name, "tpu", chip, chips, hbm, f"{gen}:{shapes[chips]}")


def _tpu_names() -> list[str]:
  return [f"{g}-{c * per}" for g, (_, _, shapes, per) in _TPU.items() for c in list(shapes)[:2]] + ["..."]


def gpu_target_config(target: Target) -> str:
  model = next(m for m, (desc, _, _) in _GPU.items() if desc == target.chip)
  desc, memory, bandwidth = _GPU[model]
  return _HOPPER.format(name=desc, memory=memory, bandwidth=bandwidth)


def devices(target: Target) -> list[Any]:
  """The target's devices for ahead-of-time compilation (no accelerator needed)."""
  import os
  from jax.experimental import topologies
  # describing a slice owns no TPU: several processes (tests, a plan beside a run) may load libtpu at once
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    if target.platform == "tpu":
      kw = {"chips_per_host_bounds": [1, 1, 1]} if target.chips == 1 else {}  # a single-chip host
      topo = topologies.get_topology_desc(topology_name=target.topology, platform="tpu", **kw)
    else:
      topo = topologies.get_topology_desc(platform="cuda", topology=target.topology,
                                          target_config=gpu_target_config(target))
  except Exception as e:  # noqa: BLE001 - missing compiler plugins surface here
    plugin = "libtpu (pip install 'jax[tpu]')" if target.platform == "tpu" else \
        "jax-cuda12-plugin and nvidia-cuda-nvcc-cu12"
    raise CotsafeError(f"plan: cannot describe {target.name} ({target.topology}): "
                       f"{str(e).splitlines()[0] if str(e) else type(e).__name__}; needs {plugin}") from None
  devs = list(topo.devices)
  if len(devs) != target.chips:
    raise CotsafeError(f"plan: {target.name} ({target.topology}) has {len(devs)} devices, expected {target.chips}")
  return devs
