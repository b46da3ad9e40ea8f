"""Test setup: 8 simulated CPU devices (for mesh tests), float32 matmuls, markers for accelerators."""
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# XLA's persistent compilation cache: the same tiny programs compile in many tests and subprocesses
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "cotsafe_jax_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
  backend = jax.default_backend()
  for item in items:
    if "tpu" in item.keywords and backend != "tpu":
      item.add_marker(pytest.mark.skip(reason="needs a TPU"))
    if "gpu" in item.keywords and backend != "gpu":
      item.add_marker(pytest.mark.skip(reason="needs a GPU"))
