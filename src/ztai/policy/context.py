"""The request context Cedar sees, always complete (every attribute the schema declares is present)."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Mapping
from typing import Any

from ztai.policy.engine import ENTITY_TYPES, Request

TOKEN_SETS = ("models", "groups", "scopes", "tools", "roles")


def default_context() -> dict[str, Any]:
    return {
        "tenant": "",
        "principal_kind": "",
        "token": {**{name: [] for name in TOKEN_SETS}, "issuer": ""},
        "risk_score": 0,
        "network": {"ip": ""},
        "time": clock(),
        "request": {"route": "", "stream": False, "bytes": 0},
        "content": {
            "injection_score": 0,
            "injection_flagged": False,
            "injection_confident": False,
            "pii_types": [],
            "pii_identifying_types": [],
            "secret_types": [],
            "obfuscation": [],
            "canary": False,
        },
        "delegation": {"task": "", "depth": 0, "subject": "", "actor": "", "actors": []},
        "session": {
            "tainted": False,
            "flagged": False,
            "max_injection_score": 0,
            "untrusted_sources": [],
            "calls": 0,
        },
        "tool": {
            "server": "",
            "name": "",
            "granted": False,
            "read_only": False,
            "destructive": True,
            "open_world": True,
            "idempotent": False,
            "inferred": True,
            "sensitive_args": [],
            "args_from_untrusted": [],
            "args_from_suspicious": [],
            "args_unseen": [],
            "action_from_suspicious": False,
            "egress_hosts": [],
        },
        "exchange": {
            "tools": [],
            "unlisted_tools": [],
            "egress": [],
            "delegated": False,
            "depth": 0,
            "ttl_seconds": 0,
        },
        "input": {},
    }


def clock(now: float | None = None) -> dict[str, int]:
    epoch = time.time() if now is None else now
    moment = time.gmtime(epoch)
    return {"epoch": int(epoch), "hour": moment.tm_hour, "weekday": moment.tm_wday}


def token_context(claims: Mapping[str, Any], issuer: str) -> dict[str, Any]:
    """Project a token's claims onto the schema's TokenClaims record (sets of strings)."""
    token: dict[str, Any] = {"issuer": issuer}
    for name in TOKEN_SETS:
        value = claims.get(name)
        if isinstance(value, str):
            token[name] = [value]
        elif isinstance(value, list):
            token[name] = [str(v) for v in value if isinstance(v, str | int)]
        else:
            token[name] = []
    return token


def principal_context(
    tenant: str,
    principal_kind: str,
    claims: Mapping[str, Any],
    issuer: str,
    *,
    ip: str,
    route: str,
    stream: bool = False,
    size: int = 0,
) -> dict[str, Any]:
    """The complete context of a request by a verified principal: defaults, then who asks (tenant, kind,
    token claims), from where and when, and the request's shape. Callers add what their stage learns."""
    context = default_context()
    context["tenant"] = tenant
    context["principal_kind"] = principal_kind
    context["token"] = token_context(claims, issuer)
    context["network"] = {"ip": ip}
    context["request"] = {"route": route, "stream": stream, "bytes": size}
    return context


def merge_context(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults with `overrides` deep-merged on top (used by policy tests and what-if tools)."""
    merged = default_context()
    _deep_merge(merged, overrides)
    return merged


def _deep_merge(target: dict[str, Any], overrides: Mapping[str, Any]) -> None:
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _deep_merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def principal_request(
    spiffe_id: str, kind: str, action: str, resource_type: str, resource_id: str, context: dict[str, Any]
) -> Request:
    return Request(ENTITY_TYPES.get(kind, "User"), spiffe_id, action, resource_type, resource_id, context)


def model_entities(models: Iterable[tuple[str, str]]) -> list[dict[str, Any]]:
    """Static Cedar entities for the configured models: (model name, upstream name) pairs."""
    return [
        {"uid": {"type": "Model", "id": name}, "attrs": {"name": name, "upstream": upstream}, "parents": []}
        for name, upstream in models
    ]
