"""Code-check cost per check: the two-process check (curate.code_check) against the one-process
harness it replaced, both in the same bubblewrap sandbox, serial and one per CPU.

    python bench/verify.py [--checks 64] [--workers N] [--rounds 3]

Each check is a small MBPP-like answer (half right, half subtly wrong) run with its tests in a
fresh sandbox. The one-process design, measured in the same run on the same items, is the harness
before issue 22: imports, answer, setup and tests exec'd in one interpreter, then a random token
printed, passed when the token is stdout's last line. The bare sandbox (`pass`) is timed too, to
show what both pay before any Python runs. Designs alternate in rounds; each keeps its best round.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor

from curate.sandbox import run_python, sandbox_available
from curate.verify import CODE_LIMITS, CODE_TIMEOUT_S, code_tests, extract_code, setup_code, test_imports, verify_all

RIGHT = "```python\ndef max_of_three(a, b, c):\n    return max(a, b, c)\n```"
WRONG = "```python\ndef max_of_three(a, b, c):\n    return a if a > b else b\n```"


def items(n: int) -> list[tuple[str, str, dict]]:
    """n (answer, reference, extra) rows shaped like MBPP: test_list as JSON text, test_setup_code in extra."""
    rows = []
    for i in range(n):
        tests = [f"assert max_of_three({i}, {i + 1}, {i + 2}) == {i + 2}", f"assert max_of_three({i + 2}, 0, 1) == {i + 2}",
                 "assert max_of_three(*TRIPLE) == 9"]
        rows.append((RIGHT if i % 2 == 0 else WRONG, json.dumps(tests), {"test_setup_code": "TRIPLE = (9, 8, 7)"}))
    return rows


def one_process_check(answer: str, reference: str, extra: dict) -> bool:
    """The harness before issue 22 (forgeable: see tests/test_code_check.py), for comparison only."""
    token = secrets.token_hex(16)
    parts = [("<test_imports>", test_imports(extra)), ("<answer>", extract_code(answer)),
             ("<test_setup_code>", setup_code(extra)), ("<tests>", code_tests(reference, extra))]
    program = (
        "import os, sys\n"
        "def _curate_run(parts, token, exec=exec, compile=compile, namespace=globals(),\n"
        "                flush=sys.stdout.flush, write=os.write):\n"
        "    for filename, source in parts:\n"
        "        exec(compile(source, filename, 'exec'), namespace)\n"
        "    flush()\n"
        "    write(1, ('\\n' + token + '\\n').encode())\n"
        "del os, sys\n"
        f"_curate_run({parts!r}, {token!r})\n")
    result = run_python(program, CODE_TIMEOUT_S, limits=CODE_LIMITS)
    return result.returncode == 0 and result.stdout_tail.splitlines()[-1:] == [token]


def two_process(rows, workers: int) -> list[bool]:
    return [v.verified for v in verify_all("code", rows, workers=workers)]


def one_process(rows, workers: int) -> list[bool]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda row: one_process_check(*row), rows))


def bare_sandbox(rows, workers: int) -> list[bool]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda row: run_python("pass", CODE_TIMEOUT_S).returncode == 0, rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", type=int, default=64, help="code checks per measurement [default: 64]")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="parallel workers [default: one per CPU]")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per design, the best one kept [default: 3]")
    args = parser.parse_args()
    if not sandbox_available():
        raise SystemExit("bubblewrap cannot start here: run `make sandbox`")
    rows = items(args.checks)
    expected = [i % 2 == 0 for i in range(len(rows))]
    designs = {"bare sandbox": bare_sandbox, "one process": one_process, "two processes": two_process}
    best: dict[tuple[str, int], float] = {}
    for _ in range(args.rounds):
        for workers in (1, args.workers):
            for name, run in designs.items():
                started = time.perf_counter()
                verdicts = run(rows, workers)
                seconds = time.perf_counter() - started
                assert name == "bare sandbox" or verdicts == expected, (name, verdicts)
                best[name, workers] = min(seconds, best.get((name, workers), float("inf")))
    print(f"{args.checks} code checks on {os.cpu_count()} CPUs, best of {args.rounds} rounds")
    for workers in (1, args.workers):
        print(f"  workers={workers}:")
        for name in designs:
            per_check_ms = best[name, workers] / len(rows) * 1000
            print(f"    {name:<14} {per_check_ms:7.1f} ms/check  ({len(rows) / best[name, workers]:6.1f} checks/s)")
        ratio = best["two processes", workers] / best["one process", workers]
        print(f"    two processes / one process: {ratio:.2f}x the time per check")


if __name__ == "__main__":
    main()
