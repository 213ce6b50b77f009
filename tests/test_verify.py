"""Answer checkers on real-looking answers, including ones that must NOT verify."""

import json
import time

import pytest

from curate.sandbox import SandboxUnavailable, SandboxUnavailableWarning
from curate.verify import (
    check_code,
    check_exact,
    check_math,
    checker_for,
    extract_code,
    final_answer,
    parse_number,
    verify,
    verify_all,
)


@pytest.mark.fast
@pytest.mark.parametrize(
    ("answer", "reference"),
    [
        ("She pays 3 x $4 = $12.\n#### 12", "12"),
        ("Total: 1,234 apples.\n#### 1,234", "1234"),
        ("The answer is $\\boxed{\\frac{3}{4}}$.", "3/4"),
        ("So x = 0.50", "#### 0.5"),
        ("The price is 12.00 dollars.", "12"),
        ("The fraction of red balls is 2/6 = 1/3.", "1/3"),
        ("#### -7", "-7"),
        ("The area is 11 x 19 = 209, so the garden is 209.", "209"),
    ],
)
def test_math_answers_that_verify(answer, reference):
    assert check_math(answer, reference).verified is True


@pytest.mark.fast
@pytest.mark.parametrize(
    ("answer", "reference", "why"),
    [
        ("#### 13", "12", "!="),
        ("I think it is twelve.", "12", "no final answer"),
        ("The answer is \\boxed{x+1}.", "12", "not a number"),
        ("First 12, then 3 more gives 15.", "12", "!="),  # the last number counts, not any number
        ("#### 1/3", "0.33", "!="),  # no rounding
        ("the sides are 2, 3 and 4", "9", "4 != 9"),  # a list comma is not a thousands separator
    ],
)
def test_math_answers_that_must_not_verify(answer, reference, why):
    verdict = check_math(answer, reference)
    assert verdict.verified is False and why in verdict.reason


@pytest.mark.fast
def test_final_answer_and_number_parsing():
    assert final_answer("a \\boxed{\\frac{1}{2}} b") == "\\frac{1}{2}"
    assert final_answer("steps...\n#### 42\nextra") == "42"
    assert parse_number("$1,000.") == 1000 and parse_number("2.50") == parse_number("5/2")
    assert parse_number("abc") is None and parse_number("1/0") is None


@pytest.mark.fast
def test_exact_match_ignores_case_space_and_end_punctuation():
    assert check_exact("  Paris. ", "paris").verified is True
    assert check_exact("Paris, France", "Paris").verified is False


@pytest.mark.fast
def test_no_checker_or_no_reference_gives_no_verdict():
    assert verify("none", "x", "y").verified is None
    assert verify("math", "#### 3", None).verified is None
    with pytest.raises(ValueError, match="unknown checker"):
        verify("sql", "x", "y")


GOOD = "```python\ndef add(a, b):\n    return a + b\n```"
TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
FAST_S = 1.0  # timeout for the checks below that are meant to time out


def test_code_that_passes_its_tests_verifies():
    assert check_code(GOOD, TESTS).verified is True


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        ("```python\ndef add(a, b):\n    return a - b\n```", "AssertionError"),
        ("```python\ndef add(a, b)\n    return a + b\n```", "SyntaxError"),
        ("no code at all", "SyntaxError"),
        ('```python\ndef add(a, b):\n    return a + b\nx = """\n```', "SyntaxError"),  # an open string cannot eat the tests
        ("```python\nimport socket\nsocket.create_connection(('127.0.0.1', 9))\ndef add(a, b):\n    return a + b\n```", "ConnectionRefused"),
        ("```python\nimport _socket\n_socket.socket().connect(('10.0.0.1', 80))\ndef add(a, b):\n    return a + b\n```", "unreachable"),
        ("```python\nx = bytearray(4 << 30)\ndef add(a, b):\n    return a + b\n```", "MemoryError"),
    ],
)
def test_wrong_or_hostile_code_does_not_verify(answer, why):
    verdict = check_code(answer, TESTS)
    assert verdict.verified is False and why in verdict.reason


WRONG = "```python\ndef add(a, b):\n    return a * b\n"


