"""The program a code check runs in the sandbox: the answer's code in one process, its tests in
another that never runs any of it. Standard library only; `curate.verify` appends the call
`run_check({...})` and hands the whole to `curate.sandbox.run_python`.

Why two processes: whatever a harness does in the answer's own process, the answer can pre-empt
(read a token off the stack or out of co_consts, print it from an excepthook or a thread, jump past
the tests with a trace function). Here the tests' process forks the answer's before anything else
and writes the verdict to fd 3 (one line: passed 0/1, one process 0/1, the reason), which the answer's process closes before it runs a line
of the answer. The tests' process is non-dumpable, so the answer's (same uid, no capabilities) can
neither ptrace it nor open its /proc/<pid>/fd or mem.

The tests see the answer's names as stand-ins. A function is called across a pipe, its arguments
and result crossing as plain data (marshal, which refuses any other object, and checked again on
arrival), so an always-equal object or patched builtins never reach the tests; a Counter comes
back a dict, a namedtuple a tuple, and a list the function changed in place comes back changed.
Stdlib modules and functions the answer imported are imported afresh; its plain values copied.
The answer's names never replace the row's test imports, nor a builtin (its own `abs` must not
decide `assert abs(f(x) - y) < 1e-9`), except the function under test (MBPP 126 tests a `sum`).

Two kinds of row cannot run that way: setup code that uses the answer's classes or objects (MBPP
builds problem 367's trees with the answer's `class Node`), and tests that pass an argument that is
not plain data (a lambda). They run answer, setup and tests in one process, as HumanEval's and
MBPP's own harnesses do, and the verdict says `"one_process": true`: that verdict the answer could
forge. The tests themselves may not use the answer's classes (they fail), or an answer could choose
the one-process check by making its function a class. Of the 664 gold solutions of MBPP and
HumanEval, one (MBPP 367) runs in one process; all pass.

Either way the answer runs as a module named `__answer__`, so its `if __name__ == "__main__":`
block does not run (HumanEval's semantics), and nothing it does after the tests end (an atexit
print, a late thread) counts.
"""

from __future__ import annotations

import builtins
import ctypes
import marshal
import os
import struct
import sys

VERDICT_FD = 3  # curate.sandbox's result fd
ANSWER_MODULE = "__answer__"
MESSAGE_BYTES = 1 << 28  # the largest call or reply on the pipe
SIGKILL = 9  # signal.SIGKILL, without importing signal (and enum)
_SCALARS = (type(None), bool, int, float, complex, str, bytes)
_needs_one_process = []  # what, in the tests' process, needed the answer's own objects
_running_tests = False  # in the tests' process: past the row's setup code, into its tests


class _NotPlain(Exception):
    """A value that is not builtin data (an instance of the answer's class, a generator)."""


class _NeedsOneProcess(BaseException):
    """The tests used one of the answer's own objects. A BaseException, so that a test's
    `except Exception` does not hide it (and it is recorded in _needs_one_process anyway)."""


class _AnswerEnded(BaseException):
    """The answer's process is gone (it exited, or was killed) while the tests needed it."""


class AnswerError(Exception):
    """An exception of the answer's own type, raised in the answer's process by a call."""


def run_check(payload: dict) -> None:
    """payload: the `imports`, `answer`, `setup` and `tests` sources."""
    _make_undumpable()
    verdict = _in_two_processes(payload)
    if verdict is None:
        verdict = _in_one_process(payload)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    passed, one_process, reason = verdict
    os.write(VERDICT_FD, f"{passed:d} {one_process:d} {reason}".encode(errors="replace"))
    os._exit(0)


def _make_undumpable() -> None:
    """PR_SET_DUMPABLE 0: /proc/<pid>/{fd,mem} and ptrace are closed to processes without CAP_SYS_PTRACE."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(4, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0)")


def _verdict(passed: bool, reason: str, one_process: bool = False) -> tuple:
    return passed, one_process, reason.replace("\n", " ")


def _last_line(error: BaseException) -> str:
    """What a traceback's last line says (without importing traceback: each import is paid per check)."""
    message = str(error)
    return (f"{type(error).__name__}: {message}" if message else type(error).__name__)[:300]


# ---------------------------------------------------------------- the answer's process


