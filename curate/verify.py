"""Check a generated answer against the reference, where a checker exists.

Each checker returns a `Verdict`: verified True/False, or None when nothing can be
checked, with the reason. `math` and `exact` are pure functions; `code` runs the answer's code
and the reference's unit tests in a bubblewrap sandbox (`curate.sandbox`), in two processes
(`curate.code_check`), and counts as passed only when the tests' process says so.
"""

from __future__ import annotations

import ast
import builtins
import json
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path

from curate.sandbox import Limits, run_python

CHECKERS = ("auto", "none", "math", "exact", "code", "choice")


@dataclass(frozen=True)
class Verdict:
    verified: bool | None
    reason: str
    one_process: bool = False  # a code check whose tests ran in the answer's process: forgeable (see check_code)


def verify(checker: str, answer: str, reference: str | None, extra: dict | None = None,
           unsafe: bool = False) -> Verdict:
    """`extra` is the row's other columns: MBPP's `test_setup_code` / `test_imports`, HumanEval's
    `entry_point`. `unsafe=True` lets code run unsandboxed where bubblewrap cannot start."""
    if checker == "none":
        return Verdict(None, "no checker")
    if reference is None or not str(reference).strip():
        return Verdict(None, "no reference to check against")
    if checker == "auto":
        checker = checker_for(reference, extra)
        if checker == "none":
            return Verdict(None, "no checker fits this reference")
    if checker == "math":
        return check_math(answer, reference)
    if checker == "exact":
        return check_exact(answer, reference)
    if checker == "code":
        return check_code(answer, reference, extra, unsafe=unsafe)
    if checker == "choice":
        return check_choice(answer, extra)
    raise ValueError(f"unknown checker {checker!r} (expected one of {', '.join(CHECKERS)})")


def verify_all(checker: str, items: Sequence[tuple[str, str | None, dict | None]], workers: int | None = None,
               unsafe: bool = False) -> list[Verdict]:
    """`verify` over (answer, reference, extra) items, in order, `workers` at a time [default: one per
    CPU]. Threads suffice: each code check is its own sandboxed process."""
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda item: verify(checker, *item, unsafe=unsafe), items))


def checker_for(reference: str, extra: dict | None = None) -> str:
    """The checker a reference calls for, for mixed datasets: unit tests (`assert` lines, a JSON
    list of asserts, HumanEval's `def check(candidate)`) are code, a final number is math,
    anything else is left unchecked."""
    if code_tests(reference, extra) is not None or _HUMANEVAL_CHECK.search(reference):
        return "code"
    answer = final_answer(reference)
    if answer is not None and parse_number(answer) is not None:
        return "math"
    return "none"


# ---------------------------------------------------------------- math

_NUMBER = r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:\s*/\s*\d+)?"


