"""Prometheus metrics: requests, decisions by effect, and latency per pipeline stage.

The audit log's own (checkpoint failures, coverage, witness exports) are in `ztai.audit.metrics`, which
knows no HTTP; they are in the same registry and exposed here too.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
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

# Bound children, so the hot path does no label lookups.
STAGE = {
    stage: STAGE_SECONDS.labels(stage)
    for stage in ("read", "authenticate", "inspect", "decide", "audit", "upstream", "total")
}


def render() -> bytes:
    """The exposition text; aggregates all workers when running with several (multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest()