def _fork_answer(run) -> int:
    """Fork a process that closes the verdict fd, then runs `run()` and exits; in its own process
    group, so that stopping it stops its children too."""
    pid = os.fork()
    if pid == 0:
        try:
            os.close(VERDICT_FD)
            os.setpgid(0, 0)
            run()
        finally:
            os._exit(0)
    try:  # the child does it too: whichever runs first
        os.setpgid(pid, pid)
    except OSError:
        pass
    return pid


def _stop(pid: int) -> int:
    """SIGKILL the answer's process group; its exit status."""
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, SIGKILL)
        except OSError:
            pass
    _, status = os.waitpid(pid, 0)
    return status


def _answer_namespace() -> dict:
    """A fresh module named __answer__ (not __main__: a __main__ block does not run), under both
    names in sys.modules so that pickle (multiprocessing.Pool) finds the answer's functions."""
    module = type(sys)(ANSWER_MODULE)
    sys.modules[ANSWER_MODULE] = sys.modules["__main__"] = module
    return module.__dict__


def _run_sources(namespace: dict, *parts: tuple) -> None:
    """Each part compiled on its own, so that an answer's unclosed string cannot swallow the tests."""
    for filename, source in parts:
        exec(compile(source, filename, "exec"), namespace)


def _plain(value):
    """`value` as builtin data, or _NotPlain: subclasses of builtin types become their base (a
    Counter a dict, a namedtuple a tuple, a bytearray bytes)."""
    if type(value) in _SCALARS:
        return value
    for scalar in (int, float, complex, str, bytes):
        if isinstance(value, scalar):
            return scalar(value)
    if isinstance(value, bytearray):
        return bytes(value)
    if isinstance(value, dict):
        return {_plain(key): _plain(item) for key, item in value.items()}
    for container in (tuple, list, set, frozenset):
        if isinstance(value, container):
            return container(_plain(item) for item in value)
    raise _NotPlain(type(value).__name__)


def _describe(namespace: dict) -> list:
    """(name, kind, detail) for each name the answer bound, for the tests' stand-ins."""
    names = []
    for name, value in list(namespace.items()):
        if name.startswith("__") and name.endswith("__"):
            continue
        module, qualname = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
        if isinstance(value, type(sys)):
            names.append((name, "module", value.__name__))
        elif callable(value) and isinstance(module, str) and module != ANSWER_MODULE and isinstance(qualname, str):
            names.append((name, "import", (module, qualname)))
        elif isinstance(value, type):
            names.append((name, "class", None))
        elif callable(value):
            names.append((name, "function", None))
        else:
            try:
                names.append((name, "value", _plain(value)))
            except (_NotPlain, RecursionError):
                names.append((name, "object", None))
    return names


def _serve(payload: dict, calls: int, replies: int) -> None:
    """The answer's process: run imports and answer, say which names they bound, then answer calls
    until the tests' process closes the pipe."""
    namespace = _answer_namespace()
    try:
        _run_sources(namespace, ("<test_imports>", payload["imports"]), ("<answer>", payload["answer"]))
        _send(replies, ("names", _describe(namespace)))
    except BaseException as error:  # SystemExit too: an answer that exits does not pass
        _send(replies, ("raised", _last_line(error)))
        return
    while True:
        try:
            name, args, kwargs = _receive(calls)
        except EOFError:
            return
        try:
            result = namespace[name](*args, **kwargs)
            try:
                reply = ("returned", _plain(result), _plain(args))
            except (_NotPlain, RecursionError) as error:
                reply = ("not plain", f"{name}() returned a {type(result).__name__}: {error}")
        except BaseException as error:
            reply = ("raised", type(error).__name__, str(error)[:1000])
        _send(replies, reply)


# ---------------------------------------------------------------- the pipe


def _send(fd: int, message) -> None:
    data = marshal.dumps(message)
    data = memoryview(struct.pack("<Q", len(data)) + data)
    while data:
        data = data[os.write(fd, data):]


def _read_exactly(fd: int, size: int) -> bytes:
    chunks = []
    while size:
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _receive(fd: int):
    (size,) = struct.unpack("<Q", _read_exactly(fd, 8))
    if size > MESSAGE_BYTES:
        raise ValueError(f"a message of {size} bytes on the pipe: not one of ours")
    return marshal.loads(_read_exactly(fd, size))


