"""Check a generated answer against the reference, where a checker exists.

Each checker returns a `Verdict`: verified True/False, or None when nothing can be
checked, with the reason. `math` and `exact` are pure functions; `code` runs the reference
unit tests against the answer's code in a separate, resource-limited process.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction

CHECKERS = ("auto", "none", "math", "exact", "code")


@dataclass(frozen=True)
class Verdict:
    verified: bool | None
    reason: str


def verify(checker: str, answer: str, reference: str | None) -> Verdict:
    if checker == "none":
        return Verdict(None, "no checker")
    if reference is None or not str(reference).strip():
        return Verdict(None, "no reference to check against")
    if checker == "auto":
        checker = checker_for(reference)
        if checker == "none":
            return Verdict(None, "no checker fits this reference")
    if checker == "math":
        return check_math(answer, reference)
    if checker == "exact":
        return check_exact(answer, reference)
    if checker == "code":
        return check_code(answer, reference)
    raise ValueError(f"unknown checker {checker!r} (expected one of {', '.join(CHECKERS)})")


def checker_for(reference: str) -> str:
    """The checker a reference calls for, for mixed datasets: unit tests (`assert` lines) are
    code, a final number is math, anything else is left unchecked."""
    if re.search(r"^\s*assert\b", reference, flags=re.MULTILINE):
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


# ---------------------------------------------------------------- code

CODE_TIMEOUT_S = 10.0  # the paper's limit for running the tests
CODE_MEMORY_BYTES = 1 << 30


def extract_code(answer: str) -> str:
    """The fenced code blocks of an answer (```python ...```), or the whole answer."""
    blocks = re.findall(r"```(?:python|py)?[^\n]*\n(.*?)```", answer, flags=re.DOTALL)
    return "\n\n".join(blocks) if blocks else answer


def _limit_resources() -> None:  # runs in the child, before exec
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (CODE_MEMORY_BYTES, CODE_MEMORY_BYTES))
    resource.setrlimit(resource.RLIMIT_CPU, (int(CODE_TIMEOUT_S) + 1, int(CODE_TIMEOUT_S) + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    resource.setrlimit(resource.RLIMIT_NPROC, (256, 256))


def _no_network_prefix() -> list[str]:
    """`unshare -rn` gives the child an empty network namespace where Linux allows it."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-rn", "true"], capture_output=True).returncode == 0:
        return [unshare, "-rn"]
    return []


_NETWORK_GUARD = (
    "import socket as _s\n"
    "def _denied(*a, **k):\n    raise OSError('network access is disabled while checking answers')\n"
    "_s.socket = _s.create_connection = _denied\n"
)


def check_code(answer: str, tests: str) -> Verdict:
    """Run `tests` (assert statements) after the answer's code, in a temporary directory,
    with CPU, memory, file-size and process limits, no network, and a wall-clock timeout
    after which the whole process group is killed."""
    program = _NETWORK_GUARD + "\n" + extract_code(answer) + "\n\n" + tests + "\n"
    with tempfile.TemporaryDirectory(prefix="curate-verify-") as workdir:
        path = os.path.join(workdir, "candidate.py")
        with open(path, "w") as handle:
            handle.write(program)
        process = subprocess.Popen(
            [*_no_network_prefix(), sys.executable, "-I", path], cwd=workdir, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={"PATH": "/usr/bin:/bin", "HOME": workdir},
            preexec_fn=_limit_resources, start_new_session=True)
        try:
            _, stderr = process.communicate(timeout=CODE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.communicate()
            return Verdict(False, f"timed out after {CODE_TIMEOUT_S:g} s")
    if process.returncode == 0:
        return Verdict(True, "all tests passed")
    last_line = stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit code {process.returncode}"]
    return Verdict(False, f"tests failed: {last_line[0][:200]}")
