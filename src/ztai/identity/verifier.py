"""Token verification: ztai's own tokens, external OIDC tokens and SPIFFE JWT-SVIDs.

A token's signature is checked once; the verified principal is cached by the token's hash until the
token expires. Expiry and revocation are still checked on every call, from memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from typing import Any

import jwt
import orjson

from ztai.config import Settings
from ztai.errors import AuthenticationError, ConfigError
from ztai.identity.external import ExternalIssuer, SpiffeTrust
from ztai.identity.keys import KeyStore
from ztai.identity.revocation import RevocationList
from ztai.identity.spiffe_ids import parse_spiffe_id
from ztai.identity.tokens import Principal

_KEY_RELOAD_INTERVAL = 1.0


class TokenVerifier:
    def __init__(self, settings: Settings, keys: KeyStore, revocations: RevocationList) -> None:
        identity = settings.identity
        self._issuer = settings.issuer
        self._audience = identity.audience
        self._algorithms = list(identity.algorithms)
        self._leeway = identity.leeway_seconds
        self._max_bytes = identity.max_token_bytes
        self._max_lifetime = identity.max_ttl_seconds + identity.leeway_seconds
        self._keys = keys
        self._revocations = revocations
        self._external = {
            issuer.issuer: ExternalIssuer(issuer, settings.config_dir, identity.leeway_seconds)
            for issuer in identity.external_issuers
        }
        self._spiffe = {
            bundle.trust_domain: SpiffeTrust(bundle, settings.config_dir)
            for bundle in identity.spiffe_bundles
        }
        if self._issuer in self._external:
            raise ConfigError(
                "identity.external_issuers: an external issuer cannot use ztai's own issuer name"
            )
        self._trust_domain = settings.trust_domain
        self._cache: OrderedDict[bytes, Principal] = OrderedDict()
        self._cache_size = identity.verified_cache_size
        self._keys_checked_at = 0.0

    # Fast path ----------------------------------------------------------------------------------
    def cached(self, token: str) -> Principal | None:
        """The principal for an already-verified token, after expiry and revocation checks."""
        if len(token) > self._max_bytes:
            raise AuthenticationError("token too large", code="token_too_large")
        key = _digest(token)
        principal = self._cache.get(key)
        if principal is not None:
            self._check_live(principal)
            self._cache.move_to_end(key)  # least recently used goes first
        return principal

    def verify(self, token: str) -> Principal:
        """Verify a token completely (signature, claims, subject, revocation). Never blocks on I/O for
        ztai's own tokens; external issuers may fetch their JWKS (use `verify_async` on an event loop)."""
        principal = self.cached(token)
        if principal is None:
            principal = self._verify_signature(token)
            self._check_live(principal)
            self._remember(token, principal)
        return principal

    async def verify_async(self, token: str) -> Principal:
        principal = self.cached(token)
        if principal is not None:
            return principal
        if self._is_own(token):
            return self.verify(token)
        return await asyncio.to_thread(self.verify, token)

    # Details -------------------------------------------------------------------------------------
    def _check_live(self, principal: Principal) -> None:
        if time.time() > principal.expires_at + self._leeway:
            raise AuthenticationError("token expired", code="token_expired")
        if self._revocations.is_revoked(principal.tenant, principal.jti):
            raise AuthenticationError("token revoked", code="token_revoked")
        # A task token dies with any task of its chain (revoking a task revokes its sub-tasks). Only ztai
        # mints task claims: another issuer's `task_chain` means nothing and is not looked at.
        chain = principal.claims.get("task_chain")
        if (
            isinstance(chain, list)
            and principal.issuer == self._issuer
            and self._revocations.is_task_revoked(principal.tenant, (str(task) for task in chain))
        ):
            raise AuthenticationError("token revoked (its task was revoked)", code="token_revoked")

    def _remember(self, token: str, principal: Principal) -> None:
        if self._cache_size == 0:
            return
        self._cache[_digest(token)] = principal
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def _is_own(self, token: str) -> bool:
        try:
            return bool(_unverified_payload(token).get("iss") == self._issuer)
        except AuthenticationError:
            return True  # malformed: rejected inline without I/O

    def _verify_signature(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthenticationError("malformed token", code="malformed_token") from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm.lower() == "none":
            raise AuthenticationError("unsigned tokens are not accepted", code="bad_algorithm")
        issuer = _unverified_payload(token).get("iss")
        try:
            if issuer == self._issuer:
                return self._verify_own(token, header)
            if isinstance(issuer, str) and issuer in self._external:
                return self._verify_external(token, header, self._external[issuer])
            return self._verify_svid(token)
        except jwt.ExpiredSignatureError:
            raise AuthenticationError("token expired", code="token_expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthenticationError("token not yet valid", code="token_not_yet_valid") from None
        except jwt.InvalidAudienceError:
            raise AuthenticationError("token audience is not ztai", code="wrong_audience") from None
        except jwt.InvalidSignatureError:
            raise AuthenticationError("bad token signature", code="bad_signature") from None
        except jwt.InvalidAlgorithmError:
            raise AuthenticationError("token algorithm not allowed", code="bad_algorithm") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthenticationError(f"token lacks claim {exc.claim!r}", code="malformed_token") from None
        except jwt.PyJWTError:
            raise AuthenticationError("invalid token", code="invalid_token") from None

    def _verify_own(self, token: str, header: dict[str, Any]) -> Principal:
        if header.get("alg") not in self._algorithms:
            raise AuthenticationError("token algorithm not allowed", code="bad_algorithm")
        if header.get("alg") != "EdDSA":
            # ztai's keys are Ed25519: PyJWT would raise TypeError (not a PyJWTError) for another alg.
            raise AuthenticationError("token algorithm does not match ztai's keys", code="bad_algorithm")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise AuthenticationError("token has no key id", code="unknown_key")
        key = self._keys.verification_key(kid, self._max_lifetime)
        if key is None and time.monotonic() - self._keys_checked_at > _KEY_RELOAD_INTERVAL:
            # The CLI may have rotated keys since we loaded them.
            self._keys_checked_at = time.monotonic()
            if self._keys.reload_if_changed():
                key = self._keys.verification_key(kid, self._max_lifetime)
        if key is None:
            raise AuthenticationError("token signed by an unknown key", code="unknown_key")
        claims: dict[str, Any] = jwt.decode(
            token,
            key=key,
            algorithms=self._algorithms,
            audience=self._audience,
            issuer=self._issuer,
            leeway=self._leeway,
            options={"require": ["exp", "iat", "nbf", "sub", "jti", "aud", "iss"]},
        )
        workload = parse_spiffe_id(str(claims["sub"]))
        if claims.get("kind") != workload.kind:
            raise AuthenticationError("token kind does not match its subject", code="invalid_subject")
        if not all(isinstance(claims[c], int) for c in ("exp", "iat", "nbf")):
            raise AuthenticationError("token time claims must be integers", code="malformed_token")
        if claims["exp"] - claims["iat"] > self._max_lifetime:
            raise AuthenticationError("token lifetime exceeds the maximum", code="invalid_token")
        return _principal(workload.uri, workload.kind, workload.name, workload.trust_domain, claims)

    def _verify_external(self, token: str, header: dict[str, Any], issuer: ExternalIssuer) -> Principal:
        claims = issuer.verify(token, header)
        workload = parse_spiffe_id(f"spiffe://{self._trust_domain}/{issuer.subject_path(claims)}")
        claims.setdefault("jti", _digest(token).hex())
        return _principal(workload.uri, workload.kind, workload.name, workload.trust_domain, claims)

    def _verify_svid(self, token: str) -> Principal:
        subject = _unverified_payload(token).get("sub")
        if not isinstance(subject, str):
            raise AuthenticationError("token has no subject", code="invalid_subject")
        workload = parse_spiffe_id(subject)
        trust = self._spiffe.get(workload.trust_domain)
        if trust is None:
            raise AuthenticationError("token from an untrusted issuer", code="unknown_issuer")
        claims = trust.verify(token)
        claims.setdefault("jti", _digest(token).hex())
        return _principal(workload.uri, workload.kind, workload.name, workload.trust_domain, claims)


def _principal(uri: str, kind: str, name: str, tenant: str, claims: dict[str, Any]) -> Principal:
    return Principal(
        spiffe_id=uri,
        kind=kind,
        name=name,
        tenant=tenant,
        issuer=str(claims.get("iss", "")),
        jti=str(claims["jti"]),
        expires_at=float(claims["exp"]),
        claims=claims,
    )


def _digest(token: str) -> bytes:
    return hashlib.blake2b(token.encode(), digest_size=20).digest()


def _unverified_payload(token: str) -> dict[str, Any]:
    try:
        payload = orjson.loads(jwt.utils.base64url_decode(token.split(".")[1]))
    except (IndexError, ValueError, orjson.JSONDecodeError):
        raise AuthenticationError("malformed token", code="malformed_token") from None
    if not isinstance(payload, dict):
        raise AuthenticationError("malformed token", code="malformed_token")
    return payload
