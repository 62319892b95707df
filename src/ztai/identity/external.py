"""Trust in other issuers: OIDC providers (by JWKS) and SPIFFE trust domains (by JWT bundle).

JWKS documents are fetched (or read from a file) and cached; they are refreshed after
`refresh_seconds`, or sooner when a token names a key id we do not know (rate-limited, so unknown
key ids cannot be used to hammer the provider).
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import jwt
from spiffe import JwtBundle, JwtSvid, TrustDomain

from ztai.config import AUTHORITY_CLAIMS, ClaimMap, ExternalIssuerSettings, Settings, SpiffeBundleSettings
from ztai.errors import AuthenticationError, ConfigError, MalformedRequest
from ztai.identity.spiffe_ids import parse_spiffe_id

_MIN_UNKNOWN_KID_REFETCH_SECONDS = 10.0
_MAX_JWKS_BYTES = 512 * 1024
_SUBJECT_SEGMENT = re.compile(r"^[A-Za-z0-9._-]{1,255}$")


class JwksCache:
    """A JWKS document from a URL or a file, cached with a refresh interval."""

    def __init__(self, *, url: str = "", file: Path | None = None, refresh_seconds: float = 300.0) -> None:
        self._url = url
        self._file = file
        self._refresh_seconds = refresh_seconds
        self._keys: dict[str, jwt.PyJWK] = {}
        self._loaded_at = float("-inf")
        self._lock = threading.Lock()

    def key(self, kid: str | None) -> jwt.PyJWK:
        now = time.monotonic()
        stale = now - self._loaded_at > self._refresh_seconds
        unknown = kid not in self._keys and now - self._loaded_at > _MIN_UNKNOWN_KID_REFETCH_SECONDS
        if stale or unknown:
            self._load()
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        if kid is None or kid not in self._keys:
            raise AuthenticationError("token signed by an unknown key", code="unknown_key")
        return self._keys[kid]

    def _load(self) -> None:
        with self._lock:
            try:
                document = self._fetch()
            except AuthenticationError:
                if not self._keys:
                    raise
                # Keep serving the last good keys while the provider is down; retry in a little while.
                self._loaded_at = time.monotonic() - self._refresh_seconds + _MIN_UNKNOWN_KID_REFETCH_SECONDS
                return
            keys: dict[str, jwt.PyJWK] = {}
            for entry in document.get("keys", []):
                if entry.get("use", "sig") != "sig":
                    continue
                try:
                    keys[entry.get("kid", "")] = jwt.PyJWK(entry)
                except jwt.PyJWTError:
                    continue  # a key type we do not support is skipped, not fatal
            self._keys = keys
            self._loaded_at = time.monotonic()

    def _fetch(self) -> dict[str, Any]:
        try:
            if self._file is not None:
                raw = self._file.read_bytes()[:_MAX_JWKS_BYTES]
            else:
                if not self._url.startswith(("https://", "http://")):
                    raise ValueError("jwks_url must be http(s)")
                with urllib.request.urlopen(self._url, timeout=5.0) as response:  # noqa: S310 (scheme checked)
                    raw = response.read(_MAX_JWKS_BYTES)
            document = json.loads(raw)
        except (OSError, ValueError) as exc:  # urllib's errors are OSErrors
            raise AuthenticationError(
                f"cannot load issuer keys: {type(exc).__name__}", code="jwks_unavailable"
            ) from None
        if not isinstance(document, dict):
            raise AuthenticationError("issuer JWKS is not a JSON object", code="jwks_unavailable")
        return document


def map_authority(claims: dict[str, Any], claim_map: ClaimMap) -> dict[str, Any]:
    """Another issuer's `claims` with its authority claims (roles, models, tools, groups, scopes) replaced
    by what `claim_map` makes of them: only mapped values count, anything else it says is dropped."""
    mapped = {name: value for name, value in claims.items() if name not in AUTHORITY_CLAIMS}
    for name, mapping in claim_map.items():
        source = claims.get(mapping.claim or name)
        given = [source] if isinstance(source, str) else source if isinstance(source, list) else []
        values = {mapping.values[v] for v in given if isinstance(v, str) and v in mapping.values}
        if values:
            mapped[name] = sorted(values)
    return mapped


class ExternalIssuer:
    """Verifies tokens of one OIDC issuer and maps their subject to a ztai principal."""

    def __init__(self, settings: ExternalIssuerSettings, base_dir: Path, leeway: int) -> None:
        self.settings = settings
        self._leeway = leeway
        file = (base_dir / settings.jwks_file) if settings.jwks_file else None
        self._jwks = JwksCache(url=settings.jwks_url, file=file, refresh_seconds=settings.refresh_seconds)

    def verify(self, token: str, header: dict[str, Any]) -> dict[str, Any]:
        if header.get("alg") not in self.settings.algorithms:
            raise AuthenticationError("token algorithm not allowed for this issuer", code="bad_algorithm")
        key = self._jwks.key(header.get("kid"))
        claims: dict[str, Any] = jwt.decode(
            token,
            key=key,
            algorithms=self.settings.algorithms,
            audience=self.settings.audience,
            issuer=self.settings.issuer,
            leeway=self._leeway,
            options={"require": ["exp", "iat", "sub", "iss", "aud"]},
        )
        return map_authority(claims, self.settings.claim_map)

    def subject_path(self, claims: dict[str, Any]) -> str:
        """`<kind>/<issuer name>/<sub>` for the SPIFFE ID of this issuer's subject.

        The issuer's name keeps its subjects apart from ztai-issued identities and from other issuers'.
        Subjects that are not valid SPIFFE path segments are base32-encoded under an extra `ext` segment,
        so two different subjects can never map to the same principal.
        """
        subject = str(claims.get(self.settings.subject_claim, ""))
        if not subject:
            raise AuthenticationError("token has no subject", code="invalid_subject")
        prefix = f"{self.settings.principal_kind}/{self.settings.name}"
        if _SUBJECT_SEGMENT.match(subject) and subject not in (".", ".."):
            return f"{prefix}/{subject}"
        encoded = base64.b32encode(subject.encode()).decode().rstrip("=").lower()
        return f"{prefix}/ext/{encoded}"


def foreign_owner(settings: Settings, subject: str) -> str:
    """Who other than ztai vouches for `subject` ("" for no one): an external issuer, whose principals
    are spiffe://<trust domain>/<kind>/<issuer name>/..., or a SPIFFE trust domain whose bundle is trusted.
    Names are compared without case, so a look-alike of another issuer's namespace is refused too."""
    workload = parse_spiffe_id(subject)
    if workload.trust_domain in {bundle.trust_domain for bundle in settings.identity.spiffe_bundles}:
        return f"SPIFFE trust domain {workload.trust_domain}"
    if workload.trust_domain != settings.trust_domain:
        return ""
    first = workload.name.split("/", 1)[0].lower()
    for issuer in settings.identity.external_issuers:
        if issuer.name.lower() == first:
            return f"external issuer {issuer.name} ({issuer.issuer})"
    return ""


