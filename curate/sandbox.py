"""Run an untrusted Python program (a model's answer plus its unit tests) in a bubblewrap sandbox.

The program sees a read-only /usr and Python's own prefix, an empty private /tmp (a size-capped
tmpfs, its working directory) and /dev/shm (the same, for `multiprocessing`), a fresh /proc and
/dev, no network (an empty network namespace with only loopback), and its own PID, IPC and UTS
namespaces. It runs without capabilities, as an unprivileged uid, and a seccomp filter refuses it
new user namespaces (the usual first step out of a sandbox, and the way past the tmpfs caps) and
SysV shared memory (memory that no per-process limit counts). Each process is held to CPU, memory
(address space), file-size and open-file limits; all its processes together, where this machine
offers a cgroup (v2, or v1's memory and pids controllers, as root), to one memory and one process
cap, else only to the process cap, and only as root (`RLIMIT_NPROC`, per uid). At a wall-clock
timeout it is SIGKILLed as a whole (its PID namespace ends with it). Its stdout and stderr go to
size-capped files on the host; only their last few KiB are read back, and what it writes to fd 3
(up to `RESULT_BYTES`) comes back as `SandboxResult.result`.

Where bubblewrap cannot start, this is said once (a `SandboxUnavailableWarning`) and `run_python`
raises `SandboxUnavailable`, unless the caller passes `unsafe=True`: then the program runs as a
plain child process with the same resource limits (as root: as its own uid, in a cgroup where
there is one, and every process of that uid is killed after it) and none of the isolation.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
import platform
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TAIL_BYTES = 4096  # how much of the end of stdout and of stderr comes back
RESULT_BYTES = 1 << 16  # how much of what the program writes to fd 3 comes back
RESULT_FD = 3
NOBODY = 65534  # the uid inside a user namespace (bubblewrap run by a non-root user)
# Run as root, each running sandbox gets its own host uid from an otherwise unused range, so that
# RLIMIT_NPROC (counted per uid, and never applied to uid 0) counts that sandbox's processes only.
SANDBOX_UID_BASE = 2_000_000_000


@dataclass(frozen=True)
class Limits:
    memory_bytes: int = 1 << 30  # each process's address space (RLIMIT_AS); all together, where a cgroup caps them
    processes: int = 32  # processes and threads at once (a cgroup's pids.max, and RLIMIT_NPROC)
    output_bytes: int = 1 << 20  # largest file it may write, stdout, stderr and each memfd included (RLIMIT_FSIZE)
    scratch_bytes: int = 64 << 20  # size of its private /tmp
    shm_bytes: int = 64 << 20  # size of its private /dev/shm
    open_files: int = 64  # file descriptors per process (RLIMIT_NOFILE)


@dataclass(frozen=True)
class SandboxResult:
    returncode: int | None  # None when killed at the timeout; 128+n when killed by signal n
    stdout_tail: str  # the last TAIL_BYTES of stdout
    stderr_tail: str
    timed_out: bool
    output_capped: bool  # stdout or stderr reached Limits.output_bytes
    sandboxed: bool  # False: ran unsandboxed, because unsafe=True and bubblewrap cannot start
    result: bytes = b""  # what the program wrote to fd 3 (its first RESULT_BYTES)
    memory_capped: bool = False  # its cgroup's memory cap killed one of its processes


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
    with _sandbox_uid() as uid:
        uid = uid if os.geteuid() == 0 else -1
        argv = _harness_argv(str(_unsafe_python() if uid >= 0 else _base_python()), uid, limits, timeout_s)
        return _run(argv, program, timeout_s, limits, sandboxed=False, uid=uid)


def cgroup_kind() -> str | None:
    """"v2" or "v1" where each check gets a cgroup capping its memory and processes, else None."""
    return _cgroup_parents()[0] if _cgroup_parents() else None


# ---------------------------------------------------------------- the program's first lines

# Runs before any of the program: drops to the given uid (as root), sets the limits, moves the
# result pipe to fd 3, reads the program from stdin, and runs it as a fresh __main__ module.
_HARNESS = """\
import builtins, os, resource, sys
builtins.exit = builtins.quit = sys.exit  # what `site` (not imported: -S) would provide
def _enter():
    uid, memory, cpu, processes, output, open_files, result_fd = (int(arg) for arg in sys.argv[1:8])
    if uid >= 0:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_NPROC, processes),
                         (resource.RLIMIT_FSIZE, output), (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, open_files)):
        resource.setrlimit(limit, (value, value))
    if result_fd != 3:
        os.dup2(result_fd, 3)
        os.close(result_fd)
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


