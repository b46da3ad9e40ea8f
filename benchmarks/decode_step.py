"""One sampler decode step compiled for a TPU slice (not timed): bytes the step accesses per chip (the compiler's
cost analysis) against the bytes it must read (its weights and the KV cache), before and after the decode layout.

  JAX_PLATFORMS=cpu python benchmarks/decode_step.py [--target v5p-64] [--slots 16384] [--rows-per-chip 1 8]

A decode step is memory-bound: each one reads every weight and the filled KV cache once, so bytes accessed over
(weights + KV cache) is how close it runs to the floor (goal: <= 1.2). The step is what the sampler's loop body
runs: `decode.decode_step` over a one-segment cache of `--slots` slots (all filled: the last step of a
16k-token rollout) and the draw (temperature 1, top-p 0.95), the cache donated (written in place).
- "before": the weights as the sampler read them before the decode layout: per-layer float32 slices of the training
  params, split over fsdp (each step all-gathers them and casts them to bf16); attention in XLA.
- "layout": `decode.decode_params` (once per rollout): bf16, whole on data x fsdp, split over tensor only; attention
  in XLA (float32 scores [rows, heads, S] written and read back per layer).
- "layout + kernel": the same weights, attention by `kernels.decode_attention` (what the sampler runs on TPU now:
  the cache streamed through VMEM with an online softmax, no scores in HBM).
The model is R1-Distill-Qwen-7B (28 layers, D 3584, 28 heads over 4 kv heads of 128, V 152064), bf16 compute.
Needs the target's compiler: pip install -e '.[plan]'.
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cotsafe_jax import models, parallel  # noqa: E402
from cotsafe_jax.parallel import mesh as mesh_lib  # noqa: E402
from cotsafe_jax.plan import planner, targets  # noqa: E402
from cotsafe_jax.rollout import decode, sampler  # noqa: E402

GIB = 1024**3


def model(layers: int) -> models.ModelConfig:
  return models.ModelConfig(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                            num_layers=layers, num_heads=28, num_kv_heads=4, head_dim=128, qkv_bias=True,
                            dtype=jnp.bfloat16, param_dtype=jnp.float32)


def _sds(shape, dtype, sharding):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def weights_before(cfg, mesh) -> decode.DecodeParams:
  """The sampler's weights before the decode layout: per-layer slices of the float32 params on their training
  (fsdp) shardings."""
  axes, shapes = models.param_logical_axes(cfg), models.param_shapes(cfg)
  w = {k: jax.tree.map(lambda a, s: _sds(s.shape, s.dtype, parallel.logical_sharding(mesh, a, s.shape)), axes[k],
                      shapes[k], is_leaf=mesh_lib.is_axes)
       for k in shapes if k != "layers"}
  layer = jax.tree.map(lambda a, s: _sds(s.shape[1:], s.dtype, parallel.logical_sharding(mesh, a[1:], s.shape[1:])),
                       axes["layers"], shapes["layers"], is_leaf=mesh_lib.is_axes)
  w["layers"] = [layer] * cfg.num_layers
  return decode.DecodeParams(w)


def cache_args(cfg, mesh, rows: int, slots: int) -> dict:
  k_shape, v_shape = models.cache_shapes(cfg, rows, slots)
  k_sh, v_sh = (parallel.logical_sharding(mesh, a[1:], s[1:]) for a, s in zip(models.KV_CACHE_AXES,
                                                                             (k_shape, v_shape)))
  batch = parallel.batch_sharding(mesh, 1, (rows,))
  return {"kv": [[(_sds(k_shape[1:], cfg.dtype, k_sh), _sds(v_shape[1:], cfg.dtype, v_sh))]
                 for _ in range(cfg.num_layers)],
          "mask": [_sds((rows, slots), jnp.bool_, parallel.batch_sharding(mesh, 2, (rows, slots)))],
          "pos_b": _sds((rows,), jnp.int32, batch), "index": _sds((), jnp.int32, parallel.replicated(mesh))}


def compile_step(cfg, mesh, weights, cache, rows: int) -> dict:
  s = sampler._Sampling(temperature=1.0, top_k=0, top_p=0.95, eos_ids=(), pad_id=0, return_entropy=False)

  def step(w, tok_b, cache, u_b):
    logits_bv, cache = decode.decode_step(cfg, w, tok_b, cache)
    tok_b, logp_b, _ = sampler._sample(logits_bv, u_b, s)
    return tok_b, logp_b, cache

  batch = parallel.batch_sharding(mesh, 1, (rows,))
  args = (weights, _sds((rows,), jnp.int32, batch), cache, _sds((rows,), jnp.float32, batch))
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = jax.jit(step, donate_argnums=(2,)).lower(*args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  text = compiled.as_text()
  ma = compiled.memory_analysis()
  return {"bytes_accessed": float(cost["bytes accessed"]), "temp_bytes": ma.temp_size_in_bytes,
          "all_gathers": len(re.findall(r"= [^=]*all-gather(?:-start)?\(", text)),
          "compile_s": round(time.perf_counter() - t0, 1)}


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--target", default="v5p-64")
  ap.add_argument("--slots", type=int, default=16384)
  ap.add_argument("--rows-per-chip", type=int, nargs="+", default=[1, 8])
  ap.add_argument("--layers", type=int, default=28)
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  target = targets.parse_target(args.target)
  mesh = parallel.make_mesh(devices=targets.devices(target))
  cfg = model(args.layers)
  after = decode.abstract_decode_params(cfg, mesh)
  before = weights_before(cfg, mesh)
  out_rows = []
  for per_chip in args.rows_per_chip:
    rows = per_chip * mesh.shape["data"] * mesh.shape["fsdp"]
    cache = cache_args(cfg, mesh, rows, args.slots)
    kv = planner.count_bytes(cache["kv"])
    for name, weights, attention in (("before", before, "chunked"), ("layout", after, "chunked"),
                                     ("layout + kernel", after, "auto")):
      r = compile_step(cfg.replace(attention=attention), mesh, weights, cache, rows)
      w = planner.count_bytes(after)  # the floor reads the weights once, in bf16
      embed = planner.count_bytes(after.weights["embed"])  # a step gathers B of its rows, not the whole table
      r.update(layout=name, rows_per_chip=per_chip, weight_bytes=w, kv_bytes=kv, embed_bytes=embed,
               read_bytes_argument=planner.count_bytes(weights), ratio=r["bytes_accessed"] / (w + kv),
               ratio_without_embedding=r["bytes_accessed"] / (w - embed + kv))
      out_rows.append(r)
      print(f"{name} {per_chip} row(s)/chip: {r}", flush=True)
  print(f"\nR1-Distill-Qwen-7B ({args.layers} layers) decode step on {args.target} ({mesh.size} chips, mesh "
        f"{dict(mesh.shape)}), {args.slots} cache slots, bf16; per chip\n")
  print("| rows / chip | step | bytes accessed GiB | weights (bf16) + KV GiB | ratio | ratio without the embedding "
        "table | all-gathers | temporaries GiB |")
  print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
  for r in out_rows:
    print(f"| {r['rows_per_chip']} | {r['layout']} | {r['bytes_accessed'] / GIB:.2f} | "
          f"{(r['weight_bytes'] + r['kv_bytes']) / GIB:.2f} | {r['ratio']:.2f} | {r['ratio_without_embedding']:.2f} | "
          f"{r['all_gathers']} | {r['temp_bytes'] / GIB:.2f} |")
  _common.write_json({"target": args.target, "slots": args.slots, "layers": args.layers, "jax": jax.__version__,
                      "mesh": {k: int(v) for k, v in mesh.shape.items()}, "rows": out_rows},
                     args.out, f"decode_step_{args.target.replace('-', '_')}.json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