def _checked(value):
    """`value` if it is builtin data all the way down (marshal also makes code objects), else _NotPlain."""
    kind = type(value)
    if kind in _SCALARS:
        return value
    if kind is dict:
        for key, item in value.items():
            _checked(key), _checked(item)
        return value
    if kind in (tuple, list, set, frozenset):
        for item in value:
            _checked(item)
        return value
    raise _NotPlain(kind.__name__)


# ---------------------------------------------------------------- the tests' process


class _Answer:
    """The tests' end of the pipe to the answer's process."""

    def __init__(self, payload: dict):
        calls_read, self.calls = os.pipe()
        self.replies, replies_write = os.pipe()

        def serve():
            os.close(self.calls)
            os.close(self.replies)
            _serve(payload, calls_read, replies_write)

        self.pid = _fork_answer(serve)
        os.close(calls_read)
        os.close(replies_write)
        self.ended = False  # the pipe from the answer's process closed
        self.exit_status = None

    def receive(self):
        try:
            return _receive(self.replies)
        except (EOFError, OSError):
            self.ended = True
            raise _AnswerEnded from None

    def stop(self) -> int:
        """End the answer's process (once); its exit status."""
        if self.exit_status is None:
            os.close(self.calls)
            os.close(self.replies)
            self.exit_status = _stop(self.pid)
        return self.exit_status

    def call(self, name: str, args: tuple, kwargs: dict):
        try:
            _checked((args, kwargs))
        except (_NotPlain, RecursionError) as error:
            _needs_one_process.append(f"an argument of {name}() is a {error}")
            raise _NeedsOneProcess(name) from None
        if self.ended:
            raise _AnswerEnded
        try:
            _send(self.calls, (name, args, kwargs))
        except OSError:
            self.ended = True
            raise _AnswerEnded from None
        kind, *detail = self.receive()
        if kind == "raised":
            raise _exception(*detail)
        if kind != "returned":
            raise AnswerError(f"TypeError: {detail[0]}, which is not plain data")
        try:
            result, args_after = _checked(detail[0]), _checked(detail[1])
        except (_NotPlain, RecursionError) as error:
            raise AnswerError(f"TypeError: {name}() returned a {error}, which is not plain data") from None
        for before, after in zip(args, args_after):  # what the function changed in place
            if type(before) is type(after) is list:
                before[:] = after
            elif type(before) is type(after) and type(before) in (dict, set):
                before.clear()
                before.update(after)
        return result


def _exception(name: str, message: str) -> Exception:
    """A builtin exception type crosses as itself (a test may expect a ValueError); any other as
    AnswerError. StopIteration too: raised inside map() or next() it would end the tests' loop."""
    kind = getattr(builtins, name, None)
    if isinstance(kind, type) and issubclass(kind, Exception) and not issubclass(kind, (StopIteration, StopAsyncIteration)):
        try:
            return kind(message)
        except Exception:
            pass
    return AnswerError(f"{name}: {message}")


class _AnswerFunction:
    """Stands in for one of the answer's functions: a call runs it in the answer's process."""

    def __init__(self, answer: _Answer, name: str):
        self._answer, self.__name__ = answer, name

    def __call__(self, *args, **kwargs):
        return self._answer.call(self.__name__, args, kwargs)

    def __repr__(self):
        return f"<the answer's {self.__name__}>"


class _AnswerOnly(type):
    """Stands in for one of the answer's classes or objects. The row's setup code may use it (then
    the check runs in one process); the tests may not: else an answer could choose to be checked
    in one process, where it can forge its verdict, by making its function a class."""

    def _needs(cls, *args, **kwargs):
        name = type.__getattribute__(cls, "__name__")
        if _running_tests:
            raise AnswerError(f"TypeError: the tests use the answer's {name}, which is not plain data")
        _needs_one_process.append(f"the answer's {name}")
        raise _NeedsOneProcess(name)

    __call__ = __instancecheck__ = __subclasscheck__ = __getattr__ = __eq__ = __ne__ = _needs
    __iter__ = __len__ = __getitem__ = __contains__ = __bool__ = _needs
    __hash__ = type.__hash__


