"""Answer checkers on real-looking answers, including ones that must NOT verify."""

import time

import pytest

from curate.verify import check_code, check_exact, check_math, checker_for, final_answer, parse_number, verify


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


def test_final_answer_and_number_parsing():
    assert final_answer("a \\boxed{\\frac{1}{2}} b") == "\\frac{1}{2}"
    assert final_answer("steps...\n#### 42\nextra") == "42"
    assert parse_number("$1,000.") == 1000 and parse_number("2.50") == parse_number("5/2")
    assert parse_number("abc") is None and parse_number("1/0") is None


def test_exact_match_ignores_case_space_and_end_punctuation():
    assert check_exact("  Paris. ", "paris").verified is True
    assert check_exact("Paris, France", "Paris").verified is False


def test_no_checker_or_no_reference_gives_no_verdict():
    assert verify("none", "x", "y").verified is None
    assert verify("math", "#### 3", None).verified is None
    with pytest.raises(ValueError, match="unknown checker"):
        verify("sql", "x", "y")


GOOD = "```python\ndef add(a, b):\n    return a + b\n```"
TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"


def test_code_that_passes_its_tests_verifies():
    assert check_code(GOOD, TESTS).verified is True


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        ("```python\ndef add(a, b):\n    return a - b\n```", "AssertionError"),
        ("```python\ndef add(a, b)\n    return a + b\n```", "SyntaxError"),
        ("no code at all", "SyntaxError"),
        ("```python\nimport socket\nsocket.create_connection(('127.0.0.1', 9))\ndef add(a, b):\n    return a + b\n```", "network"),
        ("```python\nimport _socket\n_socket.socket().connect(('10.0.0.1', 80))\ndef add(a, b):\n    return a + b\n```", "tests failed"),
        ("```python\nx = bytearray(4 << 30)\ndef add(a, b):\n    return a + b\n```", "MemoryError"),
    ],
)
def test_wrong_or_hostile_code_does_not_verify(answer, why):
    verdict = check_code(answer, TESTS)
    assert verdict.verified is False and why in verdict.reason


def test_a_looping_program_is_killed_at_the_time_limit():
    started = time.perf_counter()
    verdict = check_code("```python\nimport os\nos.fork()\nwhile True:\n    pass\n```", TESTS)
    assert verdict.verified is False and "timed out" in verdict.reason
    assert time.perf_counter() - started < 15


def test_code_runs_in_a_scratch_directory_that_is_removed_after(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    writes = "```python\nimport os\nopen('scratch.txt', 'w').write(os.getcwd())\ndef add(a, b):\n    return a + b\n```"
    assert check_code(writes, TESTS).verified is True
    assert not (tmp_path / "scratch.txt").exists()


@pytest.mark.parametrize(
    ("reference", "checker"),
    [
        ("assert add(2, 3) == 5\nassert add(-1, 1) == 0", "code"),
        ("19", "math"),
        ("Steps...\n#### 1,234", "math"),
        ("\\boxed{\\frac{1}{2}}", "math"),
        ("Paris", "none"),
    ],
)
def test_auto_picks_the_checker_the_reference_calls_for(reference, checker):
    assert checker_for(reference) == checker


def test_auto_checks_a_mixed_dataset_row_by_row():
    assert verify("auto", "#### 19", "19").verified is True
    assert verify("auto", "#### 18", "19").verified is False
    assert verify("auto", "```python\ndef add(a, b):\n    return a + b\n```", "assert add(2, 3) == 5").verified is True
    assert verify("auto", "Paris.", "Paris").verified is None
