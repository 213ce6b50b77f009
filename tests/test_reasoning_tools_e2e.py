"""A reasoning-trace dataset and a tool-call dataset through `curate score` → `curate export`, on a
tiny random-weight Qwen3 (its real tokenizer and template): the exported labels are exactly the
targets, and those are what the model writes after its generation prompt."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import fetch_tokenizers
from conftest import run_curate
from test_families import _runs
from tiny_models import build_tiny_model

WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ROWS = [
    {"id": "think-block", "messages": [
        {"role": "user", "content": "Is 7 prime?"},
        {"role": "assistant", "content": "<think>\nNo divisor but 1 and 7.\n</think>\n\nYes."}]},
    {"id": "think-field", "messages": [
        {"role": "user", "content": "Is 9 prime?"},
        {"role": "assistant", "content": "No.", "reasoning_content": "9 = 3 * 3."},
        {"role": "user", "content": "Thanks!"}]},  # a trailing user turn: kept in the stored messages
    {"id": "tool", "tools": WEATHER, "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "content": "{\"sky\": \"clear\"}"},
        {"role": "assistant", "content": "Clear skies."}]},
]
TRAINED = {
    "think-block": ["<think>\nNo divisor but 1 and 7.\n</think>\n\nYes.<|im_end|>"],
    "think-field": ["<think>\n9 = 3 * 3.\n</think>\n\nNo.<|im_end|>"],
    "tool": ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
             "<think>\n\n</think>\n\nClear skies.<|im_end|>"],
}


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory) -> Path:
    cache = Path(os.environ.get("CURATE_CACHE") or Path.home() / ".cache" / "curate").expanduser() / "tokenizers"
    if not fetch_tokenizers.fetched(cache):
        pytest.fail(f"the chat-model tokenizers are not all fetched into {cache}: run `make tokenizers`", pytrace=False)
    return build_tiny_model(cache / "qwen3", "qwen3", tmp_path_factory.mktemp("tiny") / "qwen3")




@pytest.fixture(scope="module")
def scored_and_exported(tiny_qwen3, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("e2e")
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    scored, train = root / "scored", root / "train.parquet"
    run_curate("score", data, "-o", scored, "--model", tiny_qwen3, "--backend", "hf", "--dtype", "float32", "--quiet")
    run_curate("export", scored, "-o", train, "--mode", "ground-truth", "--quiet")
    return scored, train


def test_reasoning_and_tool_rows_score_and_export_with_the_labels_the_model_must_generate(tiny_qwen3, scored_and_exported):
    from transformers import AutoTokenizer

    scored, train = scored_and_exported
    manifest = json.loads((scored / "manifest.json").read_text())
    assert manifest["meta"]["targets"]["reasoning"] == "keep"
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3)
    rows = {row["id"]: row for row in pq.read_table(sorted(scored.glob("part-*.parquet"))).to_pylist()}
    assert set(rows) == set(TRAINED)
    assert [(m["role"], m["trained"]) for m in rows["think-field"]["messages"]] == [
        ("user", False), ("assistant", True), ("user", False)]
    assert rows["think-field"]["messages"][1]["reasoning"] == "9 = 3 * 3."
    assert json.loads(rows["tool"]["messages"][1]["tool_calls"])[0]["function"]["name"] == "get_weather"
    for name, row in rows.items():
        spans = [tokenizer.decode(row["input_ids"][a:b]) for a, b in _runs(row["target"])]
        assert spans == TRAINED[name], name
        assert [row["input_ids"][i] for i, e in enumerate(row["end_of_turn"]) if e] == [151645] * len(spans)
    for example in pq.read_table(train).to_pylist():
        row = rows[example["id"]]
        assert example["input_ids"] == row["input_ids"]
        assert example["labels"] == [t if keep else -100 for t, keep in zip(row["input_ids"], row["target"])]


@pytest.mark.slow
def test_axolotl_prepares_exactly_the_exported_labels_and_trains_on_them(tiny_qwen3, scored_and_exported, tmp_path):
    """The CPU recipe, with the tiny Qwen3 as its base model: Axolotl's prepared labels are ours."""
    import datasets

    from curate.recipes import prepare_recipe
    from test_finetune import CPU_RECIPE, _axolotl

    _, train = scored_and_exported
    output_dir = tmp_path / "run"
    config = prepare_recipe(CPU_RECIPE, train, {"OUTPUT_DIR": str(output_dir), "MAX_STEPS": "2",
                                                "BASE_MODEL": str(tiny_qwen3)}, tmp_path / "config.yml")
    _axolotl("axolotl", "preprocess", config, cwd=tmp_path)
    prepared_dir = next(p.parent for p in (output_dir / "prepared").rglob("state.json"))
    prepared = {row["id"]: row for row in datasets.load_from_disk(str(prepared_dir))}
    exported = {row["id"]: row for row in pq.read_table(train).to_pylist()}
    assert prepared.keys() == exported.keys() == set(TRAINED)
    for key, row in exported.items():
        assert prepared[key]["input_ids"] == row["input_ids"] and prepared[key]["labels"] == row["labels"]
    _axolotl("axolotl", "train", config, cwd=tmp_path)
    assert list(output_dir.glob("checkpoint-*/trainer_state.json"))
