"""Prometheus metrics of the audit log: checkpoint failures, coverage, witness exports.

Defined here (the default registry, exposed by the gateway's `/metrics`) so the writer, which knows
nothing of HTTP, can update them. Gauges are derived from the store, so every worker reports the same.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

CHECKPOINT_FAILURES = Counter(
    "ztai_audit_checkpoint_failures_total",
    "Checkpoints that could not be written, by reason",
    ["reason"],
)
UNCOVERED_EVENTS = Gauge(
    "ztai_audit_uncovered_events",
    "Events not yet covered by a signed checkpoint",
    multiprocess_mode="livemax",
)
UNCOVERED_SECONDS = Gauge(
    "ztai_audit_uncovered_seconds",
    "How long the oldest event not covered by a signed checkpoint has waited",
    multiprocess_mode="livemax",
)
LAST_CHECKPOINT = Gauge(
    "ztai_audit_last_checkpoint_timestamp_seconds",
    "When the newest signed checkpoint was written (Unix time)",
    multiprocess_mode="livemax",
)
WITNESS_EXPORTS = Counter(
    "ztai_audit_witness_exports_total",
    "Checkpoints sent to a witness, by witness and result (ok, failed: retried, dropped: queue full)",
    ["witness", "result"],
)
WITNESS_PENDING = Gauge(
    "ztai_audit_witness_pending",
    "Checkpoints waiting to reach a witness",
    ["witness"],
    multiprocess_mode="livesum",
)