def final_answer(text: str) -> str | None:
    """The final answer of a worked solution: after `####` (GSM8K), inside the last
    `\\boxed{}`, or else the last number in the text."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        return tail.splitlines()[0].strip() if tail else None
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    numbers = re.findall(_NUMBER, text)
    return numbers[-1] if numbers else None


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def parse_number(text: str) -> Fraction | None:
    """Exact value of a written number: '1,234.50' -> 2469/2, '3/4' and '\\frac{3}{4}' -> 3/4,
    '$12' -> 12, '50%' -> 50 (the sign is dropped, not divided)."""
    cleaned = text.strip().rstrip(".").replace("$", "").replace(",", "").replace(" ", "").removesuffix("%")
    frac = re.fullmatch(r"\\[dt]?frac\{(-?\d+)\}\{(\d+)\}", cleaned)
    if frac:
        cleaned = f"{frac.group(1)}/{frac.group(2)}"
    try:
        if "/" in cleaned:
            numerator, denominator = cleaned.split("/", 1)
            return Fraction(Decimal(numerator)) / Fraction(Decimal(denominator))
        return Fraction(Decimal(cleaned))
    except (InvalidOperation, ValueError, ZeroDivisionError):
        return None


def check_math(answer: str, reference: str) -> Verdict:
    expected_text = final_answer(reference) or reference
    expected = parse_number(expected_text)
    if expected is None:
        return Verdict(None, f"reference {reference!r} has no number to compare")
    given_text = final_answer(answer)
    if given_text is None:
        return Verdict(False, "no final answer found")
    given = parse_number(given_text)
    if given is None:
        return Verdict(False, f"final answer {given_text!r} is not a number")
    if given == expected:
        return Verdict(True, f"final answer {given_text} equals {expected_text}")
    return Verdict(False, f"final answer {given_text} != {expected_text}")


# ---------------------------------------------------------------- exact


def normalise_text(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().strip(".!").strip().lower()


def check_exact(answer: str, reference: str) -> Verdict:
    if normalise_text(answer) == normalise_text(reference):
        return Verdict(True, "matches the reference")
    return Verdict(False, "differs from the reference")


# ---------------------------------------------------------------- choice


def check_choice(answer: str, extra: dict | None) -> Verdict:
    """A free answer to a multiple-choice question (`choices`, `gold` in `extra`) is right when it
    names the gold choice and no other: a small model answers in sentences, which `exact` never
    accepts. A choice that is part of the gold's own text (`heat` in `heat energy`) does not count."""
    if not extra or "choices" not in extra or "gold" not in extra:
        return Verdict(None, "no choices to check against")
    def words(text: str) -> str:
        return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())

    said = f" {words(answer)} "
    choices = [words(choice) for choice in extra["choices"]]
    gold = choices[int(extra["gold"])]
    named = [c for c in choices if c and f" {c} " in said]
    if gold not in named:
        return Verdict(False, "does not name the gold choice")
    others = [c for c in named if c != gold and c not in gold]
    if others:
        return Verdict(False, f"also names another choice ({others[0]!r})")
    return Verdict(True, "names the gold choice and no other")


# ---------------------------------------------------------------- code

CODE_TIMEOUT_S = 10.0  # the paper's limit for running the tests
ONE_PROCESS = "(in one process"  # how the reason of a one-process code check reads (curate.code_check writes it)
CODE_LIMITS = Limits()  # 1 GiB of memory, 32 processes, 1 MiB of output

_ASSERT_LINE = re.compile(r"^\s*assert\b", flags=re.MULTILINE)
_HUMANEVAL_CHECK = re.compile(r"^def check\(", flags=re.MULTILINE)
_FENCED_BLOCK = re.compile(r"```([^\n`]*)\n(.*?)(?:```|\Z)", flags=re.DOTALL)
_PYTHON_LABELS = {"", "python", "py", "python3"}


def extract_code(answer: str) -> str:
    """The answer's Python: its ```python, ```py and unlabelled fenced blocks (a ```bash block is
    not code to run), or the whole answer when it has no fences. A last block cut off before its
    closing fence still counts."""
    blocks = _FENCED_BLOCK.findall(answer)
    if not blocks:
        return answer
    return "\n\n".join(body for label, body in blocks if (label.split() or [""])[0].lower() in _PYTHON_LABELS)


def code_tests(reference: str, extra: dict | None = None) -> str | None:
    """The unit tests in a reference, as Python source, or None: `assert` lines; a JSON list of
    assert strings (MBPP's `test_list`; the reader stores a list column as JSON text); or HumanEval's
    `def check(candidate): ...`, run as `check(<extra["entry_point"]>)`."""
    extra = extra or {}
    if reference.lstrip().startswith("["):
        try:
            items = json.loads(reference)
        except ValueError:
            items = None
        if isinstance(items, list) and items and all(isinstance(i, str) and _ASSERT_LINE.match(i) for i in items):
            return "\n".join(items)
    if _HUMANEVAL_CHECK.search(reference):
        entry_point = extra.get("entry_point")
        if isinstance(entry_point, str) and entry_point.isidentifier():
            return f"{reference}\n\ncheck({entry_point})\n"
        return None
    return reference if _ASSERT_LINE.search(reference) else None


