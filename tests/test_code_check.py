"""The code check's verdict (curate.code_check through curate.verify): answers that try to forge a
pass do not verify, and right answers that an in-process harness failed do verify."""

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from curate.benchmarks import benchmarks_dir
from curate.sandbox import sandbox_available
from curate.verify import ONE_PROCESS, check_code, verify, verify_all

pytestmark = pytest.mark.skipif(not sandbox_available(), reason="bubblewrap cannot start here: run `make sandbox`")

TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
WRONG = "def add(a, b):\n    return a * b\n"
RIGHT = "def add(a, b):\n    return a + b\n"

# Says "passed" every way a harness might listen: a verdict line on every fd past stderr, and every
# string on the stack, in its frames' globals and in their co_consts as a line of its own on stdout.
FORGE = '''
import os, sys
def forge(frame=None):
    frame = frame or sys._getframe()
    found = []
    while frame is not None:
        for value in [*frame.f_locals.values(), *frame.f_globals.values(), *frame.f_code.co_consts]:
            if isinstance(value, str):
                found.append(value)
        frame = frame.f_back
    verdict = b"1 0 all tests passed"
    for fd in range(3, 64):
        try:
            os.write(fd, verdict)
        except OSError:
            pass
    os.write(1, "".join("\\n" + text + "\\n" for text in found).encode())
'''


def check(answer: str, tests: str = TESTS, **kwargs):
    return check_code(f"```python\n{answer}\n```", tests, **kwargs)


# ---------------------------------------------------------------- forgeries


@pytest.mark.parametrize(
    "forgery",
    [
        # the first attack: the caller's f_locals, printed as the last line, then exit 0
        "import os, sys\nos.write(1, ('\\n' + str(sys._getframe(1).f_locals.get('token')) + '\\n').encode())\nos._exit(0)",
        FORGE + "forge()\nos._exit(0)",  # frames, globals and co_consts, on stdout and every fd
        FORGE + "sys.excepthook = lambda *error: (forge(), os._exit(0))",
        FORGE + "import threading, time\n"
                "def watch():\n"
                "    for _ in range(200):\n"
                "        for frame in list(sys._current_frames().values()):\n"
                "            forge(frame)\n"
                "        time.sleep(0.005)\n"
                "threading.Thread(target=watch, daemon=True).start()",
        # a trace function that moves every harness frame to its last line, past any exec of tests
        "import sys\n"
        "def skip(frame, event, arg):\n"
        "    if frame.f_code.co_filename != '<answer>' and event == 'line':\n"
        "        try:\n"
        "            frame.f_lineno = max(line for _, _, line in frame.f_code.co_lines() if line)\n"
        "        except ValueError:\n"
        "            pass\n"
        "    return skip\n"
        "frame = sys._getframe()\n"
        "while frame:\n"
        "    frame.f_trace = skip\n"
        "    frame = frame.f_back\n"
        "sys.settrace(skip)",
        FORGE + "import atexit\natexit.register(forge)",
    ],
    ids=["caller-f_locals", "stack-and-co_consts", "excepthook", "daemon-thread-current_frames", "trace-f_lineno",
         "atexit"],
)
def test_a_wrong_answer_cannot_forge_a_pass(forgery):
    verdict = check(WRONG + forgery, timeout_s=3)  # one that stalls its own process times out: not a pass either
    assert verdict.verified is False and not verdict.one_process, verdict


def test_a_forged_humaneval_row_does_not_verify_through_auto():
    reference = "def check(candidate):\n    assert candidate([1, 2, 3]) == 6\n    assert candidate([]) == 0\n"
    answer = "```python\ndef total(numbers):\n    return 0\n" + FORGE + "forge()\nos._exit(0)\n```"
    verdict = verify("auto", answer, reference, {"entry_point": "total", "task_id": "HumanEval/x"})
    assert verdict.verified is False, verdict


