"""Export throughput and peak memory on a synthetic scored set of a million examples.

    python bench/export.py [--examples 1000000] [--tokens 64] [--workdir /tmp/curate-bench]

The baseline, measured in the same run, is a plain pyarrow read of the same shards (every
column the export reads, nothing computed). Each step runs in a fresh child process, so
its peak resident memory (ru_maxrss) is its own. Flat memory as the set grows is the point:
the export holds one shard at a time.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROWS_PER_SHARD = 50_000


def make_scored_set(directory: Path, examples: int, tokens: int, seed: int = 0) -> None:
    """Shards in SCORED_SCHEMA: the first half of each sequence is prompt, the rest target,
    ending in an end-of-turn token (id 2); log-probabilities drawn like a real model's."""
    from curate.models import DEFAULT_MODEL_NAME, load_tokenizer, resolve_model, tokenizer_fingerprint
    from curate.store import SCORED_SCHEMA, ShardWriter, write_shard_file

    rng = np.random.default_rng(seed)
    fingerprint = tokenizer_fingerprint(load_tokenizer(resolve_model(None)))
    meta = {"kind": "scored", "model": DEFAULT_MODEL_NAME, "tokenizer": fingerprint,
            "targets": {"end_of_turn": {"id": 2, "token": "<|im_end|>"}}, "shard_rows": ROWS_PER_SHARD}
    writer = ShardWriter(directory, meta, overwrite=True)
    for start in range(0, examples, ROWS_PER_SHARD):
        n = min(ROWS_PER_SHARD, examples - start)
        offsets = pa.array(np.arange(n + 1, dtype=np.int32) * tokens)
        ids = rng.integers(3, 49152, size=n * tokens, dtype=np.int32)
        position = np.tile(np.arange(tokens), n)
        target = position >= tokens // 2
        ids[position == tokens - 1] = 2
        logprobs = -rng.exponential(0.9, size=n * tokens).astype(np.float32)
        nll = np.where(target, -logprobs, 0).reshape(n, tokens).sum(1) / (tokens - tokens // 2)
        logprobs[position == 0] = np.nan
        table = pa.Table.from_arrays([
            pa.array([f"ex-{start + i}" for i in range(n)]), pa.array(np.arange(start, start + n)),
            pa.nulls(n, SCORED_SCHEMA.field("messages").type), pa.nulls(n, pa.string()),
            pa.ListArray.from_arrays(offsets, pa.array(ids)),
            pa.ListArray.from_arrays(offsets, pa.array(logprobs, from_pandas=True)),
            pa.ListArray.from_arrays(offsets, pa.array(target)),
            pa.ListArray.from_arrays(offsets, pa.array(position == tokens - 1)),
            pa.array(np.full(n, tokens - tokens // 2, dtype=np.int32)), pa.array(nll), pa.array(np.exp(nll)),
            pa.array(np.zeros(n, dtype=bool)), pa.nulls(n, pa.string()),
        ], schema=SCORED_SCHEMA)
        writer.commit((start, start + n), *write_shard_file(directory, start // ROWS_PER_SHARD, table, writer.schema), [])
    writer.finish({})


def child(step: str, scored: Path, output: Path) -> dict:
    """Runs in its own process; prints its result as JSON."""
    started = time.perf_counter()
    if step == "read":
        rows = 0
        for shard in sorted(scored.glob("part-*.parquet")):
            rows += pq.read_table(shard, columns=["id", "row", "input_ids", "logprobs", "target", "ppl"]).num_rows
    else:
        from curate.export import ExportOptions, export
        from curate.models import load_tokenizer, resolve_model

        options = ExportOptions(mode="stm", threshold=2.5) if step == "stm" else ExportOptions(mode="stm", mask_ratio=0.2)
        rows = export(scored, output, options, load_tokenizer(resolve_model(None))).examples_in
    seconds = time.perf_counter() - started
    return {"step": step, "rows": rows, "seconds": seconds, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1_000_000)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per example (half of them target)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/curate-bench-export"))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]), Path(args.child[2]))))
        return

    scored = args.workdir / "scored"
    started = time.perf_counter()
    make_scored_set(scored, args.examples, args.tokens)
    size = sum(p.stat().st_size for p in scored.glob("part-*.parquet")) / 2**20
    print(f"synthetic scored set: {args.examples:,} examples x {args.tokens} tokens, {size:,.0f} MiB of Parquet "
          f"({time.perf_counter() - started:.0f} s to write)\n")
    results = {}
    for step in ("read", "stm", "mask-ratio"):
        out = subprocess.run([sys.executable, __file__, "--child", step, str(scored), str(args.workdir / f"train-{step}.parquet")],
                             capture_output=True, text=True, check=True)
        results[step] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[step]
        print(f"{step:<12} {r['seconds']:8.1f} s  {r['rows'] / r['seconds']:12,.0f} rows/s  peak {r['peak_mib']:8,.0f} MiB", flush=True)
    base = results["read"]
    print("\nagainst the plain read (baseline)")
    for step in ("stm", "mask-ratio"):
        r = results[step]
        print(f"  {step:<12} time {r['seconds'] / base['seconds']:5.2f}x   peak memory {r['peak_mib'] / base['peak_mib']:5.2f}x")


if __name__ == "__main__":
    main()
