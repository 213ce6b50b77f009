"""Self-output: the model answers each prompt itself, and the answer is checked.

`generate_dataset` streams a dataset like `score_dataset`: each example's prompt (the
conversation before its last assistant turn) is rendered with the chat template, answered
`n` times (greedy by default), and every answer is written with its verdict, never
dropped. The output directory is a resumable shard directory that `curate score` reads.

Rephrase (`rephrase=True`) is the paper's other baseline: the model is shown the reference
answer and asked to write its own; the result is paired with the original prompt.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa

from curate.data import Example, Fields, RowError, check_input
from curate.engines.base import Answers, Engine, SamplingOptions
from curate.executors import as_executor
from curate.models import tokenizer_fingerprint
from curate.pipeline import RunOptions, Shard, plan, run_pipeline
from curate.store import MESSAGE, ShardWriter, input_fingerprint
from curate.tokenize import ChatTokenizer
from curate.verify import ONE_PROCESS, verify_all

GENERATED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("row", pa.int64()),
        ("sample", pa.int32()),
        ("messages", pa.list_(MESSAGE)),  # the prompt plus the generated answer
        ("reference", pa.string()),
        ("answer", pa.string()),
        ("ground_truth", pa.string()),
        ("verified", pa.bool_()),  # null: no checker, or nothing to check against
        ("verify_reason", pa.string()),
        ("n_tokens", pa.int32()),
        ("finished", pa.bool_()),  # False: stopped at max_new_tokens
    ]
)

REPHRASE_PROMPT = (
    "Below are an instruction that describes a task along with a reference answer. "
    "Using the reference answer as a guide, write your own response.\n\n"
    "### Instruction:\n{instruction}\n\n### Reference Answer:\n{reference}\n\n### Response:\n"
)


SHARD_ROWS = 128  # prompts per shard when --shard-rows is not given: answers take longer than scores


@dataclass
class GenerateSummary:
    rows_in: int
    prompts: int
    answers: int
    rows_rejected: int
    verified: int
    wrong: int
    unchecked: int
    one_process: int  # code checks whose tests ran in the answer's own process: a verdict it could forge
    unfinished: int
    seconds: float
    backend: str
    output: str


def prompt_of(example: Example, rephrase: bool) -> list[dict]:
    """The conversation up to the last assistant turn (or the rephrase request for it)."""
    last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
    prompt = example.messages[:last]
    if not rephrase:
        return prompt
    instruction = "\n\n".join(m["content"] for m in prompt if m["role"] != "system")
    request = REPHRASE_PROMPT.format(instruction=instruction, reference=example.messages[last]["content"])
    return [m for m in prompt if m["role"] == "system"] + [{"role": "user", "content": request}]


def generate_dataset(
    input_path: Path,
    output_dir: Path,
    engine: Engine,
    chat_tokenizer: ChatTokenizer,
    sampling: SamplingOptions = SamplingOptions(),
    checker: str = "none",
    rephrase: bool = False,
    fields: Fields = Fields(),
    run: RunOptions = RunOptions(),
    on_progress: Callable[[int, int], None] | None = None,
    verify_workers: int | None = None,
    unsafe_verify: bool = False,
) -> GenerateSummary:
    """Answer every prompt of `input_path` into the shard directory `output_dir`, checking each
    answer with `checker`; rows that cannot be used go to its rejects.jsonl.

    `engine`: an engine in this process, or an executor (`RayExecutor`). A shard's answers are
    checked (`verify_workers` checks at a time, default one per core) while the engine answers
    the next shard, so the engine never waits for the checker. `unsafe_verify` runs code checks
    without the sandbox where bubblewrap cannot start."""
    started = time.perf_counter()
    executor = as_executor(engine)
    tokenizer = chat_tokenizer.tokenizer
    meta = {"kind": "generated", "input": input_fingerprint(input_path), "model": executor.model_name,
            "tokenizer": tokenizer_fingerprint(tokenizer), "backend": executor.backend, "dtype": executor.dtype,
            "fields": asdict(fields), "max_length": chat_tokenizer.max_length, "truncate": False,
            "targets": chat_tokenizer.options(), "shard_rows": run.rows_per_shard(SHARD_ROWS), "limit": run.limit,
            "sampling": asdict(sampling), "checker": checker, "rephrase": rephrase}
    check_input(input_path, fields)
    step = GenerateStep(chat_tokenizer, sampling, checker, verify_workers, unsafe_verify, rephrase)
    with ShardWriter(output_dir, meta, schema=GENERATED_SCHEMA, resume=run.resume, overwrite=run.overwrite) as writer:
        run_pipeline(step, executor, plan(input_path, fields, writer, run.limit), writer, on_progress)
        summary = _summarise(output_dir, writer, time.perf_counter() - started, executor.backend)
        writer.finish(asdict(summary))
    return summary


@dataclass
class GenerateStep:
    """Answering a shard: each prompt rendered, the engine samples, then (CPU work) answers are
    decoded and checked."""

    chat_tokenizer: ChatTokenizer
    sampling: SamplingOptions
    checker: str
    verify_workers: int | None
    unsafe_verify: bool
    rephrase: bool = False

    @property
    def tokenizer(self):
        return self.chat_tokenizer.tokenizer

    def prepare(self, example: Example) -> list[int]:
        ids = self.chat_tokenizer.prompt_ids(prompt_of(example, self.rephrase), row=example.row)
        max_length = self.chat_tokenizer.max_length
        if max_length and len(ids) + self.sampling.max_new_tokens > max_length:
            raise RowError(example.row, f"prompt of {len(ids)} tokens + --max-new-tokens is over --max-length")
        return ids

    def infer(self, engine: Engine, shard: Shard) -> Answers:
        return engine.generate(shard.prepared, self.sampling) if shard.prepared else []

    def table(self, shard: Shard, samples: Answers) -> pa.Table:
        return _generated_table(shard.examples, samples, self.tokenizer, self.checker, self.verify_workers, self.unsafe_verify)

    def tokens(self, shard: Shard, samples: Answers) -> int:
        return sum(len(ids) for per_prompt in samples for ids, _ in per_prompt)


def _generated_table(examples, samples, tokenizer, checker: str, workers: int | None, unsafe: bool) -> pa.Table:
    answers = [[tokenizer.decode(ids, skip_special_tokens=True).strip() for ids, _ in per_prompt] for per_prompt in samples]
    verdicts = iter(verify_all(checker, [(answer, example.reference, example.extra)
                                         for example, texts in zip(examples, answers) for answer in texts],
                               workers=workers, unsafe=unsafe))
    rows = []
    for example, per_prompt, texts in zip(examples, samples, answers):
        # Earlier assistant turns of a multi-turn prompt are the dataset's, not the model's: context only.
        prompt = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in prompt_of(example, rephrase=False)]
        ground_truth = [m for m in example.messages if m["role"] == "assistant"][-1]["content"]
        for index, ((ids, finished), answer) in enumerate(zip(per_prompt, texts)):
            verdict = next(verdicts)
            rows.append({"id": example.id, "row": example.row, "sample": index,
                         "messages": [*prompt, {"role": "assistant", "content": answer}],
                         "reference": example.reference, "answer": answer, "ground_truth": ground_truth,
                         "verified": verdict.verified, "verify_reason": verdict.reason,
                         "n_tokens": len(ids), "finished": finished})
    return pa.Table.from_pylist(rows, schema=GENERATED_SCHEMA)


def _summarise(output_dir: Path, writer: ShardWriter, seconds: float, backend: str) -> GenerateSummary:
    import polars as pl

    shards = writer.manifest.shards
    files = [str(Path(output_dir) / s["file"]) for s in shards]
    frame = pl.read_parquet(files, columns=["row", "verified", "verify_reason", "finished"]) if files else pl.DataFrame(
        schema={"row": pl.Int64, "verified": pl.Boolean, "verify_reason": pl.String, "finished": pl.Boolean})
    return GenerateSummary(
        rows_in=writer.manifest.rows_read, prompts=frame["row"].n_unique(), answers=frame.height,
        rows_rejected=sum(s["n_rejects"] for s in shards),
        verified=int((frame["verified"] == True).sum()), wrong=int((frame["verified"] == False).sum()),  # noqa: E712
        unchecked=int(frame["verified"].is_null().sum()), unfinished=int((~frame["finished"]).sum()),
        one_process=int(frame["verify_reason"].str.contains(ONE_PROCESS, literal=True).sum()),
        seconds=round(seconds, 2), backend=backend, output=str(output_dir))
