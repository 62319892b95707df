"""Audit events: what is recorded for each identity operation and each model answer (decision records
are built by `ztai.policy.decider`).

Events never hold raw secrets: tokens appear by their `jti`, request bodies by a SHA-256 fingerprint.
"""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime
from typing import Any


def new_event_id(prefix: str = "evt") -> str:
    """Time-ordered, unguessable: 12 hex digits of milliseconds then 16 random hex digits."""
    return f"{prefix}_{int(time.time() * 1000):012x}{secrets.token_hex(8)}"


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def answer_event(
    *,
    decision_id: str,
    tenant: str,
    principal: str,
    resource: str,
    status: int | None,
    usage: dict[str, int],
    stream: bool,
    error: str = "",
) -> dict[str, Any]:
    """What the upstream answered to an allowed model call (`decision_id` names its decision record):
    its HTTP status (None: no answer, `error` says why) and the token usage it reported."""
    event: dict[str, Any] = {
        "id": new_event_id(),
        "kind": "model.answered",
        "time": now_iso(),
        "tenant": tenant,
        "principal": principal,
        "action": "model.answered",
        "resource": resource,
        "decision_id": decision_id,
        "status": status,
        "usage": usage,
        "stream": stream,
    }
    if error:
        event["error"] = error
    return event


def identity_event(kind: str, *, tenant: str, principal: str, details: dict[str, Any]) -> dict[str, Any]:
    """token.issued, token.revoked, keys.rotated...: `principal` is who it is about."""
    return {
        "id": new_event_id(),
        "kind": kind,
        "time": now_iso(),
        "tenant": tenant,
        "principal": principal,
        "action": kind,
        "resource": principal,
        "effect": "allow",
        "reasons": [],
        **details,
    }


def audit_alert_event(kind: str, *, tenant: str, details: dict[str, Any]) -> dict[str, Any]:
    """audit.checkpoint_failed, audit.checkpoint_recovered: the audit log speaking about itself, as the
    gateway's own service principal (`tenant` is the deployment's trust domain)."""
    service = f"spiffe://{tenant}/service/ztai"
    return identity_event(
        kind, tenant=tenant, principal=service, details={"resource": "audit-log", **details}
    )
