"""Every shipped gin file parses against the registered configurables (unknown names would be errors)."""
import glob
import os

import gin
import pytest

from cotsafe_jax import jobs  # noqa: F401  (registers the configurables)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FILES = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "gin", "**", "*.gin"), recursive=True))


@pytest.mark.parametrize("path", FILES)
def test_gin_file_parses(path):
  gin.clear_config()
  gin.add_config_file_search_path(ROOT)
  try:
    gin.parse_config_files_and_bindings([os.path.join(ROOT, path)], [], finalize_config=False)
  finally:
    gin.clear_config()
  with open(os.path.join(ROOT, path)) as f:
    assert f.readline().startswith("#"), f"{path}: the header should say what the file is for"


def test_gin_files_found():
  assert "gin/demo_cpu.gin" in FILES and "gin/experiments/tiny_ppo_cpu.gin" in FILES
