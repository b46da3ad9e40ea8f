"""The fused log-prob + entropy compiled for one TPU chip (libtpu) or one NVIDIA GPU (CUDA plugin, deviceless; no
accelerator needed; not timed): forward + backward temporaries per chip of the naive op (materialised logits), the
chunked xla path and the chip's Pallas kernel (Mosaic on TPU, Triton on GPU), side by side.

  JAX_PLATFORMS=cpu python benchmarks/logprob_entropy_tpu.py [--chip v5p] [--shapes 16384,3584,152064]
  JAX_PLATFORMS=cpu python benchmarks/logprob_entropy_tpu.py --chip h100 --shapes "4096,1536,151936;4096,4096,128256"

Forward + backward is d/dh, d/dW of sum(logp) + sum(entropy), h bf16 [T, D], W [D, V] in --w_dtype, targets [T],
on one chip (T tokens on that chip). The Mosaic kernel sizes its blocks and VMEM limit for the chip
(kernels.pallas_tpu.fit_blocks); the blocks used are printed. The Triton kernel runs its backward in vocabulary
chunks (kernels.pallas_gpu.chunk_cols); the chunk is printed. Goal (issue 18): at (16384, 3584, 152064) bf16 on
v5p the kernel's temporaries <= 1/50 of the naive op's. Writes benchmarks/logprob_entropy_<chip>.json.
"""
from __future__ import annotations

import argparse
import os
import sys

import _common  # benchmarks/_common.py

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cotsafe_jax.kernels import logprob_entropy, pallas_gpu, pallas_tpu  # noqa: E402
from cotsafe_jax.parallel.mesh import MESH_AXES  # noqa: E402
from cotsafe_jax.plan import planner, targets  # noqa: E402

TOPOLOGIES = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}
GPUS = {"h100": "1xH100", "h200": "1xH200"}
GIB = 1024**3


def device_of(chip: str):
  if chip in GPUS:
    return targets.devices(targets.parse_target(GPUS[chip]))[0]
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  return topologies.get_topology_desc(topology_name=TOPOLOGIES[chip], platform="tpu").devices[0]


def compile_temps(chip: str, impl: str, t: int, d: int, v: int, w_dtype) -> int:
  device = device_of(chip)
  mesh = Mesh(np.array([device]).reshape(1, 1, 1), MESH_AXES)
  s = NamedSharding(mesh, P())

  def loss(h, w, y):
    logp, ent = logprob_entropy(h, w, y, impl=impl, mesh=mesh)
    return logp.sum() + ent.sum()

  args = (jax.ShapeDtypeStruct((t, d), jnp.bfloat16, sharding=s), jax.ShapeDtypeStruct((d, v), w_dtype, sharding=s),
          jax.ShapeDtypeStruct((t,), jnp.int32, sharding=s))
  compiled, _ = planner.compile_program("fused op", jax.jit(jax.grad(loss, argnums=(0, 1))), args)
  return int(compiled.memory_analysis().temp_size_in_bytes)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--chip", default="v5p", choices=sorted(TOPOLOGIES) + sorted(GPUS))
  ap.add_argument("--shapes", default="16384,3584,152064", help="T,D,V;T,D,V;...")
  ap.add_argument("--w_dtype", default="bfloat16", choices=("bfloat16", "float32"))
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  w_dtype = jnp.dtype(args.w_dtype)
  kernel = "pallas_gpu" if args.chip in GPUS else "pallas_tpu"
  rows = []
  for shape in args.shapes.split(";"):
    t, d, v = map(int, shape.split(","))
    temps = {impl: compile_temps(args.chip, impl, t, d, v, w_dtype) for impl in ("naive", "xla", kernel)}
    if kernel == "pallas_tpu":
      bt, bv, limit = pallas_tpu.fit_blocks(pallas_tpu.CHIPS[args.chip], t, d, v, jnp.bfloat16, w_dtype,
                                            where="bench")
      sizing = {"pallas_blocks": [bt, bv], "vmem_limit_bytes": limit}
      how = f"blocks {(bt, bv)}, VMEM limit {limit >> 20} MiB"
    else:
      cols = pallas_gpu.chunk_cols(t, d, v, pallas_gpu.BLOCKS[1], jnp.promote_types(jnp.bfloat16, w_dtype))
      sizing = {"pallas_blocks": list(pallas_gpu.BLOCKS), "backward_chunk_cols": cols}
      how = f"blocks {pallas_gpu.BLOCKS}, backward chunks of {cols} columns"
    rows.append({"T": t, "D": d, "V": v, "temp_bytes": temps, **sizing, "kernel": kernel, "sizing": how,
                 "pallas_over_naive": temps[kernel] / temps["naive"]})
  print(f"fused op fwd+bwd on one {args.chip} chip, h bf16, W {args.w_dtype}: compiled temporaries (GiB)")
  print(f"| T | D | V | naive | xla | {kernel} | {kernel} / naive | sizing |")
  print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
  for r in rows:
    tb = r["temp_bytes"]
    print(f"| {r['T']} | {r['D']} | {r['V']} | {tb['naive'] / GIB:.3f} | {tb['xla'] / GIB:.3f} | "
          f"{tb[kernel] / GIB:.3f} | {r['pallas_over_naive']:.5f} | {r['sizing']} |")
  _common.write_json({"chip": args.chip, "w_dtype": args.w_dtype, "jax": jax.__version__, "rows": rows}, args.out,
                     f"logprob_entropy_{args.chip}.json")


if __name__ == "__main__":
  main()
