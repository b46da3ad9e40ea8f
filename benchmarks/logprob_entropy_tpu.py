"""The fused log-prob + entropy compiled for one TPU chip (libtpu, no TPU needed; not timed): forward + backward
temporaries per chip of the naive op (materialised logits), the chunked xla path and the Mosaic kernel, side by side.

  JAX_PLATFORMS=cpu python benchmarks/logprob_entropy_tpu.py [--chip v5p] [--shapes 16384,3584,152064]

Forward + backward is d/dh, d/dW of sum(logp) + sum(entropy), h bf16 [T, D], W [D, V] in --w_dtype, targets [T],
on one chip (T tokens on that chip). The Pallas kernel sizes its blocks and VMEM limit for the chip
(kernels.pallas_tpu.fit_blocks); the blocks used are printed. Goal (issue 18): at (16384, 3584, 152064) bf16 on
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
from cotsafe_jax.kernels import logprob_entropy, pallas_tpu  # noqa: E402
from cotsafe_jax.parallel.mesh import MESH_AXES  # noqa: E402
from cotsafe_jax.plan import planner  # noqa: E402

TOPOLOGIES = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}
GIB = 1024**3


def compile_temps(chip: str, impl: str, t: int, d: int, v: int, w_dtype) -> int:
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  device = topologies.get_topology_desc(topology_name=TOPOLOGIES[chip], platform="tpu").devices[0]
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
  ap.add_argument("--chip", default="v5p", choices=sorted(TOPOLOGIES))
  ap.add_argument("--shapes", default="16384,3584,152064", help="T,D,V;T,D,V;...")
  ap.add_argument("--w_dtype", default="bfloat16", choices=("bfloat16", "float32"))
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  w_dtype = jnp.dtype(args.w_dtype)
  rows = []
  for shape in args.shapes.split(";"):
    t, d, v = map(int, shape.split(","))
    temps = {impl: compile_temps(args.chip, impl, t, d, v, w_dtype) for impl in ("naive", "xla", "pallas_tpu")}
    bt, bv, limit = pallas_tpu.fit_blocks(pallas_tpu.CHIPS[args.chip], t, d, v, jnp.bfloat16, w_dtype, where="bench")
    rows.append({"T": t, "D": d, "V": v, "temp_bytes": temps, "pallas_blocks": [bt, bv], "vmem_limit_bytes": limit,
                 "pallas_over_naive": temps["pallas_tpu"] / temps["naive"]})
  print(f"fused op fwd+bwd on one {args.chip} chip, h bf16, W {args.w_dtype}: compiled temporaries (GiB)")
  print("| T | D | V | naive | xla | pallas_tpu | pallas / naive | pallas blocks | VMEM limit (MiB) |")
  print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
  for r in rows:
    tb = r["temp_bytes"]
    print(f"| {r['T']} | {r['D']} | {r['V']} | {tb['naive'] / GIB:.3f} | {tb['xla'] / GIB:.3f} | "
          f"{tb['pallas_tpu'] / GIB:.3f} | {r['pallas_over_naive']:.5f} | "
          f"{tuple(r['pallas_blocks'])} | {r['vmem_limit_bytes'] >> 20} |")
  _common.write_json({"chip": args.chip, "w_dtype": args.w_dtype, "jax": jax.__version__, "rows": rows}, args.out,
                     f"logprob_entropy_{args.chip}.json")


if __name__ == "__main__":
  main()
