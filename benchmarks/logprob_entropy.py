"""Speed and memory of kernels.logprob_entropy: naive (materialised logits) vs xla vs Pallas kernels.

Run: python benchmarks/logprob_entropy.py [--impl naive,xla] [--dtype float32] [--out FILE.json]
On a GPU: python benchmarks/logprob_entropy.py --impl naive,xla,pallas_gpu --dtype bfloat16
Times are medians of --reps runs after a warm-up; temporary memory comes from
jax.jit(f).lower(...).compile().memory_analysis(). Prints a markdown table and writes JSON.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import _common  # benchmarks/_common.py

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cotsafe_jax.kernels import logprob_entropy  # noqa: E402

SHAPES = ((2048, 256, 32768), (4096, 256, 32768), (4096, 512, 152064))
# A Pallas kernel is only benchmarked compiled, on its own platform (interpret mode is a test aid).
_PALLAS_PLATFORM = {"pallas_tpu": "tpu", "pallas_gpu": "gpu"}


def _available_gib() -> float:
  try:
    with open("/proc/meminfo") as f:
      kib = next(int(l.split()[1]) for l in f if l.startswith("MemAvailable:"))
    return kib / 2**20
  except (OSError, StopIteration, ValueError):
    return 16.0


def _median_seconds(fn, args, reps: int) -> float:
  jax.block_until_ready(fn(*args))  # warm-up (compiled already)
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _matmul_rate(dtype, size: int, reps: int) -> float:
  """Achieved FLOP/s of a square matmul in `dtype`: the rate the 8TDV figure is divided by."""
  k1, k2 = jax.random.split(jax.random.key(1))
  a = jax.random.normal(k1, (size, size), dtype)
  b = jax.random.normal(k2, (size, size), dtype)
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  return 2 * size**3 / _median_seconds(f, (a, b), reps)


def _inputs(t: int, d: int, v: int, dtype):
  ks = jax.random.split(jax.random.key(0), 5)
  h = jax.random.normal(ks[0], (t, d), jnp.float32).astype(dtype)
  w = (jax.random.normal(ks[1], (d, v), jnp.float32) / np.sqrt(d)).astype(dtype)
  y = jax.random.randint(ks[2], (t,), 0, v, jnp.int32)
  g_logp = jax.random.normal(ks[3], (t,), jnp.float32)
  g_ent = jax.random.normal(ks[4], (t,), jnp.float32)
  return h, w, y, g_logp, g_ent


def _fns(impl: str, temperature: float, block_t, block_v):
  kw = dict(temperature=temperature, impl=impl, block_t=block_t, block_v=block_v)

  def fwd(h, w, y):
    return logprob_entropy(h, w, y, **kw)

  def fwd_bwd(h, w, y, g_logp, g_ent):
    (logp, ent), vjp = jax.vjp(lambda h, w: logprob_entropy(h, w, y, **kw), h, w)
    return (logp, ent, *vjp((g_logp, g_ent)))

  return jax.jit(fwd), jax.jit(fwd_bwd)


def _compile(fn, args):
  compiled = fn.lower(*args).compile()
  mem = compiled.memory_analysis()
  return compiled, {"temp_bytes": int(mem.temp_size_in_bytes),
                    "arg_bytes": int(mem.argument_size_in_bytes),
                    "out_bytes": int(mem.output_size_in_bytes), "seconds": None}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--impl", default="naive,xla,pallas_tpu,pallas_gpu",
                 help="comma-separated; Pallas kernels off their platform are listed as not run")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--shapes", default=";".join(",".join(map(str, s)) for s in SHAPES),
                 help="T,D,V;T,D,V;...")
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--block_t", type=int, default=None)
  p.add_argument("--block_v", type=int, default=None)
  p.add_argument("--max_run_gib", type=float, default=None,
                 help="compile-only (memory, no timing) when args + outputs + temps exceed this "
                      "(default: 60%% of MemAvailable on CPU, so a shared machine is not pushed "
                      "into the OOM killer)")
  p.add_argument("--matmul_size", type=int, default=None, help="square matmul for the rate")
  p.add_argument("--out", default=None, help="JSON path (default benchmarks/logprob_entropy_<backend>.json)")
  args = p.parse_args(argv)

  dtype = jnp.dtype(args.dtype)
  backend = jax.default_backend()
  if args.max_run_gib is None:
    args.max_run_gib = 0.6 * _available_gib() if backend == "cpu" else float("inf")
  shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";") if s]
  impls = [i for i in args.impl.split(",") if i]
  rate = _matmul_rate(dtype, args.matmul_size or (2048 if backend == "cpu" else 8192), args.reps)
  result = {"machine": _common.describe(), "backend": backend, "jax": jax.__version__,
            "dtype": args.dtype, "temperature": args.temperature, "reps": args.reps,
            "max_run_gib": args.max_run_gib, "load_average_at_start": os.getloadavg(),
            "matmul_flops_per_s": rate, "rows": []}
  print(f"# {result['machine']}  jax {jax.__version__}  dtype {args.dtype}  "
        f"matmul {rate / 1e12:.3f} TFLOP/s  load average {os.getloadavg()[0]:.1f}", flush=True)
  header = ("| T | D | V | impl | fwd s | fwd temp MiB | fwd+bwd s | fwd+bwd temp MiB | "
            "8TDV / rate s | note |")
  print(header + "\n|" + "---|" * 10, flush=True)
  for t, d, v in shapes:
    h, w, y, g_logp, g_ent = _inputs(t, d, v, dtype)
    for impl in impls:
      row = {"T": t, "D": d, "V": v, "impl": impl, "flops_8tdv": 8 * t * d * v}
      plat = _PALLAS_PLATFORM.get(impl)
      if plat is not None and plat != backend:
        row["note"] = f"not compiled: needs {plat} (CPU runs Pallas only in interpret mode)"
      else:
        bt, bv = (args.block_t, args.block_v) if impl != "naive" else (None, None)
        fwd, fwd_bwd = _fns(impl, args.temperature, bt, bv)
        for name, fn, fargs in (("fwd", fwd, (h, w, y)), ("fwd_bwd", fwd_bwd, (h, w, y, g_logp, g_ent))):
          compiled, mem = _compile(fn, fargs)
          total = mem["temp_bytes"] + mem["arg_bytes"] + mem["out_bytes"]
          if total <= args.max_run_gib * 2**30:
            mem["seconds"] = _median_seconds(compiled, fargs, args.reps)
          else:
            row["note"] = f"{name} not timed: needs {total / 2**30:.1f} GiB > --max_run_gib"
          row[name] = mem
      result["rows"].append(row)
      print(_table_row(row, rate), flush=True)
  _ratios(result)
  _common.write_json(result, args.out, f"logprob_entropy_{backend}_{args.dtype}.json")
  return result


def _fmt(x, scale=1.0, digits=3):
  return "-" if x is None else f"{x / scale:.{digits}f}"


def _table_row(row: dict, rate: float) -> str:
  f, fb = row.get("fwd", {}), row.get("fwd_bwd", {})
  mib = 2**20
  return (f"| {row['T']} | {row['D']} | {row['V']} | {row['impl']} | {_fmt(f.get('seconds'))} | "
          f"{_fmt(f.get('temp_bytes'), mib, 1)} | {_fmt(fb.get('seconds'))} | "
          f"{_fmt(fb.get('temp_bytes'), mib, 1)} | {_fmt(row['flops_8tdv'] / rate)} | "
          f"{row.get('note', '')} |")


def _ratios(result: dict) -> None:
  """xla / naive ratios of fwd+bwd temp memory and time, per shape (the CPU goals)."""
  by = {(r["T"], r["D"], r["V"], r["impl"]): r for r in result["rows"]}
  result["ratios"] = []
  for (t, d, v, impl), r in by.items():
    base = by.get((t, d, v, "naive"))
    if impl == "naive" or base is None or "fwd_bwd" not in r or "fwd_bwd" not in base:
      continue
    a, b = r["fwd_bwd"], base["fwd_bwd"]
    ratio = {"T": t, "D": d, "V": v, "impl": impl,
             "temp_ratio": a["temp_bytes"] / max(b["temp_bytes"], 1),
             "time_ratio": (a["seconds"] / b["seconds"]) if a["seconds"] and b["seconds"] else None}
    result["ratios"].append(ratio)
    print(f"{impl} / naive at ({t}, {d}, {v}): fwd+bwd temp x{ratio['temp_ratio']:.4f} "
          f"(1/{1 / ratio['temp_ratio']:.1f}), time x{_fmt(ratio['time_ratio'])}")


if __name__ == "__main__":
  main()
