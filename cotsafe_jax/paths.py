"""Workdir and data files through etils.epath: a local path works as always, a `gs://` URL (or any scheme epath
knows: s3://, az://) goes to cloud storage, so every worker of a pod reads and writes the same files.

Objects on cloud storage are written whole (no rename, no append): an atomic local write (temp file +
rename) becomes one object write there, and an appended log is kept in memory and re-uploaded at intervals.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import tempfile
import threading
import time
from typing import IO, Any, Iterator

from etils import epath

PathLike = str | os.PathLike


def is_local(path: PathLike) -> bool:
  """True for a plain file-system path, False for a URL (gs://bucket/...)."""
  return "://" not in os.fspath(path)


def path(p: PathLike) -> epath.Path:
  """The epath of `p`; a local path is made absolute (as os.path.abspath), a URL is kept as it is."""
  p = os.fspath(p)
  return epath.Path(os.path.abspath(p) if is_local(p) else p)


def resolve(p: PathLike) -> str:
  """`p` as a string that names the same file from any working directory: absolute when local."""
  return os.fspath(path(p))


def join(base: PathLike, *parts: str) -> str:
  return os.fspath(epath.Path(os.fspath(base)).joinpath(*parts))


def exists(p: PathLike) -> bool:
  return path(p).exists()


def isdir(p: PathLike) -> bool:
  return path(p).is_dir()


def isfile(p: PathLike) -> bool:
  q = path(p)
  return q.exists() and not q.is_dir()


def listdir(p: PathLike) -> list[str]:
  return sorted(c.name for c in path(p).iterdir())


def makedirs(p: PathLike) -> None:
  path(p).mkdir(parents=True, exist_ok=True)


def open_file(p: PathLike, mode: str = "r", **kw: Any) -> IO:
  """Open a file for reading or (over)writing; local paths use the built-in open (newline=, encoding= as there)."""
  if is_local(p):
    return open(os.fspath(p), mode, **kw)
  return path(p).open(mode)


def read_text(p: PathLike) -> str:
  return path(p).read_text()


def read_bytes(p: PathLike) -> bytes:
  return path(p).read_bytes()


def write_bytes(p: PathLike, data: bytes) -> str:
  """Write a whole file atomically (local: a temp file renamed into place; cloud: one object write)."""
  p = resolve(p)
  if not is_local(p):
    path(p).write_bytes(data)
    return p
  os.makedirs(os.path.dirname(p), exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp_", dir=os.path.dirname(p))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, p)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise
  return p


def write_text(p: PathLike, text: str) -> str:
  return write_bytes(p, text.encode("utf-8"))


def rmtree(p: PathLike) -> None:
  q = path(p)
  if q.exists():
    q.rmtree()


def copy_tree(src: PathLike, dst: PathLike) -> None:
  """Copy a directory tree between any two locations (local <-> cloud), file by file."""
  src_p, dst_p = path(src), path(dst)
  for root, _, files in src_p.walk():
    rel = os.path.relpath(os.fspath(root), os.fspath(src_p))
    target = dst_p if rel == "." else dst_p / rel
    target.mkdir(parents=True, exist_ok=True)
    for name in files:  # streamed: a model shard is not held in memory whole
      with (root / name).open("rb") as src, (target / name).open("wb") as dst:
        shutil.copyfileobj(src, dst, 16 * 1024 * 1024)


_LOCAL_COPIES: dict[str, str] = {}
_LOCAL_LOCK = threading.Lock()


def local_dir(p: PathLike) -> str:
  """A local directory with the contents of `p` (itself when local): for readers that need file names
  (safetensors' memory map, tokenizers). A cloud dir is downloaded once per process into a temp dir."""
  p = resolve(p)
  if is_local(p):
    return p
  with _LOCAL_LOCK:
    if p not in _LOCAL_COPIES or not os.path.isdir(_LOCAL_COPIES[p]):
      where = os.path.join(tempfile.gettempdir(), "cotsafe_jax_remote",
                           hashlib.sha256(p.encode()).hexdigest()[:16] + f"_{os.getpid()}")
      if os.path.isdir(where):
        shutil.rmtree(where)
      copy_tree(p, where)
      _LOCAL_COPIES[p] = where
    return _LOCAL_COPIES[p]


@contextlib.contextmanager
def staged_dir(p: PathLike) -> Iterator[str]:
  """A local directory to fill; on success it becomes `p`: renamed into place when `p` is local (replacing an
  old `p`, nothing half-written), uploaded when `p` is on cloud storage (the old contents removed first)."""
  p = resolve(p)
  if is_local(p):
    parent = os.path.dirname(p)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp_", dir=parent)
  else:
    tmp = tempfile.mkdtemp(prefix="cotsafe_jax_stage_")
  try:
    yield tmp
    if is_local(p):
      if os.path.exists(p):
        shutil.rmtree(p)
      os.replace(tmp, p)
    else:
      rmtree(p)
      copy_tree(tmp, p)
      with _LOCAL_LOCK:  # a local copy made before this write is stale
        for k in [k for k in _LOCAL_COPIES if k == p or k.startswith(p.rstrip("/") + "/")]:
          shutil.rmtree(_LOCAL_COPIES.pop(k), ignore_errors=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


class AppendFile:
  """A text file written line by line that readers may follow (metrics.jsonl). Local: appended and flushed at
  once. Cloud storage cannot append: the whole text is kept and re-uploaded at most every `upload_secs` and on
  close, so readers there see it with that delay."""

  def __init__(self, p: PathLike, *, keep: str = "", upload_secs: float = 30.0):
    self.path = resolve(p)
    self._local = is_local(self.path)
    self._upload_secs = upload_secs
    if self._local:
      makedirs(os.path.dirname(self.path))
      if keep:  # the rows kept from an earlier run, rewritten atomically before appending
        write_text(self.path, keep)
      self._f = open(self.path, "a" if keep else "w", encoding="utf-8", newline="\n")
    else:
      self._buf = io.StringIO()
      self._buf.write(keep)
      self._last = 0.0
      self._dirty = True
      self._upload()

  def write(self, text: str) -> None:
    if self._local:
      self._f.write(text)
      self._f.flush()
    else:
      self._buf.write(text)
      self._dirty = True
      if time.monotonic() - self._last >= self._upload_secs:
        self._upload()

  def _upload(self) -> None:
    if self._dirty:
      path(self.path).write_text(self._buf.getvalue())
      self._last, self._dirty = time.monotonic(), False

  def close(self) -> None:
    if self._local:
      self._f.close()
    else:
      self._upload()


class _RemoteBinaryFile:
  """A binary file on cloud storage written by appending (a TensorBoard event file): kept in memory and
  re-uploaded whole on flush, at most every `upload_secs` (and always on close)."""

  def __init__(self, p: str, upload_secs: float = 30.0):
    self._path, self._buf, self._upload_secs = p, io.BytesIO(), upload_secs
    self._last, self.closed = 0.0, False

  def write(self, data: bytes) -> None:
    self._buf.write(data)

  def flush(self) -> None:
    if time.monotonic() - self._last >= self._upload_secs:
      self._upload()

  def _upload(self) -> None:
    path(self._path).write_bytes(self._buf.getvalue())
    self._last = time.monotonic()

  def close(self) -> None:
    if not self.closed:
      self._upload()
      self.closed = True


class _TensorBoardFactory:
  """tensorboardX's writer-factory protocol (directory_check / open) over epath."""

  def directory_check(self, p: str) -> None:
    makedirs(p)

  def open(self, p: str) -> _RemoteBinaryFile:
    return _RemoteBinaryFile(p)


def register_tensorboard(url: PathLike) -> None:
  """Let tensorboardX write event files under `url` (a cloud URL) through epath."""
  if is_local(url):
    return
  from tensorboardX import record_writer
  scheme = os.fspath(url).split("://", 1)[0]
  record_writer.register_writer_factory(scheme, _TensorBoardFactory())
