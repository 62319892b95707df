"""Witnesses: every signed checkpoint also goes somewhere the database's administrators cannot edit.

The database alone cannot show that its newest checkpoints were deleted together with the events they
covered (what is left still verifies). A witness keeps its own copy of each checkpoint: an append-only
JSON-lines file, an HTTP endpoint (POST of the checkpoint JSON), or the OCSF export a SIEM collects.
`ztai audit verify --witness FILE` then checks the store against every checkpoint the witness holds.

Delivery never blocks the request path: the writer hands each checkpoint to one thread that sends it to
every witness in order, retrying with backoff; what cannot be delivered is counted and logged.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson

from ztai.audit import metrics
from ztai.audit.log import Checkpoint
from ztai.config import WitnessSettings

log = logging.getLogger("ztai.audit")
RECORD_TYPE = "ztai.audit.checkpoint"
_FIRST_RETRY_SECONDS = 1.0
_MAX_RETRY_SECONDS = 60.0


class Witness(Protocol):
    name: str

    def send(self, record: bytes) -> None:
        """Deliver one checkpoint record; raise on failure."""


def witness_record(checkpoint: Checkpoint) -> bytes:
    """What a witness receives: the checkpoint's JSON, tagged with its type."""
    return orjson.dumps({"type": RECORD_TYPE, **checkpoint.to_json()})


class FileWitness:
    """Appends one line per checkpoint (O_APPEND, so several workers can share the file) and syncs it."""

    name = "file"

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path

    def send(self, record: bytes) -> None:
        line = record + b"\n"  # one write: appends of whole lines do not interleave
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            if os.write(descriptor, line) != len(line):
                raise OSError(f"short write to {self.path}")
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


