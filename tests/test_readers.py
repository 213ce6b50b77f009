"""Readers keep every row of the shapes users really have: BOMs, one JSON object, compressed JSON
lines, a non-UTF-8 line, folders of Parquet shards, a DatasetDict. No model needed."""

import csv
import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.data import Fields, InputError, RowError, check_input, normalise, read_records

pytestmark = pytest.mark.fast

CHAT = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "2 + 2 = 4."}]
ROWS = [{"id": f"r{i}", "messages": [CHAT[0], {"role": "assistant", "content": f"answer {i}"}]} for i in range(5)]


def _usable(path, **options) -> list[str]:
    """Ids of the rows that normalise; a reject fails the test with its reason."""
    ids = []
    for row, record in read_records(path, **options):
        assert not isinstance(record, RowError), f"row {row} rejected: {record}"
        ids.append(normalise(row, record).id)
    return ids


def test_a_byte_order_mark_is_ignored_in_jsonl_and_csv(tmp_path):
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in ROWS).encode())
    assert _usable(jsonl) == [r["id"] for r in ROWS]

    excel = tmp_path / "excel.csv"  # Excel's "CSV UTF-8": a BOM, then the header
    with open(excel, "w", encoding="utf-8-sig", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["instruction", "output", "id"])
        writer.writerows([["What is 2 + 2?", f"answer {i}", f"c{i}"] for i in range(3)])
    assert _usable(excel) == ["c0", "c1", "c2"]


def test_a_json_file_holding_one_object_is_one_row(tmp_path):
    single = tmp_path / "one.json"
    single.write_text(json.dumps(ROWS[0]))
    records = list(read_records(single))
    assert len(records) == 1 and normalise(*records[0]).messages == ROWS[0]["messages"]

    wrapped = tmp_path / "wrapped.json"  # {"data": [...]}: the rows are the list
    wrapped.write_text(json.dumps({"data": ROWS, "version": 2}))
    assert _usable(wrapped) == [r["id"] for r in ROWS]


def test_a_json_syntax_error_names_the_file_line_and_column(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"messages": []},\n  {"messages": [}\n]\n')
    with pytest.raises(InputError) as error:
        list(read_records(broken))
    assert str(broken) in str(error.value) and "line 3, column 17" in str(error.value)


def test_a_non_utf8_line_is_one_reject_with_its_row(tmp_path):
    lines = [json.dumps(r).encode() for r in ROWS]
    lines[2] = '{"id": "latin", "messages": [{"role": "user", "content": "café"}]}'.encode("latin-1")
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    records = list(read_records(path))
    assert [row for row, _ in records] == [0, 1, 2, 3, 4]
    reject = records[2][1]
    assert isinstance(reject, RowError) and reject.row == 2
    assert "line 3 is not UTF-8" in reject.reason and "0xe9" in reject.reason
    assert all(not isinstance(record, RowError) for row, record in records if row != 2)

    table = tmp_path / "mixed.csv"
    table.write_bytes(b"instruction,output\nWhat?,fine\n" + "Qué?,olé\n".encode("latin-1") + b"Why?,ok\n")
    records = list(read_records(table))
    assert [isinstance(record, RowError) for _, record in records] == [False, True, False]
    assert records[1][1].row == 1 and "not UTF-8" in records[1][1].reason


def test_compressed_json_lines_read_as_plain_ones(tmp_path):
    plain = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
    gz = tmp_path / "data.jsonl.gz"
    gz.write_bytes(gzip.compress(plain))
    zst = tmp_path / "data.jsonl.zst"
    with pa.CompressedOutputStream(str(zst), "zstd") as stream:
        stream.write(plain)
    assert zst.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"  # a real zstd frame
    assert _usable(gz) == _usable(zst) == [r["id"] for r in ROWS]
    assert [row for row, _ in read_records(gz, start=3)] == [3, 4]


def test_a_file_that_is_not_what_its_name_says_is_an_input_error(tmp_path):
    fake = tmp_path / "data.jsonl.gz"
    fake.write_text('{"messages": []}\n')
    with pytest.raises(InputError, match="data.jsonl.gz"):
        check_input(fake)
    with pytest.raises(InputError, match="unknown input format"):
        check_input(tmp_path / "sheet.xlsx")


def _parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([{"id": r["id"], "messages": json.dumps(r["messages"])} for r in rows]), path)


def test_a_folder_of_parquet_shards_is_one_input_and_splits_are_named(tmp_path):
    hub = tmp_path / "download"  # as `hf download` leaves a dataset
    _parquet(hub / "data" / "train-00000-of-00002.parquet", ROWS[:2])
    _parquet(hub / "data" / "train-00001-of-00002.parquet", ROWS[2:4])
    _parquet(hub / "data" / "test-00000-of-00001.parquet", ROWS[4:])
    with pytest.raises(InputError, match="holds the splits test, train: name one with --split"):
        check_input(hub)
    assert _usable(hub, split="train") == ["r0", "r1", "r2", "r3"]
    assert _usable(hub, split="test") == ["r4"]
    with pytest.raises(InputError, match="no split 'validation'"):
        check_input(hub, Fields(split="validation"))

    shards = tmp_path / "shards"  # one split: no --split needed
    _parquet(shards / "part-0.parquet", ROWS[:3])
    _parquet(shards / "part-1.parquet", ROWS[3:])
    assert _usable(shards) == [r["id"] for r in ROWS]
    with pytest.raises(InputError, match="--split names a split of a directory"):
        check_input(shards / "part-0.parquet", Fields(split="train"))


def test_a_saved_dataset_dict_needs_its_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    saved = tmp_path / "dict"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list(ROWS[:3]),
        "test": datasets.Dataset.from_list(ROWS[3:]),
    }).save_to_disk(str(saved))
    with pytest.raises(InputError, match="name one with --split"):
        check_input(saved)
    assert _usable(saved, split="train") == ["r0", "r1", "r2"]
    assert _usable(saved, split="test") == ["r3", "r4"]


def test_a_stream_cut_short_names_the_file_and_line(tmp_path):
    plain = "".join(json.dumps({"id": f"r{i}", "messages": CHAT, "n": i * 7919 % 10007}) + "\n" for i in range(5000)).encode()
    whole = gzip.compress(plain)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputError, match=r"cut.jsonl.gz: cannot be read after line \d+"):
        list(read_records(cut))


def test_utf8_csv_without_bom_is_unchanged(tmp_path):
    table = tmp_path / "plain.tsv"
    buffer = io.StringIO()
    csv.writer(buffer, delimiter="\t").writerows([["instruction", "output"], ["Qué?", "olé"]])
    table.write_text(buffer.getvalue(), encoding="utf-8")
    [(row, record)] = list(read_records(table))
    assert record == {"instruction": "Qué?", "output": "olé"}
