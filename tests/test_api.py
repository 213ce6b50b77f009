"""The library's public faces, used as a notebook would: `from curate import ...`."""

import pyarrow.parquet as pq


def test_score_and_export_through_the_public_names(tmp_path, sample_path, model_dir):
    from curate import (
        ChatTokenizer,
        EngineSettings,
        ExportOptions,
        export_training_set,
        load_tokenizer,
        make_engine,
        score_dataset,
    )

    source = tmp_path / "four.jsonl"
    source.write_text("\n".join(sample_path.read_text().splitlines()[:4]) + "\n")
    tokenizer = load_tokenizer(model_dir)
    summary = score_dataset(source, tmp_path / "scored", make_engine("hf", model_dir, EngineSettings(dtype="float32")),
                            ChatTokenizer(tokenizer), model_name="default", model_dir=model_dir)
    stats = export_training_set(tmp_path / "scored", tmp_path / "train.parquet", ExportOptions(mode="stm"), tokenizer)
    assert summary.rows_scored == 4 and stats.examples_out == pq.read_table(tmp_path / "train.parquet").num_rows == 4


def test_score_conversations_in_memory_gives_the_rows_score_dataset_writes(sample_path, scored_sample, hf_engine, chat_tokenizer):
    import json

    import polars as pl

    from curate import score_conversations

    records = [json.loads(line) for line in sample_path.read_text().splitlines()[:3]]
    table = pl.from_arrow(score_conversations(records, hf_engine, chat_tokenizer))  # three input shapes
    stored = pl.read_parquet(sorted(scored_sample.glob("part-*.parquet"))).sort("row").head(3)
    assert table["input_ids"].equals(stored["input_ids"]) and table["target"].equals(stored["target"])
    assert (table["logprobs"].explode() - stored["logprobs"].explode()).abs().max() < 1e-4


def test_two_processes_preparing_the_bundled_model_at_once_both_get_it_whole(tmp_path, model_dir):
    """The first run of two commands at once (two shells, `make demo` beside the tests) de-quantizes the
    bundled model once; neither reads the other's half-written directory."""
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    target = tmp_path / "models" / "SmolLM2"
    script = f"from pathlib import Path; from curate.models import prepare_default_model; prepare_default_model(Path({str(target)!r}))"
    runs = [subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for run in runs:
        assert run.wait(timeout=600) == 0, run.stderr.read()[-3000:]
    prepared, reference = load_file(target / "model.safetensors"), load_file(model_dir / "model.safetensors")
    assert prepared.keys() == reference.keys() and all(torch.equal(prepared[k], reference[k]) for k in reference)
    assert sorted(path.name for path in target.parent.iterdir()) == [".SmolLM2.lock", "SmolLM2"]
