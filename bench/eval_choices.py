"""Multiple-choice evaluation: each row's prompt scored once and shared by its options
(`HFEngine.score_groups`, the prompt's keys and values reused) against every option scored
whole (`HFEngine.score`, what `curate eval` did before), in the same run on the same rows.

    python bench/eval_choices.py [--tasks arc_easy,piqa,sciq,hellaswag] [--rows 40] [--repeat 2] [--model DIR] [--vllm]

Per task: rows, sequences, tokens run through the model each way, seconds each way (the fastest of
`--repeat` alternated runs), the speed-up, and the largest
difference between the two ways' log-probabilities (float rounding only). Each group also holds
the row's gold answer (what `curate eval` scores for gold NLL), as `curate eval` does.

`--vllm`: also the vLLM engine scoring every option whole (it has no shared-prompt path: vLLM skips
its prefix cache for prompt log-probabilities), the other way `curate eval --backend vllm` could go.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from curate.engines.base import EngineSettings
from curate.engines.hf import HFEngine, _shared_prefix
from curate.evaluate import task_file
from curate.models import load_tokenizer, resolve_model
from curate.tokenize import ChatTokenizer


def option_groups(task: str, rows: int, chat: ChatTokenizer) -> list[list[list[int]]]:
    """What `curate eval` scores for each of the first `rows` rows: every option as the answer, then the gold answer."""
    groups = []
    with open(task_file(task), encoding="utf-8") as lines:
        for index, line in zip(range(rows), lines):
            row = json.loads(line)
            prompt = {"role": "user", "content": row["prompt"]}
            groups.append([chat.encode(index, [prompt, {"role": "assistant", "content": choice.strip()}]).input_ids
                           for choice in row["choices"]] + [chat.encode(index, row["messages"]).input_ids])
    return groups

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="arc_easy,piqa,sciq,hellaswag")
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--model", default="default")
    parser.add_argument("--repeat", type=int, default=2, help="alternated runs of each way; the fastest counts")
    parser.add_argument("--vllm", action="store_true", help="also time the vLLM engine scoring each option whole")
    args = parser.parse_args()
    model_dir = resolve_model(args.model)
    chat = ChatTokenizer(load_tokenizer(model_dir), max_length=4096)
    engine = HFEngine(model_dir, EngineSettings(dtype="float32"))
    engine.score([[1, 2, 3]])  # warm-up
    vllm = None
    if args.vllm:
        from curate.engines.vllm import VLLMEngine

        vllm = VLLMEngine(model_dir, EngineSettings(dtype="float32", max_model_len=4096))
        vllm.score([[1, 2, 3]])
    print(f"{'task':<10} {'rows':>5} {'seqs':>5} {'tokens whole':>12} {'shared':>7} {'s whole':>8} {'s shared':>8} "
          f"{'speed-up':>8} {'max |Δ logprob|':>15}" + (f" {'s vllm':>7} {'shared/vllm':>11}" if vllm else ""))
    total_whole = total_shared = total_vllm = 0.0
    for task in args.tasks.split(","):
        groups = option_groups(task, args.rows, chat)
        flat = [sequence for group in groups for sequence in group]
        seconds_whole = seconds_shared = float("inf")
        for _ in range(args.repeat):  # alternated, the fastest of each kept: the machine's load varies
            started = time.perf_counter()
            whole = engine.score(flat)
            seconds_whole = min(seconds_whole, time.perf_counter() - started)
            started = time.perf_counter()
            shared = [logprobs for group in engine.score_groups(groups) for logprobs in group]
            seconds_shared = min(seconds_shared, time.perf_counter() - started)
        seconds_vllm = float("inf")
        for _ in range(args.repeat if vllm else 0):
            started = time.perf_counter()
            vllm.score(flat)
            seconds_vllm = min(seconds_vllm, time.perf_counter() - started)
        total_vllm += seconds_vllm if vllm else 0.0
        difference = max(float(np.nanmax(np.abs(a - b))) for a, b in zip(whole, shared))
        shared_tokens = sum(_shared_prefix(g) + sum(len(s) - _shared_prefix(g) for s in g) for g in groups)
        total_whole, total_shared = total_whole + seconds_whole, total_shared + seconds_shared
        print(f"{task:<10} {len(groups):>5} {len(flat):>5} {sum(map(len, flat)):>12} {shared_tokens:>7} "
              f"{seconds_whole:>8.1f} {seconds_shared:>8.1f} {seconds_whole / seconds_shared:>7.2f}x {difference:>15.2e}"
              + (f" {seconds_vllm:>7.1f} {seconds_vllm / seconds_shared:>10.2f}x" if vllm else ""))
    print(f"{'all':<10} {'':>5} {'':>5} {'':>12} {'':>7} {total_whole:>8.1f} {total_shared:>8.1f} "
          f"{total_whole / total_shared:>7.2f}x" + (f" {'':>15} {total_vllm:>7.1f} {total_vllm / total_shared:>10.2f}x"
                                                    if vllm else ""))


if __name__ == "__main__":
    main()
