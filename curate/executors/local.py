"""Shards on one engine in this process, with every stage overlapped: shard k+1 is read and
prepared (rendered, tokenized) in one background thread while the engine infers shard k, and
shard k's table (decoding, checks, the Parquet write) is built in another."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from curate.data import prefetched
from curate.pipeline import finish_step, prepare_shard


class LocalExecutor:
    def __init__(self, engine):
        self.engine = engine
        self.backend, self.dtype, self.model_name = engine.backend, engine.dtype, getattr(engine, "model_name", "")

    def run(self, step, shards, directory, schema, commit) -> None:
        ready = prefetched(prepare_shard(step, shard) for shard in shards)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="curate-table") as tables:
            pending = None
            for shard in ready:
                inferred = step.infer(self.engine, shard)
                if pending:
                    commit(pending.result())
                pending = tables.submit(finish_step, step, shard, inferred, directory, schema)
            if pending:
                commit(pending.result())