class HttpWitness:
    """POSTs each checkpoint as JSON; any answer but 2xx counts as a failure (and is retried)."""

    name = "http"

    def __init__(self, url: str, *, timeout: float, token: str = "") -> None:
        self.url = url
        self._timeout = timeout
        self._headers = {"content-type": "application/json"}
        if token:
            self._headers["authorization"] = f"Bearer {token}"

    def send(self, record: bytes) -> None:
        request = urllib.request.Request(self.url, data=record, headers=self._headers, method="POST")  # noqa: S310
        with _OPENER.open(request, timeout=self._timeout) as response:
            if not 200 <= response.status < 300:
                raise OSError(f"witness answered {response.status}")


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is a failure: urllib would follow a 302 with a GET and no body, and its 2xx would
    count as delivered."""

    def redirect_request(self, *_args: Any, **_kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects())


def build_witnesses(settings: WitnessSettings, resolve: Callable[[str], Path]) -> list[Witness]:
    """The file and HTTP witnesses `audit.witness` configures (OCSF is written by the writer's exporter)."""
    witnesses: list[Witness] = []
    if settings.file:
        witnesses.append(FileWitness(resolve(settings.file)))
    if settings.url:
        token = os.environ.get(settings.token_env, "") if settings.token_env else ""
        witnesses.append(HttpWitness(settings.url, timeout=settings.timeout_seconds, token=token))
    return witnesses


def deliver_now(witnesses: list[Witness], checkpoint: Checkpoint) -> list[str]:
    """Send once to each witness, in this thread (the CLI); returns what failed, for a warning."""
    failures = []
    for witness in witnesses:
        try:
            witness.send(witness_record(checkpoint))
            metrics.WITNESS_EXPORTS.labels(witness.name, "ok").inc()
        except Exception as exc:
            metrics.WITNESS_EXPORTS.labels(witness.name, "failed").inc()
            failures.append(f"{witness.name}: {type(exc).__name__}: {exc}")
    return failures


@dataclass
class _Lane:
    """One witness's queue: delivered in order, the first one retried until it gets through."""

    witness: Witness
    pending: deque[bytes]
    due: float = 0.0
    backoff: float = _FIRST_RETRY_SECONDS
    failures: int = 0


class WitnessExporter:
    """Delivers checkpoints to every witness from one background thread; `submit` never blocks."""

    def __init__(
        self,
        witnesses: list[Witness],
        *,
        max_pending: int = 10_000,
        first_retry_seconds: float = _FIRST_RETRY_SECONDS,
    ) -> None:
        self._first_retry = first_retry_seconds
        self._lanes = [_Lane(w, deque(maxlen=max_pending), backoff=first_retry_seconds) for w in witnesses]
        self._ready = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="ztai-audit-witness", daemon=True)

    def start(self) -> None:
        if self._lanes:
            self._thread.start()

    def submit(self, checkpoint: Checkpoint) -> None:
        record = witness_record(checkpoint)
        with self._ready:
            for lane in self._lanes:
                if len(lane.pending) == lane.pending.maxlen:
                    metrics.WITNESS_EXPORTS.labels(lane.witness.name, "dropped").inc()
                    log.error("witness %s: queue full, the oldest checkpoint was dropped", lane.witness.name)
                lane.pending.append(record)
                metrics.WITNESS_PENDING.labels(lane.witness.name).set(len(lane.pending))
            self._ready.notify()

    def stop(self, timeout: float = 5.0) -> None:
        """Try once more to deliver what is pending (within `timeout`), then stop the thread."""
        if not self._thread.is_alive():
            return
        with self._ready:
            self._stopping = True
            for lane in self._lanes:
                lane.due = 0.0
            self._ready.notify()
        self._thread.join(timeout)
        for lane in self._lanes:
            if lane.pending:
                log.error("witness %s: %d checkpoints not delivered", lane.witness.name, len(lane.pending))

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._stopping and not self._due_lanes():
                    self._ready.wait(timeout=self._next_wait())
                stopping = self._stopping
                due = self._due_lanes()
            for lane in due:
                self._deliver(lane)
            if stopping:
                return

    def _due_lanes(self) -> list[_Lane]:
        now = time.monotonic()
        return [lane for lane in self._lanes if lane.pending and lane.due <= now]

    def _next_wait(self) -> float | None:
        dues = [lane.due for lane in self._lanes if lane.pending]
        return max(0.0, min(dues) - time.monotonic()) if dues else None

    def _deliver(self, lane: _Lane) -> None:
        """Send the lane's queue in order until it is empty or a send fails (then back off)."""
        while True:
            with self._ready:
                if not lane.pending:
                    return
                record = lane.pending[0]
            try:
                lane.witness.send(record)
            except Exception as exc:
                self._failed(lane, exc)
                return
            with self._ready:
                if lane.pending and lane.pending[0] is record:  # not dropped meanwhile (queue full)
                    lane.pending.popleft()
                metrics.WITNESS_PENDING.labels(lane.witness.name).set(len(lane.pending))
            metrics.WITNESS_EXPORTS.labels(lane.witness.name, "ok").inc()
            lane.backoff, lane.failures = self._first_retry, 0

    def _failed(self, lane: _Lane, exc: Exception) -> None:
        metrics.WITNESS_EXPORTS.labels(lane.witness.name, "failed").inc()
        lane.failures += 1
        if lane.failures == 1 or lane.failures % 20 == 0:
            log.error(
                "witness %s: checkpoint not delivered (%d attempts, retrying): %s: %s",
                lane.witness.name,
                lane.failures,
                type(exc).__name__,
                exc,
            )
        with self._ready:
            lane.due = time.monotonic() + lane.backoff
        lane.backoff = min(_MAX_RETRY_SECONDS, lane.backoff * 2)


@dataclass
class WitnessFile:
    checkpoints: list[Checkpoint]
    skipped: list[str]  # lines that were not checkpoints: "line N: why"


def read_witness_file(path: Path) -> WitnessFile:
    """Checkpoints from a witness file: its own records, or OCSF lines carrying one (other OCSF events
    are passed over). A line that is neither (a truncated last line, say) is reported, not fatal."""
    found = WitnessFile([], [])
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                document = orjson.loads(line)
            except orjson.JSONDecodeError:
                found.skipped.append(f"line {number}: not JSON (truncated or corrupt)")
                continue
            checkpoint = _checkpoint_in(document)
            if checkpoint is None:
                if not (isinstance(document, dict) and "class_uid" in document):
                    found.skipped.append(f"line {number}: not a checkpoint record")
                continue
            try:
                found.checkpoints.append(Checkpoint.from_json(checkpoint))
            except (KeyError, TypeError, ValueError) as exc:
                found.skipped.append(f"line {number}: malformed checkpoint ({type(exc).__name__})")
    return found


def _checkpoint_in(document: Any) -> dict[str, Any] | None:
    if not isinstance(document, dict):
        return None
    if document.get("type") == RECORD_TYPE:
        return document
    unmapped = document.get("unmapped")
    if document.get("class_uid") is not None and isinstance(unmapped, dict):
        inner = unmapped.get("checkpoint")
        return inner if isinstance(inner, dict) else None
    return None
