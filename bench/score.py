"""Scoring throughput: hf engine, vllm engine, and a bare forward pass, on the same tokens;
the non-model work alone; and Ray replicas against the engine in this process.

    python bench/score.py [--repeat 4] [--model DIR] [--skip-vllm] [--skip-ray]

The baseline is a bare transformers forward pass over the same batches (logits computed,
nothing extracted): the ratios say what log-probability extraction and each engine cost.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from curate.data import normalise
from curate.engines.base import EngineSettings
from curate.engines.hf import HFEngine
from curate.models import load_tokenizer, resolve_model
from curate.pipeline import RunOptions
from curate.score import score_dataset
from curate.tokenize import ChatTokenizer

SAMPLE = Path(__file__).resolve().parents[1] / "curate" / "samples" / "sample.jsonl"


def sample_token_ids(model_dir: Path, repeat: int) -> list[list[int]]:
    chat = ChatTokenizer(load_tokenizer(model_dir))
    lines = SAMPLE.read_text().splitlines()
    ids = [chat.encode(row, normalise(row, json.loads(line)).messages).input_ids for row, line in enumerate(lines)]
    return ids * repeat


def preparation_rate(model_dir: Path, repeat: int) -> float:
    """The non-model work of scoring, on one core: render with the chat template, tokenize,
    find the target tokens (what the prefetch thread does while the engine works)."""
    chat = ChatTokenizer(load_tokenizer(model_dir))
    conversations = [normalise(row, json.loads(line)).messages for row, line in enumerate(SAMPLE.read_text().splitlines())]
    start = time.perf_counter()
    tokens = sum(len(chat.encode(row, messages).input_ids) for _ in range(repeat) for row, messages in enumerate(conversations))
    rate = tokens / (time.perf_counter() - start)
    print(f"{'prepare (no model)':<28} {'':8}    {rate:10,.0f} tok/s", flush=True)
    return rate


def timed(label: str, fn, token_ids: list[list[int]]) -> float:
    fn(token_ids[:8])  # warm-up (first-call allocations, lazy init)
    tokens = sum(map(len, token_ids))
    start = time.perf_counter()
    fn(token_ids)
    seconds = time.perf_counter() - start
    rate = tokens / seconds
    print(f"{label:<28} {seconds:8.2f} s  {rate:10,.0f} tok/s", flush=True)
    return rate


def bare_forward(scorer: HFEngine, token_ids: list[list[int]]) -> None:
    """The same batches as HFEngine, through the full model, logits discarded."""
    with torch.inference_mode():
        for batch in scorer._batches(token_ids):
            sequences = [token_ids[i] for i in batch]
            width = max(map(len, sequences))
            ids = torch.zeros((len(sequences), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, sequence in enumerate(sequences):
                ids[row, : len(sequence)] = torch.as_tensor(sequence)
                mask[row, : len(sequence)] = 1
            scorer.model(input_ids=ids, attention_mask=mask)


class RecordedEngine:
    """Hands back log-probabilities recorded from the real engine: `score_dataset` with it times
    everything but the model (read, render, tokenize, targets, table, write, commit)."""

    backend, dtype, model_name = "recorded", "float32", "recorded"

    def __init__(self, engine, token_ids: list[list[int]]):
        self.recorded = {tuple(ids): logprobs for ids, logprobs in zip(token_ids, engine.score(token_ids))}

    def score(self, token_ids):
        return [self.recorded[tuple(ids)] for ids in token_ids]


def repeated_input(folder: Path, repeat: int, name: str = "input") -> Path:
    path = folder / f"{name}.jsonl"
    path.write_text(SAMPLE.read_text() * repeat)
    return path


def pipeline_rate(label: str, engine, chat: ChatTokenizer, source: Path, folder: Path, tokens: int) -> tuple[float, float]:
    """(tokens/s, seconds) of a whole `score_dataset` run."""
    start = time.perf_counter()
    score_dataset(source, folder / label.replace(" ", "-"), engine, chat, model_name="bench", run=RunOptions(shard_rows=64))
    seconds = time.perf_counter() - start
    print(f"{label:<28} {seconds:8.2f} s  {tokens / seconds:10,.0f} tok/s", flush=True)
    return tokens / seconds, seconds


def main() -> None:
    if __name__ != "__main__":
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--repeat", type=int, default=2, help="copies of the bundled sample to score")
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--skip-ray", action="store_true", help="no Ray comparison (needs curate[ray] and vllm)")
    parser.add_argument("--pipeline-repeat", type=int, default=40,
                        help="copies of the sample for the no-model pipeline (enough that per-run costs do not dominate)")
    args = parser.parse_args()

    model_dir = resolve_model(args.model)
    token_ids = sample_token_ids(model_dir, args.repeat)
    tokens = sum(map(len, token_ids))
    threads = torch.get_num_threads()
    print(f"model {model_dir}\n{len(token_ids)} sequences, {tokens:,} tokens, torch threads {threads}\n")

    hf = HFEngine(model_dir, EngineSettings(dtype="float32"))
    rates = {"bare forward (baseline)": timed("bare forward (baseline)", lambda ids: bare_forward(hf, ids), token_ids)}
    rates["hf backend"] = timed("hf backend", hf.score, token_ids)
    rates["prepare (no model)"] = preparation_rate(model_dir, args.repeat)
    chat = ChatTokenizer(load_tokenizer(model_dir))
    folder = Path(tempfile.mkdtemp(prefix="curate-bench-"))
    source = repeated_input(folder, args.repeat)
    recorded = RecordedEngine(hf, token_ids)
    many = repeated_input(folder, args.pipeline_repeat, "pipeline")
    many_tokens = tokens // args.repeat * args.pipeline_repeat
    cpu = time.process_time()
    rates["pipeline (no model)"], _ = pipeline_rate("pipeline (no model)", recorded, chat, many, folder, many_tokens)
    print(f"{'  per CPU-second':<28} {'':8}    {many_tokens / (time.process_time() - cpu):10,.0f} tok/s", flush=True)
    if not args.skip_vllm:
        from curate.engines.vllm import VLLMEngine

        started = time.perf_counter()
        engine = VLLMEngine(model_dir, EngineSettings(dtype="float32"))
        print(f"{'vllm engine start':<28} {time.perf_counter() - started:8.2f} s")
        rates["vllm backend"] = timed("vllm backend", engine.score, token_ids)
        rates["vllm score_dataset"], plain_seconds = pipeline_rate("vllm score_dataset", engine, chat, source, folder, tokens)
        if not args.skip_ray:
            from curate.executors.ray import RayExecutor, RayOptions

            started = time.perf_counter()
            replicas = RayExecutor("vllm", model_dir, EngineSettings(dtype="float32"), RayOptions(replicas=1))
            start_seconds = time.perf_counter() - started
            print(f"{'ray start (cluster+replica)':<28} {start_seconds:8.2f} s")
            rates["ray score_dataset"], ray_seconds = pipeline_rate("ray score_dataset", replicas, chat, source, folder, tokens)
            replicas.close()
            print(f"\nRay, one replica, against the engine in this process: {ray_seconds / plain_seconds:.2f}x the time "
                  f"({(ray_seconds + start_seconds) / plain_seconds:.2f}x with the {start_seconds:.0f} s start-up)")

    baseline = rates["bare forward (baseline)"]
    print("\nratio to the bare forward pass (higher is faster)")
    for label, rate in rates.items():
        print(f"  {label:<26} {rate / baseline:6.2f}x")
    if "vllm backend" in rates:
        print(f"  {'vllm / hf':<26} {rates['vllm backend'] / rates['hf backend']:6.2f}x")


main()