def test_the_answer_cannot_reach_the_tests_process():
    """Not its verdict fd, its /proc files, or ptrace: it is non-dumpable, the answer has no capabilities."""
    attempts = """
import ctypes, os
parent = os.getppid()
results = []
for name, attempt in [
    ("fd 3", lambda: os.write(3, b"1 0 all tests passed")),
    ("/proc fd", lambda: open(f"/proc/{parent}/fd/3", "w").write("1 0 all tests passed")),
    ("/proc mem", lambda: open(f"/proc/{parent}/mem", "r+b")),
    ("ptrace", lambda: (_ for _ in ()).throw(OSError()) if ctypes.CDLL(None).ptrace(16, parent, 0, 0) else None),
]:
    try:
        attempt()
        results.append(name + " REACHED")
    except OSError:
        results.append(name + " refused")
def add(a, b):
    raise RuntimeError("; ".join(results))
"""
    verdict = check(attempts)
    assert verdict.verified is False and "REACHED" not in verdict.reason and verdict.reason.count("refused") == 4, verdict


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        # an always-equal object cannot cross the pipe
        ("def add(a, b):\n    class Equal:\n        def __eq__(self, other):\n            return True\n    return Equal()",
         "not plain data"),
        # nor a generator (the tests would compare it as one, not as the list it yields)
        ("def add(a, b):\n    yield a + b", "not plain data"),
        # nor can patched builtins reach the tests' process
        ("import builtins\nbuiltins.abs = lambda x: 0\nbuiltins.AssertionError = type('Quiet', (Exception,), {})\n" + WRONG,
         "AssertionError"),
        # nor does an answer's own builtin (its abs) decide the tests
        ("def abs(x):\n    return 0\n" + WRONG, "AssertionError"),
        # a function made a class is not checked in one process (where a verdict can be forged)
        ("class add:\n    def __new__(cls, a, b):\n        return cls\n", "the tests use the answer's add"),
    ],
    ids=["always-equal", "generator", "patched-builtins", "shadowed-builtin", "class-for-a-function"],
)
def test_objects_and_patches_do_not_cross_to_the_tests(answer, why):
    verdict = check(answer, TESTS + "\nassert abs(add(2, 2) - 4) < 1e-9")
    assert verdict.verified is False and why in verdict.reason and not verdict.one_process, verdict


# ---------------------------------------------------------------- right answers


@pytest.mark.parametrize(
    "answer",
    [
        # multiprocessing needs a writable /dev/shm (Lock, Queue) and pickles the answer's functions (Pool)
        "import multiprocessing\n"
        "def square(x):\n    return x * x\n"
        "def add(a, b):\n"
        "    with multiprocessing.Pool(2) as pool:\n"
        "        assert pool.map(square, [1, 2]) == [1, 4]\n"
        "    queue, lock = multiprocessing.Queue(), multiprocessing.Lock()\n"
        "    with lock:\n"
        "        queue.put(a + b)\n"
        "    return queue.get()",
        # __main__ blocks do not run (HumanEval's semantics): a unittest.main() or an input() demo
        RIGHT + "import unittest\nif __name__ == '__main__':\n    unittest.main()",
        RIGHT + "if __name__ == '__main__':\n    a, b = map(int, input().split())\n    print(add(a, b))",
        # output after the tests' end
        RIGHT + "import atexit\natexit.register(print, 'bye')",
        RIGHT + "import threading, time\n"
                "threading.Thread(target=lambda: (time.sleep(0.2), print('late')), daemon=True).start()",
        RIGHT + "print('x' * 100)\nimport sys\nsys.stdout = open('/dev/null', 'w')",
    ],
    ids=["multiprocessing", "unittest-main", "input-demo", "atexit-print", "late-thread", "stdout-swapped"],
)
def test_right_answers_verify(answer):
    verdict = check(answer)
    assert verdict.verified is True and not verdict.one_process, verdict


def test_a_stop_iteration_from_the_answer_does_not_end_the_tests_loop():
    tests = "assert all(map(lambda case: add(*case) == sum(case), [(2, 3), (-1, 1)]))"
    verdict = check("def add(a, b):\n    raise StopIteration", tests)
    assert verdict.verified is False and "StopIteration" in verdict.reason, verdict


def test_a_stdlib_class_under_another_name_runs_in_the_answers_process():
    """Imported afresh in the tests' process, unittest.mock's _ANY() would equal anything."""
    verdict = check("from unittest.mock import _ANY as answer", "assert answer() == 42")
    assert verdict.verified is False and "not plain data" in verdict.reason, verdict


def test_the_function_under_test_may_have_a_builtins_name():
    """MBPP 126 asks for a `sum` of common divisors."""
    answer = "import builtins\ndef sum(a, b):\n    return builtins.sum(i for i in range(1, min(a, b)) if a % i == 0 and b % i == 0)"
    assert check(answer, "assert sum(10, 15) == 6\nassert sum(4, 6) == 3").verified is True
    assert check(answer.replace("== 0 and", "== 0 or"), "assert sum(10, 15) == 6").verified is False


def test_results_cross_as_plain_data_and_in_place_changes_come_back():
    answer = ("from collections import Counter, namedtuple\n"
              "Point = namedtuple('Point', 'x y')\n"
              "def counts(text):\n    return Counter(text)\n"
              "def point():\n    return Point(1, 2)\n"
              "def sort_in_place(items):\n    items.sort()\n"
              "def parse(text):\n    return int(text)\n")
    tests = ("assert counts('aab') == {'a': 2, 'b': 1}\n"
             "assert point() == (1, 2)\n"
             "items = [3, 1, 2]\nsort_in_place(items)\nassert items == [1, 2, 3]\n"
             "try:\n    parse('x')\nexcept ValueError:\n    pass\nelse:\n    raise AssertionError('no ValueError')\n"
             "assert Counter('ab') == Counter(a=1, b=1)\n")  # the answer's imports, imported afresh
    verdict = check(answer, tests)
    assert verdict.verified is True and not verdict.one_process, verdict


