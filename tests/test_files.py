"""Two processes writing one file: `write_atomic` leaves one writer's whole content, never a mix,
and a lock held by one real process refuses the other (the store, export and experiment use it)."""

import multiprocessing
import os
import subprocess
import sys
import time

import pytest

from conftest import flock_holders
from curate.files import Busy, hold_lock, write_atomic

pytestmark = pytest.mark.fast

SIZE = 4 * 2**20


def _write_many(path, byte: bytes, times: int) -> None:
    for _ in range(times):
        write_atomic(path, byte * SIZE)


def test_two_processes_writing_one_file_leave_one_whole_content_each_time(tmp_path):
    path = tmp_path / "results.json"
    write_atomic(path, b"a" * SIZE)
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_write_many, args=(path, byte, 40)) for byte in (b"a", b"b")]
    for writer in writers:
        writer.start()
    while any(writer.is_alive() for writer in writers):
        data = path.read_bytes()
        assert len(data) == SIZE and data.count(data[:1]) == SIZE, "a reader saw a mix of two writes, or a part of one"
    for writer in writers:
        writer.join()
        assert writer.exitcode == 0
    data = path.read_bytes()
    assert len(data) == SIZE and data.count(data[:1]) == SIZE
    assert not list(tmp_path.glob("*.partial"))


def test_a_lock_held_by_another_process_is_refused_with_its_pid_and_freed_when_it_dies(tmp_path):
    lock = tmp_path / ".curate.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from curate.files import hold_lock; "
                               f"h = hold_lock({str(lock)!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert flock_holders(lock) == {holder.pid}
        with pytest.raises(Busy) as refused:
            hold_lock(lock)
        assert refused.value.holder == str(holder.pid)
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 10
    while flock_holders(lock) and time.monotonic() < deadline:
        time.sleep(0.05)
    with hold_lock(lock):  # a killed holder leaves nothing that blocks the next run
        assert flock_holders(lock) == {os.getpid()}
