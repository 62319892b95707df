"""Issuing ztai's own tokens: short-lived JWTs whose subject is a SPIFFE ID."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import jwt

from ztai.errors import MalformedRequest
from ztai.identity.keys import KeyStore
from ztai.identity.spiffe_ids import parse_spiffe_id

# Set by ztai only: the registered claims, and the task claims a token exchange adds (task_tokens.py).
TASK_CLAIM_NAMES = frozenset(
    {"task", "task_chain", "act", "constraints", "egress", "budget", "ancestor_budgets"}
)
RESERVED_CLAIMS = (
    frozenset({"iss", "sub", "aud", "exp", "iat", "nbf", "jti", "kind", "tenant"}) | TASK_CLAIM_NAMES
)
# Claims that are always sets of strings, even with one value (so policies can use `.contains`).
LIST_CLAIMS = frozenset({"models", "groups", "scopes", "tools", "roles"})
MAX_CUSTOM_CLAIMS = 32
MAX_CLAIM_VALUE_LENGTH = 1024


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking: a verified identity and its claims."""

    spiffe_id: str
    kind: str
    name: str
    tenant: str
    issuer: str
    jti: str
    expires_at: float
    claims: dict[str, Any] = field(default_factory=dict)

    def claim_set(self, name: str) -> list[str]:
        value = self.claims.get(name)
        if isinstance(value, str):
            return [value]
        if isinstance(value, list):
            return [str(v) for v in value]
        return []


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    jti: str
    subject: str
    kind: str
    tenant: str
    expires_at: int


def parse_claims(pairs: list[str]) -> dict[str, Any]:
    """Turn `k=v` strings into claims. Commas make lists; LIST_CLAIMS are always lists."""
    claims: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise MalformedRequest(f"claim {pair!r} must look like name=value")
        if name in RESERVED_CLAIMS:
            raise MalformedRequest(f"claim {name!r} is set by ztai and cannot be given")
        if len(value) > MAX_CLAIM_VALUE_LENGTH:
            raise MalformedRequest(f"claim {name!r} is too long")
        items = [v.strip() for v in value.split(",") if v.strip()]
        claims[name] = items if (name in LIST_CLAIMS or len(items) > 1) else value
    if len(claims) > MAX_CUSTOM_CLAIMS:
        raise MalformedRequest(f"at most {MAX_CUSTOM_CLAIMS} custom claims")
    return claims


def issue_token(
    keys: KeyStore,
    *,
    subject: str,
    issuer: str,
    audience: str,
    ttl_seconds: int,
    max_ttl_seconds: int,
    claims: dict[str, Any] | None = None,
    task: dict[str, Any] | None = None,
    now: float | None = None,
) -> IssuedToken:
    """Sign a token for `subject` (a SPIFFE ID) valid for `ttl_seconds` (at most `max_ttl_seconds`).

    `task` holds the task claims of a token exchange (TASK_CLAIM_NAMES only); nobody else can set them."""
    workload = parse_spiffe_id(subject)
    if not 0 < ttl_seconds <= max_ttl_seconds:
        raise MalformedRequest(f"ttl must be between 1 and {max_ttl_seconds} seconds")
    extra = dict(claims or {})
    if RESERVED_CLAIMS & extra.keys():
        raise MalformedRequest(f"claims {sorted(RESERVED_CLAIMS & extra.keys())} are set by ztai")
    if task is not None:
        if set(task) - TASK_CLAIM_NAMES:
            raise MalformedRequest(f"not task claims: {sorted(set(task) - TASK_CLAIM_NAMES)}")
        extra.update(task)
    issued_at = int(now if now is not None else time.time())
    jti = secrets.token_hex(16)  # hex: never starts with "-", which a CLI would read as an option
    payload = {
        **extra,
        "iss": issuer,
        "sub": workload.uri,
        "aud": audience,
        "iat": issued_at,
        "nbf": issued_at,
        "exp": issued_at + ttl_seconds,
        "jti": jti,
        "kind": workload.kind,
        "tenant": workload.trust_domain,
    }
    key = keys.active
    token = jwt.encode(payload, key.private_key, algorithm="EdDSA", headers={"kid": key.kid, "typ": "JWT"})
    return IssuedToken(
        token, jti, workload.uri, workload.kind, workload.trust_domain, issued_at + ttl_seconds
    )
