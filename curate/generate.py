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
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa

from curate.data import Example, Fields, RowError, prefetched, read_in_chunks
from curate.models import tokenizer_fingerprint
from curate.store import MESSAGE, ShardWriter, input_fingerprint
from curate.tokenize import ChatTokenizer
from curate.verify import verify_all

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


@dataclass
class SamplingOptions:
    """Greedy by default; the paper's Self-Output used n=32, temperature 0.7, top-p 0.95."""

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    seed: int = 0


Answers = list[list[tuple[list[int], bool]]]  # per prompt, n x (token ids without the stop token, finished)


class Generator(Protocol):
    """What `generate_dataset` needs of a backend (`HFGenerator`, `VLLMGenerator`)."""

    backend: str
    dtype: str
    model_name: str

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingOptions) -> Answers: ...


@dataclass
class GenerateSummary:
    rows_in: int
    prompts: int
    answers: int
    rows_rejected: int
    verified: int
    wrong: int
    unchecked: int
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
    generator: Generator,
    chat_tokenizer: ChatTokenizer,
    sampling: SamplingOptions = SamplingOptions(),
    checker: str = "none",
    rephrase: bool = False,
    fields: Fields = Fields(),
    shard_rows: int = 128,
    resume: bool = False,
    overwrite: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
    verify_workers: int | None = None,
    unsafe_verify: bool = False,
) -> GenerateSummary:
    """Answer every prompt of `input_path` into the shard directory `output_dir`, checking each
    answer with `checker`; rows that cannot be used go to its rejects.jsonl.

    A shard's answers are checked (`verify_workers` checks at a time, default one per core)
    while the engine answers the next shard, so the engine never waits for the checker.
    `unsafe_verify` runs code checks without the sandbox where bubblewrap cannot start."""
    started = time.perf_counter()
    tokenizer = chat_tokenizer.tokenizer
    meta = {"kind": "generated", "input": input_fingerprint(input_path), "model": generator.model_name,
            "tokenizer": tokenizer_fingerprint(tokenizer), "backend": generator.backend, "dtype": generator.dtype,
            "fields": asdict(fields), "max_length": chat_tokenizer.max_length, "truncate": False,
            "targets": chat_tokenizer.options(),
            "sampling": asdict(sampling), "checker": checker, "rephrase": rephrase}
    writer = ShardWriter(output_dir, meta, schema=GENERATED_SCHEMA, resume=resume, overwrite=overwrite)

    def prompt_ids(example: Example) -> list[int]:
        ids = chat_tokenizer.prompt_ids(prompt_of(example, rephrase), row=example.row)
        if chat_tokenizer.max_length and len(ids) + sampling.max_new_tokens > chat_tokenizer.max_length:
            raise RowError(example.row, f"prompt of {len(ids)} tokens + --max-new-tokens is over --max-length")
        return ids

    def commit(checked: Future, rejects: list[dict], end_row: int, rows: int, tokens: int) -> None:
        writer.write_shard(checked.result(), rejects, end_row=end_row)
        if on_progress:
            on_progress(rows, tokens)

    chunks = prefetched(read_in_chunks(input_path, prompt_ids, fields, start=writer.next_row, size=shard_rows))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="curate-verify") as checking:
        pending = None
        for end_row, prepared, rejects in chunks:
            examples, prompts = [e for e, _ in prepared], [p for _, p in prepared]
            samples = generator.generate(prompts, sampling) if prompts else []
            if pending:
                commit(*pending)
            checked = checking.submit(_generated_table, examples, samples, tokenizer, checker, verify_workers, unsafe_verify)
            pending = (checked, rejects, end_row, len(prepared) + len(rejects),
                       sum(len(ids) for per_prompt in samples for ids, _ in per_prompt))
        if pending:
            commit(*pending)
    summary = _summarise(output_dir, writer, time.perf_counter() - started, generator.backend)
    writer.finish(asdict(summary))
    return summary


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
    frame = pl.read_parquet(files, columns=["row", "verified", "finished"]) if files else pl.DataFrame(
        schema={"row": pl.Int64, "verified": pl.Boolean, "finished": pl.Boolean})
    return GenerateSummary(
        rows_in=shards[-1]["rows"][1] if shards else 0, prompts=frame["row"].n_unique(), answers=frame.height,
        rows_rejected=sum(s["n_rejects"] for s in shards),
        verified=int((frame["verified"] == True).sum()), wrong=int((frame["verified"] == False).sum()),  # noqa: E712
        unchecked=int(frame["verified"].is_null().sum()), unfinished=int((~frame["finished"]).sum()),
        seconds=round(seconds, 2), backend=backend, output=str(output_dir))


# ---------------------------------------------------------------- backends


class HFGenerator:
    """transformers `generate`, a batch of prompts at a time (left-padded)."""

    backend = "hf"

    def __init__(self, model_dir, dtype: str = "auto", batch_size: int = 16):
        from curate.models import load_tokenizer
        from curate.scoring.hf import load_causal_lm

        self.model, self.device, self.dtype = load_causal_lm(model_dir, dtype)
        self.model_name = str(model_dir)
        tokenizer = load_tokenizer(model_dir)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.stop_ids = _stop_ids(tokenizer, self.model.generation_config)
        self.batch_size = batch_size

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingOptions) -> Answers:
        import torch

        torch.manual_seed(sampling.seed)
        results = []
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start : start + self.batch_size]
            width = max(map(len, batch))
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, prompt in enumerate(batch):
                ids[row, width - len(prompt):] = torch.as_tensor(prompt)
                mask[row, width - len(prompt):] = 1
            greedy = sampling.temperature == 0
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device), do_sample=not greedy,
                    temperature=None if greedy else sampling.temperature, top_p=None if greedy else sampling.top_p,
                    top_k=None, max_new_tokens=sampling.max_new_tokens, num_return_sequences=sampling.n,
                    eos_token_id=self.stop_ids, pad_token_id=self.pad_id)
            for row in range(len(batch)):
                results.append([self._trim(out[row * sampling.n + k, width:].tolist()) for k in range(sampling.n)])
        return results

    def _trim(self, ids: list[int]) -> tuple[list[int], bool]:
        for i, token in enumerate(ids):
            if token in self.stop_ids:
                return ids[:i], True
        return ids, False


class VLLMGenerator:
    """vLLM sampling on token ids; decoding is ours, with the same tokenizer as scoring."""

    backend = "vllm"

    def __init__(self, model_dir, dtype: str = "auto", max_model_len: int = 4096, scorer=None):
        from transformers import GenerationConfig

        from curate.models import load_tokenizer
        from curate.scoring.vllm import VLLMScorer

        engine = scorer or VLLMScorer(model_dir, dtype=dtype, max_model_len=max_model_len)
        self.llm, self.dtype, self.model_name = engine.llm, engine.dtype, str(model_dir)
        tokenizer = load_tokenizer(model_dir)
        try:
            generation_config = GenerationConfig.from_pretrained(model_dir)
        except OSError:
            generation_config = None
        self.stop_ids = _stop_ids(tokenizer, generation_config)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingOptions) -> Answers:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                max_tokens=sampling.max_new_tokens, seed=sampling.seed, detokenize=False,
                                stop_token_ids=self.stop_ids)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        return [[([t for t in c.token_ids if t not in self.stop_ids], c.finish_reason == "stop") for c in o.outputs]
                for o in outputs]


def _stop_ids(tokenizer, generation_config) -> list[int]:
    """End-of-sequence ids: the generation config's (end-of-turn included) and the tokenizer's."""
    ids = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))
