"""The sampler's `generate` compiled for a TPU slice (not timed): per-chip temporaries at a few layer counts, with
the automatic compactions and without any, against the KV cache the program must hold.

  JAX_PLATFORMS=cpu python benchmarks/generate_layers.py [--target v5p-64] [--layers 2 4] [--new 15872]

R1-Distill-Qwen-7B's shapes with `--layers` layers (bf16), the 16k plan's batch (128 rows of 512 prompt tokens:
4 per chip on v5p-64), top-p 0.95, the cache phases as automatic. Per added layer the program must hold that
layer's KV cache; compaction halves each chip's rows on the chip, so the halved cache sits beside the old one for
a moment and nothing else should grow. (Before, a global selection gathered the halved batch's whole cache onto
every chip: benchmarks/README.md, generate_layers.) Needs the target's compiler: pip install -e '.[plan]'.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import _common  # benchmarks/_common.py
import decode_step  # benchmarks/decode_step.py: the 7B config

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cotsafe_jax import models, parallel  # noqa: E402
from cotsafe_jax.parallel import mesh as mesh_lib  # noqa: E402
from cotsafe_jax.plan import targets  # noqa: E402
from cotsafe_jax.rollout import decode, sampler  # noqa: E402

GIB = 1024**3


def compile_generate(cfg, mesh, rows: int, prompt: int, new: int, compactions: int | None) -> dict:
  program = sampler.generate_program(cfg, mesh, batch=rows, prompt_len=prompt, max_new_tokens=new, temperature=1.0,
                                     top_p=0.95, compactions=compactions)
  sh = parallel.batch_sharding(mesh, 2, (rows, prompt))
  args = (decode.abstract_decode_params(cfg, mesh), jax.ShapeDtypeStruct((rows, prompt), jnp.int32, sharding=sh),
          jax.ShapeDtypeStruct((rows, prompt), bool, sharding=sh),
          jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=parallel.replicated(mesh)))
  t0 = time.perf_counter()
  ma = program.lower(*args).compile().memory_analysis()
  return {"temp_bytes": ma.temp_size_in_bytes, "argument_bytes": ma.argument_size_in_bytes,
          "compile_s": round(time.perf_counter() - t0, 1)}


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--target", default="v5p-64")
  ap.add_argument("--layers", type=int, nargs="+", default=[2, 4])
  ap.add_argument("--rows", type=int, default=128)
  ap.add_argument("--prompt", type=int, default=512)
  ap.add_argument("--new", type=int, default=15872)
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  mesh = parallel.make_mesh(devices=targets.devices(targets.parse_target(args.target)))
  auto = sampler.auto_compactions(args.rows, mesh.shape["data"] * mesh.shape["fsdp"], mesh_lib.target_platform(mesh))
  rows_per_chip = args.rows // (mesh.shape["data"] * mesh.shape["fsdp"])
  out = []
  for layers in args.layers:
    cfg = decode_step.model(layers)
    k_shape, v_shape = models.cache_shapes(cfg, rows_per_chip, args.prompt + args.new - 1)
    kv = (math.prod(k_shape) + math.prod(v_shape)) * 2 // mesh.shape["tensor"]  # bf16; kv heads split over tensor
    for compactions in (0, auto):
      r = compile_generate(cfg, mesh, args.rows, args.prompt, args.new, compactions)
      r.update(layers=layers, compactions=compactions, kv_cache_bytes=kv)
      out.append(r)
      print(f"{layers} layers, compactions {compactions}: {r}", flush=True)
  print(f"\nR1-Distill-Qwen-7B shapes, generate on {args.target} (mesh {dict(mesh.shape)}), {args.rows} rows "
        f"({rows_per_chip} per chip) x ({args.prompt} + {args.new}) tokens, bf16; per chip\n")
  print("| layers | compactions | temporaries GiB | KV cache GiB | compile s |")
  print("| ---: | ---: | ---: | ---: | ---: |")
  for r in out:
    print(f"| {r['layers']} | {r['compactions']} | {r['temp_bytes'] / GIB:.3f} | {r['kv_cache_bytes'] / GIB:.3f} | "
          f"{r['compile_s']} |")
  for c in sorted({r["compactions"] for r in out}):
    rs = sorted((r for r in out if r["compactions"] == c), key=lambda r: r["layers"])
    if len(rs) > 1:
      per = (rs[-1]["temp_bytes"] - rs[0]["temp_bytes"]) / (rs[-1]["layers"] - rs[0]["layers"])
      cache = rs[0]["kv_cache_bytes"] / rs[0]["layers"]
      print(f"compactions {c}: +{per / GIB:.3f} GiB of temporaries per layer ({per / cache:.2f}x that layer's cache)")
  _common.write_json({"target": args.target, "jax": jax.__version__, "mesh": {k: int(v) for k, v in mesh.shape.items()},
                      "rows": args.rows, "prompt": args.prompt, "new": args.new, "results": out},
                     args.out, f"generate_layers_{args.target.replace('-', '_')}.json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
