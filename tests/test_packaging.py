"""Every third-party module the package and the launcher import is declared in setup.py's install_requires.

The README's first command installs without the test extras; a module that only arrives through torch (a test
dependency) would pass the test suite and fail for a new user (jinja2 did, in the demo's SFT stage).
"""
import ast
import importlib.metadata
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _normalise(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _install_requires() -> set[str]:
  tree = ast.parse((ROOT / "setup.py").read_text())
  for node in ast.walk(tree):
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
      for kw in node.keywords:
        if kw.arg == "install_requires":
          specs = ast.literal_eval(kw.value)
          return {_normalise(re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0]) for spec in specs}
  raise AssertionError("setup.py: no setup(install_requires=[...]) found")


def _imported_top_level_modules() -> dict[str, str]:
  found: dict[str, str] = {}
  for path in sorted([*(ROOT / "cotsafe_jax").rglob("*.py"), *(ROOT / "launch").glob("*.py")]):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
      if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [node.module]
      else:
        continue
      for name in names:
        top = name.split(".")[0]
        if top not in sys.stdlib_module_names and top not in ("cotsafe_jax", "__future__"):
          found.setdefault(top, str(path.relative_to(ROOT)))
  return found


def test_every_third_party_import_is_a_declared_dependency():
  declared = _install_requires()
  dists = importlib.metadata.packages_distributions()
  modules = _imported_top_level_modules()
  assert {"jax", "flax", "transformers"} <= set(modules)  # the scan itself works
  missing = []
  for module, where in sorted(modules.items()):
    names = {_normalise(d) for d in dists.get(module, [module])}
    if not names & declared:
      missing.append(f"{module} (imported in {where}; distribution {sorted(names)})")
  assert not missing, "not in setup.py install_requires: " + "; ".join(missing)
