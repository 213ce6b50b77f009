"""Plan, run, commit: how `score_dataset` and `generate_dataset` move shards, wherever they run.

A pipeline is a `Step` (what to do to one shard: engine work, then CPU work into an Arrow
table). `plan` reads the input and yields the shards the manifest does not record yet,
prepared (rendered, tokenized) in a background thread. `run_shards` runs each shard on an
engine in this process, or on a pool of engines on a Ray cluster (`RayEngines`); whoever runs
a shard writes its file (`store.write_shard_file`), and this process alone commits it in the
manifest. So resume, rejects and exactly-once are the same wherever the work ran.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa

from curate.errors import CurateError
from curate.data import Example, Fields, prefetched, prepare_rows, read_records
from curate.store import ShardWriter, write_shard_file


@dataclass
class Shard:
    """Input rows [start, end): the usable ones with what `prepare` made of them, the rest rejects."""

    index: int
    start: int
    end: int
    examples: list[Example]
    prepared: list[Any]
    rejects: list[dict]


@dataclass
class ShardResult:
    """A shard written to its file, ready to commit."""

    rows: tuple[int, int]
    file: str
    n_rows: int
    sha256: str
    rejects: list[dict]
    tokens: int  # for progress: tokens scored or generated


class Step(Protocol):
    """What a pipeline does to a shard. `infer` needs the engine; `table` is CPU work
    (decoding, checking, the Arrow table), overlapped with the next shard's `infer`."""

    def infer(self, engine, shard: Shard) -> Any: ...

    def table(self, shard: Shard, inferred: Any) -> pa.Table: ...

    def tokens(self, shard: Shard, inferred: Any) -> int: ...


class ShardsFailed(CurateError):
    """Some shards raised; every other shard is committed and `--resume` redoes just these."""

    def __init__(self, directory: Path, failures: list[tuple[Shard, str]]):
        self.failures = failures
        lines = [f"  shard {shard.index} (input rows {shard.start}-{shard.end - 1}): {why}" for shard, why in failures]
        super().__init__(f"{len(failures)} shard(s) of {directory} failed; the others are committed:\n" + "\n".join(lines)
                         + "\nfix the cause and finish the run with --resume")


def plan(input_path: Path, prepare: Callable[[Example], Any], fields: Fields, writer: ShardWriter,
         limit: int | None = None) -> Iterator[Shard]:
    """The shards not yet recorded, in input order, prepared one shard ahead in a background thread.
    Rows of recorded shards are read past but not prepared; rows from `limit` on are not read."""
    size, recorded = writer.shard_rows, writer.recorded()
    first = next(index for index in itertools.count() if index not in recorded)

    def shards() -> Iterator[Shard]:
        records = read_records(input_path, start=first * size, split=fields.split)
        if limit is not None:
            records = itertools.takewhile(lambda item: item[0] < limit, records)
        for index, rows in itertools.groupby(records, key=lambda item: item[0] // size):
            if index in recorded:
                continue
            chunk = list(rows)
            prepared, rejects = prepare_rows(chunk, prepare, fields, str(input_path))
            yield Shard(index, chunk[0][0], chunk[-1][0] + 1, [e for e, _ in prepared], [p for _, p in prepared], rejects)

    return prefetched(shards())


def run_step(step: Step, engine, shard: Shard, directory: Path, schema: pa.Schema) -> ShardResult:
    """All of one shard where the engine is (a Ray actor): infer, table, write."""
    inferred = step.infer(engine, shard)
    return finish_step(step, shard, inferred, directory, schema)


def finish_step(step: Step, shard: Shard, inferred: Any, directory: Path, schema: pa.Schema) -> ShardResult:
    file, n_rows, sha256 = write_shard_file(directory, shard.index, step.table(shard, inferred), schema)
    return ShardResult((shard.start, shard.end), file, n_rows, sha256, shard.rejects, step.tokens(shard, inferred))


def run_shards(step: Step, engine, shards: Iterator[Shard], writer: ShardWriter,
               on_progress: Callable[[int, int], None] | None = None) -> None:
    """Run and commit every shard: on `engine` in this process, or on `RayEngines`."""

    def commit(result: ShardResult) -> None:
        writer.commit(result.rows, result.file, result.n_rows, result.sha256, result.rejects)
        if on_progress:
            on_progress(result.rows[1] - result.rows[0], result.tokens)

    if hasattr(engine, "run_shards"):
        engine.run_shards(step, shards, writer.directory, writer.schema, commit)
        return
    # In this process: the table (checks, decoding, writing) of shard k is made while the engine infers shard k+1.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="curate-table") as tables:
        pending = None
        for shard in shards:
            inferred = step.infer(engine, shard)
            if pending:
                commit(pending.result())
            pending = tables.submit(finish_step, step, shard, inferred, writer.directory, writer.schema)
        if pending:
            commit(pending.result())
