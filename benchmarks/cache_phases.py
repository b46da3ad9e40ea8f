"""Long generations: rollout.generate with the decode split into cache phases vs one loop over the full cache.

Run: python benchmarks/cache_phases.py [--batch 16 --prompt 64 --new 128,1024 --phases 1,2,4 --rounds 3]
The generate.py model (Qwen2-style, 4 layers, d_model 512, 8 / 2 heads, MLP 1536, vocab 32000, float32;
random weights from models.init_params) samples at temperature 1 with no stop token, so every call emits
batch x new tokens. For each --new, every --phases value is timed in alternating rounds in one process:
tokens/s of the median round, and the compile time (first call minus the second). One phase is a single
while loop whose steps attend over all prompt + new - 1 cache slots; with k phases each loop's cache ends
at its own last step.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import _common  # benchmarks/_common.py

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--prompt", type=int, default=64)
  p.add_argument("--new", default="128,1024", help="comma-separated max_new_tokens values")
  p.add_argument("--phases", default="1,2,4", help="comma-separated cache_phases values")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--out", default=None, help="JSON path (default benchmarks/cache_phases_cpu.json)")
  args = p.parse_args()

  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import numpy as np

  from cotsafe_jax import models, rollout
  from cotsafe_jax.rollout import sampler

  cfg = models.tiny_config("qwen2", vocab_size=32000, hidden_size=512, intermediate_size=1536, num_layers=4,
                           num_heads=8, num_kv_heads=2, max_position_embeddings=4096)
  params = models.init_params(cfg, jax.random.key(0))
  b = args.batch
  prompt = np.random.RandomState(0).randint(1, 32000, (b, args.prompt)).astype(np.int32)
  mask = np.ones_like(prompt, bool)
  phases_list = [int(x) for x in args.phases.split(",")]
  calls = iter(range(10**6))

  def run(n, phases):
    out = rollout.generate(cfg, params, prompt, mask, rng=jax.random.key(next(calls)), max_new_tokens=n,
                           temperature=1.0, buckets=(args.prompt,), cache_phases=phases)
    jax.block_until_ready(out)
    assert int(np.asarray(out.mask_bt).sum()) == b * n

  def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0

  result = {"machine": _common.describe(), "jax": jax.__version__, "load_avg_start": os.getloadavg(),
            "model": "Qwen2, 4 layers, d_model 512, 8 heads / 2 kv heads, mlp 1536, vocab 32000, float32",
            "batch": b, "prompt_len": args.prompt, "sampling": "temperature 1, no top-k/top-p, no stop",
            "results": []}
  for n in (int(x) for x in args.new.split(",")):
    compile_s = {}
    for phases in phases_list:
      first = timed(lambda: run(n, phases))
      compile_s[phases] = first - timed(lambda: run(n, phases))
    times = {phases: [] for phases in phases_list}
    for _ in range(args.rounds):
      for phases in phases_list:
        times[phases].append(timed(lambda: run(n, phases)))
    for phases in phases_list:
      med = statistics.median(times[phases])
      row = {"new_tokens": n, "cache_phases": phases,
             "phase_ends": sampler.phase_ends(n, phases), "tokens_per_s": b * n / med,
             "speedup_vs_1_phase": statistics.median(times[phases_list[0]]) / med if phases_list[0] == 1 else None,
             "compile_s": compile_s[phases], "round_s": times[phases]}
      result["results"].append(row)
      print(f"new {n:5d}  phases {phases}  {row['tokens_per_s']:7.1f} tokens/s  compile {row['compile_s']:.1f} s",
            flush=True)
  result["load_avg_end"] = os.getloadavg()

  print(f"\n{result['machine']}; load average {result['load_avg_start'][0]:.1f} -> "
        f"{result['load_avg_end'][0]:.1f}; batch {b}, prompt {args.prompt}")
  print("| new tokens | cache phases | tokens/s | vs 1 phase | compile s |\n|---|---|---|---|---|")
  for r in result["results"]:
    speedup = f"{r['speedup_vs_1_phase']:.2f}x" if r["speedup_vs_1_phase"] else "-"
    print(f"| {r['new_tokens']} | {r['cache_phases']} | {r['tokens_per_s']:.0f} | {speedup} | {r['compile_s']:.1f} |")
  _common.write_json(result, args.out, "cache_phases_cpu.json")


if __name__ == "__main__":
  main()
