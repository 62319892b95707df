"""Audit events: what is recorded for each decision and each identity operation.

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


def decision_event(
    *,
    decision_id: str,
    tenant: str,
    principal: str,
    action: str,
    resource: str,
    effect: str,
    reasons: list[str],
    errors: list[str],
    obligations: list[str],
    policy_revision: str,
    request: dict[str, Any],
) -> dict[str, Any]:
    return {
        "id": decision_id,
        "kind": "decision",
        "time": now_iso(),
        "tenant": tenant,
        "principal": principal,
        "action": action,
        "resource": resource,
        "effect": effect,
        "reasons": reasons,
        "errors": errors,
        "obligations": obligations,
        "policy_revision": policy_revision,
        "request": request,
    }


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