@pytest.mark.parametrize(
    "early_exit",
    [
        "exit(0)",
        "import sys\nsys.exit(0)",
        "import os\nos._exit(0)",
        'import sys\nif __name__ == "__main__":\n    sys.exit(0)',
        "raise SystemExit",
        "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
        "import builtins\nbuiltins.exec = builtins.compile = lambda *args, **kwargs: None",
    ],
)
def test_a_wrong_answer_that_exits_before_its_tests_does_not_verify(early_exit):
    verdict = check_code(WRONG + early_exit + "\n```", TESTS)
    assert verdict.verified is False, verdict


def test_a_right_answer_that_swaps_stdout_or_prints_still_verifies():
    answer = "```python\nimport io, sys\nprint('adding')\nsys.stdout = io.StringIO()\ndef add(a, b):\n    return a + b\n```"
    assert check_code(answer, TESTS).verified is True


def test_a_looping_program_is_killed_at_the_time_limit():
    started = time.perf_counter()
    verdict = check_code("```python\nimport os\nos.fork()\nwhile True:\n    pass\n```", TESTS, timeout_s=FAST_S)
    assert verdict.verified is False and "timed out" in verdict.reason
    assert time.perf_counter() - started < FAST_S + 2


def test_endless_output_is_cut_off():
    verdict = check_code("```python\nwhile True:\n    print('spam' * 1000)\n```", TESTS, timeout_s=5)
    assert verdict.verified is False and "output over" in verdict.reason


