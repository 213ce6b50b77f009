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
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curate.errors import CurateError
from curate.files import Busy, file_sha256, hold_lock, write_atomic  # noqa: F401  (write_atomic: also the store's API)

# 2: `end_of_turn` per token, `weight` per message, the model's fingerprint in the manifest.
# 3: per message `trained`, `tool_calls`, `reasoning`, `tool_call_id`, `name`; targets are what the model generates.
FORMAT_VERSION = 3
MANIFEST = "manifest.json"
JOURNAL = "shards.jsonl"
REJECTS = "rejects.jsonl"
LOCK = ".curate.lock"  # held (flock) by the one process writing the directory
METADATA_KEY = b"curate"
SHARD_KEY = b"curate_shard"  # in each shard file: which shard of which run it is

# Files a curate run writes into its directory; anything else there is the user's, and never touched.
_OURS = re.compile(r"(part-\d{5}\.parquet|manifest\.json|rejects\.jsonl|shards\.jsonl)(\.partial)?|\.curate\.lock")

# weight: Axolotl's per-message flag; 0 = context only, never trained (null = trained).
# trained: whether curate trained this turn (the messages are the example as read, a trailing
# user turn too). tool_calls: an assistant's calls, as JSON. reasoning: its trace, where the
# input gave one as a field (a `<think>` block stays in `content`).
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string()), ("weight", pa.int8()), ("trained", pa.bool_()),
                     ("tool_calls", pa.string()), ("reasoning", pa.string()), ("tool_call_id", pa.string()),
                     ("name", pa.string())])

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


class StoreError(CurateError):
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
                         f"curate reads {FORMAT_VERSION}: messages are stored as read, with tool calls, reasoning and "
                         "what was trained); score it again")
    shards = list(data["shards"])
    known = {shard["file"] for shard in shards}
    run = data["meta"].get("run")
    journal = Path(directory) / JOURNAL
    if journal.exists():
        for line in journal.read_text().splitlines():
            try:
                shard = json.loads(line)
            except json.JSONDecodeError:  # a line torn by a crash: that shard was never committed
                continue
            if shard.get("run") != run:  # another run's line (one that wrote here before this one started)
                continue
            if shard["file"] not in known:
                shards.append(shard)
                known.add(shard["file"])
    return Manifest(meta=data["meta"], shards=shards, complete=data["complete"], summary=data.get("summary", {}))


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def write_shard_file(directory: Path, index: int, table: pa.Table, schema: pa.Schema) -> tuple[str, int, str]:
    """Write shard `index` under a temporary name, sync it and rename it into place: a reader (or
    a retried task writing the same shard) never sees half a file. Returns (file, rows, sha256).
    The file's metadata names its shard, so a shard copied over another is caught on reading."""
    name = shard_name(index)
    partial = Path(directory) / (name + ".partial")
    schema = schema.with_metadata({**(schema.metadata or {}), SHARD_KEY: str(index).encode()})
    pq.write_table(table.cast(schema), partial, compression="zstd")
    with open(partial, "rb") as handle:
        os.fsync(handle.fileno())
    sha256 = file_sha256(partial)
    os.replace(partial, Path(directory) / name)
    _fsync_directory(Path(directory))
    return name, table.num_rows, sha256


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# Recorded by the writer itself, not an option of the run.
_NOT_OPTIONS = ("started", "run")


