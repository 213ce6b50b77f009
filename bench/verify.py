"""Code-check cost per check: the two-process check (curate.code_check) against the one-process
harness it replaced, both in the same bubblewrap sandbox, serial and one per CPU.

    python bench/verify.py [--checks 64] [--workers N] [--rounds 3]

Each check is a small MBPP-like answer (half right, half subtly wrong) run with its tests in a
fresh sandbox. The one-process design, measured in the same run on the same items, is the harness
before issue 22: imports, answer, setup and tests exec'd in one interpreter, then a random token
printed, passed when the token is stdout's last line. The bare sandbox (`pass`) is timed too, to
show what both pay before any Python runs. Designs alternate in rounds; each keeps its best round.
Wall time is sandboxed; CPU time (user + system of every process a check starts, the steadier
figure on a busy machine) is measured on the same checks run without the sandbox.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

from curate.sandbox import SandboxUnavailableWarning, run_python, sandbox_available
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


def one_process_check(answer: str, reference: str, extra: dict, unsafe: bool = False) -> bool:
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
    result = run_python(program, CODE_TIMEOUT_S, unsafe=unsafe, limits=CODE_LIMITS)
    return result.returncode == 0 and result.stdout_tail.splitlines()[-1:] == [token]


def two_processes(rows, workers: int, unsafe: bool = False) -> list[bool]:
    return [v.verified for v in verify_all("code", rows, workers=workers, unsafe=unsafe)]


def one_process(rows, workers: int, unsafe: bool = False) -> list[bool]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda row: one_process_check(*row, unsafe=unsafe), rows))


def bare(rows, workers: int, unsafe: bool = False) -> list[bool]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda row: run_python("pass", CODE_TIMEOUT_S, unsafe=unsafe).returncode == 0, rows))


DESIGNS = {"bare (pass)": bare, "one process": one_process, "two processes": two_processes}


def children_cpu_s() -> float:
    """CPU seconds of the processes this one has waited for, and of those they waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def program_cpu_s(rows, rounds: int) -> dict[str, float]:
    """Each design's CPU seconds, run without the sandbox: bubblewrap's monitor exits without
    reaping the sandbox's processes, so theirs never reach RUSAGE_CHILDREN. The sandbox's own
    cost is the same for both designs."""
    cpu: dict[str, float] = {}
    previous = os.environ.get("CURATE_BWRAP")
    os.environ["CURATE_BWRAP"] = "/nonexistent/bwrap"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SandboxUnavailableWarning)
            for _ in range(rounds):
                for name, run in DESIGNS.items():
                    before = children_cpu_s()
                    run(rows, 1, unsafe=True)
                    cpu[name] = min(children_cpu_s() - before, cpu.get(name, float("inf")))
    finally:
        os.environ.pop("CURATE_BWRAP")
        if previous is not None:
            os.environ["CURATE_BWRAP"] = previous
    return cpu


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
    wall: dict[tuple[str, int], float] = {}
    for _ in range(args.rounds):
        for workers in (1, args.workers):
            for name, run in DESIGNS.items():
                started = time.perf_counter()
                verdicts = run(rows, workers)
                wall[name, workers] = min(time.perf_counter() - started, wall.get((name, workers), float("inf")))
                assert name == "bare (pass)" or verdicts == expected, (name, verdicts)
    cpu = program_cpu_s(rows, args.rounds)
    per_check = {key: seconds / len(rows) * 1000 for key, seconds in [*wall.items(), *cpu.items()]}
    print(f"{args.checks} code checks on {os.cpu_count()} CPUs, best of {args.rounds} rounds, ms per check")
    print(f"  {'':<14} {'wall, sandboxed':>16} {f'({args.workers} workers)':>12} {'CPU, unsandboxed':>18}")
    for name in DESIGNS:
        print(f"  {name:<14} {per_check[name, 1]:16.1f} {per_check[name, args.workers]:12.1f} {per_check[name]:18.1f}")
    two, one = "two processes", "one process"
    print(f"  {two} / {one}: {per_check[two, 1] / per_check[one, 1]:.2f}x and "
          f"{per_check[two, args.workers] / per_check[one, args.workers]:.2f}x the wall time, "
          f"{per_check[two] / per_check[one]:.2f}x the CPU time")


if __name__ == "__main__":
    main()