def _harness_argv(python: str, uid: int, limits: Limits, timeout_s: float, result_fd: int = RESULT_FD) -> list[str]:
    """Isolated mode, no site-packages: the program gets the standard library only. The last
    argument, the fd of the result pipe, is set by `_run` once that pipe exists."""
    cpu_s = math.ceil(timeout_s) + 1
    return [python, "-I", "-S", "-c", _HARNESS, str(uid), str(limits.memory_bytes), str(cpu_s), str(limits.processes),
            str(limits.output_bytes), str(limits.open_files), str(result_fd)]


def _base_python() -> Path:
    """The interpreter behind the virtual environment: the sandbox binds its prefix, never the venv."""
    return Path(getattr(sys, "_base_executable", None) or sys.executable).resolve()


def _unsafe_python() -> Path:
    """An interpreter that a sandbox uid may run without bubblewrap's fresh mounts: this one where
    its prefix is open to other users, else the system's (a prefix under /root is not)."""
    prefix = Path(sys.base_prefix).resolve()
    if all(path.stat().st_mode & stat.S_IXOTH for path in (prefix, *prefix.parents)):
        return _base_python()
    system = shutil.which("python3", path="/usr/bin:/bin")
    if system is None:
        raise SandboxUnavailable(f"no Python that an unprivileged uid can run: {prefix} is closed to other users "
                                 "and there is no /usr/bin/python3")
    return Path(system)


# ---------------------------------------------------------------- bubblewrap


def _bwrap_path() -> str:
    """$CURATE_BWRAP (to point at another build, or at nothing to test the fallback), else bwrap on PATH."""
    return os.environ.get("CURATE_BWRAP") or shutil.which("bwrap") or "bwrap"


def _sandbox_argv(bwrap: str, uid: int, limits: Limits, timeout_s: float) -> list[str]:
    as_root = os.geteuid() == 0
    argv = [bwrap, "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    if as_root:
        # Root needs no user namespace; one would map the program to host uid 0, which RLIMIT_NPROC
        # exempts (and bubblewrap's --disable-userns needs one: the seccomp filter does that job).
        # The harness drops to `uid` itself, hence the two capabilities it keeps until then.
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
             "--perms", "1777", "--size", str(limits.shm_bytes), "--tmpfs", "/dev/shm",
             "--perms", "1777", "--size", str(limits.scratch_bytes), "--tmpfs", "/tmp", "--chdir", "/tmp", "--"]
    return argv + _harness_argv(str(_base_python()), uid if as_root else -1, limits, timeout_s)


# ---------------------------------------------------------------- seccomp

# Per architecture: its audit id, and the numbers of clone, clone3, unshare and shmget.
_SYSCALLS = {"x86_64": (0xC000003E, 56, 435, 272, 29), "aarch64": (0xC00000B7, 220, 435, 97, 194)}
CLONE_NEWUSER = 0x10000000


def seccomp_filter() -> bytes:
    """A classic-BPF seccomp program (what bubblewrap's --seccomp reads): clone and unshare with
    CLONE_NEWUSER fail with EPERM, clone3 with ENOSYS (its flags are out of a filter's sight; libc
    then falls back to clone), shmget with EPERM; a syscall of another ABI (i386's int 0x80, x32)
    kills the process. Everything else is allowed."""
    audit_arch, clone, clone3, unshare, shmget = _SYSCALLS[platform.machine()]
    load, jump_eq, jump_ge, jump_set, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, kill = 0x7FFF0000, 0x80000000
    eperm, enosys = 0x00050000 | 1, 0x00050000 | 38
    # (code, jump-if-true, jump-if-false, k): jumps count the instructions skipped.
    program = [
        (load, 0, 0, 4),  # seccomp_data.arch
        (jump_eq, 1, 0, audit_arch),
        (ret, 0, 0, kill),
        (load, 0, 0, 0),  # seccomp_data.nr
        (jump_ge, 8, 0, 0x40000000),  # x32
        (jump_eq, 7, 0, clone3),
        (jump_eq, 5, 0, shmget),
        (jump_eq, 1, 0, unshare),
        (jump_eq, 0, 2, clone),
        (load, 0, 0, 16),  # the low word of args[0]: the flags of clone and unshare
        (jump_set, 1, 0, CLONE_NEWUSER),
        (ret, 0, 0, allow),
        (ret, 0, 0, eperm),
        (ret, 0, 0, enosys),
    ]
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in program)


# ---------------------------------------------------------------- cgroups


