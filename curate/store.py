"""The scored directory: Parquet shards plus a manifest, written so a crash loses nothing.

Layout: `part-NNNNN.parquet` shards, `rejects.jsonl`, `manifest.json`. A shard is written
under a temporary name and renamed; its rejects are appended and flushed; only then does
the manifest (itself replaced atomically) record it. On `--resume` everything the manifest
does not record is discarded and redone, so every input row ends up exactly once.
"""

from __future__ import annotations

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
    def next_row(self) -> int:
        return self.shards[-1]["rows"][1] if self.shards else 0

    @property
    def rejects_bytes(self) -> int:
        return self.shards[-1]["rejects_bytes"] if self.shards else 0

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
    return Manifest(meta=data["meta"], shards=data["shards"], complete=data["complete"], summary=data.get("summary", {}))


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
    """Appends shards to a scored (or generated) directory, resumably."""

    def __init__(self, directory: Path, meta: dict, schema: pa.Schema = SCORED_SCHEMA, resume: bool = False, overwrite: bool = False):
        self.directory = Path(directory)
        if "input" in meta:  # the one place that writes a run: it never writes into, over or around its input
            refuse_overlap(Path(meta["input"]["path"]), self.directory)
        self.schema = schema.with_metadata({METADATA_KEY: json.dumps(_file_meta(meta)).encode()})
        existing = self.directory / MANIFEST
        if existing.exists() and resume:
            self.manifest = read_manifest(self.directory)
            _check_same_run(self.directory, self.manifest.meta, meta)
            self._discard_unrecorded()
        elif existing.exists() and not overwrite:
            raise StoreError(f"{self.directory} already holds a run; pass --resume to finish it or --overwrite to start again")
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in [*self.directory.glob("part-*.parquet*"), self.directory / REJECTS, existing]:
                stale.unlink(missing_ok=True)
            self.manifest = Manifest(meta={**meta, "started": time.time()})
            self._save_manifest()

    @property
    def next_row(self) -> int:
        """The first input row not yet recorded in a finished shard."""
        return self.manifest.next_row

    def write_shard(self, table: pa.Table, rejects: list[dict], end_row: int) -> None:
        """Record input rows [next_row, end_row): `table` holds the usable ones, `rejects` the rest."""
        index = len(self.manifest.shards)
        name = f"part-{index:05d}.parquet"
        partial = self.directory / (name + ".partial")
        pq.write_table(table.cast(self.schema), partial, compression="zstd")
        os.replace(partial, self.directory / name)
        with open(self.directory / REJECTS, "ab") as handle:
            for reject in rejects:
                handle.write((json.dumps(reject, ensure_ascii=False) + "\n").encode())
            handle.flush()
            os.fsync(handle.fileno())
            rejects_bytes = handle.tell()
        self.manifest.shards.append({"file": name, "rows": [self.next_row, end_row], "n_rows": table.num_rows,
                                     "n_rejects": len(rejects), "rejects_bytes": rejects_bytes})
        self._save_manifest()

    def finish(self, summary: dict) -> None:
        self.manifest.complete = True
        self.manifest.summary = summary
        self._save_manifest()

    def _save_manifest(self) -> None:
        _write_atomic(self.directory / MANIFEST, json.dumps(self.manifest.to_json(), indent=1).encode())

    def _discard_unrecorded(self) -> None:
        recorded = {shard["file"] for shard in self.manifest.shards}
        for path in self.directory.glob("part-*.parquet*"):
            if path.name not in recorded:
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