def tested_function(tests: str, extra: dict | None = None) -> str | None:
    """The name of the function under test: HumanEval's `entry_point`, else the first function the
    tests call that is not a builtin, else the first they call (MBPP 126 tests a `sum`). Only this
    name may stand for a builtin in the tests: an answer's own `abs` must not decide
    `assert abs(f(x) - y) < 1e-9`."""
    entry_point = (extra or {}).get("entry_point")
    if isinstance(entry_point, str) and entry_point.isidentifier():
        return entry_point
    try:
        tree = ast.parse(tests)
    except SyntaxError:
        return None
    called = [node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)]
    return next((name for name in called if not hasattr(builtins, name)), called[0] if called else None)


def test_imports(extra: dict | None) -> str:
    """MBPP's `test_imports`: they run before the answer, which may rely on them."""
    imports = (extra or {}).get("test_imports") or []
    if isinstance(imports, str):
        try:
            imports = json.loads(imports)
        except ValueError:
            imports = [imports]
    if not isinstance(imports, list):
        imports = [imports]
    return "\n".join(map(str, imports))


def setup_code(extra: dict | None) -> str:
    """MBPP's `test_setup_code`: it runs after the answer and before the tests, as in MBPP's own
    harness (problem 367's setup builds trees with the answer's `class Node`)."""
    return str((extra or {}).get("test_setup_code") or "")


def check_code(answer: str, reference: str, extra: dict | None = None, *, unsafe: bool = False,
               timeout_s: float = CODE_TIMEOUT_S) -> Verdict:
    """Run the reference's tests against the answer's code in a sandbox (see `curate.sandbox`), the
    answer in one process and the tests in another (see `curate.code_check`). Passed means the
    tests' process wrote "passed" to its verdict fd, which the answer's process never holds:
    nothing the answer prints, and no way it exits, makes a verdict."""
    tests = code_tests(reference, extra)
    if tests is None:
        why = "no entry_point for its check(candidate)" if _HUMANEVAL_CHECK.search(reference) else "no unit tests"
        return Verdict(None, f"reference has {why} (assert lines, a JSON list of asserts, or HumanEval's "
                             "def check(candidate) with an entry_point)")
    payload = {"imports": test_imports(extra), "answer": extract_code(answer), "setup": setup_code(extra), "tests": tests,
               "tested": tested_function(tests, extra)}
    result = run_python(f"{_CHECK_PROGRAM}\nrun_check({payload!r})\n", timeout_s, unsafe=unsafe, limits=CODE_LIMITS)
    if result.timed_out:
        return Verdict(False, f"timed out after {timeout_s:g} s")
    passed, one_process, reason = _verdict_line(result.result)
    if passed:
        return Verdict(True, reason, one_process=one_process)
    if result.output_capped:
        return Verdict(False, f"output over the {CODE_LIMITS.output_bytes} byte limit")
    if result.memory_capped:
        return Verdict(False, f"memory over the {CODE_LIMITS.memory_bytes} byte limit of the check")
    if passed is False:
        return Verdict(False, reason, one_process=one_process)
    last_line = result.stderr_tail.strip().splitlines()[-1:] or [f"exit code {result.returncode}"]
    return Verdict(False, f"no verdict: {last_line[0][:200]}")


def _verdict_line(line: bytes) -> tuple[bool | None, bool, str]:
    """(passed, one process, reason) from the check program's "0|1 0|1 reason"; passed is None when
    the program wrote no verdict."""
    fields = line.decode(errors="replace").split(" ", 2)
    if len(fields) != 3 or fields[0] not in ("0", "1") or fields[1] not in ("0", "1"):
        return None, False, ""
    return fields[0] == "1", fields[1] == "1", fields[2]


_CHECK_PROGRAM = (Path(__file__).parent / "code_check.py").read_text()