@functools.cache
def _cgroup_parents() -> tuple[str, tuple[Path, ...]] | None:
    """Where this process may make a cgroup per check: ("v2", (its cgroup, or else the parent of
    its cgroup,)) where that hands memory and pids down to children (v2 lets a cgroup that holds
    processes, as ours does, hand none down: its parent may), else ("v1", (its memory cgroup, its
    pids cgroup)), else None. Tried once, by making one."""
    own = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            own[controller] = path.lstrip("/")
    candidates = []
    for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        ours = root / own.get("", "-")
        for parent in (ours, ours.parent) if ours != root else (ours,):
            with contextlib.suppress(OSError):
                if {"memory", "pids"} <= set((parent / "cgroup.subtree_control").read_text().split()):
                    candidates.append(("v2", (parent,)))
    if "memory" in own and "pids" in own:
        candidates.append(("v1", (Path("/sys/fs/cgroup/memory", own["memory"]), Path("/sys/fs/cgroup/pids", own["pids"]))))
    for kind, parents in candidates:
        try:
            with _cgroup(kind, parents, Limits()):
                return kind, parents
        except OSError:
            continue
    return None


@contextlib.contextmanager
def _cgroup(kind: str, parents: tuple[Path, ...], limits: Limits) -> Iterator[list[Path]]:
    """A fresh cgroup under each of `parents`, capped to `limits`; yields their directories, and
    removes them after, first killing whatever is left in them."""
    name = f"curate-{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}"
    made = []
    try:
        for parent in parents:
            (parent / name).mkdir()
            made.append(parent / name)
        limit_files = ({"memory.max": limits.memory_bytes, "memory.swap.max": 0, "pids.max": limits.processes}
                       if kind == "v2" else {"memory.limit_in_bytes": limits.memory_bytes, "pids.max": limits.processes,
                                             "memory.memsw.limit_in_bytes": limits.memory_bytes})
        for file, value in limit_files.items():
            directory = next((d for d in made if (d / file).exists()), None)
            if directory is None and "swap" not in file and "memsw" not in file:  # those exist only where swap is counted
                raise OSError(f"no {file} in {made}")
            if directory is not None:
                (directory / file).write_text(str(value))
        yield made
    finally:
        for _ in range(200):
            for directory in made:
                with contextlib.suppress(OSError):
                    for pid in (directory / "cgroup.procs").read_text().split():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid), signal.SIGKILL)
            made = [d for d in made if not _rmdir(d)]
            if not made:
                break
            time.sleep(0.005)


def _rmdir(directory: Path) -> bool:
    try:
        directory.rmdir()
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


def _oom_killed(directories: list[Path]) -> bool:
    """Whether the kernel killed a process of these cgroups for memory (memory.events in v2,
    memory.oom_control in v1: both count `oom_kill`)."""
    for directory in directories:
        for file in ("memory.events", "memory.oom_control"):
            with contextlib.suppress(OSError):
                found = re.search(r"^oom_kill (\d+)$", (directory / file).read_text(), flags=re.MULTILINE)
                if found and int(found.group(1)) > 0:
                    return True
    return False


@contextlib.contextmanager
def _check_cgroup(limits: Limits) -> Iterator[list[Path]]:
    """This check's cgroups (none where the machine offers none)."""
    parents = _cgroup_parents()
    if parents is None:
        yield []
        return
    with _cgroup(*parents, limits) as directories:
        yield directories


def _into_cgroups(argv: list[str], directories: list[Path]) -> list[str]:
    """`argv`, started by a shell that first moves itself into the cgroups: every process it
    starts is then counted from its first instruction."""
    if not directories:
        return argv
    procs = [str(d / "cgroup.procs") for d in directories]
    return ["/bin/sh", "-c", 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"',
            "sh", *procs, "--", *argv]


# ---------------------------------------------------------------- probing and uids

_probe_lock = threading.Lock()


@functools.cache
def _probe(bwrap: str) -> str | None:
    """Why bubblewrap cannot run a program here, or None when it can."""
    try:
        with _sandbox_uid() as uid:
            result = _run(_sandbox_argv(bwrap, uid, Limits(), 30), "print('ok')", 30, Limits(), sandboxed=True)
    except (OSError, KeyError) as error:  # KeyError: no seccomp filter for this architecture
        reason = f"bubblewrap ({bwrap}) cannot start: {error!r}"
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
_uid_turns = itertools.count()


def sandbox_uids() -> range:
    """The host uids this process's sandboxes run as, when run as root: a block of 1024 chosen by
    process id, so that two processes checking answers at once rarely share one."""
    start = SANDBOX_UID_BASE + (os.getpid() % 65536) * 1024
    return range(start, start + 1024)


