"""The store's guarantees under attack, through the real `curate` command line, the real model and
real files: nothing lost (no command deletes what it did not write, or its own input), nothing
mixed (one writer per directory, shards verified on read), and errors a person can act on."""

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import run_curate
from curate.store import read_manifest

HF = ("--backend", "hf", "--quiet")


def _snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory` (the lock aside) and its sha256: what 'nothing changed' means."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != ".curate.lock"}


def _rows(n: int, tag: str = "r") -> list[dict]:
    return [{"id": f"{tag}{i:02d}", "messages": [{"role": "user", "content": f"Say the number {i}."},
                                                  {"role": "assistant", "content": f"The number is {i}."}]}
            for i in range(n)]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _scored_ids(directory: Path) -> list[str]:
    """The ids of a finished run, read from the shards its manifest records, in input order."""
    files = [str(directory / shard["file"]) for shard in read_manifest(directory).shards]
    return pl.read_parquet(files).sort("row")["id"].to_list() if files else []


def _one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished scored run of 8 rows in 4 shards, and its input."""
    folder = tmp_path_factory.mktemp("run")
    source = _write_jsonl(folder / "data.jsonl", _rows(8))
    run_curate("score", source, "-o", folder / "scored", "--shard-rows", "2", *HF)
    return source, folder / "scored"


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A private copy of the finished run (and its input), for tests that attack it."""
    import shutil

    source, scored = finished_run
    shutil.copy(source, tmp_path / "data.jsonl")
    shutil.copytree(scored, tmp_path / "scored")
    manifest = json.loads((tmp_path / "scored" / "manifest.json").read_text())
    manifest["meta"]["input"]["path"] = str(tmp_path / "data.jsonl")
    (tmp_path / "scored" / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path / "data.jsonl", tmp_path / "scored"


# ---------------------------------------------------------------- data lost


def test_a_directory_of_someone_elses_files_is_refused_whatever_the_flags(tmp_path):
    source = _write_jsonl(tmp_path / "data.jsonl", _rows(4))
    theirs = tmp_path / "d"
    theirs.mkdir()
    pq.write_table(pa.table({"x": [1, 2]}), theirs / "part-00007.parquet")  # Spark's and datasets' shard name
    (theirs / "rejects.jsonl").write_text('{"theirs": true}\n')
    before = _snapshot(theirs)
    for flags in ((), ("--overwrite",), ("--resume",)):
        result = run_curate("score", source, "-o", theirs, *HF, *flags, check=False)
        _one_line_error(result, "files that curate did not write", "part-00007.parquet")
        assert _snapshot(theirs) == before


def test_overwrite_with_a_bad_input_leaves_the_finished_run_whole(run_copy, tmp_path):
    _, scored = run_copy
    before = _snapshot(scored)
    fake = tmp_path / "bad.jsonl.gz"
    fake.write_text('{"not": "gzip"}\n')
    result = run_curate("score", fake, "-o", scored, "--overwrite", *HF, check=False)
    _one_line_error(result, "bad.jsonl.gz")
    assert _snapshot(scored) == before
    run_curate("stats", scored)


@pytest.mark.parametrize("target", ["part-00000.parquet", "rejects.jsonl", "manifest.json", "INPUT"])
def test_export_never_writes_over_the_runs_own_files_or_its_input(run_copy, target):
    source, scored = run_copy
    output = source if target == "INPUT" else scored / target
    before, input_before = _snapshot(scored), source.read_bytes()
    result = run_curate("export", scored, "-o", output.with_suffix(".jsonl") if target == "manifest.json" else output,
                        "--mode", "ground-truth", check=False)
    _one_line_error(result, "overlaps the input")
    assert _snapshot(scored) == before and source.read_bytes() == input_before
    run_curate("stats", scored)


def test_export_failing_mid_write_keeps_the_previous_set_whole(run_copy, tmp_path):
    _, scored = run_copy
    output = tmp_path / "train.parquet"
    run_curate("export", scored, "-o", output, "--mode", "stm", "--max-ppl", "1.5")  # drops rows: a .dropped.jsonl
    previous = {p.name: p.read_bytes() for p in tmp_path.glob("train.*")}
    assert previous["train.dropped.jsonl"], "the first export must drop rows for this test to mean anything"

    def small_files():  # a file size limit: the rewrite fails part way, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    result = run_curate("export", scored, "-o", output, "--mode", "ground-truth", check=False, preexec_fn=small_files)
    _one_line_error(result, "no room to write")
    assert {p.name: p.read_bytes() for p in tmp_path.glob("train.*")} == previous  # nothing half-written, no .partial


# ---------------------------------------------------------------- wrong results, silently


def test_a_second_writer_is_refused_while_the_first_runs(tmp_path):
    a_input = _write_jsonl(tmp_path / "a.jsonl", _rows(20))
    b_input = _write_jsonl(tmp_path / "b.jsonl", _rows(8, tag="OTHER-r"))
    out = tmp_path / "d"
    curate = Path(sys.executable).parent / "curate"
    first = subprocess.Popen([curate, "score", a_input, "-o", out, "--shard-rows", "2", *HF],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "shards.jsonl").exists() and time.time() < deadline:
        time.sleep(0.02)
    first.send_signal(signal.SIGSTOP)  # A holds the directory, mid-run, for as long as B tries
    try:
        second = run_curate("score", b_input, "-o", out, "--overwrite", "--limit", "4", *HF, check=False)
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    _one_line_error(second, "being written by another curate run", f"PID {first.pid}")
    assert _scored_ids(out) == [f"r{i:02d}" for i in range(20)]


def test_a_shard_copied_over_another_is_refused_by_every_reader(run_copy, tmp_path):
    _, scored = run_copy
    (scored / "part-00003.parquet").write_bytes((scored / "part-00001.parquet").read_bytes())
    for command in (("export", scored, "-o", tmp_path / "t.parquet"), ("stats", scored), ("inspect", scored)):
        _one_line_error(run_curate(*command, check=False), "part-00003.parquet", "input rows 6-7")
    assert not (tmp_path / "t.parquet").exists()


def test_a_deleted_shard_is_named_by_every_reader(run_copy, tmp_path):
    _, scored = run_copy
    (scored / "part-00002.parquet").unlink()
    for command in (("export", scored, "-o", tmp_path / "t.parquet"), ("stats", scored), ("inspect", scored),
                    ("report", scored, "-o", tmp_path / "r.html")):
        _one_line_error(run_curate(*command, check=False), "part-00002.parquet is missing", "input rows 4-5")


def test_resume_refuses_an_input_edited_in_place_with_its_size_and_mtime_kept(tmp_path):
    rows = _rows(6)
    source = _write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "d"
    run_curate("score", source, "-o", out, "--shard-rows", "2", *HF)
    stat = source.stat()
    edited = source.read_text().replace("The number is 4.", "The number is 9.")
    assert len(edited) == stat.st_size
    source.write_text(edited)
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    result = run_curate("score", source, "-o", out, "--shard-rows", "2", "--resume", *HF, check=False)
    _one_line_error(result, "cannot resume, input differs")


# ---------------------------------------------------------------- errors a person can act on


def test_ctrl_c_says_how_to_resume_and_exits_130(tmp_path):
    source = _write_jsonl(tmp_path / "data.jsonl", _rows(40))
    out = tmp_path / "d"
    curate = Path(sys.executable).parent / "curate"
    run = subprocess.Popen([curate, "score", source, "-o", out, "--shard-rows", "2", *HF],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "shards.jsonl").exists():
        time.sleep(0.05)
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr and "Aborted" not in stderr
    run_curate("score", source, "-o", out, "--shard-rows", "2", "--resume", *HF)
    assert _scored_ids(out) == [f"r{i:02d}" for i in range(40)]


def test_a_full_disk_is_one_line_and_resume_finishes_the_run(tmp_path):
    source = _write_jsonl(tmp_path / "data.jsonl", _rows(60))
    out = tmp_path / "d"

    def small_files():  # every shard (~7 kB) fits; the journal of committed shards outgrows it part way
        resource.setrlimit(resource.RLIMIT_FSIZE, (9_000, 9_000))

    result = run_curate("score", source, "-o", out, "--shard-rows", "1", *HF, check=False, preexec_fn=small_files)
    _one_line_error(result, "no room to write", "--resume")
    run_curate("score", source, "-o", out, "--shard-rows", "1", "--resume", *HF)
    assert _scored_ids(out) == [f"r{i:02d}" for i in range(60)]
    assert not list(out.glob("*.partial"))


def test_a_run_with_every_row_rejected_fails_unless_allowed(tmp_path):
    source = _write_jsonl(tmp_path / "prompts.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 3)
    result = run_curate("score", source, "-o", tmp_path / "d", *HF, check=False)
    _one_line_error(result, "all 3 were rejected", "rejects.jsonl")
    run_curate("score", source, "-o", tmp_path / "d2", "--allow-empty", *HF)


def test_max_length_beyond_the_models_context_is_refused(tmp_path, model_dir):
    context = json.loads((model_dir / "config.json").read_text())["max_position_embeddings"]
    source = _write_jsonl(tmp_path / "data.jsonl", _rows(2))
    result = run_curate("score", source, "-o", tmp_path / "d", "--max-length", str(context + 1), *HF, check=False)
    assert result.returncode == 2 and f"{context + 1}" in result.stderr and f"{context}" in result.stderr
    assert not (tmp_path / "d").exists()


def test_resume_and_overwrite_together_are_a_usage_error(run_copy):
    source, scored = run_copy
    before = _snapshot(scored)
    result = run_curate("score", source, "-o", scored, "--resume", "--overwrite", *HF, check=False)
    assert result.returncode == 2 and "contradict" in result.stderr
    assert _snapshot(scored) == before


def test_quiet_is_quiet_even_for_vllm(tmp_path):
    source = _write_jsonl(tmp_path / "data.jsonl", _rows(2))
    result = run_curate("score", source, "-o", tmp_path / "d", "--backend", "vllm", "--quiet")
    assert result.stderr == "" and result.stdout == ""
    loud = run_curate("score", source, "-o", tmp_path / "d", "--backend", "vllm", "--quiet", "--verbose", "--overwrite")
    assert "Loading" in loud.stderr or "WARNING" in loud.stderr or "INFO" in loud.stderr