class ShardWriter:
    """Commits shards to a scored (or generated) directory, resumably, in any order.

    `meta["shard_rows"]` fixes the shard boundaries, so a resumed run (or another worker)
    names and fills every shard exactly as the first one would have."""

    def __init__(self, directory: Path, meta: dict, schema: pa.Schema = SCORED_SCHEMA, resume: bool = False, overwrite: bool = False):
        if resume and overwrite:
            raise StoreError("--resume and --overwrite contradict each other: give one")
        self.directory = Path(directory)
        if "input" in meta:  # the one place that writes a run: it never writes into, over or around its input
            refuse_overlap(Path(meta["input"]["path"]), self.directory)
        self.shard_rows = meta.get("shard_rows", 512)
        self.directory.mkdir(parents=True, exist_ok=True)
        _refuse_foreign(self.directory)  # before the lock file: nothing is added to someone else's directory
        self._lock = _take_lock(self.directory)
        try:
            self.manifest = self._open(meta, resume, overwrite)
            file_meta = _file_meta(self.manifest.meta)
            self.schema = schema.with_metadata({METADATA_KEY: json.dumps(file_meta).encode()})
            self._save_manifest()  # a resumed run folds its journal into the manifest and starts a fresh one
            (self.directory / JOURNAL).unlink(missing_ok=True)
        except BaseException:
            self.close()
            raise

    def _open(self, meta: dict, resume: bool, overwrite: bool) -> Manifest:
        """The manifest this run continues (resume) or starts, after refusing every unsafe case."""
        _refuse_unsafe_start(self.directory, resume, overwrite)
        if resume and (self.directory / MANIFEST).exists():  # --resume with nothing to resume starts the run
            manifest = read_manifest(self.directory)
            _check_same_run(self.directory, manifest.meta, meta)
            verify_shards(self.directory, manifest, full=True)
            self._discard_unrecorded(manifest)
            return manifest
        # --overwrite: only what a curate run wrote here, the manifest last (while shards are
        # there, the manifest that makes them ours is too)
        for ours in sorted(self.directory.iterdir(), key=lambda path: path.name == MANIFEST):
            if ours.name != LOCK and ours.is_file():
                ours.unlink()
        _fsync_directory(self.directory)
        return Manifest(meta={**meta, "started": time.time(), "run": uuid.uuid4().hex})

    def close(self) -> None:
        """Release the directory for the next run (also released if this process dies)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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
                 "rejects_bytes": rejects_bytes, "sha256": sha256,
                 "bytes": (self.directory / file).stat().st_size, "run": self.manifest.meta["run"]}
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
            write_atomic(rejects, b"".join(sorted(lines, key=lambda line: json.loads(line).get("row", -1))))
        self.manifest.complete = True
        self.manifest.summary = summary
        self._save_manifest()
        (self.directory / JOURNAL).unlink(missing_ok=True)

    def _save_manifest(self) -> None:
        write_atomic(self.directory / MANIFEST, json.dumps(self.manifest.to_json(), indent=1).encode())

    def _discard_unrecorded(self, manifest: Manifest) -> None:
        recorded = {shard["file"] for shard in manifest.shards}
        for path in self.directory.glob("part-*.parquet*"):
            if path.name not in recorded and path.is_file():
                path.unlink()
        rejects = self.directory / REJECTS
        with open(rejects, "ab") as handle:
            handle.truncate(manifest.rejects_bytes)
        manifest.complete = False


def check_output_dir(directory: Path, resume: bool, overwrite: bool, input_path: Path | None = None) -> None:
    """Refuse, before an engine is loaded, an output directory that the run would refuse later:
    one that overlaps the input, is in use, holds someone else's files, or holds a run without
    --resume/--overwrite. Writes nothing."""
    directory = Path(directory)
    if input_path is not None:
        refuse_overlap(input_path, directory)
    if directory.is_dir():
        _refuse_unsafe_start(directory, resume, overwrite)
        if (directory / LOCK).exists():
            _take_lock(directory, probe=True).close()


def _refuse_foreign(directory: Path) -> None:
    foreign = foreign_files(directory)
    if foreign:
        shown = ", ".join(sorted(foreign)[:5]) + (", ..." if len(foreign) > 5 else "")
        raise StoreError(f"{directory} holds files that curate did not write ({shown}); curate never deletes "
                         "or mixes into them, whatever the flags: choose an empty or new output directory")


def _refuse_unsafe_start(directory: Path, resume: bool, overwrite: bool) -> None:
    _refuse_foreign(directory)
    existing = (directory / MANIFEST).exists()
    if existing and not (resume or overwrite):
        raise StoreError(f"{directory} already holds a run; pass --resume to finish it or --overwrite to start again")


def _take_lock(directory: Path, probe: bool = False):
    """An exclusive lock on the directory for this process's lifetime: a second writer is refused.
    `probe`: only see whether another process holds it (its PID is not written)."""
    try:
        return hold_lock(directory / LOCK, write_pid=not probe)
    except Busy as busy:
        raise StoreError(f"{directory} is being written by another curate run (PID {busy.holder}); wait for it to "
                         "finish or stop it, or write to another directory") from None


def foreign_files(directory: Path) -> list[str]:
    """Entries of `directory` that no curate run wrote. Without a manifest, a shard-like name is
    not ours either: `part-00007.parquet` is also what Spark and `datasets` call their files."""
    entries = list(Path(directory).iterdir())  # one listing: another run may be writing here right now
    has_manifest = any(entry.name == MANIFEST for entry in entries)
    foreign = []
    for entry in entries:
        try:
            if entry.is_dir() and not any(entry.iterdir()):  # holds nothing to lose (and is never deleted)
                continue
        except FileNotFoundError:
            continue
        if not entry.exists():  # gone since the listing: another run's temporary file
            continue
        ours = entry.is_file() and _OURS.fullmatch(entry.name)
        if not ours or (not has_manifest and entry.name not in (LOCK, MANIFEST + ".partial")):
            foreign.append(entry.name)
    return foreign


def _file_meta(meta: dict) -> dict:
    return {key: meta.get(key) for key in ("kind", "model", "model_fingerprint", "tokenizer", "backend", "dtype", "run")}


def _check_same_run(directory: Path, recorded: dict, wanted: dict) -> None:
    """Every option of the run must be the recorded one, or resumed shards would mix settings."""
    for key in sorted(set(recorded) | set(wanted)):
        if key not in _NOT_OPTIONS and recorded.get(key) != wanted.get(key):
            raise StoreError(f"{directory}: cannot resume, {key} differs from the recorded run "
                             f"({recorded.get(key)!r} != {wanted.get(key)!r}); use --overwrite to start again")


def refuse_overlap(input_path: Path, output_path: Path) -> None:
    """An output that is, holds or sits inside an input would destroy it (a file or a directory)."""
    source, target = Path(input_path).resolve(), Path(output_path).resolve()
    if source == target or target in source.parents or source in target.parents:
        raise StoreError(f"{output_path} overlaps the input {input_path}: curate never writes into, over or "
                         "around its own input; choose another output")


# Inputs up to this size are hashed whole; larger ones by size plus evenly spaced samples.
FULL_HASH_BYTES = 2**30
_SAMPLES, _SAMPLE_BYTES = 64, 2**20


def input_fingerprint(path: Path) -> dict:
    """Identifies an input for resume by its content: sha256 of every byte, or, for inputs over
    FULL_HASH_BYTES, of the size and 64 evenly spaced 1 MiB samples (`hash` says which). An edit
    that keeps the size and the mtime still changes it."""
    path = Path(path).resolve()
    if path.is_dir():  # a run's own lock and journal are not its content
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name not in (LOCK, JOURNAL))
    else:
        files = [path]
    total = sum(p.stat().st_size for p in files)
    sampled = total > FULL_HASH_BYTES
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as handle:
            if not sampled:
                for block in iter(lambda: handle.read(2**20), b""):
                    digest.update(block)
                continue
            size = file.stat().st_size
            for k in range(_SAMPLES):
                handle.seek(max(0, (size - _SAMPLE_BYTES) * k // (_SAMPLES - 1)))
                digest.update(handle.read(_SAMPLE_BYTES))
    return {"path": str(path), "bytes": total, "sha256": digest.hexdigest(),
            "hash": "sampled-sha256" if sampled else "sha256"}


def verify_shards(directory: Path, manifest: Manifest, full: bool = False) -> None:
    """Check every recorded shard is the file the run wrote: present, same size and row count, and
    naming itself as that shard of this run (cheap: the Parquet footer); with `full`, same sha256.
    A shard lost, truncated or copied over another is an error naming it, never silently read."""
    redo = ("restore the file from a copy, or score the input again (--overwrite, or a new directory); "
            "reading on would silently lose or repeat rows")
    run = manifest.meta.get("run")
    for shard in manifest.shards:
        path = Path(directory) / shard["file"]
        rows = f"input rows {shard['rows'][0]}-{shard['rows'][1] - 1}"
        if not path.is_file():
            raise StoreError(f"{path} is missing: the manifest records it ({rows}); {redo}")
        size = path.stat().st_size
        if "bytes" in shard and size != shard["bytes"]:
            raise StoreError(f"{path} has changed since the run wrote it ({size:,} bytes, recorded {shard['bytes']:,}; "
                             f"{rows}); {redo}")
        try:
            footer = pq.read_metadata(path)
        except (OSError, pa.ArrowException) as error:
            raise StoreError(f"{path} is not a readable Parquet file ({error}; {rows}); {redo}") from None
        written = footer.metadata or {}
        index = int(written.get(SHARD_KEY, b"-1"))
        written_run = json.loads(written.get(METADATA_KEY, b"{}")).get("run")
        if footer.num_rows != shard["n_rows"] or (SHARD_KEY in written and index != int(shard["file"][5:10])) \
                or (run is not None and written_run != run):
            what = f"shard {index} of run {written_run}" if SHARD_KEY in written else f"{footer.num_rows} rows"
            raise StoreError(f"{path} is not the shard this run recorded there (it holds {what}; the manifest records "
                             f"{shard['n_rows']} rows, {rows}, run {run}): the file was replaced; {redo}")
        if full and file_sha256(path) != shard["sha256"]:
            raise StoreError(f"{path}: its sha256 differs from the one recorded when it was written ({rows}); {redo}")


# ---------------------------------------------------------------- reading


def open_scored(directory: Path, require_complete: bool = True, full_check: bool = False) -> tuple[Manifest, list[Path]]:
    """The manifest and shard paths of a scored directory, every shard checked (`verify_shards`;
    `full_check`: by sha256 too); refuses an unfinished run."""
    manifest = read_manifest(directory)
    if require_complete and not manifest.complete:
        command = "generate" if manifest.meta.get("kind") == "generated" else "score"
        raise StoreError(f"{directory}: the run is not finished (manifest not complete); "
                         f"finish it with `curate {command} ... --resume`")
    verify_shards(directory, manifest, full=full_check or os.environ.get("CURATE_VERIFY_SHARDS") == "1")
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


def scored_tokenizer(scored: Path, model: str | None, purpose: str, check_model: bool = False):
    """The tokenizer a scored set was scored with (`model`, else the manifest's model), checked
    against the manifest; with `check_model`, a `model` given must also be the weights that
    scored the set (its perplexities belong to them)."""
    from curate.models import load_tokenizer, model_fingerprint, resolve_model, tokenizer_fingerprint

    manifest, _ = open_scored(scored)
    model_dir = resolve_model(model or manifest.meta["model"])
    tokenizer = load_tokenizer(model_dir)
    require_tokenizer(scored, manifest, tokenizer_fingerprint(tokenizer), purpose)
    if check_model and model is not None:
        require_model(scored, manifest, model_fingerprint(model_dir), model)
    return tokenizer
