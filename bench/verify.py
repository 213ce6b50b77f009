"""Code-check throughput: sandboxed checks per second, one at a time against one per CPU.

    python bench/verify.py [--checks 64] [--workers N]

Each check is a small MBPP-like answer (half right, half subtly wrong) run with its tests in a
fresh bubblewrap sandbox, so the cost is mostly starting the sandbox and the interpreter. The
baseline, measured in the same run on the same items, is `verify_all(..., workers=1)`.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from curate.sandbox import sandbox_available
from curate.verify import verify_all

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


def checks_per_second(rows, workers: int) -> tuple[float, list]:
    started = time.perf_counter()
    verdicts = verify_all("code", rows, workers=workers)
    return len(rows) / (time.perf_counter() - started), verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", type=int, default=64, help="code checks per measurement [default: 64]")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="parallel workers [default: one per CPU]")
    args = parser.parse_args()
    if not sandbox_available():
        raise SystemExit("bubblewrap cannot start here: run `make sandbox`")
    rows = items(args.checks)
    verify_all("code", rows[:2], workers=1)  # warm the page cache and the probe
    serial, serial_verdicts = checks_per_second(rows, workers=1)
    parallel, parallel_verdicts = checks_per_second(rows, workers=args.workers)
    expected = [i % 2 == 0 for i in range(len(rows))]
    assert [v.verified for v in serial_verdicts] == [v.verified for v in parallel_verdicts] == expected
    print(f"{args.checks} code checks on {os.cpu_count()} CPUs")
    print(f"  serial   (workers=1): {serial:7.1f} checks/s")
    print(f"  parallel (workers={args.workers}): {parallel:7.1f} checks/s  ({parallel / serial:.2f}x)")


if __name__ == "__main__":
    main()
