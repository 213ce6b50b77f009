"""Where one Ray replica's extra time over the engine in this process goes (issue 21).

The same input is scored with the real vLLM engine three ways, in one run: in this process
(LocalExecutor); on one Ray replica as before issue 21 (1 CPU, so Ray set its OMP_NUM_THREADS and
torch's threads to 1, and Ray's default worker niceness 15); and on one replica as now (the
cluster's CPUs without GPUs, niceness 0 on the local cluster RayExecutor starts). A wrapper step records, where each shard runs, the seconds spent
preparing rows (render, tokenize, targets), in the engine, and building and writing the table;
what is left of the wall time is the driver's reading and committing, transfer and waiting.

    python bench/ray_overhead.py [--copies 8] [--shard-rows 64]

Each configuration runs twice, alternated, and the faster run is kept; engine and cluster
start-up are printed apart (a long job amortises them).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass

from scale import bundled_input  # bench/ is this script's folder

# Seconds of each prepare since the last shard's infer, from any thread (list.append is atomic; the sum is what counts).
_PREPARED: list[float] = []


@dataclass
class TimedStep:
    """A step that records, per shard, its prepare/infer/table seconds into `log` (JSON lines)."""

    step: object
    log: str

    def prepare(self, example):
        started = time.perf_counter()
        try:
            return self.step.prepare(example)
        finally:
            _PREPARED.append(time.perf_counter() - started)

    def infer(self, engine, shard):
        started = time.perf_counter()
        inferred = self.step.infer(engine, shard)
        shard.infer_seconds = time.perf_counter() - started
        taken = len(_PREPARED)
        shard.prepare_seconds = sum(_PREPARED[:taken])
        del _PREPARED[:taken]
        return inferred

    def table(self, shard, inferred):
        started = time.perf_counter()
        table = self.step.table(shard, inferred)
        with open(self.log, "a") as handle:
            handle.write(json.dumps({"prepare": shard.prepare_seconds, "infer": shard.infer_seconds,
                                     "table": time.perf_counter() - started, "pid": os.getpid()}) + "\n")
        return table

    def tokens(self, shard, inferred):
        return self.step.tokens(shard, inferred)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=8, help="copies of the bundled sample (82 rows, 13,892 tokens)")
    parser.add_argument("--shard-rows", type=int, default=64)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import ray

    from curate.engines.base import EngineSettings
    from curate.engines.vllm import VLLMEngine
    from curate.executors import LocalExecutor
    from curate.executors.ray import RayExecutor, RayOptions
    from curate.pipeline import RunOptions
    from curate.score import ScoreStep, score_dataset

    model_dir, chat, work, source = bundled_input(args.copies, "curate-ray-overhead-")
    settings = EngineSettings(dtype="float32")

    started = time.perf_counter()
    engine = VLLMEngine(model_dir, settings)
    print(f"vllm engine start in this process: {time.perf_counter() - started:.1f} s")
    configurations = {"in this process": None, "ray, 1 replica, before": "before", "ray, 1 replica, now": "now"}
    best: dict[str, dict] = {}
    for attempt in range(2):
        for label, how in configurations.items():
            if how is None:
                executor = LocalExecutor(engine)
            else:  # before issue 21: 1 CPU and Ray's niceness 15 for the replica; now: RayExecutor's own local cluster
                started = time.perf_counter()
                if how == "before":
                    ray.init(num_cpus=os.cpu_count(), object_store_memory=300 * 2**20, include_dashboard=False,
                             log_to_driver=False, _system_config={"worker_niceness": 15})
                options = RayOptions(replicas=1, cpus_per_replica=1 if how == "before" else None)
                executor = RayExecutor("vllm", model_dir, settings, options)
                print(f"{label}: cluster and replica start {time.perf_counter() - started:.1f} s", flush=True)
            log = work / f"log-{attempt}-{label[:20].replace(' ', '-')}.jsonl"
            out = work / f"out-{attempt}-{label[:20].replace(' ', '-')}"
            cpu, wall = time.process_time(), time.perf_counter()
            summary = _score(score_dataset, TimedStep(ScoreStep(chat), str(log)), source, out, executor, chat,
                             RunOptions(shard_rows=args.shard_rows))
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if how is not None:
                executor.close()
                ray.shutdown()
            phases = [json.loads(line) for line in log.read_text().splitlines()]
            result = {"wall": wall, "driver_cpu": cpu, "tokens": summary.tokens,
                      **{phase: sum(p[phase] for p in phases) for phase in ("prepare", "infer", "table")}}
            print(f"  {label}: {wall:.2f} s", flush=True)
            if label not in best or wall < best[label]["wall"]:
                best[label] = result

    base = best["in this process"]
    print(f"\n{base['tokens']:,} tokens, {args.shard_rows} rows per shard, {os.cpu_count()} cores; fastest of 2 runs each\n")
    print(f"{'':<32} {'wall s':>7} {'x local':>8} {'prepare':>8} {'engine':>8} {'table':>8} {'rest':>8} {'driver CPU':>10}")
    for label, r in best.items():
        rest = r["wall"] - r["infer"] - (r["prepare"] + r["table"] if label != "in this process" else 0)
        print(f"{label:<32} {r['wall']:7.2f} {r['wall'] / base['wall']:8.2f} {r['prepare']:8.2f} {r['infer']:8.2f} "
              f"{r['table']:8.2f} {rest:8.2f} {r['driver_cpu']:10.2f}")
    print("\nprepare/engine/table: seconds summed where each shard ran (in this process the prepare and table "
          "threads overlap the engine, so `rest` there is the wall time the engine was not running); rest on Ray: "
          "wall time outside the replica's phases (driver reading and committing, transfer, waiting).")


def _score(score_dataset, step, source, out, executor, chat, run):
    """score_dataset with the timed step in place of ScoreStep."""
    import curate.score as score

    original = score.ScoreStep
    score.ScoreStep = lambda chat_tokenizer: step
    try:
        return score_dataset(source, out, executor, chat, model_name="bench", run=run)
    finally:
        score.ScoreStep = original


if __name__ == "__main__":
    main()
