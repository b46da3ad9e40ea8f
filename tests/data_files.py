"""Data files written by tests in public layouts: tab- or comma-separated tables, JSON lines, parquet."""
from __future__ import annotations

import csv
import json


def write_table(path, header, rows, delimiter="\t"):
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f, delimiter=delimiter)
    w.writerow(header)
    w.writerows(rows)
  return str(path)


def write_jsonl(path, rows):
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return str(path)


def write_parquet(path, rows):
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.Table.from_pylist(rows), str(path))
  return str(path)
