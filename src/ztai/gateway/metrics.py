"""Prometheus metrics: requests, decisions by effect, and latency per pipeline stage.

The audit log's own (checkpoint failures, coverage, witness exports) are in `ztai.audit.metrics`, which
knows no HTTP; they are in the same registry and exposed here too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as prometheus_multiprocess

_STAGE_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.5,
    1,
    5,
    30,
)

REQUESTS = Counter("ztai_requests_total", "Requests handled, by route and status", ["route", "status"])
DECISIONS = Counter("ztai_decisions_total", "Policy decisions, by action and effect", ["action", "effect"])
STAGE_SECONDS = Histogram(
    "ztai_stage_seconds", "Time spent in each pipeline stage", ["stage"], buckets=_STAGE_BUCKETS
)
UPSTREAM_ERRORS = Counter("ztai_upstream_errors_total", "Failed upstream calls", ["upstream"])
MCP_MESSAGES = Counter(
    "ztai_mcp_messages_total",
    "MCP messages handled, by server, method and effect",
    ["server", "method", "effect"],
)
POLICY_RELOADS = Counter("ztai_policy_reloads_total", "Policy reload requests handled, by result", ["result"])
# 1 for the policy revision a worker decides with (one series per worker with several workers).
POLICY_REVISION = Gauge(
    "ztai_policy_revision", "The active policy revision (1)", ["revision"], multiprocess_mode="liveall"
)
AUTH_FAILURES = Counter("ztai_auth_failures_total", "Failed authentications, by reason", ["reason"])
AUTH_FAILURES_UNAUDITED = Counter(
    "ztai_auth_failures_unaudited_total",
    "Failed authentications counted in a summary instead of an audit event each (rate limit)",
)

# Bound children, so the hot path does no label lookups.
STAGE = {
    stage: STAGE_SECONDS.labels(stage)
    for stage in ("read", "authenticate", "inspect", "decide", "audit", "upstream", "total")
}


def set_policy_revision(revision: str, previous: str | None = None) -> None:
    if previous is not None and previous != revision:
        POLICY_REVISION.labels(previous).set(0)
    POLICY_REVISION.labels(revision).set(1)


def render() -> bytes:
    """The exposition text; aggregates all workers when running with several (multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest()


def route_label(scope: Mapping[str, Any]) -> str | None:
    """The matched route's template with its mount prefix (`/oauth/token`, `/mcp/{server}`), not the raw
    path: ids in paths must not grow label sets or logs. None before a route matched."""
    template = getattr(scope.get("route"), "path", None)
    return str(scope.get("root_path", "")) + template if template else None
