"""SPIFFE IDs for ztai principals: `spiffe://<trust-domain>/<kind>/<name>[/...]`.

Parsing is delegated to the `spiffe` package; on top of it we apply the stricter rules of the SPIFFE ID
spec it leaves out (lowercase trust domain, segment characters, length) and ztai's own shape (the first
path segment names the principal kind).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from spiffe import SpiffeId
from spiffe.errors import PySpiffeError

from ztai.errors import AuthenticationError

KINDS = ("user", "agent", "service", "model")
MAX_SPIFFE_ID_LENGTH = 2048
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]+$")
_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass(frozen=True, slots=True)
class WorkloadId:
    """A parsed, validated principal identity."""

    uri: str
    trust_domain: str
    kind: str
    name: str  # the rest of the path after the kind, e.g. "alice" or "team/bot"


def parse_spiffe_id(uri: str) -> WorkloadId:
    """Parse and validate a ztai principal's SPIFFE ID. Raises AuthenticationError when malformed."""
    if len(uri) > MAX_SPIFFE_ID_LENGTH:
        raise AuthenticationError("malformed SPIFFE ID: too long", code="invalid_subject")
    try:
        parsed = SpiffeId(uri)
    except PySpiffeError as exc:
        raise AuthenticationError(f"malformed SPIFFE ID: {exc}", code="invalid_subject") from None
    # The spiffe package lowercases the trust domain; the spec says an uppercase one is invalid.
    trust_domain = uri.removeprefix("spiffe://").split("/", 1)[0]
    segments = parsed.path.split("/")[1:]
    if not _TRUST_DOMAIN.match(trust_domain) or not all(_SEGMENT.match(s) for s in segments):
        raise AuthenticationError("malformed SPIFFE ID: invalid characters", code="invalid_subject")
    if len(segments) < 2 or segments[0] not in KINDS:
        raise AuthenticationError(
            f"malformed SPIFFE ID: path must be /<kind>/<name> with kind one of {', '.join(KINDS)}",
            code="invalid_subject",
        )
    return WorkloadId(uri=uri, trust_domain=trust_domain, kind=segments[0], name="/".join(segments[1:]))
