"""Read datasets and normalise every row to one conversation shape.

Readers stream: they yield `(row_number, record)` one row at a time, so memory stays flat
however large the input. A row that cannot be used becomes a `RowError` with the field and
a plain reason; the caller sends it to the rejects file. No row is ever dropped silently.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from curate.errors import CurateError
from curate.settings import setting

T = TypeVar("T")

ROLES = ("system", "user", "assistant", "tool")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "tool": "tool"}
# Where datasets keep an assistant turn's reasoning trace (besides `<think>…</think>` in its content).
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


@dataclass
class Example:
    """One usable row: OpenAI-style `messages` plus the checkable `reference`, if any."""

    row: int
    id: str
    messages: list[dict[str, str]]
    reference: str | None = None
    extra: dict | None = None  # the row's other columns, carried through (e.g. a generated answer's verdict)


# Columns a shape consumes, and per-token columns of a scored set read back as input (they
# are recomputed); every other column of a row is carried along in `extra`.
_SHAPE_COLUMNS = {"messages", "conversations", "instruction", "input", "output", "system"}
_SCORED_COLUMNS = {"input_ids", "logprobs", "target", "n_target", "nll_mean", "ppl", "truncated", "extra"}


@dataclass
class RowError(Exception):
    """Why one input row cannot be used. `row` is 0-based; JSONL line = row + 1."""

    row: int
    reason: str
    field: str | None = None
    raw: str | None = None

    def __str__(self) -> str:
        where = f"row {self.row}" + (f", field {self.field!r}" if self.field else "")
        return f"{where}: {self.reason}"

    def to_record(self, source: str) -> dict:
        return {"source": source, "row": self.row, "field": self.field, "reason": self.reason, "raw": self.raw}


@dataclass(frozen=True)
class Fields:
    """Which columns hold what. `prompt`/`response` override shape detection."""

    prompt: str | None = setting("prompt_field")
    response: str | None = setting("response_field")
    reference: str = setting("reference_field")
    id: str = "id"
    split: str | None = setting("split")  # which split of a directory input (a DatasetDict, a hub download) to read


# ---------------------------------------------------------------- readers


class InputError(CurateError, ValueError):
    """The input as a whole cannot be read (its format, its encoding, a missing --split): the
    message names the file and where in it, and the run stops before touching its output."""


# Streams read through pyarrow's codecs: `data.jsonl.gz`, `data.jsonl.zst`, `data.csv.bz2`, ...
_COMPRESSION = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2", ".lz4": "lz4"}
_SPLIT_FILE = re.compile(r"(?P<split>[A-Za-z][\w.]*?)-\d+-of-\d+")  # train-00000-of-00003.parquet


def read_records(path: Path, start: int = 0, split: str | None = None) -> Iterator[tuple[int, dict | RowError]]:
    """Yield (row, record) from row `start` on. Formats by extension or directory layout; a
    directory holding several splits (a DatasetDict, a hub download) needs `split`."""
    path = Path(path)
    if path.is_dir():
        yield from _read_directory(path, start, split)
        return
    if split is not None:
        raise InputError(f"{path}: --split names a split of a directory input (a DatasetDict or a folder of "
                         "Parquet shards); a single file has none")
    suffix = _format_suffix(path)
    if suffix in (".jsonl", ".ndjson"):
        yield from _read_jsonl(path, start)
    elif suffix == ".json":
        yield from _read_json(path, start)
    elif suffix == ".parquet":
        yield from _read_parquet_files([path], start)
    elif suffix in (".csv", ".tsv"):
        yield from _read_csv(path, start, delimiter="\t" if suffix == ".tsv" else ",")
    else:
        raise InputError(f"{path}: unknown input format {''.join(path.suffixes) or path.name!r} (use .jsonl, .json, "
                         ".parquet, .csv, .tsv, compressed .gz/.zst, or a directory: `datasets` save_to_disk, "
                         "a DatasetDict with --split, or a folder of Parquet shards)")


def check_input(path: Path, fields: Fields | None = None) -> None:
    """Open the input and read its first row, so that a run fails on a bad input before it
    touches its output directory (`--overwrite` included)."""
    records = read_records(path, split=fields.split if fields else None)
    try:
        next(records, None)
    finally:
        records.close()


def _format_suffix(path: Path) -> str:
    """`.jsonl` for data.jsonl and data.jsonl.gz alike."""
    suffix = path.suffix.lower()
    return Path(path.stem).suffix.lower() if suffix in _COMPRESSION else suffix


def _open_bytes(path: Path):
    """The file's bytes, decompressed where its name says it is compressed."""
    codec = _COMPRESSION.get(path.suffix.lower())
    if codec is None:
        return open(path, "rb")
    if codec == "gzip":  # Python's own: pyarrow's gzip stream ends quietly where a file was cut short
        import gzip

        return gzip.open(path, "rb")
    import pyarrow as pa

    return io.BufferedReader(pa.input_stream(str(path), compression=codec))


