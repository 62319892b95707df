"""The request pipeline's admission stage alone: it takes only the identity holder and the server
settings (no Runtime, no app), reads a bounded body and authenticates the caller."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.requests import Request
from starlette.types import Message

from ztai.config import Settings
from ztai.errors import AuthenticationError, MalformedRequest, PayloadTooLarge
from ztai.gateway.auth_failures import AuthFailureRecorder
from ztai.gateway.pipeline import admit, parse_json_object
from ztai.gateway.runtime import Identity
from ztai.identity import KeyStore, RevocationList, TokenVerifier
from ztai.identity.tokens import issue_token
from ztai.store import Database


class Recorded:
    """Stands in for the audit writer: what the failed-authentication recorder hands it."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    async def record(self, event: dict[str, Any]) -> None:
        self.events.append(event)


@pytest.fixture
def recorded() -> Recorded:
    return Recorded()


@pytest.fixture
def identity(settings: Settings, database: Database, recorded: Recorded) -> Identity:
    keys = KeyStore.load(settings.data_path)
    revocations = RevocationList(database)
    revocations.refresh()
    failures = AuthFailureRecorder(recorded, tenant="example.org", fingerprint_key=b"k" * 32)  # type: ignore[arg-type]
    verifier = TokenVerifier(settings, keys, revocations)
    return Identity(keys=keys, revocations=revocations, verifier=verifier, failures=failures)


def request_with(body: bytes, token: str | None, chunks: int = 1) -> Request:
    headers = [(b"content-type", b"application/json")]
    if token is not None:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    size = max(1, len(body) // chunks)
    parts = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
    messages: list[Message] = [
        {"type": "http.request", "body": part, "more_body": i < len(parts) - 1}
        for i, part in enumerate(parts)
    ]

    async def receive() -> Message:
        return messages.pop(0)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": headers}
    return Request(scope, receive)


def alice_token(settings: Settings, identity: Identity) -> str:
    return issue_token(
        identity.keys,
        subject="spiffe://example.org/user/alice",
        issuer=settings.issuer,
        audience=settings.identity.audience,
        ttl_seconds=60,
        max_ttl_seconds=settings.identity.max_ttl_seconds,
    ).token


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_admit_reads_the_body_then_authenticates(
    settings: Settings, identity: Identity, recorded: Recorded
) -> None:
    token = alice_token(settings, identity)
    body, principal = await admit(identity, settings.server, request_with(b'{"a": 1}', token, chunks=3))
    assert body == b'{"a": 1}' and principal.spiffe_id == "spiffe://example.org/user/alice"
    with pytest.raises(AuthenticationError) as missing:
        await admit(identity, settings.server, request_with(b"{}", None))
    assert missing.value.code == "missing_token"
    forged = token[:-4] + "AAAA"
    with pytest.raises(AuthenticationError):
        await admit(identity, settings.server, request_with(b"{}", forged))
    await asyncio.sleep(0)  # the recorder queues its audit events without waiting
    assert [event["kind"] for event in recorded.events] == ["auth.failed", "auth.failed"]
    assert "missing_token" in str(recorded.events[0])
    assert forged not in str(recorded.events)  # never the token itself


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_admit_refuses_a_body_over_its_bound_before_authenticating(
    settings: Settings, identity: Identity
) -> None:
    small = settings.server.model_copy(update={"max_body_bytes": 1024})
    with pytest.raises(PayloadTooLarge):  # streamed without a content-length, no token even looked at
        await admit(identity, small, request_with(b"x" * 5000, None, chunks=10))


def test_parse_json_object_bounds_depth_and_shape() -> None:
    assert parse_json_object(b'{"a": [1, {"b": 2}]}', 3) == {"a": [1, {"b": 2}]}
    for body, words in {
        b"": "empty",
        b"[1]": "must be a JSON object",
        b'{"a": [[1]]}': "nests deeper than 2",
        b"{": "not valid JSON",
    }.items():
        with pytest.raises(MalformedRequest, match=words):
            parse_json_object(body, 2)
