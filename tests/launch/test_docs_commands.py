"""Every launcher command in the docs parses: its gin files exist and its bindings name registered configurables
and parameters (nothing is run)."""
import glob
import os
import re
import shlex

import gin
import pytest

from cotsafe_jax import jobs  # noqa: F401  (registers the configurables)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)) + [os.path.join(ROOT, "README.md")]


def _commands(path):
  text = open(path, encoding="utf-8").read().replace("\\\n", " ")
  out = []
  for line in text.splitlines():
    at = line.find("python launch/tpu_run.py")
    if at >= 0 and "--gin_file=F" not in line:
      out.append(line[at:].split("  #")[0].split(" # ")[0])
  return out


CASES = [(os.path.relpath(p, ROOT), c) for p in DOCS for c in _commands(p)]


def test_the_docs_have_commands():
  assert len(CASES) >= 15 and any("safety_ppo_guard.gin" in c for _, c in CASES)


@pytest.mark.parametrize("doc,command", CASES, ids=[f"{d}:{i}" for i, (d, _) in enumerate(CASES)])
def test_doc_command_parses(doc, command):
  args = shlex.split(command.replace("${name#*:}", "x").replace("${name%%:*}", "x"))
  files = [a.split("=", 1)[1] for a in args if a.startswith("--gin_file=")]
  params = [a.split("=", 1)[1] for a in args if a.startswith("--gin_param=")]
  for f in files:
    assert os.path.exists(os.path.join(ROOT, f)), (doc, f)
  gin.clear_config()
  gin.add_config_file_search_path(ROOT)
  try:
    gin.parse_config_files_and_bindings([os.path.join(ROOT, f) for f in files], params, finalize_config=False)
  finally:
    gin.clear_config()
  assert re.search(r"run\.job|--gin_file=", command), command
