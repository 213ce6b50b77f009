"""`curate export`: training files Axolotl reads as they are, with exactly the intended labels."""

import json
import os
import shutil
import signal
import subprocess
import sys

import datasets
import numpy as np
import polars as pl
import pytest

from conftest import flock_holders, run_curate
from curate.export import ExportOptions, dropped_path, export, stats_path
from curate.store import StoreError

END_OF_TURN = "<|im_end|>"


def _scored(directory) -> pl.DataFrame:
    return pl.read_parquet(sorted(directory.glob("part-*.parquet")))


def _trained_end_of_turn_tokens(scored_dir, tokenizer) -> int:
    tokens = _scored(scored_dir).select("input_ids", "target").explode("input_ids", "target")
    return tokens.filter(pl.col("target") & (pl.col("input_ids") == tokenizer.convert_tokens_to_ids(END_OF_TURN))).height


def _load(path) -> datasets.Dataset:
    kind = "parquet" if path.suffix == ".parquet" else "json"
    return datasets.load_dataset(kind, data_files=str(path), split="train")


def test_stm_export_is_pre_tokenized_data_with_surprising_tokens_masked(tmp_path, scored_sample, tokenizer):
    out = tmp_path / "train-stm.parquet"
    stats = export(scored_sample, out, ExportOptions(mode="stm", threshold=2.5), tokenizer)

    train = _load(out)
    assert set(train.column_names) == {"id", "input_ids", "attention_mask", "labels"}
    for name in ("input_ids", "attention_mask", "labels"):
        assert train.features[name].feature.dtype in ("int8", "int32", "int64")
    scored = {row["id"]: row for row in _scored(scored_sample).iter_rows(named=True)}
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    for row in train:
        source = scored[row["id"]]
        assert row["input_ids"] == source["input_ids"] and set(row["attention_mask"]) == {1}
        for token, label, logprob, is_target in zip(row["input_ids"], row["labels"], source["logprobs"], source["target"]):
            if not is_target:
                assert label == -100
            elif token == end_of_turn:
                assert label == token  # the model must still learn to stop
            else:
                assert label == (token if logprob is None or np.exp(-logprob) <= 2.5 else -100)
    assert stats.examples_out == len(train) and 0 < stats.masked_tokens < stats.target_tokens
    assert stats.token_ppl_after < stats.token_ppl_before
    assert json.loads(stats_path(out).read_text())["masked_tokens"] == stats.masked_tokens


def test_ground_truth_trains_every_target_token(tmp_path, scored_sample, tokenizer):
    out = tmp_path / "train-gt.jsonl"
    stats = export(scored_sample, out, ExportOptions(mode="ground-truth"), tokenizer)
    scored = {row["id"]: row for row in _scored(scored_sample).iter_rows(named=True)}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 82 and stats.masked_tokens == 0
    for row in rows:
        expected = [t if m else -100 for t, m in zip(row["input_ids"], scored[row["id"]]["target"])]
        assert row["labels"] == expected
    # The trained tokens decode back to the assistant answers.
    first = rows[0]
    answer = scored[first["id"]]["messages"][-1]["content"]
    assert tokenizer.decode([t for t in first["labels"] if t != -100]) == answer + END_OF_TURN


def test_parquet_and_jsonl_exports_hold_the_same_rows(tmp_path, scored_sample, tokenizer):
    export(scored_sample, tmp_path / "a.parquet", ExportOptions(mask_ratio=0.2), tokenizer)
    export(scored_sample, tmp_path / "b.jsonl", ExportOptions(mask_ratio=0.2), tokenizer)
    assert _load(tmp_path / "a.parquet").to_list() == _load(tmp_path / "b.jsonl").to_list()


def test_mask_ratio_masks_that_fraction_of_the_maskable_tokens(tmp_path, scored_sample, tokenizer):
    stats = export(scored_sample, tmp_path / "r.parquet", ExportOptions(mask_ratio=0.2), tokenizer)
    maskable = stats.target_tokens - _trained_end_of_turn_tokens(scored_sample, tokenizer)
    assert abs(stats.masked_tokens - round(0.2 * maskable)) <= 1
    assert stats.threshold > 1.0


def test_every_example_is_written_or_dropped_with_a_reason(tmp_path, scored_sample, tokenizer):
    out = tmp_path / "t.parquet"
    stats = export(scored_sample, out, ExportOptions(threshold=2.5, max_ppl=10.0, max_length=120), tokenizer)
    dropped = [json.loads(line) for line in dropped_path(out).read_text().splitlines()]
    assert stats.examples_out + len(dropped) == stats.examples_in == 82
    assert sum(stats.dropped.values()) == len(dropped) > 0
    assert {d["reason"].split(" is over ")[-1].split()[0] for d in dropped} <= {"--max-ppl", "--max-length"}
    assert max(len(ids) for ids in _load(out)["input_ids"]) <= 120


def test_end_of_turn_survives_masking_every_other_token(tmp_path, scored_sample, tokenizer):
    # Masking every maskable token leaves only the protected end-of-turn tokens trained.
    stats = export(scored_sample, tmp_path / "t.parquet", ExportOptions(per_sample_ratio=1.0), tokenizer)
    assert stats.examples_out == 82
    assert stats.trained_tokens == _trained_end_of_turn_tokens(scored_sample, tokenizer)


def test_export_refuses_data_scored_with_another_tokenizer(tmp_path, scored_sample, model_dir):
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(model_dir)
    other.add_tokens(["<new-token>"])
    with pytest.raises(StoreError, match="another tokenizer"):
        export(scored_sample, tmp_path / "t.parquet", ExportOptions(), other)


