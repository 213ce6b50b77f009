"""Small file helpers every module shares: an atomic write, locks (one writer at a time), a
file's sha256, and "done" markers.

A done marker is a small JSON file written last and atomically: its presence says a piece of
work finished (a benchmark task pulled, the bundled model prepared, an experiment step, the
tokenizers fetched), and its content says with what, so that a later run can tell "done with
these options" from "done with other ones". The store's shard journal is the one exception: it
commits many shards of one run, not one piece of work.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path

from curate.errors import CurateError


def write_atomic(path: Path, data: bytes) -> None:
    """Write a whole file under a temporary name and rename it into place: a reader, or a crash,
    never sees half of it. Two processes writing the same path take turns on the temporary file
    (`lock_file`), so the file is always one writer's whole content, never a mix."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    handle = lock_file(partial)
    try:
        handle.truncate(0)
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
        os.replace(partial, path)
    finally:
        handle.close()


def lock_file(path: Path, wait: bool = True):
    """Open `path` (created if missing, never truncated) and lock it exclusively for as long as the
    returned handle is open; None if another process holds it and `wait` is False. A holder may
    publish the file by renaming it away while we wait: then the lock is taken again on the file now
    at `path`, so two holders never share one file."""
    while True:
        handle = open(os.open(path, os.O_RDWR | os.O_CREAT, 0o666), "r+b")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.close()
            return None
        try:
            current = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            current = False
        if current:
            return handle
        handle.close()


class Busy(CurateError):
    """Another process holds the lock (`holder`: the PID it wrote, or "unknown")."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is held by another curate process (PID {holder})")
        self.holder = holder


def hold_lock(path: Path, write_pid: bool = True):
    """`lock_file` without waiting, for a whole run: the handle holds it (the holder's PID written
    in the file, for the message another run shows); `Busy` if another process holds it."""
    handle = lock_file(path, wait=False)
    if handle is None:
        holder = Path(path).read_text(errors="replace").strip() if Path(path).exists() else ""
        raise Busy(path, holder or "unknown")
    if write_pid:
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n".encode())
        handle.flush()
    return handle


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
