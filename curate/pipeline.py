"""Plan, run, commit: how `score_dataset` and `generate_dataset` move shards, wherever they run.

A pipeline is a `Step`: what to do to one shard (prepare each row: render, tokenize; engine
work; CPU work into an Arrow table). `plan` reads the input and yields the shards the manifest
does not record yet, as row ranges with their raw records: reading is all the planner does.
An executor (`curate.executors`: here, or on Ray replicas) prepares, infers, builds the table
and writes the shard's file (`store.write_shard_file`) where it runs, and hands the result
back; this process alone commits it in the manifest. So resume, rejects and exactly-once are
the same wherever the work ran, and the driver never tokenizes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa

from curate.data import Example, Fields, RowError, prepare_rows, read_records
from curate.errors import CurateError
from curate.settings import setting
from curate.store import ShardWriter, write_shard_file


@dataclass(frozen=True)
class RunOptions:
    """How a run reads its input and commits its output (score and generate; recorded in the
    manifest, so --resume keeps them). `shard_rows` None: the command's own (`SHARD_ROWS` in
    score.py and generate.py)."""

    shard_rows: int | None = setting("shard_rows")
    limit: int | None = setting("limit")
    resume: bool = setting("resume")
    overwrite: bool = setting("overwrite")

    def rows_per_shard(self, step_default: int) -> int:
        return self.shard_rows or step_default


@dataclass
class Shard:
    """Input rows [start, end) as read (`records`: (row, record or RowError)); `prepare_shard`
    fills in the usable ones with what the step's `prepare` made of them, and the rejects."""

    index: int
    start: int
    end: int
    records: list[tuple[int, dict | RowError]]
    source: str
    fields: Fields = Fields()
    examples: list[Example] = field(default_factory=list)
    prepared: list[Any] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)


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
    """What a pipeline does to a shard. `prepare` turns one example into the engine's input (or
    raises RowError: a reject); `infer` needs the engine; `table` is CPU work (decoding,
    checking, the Arrow table), overlapped with the next shard's `infer`. Steps are picklable:
    a Ray replica runs them too."""

    def prepare(self, example: Example) -> Any: ...

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


def plan(input_path: Path, fields: Fields, writer: ShardWriter, limit: int | None = None) -> Iterator[Shard]:
    """The shards not yet recorded, in input order, as read (nothing rendered or tokenized).
    Rows of recorded shards are read past; rows from `limit` on are not read."""
    size, recorded = writer.shard_rows, writer.recorded()
    first = next(index for index in itertools.count() if index not in recorded)
    records = read_records(input_path, start=first * size, split=fields.split)
    if limit is not None:
        records = itertools.takewhile(lambda item: item[0] < limit, records)
    for index, rows in itertools.groupby(records, key=lambda item: item[0] // size):
        if index in recorded:
            continue
        chunk = list(rows)
        yield Shard(index, chunk[0][0], chunk[-1][0] + 1, chunk, str(input_path), fields)


def prepare_shard(step: Step, shard: Shard) -> Shard:
    """Normalise and prepare the shard's records where it runs: each row becomes an example
    with its prepared input, or a reject."""
    prepared, shard.rejects = prepare_rows(shard.records, step.prepare, shard.fields, shard.source)
    shard.examples, shard.prepared = [e for e, _ in prepared], [p for _, p in prepared]
    shard.records = []
    return shard


def finish_step(step: Step, shard: Shard, inferred: Any, directory: Path, schema: pa.Schema) -> ShardResult:
    """The CPU half of a shard: its table, written to the shard's file."""
    file, n_rows, sha256 = write_shard_file(directory, shard.index, step.table(shard, inferred), schema)
    return ShardResult((shard.start, shard.end), file, n_rows, sha256, shard.rejects, step.tokens(shard, inferred))


def run_pipeline(step: Step, executor, shards: Iterator[Shard], writer: ShardWriter,
                 on_progress: Callable[[int, int], None] | None = None) -> None:
    """Run every shard on `executor` and commit each as it comes back (in any order)."""

    def commit(result: ShardResult) -> None:
        writer.commit(result.rows, result.file, result.n_rows, result.sha256, result.rejects)
        if on_progress:
            on_progress(result.rows[1] - result.rows[0], result.tokens)

    executor.run(step, shards, writer.directory, writer.schema, commit)
