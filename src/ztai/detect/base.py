"""The one interface every content detector implements: `scan(text, source) -> list[Finding]`.

Detectors only report; they never decide. Findings become Cedar context (`context.content`) and the
policy decides the effect (allow, redact, require approval, deny).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

Source = Literal["user", "document", "tool_output", "model_output"]
SOURCES: tuple[Source, ...] = ("user", "document", "tool_output", "model_output")


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


@runtime_checkable
class Detector(Protocol):
    name: str

    def scan(self, text: str, source: Source) -> list[Finding]:
        """Findings in `text`, which came from `source`. Must be safe on any input (any length, any
        Unicode) and never raise on content; bounded work per character."""
        ...
