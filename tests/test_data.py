"""Readers and normalisation: every shape and format, and clear errors for bad rows."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.data import Fields, RowError, normalise, read_records

pytestmark = pytest.mark.fast

CHAT = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "2 + 2 = 4."}]


def test_every_shape_normalises_to_the_same_conversation():
    shapes = [
        {"messages": CHAT},
        {"conversations": [{"from": "human", "value": "What is 2 + 2?"}, {"from": "gpt", "value": "2 + 2 = 4."}]},
        {"instruction": "What is 2 + 2?", "input": "", "output": "2 + 2 = 4."},
    ]
    for record in shapes:
        assert normalise(0, record).messages == CHAT
    explicit = normalise(0, {"q": "What is 2 + 2?", "a": "2 + 2 = 4."}, Fields(prompt="q", response="a"))
    assert explicit.messages == CHAT


def test_alpaca_input_is_appended_to_the_instruction():
    example = normalise(3, {"instruction": "Sum these.", "input": "1 2 3", "output": "6", "id": 17, "reference": 6})
    assert example.messages[0]["content"] == "Sum these.\n\n1 2 3"
    assert (example.id, example.reference, example.row) == ("17", "6", 3)


@pytest.mark.parametrize(
    ("record", "field", "words"),
    [
        ({"messages": []}, "messages", "non-empty list"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "no assistant turn"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}, "messages[1]", "empty assistant"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "messages[0]", "unknown role"),
        ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, "messages[0]", "expected a string"),
        ({"conversations": [{"from": "human"}]}, "conversations[0]", "`from` and `value`"),
        ({"instruction": "Do it", "output": None}, "output", "expected a string"),
        ({"text": "no shape"}, None, "no known shape"),
    ],
)
def test_bad_rows_name_the_field_and_the_reason(record, field, words):
    with pytest.raises(RowError) as caught:
        normalise(5, record)
    assert caught.value.row == 5
    assert caught.value.field == field
    assert words in caught.value.reason


def test_a_trailing_user_turn_is_kept_as_read():
    """Messages are stored as read; the tokenizer, not the reader, decides which turns are trained."""
    example = normalise(0, {"messages": [*CHAT, {"role": "user", "content": "thanks"}]})
    assert example.messages == [*CHAT, {"role": "user", "content": "thanks"}]


def _write_all_formats(tmp_path, records):
    import datasets

    paths = {}
    paths["jsonl"] = tmp_path / "d.jsonl"
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in records))
    paths["json"] = tmp_path / "d.json"
    paths["json"].write_text(json.dumps(records))
    table = pa.Table.from_pylist([{"id": r["id"], "messages": json.dumps(r["messages"])} for r in records])
    paths["csv"] = tmp_path / "d.csv"
    import pyarrow.csv as pacsv

    pacsv.write_csv(table, paths["csv"])
    paths["parquet"] = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(records), paths["parquet"])
    paths["datasets"] = tmp_path / "d_hf"
    datasets.Dataset.from_list(records).save_to_disk(str(paths["datasets"]))
    return paths


def test_every_format_reads_the_same_examples(tmp_path):
    records = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
               for i in range(7)]
    for name, path in _write_all_formats(tmp_path, records).items():
        examples = [normalise(row, record) for row, record in read_records(path)]
        assert [e.id for e in examples] == [r["id"] for r in records], name
        assert [e.messages for e in examples] == [r["messages"] for r in records], name


def test_reading_from_a_start_row_skips_exactly_the_rows_before_it(tmp_path):
    records = [{"id": str(i), "messages": CHAT} for i in range(10)]
    for name, path in _write_all_formats(tmp_path, records).items():
        assert [row for row, _ in read_records(path, start=6)] == [6, 7, 8, 9], name


def test_bad_json_lines_become_row_errors_and_reading_goes_on(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n{not json\n[1, 2]\n" + json.dumps({"messages": CHAT}) + "\n")
    rows = list(read_records(path))
    assert [row for row, _ in rows] == [0, 1, 2, 3]
    assert isinstance(rows[1][1], RowError) and "line 2 is not valid JSON" in rows[1][1].reason
    assert isinstance(rows[2][1], RowError) and "not an object" in rows[2][1].reason
    assert rows[1][1].raw == "{not json"


def test_unknown_extension_is_a_clear_error(tmp_path):
    path = tmp_path / "data.xml"
    path.write_text("<x/>")
    with pytest.raises(ValueError, match="unknown input format"):
        list(read_records(path))


def test_openai_content_parts_are_joined_and_weights_carried():
    record = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Add "}, {"type": "text", "text": "2 and 2."}]},
        {"role": "assistant", "content": "3", "weight": 0}, {"role": "user", "content": "Again."},
        {"role": "assistant", "content": [{"type": "text", "text": "4"}]},
    ]}
    example = normalise(0, record)
    assert example.messages[0]["content"] == "Add 2 and 2." and example.messages[3]["content"] == "4"
    assert example.messages[1]["weight"] == 0 and "weight" not in example.messages[3]
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                          {"role": "assistant", "content": "a cat"}]}
    with pytest.raises(RowError, match="only text content parts") as error:
        normalise(3, image)
    assert error.value.field == "messages[0].content[0]"