# MBPP problem 367, as the data has it: its setup code builds trees with the answer's class Node.
MBPP_367_SETUP = """class Node:
    def __init__(self, data):
        self.data = data
        self.left = None
        self.right = None
"""
MBPP_367_TESTS = json.dumps(["assert is_tree_balanced(root) == False", "assert is_tree_balanced(root1) == True"])
MBPP_367_EXTRA = {"test_setup_code": "root = Node(1)\nroot.left = Node(2)\nroot.left.left = Node(3)\nroot1 = Node(1)\n"
                                     "root1.left = Node(2)\nroot1.right = Node(3)\n", "test_imports": []}
MBPP_367_RIGHT = MBPP_367_SETUP + ("def height(node):\n    return 0 if node is None else 1 + max(height(node.left), height(node.right))\n"
                                   "def is_tree_balanced(node):\n    return node is None or (abs(height(node.left) - height(node.right)) <= 1\n"
                                   "        and is_tree_balanced(node.left) and is_tree_balanced(node.right))\n")


@pytest.mark.parametrize(("answer", "verified"), [(MBPP_367_RIGHT, True), (MBPP_367_SETUP + "def is_tree_balanced(node):\n    return True\n", False)],
                         ids=["right", "wrong"])
def test_setup_code_that_needs_the_answers_class_runs_in_one_process_and_says_so(answer, verified):
    verdict = verify("code", f"```python\n{answer}```", MBPP_367_TESTS, MBPP_367_EXTRA)
    assert verdict.verified is verified and verdict.one_process and ONE_PROCESS in verdict.reason, verdict


@pytest.mark.slow
@pytest.mark.skipif(not (benchmarks_dir() / "mbpp" / ".complete").exists(), reason="run `make benchmarks`")
def test_every_gold_solution_of_mbpp_and_humaneval_verifies_and_only_mbpp_367_needs_one_process():
    items, ids = [], []
    for task, splits in (("mbpp", ("train", "validation", "test")), ("humaneval", ("test",))):
        for split in splits:
            for line in (benchmarks_dir() / task / f"{split}.jsonl").open():
                row = json.loads(line)
                reference = row.pop("reference")
                answer = row.pop("messages")[-1]["content"]
                items.append((answer, reference if isinstance(reference, str) else json.dumps(reference), row))
                ids.append(row["id"])
    verdicts = verify_all("auto", items, workers=os.cpu_count())
    assert len(items) == 664
    assert [(i, v) for i, v in zip(ids, verdicts) if v.verified is not True] == []
    assert [i for i, v in zip(ids, verdicts) if v.one_process] == ["mbpp-367"]


def test_generate_counts_the_verdicts_checked_in_one_process(tmp_path):
    import polars as pl

    from curate.generate import _summarise

    pl.DataFrame({"row": [0, 1, 2], "verified": [True, True, False], "finished": [True] * 3,
                  "verify_reason": ["all tests passed", "all tests passed (in one process: the tests need the answer's Node)",
                                    "tests failed: AssertionError"]}).write_parquet(tmp_path / "part-0.parquet")
    writer = SimpleNamespace(manifest=SimpleNamespace(shards=[{"file": "part-0.parquet", "n_rejects": 0}], rows_read=3))
    summary = _summarise(tmp_path, writer, 1.0, "hf")
    assert (summary.verified, summary.wrong, summary.one_process) == (2, 1, 1)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not Path("/usr/bin/python3").exists(),
                    reason="needs root (to become nobody), setpriv and a system Python")
def test_as_an_unprivileged_user_the_check_holds_too():
    """bubblewrap run by a non-root user: a user namespace, no uid change, so the tests' process
    is kept from the answer's by PR_SET_DUMPABLE alone."""
    with tempfile.TemporaryDirectory() as copy:
        os.chmod(copy, 0o755)
        (Path(copy) / "curate").mkdir(mode=0o755)
        (Path(copy) / "curate" / "__init__.py").touch()
        for module in ("sandbox.py", "verify.py", "code_check.py"):
            shutil.copy(Path(__file__).parents[1] / "curate" / module, Path(copy) / "curate" / module)
        script = f"""
import sys
sys.path.insert(0, {copy!r})
from curate.verify import check_code
reach = "import os\\ntry:\\n    open(f'/proc/{{os.getppid()}}/fd/3', 'w').write('1 0 forged')\\nexcept OSError:\\n    pass\\n"
for answer in ({RIGHT!r}, {WRONG!r} + reach, {WRONG + FORGE!r} + "forge()\\nos._exit(0)"):
    print(check_code(answer, {TESTS!r}).verified)
"""
        result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c",
                                 script], capture_output=True, text=True, timeout=60, cwd=copy)
    assert result.stdout.split() == ["True", "False", "False"], result.stderr
