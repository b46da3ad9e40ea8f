"""Decode-step matmul speed against the size of the weights it cycles through (CPU cache capacity).

Run: python benchmarks/matmul_working_set.py [--rows 16 --block_mb 16 --max_mb 224 --out FILE.json]
A decode step multiplies --rows hidden vectors by every weight matrix once. Here --rows x 512 activations
multiply [V, 512] float32 blocks of --block_mb each, cycling through n blocks, so the weights touched between
two reads of the same block grow with n. When they no longer fit the part of the last-level cache this
process gets, each block comes from DRAM. Two forms of the same product, timed side by side: "bv" = [B, D] x
[V, D]^T -> [B, V] (the sampler's unembedding on CPU) and "vb" = [V, D] x [B, D]^T -> [V, B] (the weights as
the left operand). The table gives ms per block and weight GB/s of each at each working-set size, next to the
working set of the benchmarks/generate.py decode loop.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import _common  # benchmarks/_common.py


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rows", type=int, default=16)
  p.add_argument("--block_mb", type=int, default=16)
  p.add_argument("--max_mb", type=int, default=224)
  p.add_argument("--out", default=None, help="JSON path (default benchmarks/matmul_working_set_cpu.json)")
  args = p.parse_args()

  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import jax.numpy as jnp
  import numpy as np

  d = 512
  v = args.block_mb * 2**20 // (4 * d)
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.standard_normal((args.rows, d), dtype=np.float32))
  forms = {"bv": jax.jit(lambda h, w: jnp.einsum("bd,vd->bv", h, w)),
           "vb": jax.jit(lambda h, w: jnp.einsum("vd,bd->vb", w, h))}
  n_max = args.max_mb // args.block_mb
  blocks = [jnp.asarray(rng.standard_normal((v, d), dtype=np.float32)) for _ in range(n_max)]
  block_bytes = v * d * 4

  # the generate.py decode loop: 4 layers of (q, k, v, o, gate, up, down) + a [32000, 512] unembedding + KV cache
  layer = 512 * (512 + 2 * 128 + 512) + 3 * 512 * 1536
  loop_weights = 4 * (4 * layer) + 4 * 32000 * 512
  loop_kv = 4 * 2 * 16 * 2 * 64 * (64 + 127) * 4

  sizes = sorted({1, 2, 3, 4, 5, 6, 7, 8, 10, 12, n_max} & set(range(1, n_max + 1)))
  def ms_per_block(product, ws):
    for w in ws:
      product(h, w).block_until_ready()
    per_block = []
    for _ in range(max(5, 96 // len(ws))):
      t0 = time.perf_counter()
      for w in ws:
        out = product(h, w)
      out.block_until_ready()
      per_block.append((time.perf_counter() - t0) / len(ws))
    return 1e3 * statistics.median(per_block)

  rows = []
  for n in sizes:
    row = {"working_set_mb": n * block_bytes / 2**20, "blocks": n}
    for name, product in forms.items():
      ms = ms_per_block(product, blocks[:n])
      row[name] = {"ms_per_block": ms, "weight_gb_per_s": block_bytes / ms / 1e6,
                   "gflop_per_s": 2 * args.rows * v * d / ms / 1e6}
    rows.append(row)
    print(f"{row['working_set_mb']:6.0f} MiB  " + "  ".join(
        f"{name} {row[name]['ms_per_block']:6.3f} ms ({row[name]['weight_gb_per_s']:4.1f} GB/s)" for name in forms),
        flush=True)

  result = {"machine": _common.describe(), "jax": jax.__version__, "rows": args.rows, "block_shape": [v, d],
            "load_avg": os.getloadavg(), "generate_loop_weights_mb": loop_weights / 2**20,
            "generate_loop_kv_cache_mb": loop_kv / 2**20, "results": rows}
  print(f"\n{result['machine']}; load average {result['load_avg'][0]:.1f}; {args.rows} rows x [{v}, {d}] float32 "
        f"blocks of {block_bytes / 2**20:.0f} MiB")
  print("| weights cycled (MiB) | bv ms / block | bv GB/s | vb ms / block | vb GB/s |\n|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['working_set_mb']:.0f} | {r['bv']['ms_per_block']:.3f} | {r['bv']['weight_gb_per_s']:.1f} | "
          f"{r['vb']['ms_per_block']:.3f} | {r['vb']['weight_gb_per_s']:.1f} |")
  print(f"generate.py's decode loop reads {loop_weights / 2**20:.0f} MiB of weights and up to "
        f"{loop_kv / 2**20:.1f} MiB of KV cache per step")
  _common.write_json(result, args.out, "matmul_working_set_cpu.json")


if __name__ == "__main__":
  main()