def _lines(path: Path) -> Iterator[bytes]:
    """Lines as bytes (each decoded on its own, so one bad line is one reject); a stream that
    cannot be decompressed is an error naming the file and the line it stopped at."""
    with _open_bytes(path) as handle:
        number = 0
        while True:
            try:
                line = handle.readline()
            except (OSError, EOFError) as error:
                raise InputError(f"{path}: cannot be read after line {number}: {error}") from None
            if not line:
                return
            number += 1
            yield line


def recorded_shards(directory: Path) -> list[Path]:
    """The shards of a finished curate run, as its manifest lists them: a shard it does not
    record (a crash's leftover) is not data, and an unfinished run is refused."""
    from curate.store import open_scored

    return open_scored(directory)[1]


def _read_jsonl(path: Path, start: int) -> Iterator[tuple[int, dict | RowError]]:
    for row, raw in enumerate(_lines(path)):
        if row < start:
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            yield row, RowError(row, f"line {row + 1} is not UTF-8 text (byte 0x{raw[error.start]:02x} at column "
                                     f"{error.start + 1}); re-encode the file as UTF-8",
                                raw=raw.decode("utf-8", "backslashreplace").rstrip("\r\n"))
            continue
        if row == 0:
            line = line.removeprefix("\ufeff")  # a byte-order mark, as Excel and some editors write
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            yield row, RowError(row, f"line {row + 1} is not valid JSON: {error.msg} (column {error.colno})",
                                raw=line.rstrip("\r\n"))
            continue
        if not isinstance(record, dict):
            yield row, RowError(row, f"line {row + 1} is a JSON {type(record).__name__}, not an object", raw=line.rstrip("\r\n"))
            continue
        yield row, record


def _read_json(path: Path, start: int) -> Iterator[tuple[int, dict | RowError]]:
    """A JSON array of objects, one object (one row), or `{"data": [...]}` (read whole: JSON
    arrays cannot be streamed cheaply). JSON lines named .json are read as JSON lines."""
    with _open_bytes(path) as handle:
        data = handle.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise InputError(f"{path}: line {line} is not UTF-8 text (byte 0x{data[error.start]:02x}); re-encode the "
                         "file as UTF-8") from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # one JSON value after another: JSON lines
            yield from _read_jsonl(path, start)
            return
        raise InputError(f"{path}: not valid JSON at line {error.lineno}, column {error.colno}: {error.msg}") from None
    if isinstance(records, dict):
        lists = [value for value in records.values() if isinstance(value, list) and value and isinstance(value[0], dict)]
        wrapped = len(lists) == 1 and not (_SHAPE_COLUMNS & records.keys())
        records = lists[0] if wrapped else [records]
    for row, record in enumerate(records):
        if row < start:
            continue
        if isinstance(record, dict):
            yield row, record
        else:
            yield row, RowError(row, f"item is a JSON {type(record).__name__}, not an object", raw=json.dumps(record))


