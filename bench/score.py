"""Scoring throughput: hf backend, vllm backend, and a bare forward pass, on the same tokens.

    python bench/score.py [--repeat 4] [--model DIR] [--skip-vllm]

The baseline is a bare transformers forward pass over the same batches (logits computed,
nothing extracted): the ratios say what log-probability extraction and each engine cost.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from curate.data import normalise
from curate.models import load_tokenizer, resolve_model
from curate.scoring.hf import HFScorer
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


def bare_forward(scorer: HFScorer, token_ids: list[list[int]]) -> None:
    """The same batches as HFScorer, through the full model, logits discarded."""
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


def main() -> None:
    if __name__ != "__main__":
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--repeat", type=int, default=2, help="copies of the bundled sample to score")
    parser.add_argument("--skip-vllm", action="store_true")
    args = parser.parse_args()

    model_dir = resolve_model(args.model)
    token_ids = sample_token_ids(model_dir, args.repeat)
    tokens = sum(map(len, token_ids))
    print(f"model {model_dir}\n{len(token_ids)} sequences, {tokens:,} tokens, torch threads {torch.get_num_threads()}\n")

    hf = HFScorer(model_dir, dtype="float32")
    rates = {"bare forward (baseline)": timed("bare forward (baseline)", lambda ids: bare_forward(hf, ids), token_ids)}
    rates["hf backend"] = timed("hf backend", hf.score, token_ids)
    rates["prepare (no model)"] = preparation_rate(model_dir, args.repeat)
    if not args.skip_vllm:
        from curate.scoring.vllm import VLLMScorer

        started = time.perf_counter()
        engine = VLLMScorer(model_dir, dtype="float32")
        print(f"{'vllm engine start':<28} {time.perf_counter() - started:8.2f} s")
        rates["vllm backend"] = timed("vllm backend", engine.score, token_ids)

    baseline = rates["bare forward (baseline)"]
    print("\nratio to the bare forward pass (higher is faster)")
    for label, rate in rates.items():
        print(f"  {label:<26} {rate / baseline:6.2f}x")
    if "vllm backend" in rates:
        print(f"  {'vllm / hf':<26} {rates['vllm backend'] / rates['hf backend']:6.2f}x")


main()
