"""Launch a cotsafe_jax job from gin: the same command on a CPU, a Colab TPU, or every worker of a TPU pod.

  python launch/tpu_run.py --gin_file=gin/demo_cpu.gin [--gin_file=...] [--gin_param="x.y=1"] \
      [--workdir=/tmp/w] [--debug]
"""
from __future__ import annotations

import argparse
import difflib
import os
import re
import sys

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO_ROOT)  # run from a checkout without installing


def _parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--gin_file", action="append", default=[], help="gin config file (repeatable)")
  p.add_argument("--gin_param", action="append", default=[], help="gin binding (repeatable)")
  p.add_argument("--workdir", default=None, help="where the job writes (overrides run.workdir)")
  p.add_argument("--debug", action="store_true", help="show tracebacks")
  p.add_argument("--coordinator_address", default=None, help="multi-process: host:port of process 0")
  p.add_argument("--num_processes", type=int, default=None)
  p.add_argument("--process_id", type=int, default=None)
  return p.parse_args(argv)


def _gin_error(err: Exception) -> str:
  """One line naming the unknown configurable or parameter, with close matches."""
  import gin
  msg = str(err)
  first = msg.splitlines()[0]
  where = " ".join(l.strip() for l in msg.splitlines()[1:2])
  m = re.search(r"No configurable matching '([^']+)'", first)
  if m:
    names = sorted({s.rsplit(".", 1)[-1] for s in gin.config._REGISTRY._selector_map})
    close = difflib.get_close_matches(m.group(1).rsplit(".", 1)[-1], names, n=3)
    hint = f" (did you mean: {', '.join(close)}?)" if close else ""
    return f"gin: unknown configurable '{m.group(1)}'{hint} {where}".strip()
  m = re.search(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", first)
  if m:
    import inspect
    try:
      fn = gin.config._REGISTRY.get_match(m.group(1)).wrapped
      params = list(inspect.signature(fn).parameters)
    except Exception:  # noqa: BLE001 - hints are best effort
      params = []
    close = difflib.get_close_matches(m.group(2), params, n=3)
    hint = f" (did you mean: {', '.join(close)}?)" if close else ""
    return f"gin: '{m.group(1)}' has no parameter '{m.group(2)}'{hint} {where}".strip()
  return f"gin: {first} {where}".strip()


def main(argv=None) -> int:
  args = _parse_args(sys.argv[1:] if argv is None else argv)
  try:
    from cotsafe_jax.errors import CotsafeError
    from cotsafe_jax.parallel import distributed
    distributed.initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                           process_id=args.process_id)
    import gin
    from cotsafe_jax import jobs
    gin_files = []
    for f in args.gin_file:  # relative paths: the current dir first, then the checkout root
      found = f if os.path.exists(f) else os.path.join(_REPO_ROOT, f)
      if not os.path.exists(found):
        raise CotsafeError(f"{f}: gin file not found")
      gin_files.append(found)
    # `include 'gin/...'` resolves against the checkout root, whatever the current dir
    gin.add_config_file_search_path(_REPO_ROOT)
    import logging
    root_level = logging.getLogger().level
    logging.getLogger().setLevel(logging.CRITICAL)  # gin logs each include it resolves via the search path
    try:
      gin.parse_config_files_and_bindings(gin_files, args.gin_param, finalize_config=False)
    except (ValueError, TypeError, SyntaxError, OSError) as e:
      if args.debug:
        raise
      raise CotsafeError(_gin_error(e)) from None
    finally:
      logging.getLogger().setLevel(root_level)
    kwargs = {} if args.workdir is None else {"workdir": args.workdir}
    if not _has_binding("run.job"):
      raise CotsafeError("no job bound: set run.job = @model_info (or another job) in a gin file")
    workdir = args.workdir or (gin.query_parameter("run.workdir") if _has_binding("run.workdir") else None)
    if workdir:
      os.makedirs(workdir, exist_ok=True)
      _write_config(workdir, gin.config_str())
    jobs.run(**kwargs)
    if workdir:
      _write_config(workdir, gin.operative_config_str())
    return 0
  except Exception as e:  # noqa: BLE001 - the one place errors become exit codes
    from cotsafe_jax.errors import CotsafeError
    if isinstance(e, CotsafeError) and not args.debug:
      print(str(e).splitlines()[0], file=sys.stderr)
      return 2
    raise


def _has_binding(name: str) -> bool:
  import gin
  try:
    gin.query_parameter(name)
    return True
  except ValueError:
    return False


def _write_config(workdir: str, text: str) -> None:
  import jax
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.gin"), "w") as f:
      f.write(text)


if __name__ == "__main__":
  sys.exit(main())
