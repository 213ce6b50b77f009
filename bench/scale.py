"""How far one driver scales: `curate score` on Ray with N simulated engines.

    python bench/scale.py [--rate 20000] [--replicas 1,2,4,8,16] [--copies 40]

Each replica is a real `ShardWorker` (it reads nothing: the driver sends raw records; it
normalises, renders, tokenizes, builds the table and writes the shard) whose engine is
simulated: it returns log-probabilities at a fixed `--rate` tokens/s per replica and spends no
model CPU. So the aggregate against N x rate says what the pipeline around the engines costs,
and the driver's CPU-seconds per million tokens say how many engines one driver can feed.

On a machine with few cores the replicas' own CPU work (tokenizing, Parquet) competes for the
cores at large N; the driver's CPU time is measured on its own process (`time.process_time`).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

SAMPLE = Path(__file__).resolve().parents[1] / "curate" / "samples" / "sample.jsonl"


def bundled_input(copies: int, prefix: str):
    """(model dir, its ChatTokenizer, a fresh work folder, `copies` of the sample in it): what the
    Ray benchmarks score with the bundled model."""
    from curate.models import load_tokenizer, resolve_model
    from curate.tokenize import ChatTokenizer

    model_dir = resolve_model(None)
    work = Path(tempfile.mkdtemp(prefix=prefix))
    return model_dir, ChatTokenizer(load_tokenizer(model_dir), max_length=4096), work, sample_copies(work, copies)


def sample_copies(folder: Path, copies: int) -> Path:
    """The bundled sample `copies` times over, with fresh ids, as folder/input.jsonl."""
    rows = SAMPLE.read_text().splitlines()
    source = folder / "input.jsonl"
    source.write_text("".join(json.dumps({**json.loads(line), "id": f"{copy}-{i}"}) + "\n"
                              for copy in range(copies) for i, line in enumerate(rows)))
    return source


class SimulatedEngine:
    """An engine that answers `score` at `rate` tokens/s with made-up log-probabilities."""

    backend, dtype, model_name = "simulated", "float32", "simulated"

    def __init__(self, rate: float):
        self.rate = rate

    def score(self, token_ids):
        time.sleep(sum(map(len, token_ids)) / self.rate)
        out = []
        for ids in token_ids:
            logprobs = np.full(len(ids), -1.0, dtype=np.float32)
            logprobs[0] = np.nan
            out.append(logprobs)
        return out


class SimulatedFactory:
    """Picklable: builds a replica's simulated engine."""

    def __init__(self, rate: float):
        self.rate = rate

    def __call__(self):
        return SimulatedEngine(self.rate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=20_000, help="tokens/s of each simulated engine")
    parser.add_argument("--replicas", default="1,2,4,8,16")
    parser.add_argument("--copies", type=int, default=40, help="copies of the bundled sample (82 rows, 13,892 tokens)")
    parser.add_argument("--shard-rows", type=int, default=64)
    parser.add_argument("--profile", action="store_true", help="print where the driver's CPU time goes")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import ray

    from curate.executors.ray import RayExecutor, RayOptions
    from curate.pipeline import RunOptions
    from curate.score import score_dataset

    model_dir, chat, work, source = bundled_input(args.copies, "curate-scale-")
    rows = SAMPLE.read_text().splitlines()
    ray.init(num_cpus=os.cpu_count(), object_store_memory=300 * 2**20, include_dashboard=False, log_to_driver=False)

    print(f"simulated engines at {args.rate:,.0f} tok/s each; {args.copies * len(rows):,} rows; "
          f"{os.cpu_count()} cores on this machine")
    print(f"{'replicas':>8}  {'tokens':>9}  {'seconds':>7}  {'tok/s':>9}  {'of N x rate':>11}  "
          f"{'driver CPU s / M tok':>20}  {'driver limit tok/s':>18}")
    for replicas in [int(n) for n in args.replicas.split(",")]:
        executor = RayExecutor("simulated", model_dir, options=RayOptions(replicas=replicas, cpus_per_replica=0),
                               engine_factory=SimulatedFactory(args.rate))
        out = work / f"out-{replicas}"
        profile = cProfile.Profile() if args.profile else None
        cpu, wall = time.process_time(), time.perf_counter()
        if profile:
            profile.enable()
        summary = score_dataset(source, out, executor, chat, model_name="simulated", run=RunOptions(shard_rows=args.shard_rows))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if profile:
            profile.disable()
            pstats.Stats(profile).sort_stats("tottime").print_stats(12)
        executor.close()
        rate = summary.tokens / wall
        per_million = cpu / summary.tokens * 1e6
        print(f"{replicas:>8}  {summary.tokens:>9,}  {wall:>7.2f}  {rate:>9,.0f}  {rate / (replicas * args.rate):>11.2f}  "
              f"{per_million:>20.3f}  {1e6 / per_million:>18,.0f}", flush=True)
        shutil.rmtree(out)
    ray.shutdown()
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