def _stdlib(name: str):
    """Import a standard-library module afresh (never one from the answer's scratch directory)."""
    if name.partition(".")[0] not in sys.stdlib_module_names:
        raise ImportError(name)
    __import__(name)
    return sys.modules[name]


def _stand_in(answer: _Answer, name: str, kind: str, detail):
    """What the tests see for one of the answer's names. A stdlib module or function is imported
    here only under its own name (`import math`, `from math import sqrt`): the answer names it,
    and an alias could pick any stdlib object, one whose `==` is always true among them."""
    try:
        if kind == "module" and detail == name:
            return _stdlib(detail)
        if kind == "import" and detail[1].rpartition(".")[2] == name:
            value = _stdlib(detail[0])
            for part in detail[1].split("."):
                value = getattr(value, part)
            return value
        if kind == "value":
            return _checked(detail)
    except (ImportError, AttributeError, TypeError, _NotPlain, RecursionError):
        pass
    if kind in ("function", "import"):
        return _AnswerFunction(answer, name)
    return _AnswerOnly(name, (), {})


def _in_two_processes(payload: dict) -> tuple | None:
    """The verdict, or None where the tests need the answer's own objects."""
    global _running_tests
    answer = _Answer(payload)
    try:
        kind, detail = answer.receive()
        if kind == "raised":
            return _verdict(False, f"tests failed: the answer raised {detail}")
        setup, tests = compile(payload["setup"], "<test_setup_code>", "exec"), compile(payload["tests"], "<tests>", "exec")
        namespace = {"__name__": "__tests__"}
        _run_sources(namespace, ("<test_imports>", payload["imports"]))
        used = _names_in(setup) | _names_in(tests)
        for name, kind, value in detail:
            if name in used and name not in namespace and not name.startswith("__") and \
                    (name == payload["tested"] or not hasattr(builtins, name)):
                namespace[name] = _stand_in(answer, name, kind, value)
        exec(setup, namespace)
        _running_tests = True
        exec(tests, namespace)
    except _AnswerEnded:
        return _ended(answer.stop())
    except BaseException as error:
        if _needs_one_process:
            return None
        if answer.ended:
            return _ended(answer.stop())
        return _verdict(False, f"tests failed: {_last_line(error)}")
    finally:
        answer.stop()
    if _needs_one_process:
        return None
    if answer.ended:  # a test swallowed _AnswerEnded
        return _ended(answer.stop())
    return _verdict(True, "all tests passed")


def _names_in(code) -> set:
    """Every name the code (and the functions it defines) may look up: only these get stand-ins,
    so that an answer's unused imports (typing, in most HumanEval answers) cost the tests nothing."""
    names = set(code.co_names)
    for constant in code.co_consts:
        if isinstance(constant, type(code)):
            names |= _names_in(constant)
    return names


def _ended(status: int, one_process: bool = False) -> tuple:
    how = f"was killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else \
        f"exited with status {os.waitstatus_to_exitcode(status)}"
    return _verdict(False, f"the answer's process {how} before its tests finished", one_process)


def _in_one_process(payload: dict) -> tuple:
    """Answer, setup and tests in one forked process, which reports how they ended on a pipe."""
    done_read, done_write = os.pipe()

    def run():
        os.close(done_read)
        try:
            _run_sources(_answer_namespace(), ("<test_imports>", payload["imports"]), ("<answer>", payload["answer"]),
                         ("<test_setup_code>", payload["setup"]), ("<tests>", payload["tests"]))
            message = "passed"
        except BaseException as error:
            message = f"failed {_last_line(error)}"
        os.write(done_write, message.encode()[:4000])  # one write, under PIPE_BUF: read whole

    pid = _fork_answer(run)
    os.close(done_write)
    message = os.read(done_read, 4096).decode(errors="replace")
    status = _stop(pid)
    why = f" (in one process: the tests need {_needs_one_process[0]})"
    if message == "passed":
        return _verdict(True, "all tests passed" + why, one_process=True)
    if message.startswith("failed "):
        return _verdict(False, f"tests failed: {message[len('failed '):]}" + why, one_process=True)
    return _ended(status, one_process=True)
