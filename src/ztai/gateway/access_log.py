"""The optional access log (`server.access_log`): one JSON line per request.

A line holds when, who and what, never content: time, method, route (the template), path (no query
string), status, latency, bytes in and out, the decision id (when the request had one), the principal
(when it authenticated), the client address and the worker's pid. Bodies, headers and tokens never
appear. Lines are written by a thread, not on the event loop; the file is opened for appending, and
each batch goes out in one `write`, so several workers can share one file without tearing lines.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
from pathlib import Path
from typing import Any

import orjson

_STOP = object()
_BATCH = 256


class AccessLog:
    """Writes entries to `path` (appending), or to stderr when `path` is None."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._fd = -1

    def start(self) -> None:
        if self.path is None:
            self._fd = sys.stderr.fileno()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._thread = threading.Thread(target=self._run, name="ztai-access-log", daemon=True)
        self._thread.start()

    def write(self, entry: dict[str, Any]) -> None:
        """Queue one entry (never blocks)."""
        if self._thread is not None:
            self._queue.put(entry)

    def close(self) -> None:
        """Write what is queued, then stop."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join(timeout=10)
        self._thread = None
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            batch: list[bytes] = []
            while item is not _STOP:
                batch.append(orjson.dumps(item) + b"\n")
                if len(batch) >= _BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                try:
                    _write_all(self._fd, b"".join(batch))
                except OSError as exc:  # a full disk must not stop the gateway; the metrics still count
                    print(f"ztai: cannot write the access log: {exc}", file=sys.stderr)
            if item is _STOP:
                return


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


__all__ = ["AccessLog"]
