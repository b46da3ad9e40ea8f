"""Launch a cotsafe_jax job from gin: the same command on a CPU, a Colab TPU, or every worker of a TPU pod.

  python launch/tpu_run.py --gin_file=gin/demo_cpu.gin [--gin_file=...] [--gin_param="x.y=1"] \
      [--workdir=/tmp/w | --workdir=gs://bucket/run] [--debug]

Several processes: on a multi-host Cloud TPU slice (or under SLURM / Open MPI) jax.distributed starts with no
flags; elsewhere (GPU clusters, CPU processes) give every process
  --coordinator_address=HOST:PORT --num_processes=N --process_id=I   (HOST:PORT: where process 0 listens)
Every process prints its index and the global device count first ("tpu_run: process I of N: ...").
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import os
import re
import sys
import tempfile
import types
import typing

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO_ROOT)  # run from a checkout without installing


def _parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--gin_file", action="append", default=[], help="gin config file (repeatable)")
  p.add_argument("--gin_param", action="append", default=[], help="gin binding (repeatable)")
  p.add_argument("--workdir", default=None, help="where the job writes (overrides run.workdir)")
  p.add_argument("--debug", action="store_true", help="show tracebacks")
  p.add_argument("--coordinator_address", default=None,
                 help="multi-process (not needed on TPU pods): host:port where process 0 listens")
  p.add_argument("--num_processes", type=int, default=None, help="multi-process: how many processes")
  p.add_argument("--process_id", type=int, default=None, help="multi-process: this process's index, 0..N-1")
  return p.parse_args(argv)


def _gin_error(err: Exception) -> str:
  """One line naming the unknown configurable or parameter, with close matches."""
  import gin
  if isinstance(err, SyntaxError) and err.filename:  # gin's parser: file, line and what it could not read
    return f"gin: {err.filename}:{err.lineno}: {err.msg}"
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
    why = distributed.initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                                 process_id=args.process_id)
    print(f"tpu_run: {distributed.describe()}" + (f" (jax.distributed: {why})" if why else ""), flush=True)
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
    _check_binding_types()
    kwargs = {} if args.workdir is None else {"workdir": args.workdir}
    if not _has_binding("run.job"):
      raise CotsafeError("no job bound: set run.job = @model_info (or another job) in a gin file")
    workdir = args.workdir or (gin.query_parameter("run.workdir") if _has_binding("run.workdir") else None)
    if workdir:
      _make_workdir(workdir)
      import jax
      from cotsafe_jax import paths
      if jax.process_count() > 1 and paths.is_local(workdir) and jax.process_index() == 0:
        print(f"tpu_run: note: workdir {workdir} is a local path: every process must see the same directory "
              "there (one machine, NFS, a GCS fuse mount), or checkpoints are split over disks; gs:// is safe",
              flush=True)
      _write_config(workdir, gin.config_str())
    try:
      jobs.run(**kwargs)
    except RuntimeError as e:  # gin: a gin.REQUIRED parameter nobody bound
      m = re.match(r"Required bindings for `([^`]+)` not provided in config: \[([^\]]*)\]", str(e))
      if m is None or args.debug:
        raise
      names = ", ".join(f"{m.group(1)}.{p.strip().strip(chr(39))}" for p in m.group(2).split(","))
      raise CotsafeError(f"gin: {names} required but not bound (set it in a gin file or with "
                         f"--gin_param=\"{names.split(', ')[0]}=...\")") from None
    if workdir:
      _write_config(workdir, gin.operative_config_str())
    return 0
  except Exception as e:  # noqa: BLE001 - the one place errors become exit codes
    from cotsafe_jax.errors import CotsafeError
    if isinstance(e, CotsafeError) and not args.debug:
      print(str(e).splitlines()[0], file=sys.stderr)
      return 2
    raise


def _make_workdir(workdir: str) -> None:
  """Create the workdir (and parents) and check it takes files; errors name what is in the way. A gs:// (or
  other cloud) URL is created through epath; only process 0 writes there."""
  from cotsafe_jax import paths
  from cotsafe_jax.errors import CotsafeError
  if not paths.is_local(workdir):
    import jax
    if jax.process_index() == 0:
      try:
        paths.makedirs(workdir)
      except (OSError, ImportError, NotImplementedError) as e:
        raise CotsafeError(f"workdir {workdir}: cannot create it ({type(e).__name__}: {str(e).splitlines()[0]}), "
                           "expected a bucket this process can write (gs:// needs gcsfs and credentials)") from None
    return
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise CotsafeError(f"workdir {workdir}: a file is in the way, expected a directory (or a path to create one)")
  parent = path
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise CotsafeError(f"workdir {workdir}: {parent} is a file, not a directory, so the workdir cannot be created")
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as e:
    raise CotsafeError(f"workdir {workdir}: not writable ({e.strerror}), expected a directory this process can "
                       "write") from None


_PLAIN = (bool, int, float, str, type(None))


def _check_binding_types() -> None:
  """A binding of a plain value (number, string, boolean, None) must fit the parameter's annotation when that
  is a plain type or a union of them (`RolloutConfig.max_new_tokens = 'x'` is an error); other values and
  annotations (configurable references, macros, Sequence[str], Any, config classes) are left to the callee."""
  import gin
  from cotsafe_jax.errors import CotsafeError
  for (scope, selector), params in gin.config._CONFIG.items():
    try:
      configurable = gin.config._REGISTRY.get_match(selector)
      fn = configurable.wrapped
      hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) and not dataclasses.is_dataclass(fn) else fn)
    except Exception:  # noqa: BLE001 - macros, annotations that do not resolve: nothing to check
      continue
    for name, value in params.items():
      hint = hints.get(name)
      if hint is None or type(value) not in _PLAIN:
        continue
      allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
      if not all(a in _PLAIN for a in allowed):
        continue
      if not any(type(value) is a or (a is float and type(value) is int) for a in allowed):
        where = f"{scope}/{configurable.name}" if scope else configurable.name
        want = " or ".join("None" if a is type(None) else a.__name__ for a in allowed)
        raise CotsafeError(f"gin: {where}.{name} = {value!r} is a {type(value).__name__}, expected {want}")


def _has_binding(name: str) -> bool:
  import gin
  try:
    gin.query_parameter(name)
    return True
  except ValueError:
    return False


def _write_config(workdir: str, text: str) -> None:
  import jax
  from cotsafe_jax import paths
  if jax.process_index() == 0:
    paths.write_text(paths.join(workdir, "config.gin"), text)


if __name__ == "__main__":
  sys.exit(main())
