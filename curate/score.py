"""`score_dataset`: stream a dataset through a scorer into a scored directory."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from curate.data import Example, Fields, check_input, normalise
from curate.engines.base import Engine
from curate.executors import as_executor
from curate.models import model_fingerprint, tokenizer_fingerprint
from curate.pipeline import RunOptions, Shard, plan, run_pipeline
from curate.store import SCORED_SCHEMA, ShardWriter, input_fingerprint
from curate.tokenize import ChatTokenizer, TokenizedExample

SHARD_ROWS = 512  # input rows per shard when --shard-rows is not given


@dataclass
class ScoreSummary:
    rows_in: int
    rows_scored: int
    rows_rejected: int
    rows_truncated: int
    tokens: int
    target_tokens: int
    ppl_mean: float | None  # mean over examples of the response perplexity
    ppl_median: float | None
    token_ppl: float | None  # exp(mean NLL over all target tokens of the set)
    seconds: float
    backend: str
    model: str
    output: str


def score_dataset(
    input_path: Path,
    output_dir: Path,
    engine: Engine,
    chat_tokenizer: ChatTokenizer,
    model_name: str,
    model_dir: Path | None = None,
    fields: Fields = Fields(),
    run: RunOptions = RunOptions(),
    on_progress: Callable[[int, int], None] | None = None,
) -> ScoreSummary:
    """Score every row of `input_path` into `output_dir`; returns the run's summary.

    `engine`: an engine to run in this process (`make_engine`), or an executor (replicas on a Ray
    cluster: `RayExecutor`). on_progress(rows, tokens) is called after each shard, for progress bars.
    `model_dir` (the weights scored with) is fingerprinted into the manifest, so that export
    can refuse to pair these perplexities with another model.
    """
    started = time.perf_counter()
    executor = as_executor(engine)
    meta = {
        "kind": "scored",
        "input": input_fingerprint(input_path),
        "model": model_name,
        "model_fingerprint": model_fingerprint(model_dir) if model_dir else None,
        "tokenizer": tokenizer_fingerprint(chat_tokenizer.tokenizer),
        "targets": chat_tokenizer.options(),
        "backend": executor.backend,
        "dtype": executor.dtype,
        "fields": asdict(fields),
        "max_length": chat_tokenizer.max_length,
        "truncate": chat_tokenizer.truncate,
        "shard_rows": run.rows_per_shard(SHARD_ROWS), "limit": run.limit,
    }
    check_input(input_path, fields)
    with ShardWriter(output_dir, meta, resume=run.resume, overwrite=run.overwrite) as writer:
        run_pipeline(ScoreStep(chat_tokenizer), executor, plan(input_path, fields, writer, run.limit), writer, on_progress)
        summary = summarise_scored(output_dir, writer, time.perf_counter() - started, executor.backend, model_name)
        writer.finish(asdict(summary))
    return summary


def score_conversations(rows: list, engine: Engine, chat_tokenizer: ChatTokenizer, fields: Fields = Fields()) -> pa.Table:
    """Score rows in memory (a notebook, a script) and get the scored table back, in SCORED_SCHEMA.
    A row is a list of messages or a record in any input shape; one that cannot be used raises
    `RowError` naming its index and field."""
    examples = [normalise(index, {"messages": row} if isinstance(row, list) else row, fields) for index, row in enumerate(rows)]
    tokenized = [chat_tokenizer.encode(example.row, example.messages) for example in examples]
    return scored_table(examples, tokenized, engine.score([t.input_ids for t in tokenized]) if tokenized else [])


@dataclass
class ScoreStep:
    """Scoring a shard: each example rendered and tokenized, the engine's log-probabilities of
    its tokens, into SCORED_SCHEMA."""

    chat_tokenizer: ChatTokenizer

    def prepare(self, example: Example) -> TokenizedExample:
        return self.chat_tokenizer.encode(example.row, example.messages)

    def infer(self, engine: Engine, shard: Shard) -> list[np.ndarray]:
        return engine.score([t.input_ids for t in shard.prepared]) if shard.prepared else []

    def table(self, shard: Shard, logprobs: list[np.ndarray]) -> pa.Table:
        return scored_table(shard.examples, shard.prepared, logprobs)

    def tokens(self, shard: Shard, logprobs) -> int:
        return sum(len(t.input_ids) for t in shard.prepared)


def scored_table(examples: list[Example], tokenized: list[TokenizedExample], logprobs: list[np.ndarray]) -> pa.Table:
    """One row per example, in SCORED_SCHEMA. List columns are built from flat buffers."""
    lengths = np.array([len(t.input_ids) for t in tokenized], dtype=np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    flat_ids = np.concatenate([np.asarray(t.input_ids, dtype=np.int32) for t in tokenized]) if tokenized else np.empty(0, np.int32)
    flat_target = np.concatenate([np.asarray(t.target, dtype=bool) for t in tokenized]) if tokenized else np.empty(0, bool)
    flat_end_of_turn = np.concatenate([np.asarray(t.end_of_turn, dtype=bool) for t in tokenized]) if tokenized else np.empty(0, bool)
    flat_logprobs = np.concatenate(logprobs).astype(np.float32) if tokenized else np.empty(0, np.float32)

    # Per-example mean NLL over target tokens (the first token has no log-probability).
    scored_target = flat_target & np.isfinite(flat_logprobs)
    example_of_token = np.repeat(np.arange(len(tokenized)), lengths)
    n_scored = np.bincount(example_of_token, weights=scored_target, minlength=len(tokenized))
    nll_sum = np.bincount(example_of_token, weights=np.where(scored_target, -flat_logprobs, 0.0), minlength=len(tokenized))
    with np.errstate(invalid="ignore", divide="ignore"):
        nll_mean = nll_sum / n_scored
    nll_mean = pa.array(nll_mean, from_pandas=True)  # NaN (nothing scored) -> null

    return pa.Table.from_arrays(
        [
            pa.array([e.id for e in examples], pa.string()),
            pa.array([e.row for e in examples], pa.int64()),
            pa.array([e.messages for e in examples], SCORED_SCHEMA.field("messages").type),
            pa.array([e.reference for e in examples], pa.string()),
            pa.ListArray.from_arrays(offsets, pa.array(flat_ids)),
            pa.ListArray.from_arrays(offsets, pa.array(flat_logprobs, from_pandas=True)),  # NaN -> null
            pa.ListArray.from_arrays(offsets, pa.array(flat_target)),
            pa.ListArray.from_arrays(offsets, pa.array(flat_end_of_turn)),
            pa.array(np.bincount(example_of_token, weights=flat_target, minlength=len(tokenized)).astype(np.int32)),
            nll_mean,
            pa.compute.exp(nll_mean),
            pa.array([t.truncated for t in tokenized], pa.bool_()),
            pa.array([None if e.extra is None else json.dumps(e.extra, ensure_ascii=False, default=str) for e in examples], pa.string()),
        ],
        schema=SCORED_SCHEMA,
    )


def summarise_scored(output_dir: Path, writer: ShardWriter, seconds: float, backend: str, model: str) -> ScoreSummary:
    """Summary over the whole directory (all shards, resumed ones too), computed with polars."""
    import polars as pl

    shards = writer.manifest.shards
    files = [str(Path(output_dir) / s["file"]) for s in shards]
    rows_in = writer.manifest.rows_read
    rejected = sum(s["n_rejects"] for s in shards)
    if files:
        frame = pl.scan_parquet(files).select(
            pl.len().alias("rows"),
            pl.col("input_ids").list.len().sum().alias("tokens"),
            pl.col("n_target").sum().alias("target_tokens"),
            pl.col("truncated").sum().alias("truncated"),
            pl.col("ppl").mean().alias("ppl_mean"),
            pl.col("ppl").median().alias("ppl_median"),
            (pl.col("nll_mean") * pl.col("n_target")).sum().alias("nll_sum"),
        ).collect().row(0, named=True)
    else:
        frame = {"rows": 0, "tokens": 0, "target_tokens": 0, "truncated": 0, "ppl_mean": None, "ppl_median": None, "nll_sum": 0}
    target_tokens = int(frame["target_tokens"] or 0)
    return ScoreSummary(
        rows_in=rows_in, rows_scored=int(frame["rows"]), rows_rejected=rejected, rows_truncated=int(frame["truncated"] or 0),
        tokens=int(frame["tokens"] or 0), target_tokens=target_tokens,
        ppl_mean=frame["ppl_mean"], ppl_median=frame["ppl_median"],
        token_ppl=float(np.exp(frame["nll_sum"] / target_tokens)) if target_tokens else None,
        seconds=round(seconds, 2), backend=backend, model=model, output=str(output_dir),
    )


def summary_json(summary) -> str:
    return json.dumps(asdict(summary), indent=2)
