"""Running the configured detectors over the texts of a request or response.

The inspector turns findings into the `context.content` record Cedar sees, so policy — not the
detectors — decides what happens (allow, redact, require approval, deny).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ztai.detect.base import Detector, Finding, Source
from ztai.detect.redact import span_hash
from ztai.errors import ConfigError

# name -> (module, class); imported on first use so a deployment only loads what it configures.
DETECTORS: dict[str, tuple[str, str]] = {
    "injection": ("ztai.detect.injection", "InjectionDetector"),
    "pii": ("ztai.detect.pii", "PiiDetector"),
    "secrets": ("ztai.detect.secrets", "SecretsDetector"),
    "canary": ("ztai.detect.canary", "CanaryDetector"),
}


def is_confident(finding: Finding) -> bool:
    """An injection finding at the detector's refuse threshold (its evidence says `p=0.97 confident`)."""
    return finding.evidence.split(" ", 2)[1:2] == ["confident"]


def load_detector(name: str, options: Mapping[str, Any] | None = None) -> Detector:
    """The detector `name`, constructed with `options` (keyword arguments, e.g. `detect.pii`'s)."""
    if name not in DETECTORS:
        raise ConfigError(f"unknown detector {name!r}; known: {', '.join(DETECTORS)}")
    module_name, class_name = DETECTORS[name]
    detector: Detector = getattr(importlib.import_module(module_name), class_name)(**(options or {}))
    return detector


_WARM_UP_TEXT = "Warm-up: Maria Lopez <maria@example.com>, 221B Baker Street, London. Ignore nothing."


def warm(detector: Detector) -> None:
    """Load what a detector loads lazily (models, gazetteers, compiled patterns) now: its `warm()` when
    it has one, else one scan of a short text. A gateway warms its detectors at start so that the first
    request does not pay for it."""
    warm_up = getattr(detector, "warm", None)
    if callable(warm_up):
        warm_up()
    else:
        detector.scan(_WARM_UP_TEXT, "user")


@dataclass(frozen=True)
class ScannedText:
    source: Source
    text: str
    findings: list[Finding]


@dataclass
class Inspection:
    """Everything the detectors found in one direction of one request."""

    scanned: list[ScannedText] = field(default_factory=list)

    @property
    def findings(self) -> list[Finding]:
        return [finding for item in self.scanned for finding in item.findings]

    def context(self) -> dict[str, Any]:
        """The `context.content` record for Cedar (scores as integer percent: Cedar has no floats)."""
        findings = self.findings
        injection = [f for f in findings if f.detector == "injection"]
        pii = [f for f in findings if f.detector == "pii"]
        return {
            "injection_score": max((round(f.score * 100) for f in injection), default=0),
            "injection_flagged": bool(injection),
            "injection_confident": any(is_confident(f) for f in injection),
            "pii_types": sorted({f.type for f in pii}),
            "pii_identifying_types": sorted({f.type for f in pii if f.identifying}),
            "secret_types": sorted({f.type for f in findings if f.detector == "secrets"}),
            "obfuscation": sorted({f.type for f in findings if f.detector == "obfuscation"}),
            "canary": any(f.detector == "canary" for f in findings),
        }


class Inspector:
    def __init__(self, names: Sequence[str], detectors: Sequence[Detector] | None = None) -> None:
        """The named detectors (loaded from the registry), or the given detector objects."""
        self.detectors = list(detectors) if detectors is not None else [load_detector(name) for name in names]
        self.names = [detector.name for detector in self.detectors]

    def warm(self) -> None:
        """Load every detector's models now (see `warm`)."""
        for detector in self.detectors:
            warm(detector)

    def scan(self, text: str, source: Source, exclude: Sequence[str] = ()) -> list[Finding]:
        findings: list[Finding] = []
        for detector in self.detectors:
            if detector.name not in exclude:
                findings.extend(detector.scan(text, source))
        return findings

    def inspect(self, texts: Iterable[tuple[Source, str]]) -> Inspection:
        inspection = Inspection()
        for source, text in texts:
            if text:
                inspection.scanned.append(ScannedText(source, text, self.scan(text, source)))
        return inspection


def audit_findings(inspection: Inspection, key: bytes) -> list[dict[str, Any]]:
    """Findings as audit records: detector, type, source, span and a keyed hash — never the value."""
    return [
        {
            "detector": f.detector,
            "type": f.type,
            "source": item.source,
            "start": f.start,
            "end": f.end,
            "score": round(f.score, 3),
            "hash": span_hash(item.text[f.start : f.end], key),
        }
        for item in inspection.scanned
        for f in item.findings
    ]
