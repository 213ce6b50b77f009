"""The pipeline steps of `curate eval` that score (no generation): multiple-choice options with
the gold answer, and gold answers alone. They run as scoring does (plan -> run on an executor ->
commit), so an evaluation resumes where it stopped, runs on Ray replicas as well as here, and
rows it cannot use are rejects with their reason, not silently skipped.

Each multiple-choice row is one group: its options as the assistant's answer to the prompt, and
its gold answer as the dataset writes it. An engine with `score_groups` (the HF engine) runs the
group's shared prompt once; others score each sequence whole (vLLM skips its prefix cache for
prompt log-probabilities).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from curate.data import Example, Fields, RowError, check_input
from curate.pipeline import Shard, plan, run_pipeline
from curate.store import ShardWriter, input_fingerprint, open_scored
from curate.tokenize import ChatTokenizer, TokenizedExample

SHARD_ROWS = 256  # rows per shard of an evaluation run (the unit of its resume and of work on Ray)

CHOICE_SCHEMA = pa.schema([
    ("id", pa.string()), ("row", pa.int64()), ("gold", pa.int64()),
    ("loglik", pa.list_(pa.float64())),  # per option: the sum of its content tokens' log-probabilities
    ("option_bytes", pa.list_(pa.int64())),  # per option: its UTF-8 length (acc_norm divides by it)
    ("gold_nll", pa.float64()),  # mean NLL per token of the gold answer (its content and end-of-turn)
])
GOLD_SCHEMA = pa.schema([("id", pa.string()), ("row", pa.int64()), ("gold_nll", pa.float64())])


def score_groups(engine, groups: list[list[list[int]]]) -> list[list[np.ndarray]]:
    """What `engine.score` gives each sequence of each group, each group's common prefix run once
    where the engine can (`score_groups`)."""
    if hasattr(engine, "score_groups"):
        return engine.score_groups(groups)
    flat = iter(engine.score([sequence for group in groups for sequence in group]))
    return [[next(flat) for _ in group] for group in groups]


def answer_nll(logprobs: np.ndarray, target) -> float:
    """Mean NLL per token over an answer's target tokens (its content and end-of-turn)."""
    scored = np.asarray(target) & np.isfinite(logprobs)
    return float(-logprobs[scored].mean()) if scored.any() else math.nan


@dataclass
class ChoiceStep:
    """A multiple-choice shard: per row, each option's log-likelihood and the gold answer's NLL."""

    chat_tokenizer: ChatTokenizer

    def prepare(self, example: Example) -> list[TokenizedExample]:
        extra = example.extra or {}
        choices, gold = extra.get("choices"), extra.get("gold")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise RowError(example.row, "a multiple-choice row needs `choices`: a list of at least two strings")
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
            raise RowError(example.row, f"`gold` must be the index of the right choice (0-{len(choices) - 1}), not {gold!r}")
        if not isinstance(extra.get("prompt"), str):
            raise RowError(example.row, "a multiple-choice row needs `prompt`: the question as the user asks it")
        # The options as answers (OLMES's leading space belongs to a raw-text continuation, not a turn).
        options = [self.chat_tokenizer.encode(example.row, [{"role": "user", "content": extra["prompt"]},
                                                            {"role": "assistant", "content": choice.strip()}])
                   for choice in choices]
        return [*options, self.chat_tokenizer.encode(example.row, example.messages)]

    def infer(self, engine, shard: Shard) -> list[list[np.ndarray]]:
        return score_groups(engine, [[e.input_ids for e in group] for group in shard.prepared]) if shard.prepared else []

    def table(self, shard: Shard, scored: list[list[np.ndarray]]) -> pa.Table:
        rows = []
        for example, group, group_logprobs in zip(shard.examples, shard.prepared, scored):
            loglik = []
            for logprobs, encoded in zip(group_logprobs[:-1], group[:-1]):
                content = np.asarray(encoded.target) & ~np.asarray(encoded.end_of_turn)  # options compare as texts
                loglik.append(float(np.nansum(np.where(content, logprobs, 0.0))))
            choices = example.extra["choices"]
            rows.append({"id": example.id, "row": example.row, "gold": int(example.extra["gold"]), "loglik": loglik,
                         "option_bytes": [len(c.strip().encode()) for c in choices],
                         "gold_nll": answer_nll(group_logprobs[-1], group[-1].target)})
        return pa.Table.from_pylist(rows, schema=CHOICE_SCHEMA)

    def tokens(self, shard: Shard, scored) -> int:
        return sum(len(e.input_ids) for group in shard.prepared for e in group)


@dataclass
class GoldNLLStep:
    """A shard of gold answers: each one's mean NLL per token."""

    chat_tokenizer: ChatTokenizer

    def prepare(self, example: Example) -> TokenizedExample:
        return self.chat_tokenizer.encode(example.row, example.messages)

    def infer(self, engine, shard: Shard) -> list[np.ndarray]:
        return engine.score([t.input_ids for t in shard.prepared]) if shard.prepared else []

    def table(self, shard: Shard, logprobs: list[np.ndarray]) -> pa.Table:
        return pa.Table.from_pylist([{"id": e.id, "row": e.row, "gold_nll": answer_nll(lp, t.target)}
                                     for e, t, lp in zip(shard.examples, shard.prepared, logprobs)], schema=GOLD_SCHEMA)

    def tokens(self, shard: Shard, logprobs) -> int:
        return sum(len(t.input_ids) for t in shard.prepared)


def run_scoring_step(step: ChoiceStep | GoldNLLStep, source: Path, directory: Path, executor, model_dir: Path,
                     chat_tokenizer: ChatTokenizer, shard_rows: int | None = None) -> tuple[pa.Table, int]:
    """Run `step` over `source` into the shard directory `directory` (resuming it if it is there, and
    refusing it if it was made with another model, tokenizer or input); returns every row's result
    in input order and the number of rejected rows (their reasons are in its rejects.jsonl)."""
    from curate.models import model_fingerprint, tokenizer_fingerprint

    kind, schema = ("choices", CHOICE_SCHEMA) if isinstance(step, ChoiceStep) else ("gold-nll", GOLD_SCHEMA)
    meta = {"kind": kind, "input": input_fingerprint(source), "model": executor.model_name,
            "model_fingerprint": model_fingerprint(model_dir), "tokenizer": tokenizer_fingerprint(chat_tokenizer.tokenizer),
            "targets": chat_tokenizer.options(), "max_length": chat_tokenizer.max_length,
            "shard_rows": shard_rows or SHARD_ROWS,
            "limit": None}
    check_input(source, Fields())
    resume = (Path(directory) / "manifest.json").exists()
    with ShardWriter(directory, meta, schema=schema, resume=resume) as writer:
        run_pipeline(step, executor, plan(source, Fields(), writer), writer)
        writer.finish({"rows_in": writer.manifest.rows_read})
    manifest, shards = open_scored(directory)
    table = pa.concat_tables([_read(shard) for shard in shards]) if shards else schema.empty_table()
    return table.sort_by("row"), sum(s["n_rejects"] for s in manifest.shards)


def _read(shard: Path) -> pa.Table:
    import pyarrow.parquet as pq

    return pq.read_table(shard).replace_schema_metadata(None)