def test_export_refuses_an_unfinished_scored_directory(tmp_path, scored_sample, tokenizer):
    partial = tmp_path / "partial"
    shutil.copytree(scored_sample, partial)
    manifest = json.loads((partial / "manifest.json").read_text())
    manifest["complete"] = False
    (partial / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="not finished"):
        export(partial, tmp_path / "t.parquet", ExportOptions(), tokenizer)


def test_options_are_checked():
    with pytest.raises(ValueError, match="one of"):
        ExportOptions(threshold=2.0, mask_ratio=0.2)
    with pytest.raises(ValueError, match="only applies to --mode stm"):
        ExportOptions(mode="ground-truth", threshold=2.0)
    assert ExportOptions().threshold == 2.5


def test_cli_export_and_stats(tmp_path, scored_sample):
    result = run_curate("export", scored_sample, "-o", tmp_path / "t.parquet", "--json")
    assert json.loads(result.stdout)["threshold"] == 2.5
    table = run_curate("stats", scored_sample).stdout
    assert "<- paper default" in table and "token ppl" in table
    as_json = json.loads(run_curate("stats", scored_sample, "--json").stdout)
    ratios = list(as_json["masked_ratio"].values())
    assert ratios == sorted(ratios, reverse=True)  # a higher τ masks less
    refused = run_curate("export", scored_sample, "-o", tmp_path / "t.csv", check=False)
    assert refused.returncode == 1 and ".parquet or .jsonl" in refused.stderr


def test_examples_left_with_no_trained_token_are_dropped_with_a_reason(tmp_path, sample_path, hf_engine, tokenizer):
    from curate.score import score_dataset
    from curate.tokenize import ChatTokenizer

    source = tmp_path / "six.jsonl"
    source.write_text("\n".join(sample_path.read_text().splitlines()[:6]) + "\n")
    # Truncated examples lose their end-of-turn token, so masking all else leaves them nothing to train.
    scored = tmp_path / "scored"
    score_dataset(source, scored, hf_engine, ChatTokenizer(tokenizer, max_length=64, truncate=True), model_name="default")
    truncated = _scored(scored)["truncated"].sum()
    out = tmp_path / "t.parquet"
    stats = export(scored, out, ExportOptions(per_sample_ratio=1.0), tokenizer)
    assert truncated > 0 and stats.dropped == {"no_trained_tokens": truncated}
    assert stats.examples_out == 6 - truncated
    assert all("no trained token left" in json.loads(line)["reason"] for line in dropped_path(out).read_text().splitlines())


def test_export_refuses_another_model_than_the_one_that_scored(tmp_path, scored_sample, model_dir):
    # A "fine-tune" of the same model: same tokenizer, other weights (here only the config differs).
    other = tmp_path / "other-model"
    other.mkdir()
    for path in model_dir.iterdir():
        (other / path.name).symlink_to(path)
    (other / "config.json").unlink()
    (other / "config.json").write_text((model_dir / "config.json").read_text().replace("{", '{"note": "fine-tuned",', 1))
    refused = run_curate("export", scored_sample, "-o", tmp_path / "t.parquet", "--model", other, check=False)
    assert refused.returncode != 0 and "scored with the model" in refused.stderr and "--allow-other-model" in refused.stderr
    assert not (tmp_path / "t.parquet").exists()
    run_curate("export", scored_sample, "-o", tmp_path / "t.parquet", "--model", other, "--allow-other-model", "--quiet")
    run_curate("export", scored_sample, "-o", tmp_path / "same.parquet", "--model", model_dir, "--quiet")
    assert json.loads(stats_path(tmp_path / "same.parquet").read_text())["model_fingerprint"]


def test_a_scored_set_of_an_older_format_gets_a_clear_error(tmp_path, scored_sample, tokenizer):
    old = tmp_path / "old"
    shutil.copytree(scored_sample, old)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps(manifest | {"format": 1}))
    with pytest.raises(StoreError, match="older curate .* score it again"):
        export(old, tmp_path / "t.parquet", ExportOptions(mode="stm"), tokenizer)


def _stopped_while_writing(command: list, partial) -> subprocess.Popen | None:
    """Start `command` and stop it (SIGSTOP) while it holds its lock on `partial`, as the kernel
    reports it; None if it finished first."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while process.poll() is None:
        if partial.exists() and process.pid in flock_holders(partial):
            os.kill(process.pid, signal.SIGSTOP)
            if partial.exists() and process.pid in flock_holders(partial):
                return process
            os.kill(process.pid, signal.SIGCONT)
    process.wait()
    return None


def test_two_exports_to_one_file_never_mix_the_second_is_refused(tmp_path, scored_sample, tokenizer):
    reference = tmp_path / "reference.parquet"
    export(scored_sample, reference, ExportOptions(mode="stm", threshold=2.5), tokenizer)
    out = tmp_path / "train.parquet"
    partial = out.with_name(out.name + ".partial")
    curate = [os.path.join(os.path.dirname(sys.executable), "curate"), "export", str(scored_sample), "-o", str(out)]
    for _ in range(5):
        first = _stopped_while_writing(curate + ["--mode", "stm", "--threshold", "2.5"], partial)
        if first is not None:
            break
    assert first is not None, "the first export never held its lock long enough to be stopped"
    try:
        second = run_curate(*curate[1:], "--mode", "ground-truth", check=False)
        assert second.returncode == 1 and "being written by another curate export" in second.stderr
        assert flock_holders(partial) == {first.pid}
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=120) == 0
    # What the first export published is its own set, whole: the same rows, labels and stats as alone.
    assert pl.read_parquet(out).equals(pl.read_parquet(reference))
    assert json.loads(stats_path(out).read_text())["masked_tokens"] == json.loads(stats_path(reference).read_text())["masked_tokens"]
    assert dropped_path(out).read_text() == dropped_path(reference).read_text()
    assert not list(tmp_path.glob("*.partial"))
