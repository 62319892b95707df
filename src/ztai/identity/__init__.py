"""Identity: signing keys and JWKS, short-lived SPIFFE-style tokens, verification, revocation."""

from ztai.identity.keys import KeyStore
from ztai.identity.revocation import RevocationList
from ztai.identity.spiffe_ids import WorkloadId, parse_spiffe_id
from ztai.identity.tokens import IssuedToken, Principal, issue_token, parse_claims
from ztai.identity.verifier import TokenVerifier

__all__ = [
    "IssuedToken",
    "KeyStore",
    "Principal",
    "RevocationList",
    "TokenVerifier",
    "WorkloadId",
    "issue_token",
    "parse_claims",
    "parse_spiffe_id",
]
