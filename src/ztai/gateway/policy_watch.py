"""One worker's side of policy reloads (ztai.policy.reloads): watch for requests, swap or refuse.

The worker polls the newest reload request every `policy.reload_poll_seconds` (and at once when a
Redis notice arrives). For a request it has not seen, it loads and validates the directory off the
event loop, then, on the loop, swaps the engine's bundle in one assignment, only if the revision is the
requested one; otherwise it keeps the active set. Either way the outcome is audited. Nothing restarts:
the process, its caches and its connections stay as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ztai.audit import AuditWriter
from ztai.errors import PolicyError, ZtaiError
from ztai.gateway import metrics
from ztai.policy import PolicyEngine
from ztai.policy.reloads import (
    APPLIED,
    POLICY_CHANNEL,
    REFUSED,
    PolicyReloads,
    ReloadRequest,
    reload_event,
)
from ztai.store.shared import PubSubChannel

log = logging.getLogger("ztai.gateway")


class PolicyWatcher:
    """Applies reload requests to `engine`; `start()` on the event loop, `close()` at shutdown."""

    def __init__(
        self,
        engine: PolicyEngine,
        reloads: PolicyReloads,
        audit: AuditWriter,
        *,
        tenant: str,
        principal: str,
        poll_seconds: float,
        redis_url: str = "",
        seen: int = 0,
    ) -> None:
        self.engine = engine
        self.reloads = reloads
        self._audit = audit
        self._tenant, self._principal = tenant, principal
        self._poll_seconds = poll_seconds
        self._redis_url = redis_url
        self.seen = seen  # the newest request id this worker has handled (or that predates its load)
        self.last_problem = ""  # why the last request was refused ("" when it was applied)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._channel: PubSubChannel | None = None
        self._listener: asyncio.Task[None] | None = None
        metrics.set_policy_revision(engine.revision)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())
        if self._redis_url:
            self._channel = PubSubChannel(self._redis_url, POLICY_CHANNEL)
            self._listener = asyncio.create_task(self._channel.listen(lambda _data: self.wake()))

    def wake(self) -> None:
        """Look for a new request now instead of at the next poll."""
        self._wake.set()

    async def close(self) -> None:
        for task in (self._task, self._listener):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._channel is not None:
            await self._channel.close()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_seconds)
            self._wake.clear()
            try:
                await self.check()
            except ZtaiError as exc:  # the store is down: keep the active set, try again later
                log.warning("policy reload check failed: %s", exc.message)

    async def check(self) -> bool:
        """Handle the newest request if it is new; True when a request was handled."""
        request = await asyncio.to_thread(self.reloads.latest)
        if request is None or request.id <= self.seen:
            return False
        self.seen = request.id
        await self.apply(request)
        return True

    async def apply(self, request: ReloadRequest) -> None:
        previous = self.engine.revision
        try:
            bundle = await asyncio.to_thread(self.engine.load)
            if bundle.revision != request.revision:
                raise PolicyError(
                    f"the policy directory is at revision {bundle.revision}, not the requested "
                    f"{request.revision} (it changed since it was validated, or differs on this host)"
                )
        except PolicyError as exc:
            self.last_problem = exc.message
            metrics.POLICY_RELOADS.labels("refused").inc()
            log.error("policy reload %d refused, %s stays active: %s", request.id, previous, exc.message)
            await self._record(REFUSED, request, request.revision, previous, exc.message)
            return
        self.engine.activate(bundle)  # on the loop: between two requests' decisions, never inside one
        self.last_problem = ""
        metrics.POLICY_RELOADS.labels("applied").inc()
        metrics.set_policy_revision(bundle.revision, previous)
        log.warning("policies reloaded: revision %s (was %s)", bundle.revision, previous)
        await self._record(APPLIED, request, bundle.revision, previous)

    async def _record(
        self, kind: str, request: ReloadRequest | None, revision: str, previous: str, problem: str = ""
    ) -> None:
        event = reload_event(
            kind,
            tenant=self._tenant,
            principal=self._principal,
            request=request,
            revision=revision,
            previous=previous,
            problem=problem,
        )
        try:
            await self._audit.record(event)
        except ZtaiError as exc:
            log.error("cannot audit the policy reload outcome: %s", exc.message)

    async def request_local(self, requested_by: str) -> None:
        """SIGHUP to a single-process server: validate, record the request, apply it here at once."""
        try:
            bundle = await asyncio.to_thread(self.engine.load)
        except PolicyError as exc:
            log.error("policy reload (%s) refused: %s", requested_by, exc.message)
            await self._record(REFUSED, None, "", self.engine.revision, exc.message)
            return
        try:
            await asyncio.to_thread(self.reloads.request, bundle.revision, requested_by)
        except ZtaiError as exc:
            log.error("policy reload (%s) not recorded: %s", requested_by, exc.message)
            return
        self.wake()
