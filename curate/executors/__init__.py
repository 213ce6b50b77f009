"""Where a step's shards run: `LocalExecutor` (one engine in this process) or `RayExecutor`
(engine replicas on a Ray cluster). Steps never know which; engines never know where they are.

An executor has `backend`, `dtype`, `model_name` (of its engines) and
`run(step, shards, directory, schema, commit)`: prepare, infer and write each shard, and call
`commit(result)` in this process as each one finishes.
"""

from __future__ import annotations

from typing import Protocol

from curate.executors.local import LocalExecutor


class Executor(Protocol):
    backend: str
    dtype: str
    model_name: str

    def run(self, step, shards, directory, schema, commit) -> None: ...


def as_executor(engine_or_executor) -> Executor:
    """An engine runs its shards in this process; an executor is used as it is."""
    if hasattr(engine_or_executor, "run") and not hasattr(engine_or_executor, "score"):
        return engine_or_executor
    return LocalExecutor(engine_or_executor)


__all__ = ["Executor", "LocalExecutor", "as_executor"]
