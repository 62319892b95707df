"""The one interface every content detector implements: `scan(text, source) -> list[Finding]`.

Detectors only report; they never decide. Findings become Cedar context (`context.content`) and the
policy decides the effect (allow, redact, require approval, deny).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

Source = Literal["user", "document", "tool_output", "model_output"]
SOURCES: tuple[Source, ...] = ("user", "document", "tool_output", "model_output")

# Types whose value identifies or reaches a person on its own: what the shipped policy tokenizes
# (`Finding.identifying`, `context.content.pii_identifying_types`; setting `detect.pii.identifying_types`).
# A STREET_ADDRESS counts only with a house number, a PERSON only at high precision (`PERSON_MIN_SCORE`,
# a name-like shape, two name words or an honorific). Countries, cities, companies, languages and
# nationalities (NRP), titles, dates, ages, ZIP codes, URLs and IP addresses are reported, not identifying.
IDENTIFYING_TYPES: tuple[str, ...] = (
    "EMAIL_ADDRESS",
    "PHONE_NUMBER",
    "US_SSN",
    "US_DRIVER_LICENSE",
    "CREDIT_CARD",
    "IBAN_CODE",
    "STREET_ADDRESS",
    "PERSON",
)
# Tagger confidence from which a name-shaped PERSON span counts as identifying; calibrated on held-out
# presidio templates by scripts/eval_pii_alteration.py (docs/benchmarks.md).
PERSON_MIN_SCORE = 0.9


@dataclass(frozen=True, slots=True)
class Finding:
    """Something a detector found in a text.

    `start`/`end` are offsets in Python characters (code points) into the text as given to `scan`, so
    `text[start:end]` is the finding. `evidence` explains the finding without repeating a secret value
    (a rule name, a masked preview, a feature), so findings can be logged and audited.
    """

    detector: str  # "injection", "pii", "secrets", "canary", "obfuscation"
    type: str  # e.g. "prompt_injection", "EMAIL_ADDRESS" (Presidio's names), "AWS_ACCESS_KEY"
    start: int
    end: int
    score: float  # 0..1; for the injection detector a calibrated probability
    evidence: str = ""
    # Personal data only: whether the value identifies or reaches a person on its own (an e-mail, a phone
    # number, a card, a street address with a number, a name at high precision). False marks a finding
    # reported as context (a country, a company, a language, a date): redaction leaves it in place and it
    # is not in `context.content.pii_identifying_types`. Other detectors leave it True.
    identifying: bool = True
    # Injection only: the probability reached the detector's refuse threshold (calibrated for <= 0.1% false
    # positives; `context.content.injection_confident`), not just its flag threshold.
    confident: bool = False


@runtime_checkable
class Detector(Protocol):
    name: str

    def scan(self, text: str, source: Source) -> list[Finding]:
        """Findings in `text`, which came from `source`. Must be safe on any input (any length, any
        Unicode) and never raise on content; bounded work per character."""
        ...


class Span(Protocol):
    @property
    def start(self) -> int: ...
    @property
    def end(self) -> int: ...


SpanT = TypeVar("SpanT", bound=Span)


def disjoint_by_rank(candidates: Iterable[tuple[tuple[Any, ...], SpanT]]) -> list[SpanT]:
    """The greedy choice of non-overlapping spans: candidates in ascending rank, each kept unless it
    overlaps one kept before (empty spans are dropped); returned sorted by start. Work: one sort plus, per
    candidate, a look at its own span in an occupancy map (C speed), so the cost is linear in the total
    length of the spans, never quadratic in their number."""
    ranked = sorted(candidates, key=lambda item: item[0])
    if not ranked:
        return []
    taken = bytearray(max(span.end for _, span in ranked))
    chosen: list[SpanT] = []
    for _, span in ranked:
        start, end = span.start, span.end
        if end <= start or taken.find(1, start, end) != -1:
            continue
        taken[start:end] = b"\x01" * (end - start)
        chosen.append(span)
    chosen.sort(key=lambda span: span.start)
    return chosen
