"""Redaction and reversible tokenization of findings.

`redact` replaces each finding with a typed placeholder (`<EMAIL_ADDRESS_1>`); the same value gets the
same placeholder within one vault, so the model can still refer to it consistently. With a `TokenVault`
the real values are kept (encrypted) and `restore` puts them back into the model's answer for a caller
who may see them. A `TokenVault` lives for one request; `ztai.detect.vault` shares one across a session's
requests and keeps it encrypted at rest. Offsets are Python string indices (code points), so multi-byte
text is handled by construction.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ztai.detect.base import Finding, disjoint_by_rank

_PLACEHOLDER = re.compile(r"<([A-Z][A-Z0-9_]{0,40})_(\d{1,6})>")
# When findings overlap, the more specific kind wins.
_PRIORITY = {"secrets": 3, "canary": 3, "pii": 2}


def replaceable_findings(findings: Iterable[Finding]) -> list[Finding]:
    """The findings redaction replaces: secrets and canaries, and personal data that identifies or reaches
    a person (`Finding.identifying`; countries, companies, languages, dates stay in the text)."""
    return [f for f in findings if f.detector in _PRIORITY and f.identifying]


def select_spans(findings: Iterable[Finding]) -> list[Finding]:
    """Non-overlapping replaceable findings: higher priority first, then longer, then earlier (linear in
    the findings' total length)."""
    return disjoint_by_rank(
        ((-_PRIORITY[f.detector], f.start - f.end, f.start), f) for f in replaceable_findings(findings)
    )


@dataclass
class TokenVault:
    """One session's placeholder <-> value table. Values are held encrypted (AES-GCM) in memory and in
    `export()`, so a vault written to the store is encrypted at rest; the key stays with the deployment."""

    key: bytes = field(default_factory=lambda: AESGCM.generate_key(bit_length=256), repr=False)
    _by_digest: dict[bytes, str] = field(default_factory=dict, repr=False)
    _sealed: dict[str, bytes] = field(default_factory=dict, repr=False)
    _counters: dict[str, int] = field(default_factory=dict, repr=False)
    _restorable: set[str] = field(default_factory=set, repr=False)

    # Set by a session vault: placeholders are numbered by the shared store, never here.
    assigned_elsewhere: bool = False

    def placeholder_for(self, kind: str, value: str, *, restorable: bool = True) -> str:
        """The placeholder for `value`; `restore` gives restorable ones back (the caller's own values),
        the others stay redacted (secrets, or what the model produced by itself)."""
        existing = self._by_digest.get(_digest(kind, value))
        if existing is not None:
            return existing
        if self.assigned_elsewhere:
            raise LookupError(f"no placeholder was assigned for a {kind} value")
        number = self._counters.get(kind, 0) + 1
        self._counters[kind] = number
        placeholder = f"<{kind}_{number}>"
        self.adopt(placeholder, kind, value, restorable=restorable)
        return placeholder

    def adopt(self, placeholder: str, kind: str, value: str, *, restorable: bool) -> None:
        """Take over a placeholder assigned elsewhere (a session vault's store) for `value`."""
        nonce = os.urandom(12)
        self._sealed[placeholder] = nonce + AESGCM(self.key).encrypt(
            nonce, value.encode(), placeholder.encode()
        )
        self._by_digest[_digest(kind, value)] = placeholder
        if restorable:
            self._restorable.add(placeholder)

    def value_of(self, placeholder: str) -> str | None:
        """The value behind a restorable placeholder (None for unknown or redacted-for-good ones)."""
        sealed = self._sealed.get(placeholder)
        if sealed is None or placeholder not in self._restorable:
            return None
        return AESGCM(self.key).decrypt(sealed[:12], sealed[12:], placeholder.encode()).decode()

    def export(self) -> dict[str, bytes]:
        """The sealed entries (safe to store: ciphertext bound to its placeholder)."""
        return dict(self._sealed)

    def __len__(self) -> int:
        return len(self._sealed)


@dataclass(frozen=True, slots=True)
class Replacement:
    """One value to replace: its kind (the finding's type), the value, and whether it may be restored."""

    kind: str
    value: str
    restorable: bool


def replacements(text: str, findings: Iterable[Finding], *, restorable: bool = False) -> list[Replacement]:
    """What `redact` will replace in `text` (for assigning placeholders ahead, in a session vault)."""
    return [
        Replacement(f.type, text[f.start : f.end], restorable and f.detector == "pii")
        for f in select_spans(findings)
    ]


def redact(
    text: str, findings: Iterable[Finding], vault: TokenVault | None = None, *, restorable: bool = False
) -> tuple[str, list[Finding]]:
    """Replace findings with typed placeholders. Returns the new text and the findings replaced.

    With `restorable`, personal data can be put back by `restore`; secrets never are."""
    vault = vault if vault is not None else TokenVault()
    chosen = select_spans(findings)
    pieces: list[str] = []
    cursor = 0
    for finding in chosen:  # the same items as `replacements(text, findings)`, without selecting twice
        pieces.append(text[cursor : finding.start])
        value = text[finding.start : finding.end]
        pieces.append(
            vault.placeholder_for(finding.type, value, restorable=restorable and finding.detector == "pii")
        )
        cursor = finding.end
    pieces.append(text[cursor:])
    return "".join(pieces), chosen


def placeholders_in(text: str) -> set[str]:
    """The vault placeholders (`<KIND_N>`) written in `text`."""
    return {match.group(0) for match in _PLACEHOLDER.finditer(text)}


def restore(text: str, vault: TokenVault) -> str:
    """Put the vault's values back in place of its placeholders (unknown placeholders stay)."""

    def replace(match: re.Match[str]) -> str:
        value = vault.value_of(match.group(0))
        return value if value is not None else match.group(0)

    return _PLACEHOLDER.sub(replace, text)


def _digest(kind: str, value: str) -> bytes:
    return hashlib.sha256(kind.encode() + b"\0" + value.encode()).digest()


def span_hash(value: str, key: bytes) -> str:
    """A keyed fingerprint of a finding's value for audit records: equal values correlate across
    events, but short values (an SSN) cannot be brute-forced from the log without the key."""
    return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:16]