def _read_csv(path: Path, start: int, delimiter: str) -> Iterator[tuple[int, dict | RowError]]:
    """CSV/TSV with a header row; a byte-order mark is ignored, a row that is not UTF-8 is a reject."""
    with io.TextIOWrapper(_open_bytes(path), encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        for row, record in enumerate(csv.DictReader(handle, delimiter=delimiter)):
            if row < start:
                continue
            if None in record:
                yield row, RowError(row, "more cells than header columns", raw=delimiter.join(map(str, record.pop(None))))
                continue
            undecodable = next((key for key, value in record.items() if not _is_utf8(key) or not _is_utf8(value)), None)
            if undecodable is not None:
                raw = delimiter.join(str(v).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                                     for v in record.values())
                yield row, RowError(row, "not UTF-8 text; re-encode the file as UTF-8", field=_printable(undecodable), raw=raw)
                continue
            yield row, record


def _is_utf8(text) -> bool:
    try:
        text is None or text.encode("utf-8")
    except UnicodeEncodeError:  # surrogate-escaped bytes that were not UTF-8
        return False
    return True


def _printable(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _read_parquet_files(files: list[Path], start: int) -> Iterator[tuple[int, dict | RowError]]:
    import pyarrow.parquet as pq

    row = 0
    for file in files:
        parquet = pq.ParquetFile(file)
        if row + parquet.metadata.num_rows <= start:
            row += parquet.metadata.num_rows
            continue
        for batch in parquet.iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                if row >= start:
                    yield row, record
                row += 1


def _read_directory(path: Path, start: int, split: str | None) -> Iterator[tuple[int, dict | RowError]]:
    """A curate run, a `datasets` save_to_disk directory (a Dataset, or a DatasetDict with
    `split`), or a folder of Parquet shards (as `hf download` leaves them)."""
    if (path / "manifest.json").exists():
        _no_split(path, split, "a curate run")
        yield from _read_parquet_files(recorded_shards(path), start)
    elif (path / "dataset_dict.json").exists():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        yield from _read_datasets_dir(path / _chosen_split(path, splits, split), start)
    elif (path / "state.json").exists():
        _no_split(path, split, "one `datasets` Dataset")
        yield from _read_datasets_dir(path, start)
    else:
        shards = sorted(p for p in path.rglob("*.parquet") if not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not shards:
            raise InputError(f"{path}: a directory input must be a `datasets` save_to_disk directory (state.json or "
                             "dataset_dict.json), a curate run (manifest.json) or a folder of .parquet files; it is none")
        by_split: dict[str | None, list[Path]] = {}
        for shard in shards:
            by_split.setdefault(_split_of(shard.relative_to(path)), []).append(shard)
        chosen = _chosen_split(path, sorted(by_split, key=str), split) if len(by_split) > 1 or split else next(iter(by_split))
        yield from _read_parquet_files(by_split[chosen], start)


def _split_of(relative: Path) -> str | None:
    """`train` for train-00000-of-00002.parquet and for train/0000.parquet; None for part-0.parquet."""
    named = _SPLIT_FILE.fullmatch(relative.stem)
    if named:
        return named["split"]
    return relative.parent.name if relative.parent.name else None


def _chosen_split(path: Path, splits: list, split: str | None):
    if split is None:
        raise InputError(f"{path} holds the splits {', '.join(map(str, splits))}: name one with --split")
    if split not in splits:
        raise InputError(f"{path} has no split {split!r}; it holds {', '.join(map(str, splits))}")
    return split


def _no_split(path: Path, split: str | None, what: str) -> None:
    if split is not None:
        raise InputError(f"{path} is {what}, with no splits to choose from: leave out --split")


def _read_datasets_dir(path: Path, start: int) -> Iterator[tuple[int, dict | RowError]]:
    """A directory written by `datasets.Dataset.save_to_disk`: Arrow stream files listed in
    state.json. Read with pyarrow directly, so `datasets` is not needed at run time."""
    import pyarrow as pa

    state_file = path / "state.json"
    if not state_file.exists():
        raise InputError(f"{path}: not a `datasets` save_to_disk directory (no state.json found)")
    files = [path / entry["filename"] for entry in json.loads(state_file.read_text())["_data_files"]]
    row = 0
    for file in files:
        with pa.memory_map(str(file)) as source:
            for batch in pa.ipc.open_stream(source):
                for record in batch.to_pylist():
                    if row >= start:
                        yield row, record
                    row += 1


def read_in_chunks(path: Path, prepare: Callable[[Example], T], fields: Fields = Fields(), start: int = 0,
                   size: int = 128) -> Iterator[tuple[int, list[tuple[Example, T]], list[dict]]]:
    """Chunks of `size` input rows from row `start` on, normalised and passed to `prepare`
    (which may raise `RowError`): (end row, [(example, prepared)], reject records). Each input
    row is in exactly one of the two lists; a chunk of only rejects is yielded too."""
    records = read_records(path, start=start, split=fields.split)
    while chunk := list(itertools.islice(records, size)):
        yield (chunk[-1][0] + 1, *prepare_rows(chunk, prepare, fields, str(path)))


def prepare_rows(chunk: list[tuple[int, dict | RowError]], prepare: Callable[[Example], T], fields: Fields,
                 source: str) -> tuple[list[tuple[Example, T]], list[dict]]:
    """([(example, prepared)], reject records) of some read rows: each row in exactly one list."""
    prepared, rejects = [], []
    for row, record in chunk:
        try:
            if isinstance(record, RowError):
                raise record
            example = normalise(row, record, fields)
            prepared.append((example, prepare(example)))
        except RowError as error:
            if error.raw is None:
                error.raw = json.dumps(record, ensure_ascii=False, default=str)
            rejects.append(error.to_record(source))
    return prepared, rejects


def prefetched(items: Iterator[T], depth: int = 1) -> Iterator[T]:
    """`items`, produced in a background thread `depth` items ahead: the next chunk is read,
    rendered and tokenized while the engine works on this one."""
    import queue
    import threading

    ahead: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(entry) -> bool:
        while not stop.is_set():
            try:
                ahead.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer(("item", item)):
                    return
            offer(("done", None))
        except BaseException as error:  # handed to the consumer, raised there
            offer(("error", error))

    threading.Thread(target=produce, name="curate-prefetch", daemon=True).start()
    try:
        while True:
            kind, value = ahead.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()


def count_rows(path: Path) -> int | None:
    """Row count for a progress bar, where it is cheap to know (None otherwise)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        with open(path, "rb") as handle:
            return sum(1 for _ in handle)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if path.is_dir() and (path / "manifest.json").exists():
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(p).metadata.num_rows for p in recorded_shards(path))
    return None


# ---------------------------------------------------------------- normalisation


def normalise(row: int, record: dict, fields: Fields = Fields()) -> Example:
    """Turn one raw record into an `Example`, or raise `RowError` saying what is wrong."""
    if fields.prompt or fields.response:
        messages = _from_prompt_response(row, record, fields)
    elif "messages" in record:
        messages = _from_messages(row, record["messages"], "messages")
    elif "conversations" in record:
        messages = _from_sharegpt(row, record["conversations"])
    elif "instruction" in record and "output" in record:
        messages = _from_alpaca(row, record)
    else:
        raise RowError(row, f"no known shape: expected `messages`, `conversations`, `instruction`+`output`, "
                            f"or --prompt-field/--response-field (columns: {sorted(record)})")
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError(row, "no assistant turn to score", field="messages")
    # The messages are the example as read (a trailing user turn too); the tokenizer marks
    # which turns are trained. Tool definitions are context the template renders.
    tools = record["tools"] if "tools" in record else _carried_extra(record).get("tools")
    if tools is not None and tools != "":
        if isinstance(tools, str):
            try:
                tools = json.loads(tools)
            except json.JSONDecodeError:
                raise RowError(row, "not a list of tool definitions (a string that is not JSON)", field="tools") from None
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise RowError(row, "expected a list of tool definitions (objects)", field="tools")
        messages[0]["tools"] = json.dumps(tools, ensure_ascii=False)
    reference = record.get(fields.reference)
    if reference is not None and not isinstance(reference, str):
        reference = json.dumps(reference) if isinstance(reference, (list, dict)) else str(reference)
    raw_id = record.get(fields.id)
    used = _SHAPE_COLUMNS | _SCORED_COLUMNS | {fields.id, fields.reference, fields.prompt, fields.response}
    extra = _carried_extra(record) | {k: v for k, v in record.items() if k not in used}
    return Example(row=row, id=str(row) if raw_id is None else str(raw_id), messages=messages, reference=reference, extra=extra or None)


def _carried_extra(record: dict) -> dict:
    """The `extra` of a scored row read back as input, so that it survives a re-score."""
    try:
        carried = json.loads(record.get("extra") or "{}")
    except (TypeError, ValueError):
        return {}
    return carried if isinstance(carried, dict) else {}


def _text(row: int, value, field_name: str) -> str:
    if not isinstance(value, str):
        raise RowError(row, f"expected a string, got {type(value).__name__}", field=field_name)
    return value


def _checked_message(row: int, role, content, field_name: str, weight=None, source: dict | None = None) -> dict:
    """One message: role, content, and where given, Axolotl's `weight`, an assistant's
    `tool_calls` (stored as JSON) and reasoning (`reasoning`), a tool result's `tool_call_id`/`name`."""
    source = source or {}
    if role not in ROLES:
        hint = " (a tool result's role is `tool`)" if role in ("function", "ipython", "observation") else ""
        raise RowError(row, f"unknown role {role!r} (expected one of {', '.join(ROLES)}){hint}", field=field_name)
    tool_calls = _checked_tool_calls(row, source.get("tool_calls"), field_name) if role == "assistant" else None
    if content is None and tool_calls:
        content = ""
    if role == "tool" and isinstance(content, (dict, list)) and not _is_parts(content):
        content = json.dumps(content, ensure_ascii=False)
    content = _text(row, _joined_parts(row, content, field_name), field_name)
    reasoning = None
    for key in _REASONING_KEYS:
        if role == "assistant" and source.get(key) not in (None, ""):
            reasoning = _text(row, source[key], f"{field_name}.{key}")
            break
    if role == "assistant" and not content.strip() and not tool_calls:
        raise RowError(row, "empty assistant response", field=field_name)
    message = {"role": role, "content": content}
    if tool_calls:
        message["tool_calls"] = json.dumps(tool_calls, ensure_ascii=False)
    if reasoning is not None:
        message["reasoning"] = reasoning
    for key in ("tool_call_id", "name"):
        if role == "tool" and isinstance(source.get(key), str):
            message[key] = source[key]
    if weight is not None:
        if weight not in (0, 1) or isinstance(weight, str):
            raise RowError(row, f"weight is 0 (context only) or 1 (trained), not {weight!r}", field=f"{field_name}.weight")
        message["weight"] = int(weight)
    return message


def _is_parts(content) -> bool:
    return isinstance(content, list) and all(isinstance(part, dict) and "type" in part for part in content)


def _checked_tool_calls(row: int, calls, field_name: str) -> list[dict] | None:
    """OpenAI `tool_calls`: [{"type": "function", "function": {"name", "arguments"}}], arguments
    an object or its JSON text; a list stored as JSON text (a scored set read back) too."""
    if calls is None or calls == "" or calls == []:
        return None
    if isinstance(calls, str):
        try:
            calls = json.loads(calls)
        except json.JSONDecodeError:
            raise RowError(row, "not a list of tool calls (a string that is not JSON)", field=f"{field_name}.tool_calls") from None
    if not isinstance(calls, list):
        raise RowError(row, "expected a list of tool calls", field=f"{field_name}.tool_calls")
    for index, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or \
                not isinstance(function.get("arguments", {}), (str, dict)):
            raise RowError(row, "a tool call is {\"type\": \"function\", \"function\": {\"name\": ..., \"arguments\": ...}}",
                           field=f"{field_name}.tool_calls[{index}]")
    return calls


def _joined_parts(row: int, content, field_name: str):
    """OpenAI content parts (`[{"type": "text", "text": ...}, ...]`) as one text."""
    if not isinstance(content, list):
        return content
    texts = []
    for index, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise RowError(row, f"only text content parts can be trained on, not {kind!r}", field=f"{field_name}.content[{index}]")
        texts.append(part["text"])
    return "".join(texts)


def _from_messages(row: int, messages, field_name: str) -> list[dict[str, str]]:
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)  # CSV cells hold JSON text
        except json.JSONDecodeError:
            raise RowError(row, "not a list of messages (a string that is not JSON)", field=field_name) from None
    if not isinstance(messages, list) or not messages:
        raise RowError(row, "expected a non-empty list of {role, content} objects", field=field_name)
    out = []
    for index, message in enumerate(messages):
        where = f"{field_name}[{index}]"
        if not isinstance(message, dict) or "role" not in message or ("content" not in message and not message.get("tool_calls")):
            raise RowError(row, "expected an object with `role` and `content`", field=where)
        out.append(_checked_message(row, message["role"], message.get("content"), where, message.get("weight"), message))
    return out


def _from_sharegpt(row: int, turns) -> list[dict[str, str]]:
    if isinstance(turns, str):
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError:
            raise RowError(row, "not a list of turns (a string that is not JSON)", field="conversations") from None
    if not isinstance(turns, list) or not turns:
        raise RowError(row, "expected a non-empty list of {from, value} objects", field="conversations")
    out = []
    for index, turn in enumerate(turns):
        where = f"conversations[{index}]"
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RowError(row, "expected an object with `from` and `value`", field=where)
        role = _SHAREGPT_ROLES.get(turn["from"], turn["from"])
        out.append(_checked_message(row, role, turn["value"], where, turn.get("weight"), turn))
    return out


def _from_alpaca(row: int, record: dict) -> list[dict[str, str]]:
    instruction = _text(row, record["instruction"], "instruction")
    extra = record.get("input") or ""
    extra = _text(row, extra, "input")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    if not prompt.strip():
        raise RowError(row, "empty instruction", field="instruction")
    messages = [{"role": "user", "content": prompt}]
    if isinstance(record.get("system"), str) and record["system"].strip():
        messages.insert(0, {"role": "system", "content": record["system"]})
    messages.append(_checked_message(row, "assistant", record["output"], "output"))
    return messages


def _from_prompt_response(row: int, record: dict, fields: Fields) -> list[dict[str, str]]:
    if not (fields.prompt and fields.response):
        raise ValueError("--prompt-field and --response-field go together")
    for name in (fields.prompt, fields.response):
        if name not in record:
            raise RowError(row, "missing field", field=name)
    prompt = _text(row, record[fields.prompt], fields.prompt)
    if not prompt.strip():
        raise RowError(row, "empty prompt", field=fields.prompt)
    return [{"role": "user", "content": prompt}, _checked_message(row, "assistant", record[fields.response], fields.response)]
