"""Running the configured detectors over the texts of a request or response.

The inspector turns findings into the `context.content` record Cedar sees, so policy — not the
detectors — decides what happens (allow, redact, require approval, deny).
"""

from __future__ import annotations

import hashlib
import importlib
import secrets
import threading
from collections import OrderedDict
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


# Registry detectors whose findings are a pure function of (text, source): their results may be cached.
# The canary detector is not (its findings depend on the canaries issued so far).
PURE_DETECTORS: frozenset[str] = frozenset({"injection", "pii", "secrets"})

# Defaults of `detect.scan_cache_entries` / `detect.scan_cache_chars` (config.DetectSettings).
SCAN_CACHE_ENTRIES = 4096
SCAN_CACHE_CHARS = 1_048_576


def load_detector(name: str, options: Mapping[str, Any] | None = None) -> Detector:
    """The detector `name`, constructed with `options` (keyword arguments, e.g. `detect.pii`'s)."""
    if name not in DETECTORS:
        raise ConfigError(f"unknown detector {name!r}; known: {', '.join(DETECTORS)}")
    module_name, class_name = DETECTORS[name]
    detector: Detector = getattr(importlib.import_module(module_name), class_name)(**(options or {}))
    # Kept so that another process (the gateway's scanning worker) can build the same detector.
    detector.options = dict(options or {})  # type: ignore[attr-defined]
    return detector


def detector_options(detector: Detector) -> dict[str, Any]:
    """The options a registry detector was loaded with (empty when it was built otherwise)."""
    options: dict[str, Any] = getattr(detector, "options", {})
    return options


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


def cacheable(detector: Detector) -> bool:
    """Whether `detector`'s findings depend only on (text, source), so the inspector may cache them: its
    `cacheable` attribute when it has one, else whether it is one of the registry's pure detectors (the
    registry's own class, not just its name)."""
    declared = getattr(detector, "cacheable", None)
    if declared is not None:
        return bool(declared)
    entry = DETECTORS.get(detector.name)
    return (
        detector.name in PURE_DETECTORS
        and entry is not None
        and (type(detector).__module__, type(detector).__name__) == entry
    )


class ScanCache:
    """A bounded, thread-safe LRU map (detector, source, text) -> findings.

    Chat requests resend the whole conversation (system prompt, earlier turns) on every turn, so the same
    texts come back again and again. Texts up to `_INLINE_CHARS` characters are their own key; longer ones
    are keyed by a keyed BLAKE2b digest (a per-process random key: no one can aim collisions at it) and
    their length. Bounded by `max_entries` and by `max_chars`, the characters held in keys plus a charge
    per stored finding; results with very many findings are not kept.
    """

    _INLINE_CHARS = 256
    _DIGEST_CHARS = 48  # what a hashed key is charged
    _FINDING_CHARS = 64  # what a stored finding is charged
    _MAX_FINDINGS = 256

    def __init__(self, max_entries: int = SCAN_CACHE_ENTRIES, max_chars: int = SCAN_CACHE_CHARS) -> None:
        self.max_entries = max(0, max_entries)
        self.max_chars = max(0, max_chars)
        self._entries: OrderedDict[tuple[str, str, str | bytes], tuple[tuple[Finding, ...], int]] = (
            OrderedDict()
        )
        self._chars = 0
        self._lock = threading.Lock()
        self._key = secrets.token_bytes(32)
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def chars(self) -> int:
        """What the entries are charged in all (see the class docstring)."""
        return self._chars

    def key(self, detector: str, source: Source, text: str) -> tuple[tuple[str, str, str | bytes], int]:
        """(the cache key, its charge in characters without the findings)."""
        if len(text) <= self._INLINE_CHARS:
            return (detector, source, text), len(text) + len(detector)
        digest = hashlib.blake2b(
            text.encode("utf-8", "surrogatepass"), key=self._key, digest_size=24
        ).digest() + len(text).to_bytes(8, "little")
        return (detector, source, digest), self._DIGEST_CHARS + len(detector)

    def get(self, key: tuple[str, str, str | bytes]) -> list[Finding] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return list(entry[0])

    def put(self, key: tuple[str, str, str | bytes], key_chars: int, findings: Sequence[Finding]) -> None:
        cost = key_chars + self._FINDING_CHARS * len(findings)
        if len(findings) > self._MAX_FINDINGS or cost > self.max_chars or self.max_entries == 0:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._chars -= old[1]
            self._entries[key] = (tuple(findings), cost)
            self._chars += cost
            while len(self._entries) > self.max_entries or self._chars > self.max_chars:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._chars -= dropped

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._chars = 0


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
            "injection_confident": any(f.confident for f in injection),
            "pii_types": sorted({f.type for f in pii}),
            "pii_identifying_types": sorted({f.type for f in pii if f.identifying}),
            "secret_types": sorted({f.type for f in findings if f.detector == "secrets"}),
            "obfuscation": sorted({f.type for f in findings if f.detector == "obfuscation"}),
            "canary": any(f.detector == "canary" for f in findings),
        }


class Inspector:
    def __init__(
        self,
        names: Sequence[str],
        detectors: Sequence[Detector] | None = None,
        cache_entries: int = SCAN_CACHE_ENTRIES,
        cache_chars: int = SCAN_CACHE_CHARS,
    ) -> None:
        """The named detectors (loaded from the registry), or the given detector objects.

        The findings of cacheable detectors (`cacheable`) are kept in a `ScanCache` of at most
        `cache_entries` entries and `cache_chars` characters (0 entries: no cache)."""
        self.detectors = list(detectors) if detectors is not None else [load_detector(name) for name in names]
        self.names = [detector.name for detector in self.detectors]
        self._cacheable = [cacheable(detector) for detector in self.detectors]
        self.cache: ScanCache | None = (
            ScanCache(cache_entries, cache_chars) if cache_entries > 0 and any(self._cacheable) else None
        )

    def warm(self) -> None:
        """Load every detector's models now (see `warm`)."""
        for detector in self.detectors:
            warm(detector)

    def scan(self, text: str, source: Source, exclude: Sequence[str] = ()) -> list[Finding]:
        findings: list[Finding] = []
        cache = self.cache
        for k, detector in enumerate(self.detectors):
            if detector.name in exclude:
                continue
            if cache is None or not self._cacheable[k]:
                findings.extend(detector.scan(text, source))
                continue
            # one key per detector position: two detectors of one name in one inspector stay apart
            key, key_chars = cache.key(f"{k}:{detector.name}", source, text)
            found = cache.get(key)
            if found is None:
                found = detector.scan(text, source)
                cache.put(key, key_chars, found)
            findings.extend(found)
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
