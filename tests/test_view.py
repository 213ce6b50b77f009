"""Token views and `curate inspect`: the right tokens, the right marks, on real scored data."""

import pyarrow.parquet as pq
import pytest

from conftest import run_curate
from curate.export import ExportOptions, export
from curate.view import select_examples, token_texts, token_views


def test_token_texts_read_back_as_the_decoded_text(tokenizer):
    text = "Café crème, naïve façade — 3×4 = 12 😀 日本語\n  indented"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = token_texts(ids, tokenizer)
    assert len(pieces) == len(ids)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces), "split characters are shown whole"


def test_masked_tokens_are_exactly_those_stm_export_masks(tmp_path, scored_sample, tokenizer):
    export(scored_sample, tmp_path / "stm.parquet", ExportOptions(mode="stm", threshold=2.5, with_id=True), tokenizer)
    exported = {r["id"]: r for r in pq.read_table(tmp_path / "stm.parquet").to_pylist()}
    for example in select_examples(scored_sample, top=100):
        views = token_views(example, tokenizer, threshold=2.5)
        labels = exported[example["id"]]["labels"]
        assert [v.masked for v in views] == [t and label == -100 for t, label in zip(example["target"], labels)]
        assert "".join(v.text for v in views) == tokenizer.decode(example["input_ids"])


def test_examples_are_found_by_id_by_index_and_by_perplexity(scored_sample):
    top = select_examples(scored_sample, top=3)
    assert [e["ppl"] for e in top] == sorted((e["ppl"] for e in top), reverse=True)
    assert select_examples(scored_sample, ids=[top[1]["id"], top[0]["id"]])[0]["id"] == top[1]["id"]
    assert select_examples(scored_sample, indices=[top[2]["index"]])[0]["id"] == top[2]["id"]
    with pytest.raises(KeyError, match="no example with id nope"):
        select_examples(scored_sample, ids=["nope"])


def test_inspect_prints_the_tokens_with_masked_ones_marked(scored_sample, tokenizer):
    result = run_curate("inspect", scored_sample, "--id", "math-001", "--threshold", "2.5")
    example = select_examples(scored_sample, ids=["math-001"])[0]
    views = token_views(example, tokenizer, 2.5)
    masked = [v for v in views if v.masked]
    assert masked, "the example has surprising tokens"
    out = result.stdout
    assert "\x1b[" not in out, "no colour codes when the output is not a terminal"
    assert "[[token]]: masked (ppl > τ = 2.5)" in out
    body = out.split("(masked by STM)\n", 1)[1]
    expected = "".join(f"[[{v.text}]]" if v.masked else v.text for v in views)
    assert body.startswith(expected)
    assert f"{len(masked)} of {example['n_target']} target tokens above τ = 2.5" in out


def test_inspect_in_colour_strikes_masked_tokens(scored_sample):
    out = run_curate("inspect", scored_sample, "--top", "2", "--color").stdout
    assert out.count("response perplexity") == 2
    assert "\x1b[9;" in out or "\x1b[9m" in out, "struck-through (SGR 9) masked tokens"
    assert "[[" not in out.split("\n", 1)[1]


def test_inspect_names_what_is_not_there(scored_sample):
    result = run_curate("inspect", scored_sample, "--id", "nope", check=False)
    assert result.returncode == 2 and "no example with id nope" in result.stderr
    result = run_curate("inspect", scored_sample, "--id", "x", "--top", "2", check=False)
    assert result.returncode == 2 and "give one of --id, --index, --top" in result.stderr


def test_preview_marks_the_trained_tokens_without_scoring(tmp_path, sample_path, tokenizer):
    import json

    # The first three rows of the sample: OpenAI messages, Alpaca and ShareGPT shapes.
    rows = [json.loads(line) for line in sample_path.read_text().splitlines()[:3]]
    answers = [rows[0]["messages"][-1]["content"], rows[1]["output"], rows[2]["conversations"][-1]["value"]]
    preview = json.loads(run_curate("preview", sample_path, "--limit", "3", "--json").stdout)
    assert preview["end_of_turn"]["token"] == "<|im_end|>" and len(preview["rows"]) == 3
    for item, answer in zip(preview["rows"], answers):
        trained = [t["id"] for t in item["token_list"] if t["target"]]
        assert tokenizer.decode(trained) == answer + "<|im_end|>"
    plain = run_curate("preview", sample_path, "--limit", "1", "--no-color").stdout
    assert "end-of-turn token: '<|im_end|>'" in plain and "[[" in plain and "<|im_end|>]]" in plain