def test_code_runs_in_a_scratch_directory_that_is_removed_after(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    writes = "```python\nimport os\nopen('scratch.txt', 'w').write(os.getcwd())\ndef add(a, b):\n    return a + b\n```"
    assert check_code(writes, TESTS).verified is True
    assert not (tmp_path / "scratch.txt").exists()


def test_only_python_and_unlabelled_fences_are_code():
    answer = GOOD + "\n\nRun it with:\n```bash\npython add.py\n```\n"
    assert extract_code(answer) == "def add(a, b):\n    return a + b\n"
    assert check_code(answer, TESTS).verified is True
    assert extract_code("```py\nx = 1\n```\n```\ny = 2\n```") == "x = 1\n\n\ny = 2\n"
    assert extract_code("```python\ndef add(a, b):\n    return a + b\n") == "def add(a, b):\n    return a + b\n"


@pytest.mark.fast
def test_code_without_tests_is_unchecked_not_verified():
    verdict = verify("code", GOOD, "add returns the sum of a and b")
    assert verdict.verified is None and "no unit tests" in verdict.reason
    verdict = verify("code", GOOD, "def check(candidate):\n    assert candidate(2, 3) == 5\n")
    assert verdict.verified is None and "entry_point" in verdict.reason


# Rows shaped like the public datasets, as `curate.data` hands them over: a list column becomes JSON
# text in `reference`, the row's other columns arrive in `extra`.

MBPP_ROW = {
    "reference": json.dumps([
        "assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))",
        "assert set(similar_elements((1, 2, 3, 4),(5, 4, 3, 7))) == set((3, 4))",
        "assert set(similar_elements((11, 12, 14, 13),(17, 15, 14, 13))) == set((13, 14))",
        "assert similar_elements(*PAIR) == EXPECTED",
    ]),
    "extra": {"task_id": 2, "test_setup_code": "PAIR = ((1, 2), (2, 3))\nEXPECTED = (2,)", "test_imports": []},
}
MBPP_RIGHT = ("```python\ndef similar_elements(test_tup1, test_tup2):\n"
              "    return tuple(set(test_tup1) & set(test_tup2))\n```")
MBPP_WRONG = ("```python\ndef similar_elements(test_tup1, test_tup2):\n"  # misses shared elements out of order
              "    return tuple(a for a, b in zip(test_tup1, test_tup2) if a == b)\n```")

HUMANEVAL_ROW = {
    "reference": ("\n\nMETADATA = {\n    'author': 'jt',\n    'dataset': 'test'\n}\n\n\ndef check(candidate):\n"
                  "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True\n"
                  "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False\n"
                  "    assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.95) == True\n"
                  "    assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.8) == False\n"
                  "    assert candidate([1.0, 2.0, 3.0, 4.0, 5.0, 2.0], 0.1) == True\n"
                  "    assert candidate([1.1, 2.2, 3.1, 4.1, 5.1], 1.0) == True\n"
                  "    assert candidate([1.1, 2.2, 3.1, 4.1, 5.1], 0.5) == False\n\n"),
    "extra": {"task_id": "HumanEval/0", "entry_point": "has_close_elements"},
}
HUMANEVAL_RIGHT = ("```python\nfrom typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
                   "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n```")
HUMANEVAL_WRONG = ("```python\nfrom typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
                   "    return any(abs(a - b) < threshold for a, b in zip(numbers, numbers[1:]))  # neighbours only\n```")

GSM8K_ROW = {
    "reference": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                 "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
    "extra": None,
}
GSM8K_RIGHT = "In May she sold half of 48, which is 24. Together: 48 + 24 = 72.\n#### 72"
GSM8K_WRONG = "In May she sold half of 48, which is 24. Together: 48 + 24 = 72 in May, so 72 + 48 = 120.\n#### 120"


@pytest.mark.parametrize(
    ("row", "answer", "verified"),
    [
        (MBPP_ROW, MBPP_RIGHT, True),
        (MBPP_ROW, MBPP_WRONG, False),
        (HUMANEVAL_ROW, HUMANEVAL_RIGHT, True),
        (HUMANEVAL_ROW, HUMANEVAL_WRONG, False),
        (GSM8K_ROW, GSM8K_RIGHT, True),
        (GSM8K_ROW, GSM8K_WRONG, False),
    ],
    ids=["mbpp-right", "mbpp-wrong", "humaneval-right", "humaneval-wrong", "gsm8k-right", "gsm8k-wrong"],
)
def test_dataset_shaped_rows_verify_under_auto(row, answer, verified):
    verdict = verify("auto", answer, row["reference"], row["extra"])
    assert verdict.verified is verified, verdict


def test_verify_all_keeps_the_order_of_its_items():
    items = [(MBPP_RIGHT, MBPP_ROW["reference"], MBPP_ROW["extra"]),
             (HUMANEVAL_WRONG, HUMANEVAL_ROW["reference"], HUMANEVAL_ROW["extra"]),
             (GSM8K_RIGHT, GSM8K_ROW["reference"], None), ("Paris", None, None)]
    assert [v.verified for v in verify_all("auto", items, workers=4)] == [True, False, True, None]


@pytest.mark.fast
@pytest.mark.parametrize(
    ("reference", "extra", "checker"),
    [
        ("assert add(2, 3) == 5\nassert add(-1, 1) == 0", None, "code"),
        (MBPP_ROW["reference"], MBPP_ROW["extra"], "code"),  # a JSON list of asserts, numbers and all
        (HUMANEVAL_ROW["reference"], HUMANEVAL_ROW["extra"], "code"),
        (HUMANEVAL_ROW["reference"], None, "code"),  # then unchecked for want of an entry_point
        ('["12", "13"]', None, "math"),
        ("19", None, "math"),
        ("Steps...\n#### 1,234", None, "math"),
        ("\\boxed{\\frac{1}{2}}", None, "math"),
        ("Paris", None, "none"),
    ],
)
def test_auto_picks_the_checker_the_reference_calls_for(reference, extra, checker):
    assert checker_for(reference, extra) == checker


def test_auto_checks_a_mixed_dataset_row_by_row():
    assert verify("auto", "#### 19", "19").verified is True
    assert verify("auto", "#### 18", "19").verified is False
    assert verify("auto", "```python\ndef add(a, b):\n    return a + b\n```", "assert add(2, 3) == 5").verified is True
    assert verify("auto", "Paris.", "Paris").verified is None


@pytest.mark.fast
def test_without_a_sandbox_code_checks_refuse_unless_unsafe(monkeypatch, tmp_path):
    monkeypatch.setenv("CURATE_BWRAP", str(tmp_path / "no-bwrap"))
    with pytest.warns(SandboxUnavailableWarning, match="UNSANDBOXED"), pytest.raises(SandboxUnavailable):
        verify("code", GOOD, TESTS)
    assert verify("code", GOOD, TESTS, unsafe=True).verified is True
    assert verify("code", WRONG + "import sys\nsys.exit(0)\n```", TESTS, unsafe=True).verified is False