def refuse_foreign_subject(settings: Settings, subject: str) -> None:
    """Raise MalformedRequest when ztai would mint a token for a subject that another issuer vouches for."""
    owner = foreign_owner(settings, subject)
    if owner:
        raise MalformedRequest(
            f"{subject} is in the namespace of {owner}: ztai does not issue tokens for it",
            code="foreign_subject",
        )


class SpiffeTrust:
    """Verifies JWT-SVIDs of one SPIFFE trust domain against its JWT bundle (via the `spiffe` package)."""

    def __init__(self, settings: SpiffeBundleSettings, base_dir: Path) -> None:
        self.settings = settings
        path = base_dir / settings.bundle_file
        try:
            self._bundle = JwtBundle.parse(TrustDomain(settings.trust_domain), path.read_bytes())
        except Exception as exc:  # the spiffe package raises several unrelated types
            raise ConfigError(f"identity.spiffe_bundles: cannot load {path}: {exc}") from None

    def verify(self, token: str) -> dict[str, Any]:
        try:
            svid = JwtSvid.parse_and_validate(token, self._bundle, {self.settings.audience})
        except Exception as exc:  # JwtSvidError, InvalidTokenError, AuthorityNotFoundError...
            raise AuthenticationError(f"invalid JWT-SVID: {exc}", code="invalid_svid") from None
        # The signature, audience and expiry were checked above; the package keeps the claims private.
        claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
        claims["exp"] = svid.expiry
        claims.setdefault("iss", f"spiffe://{self.settings.trust_domain}")
        return map_authority(claims, self.settings.claim_map)
