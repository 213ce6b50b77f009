"""Run an untrusted Python program (a model's answer plus its unit tests) in a bubblewrap sandbox.

The program sees a read-only /usr and Python's own prefix, an empty private /tmp (a size-capped
tmpfs, its working directory), a fresh /proc and /dev, no network (an empty network namespace
with only loopback), and its own PID, IPC and UTS namespaces. It runs without capabilities, as an
unprivileged uid, under CPU, memory, process and file-size limits, and is SIGKILLed as a whole
(its PID namespace ends with it) at a wall-clock timeout. Its stdout and stderr go to size-capped
files on the host; only their last few KiB are read back.

Where bubblewrap cannot start, this is said once (a `SandboxUnavailableWarning`) and `run_python`
raises `SandboxUnavailable`, unless the caller passes `unsafe=True`: then the program runs as a
plain child process with the same resource limits and none of the isolation.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TAIL_BYTES = 4096  # how much of the end of stdout and of stderr comes back
NOBODY = 65534  # the uid inside a user namespace (bubblewrap run by a non-root user)
# Run as root, each running sandbox gets its own host uid from an otherwise unused range, so that
# RLIMIT_NPROC (counted per uid, and never applied to uid 0) counts that sandbox's processes only.
SANDBOX_UID_BASE = 2_000_000_000


@dataclass(frozen=True)
class Limits:
    memory_bytes: int = 1 << 30  # address space of each process (RLIMIT_AS)
    processes: int = 32  # processes and threads at once (RLIMIT_NPROC)
    output_bytes: int = 1 << 20  # largest file it may write, stdout and stderr included (RLIMIT_FSIZE)
    scratch_bytes: int = 64 << 20  # size of its private /tmp


@dataclass(frozen=True)
class SandboxResult:
    returncode: int | None  # None when killed at the timeout; 128+n when killed by signal n
    stdout_tail: str  # the last TAIL_BYTES of stdout
    stderr_tail: str
    timed_out: bool
    output_capped: bool  # stdout or stderr reached Limits.output_bytes
    sandboxed: bool  # False: ran unsandboxed, because unsafe=True and bubblewrap cannot start


class SandboxUnavailable(RuntimeError):
    """bubblewrap cannot start here, and the caller did not allow unsandboxed runs."""


class SandboxUnavailableWarning(RuntimeWarning):
    pass


def sandbox_available() -> bool:
    """Whether bubblewrap starts here (tried once per bwrap path, then remembered)."""
    return _unavailable_reason(_bwrap_path()) is None


def run_python(program: str, timeout_s: float, unsafe: bool = False, *, limits: Limits = Limits()) -> SandboxResult:
    """Run `program` (Python source, standard library only) and wait at most `timeout_s` seconds."""
    bwrap = _bwrap_path()
    reason = _unavailable_reason(bwrap)
    if reason is None:
        with _sandbox_uid() as uid:
            return _run(_sandbox_argv(bwrap, uid, limits, timeout_s), program, timeout_s, limits, sandboxed=True)
    if not unsafe:
        raise SandboxUnavailable(f"{reason}. Install bubblewrap (`make sandbox`, or `apt-get install bubblewrap`), "
                                 "or pass unsafe=True to run answers' code without a sandbox")
    return _run(_harness_argv(str(_base_python()), -1, limits, timeout_s), program, timeout_s, limits, sandboxed=False)


# ---------------------------------------------------------------- the program's first lines

# Runs inside the sandbox before any of the program: drops to the given uid (as root), sets the
# limits, reads the program from stdin, and runs it as a fresh __main__ module.
_HARNESS = """\
import builtins, os, resource, sys
builtins.exit = builtins.quit = sys.exit  # what `site` (not imported: -S) would provide
def _enter():
    uid, memory, cpu, processes, output = (int(arg) for arg in sys.argv[1:6])
    if uid >= 0:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_NPROC, processes),
                         (resource.RLIMIT_FSIZE, output), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))
    source = sys.stdin.buffer.read()
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    main = type(sys)("__main__")
    sys.modules["__main__"] = main
    sys.argv = [""]
    return compile(source, "<program>", "exec"), main.__dict__
