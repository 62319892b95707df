"""Redaction and reversible tokenization of findings.

`redact` replaces each finding with a typed placeholder (`<EMAIL_ADDRESS_1>`); the same value gets the
same placeholder within one vault, so the model can still refer to it consistently. With a `TokenVault`
the real values are kept (encrypted) for the session, and `restore` puts them back into the model's
answer for a caller who may see them. Offsets are Python string indices (code points), so multi-byte
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

from ztai.detect.base import Finding

_PLACEHOLDER = re.compile(r"<([A-Z][A-Z0-9_]{0,40})_(\d{1,6})>")
# When findings overlap, the more specific kind wins.
_PRIORITY = {"secrets": 3, "canary": 3, "pii": 2}


def select_spans(findings: Iterable[Finding]) -> list[Finding]:
    """Non-overlapping findings to replace: higher priority first, then longer, then earlier."""
    candidates = sorted(
        (f for f in findings if f.detector in _PRIORITY and f.end > f.start),
        key=lambda f: (-_PRIORITY[f.detector], -(f.end - f.start), f.start),
    )
    chosen: list[Finding] = []
    for finding in candidates:
        if all(finding.end <= other.start or finding.start >= other.end for other in chosen):
            chosen.append(finding)
    return sorted(chosen, key=lambda f: f.start)


@dataclass
class TokenVault:
    """One session's placeholder <-> value table. Values are held encrypted (AES-GCM) in memory and in
    `export()`, so a vault written to the store is encrypted at rest; the key stays with the deployment."""

    key: bytes = field(default_factory=lambda: AESGCM.generate_key(bit_length=256), repr=False)
    _by_digest: dict[bytes, str] = field(default_factory=dict, repr=False)
    _sealed: dict[str, bytes] = field(default_factory=dict, repr=False)
    _counters: dict[str, int] = field(default_factory=dict, repr=False)
    _restorable: set[str] = field(default_factory=set, repr=False)

    def placeholder_for(self, kind: str, value: str, *, restorable: bool = True) -> str:
        """The placeholder for `value`; `restore` gives restorable ones back (the caller's own values),
        the others stay redacted (secrets, or what the model produced by itself)."""
        digest = hashlib.sha256(kind.encode() + b"\0" + value.encode()).digest()
        existing = self._by_digest.get(digest)
        if existing is not None:
            return existing
        number = self._counters.get(kind, 0) + 1
        self._counters[kind] = number
        placeholder = f"<{kind}_{number}>"
        nonce = os.urandom(12)
        self._sealed[placeholder] = nonce + AESGCM(self.key).encrypt(
            nonce, value.encode(), placeholder.encode()
        )
        self._by_digest[digest] = placeholder
        if restorable:
            self._restorable.add(placeholder)
        return placeholder

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


def redact(
    text: str, findings: Iterable[Finding], vault: TokenVault | None = None, *, restorable: bool = False
) -> tuple[str, list[Finding]]:
    """Replace findings with typed placeholders. Returns the new text and the findings replaced.

    With `restorable`, personal data can be put back by `restore`; secrets never are."""
    vault = vault if vault is not None else TokenVault()
    chosen = select_spans(findings)
    pieces: list[str] = []
    cursor = 0
    for finding in chosen:
        pieces.append(text[cursor : finding.start])
        keep = restorable and finding.detector == "pii"
        pieces.append(vault.placeholder_for(finding.type, text[finding.start : finding.end], restorable=keep))
        cursor = finding.end
    pieces.append(text[cursor:])
    return "".join(pieces), chosen


def restore(text: str, vault: TokenVault) -> str:
    """Put the vault's values back in place of its placeholders (unknown placeholders stay)."""

    def replace(match: re.Match[str]) -> str:
        value = vault.value_of(match.group(0))
        return value if value is not None else match.group(0)

    return _PLACEHOLDER.sub(replace, text)


def span_hash(value: str, key: bytes) -> str:
    """A keyed fingerprint of a finding's value for audit records: equal values correlate across
    events, but short values (an SSN) cannot be brute-forced from the log without the key."""
    return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:16]
