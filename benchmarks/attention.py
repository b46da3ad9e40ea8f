"""Attention at long context, compiled for the targets (not timed): per-device temporaries of the score (forward)
and training (forward + backward) programs, and the [T, S] buffers left in the compiled program, per attention.

  JAX_PLATFORMS=cpu python benchmarks/attention.py [--targets v5p-64 8xH200] [--length 16384] [--layers 2]

The model has R1-Distill-Qwen-7B's layer shapes (D 3584, 28 heads over 4 kv heads of 128, MLP 18944; bf16 compute,
float32 params, remat full) with `--layers` layers: attention's memory is per layer, and a few layers compile in
minutes where 28 take much longer (the whole 7B update is the plan's, benchmarks/plans/). One row per chip, the
batch over fsdp. Side by side in one run: "dense" (the [T, S] float32 softmax), "chunked" (flash attention in
plain JAX, what a CPU runs), and "auto" (splash on TPU, cuDNN on GPU). A compile that runs out of HBM is reported
with the bytes the compiler asked for. Needs the targets' compilers: pip install -e '.[plan]'.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

import _common  # benchmarks/_common.py

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cotsafe_jax import models, parallel  # noqa: E402
from cotsafe_jax.plan import planner, targets  # noqa: E402

GIB = 1024**3


def model(layers: int, impl: str) -> models.ModelConfig:
  return models.ModelConfig(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                            num_layers=layers, num_heads=28, num_kv_heads=4, head_dim=128, qkv_bias=True,
                            dtype=jnp.bfloat16, param_dtype=jnp.float32, remat="full", attention=impl)


def square_buffers(text: str, t: int) -> list[str]:
  """Distinct array shapes in compiled HLO text with two dims of size t: [T, S] scores, bias or probabilities."""
  shapes = {s for s in re.findall(r"[a-z0-9]+\[([0-9,]+)\]", text) if s.split(",").count(str(t)) >= 2}
  return sorted(shapes)


def kernels(text: str) -> list[str]:
  """The attention kernels' custom calls in compiled HLO text (Mosaic's tpu_custom_call, cuDNN's fused attention)."""
  targets_ = set(re.findall(r'custom_call_target="([^"]+)"', text))
  return sorted(t for t in targets_ if "tpu_custom_call" in t or "cudnn" in t.lower())


def compile_one(cfg, mesh, rows: int, length: int, program: str) -> dict:
  params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        models.param_shapes(cfg), models.param_shardings(cfg, mesh))
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  tokens = jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=batch)
  mask = jax.ShapeDtypeStruct((rows, length), jnp.bool_, sharding=batch)

  def score(p, t, m):
    return models.hidden_states(cfg, p, t, attention_mask_bt=m)

  def train(p, t, m):
    return jax.grad(lambda p: jnp.mean(score(p, t, m).astype(jnp.float32) ** 2))(p)

  fn = {"score": score, "train": train}[program]
  t0 = time.perf_counter()
  try:
    with jax.set_mesh(mesh):
      compiled, _ = planner.compile_program(program, jax.jit(fn), (params, tokens, mask))
  except Exception as e:  # noqa: BLE001 - an out-of-memory compile is a result
    found = planner._oom_bytes(str(e))
    if found is None:
      raise
    return {"fits": False, "temp_gib": found[0] / GIB if found[1] == "temporaries" else None,
            "needed_gib": found[0] / GIB, "square_buffers": None, "compile_s": round(time.perf_counter() - t0, 1),
            "error": next(l for l in str(e).splitlines() if l.strip())[:300]}
  ma = compiled.memory_analysis()
  text = compiled.as_text()
  return {"fits": True, "temp_gib": ma.temp_size_in_bytes / GIB, "argument_gib": ma.argument_size_in_bytes / GIB,
          "square_buffers": square_buffers(text, length), "kernels": kernels(text),
          "compile_s": round(time.perf_counter() - t0, 1)}


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--targets", nargs="+", default=["v5p-64", "8xH200"])
  ap.add_argument("--length", type=int, default=16384)
  ap.add_argument("--layers", type=int, default=2)
  ap.add_argument("--impls", nargs="+", default=["dense", "chunked", "auto"])
  ap.add_argument("--programs", nargs="+", default=["score", "train"])
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  rows_out = []
  for name in args.targets:
    target = targets.parse_target(name)
    mesh = parallel.make_mesh(devices=targets.devices(target))
    for impl in args.impls:
      cfg = model(args.layers, impl)
      for program in args.programs:
        r = compile_one(cfg, mesh, target.chips, args.length, program)
        r.update(target=name, impl=impl, program=program)
        rows_out.append(r)
        print(f"{name} {impl} {program}: {r}", flush=True)
  print(f"\n{args.layers} layers of R1-Distill-Qwen-7B, 1 row of {args.length} tokens per chip, bf16, remat full\n")
  print("| target | attention | program | temporaries GiB per chip | [T, S] buffers in the program | kernels | "
        "compile s |")
  print("| --- | --- | --- | ---: | --- | --- | ---: |")
  for r in rows_out:
    temp = f"{r['temp_gib']:.2f}" if r["fits"] else f"does not compile: asks {r['needed_gib']:.1f}"
    square = "-" if r["square_buffers"] is None else (", ".join(f"[{s}]" for s in r["square_buffers"]) or "none")
    kern = ", ".join(r.get("kernels") or []) or "-"
    print(f"| {r['target']} | {r['impl']} | {r['program']} | {temp} | {square} | {kern} | {r['compile_s']} |")
  _common.write_json({"length": args.length, "layers": args.layers, "jax": jax.__version__, "rows": rows_out},
                     args.out, "attention.json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
