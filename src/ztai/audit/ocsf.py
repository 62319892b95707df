"""OCSF-style JSON lines for SIEMs (API Activity, class 6003), appended to a file after each commit."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

OCSF_VERSION = "1.3.0"
_DENIED = ("deny", "step_up")


# Decision records' and answers' fields carried along as they are (the SIEM keeps what was decided on).
_UNMAPPED = (
    "reasons",
    "errors",
    "obligations",
    "policy_revision",
    "schema_revision",
    "policy",
    "input",
    "request",
    "decision_id",
    "usage",
)


def to_ocsf(seq: int, event: dict[str, Any]) -> dict[str, Any]:
    denied = event.get("effect") in _DENIED
    return {
        "class_uid": 6003,
        "class_name": "API Activity",
        "category_uid": 6,
        "category_name": "Application Activity",
        "activity_id": 99,
        "activity_name": event["kind"],
        "type_uid": 600399,
        "time": int(datetime.fromisoformat(event["time"]).timestamp() * 1000),
        "severity_id": 3 if denied else 1,
        "status_id": 2 if denied else 1,
        "status": "Failure" if denied else "Success",
        "status_detail": event.get("effect", ""),
        "actor": {"user": {"uid": event.get("principal", ""), "org": {"uid": event.get("tenant", "")}}},
        "api": {"operation": event.get("action", "")},
        "resources": [{"uid": event.get("resource", "")}],
        "metadata": {
            "version": OCSF_VERSION,
            "uid": event["id"],
            "sequence": seq,
            "log_name": "ztai-audit",
            "product": {"name": "ztai", "vendor_name": "ztai"},
        },
        "unmapped": {k: event[k] for k in _UNMAPPED if k in event},
    }


class OcsfFileExporter:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = path.open("ab")

    def export(self, batch: list[tuple[int, dict[str, Any]]]) -> None:
        self._handle.write(b"".join(orjson.dumps(to_ocsf(seq, e)) + b"\n" for seq, e in batch))
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()
