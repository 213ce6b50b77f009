"""Shards on engine replicas on a Ray cluster: `curate score/generate --ray`.

Each replica is a threaded Ray actor holding one engine (`make_engine`, built from the same
picklable settings) and the run's step (sent once). The driver reads the input and sends each
shard's raw records; the replica prepares them (normalise, render, tokenize), infers, builds
the table and writes the shard's file itself (temporary name, sync, rename), and returns its
row count and checksum; the driver commits it. A replica holds two shards, so its engine infers
one while the other is prepared or written. What Ray retries and what it does not:

- a replica that dies (SIGKILL, out of memory, a lost node) is restarted and its shards run
  again; a shard's file has a fixed name, so a retry replaces it and the row is still once;
- a shard whose processing raises is not retried: it is reported with its rows, every other
  shard is committed, and `--resume` runs just the failed ones.

Ray is an optional extra (`pip install 'curate[ray]'`); the model directory, the input and the
output directory must be on a filesystem that every node sees.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from curate.data import prefetched
from curate.engines import make_engine
from curate.engines.base import EngineSettings
from curate.pipeline import Shard, ShardResult, ShardsFailed, Step, finish_step, prepare_shard

# Shards sent to a replica ahead of the one it works on, so it never waits for the driver.
AHEAD_PER_REPLICA = 2
# A local cluster's shared-memory object store: shards are a few MB, and /dev/shm is often small.
LOCAL_OBJECT_STORE_BYTES = 300 * 2**20
RESTARTS = 3  # a replica that keeps dying is given up on, and its shards reported
# Ray starts its worker processes at niceness 15, to keep its own daemons responsive. A replica is
# the run's workload, so on a local cluster it runs at 0, the driver's priority: measured on 2 shared
# cores (bench/ray_overhead.py), the same vLLM engine scored 1.5-1.7x slower at 15 than in the driver.
# A cluster started elsewhere keeps its own setting (`RAY_worker_niceness=0 ray start ...` changes it).
WORKER_NICENESS = 0


@dataclass(frozen=True)
class RayOptions:
    """address: a running cluster (`auto`, `HOST:PORT`, `ray://HOST:10001`); None starts a local one.
    replicas: default one per `gpus_per_replica` GPUs of the cluster, or 1 on a cluster without GPUs.
    max_replicas: more replicas to ask for; each joins the run once the cluster has room for it
    (an autoscaling cluster adds nodes for them), while the first `replicas` already work.
    gpus_per_replica: default the tensor-parallel size where the cluster has GPUs, else 0.
    cpus_per_replica: the CPUs each replica holds: its torch threads (Ray sets OMP_NUM_THREADS to
    them) and its answer-check workers. Default: 1 beside GPUs (the model runs on the GPU); on a
    cluster without GPUs, where the model runs on the CPUs, the cluster's CPUs shared among the
    replicas (one CPU each, as Ray did before, ran the in-process engine's 2 threads on 1)."""

    address: str | None = None
    replicas: int | None = None
    max_replicas: int | None = None
    gpus_per_replica: float | None = None
    cpus_per_replica: float | None = None


def replica_cpus(cluster_cpus: float, cluster_gpus: float, replicas: int) -> float:
    """CPUs a replica asks for by default: 1 beside a GPU; without GPUs, its share of the cluster."""
    return 1 if cluster_gpus else max(1, int(cluster_cpus // replicas))


class ShardWorker:
    """A Ray actor's body: one engine, running whole shards, two at a time: the engine is used by
    one shard at once (`_engine_lock`), while the other shard is prepared or written."""

    def __init__(self, backend: str, model_dir: str, settings: EngineSettings, cpus: float = 1, engine_factory=None):
        self.engine = engine_factory() if engine_factory else make_engine(backend, model_dir, settings)
        self.cpus = cpus
        self.step, self._step_id = None, None
        self._engine_lock, self._step_lock = threading.Lock(), threading.Lock()

    def describe(self) -> tuple[str, str, str]:
        return self.engine.backend, self.engine.dtype, self.engine.model_name

    def _use(self, step_box: list) -> None:
        """The run's step (its tokenizer included), fetched once per replica rather than with every
        shard (boxed, so Ray hands over the reference, not the value); a restarted replica fetches
        it again. Answer checks get as many workers as the replica holds CPUs."""
        import ray

        with self._step_lock:
            if self._step_id != step_box[0].hex():
                step = ray.get(step_box[0])
                if getattr(step, "verify_workers", 0) is None:
                    step.verify_workers = max(1, int(self.cpus))
                self.step, self._step_id = step, step_box[0].hex()

    def run(self, shard: Shard, directory: str, schema, step_box: list) -> ShardResult:
        self._use(step_box)
        shard = prepare_shard(self.step, shard)
        with self._engine_lock:
            inferred = self.step.infer(self.engine, shard)
        return finish_step(self.step, shard, inferred, Path(directory), schema)


class RayExecutor:
    """Replicas of one engine on a Ray cluster (`score_dataset(..., engine=RayExecutor(...))`)."""

    def __init__(self, backend: str, model_dir, settings: EngineSettings = EngineSettings(), options: RayOptions = RayOptions(),
                 engine_factory=None):
        """`engine_factory`: a picklable callable that builds each replica's engine instead of
        `make_engine(backend, model_dir, settings)` (bench/scale.py's simulated engines)."""
        import ray

        self._started_ray = not ray.is_initialized() and options.address is None
        if not ray.is_initialized():
            if options.address is None:  # replicas at the driver's priority: Ray's default nices workers to 15
                ray.init(object_store_memory=LOCAL_OBJECT_STORE_BYTES, include_dashboard=False, log_to_driver=False,
                         _system_config={"worker_niceness": WORKER_NICENESS})
            else:
                passed = {k: v for k, v in os.environ.items() if k.startswith(("HF_", "CURATE_", "VLLM_", "TOKENIZERS_"))}
                ray.init(address=options.address, runtime_env={"env_vars": passed}, log_to_driver=False)
        gpus = ray.cluster_resources().get("GPU", 0)
        per_replica = options.gpus_per_replica if options.gpus_per_replica is not None else (
            settings.tensor_parallel_size if gpus else 0)
        replicas = options.replicas or (max(1, int(gpus // per_replica)) if per_replica else 1)
        cpus = options.cpus_per_replica if options.cpus_per_replica is not None else replica_cpus(
            ray.cluster_resources().get("CPU", 1), gpus, replicas)
        actor = ray.remote(ShardWorker).options(num_cpus=cpus, num_gpus=per_replica,
                                                max_restarts=RESTARTS, max_task_retries=RESTARTS,
                                                max_concurrency=AHEAD_PER_REPLICA)
        self.workers = [actor.remote(backend, str(model_dir), settings, cpus, engine_factory)
                        for _ in range(max(replicas, options.max_replicas or 0))]
        self._starting = {worker.describe.remote(): worker for worker in self.workers}
        self._ready: list = []
        self._start_error: Exception | None = None
        while len(self._ready) < replicas and self._starting:  # the first `replicas` up; the others join when they are
            self._join(ray.wait(list(self._starting), num_returns=1)[0])
        if not self._ready:
            raise self._start_error

    def _join(self, started: list) -> list:
        """Replicas whose engine has started (their `describe` returned), now ready for shards."""
        import ray
        from ray.exceptions import RayError

        joined = []
        for ref in started:
            worker = self._starting.pop(ref)
            try:
                self.backend, self.dtype, self.model_name = ray.get(ref)
            except RayError as error:  # its engine cannot start (the error says why): one replica fewer
                logging.getLogger("curate").warning("a replica could not start, the run goes on without it: %s", error)
                self._start_error = error
                continue
            joined.append(worker)
        self._ready += joined
        return joined

    def run(self, step: Step, shards: Iterator[Shard], directory: Path, schema,
            commit: Callable[[ShardResult], None]) -> None:
        """Run every shard on the replicas and commit each as it comes back, in any order. The
        driver only reads records (one shard ahead, in a background thread) and commits."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        step_box = [ray.put(step)]

        def slots(workers: list) -> list:
            return [worker for worker in workers for _ in range(AHEAD_PER_REPLICA)]

        free = slots(self._ready)
        in_flight: dict = {}
        failures: list[tuple[Shard, str]] = []

        def collect() -> None:
            (ref,), _ = ray.wait([*in_flight, *self._starting], num_returns=1)
            if ref in self._starting:  # one more replica is up
                free.extend(slots(self._join([ref])))
                return
            shard, worker = in_flight.pop(ref)
            try:
                commit(ray.get(ref))
            except RayTaskError as error:  # the shard's own processing raised: not retried
                failures.append((shard, f"{type(error.cause).__name__}: {error.cause}"))
            except RayActorError as error:  # the replica died more than RESTARTS times
                failures.append((shard, f"its replica died and was given up on: {error}"))
                return
            free.append(worker)

        for shard in prefetched(shards):
            if self._starting:
                started = ray.wait(list(self._starting), num_returns=len(self._starting), timeout=0)[0]
                free.extend(slots(self._join(started)))
            while not free:
                if not in_flight:
                    raise ShardsFailed(directory, failures + [(shard, "no replica is left to run it")])
                collect()
            worker = free.pop(0)
            in_flight[worker.run.remote(shard, str(directory), schema, step_box)] = (shard, worker)
        while in_flight:
            collect()
        if failures:
            raise ShardsFailed(directory, failures)

    def close(self) -> None:
        import ray

        for worker in self.workers:
            ray.kill(worker)
        self.workers = []
        if self._started_ray:
            ray.shutdown()


RayEngines = RayExecutor  # the name of earlier releases
