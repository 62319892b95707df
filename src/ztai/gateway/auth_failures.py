"""Failed authentications as audit events, rate-limited so a flood cannot fill the log.

Each failure (missing or malformed token, `alg: none`, bad signature, unknown key, expired, revoked...)
is an `auth.failed` event with the reason code, the route, the client address and, when a token was
presented, a keyed fingerprint of it (never the token: the fingerprint lets an investigator match a
token they hold, and nothing more). Per (client address, reason), at most `per_window` events are
written per `window_seconds`; the rest are counted and written as one `auth.failures_suppressed` event
when the window ends (at the next failure of that key, or by `flush`, which the runtime runs every
window). The number of keys tracked is bounded: beyond it, failures share one key per reason.

Limits are per worker: N workers write at most N times as many events.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from ztai.audit import AuditWriter
from ztai.audit.events import new_event_id, now_iso
from ztai.errors import AuthenticationError, ZtaiError
from ztai.gateway import metrics

log = logging.getLogger("ztai.gateway")
FAILED = "auth.failed"
SUPPRESSED = "auth.failures_suppressed"
_OVERFLOW = "*"  # the client address of failures counted together once too many keys are tracked


@dataclass
class _Window:
    started: float
    written: int = 0
    suppressed: int = 0


class AuthFailureRecorder:
    def __init__(
        self,
        audit: AuditWriter,
        *,
        tenant: str,
        fingerprint_key: bytes,
        per_window: int = 10,
        window_seconds: float = 60.0,
        max_keys: int = 10_000,
    ) -> None:
        self._audit = audit
        self._tenant = tenant
        self._key = hashlib.blake2b(b"ztai token fingerprint\0" + fingerprint_key, digest_size=32).digest()
        self._per_window = per_window
        self.window_seconds = window_seconds
        self._max_keys = max_keys
        self._windows: dict[tuple[str, str], _Window] = {}
        self._pending: set[asyncio.Task[Any]] = set()

    def fingerprint(self, token: str) -> str:
        """A keyed hash of the token (16 hex digits): matches a known token, reveals nothing of it."""
        return hashlib.blake2b(token.encode(), key=self._key, digest_size=8).hexdigest()

    def failed(self, error: AuthenticationError, *, route: str, ip: str, token: str | None) -> None:
        """Count one failure and audit it unless its (ip, reason) is over the limit (no waiting)."""
        metrics.AUTH_FAILURES.labels(error.code).inc()
        now = time.monotonic()
        key = (ip, error.code)
        if key not in self._windows and len(self._windows) >= self._max_keys:
            key = (_OVERFLOW, error.code)
        window = self._windows.get(key)
        if window is not None and now - window.started >= self.window_seconds:
            self._summarise(key, window)
            window = None
        if window is None:
            window = self._windows[key] = _Window(now)
        if window.written >= self._per_window:
            window.suppressed += 1
            metrics.AUTH_FAILURES_UNAUDITED.inc()
            return
        window.written += 1
        request: dict[str, Any] = {"route": route, "ip": ip, "message": error.message}
        if token:
            request["token_fingerprint"] = self.fingerprint(token)
            request["token_bytes"] = len(token)
        self._write(self._event(FAILED, error.code, request))

    def flush(self) -> None:
        """Write the summaries of windows that have ended, and forget them."""
        now = time.monotonic()
        for key, window in list(self._windows.items()):
            if now - window.started >= self.window_seconds:
                self._summarise(key, window)
                del self._windows[key]

    async def close(self) -> None:
        for key, window in list(self._windows.items()):
            self._summarise(key, window)
        self._windows.clear()
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    def _summarise(self, key: tuple[str, str], window: _Window) -> None:
        if window.suppressed:
            ip, reason = key
            details = {"ip": ip, "suppressed": window.suppressed, "window_seconds": self.window_seconds}
            self._write(self._event(SUPPRESSED, reason, details))
            window.suppressed = 0

    def _event(self, kind: str, reason: str, request: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": new_event_id(),
            "kind": kind,
            "time": now_iso(),
            "tenant": self._tenant,
            "principal": "",  # nobody was authenticated
            "action": "authenticate",
            "resource": str(request.get("route", "")),
            "effect": "deny",
            "reasons": [reason],
            "request": request,
        }

    def _write(self, event: dict[str, Any]) -> None:
        # The caller gets its 401 without waiting for the commit; the task is kept until it is done.
        task = asyncio.ensure_future(self._audit.record(event))
        self._pending.add(task)
        task.add_done_callback(self._settled)

    def _settled(self, task: asyncio.Task[Any]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and isinstance(task.exception(), ZtaiError):
            log.error("a failed authentication could not be audited: %s", task.exception())
