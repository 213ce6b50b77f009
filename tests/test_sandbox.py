"""The sandbox's promises, each against a real escape attempt (run as root, as here and in CI)."""

import resource
import secrets
import socket
import threading
import time
from pathlib import Path

import pytest

from curate.sandbox import (
    TAIL_BYTES, Limits, SandboxUnavailable, SandboxUnavailableWarning, run_python, sandbox_available, sandbox_uids)

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
    found = []
    for proc in Path("/proc").iterdir():
        try:
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
