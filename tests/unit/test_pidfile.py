"""The server's pid file: owned through a lock, never trusted once its server is gone."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import orjson
import pytest

from ztai.cli.pidfile import (
    PID_FILE,
    PidFile,
    ServerRecord,
    ServerRunning,
    StalePidFile,
    process_start_time,
    running_server,
)


def test_the_owner_is_found_and_its_file_removed_on_release(tmp_path: Path) -> None:
    owned = PidFile.acquire(tmp_path, host="127.0.0.1", port=8787, workers=2)
    record = running_server(tmp_path)
    assert record is not None and record.pid == os.getpid() and record.workers == 2
    assert record.started == process_start_time(os.getpid()) and len(record.token) == 32
    assert (tmp_path / PID_FILE).stat().st_mode & 0o777 == 0o600
    owned.release()
    assert not (tmp_path / PID_FILE).exists()
    assert running_server(tmp_path) is None


def test_a_second_server_is_refused_and_leaves_the_first_ones_file(tmp_path: Path) -> None:
    first = PidFile.acquire(tmp_path)
    written = (tmp_path / PID_FILE).read_bytes()
    with pytest.raises(ServerRunning, match=f"pid {os.getpid()}"):
        PidFile.acquire(tmp_path)
    assert (tmp_path / PID_FILE).read_bytes() == written
    first.release()
    PidFile.acquire(tmp_path).release()  # free again once the first is gone


def test_a_file_nobody_holds_the_lock_of_is_stale(tmp_path: Path) -> None:
    owned = PidFile.acquire(tmp_path)
    os.close(owned._lock_fd)  # the server died without cleaning up: its lock went with it, the file stays
    with pytest.raises(StalePidFile, match="no ztai server holds its lock"):
        running_server(tmp_path)
    PidFile.acquire(tmp_path).release()  # a new server takes over


def test_a_pid_reused_by_another_process_is_not_trusted(tmp_path: Path) -> None:
    owned = PidFile.acquire(tmp_path)  # the lock is held (by this process)...
    other = subprocess.Popen(["sleep", "30"])
    try:  # ...but the file names another process, with a start time that is not that process's
        record = ServerRecord(other.pid, "1", "00")
        (tmp_path / PID_FILE).write_bytes(record.encode())
        with pytest.raises(StalePidFile, match=f"process {other.pid} is not the ztai server"):
            running_server(tmp_path)
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()
    owned.release()
    assert (tmp_path / PID_FILE).exists()  # not ours any more (another token): left alone


def test_an_unreadable_file_is_stale(tmp_path: Path) -> None:
    (tmp_path / PID_FILE).write_text("12345")  # the old format: a bare pid
    with pytest.raises(StalePidFile, match="unreadable"):
        running_server(tmp_path)


def test_the_record_round_trips(tmp_path: Path) -> None:
    record = ServerRecord(42, "777", "ab", "0.0.0.0", 9000, 4)
    assert ServerRecord.decode(record.encode()) == record
    assert orjson.loads(record.encode())["pid"] == 42
    assert process_start_time(2**22 + 12345) is None  # no such process
