"""The sandbox's promises, each against a real escape attempt (run as root, as here and in CI)."""

import os
import resource
import secrets
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

import curate.sandbox
from curate.sandbox import (
    TAIL_BYTES,
    Limits,
    SandboxUnavailable,
    SandboxUnavailableWarning,
    cgroup_kind,
    run_python,
    sandbox_available,
    sandbox_uids,
)

pytestmark = pytest.mark.skipif(not sandbox_available(), reason="bubblewrap cannot start here: run `make sandbox`")


@pytest.fixture
def listening_server():
    """A loopback TCP server on the host, counting the connections it accepts."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def serve():
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            accepted.append(connection)

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1], accepted
    server.close()


def _host_processes_with(marker: str | None = None, uids: range | None = None) -> list[int]:
    """Live ones: a zombie is dead, waiting for whoever inherited it to reap it."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if "\nState:\tZ" in (proc / "status").read_text():
                continue
            if marker and marker.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
            elif uids and int((proc / "status").read_text().split("\nUid:")[1].split()[0]) in uids:
                found.append(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def test_runs_as_an_unprivileged_uid_without_capabilities():
    result = run_python("import os\nprint(os.getuid(), open('/proc/self/status').read().split('CapEff:')[1].split()[0])", 5)
    uid, capabilities = result.stdout_tail.split()
    assert int(uid) != 0 and int(capabilities, 16) == 0 and result.sandboxed


def test_files_outside_the_scratch_dir_are_neither_readable_nor_writable(tmp_path):
    canary = tmp_path / "canary.txt"
    canary.write_text("secret")
    escape_name = f"curate-escape-{secrets.token_hex(4)}"
    program = f"""
for attempt in (lambda: open({str(canary)!r}).read(), lambda: open({str(canary)!r}, 'w').write('pwned'),
                lambda: open('/work/main/pyproject.toml').read(), lambda: open('/etc/passwd').read(),
                lambda: open('/usr/evil', 'w')):
    try:
        print('ESCAPED', attempt())
    except OSError as error:
        print(type(error).__name__)
open('/tmp/{escape_name}', 'w').write('x')
print(open('/tmp/{escape_name}').read())
"""
    result = run_python(program, 5)
    assert "ESCAPED" not in result.stdout_tail and result.stdout_tail.splitlines()[-1] == "x", result
    assert canary.read_text() == "secret"
    assert not (Path("/tmp") / escape_name).exists()


def test_the_network_is_unreachable_by_socket_by__socket_and_by_a_subprocess(listening_server):
    port, accepted = listening_server
    program = f"""
import _socket, socket, subprocess, sys
attempts = {{
    "socket": lambda: socket.create_connection(("127.0.0.1", {port}), timeout=2),
    "_socket": lambda: _socket.socket().connect(("127.0.0.1", {port})),
    "curl": lambda: subprocess.run(["curl", "-sS", "-m", "2", "http://127.0.0.1:{port}/"], check=True),
    "python": lambda: subprocess.run([sys.executable, "-c", "import socket; socket.create_connection(('127.0.0.1', {port}))"], check=True),
}}
for name, attempt in attempts.items():
    try:
        attempt()
        print(name, "CONNECTED")
    except (OSError, subprocess.CalledProcessError) as error:
        print(name, type(error).__name__)
"""
    result = run_python(program, 10)
    assert "CONNECTED" not in result.stdout_tail and len(result.stdout_tail.splitlines()) == 4, result
    assert accepted == []


def test_a_fork_bomb_stays_under_the_process_limit_and_ends_with_the_check():
    program = """
import os, time
children = 0
try:
    while True:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        children += 1
except OSError:
    print(children, flush=True)
while True:
    try:
        os.fork()
    except OSError:
        pass
"""
    result = run_python(program, 1, limits=Limits(processes=8))
    assert result.timed_out and int(result.stdout_tail) < 8
    assert _host_processes_with(uids=sandbox_uids()) == []


@pytest.mark.parametrize("ends", ["exits", "times out"])
def test_a_setsid_grandchild_does_not_outlive_the_check(ends):
    marker = f"curate-grandchild-{secrets.token_hex(4)}"
    program = f"""
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", {marker!r}], start_new_session=True)
time.sleep(0.2)
{"time.sleep(60)" if ends == "times out" else ""}
"""
    result = run_python(program, 1)
    assert result.timed_out is (ends == "times out")
    assert _host_processes_with(marker) == []


def test_host_processes_cannot_be_signalled():
    host = subprocess.Popen(["sleep", "30"])
    try:
        program = f"import os, signal\ntry:\n    os.kill({host.pid}, signal.SIGKILL)\nexcept OSError as error:\n" \
                  "    print(type(error).__name__)\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit())[:2])"
        result = run_python(program, 5)
        assert result.stdout_tail.splitlines()[0] == "ProcessLookupError" and host.poll() is None, result
    finally:
        host.kill()
        host.wait()


def test_100_mb_of_output_is_capped_and_never_held_in_memory():
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    result = run_python("import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(100):\n    sys.stdout.write(chunk)", 10)
    assert result.output_capped and result.returncode != 0 and "File too large" in result.stderr_tail
    assert len(result.stdout_tail) <= TAIL_BYTES
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 20_000  # KiB
    assert time.perf_counter() - started < 5


def test_memory_is_limited():
    result = run_python("x = bytearray(4 << 30)", 5)
    assert result.returncode == 1 and "MemoryError" in result.stderr_tail


def test_without_bubblewrap_it_refuses_unless_unsafe_and_then_warns(monkeypatch, tmp_path):
    monkeypatch.setenv("CURATE_BWRAP", str(tmp_path / "no-bwrap"))
    with pytest.warns(SandboxUnavailableWarning, match="UNSANDBOXED"):
        assert not sandbox_available()
    with pytest.raises(SandboxUnavailable, match="bubblewrap"):
        run_python("print('hi')", 5)
    result = run_python("print('hi')", 5, unsafe=True)
    assert result.stdout_tail == "hi\n" and result.returncode == 0 and not result.sandboxed
    monkeypatch.delenv("CURATE_BWRAP")
    assert sandbox_available()


# ---------------------------------------------------------------- as root: user namespaces, memory, files


def test_new_user_namespaces_are_refused():
    """The issue's escape: unshare(CLONE_NEWUSER | CLONE_NEWNS) for full capabilities in a new
    namespace, then a tmpfs of its own past the scratch cap. Also by raw clone(), and by unshare(1)."""
    program = """
import ctypes, os, subprocess
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWUSER, CLONE_NEWNS, SIGCHLD = 0x10000000, 0x20000, 17
if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) == 0:
    os.makedirs('/tmp/mnt', exist_ok=True)
    libc.mount(b'none', b'/tmp/mnt', b'tmpfs', 0, b'size=300m')
    with open('/tmp/mnt/big', 'wb') as big:
        for _ in range(200):
            big.write(b'x' * (1 << 20))
    print('unshare ESCAPED')
else:
    print('unshare', os.strerror(ctypes.get_errno()))
pid = libc.syscall(56 if os.uname().machine == 'x86_64' else 220, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0)
if pid == 0:
    os._exit(0)
print('clone', 'ESCAPED' if pid > 0 else os.strerror(ctypes.get_errno()))
print('unshare(1)', subprocess.run(['unshare', '--user', '--map-root-user', 'true']).returncode)
"""
    result = run_python(program, 10)
    assert result.stdout_tail.splitlines() == ["unshare Operation not permitted", "clone Operation not permitted",
                                               "unshare(1) 1"], result


def test_sysv_shared_memory_is_refused():
    """SysV segments outlive their processes and count against no per-process limit."""
    program = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n" \
              "print(libc.shmget(0, 64 << 20, 0o1000 | 0o600), ctypes.get_errno())"
    assert run_python(program, 5).stdout_tail == "-1 1\n"  # EPERM


# Three processes, each holding 100 MiB for a moment, under a 256 MiB memory limit; prints how many
# of them the kernel killed.
THREE_PROCESSES = """
import os, signal, time
for _ in range(3):
    if os.fork() == 0:
        held = b'x' * (100 << 20)
        time.sleep(0.5)
        os._exit(0)
statuses = [os.wait()[1] for _ in range(3)]
print(sum(os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL for status in statuses))
"""
SMALL = Limits(memory_bytes=256 << 20)


@pytest.mark.skipif(cgroup_kind() is None, reason="this machine offers no cgroup for a check")
def test_with_a_cgroup_memory_is_capped_per_check_not_per_process():
    result = run_python(THREE_PROCESSES, 10, limits=SMALL)
    assert result.memory_capped and int(result.stdout_tail) >= 1, result


def test_without_a_cgroup_memory_is_capped_per_process_only(monkeypatch):
    """What rlimits alone hold: each process's address space, each memfd's size and their number,
    and (seccomp) SysV memory; not the sum over a check's processes."""
    monkeypatch.setattr(curate.sandbox, "_cgroup_parents", lambda: None)
    result = run_python(THREE_PROCESSES, 10, limits=SMALL)
    assert not result.memory_capped and result.stdout_tail == "0\n", result  # 300 MiB held under a 256 MiB limit
    assert "MemoryError" in run_python("held = b'x' * (300 << 20)", 5, limits=SMALL).stderr_tail
    memfds = """
import os
fds = []
try:
    while True:
        fd = os.memfd_create('held')
        os.write(fd, b'x' * (1 << 20))
        fds.append(fd)
except OSError as error:
    print(len(fds))
    print(error.strerror)
try:
    os.write(fds[0], b'x')
except OSError as error:
    print(error.strerror)
"""
    result = run_python(memfds, 10, limits=SMALL)
    held, why, one_more = result.stdout_tail.splitlines()
    assert int(held) < SMALL.open_files and why == "Too many open files" and one_more == "File too large", result


def test_dev_shm_is_private_world_writable_and_size_capped():
    program = """
import os, stat
print(oct(stat.S_IMODE(os.stat('/dev/shm').st_mode)), os.listdir('/dev/shm'))
try:
    for i in range(32):  # files under the 1 MiB file-size limit, 16 MiB in all
        with open(f'/dev/shm/{i}', 'wb') as part:
            part.write(b'x' * (512 << 10))
    print('wrote 16 MiB')
except OSError as error:
    print(error.strerror)
"""
    result = run_python(program, 5, limits=Limits(shm_bytes=8 << 20))
    assert result.stdout_tail.splitlines() == ["0o1777 []", "No space left on device"], result


def test_open_files_are_limited():
    program = "import resource\nprint(*resource.getrlimit(resource.RLIMIT_NOFILE))\n" \
              "files = []\ntry:\n    while True:\n        files.append(open('/dev/null'))\n" \
              "except OSError as error:\n    print(len(files) < 64, error.strerror)"
    assert run_python(program, 5).stdout_tail == "64 64\nTrue Too many open files\n"


# ---------------------------------------------------------------- --unsafe-verify


@pytest.mark.skipif(os.geteuid() != 0, reason="as root only: the sandbox uid is root's to give")
@pytest.mark.filterwarnings("ignore::curate.sandbox.SandboxUnavailableWarning")
@pytest.mark.parametrize("cgroup", [True, False], ids=["cgroup", "rlimits"])
def test_unsafe_mode_as_root_runs_as_a_sandbox_uid_and_leaves_nothing_behind(monkeypatch, tmp_path, cgroup):
    monkeypatch.setenv("CURATE_BWRAP", str(tmp_path / "no-bwrap"))
    if not cgroup:
        monkeypatch.setattr(curate.sandbox, "_cgroup_parents", lambda: None)
    marker = f"curate-unsafe-{secrets.token_hex(4)}"
    program = f"""
import os, subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", {marker!r}], start_new_session=True)
children = 0
try:
    for _ in range(40):
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        children += 1
except OSError:
    pass
print(os.getuid(), children)
"""
    result = run_python(program, 10, unsafe=True, limits=Limits(processes=8))
    uid, children = map(int, result.stdout_tail.split())
    assert not result.sandboxed and uid in sandbox_uids() and children < 8, result
    assert _host_processes_with(marker) == [] and _host_processes_with(uids=range(uid, uid + 1)) == []