@contextlib.contextmanager
def _sandbox_uid() -> Iterator[int]:
    """The next uid of `sandbox_uids()`, in turn, that no running sandbox of this process holds: in
    turn, because an unsandboxed check's killed processes may linger as zombies for a while (until
    init reaps them), and RLIMIT_NPROC counts them against their uid."""
    uids = sandbox_uids()
    with _uids_lock:
        for _ in uids:
            uid = uids[next(_uid_turns) % len(uids)]
            if uid not in _uids_in_use:
                break
        else:
            raise RuntimeError(f"over {len(uids)} sandboxes at once")
        _uids_in_use.add(uid)
    try:
        yield uid
    finally:
        with _uids_lock:
            _uids_in_use.discard(uid)


# ---------------------------------------------------------------- running


def _run(argv: list[str], program: str, timeout_s: float, limits: Limits, sandboxed: bool,
         uid: int = -1) -> SandboxResult:
    """Start `argv`, feed it `program` on stdin, and wait; outputs go to files, never into memory.
    Unsandboxed, `uid` is the uid the harness drops to (-1: none)."""
    seccomp = seccomp_filter() if sandboxed else b""
    with tempfile.TemporaryDirectory(prefix="curate-sandbox-") as workdir, _check_cgroup(limits) as cgroups:
        stdout_path, stderr_path = Path(workdir, "stdout"), Path(workdir, "stderr")
        scratch = Path(workdir, "scratch")
        scratch.mkdir()
        if uid >= 0:
            os.chown(scratch, uid, uid)
        result_read, result_write = os.pipe()
        info_read, info_write = os.pipe()  # bubblewrap writes the host pid of the sandbox's PID 1 here
        seccomp_read, seccomp_write = os.pipe()
        passed = [result_write]
        argv = [*argv[:-1], str(result_write)]  # the harness's last argument: where fd 3 comes from
        if sandboxed:
            os.write(seccomp_write, seccomp)
            argv = [argv[0], "--info-fd", str(info_write), "--seccomp", str(seccomp_read), *argv[1:]]
            passed += [info_write, seccomp_read]
        os.close(seccomp_write)
        try:
            with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
                process = subprocess.Popen(
                    _into_cgroups(argv, cgroups), stdin=subprocess.PIPE, stdout=stdout, stderr=stderr, cwd=scratch,
                    start_new_session=True, pass_fds=passed,
                    env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp" if sandboxed else str(scratch)})
        finally:
            for fd in (result_write, info_write, seccomp_read):
                os.close(fd)
        timed_out = False
        try:
            process.communicate(program.encode(), timeout=timeout_s)  # stdin only: outputs are files
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill(process, info_read if sandboxed else None, uid)
            os.close(info_read)
            result = _read_nonblocking(result_read, RESULT_BYTES)
            os.close(result_read)
        return SandboxResult(
            returncode=None if timed_out else _exit_status(process.returncode),
            stdout_tail=_tail(stdout_path), stderr_tail=_tail(stderr_path), timed_out=timed_out,
            output_capped=max(stdout_path.stat().st_size, stderr_path.stat().st_size) >= limits.output_bytes,
            sandboxed=sandboxed, result=result, memory_capped=_oom_killed(cgroups))


def _kill(process: subprocess.Popen, sandbox_info: int | None, uid: int) -> None:
    """End whatever still runs, and return once it has ended. A sandbox: SIGKILL its PID 1, which ends
    every process in its PID namespace before bubblewrap (its parent) can reap it and exit; bubblewrap
    itself only if that pid is unknown (its death then takes PID 1 along, --die-with-parent, but
    asynchronously). Unsandboxed: the process group, and as root every process of its uid (a
    setsid() leaves the group, not the uid)."""
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
    if sandbox_info is None and uid >= 0:
        _kill_uid(uid)


def _kill_uid(uid: int) -> None:
    """SIGKILL every live process whose real uid is `uid`, until none is left (a fork may race a
    pass). Zombies are dead already: whoever inherited them reaps them."""
    for _ in range(100):
        found = False
        for proc in Path("/proc").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                status = (proc / "status").read_text()
                if int(status.split("\nUid:")[1].split()[0]) == uid and "\nState:\tZ" not in status:
                    found = True
                    os.kill(int(proc.name), signal.SIGKILL)
        if not found:
            return
        time.sleep(0.005)


def _read_nonblocking(fd: int, limit: int) -> bytes:
    """Up to `limit` bytes already in a pipe whose writers have all ended."""
    os.set_blocking(fd, False)
    chunks, size = [], 0
    with contextlib.suppress(BlockingIOError):
        while size < limit and (chunk := os.read(fd, limit - size)):
            chunks.append(chunk)
            size += len(chunk)
    return b"".join(chunks)


def _exit_status(returncode: int) -> int:
    """bubblewrap's convention (128 + signal) for a plain child killed by a signal too."""
    return 128 - returncode if returncode < 0 else returncode


def _tail(path: Path) -> str:
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - TAIL_BYTES))
        return handle.read().decode(errors="replace")
