"""Run the shipped `plan` files (gin/plan/*.gin) and collect their compiled per-device peaks in one table.

  JAX_PLATFORMS=cpu python benchmarks/plans.py [--only NAME ...]

Each plan runs as its own launcher process (python launch/tpu_run.py --gin_file=gin/plan/NAME.gin) into
benchmarks/plans/NAME/ (plan.json, config.gin, log.txt); a plan that does not fit still writes plan.json and
exits 2. Then benchmarks/plans/summary.json and the markdown table README's "Will it fit?" shows.
Needs the targets' compilers: pip install -e '.[plan]'. Hours of CPU on a 2-core host (7B programs compile in
minutes each).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "plans")
GIB = 1024**3


def run_plan(name: str) -> int:
  workdir = os.path.join(OUT, name)
  os.makedirs(workdir, exist_ok=True)
  cmd = [sys.executable, os.path.join(ROOT, "launch", "tpu_run.py"), f"--gin_file=gin/plan/{name}.gin",
         f"--workdir={workdir}"]
  t0 = time.time()
  with open(os.path.join(workdir, "log.txt"), "w") as log:
    rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                        env={**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}).returncode
  print(f"{name}: exit {rc} in {time.time() - t0:.0f} s", flush=True)
  return rc


def table(plans: dict[str, dict]) -> str:
  lines = ["| plan | target | mesh | rows x (prompt + completion) | largest peak (program) | GiB of HBM | % | fits (10% kept free) |",
           "| --- | --- | --- | --- | --- | ---: | ---: | --- |"]
  for name, p in plans.items():
    worst = max(p["programs"].values(), key=lambda x: x["peak_bytes"])
    run = p["run"]
    mesh = " x ".join(f"{k} {v}" for k, v in p["mesh"].items() if v > 1)
    lines.append(f"| {name} | {p['target']} | {mesh} | {run['rows_per_step']} x ({run['prompt_len']} + "
                 f"{run['completion_len']}) | {worst['peak_bytes'] / GIB:.1f} ({worst['name']}) | "
                 f"{p['hbm_bytes_per_device'] / GIB:.1f} | {100 * worst['peak_bytes'] / p['hbm_bytes_per_device']:.0f} | "
                 f"{'yes' if p['fits'] else 'no'} |")
  return "\n".join(lines)


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--only", nargs="*", help="plan names (gin/plan/NAME.gin); default: all")
  ap.add_argument("--collect", action="store_true", help="only rebuild the summary from existing plan.json files")
  args = ap.parse_args()
  names = args.only or sorted(os.path.basename(p)[:-4] for p in glob.glob(os.path.join(ROOT, "gin", "plan", "*.gin")))
  if not args.collect:
    for name in names:
      run_plan(name)
  plans = {}
  for path in sorted(glob.glob(os.path.join(OUT, "*", "plan.json"))):
    with open(path) as f:
      plans[os.path.basename(os.path.dirname(path))] = json.load(f)
  with open(os.path.join(OUT, "summary.json"), "w") as f:
    json.dump({name: {"target": p["target"], "fits": p["fits"], "peak_bytes": {k: v["peak_bytes"] for k, v in
                                                                              p["programs"].items()}}
               for name, p in plans.items()}, f, indent=2)
  print(table(plans))
  return 0


if __name__ == "__main__":
  sys.exit(main())