_code, _namespace = _enter()
del _enter
exec(_code, _namespace)
"""


def _harness_argv(python: str, uid: int, limits: Limits, timeout_s: float) -> list[str]:
    """Isolated mode, no site-packages: the program gets the standard library only."""
    cpu_s = math.ceil(timeout_s) + 1
    return [python, "-I", "-S", "-c", _HARNESS,
            str(uid), str(limits.memory_bytes), str(cpu_s), str(limits.processes), str(limits.output_bytes)]


# ---------------------------------------------------------------- bubblewrap


def _bwrap_path() -> str:
    """$CURATE_BWRAP (to point at another build, or at nothing to test the fallback), else bwrap on PATH."""
    return os.environ.get("CURATE_BWRAP") or shutil.which("bwrap") or "bwrap"


def _base_python() -> Path:
    """The interpreter behind the virtual environment: the sandbox binds its prefix, never the venv."""
    return Path(getattr(sys, "_base_executable", None) or sys.executable).resolve()


def _sandbox_argv(bwrap: str, uid: int, limits: Limits, timeout_s: float) -> list[str]:
    as_root = os.geteuid() == 0
    argv = [bwrap, "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    if as_root:
        # Root needs no user namespace; one would map the program to host uid 0, which RLIMIT_NPROC
        # exempts. The harness drops to `uid` itself, hence the two capabilities it keeps until then.
        argv += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
                 "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv += ["--unshare-all", "--unshare-user", "--disable-userns", "--uid", str(NOBODY), "--gid", str(NOBODY)]
    argv += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    for prefix in sorted({Path(sys.base_prefix).resolve(), Path(sys.base_exec_prefix).resolve()}):
        if prefix.is_relative_to("/usr"):
            continue
        for parent in reversed(prefix.parents[:-1]):  # bubblewrap would create them mode 0700
            argv += ["--perms", "0755", "--dir", str(parent)]
        argv += ["--ro-bind", str(prefix), str(prefix)]
    argv += ["--proc", "/proc", "--dev", "/dev",
             "--perms", "1777", "--size", str(limits.scratch_bytes), "--tmpfs", "/tmp", "--chdir", "/tmp", "--"]
    return argv + _harness_argv(str(_base_python()), uid if as_root else -1, limits, timeout_s)


_probe_lock = threading.Lock()


@functools.cache
def _probe(bwrap: str) -> str | None:
    """Why bubblewrap cannot run a program here, or None when it can."""
    try:
        with _sandbox_uid() as uid:
            result = _run(_sandbox_argv(bwrap, uid, Limits(), 30), "print('ok')", 30, Limits(), sandboxed=True)
    except OSError as error:
        reason = f"bubblewrap ({bwrap}) cannot start: {error}"
    else:
        if result.returncode == 0 and result.stdout_tail == "ok\n":
            return None
        last_line = (result.stderr_tail.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
        reason = f"bubblewrap ({bwrap}) cannot start a sandbox here: {last_line}"
    warnings.warn(f"{reason}; answers' code will NOT be checked (an error), or, where unsafe=True, will run "
                  "UNSANDBOXED with full access to this machine", SandboxUnavailableWarning, stacklevel=2)
    return reason


def _unavailable_reason(bwrap: str) -> str | None:
    with _probe_lock:
        return _probe(bwrap)


_uids_in_use: set[int] = set()
_uids_lock = threading.Lock()


def sandbox_uids() -> range:
    """The host uids this process's sandboxes run as, when run as root: a block of 1024 chosen by
    process id, so that two processes checking answers at once rarely share one."""
    start = SANDBOX_UID_BASE + (os.getpid() % 65536) * 1024
    return range(start, start + 1024)


@contextlib.contextmanager
def _sandbox_uid() -> Iterator[int]:
    """The lowest uid of `sandbox_uids()` that no running sandbox of this process holds."""
    with _uids_lock:
        uid = next((u for u in sandbox_uids() if u not in _uids_in_use), None)
        if uid is None:
            raise RuntimeError(f"over {len(sandbox_uids())} sandboxes at once")
        _uids_in_use.add(uid)
    try:
        yield uid
    finally:
        with _uids_lock:
            _uids_in_use.discard(uid)


# ---------------------------------------------------------------- running


def _run(argv: list[str], program: str, timeout_s: float, limits: Limits, sandboxed: bool) -> SandboxResult:
    """Start `argv`, feed it `program` on stdin, and wait; outputs go to files, never into memory."""
    with tempfile.TemporaryDirectory(prefix="curate-sandbox-") as workdir:
        stdout_path, stderr_path = Path(workdir, "stdout"), Path(workdir, "stderr")
        scratch = Path(workdir, "scratch")
        scratch.mkdir()
        info_read, info_write = os.pipe()  # bubblewrap writes the host pid of the sandbox's PID 1 here
        if sandboxed:
            argv = [argv[0], "--info-fd", str(info_write), *argv[1:]]
        try:
            with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
                process = subprocess.Popen(
                    argv, stdin=subprocess.PIPE, stdout=stdout, stderr=stderr, cwd=scratch, start_new_session=True,
                    pass_fds=(info_write,) if sandboxed else (), env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8",
                                                 "HOME": "/tmp" if sandboxed else str(scratch)})
        finally:
            os.close(info_write)
        timed_out = False
        try:
            process.communicate(program.encode(), timeout=timeout_s)  # stdin only: outputs are files
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill(process, info_read if sandboxed else None)
            os.close(info_read)
        return SandboxResult(
            returncode=None if timed_out else _exit_status(process.returncode),
            stdout_tail=_tail(stdout_path), stderr_tail=_tail(stderr_path), timed_out=timed_out,
            output_capped=max(stdout_path.stat().st_size, stderr_path.stat().st_size) >= limits.output_bytes,
            sandboxed=sandboxed)


def _kill(process: subprocess.Popen, sandbox_info: int | None) -> None:
    """End whatever still runs, and return once it has ended. A sandbox: SIGKILL its PID 1, which ends
    every process in its PID namespace before bubblewrap (its parent) can reap it and exit; bubblewrap
    itself only if that pid is unknown (its death then takes PID 1 along, --die-with-parent, but
    asynchronously). Unsandboxed: the process group, which a setsid() escapes (hence "unsafe")."""
    if process.poll() is None and sandbox_info is not None:
        os.set_blocking(sandbox_info, False)
        with contextlib.suppress(OSError, ValueError):
            pid = json.loads(os.read(sandbox_info, 1 << 16))["child-pid"]
            if process.poll() is None:  # else that pid may already be reaped, and reused
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)
    if process.poll() is None:
        process.kill()
    if sandbox_info is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _exit_status(returncode: int) -> int:
    """bubblewrap's convention (128 + signal) for a plain child killed by a signal too."""
    return 128 - returncode if returncode < 0 else returncode


def _tail(path: Path) -> str:
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - TAIL_BYTES))
        return handle.read().decode(errors="replace")
