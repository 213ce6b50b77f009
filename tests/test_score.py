"""`curate score` end to end: rows are never lost, shards resume exactly, options are checked."""

import json
import signal
import subprocess
import sys
import time

import polars as pl
import pyarrow.parquet as pq
import pytest

from conftest import run_curate
from curate.pipeline import RunOptions
from curate.score import score_dataset
from curate.store import JOURNAL, REJECTS, SCORED_SCHEMA, StoreError, file_metadata, read_manifest


def _scored(directory) -> pl.DataFrame:
    return pl.read_parquet(sorted(directory.glob("part-*.parquet"))).sort("row")


def _recorded_shards(directory) -> int:
    try:
        return len(read_manifest(directory).shards)  # the manifest's and the journal's
    except StoreError:
        return 0


def _rejects(directory) -> list[dict]:
    return [json.loads(line) for line in (directory / REJECTS).read_text().splitlines()]


def test_rows_in_equal_rows_out_plus_rejects(tmp_path, sample_path, hf_engine, chat_tokenizer):
    good = sample_path.read_text().splitlines()[:10]
    bad = ['{"messages": [{"role": "user", "content": "hi"}]}', "{broken", '{"instruction": "x", "output": ""}', '"just a string"']
    lines = good[:4] + bad[:2] + good[4:8] + bad[2:] + good[8:]
    source = tmp_path / "mixed.jsonl"
    source.write_text("\n".join(lines) + "\n")

    summary = score_dataset(source, tmp_path / "out", hf_engine, chat_tokenizer, model_name="default", run=RunOptions(shard_rows=3))

    scored, rejects = _scored(tmp_path / "out"), _rejects(tmp_path / "out")
    assert summary.rows_in == len(lines) == scored.height + len(rejects)
    assert sorted(scored["row"].to_list() + [r["row"] for r in rejects]) == list(range(len(lines)))
    assert {r["row"]: r["reason"] for r in rejects} == {
        4: "no assistant turn to score",
        5: "line 6 is not valid JSON: Expecting property name enclosed in double quotes (column 2)",
        10: "empty assistant response",
        11: "line 12 is a JSON str, not an object",
    }
    assert all(r["source"] == str(source) and r["raw"] for r in rejects)


def test_scored_shards_follow_the_schema_and_carry_fingerprints(scored_sample, tokenizer):
    from curate.models import tokenizer_fingerprint

    manifest = read_manifest(scored_sample)
    assert manifest.complete and manifest.meta["tokenizer"] == tokenizer_fingerprint(tokenizer)
    for shard in manifest.shards:
        path = scored_sample / shard["file"]
        assert pq.read_schema(path).remove_metadata() == SCORED_SCHEMA
        assert file_metadata(path)["tokenizer"] == manifest.meta["tokenizer"]
    frame = _scored(scored_sample)
    assert frame.height == 82
    assert (frame["input_ids"].list.len() == frame["logprobs"].list.len()).all()
    assert (frame["input_ids"].list.len() == frame["target"].list.len()).all()
    assert frame["logprobs"].list.first().is_null().all()  # the first token has no log-probability
    assert (frame["n_target"] == frame["target"].list.sum()).all()
    # ppl is exp of the mean negative log-probability of the target tokens, recomputed here.
    recomputed = frame.select(
        pl.struct("logprobs", "target").map_elements(
            lambda r: sum(-lp for lp, t in zip(r["logprobs"], r["target"]) if t) / sum(r["target"]), return_dtype=pl.Float64
        ).exp()
    ).to_series()
    assert ((recomputed - frame["ppl"]).abs() < 1e-4).all()


def test_an_existing_run_is_not_overwritten_by_accident(scored_sample, sample_path, hf_engine, chat_tokenizer):
    with pytest.raises(StoreError, match="--resume"):
        score_dataset(sample_path, scored_sample, hf_engine, chat_tokenizer, model_name="default")


