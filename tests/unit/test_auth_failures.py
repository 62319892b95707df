"""Failed authentications: audited with reason and fingerprint, never the token; rate-limited."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ztai.errors import AuthenticationError
from ztai.gateway import auth_failures
from ztai.gateway.auth_failures import FAILED, SUPPRESSED, AuthFailureRecorder

TOKEN = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0."


class RecordedAudit:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    async def record(self, event: dict[str, Any]) -> int:
        self.events.append(event)
        return len(self.events) - 1


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(auth_failures.time, "monotonic", fake)
    return fake


def recorder(audit: RecordedAudit, **limits: Any) -> AuthFailureRecorder:
    return AuthFailureRecorder(audit, tenant="example.org", fingerprint_key=b"k" * 32, **limits)  # type: ignore[arg-type]


def unsigned() -> AuthenticationError:
    return AuthenticationError("unsigned tokens are not accepted", code="bad_algorithm")


async def test_a_failure_is_audited_with_its_reason_and_a_fingerprint(clock: Clock) -> None:
    audit = RecordedAudit()
    failures = recorder(audit)
    failures.failed(unsigned(), route="/v1/chat/completions", ip="10.0.0.1", token=TOKEN)
    failures.failed(
        AuthenticationError("missing", code="missing_token"), route="/v1/models", ip="10.0.0.1", token=None
    )
    await failures.close()
    first, second = audit.events
    assert first["kind"] == FAILED and first["reasons"] == ["bad_algorithm"] and first["effect"] == "deny"
    assert first["request"]["route"] == "/v1/chat/completions" and first["request"]["ip"] == "10.0.0.1"
    assert first["request"]["token_fingerprint"] == failures.fingerprint(TOKEN) != TOKEN
    assert len(first["request"]["token_fingerprint"]) == 16
    assert TOKEN not in repr(audit.events) and TOKEN.split(".")[0] not in repr(audit.events)
    assert "token_fingerprint" not in second["request"]
    # keyed: another deployment's fingerprint of the same token differs
    other = AuthFailureRecorder(audit, tenant="t", fingerprint_key=b"x" * 32)  # type: ignore[arg-type]
    assert other.fingerprint(TOKEN) != failures.fingerprint(TOKEN)


async def test_a_flood_is_limited_per_client_and_reason_and_the_rest_summarised(clock: Clock) -> None:
    audit = RecordedAudit()
    failures = recorder(audit, per_window=3, window_seconds=60)
    for _ in range(20):
        failures.failed(unsigned(), route="/v1/models", ip="10.0.0.1", token=TOKEN)
    failures.failed(unsigned(), route="/v1/models", ip="10.0.0.2", token=TOKEN)  # another client: own budget
    expired = AuthenticationError("token expired", code="token_expired")
    failures.failed(expired, route="/v1/models", ip="10.0.0.1", token=TOKEN)  # another reason: own budget
    await asyncio.sleep(0)
    assert [e["kind"] for e in audit.events].count(FAILED) == 5
    failures.flush()  # the window has not ended: nothing to summarise yet
    await asyncio.sleep(0)
    assert [e["kind"] for e in audit.events].count(SUPPRESSED) == 0
    clock.now += 61
    failures.flush()
    await asyncio.sleep(0)
    [summary] = [e for e in audit.events if e["kind"] == SUPPRESSED]
    assert summary["reasons"] == ["bad_algorithm"] and summary["request"]["ip"] == "10.0.0.1"
    assert summary["request"]["suppressed"] == 17
    failures.failed(unsigned(), route="/v1/models", ip="10.0.0.1", token=TOKEN)  # a new window
    await failures.close()
    assert [e["kind"] for e in audit.events].count(FAILED) == 6


async def test_a_window_ending_at_the_next_failure_is_summarised_then(clock: Clock) -> None:
    audit = RecordedAudit()
    failures = recorder(audit, per_window=1, window_seconds=10)
    for _ in range(4):
        failures.failed(unsigned(), route="/v1/models", ip="10.0.0.1", token=None)
    clock.now += 11
    failures.failed(unsigned(), route="/v1/models", ip="10.0.0.1", token=None)
    await asyncio.sleep(0)
    assert [e["kind"] for e in audit.events] == [FAILED, SUPPRESSED, FAILED]
    assert audit.events[1]["request"]["suppressed"] == 3
    await failures.close()


async def test_many_clients_share_one_budget_beyond_the_tracked_keys(clock: Clock) -> None:
    audit = RecordedAudit()
    failures = recorder(audit, per_window=2, window_seconds=60, max_keys=5)
    for index in range(100):
        failures.failed(unsigned(), route="/v1/models", ip=f"10.0.{index}.1", token=None)
    await failures.close()
    written = [e for e in audit.events if e["kind"] == FAILED]
    assert len(written) == 5 + 2  # five tracked clients, then two for all the others together
    [summary] = [e for e in audit.events if e["kind"] == SUPPRESSED]
    assert summary["request"]["ip"] == "*" and summary["request"]["suppressed"] == 93
