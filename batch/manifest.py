"""What a batch job writes, so that it can be stopped at any point and run again: each output
under a temporary name, then renamed (never half a file under its own name); the manifest's
rows in parts as they come (DIR/.manifest/part-*.parquet, each written whole, then renamed),
one Parquet file DIR/manifest.parquet at the end, one row per input. A rerun skips every
input whose output exists and whose row says it was made by the same model.

The output folder is local (or a shared filesystem mounted at the same path on every node
of a cluster): renames must be atomic.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from pathlib import Path

MANIFEST = "manifest.parquet"
PARTS = ".manifest"
TEMPORARY = ".tmp-"  # in a temporary output's name: .NAME.tmp-UUID

# The manifest's columns, in order, and their Arrow types.
COLUMNS = {
    "id": "string",  # the input's path relative to INPUT's root
    "input": "string",  # where it was read
    "output": "string",  # its output, relative to the output folder
    "width": "int64",
    "height": "int64",
    "model": "string",  # the model card's name
    "version": "int64",
    "model_sha256": "string",  # of the model.onnx: the model's fingerprint
    "variant": "string",  # the runtime x arithmetic that served it
    "status": "string",  # ok | error
    "error": "string",
    "ms": "float64",  # read, decode, segment, encode, write
    "worker": "string",  # host:pid of the process that made it
}


def schema():
    import pyarrow as pa

    return pa.schema([(name, getattr(pa, kind)()) for name, kind in COLUMNS.items()])


def write_atomic(path: Path, data: bytes) -> None:
    """`data` at `path` all at once: a hidden temporary file beside it, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TEMPORARY}{uuid.uuid4().hex}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sweep_temporaries(out: Path) -> int:
    """Remove what a killed job left under temporary names; returns how many."""
    found = [p for p in out.rglob(f".*{TEMPORARY}*") if p.is_file()] if out.is_dir() else []
    for path in found:
        path.unlink(missing_ok=True)
    return len(found)


def write_rows(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in rows], schema())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TEMPORARY}{uuid.uuid4().hex}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class Manifest:
    """The rows of an output folder: the consolidated file and the parts written since."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.parts = out / PARTS

    def read(self) -> dict[str, dict]:
        """Every row, one per id (a later part's row wins: a rerun's, or a retried
        input's)."""
        import pyarrow.parquet as pq

        files = [self.out / MANIFEST] if (self.out / MANIFEST).is_file() else []
        files += sorted(p for p in self.parts.glob("part-*.parquet")) if self.parts.is_dir() else []
        rows: dict[str, dict] = {}
        for path in files:
            for row in pq.read_table(path).to_pylist():
                rows[row["id"]] = row
        return rows

    def append(self, rows: list[dict]) -> None:
        """A part of rows, written whole (it survives the job's death)."""
        if rows:
            name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"  # sorts by time
            write_rows(self.parts / name, rows)

    def consolidate(self) -> dict[str, dict]:
        """manifest.parquet from everything read, then the parts removed."""
        rows = self.read()
        write_rows(self.out / MANIFEST, sorted(rows.values(), key=lambda r: r["id"]))
        if self.parts.is_dir():
            for path in self.parts.glob("part-*.parquet"):
                path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # a part being written by another job
                self.parts.rmdir()
        return rows

    def clear(self) -> None:
        """Forget every row (--overwrite with another model)."""
        (self.out / MANIFEST).unlink(missing_ok=True)
        if self.parts.is_dir():
            for path in self.parts.glob("*"):
                path.unlink(missing_ok=True)