def test_resume_refuses_a_run_with_other_options(tmp_path, sample_path, hf_engine, chat_tokenizer):
    from curate.tokenize import ChatTokenizer

    score_dataset(sample_path, tmp_path / "run", hf_engine, chat_tokenizer, model_name="default")
    other = ChatTokenizer(chat_tokenizer.tokenizer, max_length=128, truncate=True)
    with pytest.raises(StoreError, match="max_length differs"):
        score_dataset(sample_path, tmp_path / "run", hf_engine, other, model_name="default", run=RunOptions(resume=True))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_resume_after_a_kill_is_identical_to_an_uninterrupted_run(tmp_path, sample_path, scored_sample, sig):
    out = tmp_path / "interrupted"
    args = ["score", sample_path, "-o", out, "--backend", "hf", "--shard-rows", "8", "--quiet"]
    curate = [sys.executable, "-m", "curate"]
    process = subprocess.Popen([*curate, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and _recorded_shards(out) < 2:
        time.sleep(0.05)
    process.send_signal(sig)
    process.wait(timeout=60)
    manifest = read_manifest(out)
    assert not manifest.complete and 2 <= len(manifest.shards) < 11, "the kill must land mid-run"

    run_curate(*args, "--resume")

    resumed, whole = _scored(out), _scored(scored_sample)
    assert read_manifest(out).complete
    floats = ["logprobs", "nll_mean", "ppl"]
    assert resumed.drop(floats).equals(whole.drop(floats))
    # Same rows, same tokens; log-probabilities equal up to batch-composition noise in float32.
    assert (resumed["logprobs"].explode() - whole["logprobs"].explode()).abs().max() < 1e-4
    assert (resumed["nll_mean"] - whole["nll_mean"]).abs().max() < 1e-5
    assert _rejects(out) == _rejects(scored_sample) == []


def test_resume_discards_a_half_written_shard_and_its_rejects(tmp_path, hf_engine, chat_tokenizer, sample_path):
    lines = sample_path.read_text().splitlines()[:6]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join([lines[0], "{bad", *lines[1:]]) + "\n")
    out = tmp_path / "out"
    score_dataset(source, out, hf_engine, chat_tokenizer, model_name="default", run=RunOptions(shard_rows=2))
    manifest = read_manifest(out)
    # Simulate a crash after shard 1 was recorded: later shards and rejects written but not recorded.
    manifest_path = out / "manifest.json"
    data = json.loads(manifest_path.read_text())
    data["shards"], data["complete"] = data["shards"][:1], False
    manifest_path.write_text(json.dumps(data))
    (out / "part-00007.parquet.partial").write_bytes(b"junk")
    with open(out / REJECTS, "a") as handle:
        handle.write('{"row": 99, "reason": "left over"}\n')

    score_dataset(source, out, hf_engine, chat_tokenizer, model_name="default", run=RunOptions(shard_rows=2, resume=True))

    assert sorted(_scored(out)["row"].to_list() + [r["row"] for r in _rejects(out)]) == list(range(7))
    assert [r["row"] for r in _rejects(out)] == [1]
    assert not list(out.glob("*.partial"))
    assert len(read_manifest(out).shards) == len(manifest.shards)


def test_resume_reads_the_shard_journal_and_ignores_a_torn_last_line(tmp_path, hf_engine, chat_tokenizer, sample_path):
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(sample_path.read_text().splitlines()[:6]) + "\n")
    out = tmp_path / "out"
    score_dataset(source, out, hf_engine, chat_tokenizer, model_name="default", run=RunOptions(shard_rows=2))
    whole = _scored(out)
    # The state of a run that died while appending shard 2's line: the manifest holds only the
    # options, the journal two whole lines and a torn third; shard 2's file is there, unrecorded.
    data = json.loads((out / "manifest.json").read_text())
    shards, data["shards"], data["complete"] = data["shards"], [], False
    (out / "manifest.json").write_text(json.dumps(data))
    (out / JOURNAL).write_text("".join(json.dumps(shard) + "\n" for shard in shards[:2]) + json.dumps(shards[2])[:30])
    assert [shard["file"] for shard in read_manifest(out).shards] == ["part-00000.parquet", "part-00001.parquet"]

    score_dataset(source, out, hf_engine, chat_tokenizer, model_name="default", run=RunOptions(shard_rows=2, resume=True))

    manifest = read_manifest(out)
    assert manifest.complete and not (out / JOURNAL).exists()
    assert [shard["rows"] for shard in manifest.shards] == [[0, 2], [2, 4], [4, 6]]
    assert _scored(out).drop("logprobs", "nll_mean", "ppl").equals(whole.drop("logprobs", "nll_mean", "ppl"))


@pytest.mark.slow
def test_cli_scores_the_sample_with_vllm_and_prints_a_json_summary(tmp_path, sample_path):
    result = run_curate("score", sample_path, "-o", tmp_path / "scored", "--backend", "vllm", "--json")
    summary = json.loads(result.stdout)
    assert summary["rows_in"] == summary["rows_scored"] == 82 and summary["backend"] == "vllm"
    assert 1.0 < summary["token_ppl"] < 20.0


@pytest.mark.slow
def test_vllm_with_a_step_budget_below_the_longest_example_prefills_in_chunks_and_agrees_with_hf(tmp_path, sample_path,
                                                                                             scored_sample):
    """--max-num-batched-tokens 48 splits every longer example over several engine steps (chunked
    prefill); its prompt log-probabilities must still be the hf engine's. --limit keeps 30 rows."""
    out = tmp_path / "chunked"
    result = run_curate("score", sample_path, "-o", out, "--backend", "vllm", "--max-num-batched-tokens", "48",
                        "--limit", "30", "--json")
    assert json.loads(result.stdout)["rows_in"] == 30 and read_manifest(out).meta["limit"] == 30
    chunked, whole = _scored(out), _scored(scored_sample).filter(pl.col("row") < 30)
    assert chunked["row"].to_list() == list(range(30))
    assert chunked["input_ids"].list.len().max() > 2 * 48
    assert chunked["input_ids"].equals(whole["input_ids"])
    assert (chunked["logprobs"].explode() - whole["logprobs"].explode()).abs().max() < 1e-3


def test_cli_errors_name_the_problem(tmp_path):
    bad = tmp_path / "data.txt"
    bad.write_text("hello")
    result = run_curate("score", bad, "-o", tmp_path / "o", "--backend", "hf", check=False)
    assert result.returncode != 0 and "unknown input format '.txt'" in result.stderr
    result = run_curate("score", bad, "-o", tmp_path / "o", "--prompt-field", "q", check=False)
    assert result.returncode == 2 and "--prompt-field and --response-field go together" in result.stderr
