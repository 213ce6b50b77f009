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
