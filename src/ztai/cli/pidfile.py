"""The server's pid file (`<data_dir>/ztai.pid`): owned by one running `ztai serve`, checked by readers.

Ownership is a lock, not the file's existence: the server holds an exclusive `flock` on
`ztai.pid.lock` for its whole life (the kernel drops it when the process ends, however it ends). A
second `ztai serve` on the same data directory cannot take the lock and never touches the file (it
runs without one, as another replica, or fails to bind the same port), so it can never delete the
running server's pid file. The pid file itself (written atomically, under the lock) records
the pid, the process's start time as the kernel reports it, a random token and where it listens.

A reader (`ztai policy reload`) trusts the file only when the lock is held *and* the process with that
pid has the recorded start time: a stale file (no lock holder) or a pid now used by another process is
reported as such (`StalePidFile`), and nothing is ever signalled on its word.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ztai.errors import ServerRunning, StalePidFile

PID_FILE = "ztai.pid"
LOCK_FILE = "ztai.pid.lock"


@dataclass(frozen=True)
class ServerRecord:
    pid: int
    started: str  # the kernel's start time of the process (clock ticks since boot); "" where unknown
    token: str
    host: str = ""
    port: int = 0
    workers: int = 1

    def encode(self) -> bytes:
        return orjson.dumps(self.__dict__)

    @classmethod
    def decode(cls, data: bytes) -> ServerRecord:
        try:
            body: Any = orjson.loads(data)
            return cls(
                int(body["pid"]),
                str(body["started"]),
                str(body["token"]),
                str(body.get("host", "")),
                int(body.get("port", 0)),
                int(body.get("workers", 1)),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise StalePidFile("the pid file is unreadable (not written by this version of ztai)") from None


def process_start_time(pid: int) -> str | None:
    """The start time of process `pid` (field 22 of /proc/<pid>/stat), "" where /proc is not available,
    None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None if Path("/proc/self/stat").exists() else _exists_or_none(pid)
    except OSError:
        return ""
    return stat.rpartition(")")[2].split()[19]  # fields after the command name start at field 3


def _exists_or_none(pid: int) -> str | None:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return ""


class PidFile:
    """The running server's claim on its data directory; `release()` (or exit) gives it up."""

    def __init__(self, directory: Path, record: ServerRecord, lock_fd: int) -> None:
        self.path = directory / PID_FILE
        self.record = record
        self._lock_fd = lock_fd

    @classmethod
    def acquire(cls, directory: Path, *, host: str = "", port: int = 0, workers: int = 1) -> PidFile:
        """Take the lock and write the pid file; ServerRunning when another server holds it."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            running = _describe(directory / PID_FILE)
            raise ServerRunning(f"another ztai server is running on {directory}{running}") from None
        pid = os.getpid()
        record = ServerRecord(pid, process_start_time(pid) or "", secrets.token_hex(16), host, port, workers)
        temporary = directory / f".{PID_FILE}.{pid}"
        temporary.write_bytes(record.encode())
        os.chmod(temporary, 0o600)
        os.replace(temporary, directory / PID_FILE)  # whole or not at all
        return cls(directory, record, lock_fd)

    def release(self) -> None:
        """Remove the pid file if it is still this server's, then drop the lock."""
        with contextlib.suppress(OSError, StalePidFile):
            if ServerRecord.decode(self.path.read_bytes()).token == self.record.token:
                self.path.unlink()
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)


def _describe(path: Path) -> str:
    with contextlib.suppress(OSError, StalePidFile):
        return f" (pid {ServerRecord.decode(path.read_bytes()).pid})"
    return ""


def running_server(directory: Path) -> ServerRecord | None:
    """The live server of `directory`, None when no pid file exists; StalePidFile when one exists but
    names no live ztai server (never act on such a file)."""
    path = directory / PID_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    record = ServerRecord.decode(data)
    if not _lock_held(directory / LOCK_FILE):
        raise StalePidFile(
            f"stale pid file {path}: no ztai server holds its lock (process {record.pid} has ended)"
        )
    started = process_start_time(record.pid)
    if started is None or (started and record.started and started != record.started):
        raise StalePidFile(
            f"stale pid file {path}: process {record.pid} is not the ztai server that wrote it "
            "(it ended, and the pid may belong to another process now)"
        )
    return record


def _lock_held(lock_path: Path) -> bool:
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock taken just now
    return False


__all__ = ["PidFile", "ServerRecord", "ServerRunning", "StalePidFile", "process_start_time", "running_server"]
