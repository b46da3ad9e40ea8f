"""Read the history rows of an offline W&B run file (run-<id>.wandb) without the network or a W&B server.

The file is W&B's record log: a 7-byte header (":W&B", a 2-byte magic, a version byte), then LevelDB-log
records in 32 KiB blocks (each record: crc32 [4], length [2, little-endian], type [1: full, 2: first,
3: middle, 4: last], data), every record's data one serialized wandb.proto Record.
"""
from __future__ import annotations

import glob
import json
import os
import struct

_BLOCK = 32768
_HEADER = 7


def records(path: str) -> list[bytes]:
  with open(path, "rb") as f:
    data = f.read()
  if not data.startswith(b":W&B"):
    raise ValueError(f"{path}: not a W&B run file")
  out, pending, pos = [], b"", _HEADER
  while pos + 7 <= len(data):
    left = _BLOCK - pos % _BLOCK
    if left < 7:  # a block's tail too short for a header is padding
      pos += left
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    chunk = data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind == 0 and length == 0:
      continue
    if kind == 1:
      out.append(chunk)
    elif kind == 2:
      pending = chunk
    elif kind == 3:
      pending += chunk
    elif kind == 4:
      out.append(pending + chunk)
      pending = b""
  return out


def history(run_dir_root: str) -> list[dict]:
  """Every history row ({key: value, "_step": step}) of the offline run(s) under `run_dir_root`/wandb."""
  from wandb.proto import wandb_internal_pb2 as pb
  rows = []
  for path in sorted(glob.glob(os.path.join(run_dir_root, "wandb", "offline-run-*", "run-*.wandb"))):
    for data in records(path):
      rec = pb.Record()
      rec.ParseFromString(data)
      if rec.WhichOneof("record_type") == "history":
        rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                     for item in rec.history.item})
  return rows
