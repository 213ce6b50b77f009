"""Small file helpers every module shares: an atomic write, a file's sha256, and "done" markers.

A done marker is a small JSON file written last and atomically: its presence says a piece of
work finished (a benchmark task pulled, the bundled model prepared, an experiment step, the
tokenizers fetched), and its content says with what, so that a later run can tell "done with
these options" from "done with other ones". The store's shard journal is the one exception: it
commits many shards of one run, not one piece of work.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def write_atomic(path: Path, data: bytes) -> None:
    """Write a whole file under a temporary name and rename it into place: a reader, or a crash,
    never sees half of it."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_marker(path: Path, record: dict) -> None:
    """Mark a piece of work done, with what it was done with (`record`, JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(record, indent=1, default=str) + "\n").encode("utf-8"))


def read_marker(path: Path) -> dict | None:
    """The record of a done marker, or None when the work is not done (no marker, or an
    unreadable one: a marker from before markers were JSON counts as not done)."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def read_jsonl(path: Path) -> list[dict]:
    """Every record of a JSONL file curate wrote itself (user input goes through `curate.data`,
    which reports a bad line instead of failing on it)."""
    with open(path, encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]
