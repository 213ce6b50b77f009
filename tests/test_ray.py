"""`curate score/generate --ray` on a real local Ray cluster (started by the command) with real
engines in Ray actors: the same output as in this process, every row exactly once after a
replica is SIGKILLed, and a shard that raises reported and finished by --resume."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import polars as pl
import pytest

from conftest import run_curate
from curate.pipeline import RunOptions
from curate.store import JOURNAL, read_manifest

pytestmark = pytest.mark.slow


def _scored(directory) -> pl.DataFrame:
    return pl.read_parquet(sorted(directory.glob("part-*.parquet"))).sort("row")


def _repeated_sample(tmp_path, sample_path, copies: int):
    """The bundled sample `copies` times over, with fresh ids: enough shards for a kill to land mid-run."""
    rows = [json.loads(line) for line in sample_path.read_text().splitlines()]
    path = tmp_path / f"sample-x{copies}.jsonl"
    path.write_text("".join(json.dumps({**row, "id": f"{row['id']}-{copy}"}) + "\n" for copy in range(copies) for row in rows))
    return path


def _replica_pids() -> set[int]:
    """Processes of the Ray actors holding an engine (Ray titles them `ray::ShardWorker...`)."""
    found = subprocess.run(["pgrep", "-f", "ray::ShardWorker"], capture_output=True, text=True).stdout.split()
    return {int(pid) for pid in found}


def test_ray_output_equals_the_plain_run_and_a_killed_replica_loses_and_repeats_nothing(tmp_path, sample_path, vllm_engine,
                                                                                         chat_tokenizer):
    from curate.score import score_dataset

    source = _repeated_sample(tmp_path, sample_path, copies=4)  # 328 rows, 41 shards
    plain = tmp_path / "plain"
    score_dataset(source, plain, vllm_engine, chat_tokenizer, model_name="default", run=RunOptions(shard_rows=8))

    out = tmp_path / "ray"
    process = subprocess.Popen([sys.executable, "-m", "curate", "score", str(source), "-o", str(out), "--backend", "vllm",
                                "--shard-rows", "8", "--ray", "--quiet"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline, killed = time.time() + 300, None
    while time.time() < deadline and process.poll() is None:
        journal = out / JOURNAL
        if journal.exists() and len(journal.read_text().splitlines()) >= 2 and _replica_pids():
            killed = _replica_pids()
            for pid in killed:
                os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    committed_at_kill = len((out / JOURNAL).read_text().splitlines())
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    assert killed and committed_at_kill < 41, "the kill must land mid-run"

    ray_run, plain_run = _scored(out), _scored(plain)
    assert ray_run["row"].to_list() == list(range(328))  # every row exactly once
    assert ray_run.equals(plain_run)  # bit for bit: the same engine, the same shards
    manifest = read_manifest(out)
    assert manifest.complete and not (out / JOURNAL).exists()
    assert [shard["rows"] for shard in manifest.shards] == [[start, min(start + 8, 328)] for start in range(0, 328, 8)]
    for shard in manifest.shards:
        assert shard["sha256"] == hashlib.sha256((out / shard["file"]).read_bytes()).hexdigest()


def test_a_shard_that_raises_is_reported_the_rest_committed_and_resume_finishes_it(tmp_path, sample_path, scored_sample):
    """Also: --replicas 1,3 on this 2-CPU cluster (one CPU a replica) runs with the replicas that
    fit, shards finishing in any order, without waiting for the third, which never gets room."""
    out = tmp_path / "ray"
    (out / "part-00002.parquet").mkdir(parents=True)  # in the way of shard 2's file: its write raises
    args = ["score", sample_path, "-o", out, "--backend", "hf", "--shard-rows", "10", "--ray", "--replicas", "1,3", "--quiet"]

    failed = run_curate(*args, check=False)
    assert failed.returncode == 1
    assert "shard 2 (input rows 20-29)" in failed.stderr and "IsADirectoryError" in failed.stderr and "--resume" in failed.stderr
    manifest = read_manifest(out)
    assert not manifest.complete
    assert sorted(shard["rows"][0] for shard in manifest.shards) == [0, 10, 30, 40, 50, 60, 70, 80]

    (out / "part-00002.parquet").rmdir()
    run_curate(*args, "--resume")

    resumed, whole = _scored(out), _scored(scored_sample)
    assert resumed["row"].to_list() == list(range(82))
    assert resumed.drop("logprobs", "nll_mean", "ppl").equals(whole.drop("logprobs", "nll_mean", "ppl"))
    assert (resumed["logprobs"].explode() - whole["logprobs"].explode()).abs().max() < 1e-4
    assert read_manifest(out).complete


def test_generate_on_ray_gives_the_plain_runs_answers(tmp_path, sample_path, generated_sample):
    out = tmp_path / "generated"
    run_curate("generate", sample_path, "-o", out, "--backend", "vllm", "--max-new-tokens", "256", "--ray", "--quiet")
    columns = ["id", "row", "answer", "verified", "finished", "n_tokens"]
    assert _scored(out).select(columns).equals(_scored(generated_sample).select(columns))


def test_the_driver_reads_and_commits_but_never_tokenizes(tmp_path, sample_path, model_dir, chat_tokenizer, scored_sample,
                                                          monkeypatch):
    """Replicas prepare their own rows: in this (the driver's) process no row is rendered or tokenized."""
    from curate.engines.base import EngineSettings
    from curate.executors.ray import RayExecutor, RayOptions
    from curate.score import score_dataset
    from curate.tokenize import ChatTokenizer

    calls = []
    encode = ChatTokenizer.encode
    monkeypatch.setattr(ChatTokenizer, "encode", lambda self, *a, **k: calls.append(1) or encode(self, *a, **k))
    executor = RayExecutor("hf", model_dir, EngineSettings(dtype="float32"), RayOptions(replicas=1))
    try:
        score_dataset(sample_path, tmp_path / "ray", executor, chat_tokenizer, model_name="default", run=RunOptions(shard_rows=16))
    finally:
        executor.close()
    assert calls == []
    ray_run, whole = _scored(tmp_path / "ray"), _scored(scored_sample)
    assert ray_run.drop("logprobs", "nll_mean", "ppl").equals(whole.drop("logprobs", "nll_mean", "ppl"))


def test_eval_on_ray_scores_as_in_this_process(tmp_path, model_dir, hf_engine, chat_tokenizer):
    """`curate eval --ray`: multiple-choice rows prepared and scored in a replica, as here."""
    import numpy as np
    import pyarrow.parquet as pq

    from curate.evaluate import evaluate, task_file

    here = evaluate(model_dir, {"arc_easy": task_file("arc_easy")}, tmp_path / "here", hf_engine, chat_tokenizer, limit=6)
    run_curate("eval", "default", "--tasks", "arc_easy", "--limit", "6", "-o", tmp_path / "ray", "--backend", "hf",
               "--dtype", "float32", "--ray")
    local, remote = (pq.read_table(tmp_path / name / "arc_easy.parquet").to_pylist() for name in ("here", "ray"))
    assert [r["predicted"] for r in remote] == [r["predicted"] for r in local] and len(remote) == 6
    for a, b in zip(local, remote):
        np.testing.assert_allclose(a["loglik"], b["loglik"], atol=1e-4)
        assert a["gold_nll"] == pytest.approx(b["gold_nll"], abs=1e-4)
    assert read_manifest(tmp_path / "ray" / "arc_easy.choices").complete and here.tasks["arc_easy"].examples == 6


class _ThreadsProbe:
    """An engine that only reports the torch threads and the niceness of the process it was built in."""

    backend, dtype = "probe", "float32"

    def __init__(self):
        import torch

        self.model_name = f"torch threads {torch.get_num_threads()}, niceness {os.nice(0)}"

    def close(self):
        pass


def test_a_replica_without_gpus_runs_its_model_on_all_the_cores_at_the_drivers_priority(model_dir):
    """Ray sets a replica's OMP_NUM_THREADS to the CPUs it asks for: with the 1 CPU it used to ask
    for, a CPU engine ran on 1 thread where the same engine in this process runs on every core. And
    Ray nices its workers to 15: the engine then lost the CPUs to anything else running."""
    import ray
    import ray.cloudpickle

    from curate.executors.ray import RayExecutor, RayOptions

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the probe travels with the actor
    executor = RayExecutor("hf", model_dir, options=RayOptions(replicas=1), engine_factory=_ThreadsProbe)
    try:
        cores = int(ray.cluster_resources()["CPU"])  # the local cluster's CPUs (Ray reads cgroup limits too)
        assert executor.model_name == f"torch threads {cores}, niceness {os.nice(0)}"
    finally:
        executor.close()
