"""The scored directory: Parquet shards plus a manifest, written so a crash loses nothing.

Layout: `part-NNNNN.parquet` shards (shard k holds input rows [k*shard_rows, (k+1)*shard_rows)),
`rejects.jsonl`, `manifest.json` (the run's options, and at the end every shard) and, while a
run is going, `shards.jsonl` (one line appended per committed shard, so a million-row run
does not rewrite its manifest per shard). A shard is written under a temporary name, synced
and renamed (by whichever process ran it, a Ray actor too); its rejects are appended and
synced; only then does the driver record it. On `--resume` everything not recorded is
discarded and redone, so every input row ends up exactly once, whatever order shards finish in.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# 2: `end_of_turn` per token, `weight` per message, the model's fingerprint in the manifest.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
JOURNAL = "shards.jsonl"
REJECTS = "rejects.jsonl"
METADATA_KEY = b"curate"

# weight: Axolotl's per-message flag; 0 = context only, never trained (null = trained).
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string()), ("weight", pa.int8())])

SCORED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("row", pa.int64()),  # 0-based row of the input file
        ("messages", pa.list_(MESSAGE)),
        ("reference", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("logprobs", pa.list_(pa.float32())),  # natural log p(token | earlier tokens); null for the first
        ("target", pa.list_(pa.bool_())),  # trained assistant-content tokens and their end-of-turn token
        ("end_of_turn", pa.list_(pa.bool_())),  # the end-of-turn token after a trained turn: never masked
        ("n_target", pa.int32()),
        ("nll_mean", pa.float64()),  # mean -logprob over target tokens
        ("ppl", pa.float64()),  # exp(nll_mean): the response perplexity
        ("truncated", pa.bool_()),
        ("extra", pa.string()),  # JSON of the input row's other columns (null when none)
    ]
)


class StoreError(Exception):
    pass


@dataclass
class Manifest:
    """What a run promised (`meta`: input, model, options) and what it has done (`shards`)."""

    meta: dict
    shards: list[dict] = field(default_factory=list)
    complete: bool = False
    summary: dict = field(default_factory=dict)

    @property
    def rows_read(self) -> int:
        """Input rows seen: the end of the furthest shard."""
        return max((shard["rows"][1] for shard in self.shards), default=0)

    @property
    def rejects_bytes(self) -> int:
        return max((shard["rejects_bytes"] for shard in self.shards), default=0)

    def to_json(self) -> dict:
        return {"format": FORMAT_VERSION, "meta": self.meta, "complete": self.complete,
                "summary": self.summary, "shards": self.shards}


def read_manifest(directory: Path) -> Manifest:
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise StoreError(f"{directory}: no {MANIFEST}; is this a directory written by `curate score`?")
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT_VERSION:
        raise StoreError(f"{directory} was written by an older curate (scored format {data.get('format')}, this "
                         f"curate reads {FORMAT_VERSION}: end-of-turn is now stored per token); score it again")
    shards = list(data["shards"])
    known = {shard["file"] for shard in shards}
    journal = Path(directory) / JOURNAL
    if journal.exists():
        for line in journal.read_text().splitlines():
            try:
                shard = json.loads(line)
            except json.JSONDecodeError:  # a line torn by a crash: that shard was never committed
                continue
            if shard["file"] not in known:
                shards.append(shard)
                known.add(shard["file"])
    return Manifest(meta=data["meta"], shards=shards, complete=data["complete"], summary=data.get("summary", {}))


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def write_shard_file(directory: Path, index: int, table: pa.Table, schema: pa.Schema) -> tuple[str, int, str]:
    """Write shard `index` under a temporary name, sync it and rename it into place: a reader (or
    a retried task writing the same shard) never sees half a file. Returns (file, rows, sha256)."""
    name = shard_name(index)
    partial = Path(directory) / (name + ".partial")
    pq.write_table(table.cast(schema), partial, compression="zstd")
    digest = hashlib.sha256()
    with open(partial, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
        os.fsync(handle.fileno())
    os.replace(partial, Path(directory) / name)
    _fsync_directory(Path(directory))
    return name, table.num_rows, digest.hexdigest()


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_atomic(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


# Recorded by the writer itself, not an option of the run.
_NOT_OPTIONS = ("started",)


class ShardWriter:
    """Commits shards to a scored (or generated) directory, resumably, in any order.

    `meta["shard_rows"]` fixes the shard boundaries, so a resumed run (or another worker)
    names and fills every shard exactly as the first one would have."""

    def __init__(self, directory: Path, meta: dict, schema: pa.Schema = SCORED_SCHEMA, resume: bool = False, overwrite: bool = False):
        self.directory = Path(directory)
        if "input" in meta:  # the one place that writes a run: it never writes into, over or around its input
            refuse_overlap(Path(meta["input"]["path"]), self.directory)
        self.schema = schema.with_metadata({METADATA_KEY: json.dumps(_file_meta(meta)).encode()})
        self.shard_rows = meta.get("shard_rows", 512)
        existing = self.directory / MANIFEST
        if existing.exists() and resume:
            self.manifest = read_manifest(self.directory)
            _check_same_run(self.directory, self.manifest.meta, meta)
            self._discard_unrecorded()
        elif existing.exists() and not overwrite:
            raise StoreError(f"{self.directory} already holds a run; pass --resume to finish it or --overwrite to start again")
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in [*self.directory.glob("part-*.parquet*"), self.directory / REJECTS, self.directory / JOURNAL, existing]:
                if not stale.is_dir():  # files of ours only; a directory in the way fails its shard, loudly
                    stale.unlink(missing_ok=True)
            self.manifest = Manifest(meta={**meta, "started": time.time()})
        self._save_manifest()  # a resumed run folds its journal into the manifest and starts a fresh one
        (self.directory / JOURNAL).unlink(missing_ok=True)

    def recorded(self) -> set[int]:
        """Indexes of the committed shards."""
        return {shard["rows"][0] // self.shard_rows for shard in self.manifest.shards}

    def commit(self, rows: tuple[int, int], file: str, n_rows: int, sha256: str, rejects: list[dict]) -> None:
        """Record the shard of input rows [start, end), already written as `file`: its rejects are
        appended and synced first, then one journal line; a crash between the two is redone."""
        with open(self.directory / REJECTS, "ab") as handle:
            for reject in rejects:
                handle.write((json.dumps(reject, ensure_ascii=False) + "\n").encode())
            handle.flush()
            os.fsync(handle.fileno())
            rejects_bytes = handle.tell()
        shard = {"file": file, "rows": list(rows), "n_rows": n_rows, "n_rejects": len(rejects),
                 "rejects_bytes": rejects_bytes, "sha256": sha256}
        with open(self.directory / JOURNAL, "ab") as handle:
            handle.write((json.dumps(shard) + "\n").encode())
            handle.flush()
            os.fsync(handle.fileno())
        self.manifest.shards.append(shard)

    def finish(self, summary: dict) -> None:
        """Mark the run complete: shards listed in input order, rejects sorted by input row."""
        self.manifest.shards.sort(key=lambda shard: shard["rows"][0])
        rejects = self.directory / REJECTS
        if rejects.exists():
            lines = rejects.read_bytes().splitlines(keepends=True)
            _write_atomic(rejects, b"".join(sorted(lines, key=lambda line: json.loads(line).get("row", -1))))
        self.manifest.complete = True
        self.manifest.summary = summary
        self._save_manifest()
        (self.directory / JOURNAL).unlink(missing_ok=True)

    def _save_manifest(self) -> None:
        _write_atomic(self.directory / MANIFEST, json.dumps(self.manifest.to_json(), indent=1).encode())

    def _discard_unrecorded(self) -> None:
        recorded = {shard["file"] for shard in self.manifest.shards}
        for path in self.directory.glob("part-*.parquet*"):
            if path.name not in recorded and not path.is_dir():
                path.unlink()
        rejects = self.directory / REJECTS
        with open(rejects, "ab") as handle:
            handle.truncate(self.manifest.rejects_bytes)
        self.manifest.complete = False


def _file_meta(meta: dict) -> dict:
    return {key: meta.get(key) for key in ("kind", "model", "model_fingerprint", "tokenizer", "backend", "dtype")}


def _check_same_run(directory: Path, recorded: dict, wanted: dict) -> None:
    """Every option of the run must be the recorded one, or resumed shards would mix settings."""
    for key in sorted(set(recorded) | set(wanted)):
        if key not in _NOT_OPTIONS and recorded.get(key) != wanted.get(key):
            raise StoreError(f"{directory}: cannot resume, {key} differs from the recorded run "
                             f"({recorded.get(key)!r} != {wanted.get(key)!r}); use --overwrite to start again")


def refuse_overlap(input_path: Path, output_dir: Path) -> None:
    """An output directory that is, holds or sits inside the input would destroy it."""
    source, target = Path(input_path).resolve(), Path(output_dir).resolve()
    if source == target or target in source.parents or (source.is_dir() and source in target.parents):
        raise StoreError(f"{output_dir} overlaps the input {input_path}: a run never writes into, over or "
                         "around its own input; choose another output directory")


def input_fingerprint(path: Path) -> dict:
    """Identifies an input for resume: path, size, mtime (hashing a large file costs a full read)."""
    path = Path(path).resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {"path": str(path), "bytes": sum(p.stat().st_size for p in files),
            "mtime_ns": max(p.stat().st_mtime_ns for p in files)}


# ---------------------------------------------------------------- reading


def open_scored(directory: Path, require_complete: bool = True) -> tuple[Manifest, list[Path]]:
    """The manifest and shard paths of a scored directory; refuses an unfinished one."""
    manifest = read_manifest(directory)
    if require_complete and not manifest.complete:
        command = "generate" if manifest.meta.get("kind") == "generated" else "score"
        raise StoreError(f"{directory}: the run is not finished (manifest not complete); "
                         f"finish it with `curate {command} ... --resume`")
    return manifest, [Path(directory) / shard["file"] for shard in manifest.shards]


def require_tokenizer(directory: Path, manifest: Manifest, fingerprint: str, purpose: str) -> None:
    """Refuse to read token ids of a scored set with another tokenizer than it was scored with."""
    if manifest.meta["tokenizer"] != fingerprint:
        raise StoreError(f"{directory} was scored with another tokenizer ({manifest.meta['tokenizer']}, model "
                         f"{manifest.meta['model']}) than the one given for {purpose} ({fingerprint}); "
                         f"use the model that was scored (--model), or score again")


OTHER_MODEL_WHY = ("the perplexities, and so the STM masks and the self-output choices, belong to the model that "
                   "scored them; training another model on them is not the study's method")


def require_model(directory: Path, manifest: Manifest, fingerprint: str, model: str, allow_other: bool = False) -> None:
    """Refuse to pair a scored set with another model than the one that scored it."""
    recorded = manifest.meta.get("model_fingerprint")
    if allow_other or recorded is None or recorded == fingerprint:
        return
    raise StoreError(f"{directory} was scored with the model {manifest.meta['model']} (fingerprint {recorded}), not "
                     f"{model} ({fingerprint}): {OTHER_MODEL_WHY}. Score again with --model, or pass "
                     "--allow-other-model if this is what you mean")


def file_metadata(path: Path) -> dict:
    raw = pq.read_schema(path).metadata or {}
    return json.loads(raw.get(METADATA_KEY, b"{}"))
