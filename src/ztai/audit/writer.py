"""Group commit for the audit log: requests wait until their event is durable, many share one commit.

One background thread owns the log's writes. Requests enqueue an event with a future and await it; the
thread drains whatever has queued up (up to `batch_max`), appends it in one transaction, then completes
the futures. Under load, hundreds of events share one commit; at low load the wait is one commit.
It also writes a signed checkpoint every `checkpoint_interval` seconds while the log grows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from typing import Any

from ztai.audit.log import AuditLog
from ztai.audit.ocsf import OcsfFileExporter
from ztai.errors import AuditUnavailable

log = logging.getLogger("ztai.audit")
_STOP = object()


class AuditWriter:
    def __init__(
        self,
        audit_log: AuditLog,
        *,
        batch_max: int = 512,
        checkpoint_interval: float = 2.0,
        exporter: OcsfFileExporter | None = None,
    ) -> None:
        self._log = audit_log
        self._batch_max = batch_max
        self._checkpoint_interval = checkpoint_interval
        self._exporter = exporter
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="ztai-audit-writer", daemon=True)
        self._healthy = True
        self.batches = 0
        self.events = 0

    @property
    def healthy(self) -> bool:
        return self._healthy and self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Flush what is queued, write a final checkpoint, and stop the thread."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout=30)
        if self._exporter is not None:
            self._exporter.close()

    async def record(self, event: dict[str, Any]) -> int:
        """Wait until `event` is committed; returns its leaf index. Raises AuditUnavailable on failure."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self._queue.put((event, future, loop))
        return await future

    def record_soon(self, event: dict[str, Any]) -> None:
        """Queue `event` without waiting for its commit: for what is learned once an answer is on its way
        (an upstream's status and token usage). A failed commit marks the writer unhealthy (readyz)."""
        self._queue.put((event, None, None))

    def record_sync(self, event: dict[str, Any]) -> int:
        """For callers without an event loop (the CLI): append directly."""
        return self._log.append([event])[0]

    # The writer thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        next_checkpoint = time.monotonic() + self._checkpoint_interval
        while True:
            timeout = max(0.0, next_checkpoint - time.monotonic())
            try:
                first = self._queue.get(timeout=timeout)
            except queue.Empty:
                first = None
            stopping = first is _STOP
            batch = [] if first is None or stopping else [first]
            while len(batch) < self._batch_max and not stopping:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                else:
                    batch.append(item)
            if batch:
                self._commit(batch)
            if stopping or time.monotonic() >= next_checkpoint:
                self._checkpoint()
                next_checkpoint = time.monotonic() + self._checkpoint_interval
            if stopping:
                return

    def _commit(
        self,
        batch: list[tuple[dict[str, Any], asyncio.Future[int] | None, asyncio.AbstractEventLoop | None]],
    ) -> None:
        events = [event for event, _, _ in batch]
        try:
            seqs = self._log.append(events)
        except Exception as exc:  # any store failure must refuse the waiting requests (fail closed)
            self._healthy = False
            log.error("audit append failed: %s", type(exc).__name__)
            error = AuditUnavailable("the audit log is unavailable; the request was refused")
            for _, future, loop in batch:
                if future is not None and loop is not None:
                    loop.call_soon_threadsafe(_settle, future, None, error)
            return
        self._healthy = True
        self.batches += 1
        self.events += len(batch)
        for (_, future, loop), seq in zip(batch, seqs, strict=True):
            if future is not None and loop is not None:
                loop.call_soon_threadsafe(_settle, future, seq, None)
        if self._exporter is not None:
            try:
                self._exporter.export(list(zip(seqs, events, strict=True)))
            except OSError as exc:  # the SIEM copy is best effort; the log itself is committed
                log.warning("OCSF export failed: %s", exc)

    def _checkpoint(self) -> None:
        try:
            self._log.checkpoint()
        except Exception as exc:
            log.error("audit checkpoint failed: %s", exc)


def _settle(future: asyncio.Future[int], result: int | None, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        with contextlib.suppress(asyncio.InvalidStateError):
            future.set_result(result if result is not None else -1)
