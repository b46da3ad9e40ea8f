"""gs:// served from memory, offline: fsspec's in-memory filesystem registered under the gs / gcs protocols.

etils.epath sends gs:// to fsspec (gcsfs in production), so the package's own reads and writes of a gs:// path
land here. What bypasses fsspec (orbax's array data, written by TensorStore's GCS driver) cannot be served.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import sys

import fsspec
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem


class MemoryGCS(MemoryFileSystem):
  protocol = ("gs", "gcs")
  store: dict = {}  # its own store: memory:// stays separate
  pseudo_dirs = [""]
  root_marker = ""


@contextlib.contextmanager
def installed() -> Iterator[dict]:
  """Route gs:// to an empty in-memory store for the duration; yields the store (path -> file)."""
  saved = {k: fsspec.registry.get(k) for k in ("gs", "gcs")}
  for k in saved:
    fsspec.register_implementation(k, MemoryGCS, clobber=True)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  MemoryGCS.store.clear()
  MemoryGCS.pseudo_dirs[:] = [""]
  MemoryGCS.clear_instance_cache()
  try:
    yield MemoryGCS.store
  finally:
    MemoryGCS.store.clear()
    registry = sys.modules["fsspec.registry"]._registry  # what register_implementation writes to
    for k, cls in saved.items():
      if cls is None:
        registry.pop(k, None)
      else:
        fsspec.register_implementation(k, cls, clobber=True)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
