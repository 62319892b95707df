"""OCSF-style JSON lines for SIEMs (API Activity, class 6003), appended to a file after each commit.

With `audit.witness.ocsf` each signed checkpoint is written there too (activity `audit.checkpoint`, the
checkpoint under `unmapped.checkpoint`), so the SIEM doubles as a witness (`ztai audit verify --witness`).
"""

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


# The OCSF class of every record ztai exports (API Activity, activity "other": the name says which)
_API_ACTIVITY: dict[str, Any] = {
    "class_uid": 6003,
    "class_name": "API Activity",
    "category_uid": 6,
    "category_name": "Application Activity",
    "activity_id": 99,
}


def to_ocsf(seq: int, event: dict[str, Any]) -> dict[str, Any]:
    denied = event.get("effect") in _DENIED
    alert = event.get("effect") == "alert"  # the audit log's own alerts (audit.checkpoint_failed)
    return {
        **_API_ACTIVITY,
        "activity_name": event["kind"],
        "type_uid": 600399,
        "time": int(datetime.fromisoformat(event["time"]).timestamp() * 1000),
        "severity_id": 4 if alert else 3 if denied else 1,
        "status_id": 2 if denied or alert else 1,
        "status": "Failure" if denied or alert else "Success",
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


def checkpoint_to_ocsf(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """A signed checkpoint (`Checkpoint.to_json()`) as an OCSF record a witness reader recognises."""
    return {
        **_API_ACTIVITY,
        "activity_name": "audit.checkpoint",
        "type_uid": 600399,
        "time": int(datetime.fromisoformat(checkpoint["created_at"]).timestamp() * 1000),
        "severity_id": 1,
        "status_id": 1,
        "status": "Success",
        "metadata": {
            "version": OCSF_VERSION,
            "uid": f"checkpoint-{checkpoint['tree_size']}",
            "sequence": checkpoint["tree_size"],
            "log_name": "ztai-audit",
            "product": {"name": "ztai", "vendor_name": "ztai"},
        },
        "unmapped": {"checkpoint": checkpoint},
    }


class OcsfFileExporter:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = path.open("ab")

    def export(self, batch: list[tuple[int, dict[str, Any]]]) -> None:
        self._handle.write(b"".join(orjson.dumps(to_ocsf(seq, e)) + b"\n" for seq, e in batch))
        self._handle.flush()

    def export_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._handle.write(orjson.dumps(checkpoint_to_ocsf(checkpoint)) + b"\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()
