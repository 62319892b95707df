"""Group commit for the audit log: requests wait until their event is durable, many share one commit.

One background thread owns the log's writes. Requests enqueue an event with a future and await it; the
thread drains whatever has queued up (up to `batch_max`), appends it in one transaction, then completes
the futures. Under load, hundreds of events share one commit; at low load the wait is one commit.
It also writes a signed checkpoint every `checkpoint_interval` seconds while the log grows, hands each
to the witnesses, and keeps the coverage metrics current. A checkpoint that cannot be written is loud:
an ERROR log line, `ztai_audit_checkpoint_failures_total`, an `audit.checkpoint_failed` event (when the
log still takes one) and `status()` not ok; the next checkpoint that succeeds clears it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from ztai.audit import metrics
from ztai.audit.events import audit_alert_event, now_iso
from ztai.audit.log import AuditLog, Checkpoint
from ztai.audit.ocsf import OcsfFileExporter
from ztai.audit.witness import WitnessExporter
from ztai.errors import AuditUnavailable, CheckpointError, StoreError

log = logging.getLogger("ztai.audit")
_STOP = object()


class AuditWriter:
    def __init__(
        self,
        audit_log: AuditLog,
        *,
        batch_max: int = 512,
        checkpoint_interval: float = 2.0,
        max_uncovered_seconds: float = 30.0,
        exporter: OcsfFileExporter | None = None,
        witnesses: WitnessExporter | None = None,
        checkpoints_to_ocsf: bool = False,
        tenant: str = "",
    ) -> None:
        self._log = audit_log
        self._batch_max = batch_max
        self._checkpoint_interval = checkpoint_interval
        self._max_uncovered = max_uncovered_seconds
        self._exporter = exporter
        self._witnesses = witnesses
        self._checkpoints_to_ocsf = checkpoints_to_ocsf and exporter is not None
        self._tenant = tenant  # of the audit log's own alert events: the deployment's trust domain
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="ztai-audit-writer", daemon=True)
        self._healthy = True
        self._checkpoint_failure: str | None = None  # why the last checkpoint attempt failed
        self._failed_attempts = 0
        self._failing_since = ""
        self.batches = 0
        self.events = 0

    @property
    def healthy(self) -> bool:
        return self._healthy and self._thread.is_alive()

    def status(self) -> str:
        """The audit check of /readyz: "ok", or why the log cannot be relied on: appends or checkpoints
        failing here, or (read from the store, so whichever process failed) events waiting longer than
        the bound for a checkpoint. Reads the store: call it off the event loop."""
        if not self.healthy:
            return "audit writer failing"
        if self._checkpoint_failure is not None:
            return f"checkpoint failing: {self._checkpoint_failure}"
        try:
            problem = self._log.coverage().problem(self._max_uncovered)
        except StoreError as exc:
            return exc.message
        return "ok" if problem is None else problem

    def start(self) -> None:
        if self._witnesses is not None:
            self._witnesses.start()
        self._thread.start()

    def stop(self) -> None:
        """Flush what is queued, write a final checkpoint, hand it to the witnesses, and stop."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout=30)
        if self._witnesses is not None:
            self._witnesses.stop()
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
        next_checkpoint = time.monotonic()  # at once: events appended while no server ran get covered
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
            checkpoint = self._log.checkpoint()
        except Exception as exc:  # whatever it is, the log must not go quiet about it
            self._checkpoint_failed(exc)
        else:
            if self._checkpoint_failure is not None:
                self._checkpoint_recovered()
            if checkpoint is not None:
                self._witness(checkpoint)
        self._observe_coverage()

    def _checkpoint_failed(self, exc: Exception) -> None:
        if isinstance(exc, CheckpointError):
            reason, detail = exc.reason, str(exc)
        elif isinstance(exc, SQLAlchemyError):
            reason, detail = "store_error", f"the store refused: {type(exc).__name__}"
        else:
            reason, detail = "error", f"{type(exc).__name__}: {exc}"
        metrics.CHECKPOINT_FAILURES.labels(reason).inc()
        self._failed_attempts += 1
        if self._checkpoint_failure is None:  # the first failure: say it once, loudly, then flag it
            self._failing_since = now_iso()
            log.error("audit checkpoint failed (%s): %s", reason, detail)
            self._append_alert(
                "audit.checkpoint_failed", {"effect": "alert", "reason": reason, "error": detail}
            )
        elif self._failed_attempts % 30 == 0:
            log.error("audit checkpoint still failing after %d attempts: %s", self._failed_attempts, detail)
        self._checkpoint_failure = detail

    def _checkpoint_recovered(self) -> None:
        log.warning("audit checkpoints written again after %d failed attempts", self._failed_attempts)
        self._append_alert(
            "audit.checkpoint_recovered",
            {"failed_attempts": self._failed_attempts, "failing_since": self._failing_since},
        )
        self._checkpoint_failure, self._failed_attempts, self._failing_since = None, 0, ""

    def _append_alert(self, kind: str, details: dict[str, Any]) -> None:
        event = audit_alert_event(kind, tenant=self._tenant, details=details)
        try:
            seqs = self._log.append([event])
        except Exception as exc:  # the store refuses everything: the log line and metric remain
            log.error("could not record %s in the audit log: %s", kind, type(exc).__name__)
            return
        if self._exporter is not None:
            try:
                self._exporter.export(list(zip(seqs, [event], strict=True)))
            except OSError as exc:
                log.warning("OCSF export failed: %s", exc)

    def _witness(self, checkpoint: Checkpoint) -> None:
        if self._witnesses is not None:
            self._witnesses.submit(checkpoint)
        if self._checkpoints_to_ocsf and self._exporter is not None:
            try:
                self._exporter.export_checkpoint(checkpoint.to_json())
            except OSError as exc:
                metrics.WITNESS_EXPORTS.labels("ocsf", "failed").inc()
                log.error("OCSF export of checkpoint %d failed: %s", checkpoint.tree_size, exc)
            else:
                metrics.WITNESS_EXPORTS.labels("ocsf", "ok").inc()

    def _observe_coverage(self) -> None:
        try:
            coverage = self._log.coverage()
        except StoreError:
            return  # the store is down: readiness says so; the gauges keep their last values
        metrics.UNCOVERED_EVENTS.set(coverage.uncovered)
        metrics.UNCOVERED_SECONDS.set(coverage.uncovered_seconds(datetime.now(UTC)))
        if coverage.checkpoint_at is not None:
            metrics.LAST_CHECKPOINT.set(coverage.checkpoint_at.timestamp())


def _settle(future: asyncio.Future[int], result: int | None, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        with contextlib.suppress(asyncio.InvalidStateError):
            future.set_result(result if result is not None else -1)
