"""ztai's own tokens: issuing, verifying (signature, algorithm, claims, subject), caching, revocation."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select, text

import ztai.identity.verifier as verifier_module
from ztai.config import Settings, load_settings
from ztai.errors import AuthenticationError, MalformedRequest, StoreError
from ztai.identity import (
    KeyStore,
    Principal,
    RevocationList,
    TokenVerifier,
    issue_token,
    parse_claims,
    parse_spiffe_id,
)
from ztai.identity.tokens import MAX_CLAIM_VALUE_LENGTH, MAX_CUSTOM_CLAIMS
from ztai.store import Database, RevokedToken

ALICE = "spiffe://example.org/user/alice"

MALFORMED_SUBJECTS = [
    pytest.param("spiffe://Example.org/user/alice", id="uppercase-trust-domain"),
    pytest.param("spiffe://example.org/robot/r2d2", id="unknown-kind"),
    pytest.param("spiffe://example.org/user/../admin", id="dot-dot-segment"),
    pytest.param("spiffe://example.org/user/.", id="dot-segment"),
    pytest.param("spiffe://example.org/user//alice", id="empty-segment"),
    pytest.param("spiffe://example.org/user/alice/", id="trailing-slash"),
    pytest.param("spiffe://example.org/user", id="kind-without-name"),
    pytest.param("spiffe://example.org", id="no-path"),
    pytest.param("https://example.org/user/alice", id="https-scheme"),
    pytest.param("SPIFFE://example.org/user/alice", id="uppercase-scheme"),
    pytest.param("spiffe://example.org:8443/user/alice", id="port"),
    pytest.param("spiffe://example.org/user/al ice", id="space"),
    pytest.param("spiffe://example.org/user/alice?admin=1", id="query"),
    pytest.param("spiffe://example.org/user/" + "a" * 2100, id="too-long"),
    pytest.param("alice", id="not-a-uri"),
    pytest.param("", id="empty"),
]


# Helpers ------------------------------------------------------------------------------------------
def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def craft(header: dict[str, Any], payload: dict[str, Any], sign: Callable[[bytes], bytes] | None) -> str:
    """A JWS built by hand (PyJWT refuses to produce some of the tokens these tests need)."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    signature = sign(signing_input.encode()) if sign is not None else b""
    return f"{signing_input}.{b64url(signature)}"


def own_claims(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """Claims of a valid ztai token for alice, as `issue_token` would write them."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": settings.issuer,
        "sub": ALICE,
        "aud": settings.identity.audience,
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": secrets.token_urlsafe(18),
        "kind": "user",
        "tenant": "example.org",
    }
    claims.update(overrides)
    return claims


def sign_own(keys: KeyStore, claims: dict[str, Any], **header: Any) -> str:
    """Sign `claims` with ztai's real active key (bypassing issue_token's checks)."""
    key = keys.active
    return jwt.encode(claims, key.private_key, algorithm="EdDSA", headers={"kid": key.kid, **header})


def issue(
    keys: KeyStore,
    settings: Settings,
    subject: str = ALICE,
    *,
    ttl: int = 300,
    claims: dict[str, Any] | None = None,
    now: float | None = None,
    audience: str | None = None,
    issuer: str | None = None,
) -> str:
    return issue_token(
        keys,
        subject=subject,
        issuer=issuer if issuer is not None else settings.issuer,
        audience=audience if audience is not None else settings.identity.audience,
        ttl_seconds=ttl,
        max_ttl_seconds=settings.identity.max_ttl_seconds,
        claims=claims,
        now=now,
    ).token


def make_verifier(settings: Settings, database: Database) -> TokenVerifier:
    keys = KeyStore.load(settings.data_path)
    revocations = RevocationList(database)
    revocations.refresh()
    return TokenVerifier(settings, keys, revocations)


def rejected(verifier: TokenVerifier, token: str) -> str:
    """Verify a token that must be rejected; return the error code."""
    with pytest.raises(AuthenticationError) as caught:
        verifier.verify(token)
    return caught.value.code


def tamper(token: str, part: int) -> str:
    """Flip one character in the middle of a token part (the last character may hold only padding bits)."""
    parts = token.split(".")
    middle = len(parts[part]) // 2
    char = parts[part][middle]
    parts[part] = parts[part][:middle] + ("B" if char != "B" else "C") + parts[part][middle + 1 :]
    return ".".join(parts)


# Fixtures -----------------------------------------------------------------------------------------
@pytest.fixture
def keys(settings: Settings) -> KeyStore:
    return KeyStore.load(settings.data_path)


@pytest.fixture
def revocations(database: Database) -> RevocationList:
    revocations = RevocationList(database)
    revocations.refresh()
    return revocations


@pytest.fixture
def verifier(settings: Settings, keys: KeyStore, revocations: RevocationList) -> TokenVerifier:
    return TokenVerifier(settings, keys, revocations)


# Valid tokens and the cache -------------------------------------------------------------------------
def test_valid_token_verifies_with_the_right_principal(
    settings: Settings, keys: KeyStore, verifier: TokenVerifier
) -> None:
    issued = issue_token(
        keys,
        subject="spiffe://example.org/agent/team/bot",
        issuer=settings.issuer,
        audience=settings.identity.audience,
        ttl_seconds=120,
        max_ttl_seconds=settings.identity.max_ttl_seconds,
        claims=parse_claims(["models=gpt-4o", "department=research"]),
    )
    assert (issued.subject, issued.kind, issued.tenant) == (
        "spiffe://example.org/agent/team/bot",
        "agent",
        "example.org",
    )

    principal = verifier.verify(issued.token)

    assert isinstance(principal, Principal)
    assert principal.spiffe_id == "spiffe://example.org/agent/team/bot"
    assert principal.kind == "agent"
    assert principal.name == "team/bot"
    assert principal.tenant == "example.org"
    assert principal.issuer == settings.issuer
    assert principal.jti == issued.jti
    assert principal.expires_at == issued.expires_at
    assert principal.claims["models"] == ["gpt-4o"]
    assert principal.claims["department"] == "research"
    assert principal.claims["aud"] == "ztai"
    assert principal.claims["kind"] == "agent"
    assert principal.claim_set("models") == ["gpt-4o"]
    assert principal.claim_set("department") == ["research"]
    assert principal.claim_set("absent") == []


def test_issue_token_header_and_payload(settings: Settings, keys: KeyStore) -> None:
    issued = issue_token(
        keys,
        subject=ALICE,
        issuer=settings.issuer,
        audience="ztai",
        ttl_seconds=60,
        max_ttl_seconds=settings.identity.max_ttl_seconds,
        now=1_700_000_000.9,
    )
    header = jwt.get_unverified_header(issued.token)
    payload = jwt.decode(issued.token, options={"verify_signature": False})
    assert header == {"alg": "EdDSA", "kid": keys.active.kid, "typ": "JWT"}
    assert payload["iat"] == payload["nbf"] == 1_700_000_000
    assert payload["exp"] == 1_700_000_060 == issued.expires_at
    assert payload["jti"] == issued.jti and len(issued.jti) >= 24
    assert (payload["kind"], payload["tenant"], payload["sub"]) == ("user", "example.org", ALICE)
    second = issue_token(
        keys,
        subject=ALICE,
        issuer=settings.issuer,
        audience="ztai",
        ttl_seconds=60,
        max_ttl_seconds=settings.identity.max_ttl_seconds,
    )
    assert second.jti != issued.jti


def test_second_verify_hits_the_cache_but_still_checks_revocation(
    keys: KeyStore, settings: Settings, verifier: TokenVerifier, revocations: RevocationList
) -> None:
    token = issue(keys, settings)
    assert verifier.cached(token) is None

    first = verifier.verify(token)
    assert verifier.cached(token) is first
    assert verifier.verify(token) is first  # no second signature check: the same object

    revocations.revoke(first.tenant, first.jti, first.expires_at, reason="test")
    assert rejected(verifier, token) == "token_revoked"
    with pytest.raises(AuthenticationError) as caught:
        verifier.cached(token)
    assert caught.value.code == "token_revoked"


def test_cached_token_is_still_checked_for_expiry(
    keys: KeyStore, settings: Settings, verifier: TokenVerifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = issue(keys, settings, ttl=60)
    principal = verifier.verify(token)
    assert verifier.verify(token) is principal

    real_time = time.time
    clock = SimpleNamespace(time=lambda: real_time() + 60 + 30, monotonic=time.monotonic)
    monkeypatch.setattr(verifier_module, "time", clock)
    assert rejected(verifier, token) == "token_expired"


def test_cache_disabled_verifies_every_time(
    ztai_home: Path, keys: KeyStore, revocations: RevocationList
) -> None:
    settings = load_settings(ztai_home / "ztai.yaml", identity={"verified_cache_size": 0})
    verifier = TokenVerifier(settings, keys, revocations)
    token = issue(keys, settings)
    first = verifier.verify(token)
    second = verifier.verify(token)
    assert first == second and first is not second
    assert verifier.cached(token) is None


def test_cache_is_bounded(ztai_home: Path, keys: KeyStore, revocations: RevocationList) -> None:
    settings = load_settings(ztai_home / "ztai.yaml", identity={"verified_cache_size": 2})
    verifier = TokenVerifier(settings, keys, revocations)
    tokens = [issue(keys, settings) for _ in range(3)]
    for token in tokens:
        verifier.verify(token)
    assert verifier.cached(tokens[0]) is None  # the oldest was evicted
    assert verifier.cached(tokens[1]) is not None
    assert verifier.cached(tokens[2]) is not None


async def test_verify_async(keys: KeyStore, settings: Settings, verifier: TokenVerifier) -> None:
    token = issue(keys, settings)
    principal = await verifier.verify_async(token)
    assert principal.spiffe_id == ALICE
    assert await verifier.verify_async(token) is principal
    with pytest.raises(AuthenticationError) as caught:
        await verifier.verify_async(tamper(token, 2))
    assert caught.value.code == "bad_signature"
    with pytest.raises(AuthenticationError) as caught:
        await verifier.verify_async("not-a-token")
    assert caught.value.code == "malformed_token"


def test_hand_signed_token_verifies(keys: KeyStore, settings: Settings, verifier: TokenVerifier) -> None:
    """Sanity check for the helpers below: a correct hand-made token is accepted."""
    principal = verifier.verify(sign_own(keys, own_claims(settings)))
    assert principal.spiffe_id == ALICE


# Signatures and algorithms ------------------------------------------------------------------------
def test_bad_signature(keys: KeyStore, settings: Settings, verifier: TokenVerifier) -> None:
    token = issue(keys, settings)
    assert rejected(verifier, tamper(token, 2)) == "bad_signature"


def test_tampered_payload_is_rejected(keys: KeyStore, settings: Settings, verifier: TokenVerifier) -> None:
    token = issue(keys, settings)
    header, _payload, signature = token.split(".")
    forged = own_claims(settings, sub="spiffe://example.org/user/admin")
    forged_token = f"{header}.{b64url(json.dumps(forged).encode())}.{signature}"
    assert rejected(verifier, forged_token) == "bad_signature"


def test_token_signed_by_another_key_with_the_real_kid(
    keys: KeyStore, settings: Settings, verifier: TokenVerifier
) -> None:
    attacker = Ed25519PrivateKey.generate()
    token = jwt.encode(own_claims(settings), attacker, algorithm="EdDSA", headers={"kid": keys.active.kid})
    assert rejected(verifier, token) == "bad_signature"


def test_unknown_kid(keys: KeyStore, settings: Settings, verifier: TokenVerifier) -> None:
    attacker = Ed25519PrivateKey.generate()
    token = jwt.encode(own_claims(settings), attacker, algorithm="EdDSA", headers={"kid": "no-such-key"})
    assert rejected(verifier, token) == "unknown_key"


def test_missing_kid(keys: KeyStore, settings: Settings, verifier: TokenVerifier) -> None:
    token = jwt.encode(own_claims(settings), keys.active.private_key, algorithm="EdDSA")
    assert rejected(verifier, token) == "unknown_key"


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_is_rejected(alg: str, keys: KeyStore, settings: Settings, verifier: TokenVerifier) -> None:
    header = {"alg": alg, "typ": "JWT", "kid": keys.active.kid}
    assert rejected(verifier, craft(header, own_claims(settings), None)) == "bad_algorithm"


def test_alg_missing_or_not_a_string(keys: KeyStore, settings: Settings, verifier: TokenVerifier) -> None:
    sign = keys.active.private_key.sign
    assert rejected(verifier, craft({"kid": keys.active.kid}, own_claims(settings), sign)) == "bad_algorithm"
    header = {"alg": 1, "kid": keys.active.kid}
    assert rejected(verifier, craft(header, own_claims(settings), sign)) == "bad_algorithm"


@pytest.mark.parametrize("encoding", ["pem", "raw", "der"])
def test_hs256_algorithm_confusion_is_rejected(
    encoding: str, keys: KeyStore, settings: Settings, verifier: TokenVerifier
) -> None:
    """An HMAC token keyed with the (public!) verification key must not pass as signed by ztai."""
    public = keys.active.public_key
    secret = {
        "pem": public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "raw": public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
        "der": public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    }[encoding]
    header = {"alg": "HS256", "typ": "JWT", "kid": keys.active.kid}
    token = craft(header, own_claims(settings), lambda data: hmac.new(secret, data, hashlib.sha256).digest())
    assert rejected(verifier, token) == "bad_algorithm"


def test_es256_rejected_when_only_eddsa_is_configured(
    keys: KeyStore, settings: Settings, verifier: TokenVerifier
) -> None:
    assert settings.identity.algorithms == ["EdDSA"]
    ec_key = ec.generate_private_key(ec.SECP256R1())
    token = jwt.encode(own_claims(settings), ec_key, algorithm="ES256", headers={"kid": keys.active.kid})
    assert rejected(verifier, token) == "bad_algorithm"


def test_es256_token_cannot_use_an_ed25519_kid_even_when_es256_is_allowed(
    ztai_home: Path, keys: KeyStore, revocations: RevocationList
) -> None:
    settings = load_settings(ztai_home / "ztai.yaml", identity={"algorithms": ["EdDSA", "ES256"]})
    verifier = TokenVerifier(settings, keys, revocations)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    token = jwt.encode(own_claims(settings), ec_key, algorithm="ES256", headers={"kid": keys.active.kid})
    # ztai's keys are all Ed25519: an ES256 token naming one of them is refused, not a crash (TypeError).
    assert rejected(verifier, token) == "bad_algorithm"
    assert verifier.verify(issue(keys, settings)).spiffe_id == ALICE


# Time -------------------------------------------------------------------------------------------------
def test_expiry_respects_the_leeway(keys: KeyStore, settings: Settings, verifier: TokenVerifier) -> None:
    assert settings.identity.leeway_seconds == 5
    ttl = 60
    expired_2s_ago = issue(keys, settings, ttl=ttl, now=time.time() - ttl - 2)
    expired_10s_ago = issue(keys, settings, ttl=ttl, now=time.time() - ttl - 10)
    assert verifier.verify(expired_2s_ago).spiffe_id == ALICE
    assert rejected(verifier, expired_10s_ago) == "token_expired"


def test_expiry_without_leeway(ztai_home: Path, keys: KeyStore, revocations: RevocationList) -> None:
    settings = load_settings(ztai_home / "ztai.yaml", identity={"leeway_seconds": 0})
    verifier = TokenVerifier(settings, keys, revocations)
    assert rejected(verifier, issue(keys, settings, ttl=60, now=time.time() - 62)) == "token_expired"


def test_not_yet_valid(keys: KeyStore, settings: Settings, verifier: TokenVerifier) -> None:
    assert rejected(verifier, issue(keys, settings, now=time.time() + 60)) == "token_not_yet_valid"
    # Within the leeway a little clock skew is tolerated.
    assert verifier.verify(issue(keys, settings, now=time.time() + 2)).spiffe_id == ALICE


def test_nbf_in_the_future_with_a_current_iat(
    keys: KeyStore, settings: Settings, verifier: TokenVerifier
) -> None:
    now = int(time.time())
    token = sign_own(keys, own_claims(settings, nbf=now + 120, exp=now + 300))
    assert rejected(verifier, token) == "token_not_yet_valid"


def test_lifetime_beyond_the_maximum_is_rejected(
    keys: KeyStore, settings: Settings, verifier: TokenVerifier
) -> None:
    now = int(time.time())
    too_long = now + settings.identity.max_ttl_seconds + settings.identity.leeway_seconds + 1
    assert rejected(verifier, sign_own(keys, own_claims(settings, exp=too_long))) == "invalid_token"
    just_right = now + settings.identity.max_ttl_seconds
    assert verifier.verify(sign_own(keys, own_claims(settings, exp=just_right))).spiffe_id == ALICE


@pytest.mark.parametrize("claim", ["exp", "iat", "nbf", "sub", "jti", "aud", "iss"])
def test_required_claims(claim: str, keys: KeyStore, settings: Settings, verifier: TokenVerifier) -> None:
    claims = own_claims(settings)
    del claims[claim]
    code = rejected(verifier, sign_own(keys, claims))
    # Without `iss` the token is not recognisably ztai's: it is treated as a foreign JWT-SVID.
    assert code == ("unknown_issuer" if claim == "iss" else "malformed_token")


# Audience and issuer --------------------------------------------------------------------------------
def test_wrong_audience(keys: KeyStore, settings: Settings, verifier: TokenVerifier) -> None:
    assert rejected(verifier, issue(keys, settings, audience="someone-else")) == "wrong_audience"
    token = sign_own(keys, own_claims(settings, aud=["someone-else", "another"]))
    assert rejected(verifier, token) == "wrong_audience"


def test_audience_list_containing_ztai_is_accepted(
    keys: KeyStore, settings: Settings, verifier: TokenVerifier
) -> None:
    token = sign_own(keys, own_claims(settings, aud=["someone-else", settings.identity.audience]))
    assert verifier.verify(token).spiffe_id == ALICE


def test_wrong_issuer(keys: KeyStore, settings: Settings, verifier: TokenVerifier) -> None:
    # Signed with ztai's real key, but naming another issuer: no trust is configured for that issuer.
    token = issue(keys, settings, issuer="spiffe://example.org/service/not-ztai")
    assert rejected(verifier, token) == "unknown_issuer"
    token = issue(keys, settings, issuer="https://evil.example.com")
    assert rejected(verifier, token) == "unknown_issuer"


def test_configured_issuer_name_is_used(ztai_home: Path, keys: KeyStore, revocations: RevocationList) -> None:
    settings = load_settings(ztai_home / "ztai.yaml", identity={"issuer": "https://ztai.example.org"})
    verifier = TokenVerifier(settings, keys, revocations)
    assert verifier.verify(issue(keys, settings)).issuer == "https://ztai.example.org"
    default_issuer = "spiffe://example.org/service/ztai"
    assert rejected(verifier, issue(keys, settings, issuer=default_issuer)) == "unknown_issuer"


# Subjects --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("subject", MALFORMED_SUBJECTS)
def test_malformed_subject_cannot_be_issued(subject: str, keys: KeyStore, settings: Settings) -> None:
    with pytest.raises(AuthenticationError) as caught:
        issue(keys, settings, subject)
    assert caught.value.code == "invalid_subject"
    with pytest.raises(AuthenticationError) as caught:
        parse_spiffe_id(subject)
    assert caught.value.code == "invalid_subject"


@pytest.mark.parametrize("subject", MALFORMED_SUBJECTS)
def test_malformed_subject_in_a_validly_signed_token(
    subject: str, keys: KeyStore, settings: Settings, verifier: TokenVerifier
) -> None:
    assert rejected(verifier, sign_own(keys, own_claims(settings, sub=subject))) == "invalid_subject"


@pytest.mark.parametrize(
    ("subject", "code"),
    [
        (None, "malformed_token"),
        (42, "invalid_token"),
        (["spiffe://example.org/user/alice"], "invalid_token"),
    ],
)
def test_subject_that_is_not_a_string(
    subject: Any, code: str, keys: KeyStore, settings: Settings, verifier: TokenVerifier
) -> None:
    assert rejected(verifier, sign_own(keys, own_claims(settings, sub=subject))) == code


@pytest.mark.parametrize(
    "subject",
    [
        "spiffe://example.org/user/alice",
        "spiffe://example.org/agent/bot-1",
        "spiffe://example.org/service/api.v2",
        "spiffe://example.org/model/llama_3/8b",
        "spiffe://other-tenant.example/user/bob",
    ],
)
def test_well_formed_subjects(
    subject: str, keys: KeyStore, settings: Settings, verifier: TokenVerifier
) -> None:
    workload = parse_spiffe_id(subject)
    principal = verifier.verify(issue(keys, settings, subject))
    assert (principal.spiffe_id, principal.kind, principal.name, principal.tenant) == (
        workload.uri,
        workload.kind,
        workload.name,
        workload.trust_domain,
    )


@pytest.mark.parametrize("kind", ["agent", "service", "model", "robot", "", None])
def test_kind_claim_must_match_the_subject(
    kind: str | None, keys: KeyStore, settings: Settings, verifier: TokenVerifier
) -> None:
    assert rejected(verifier, sign_own(keys, own_claims(settings, kind=kind))) == "invalid_subject"
    claims = own_claims(settings)
    del claims["kind"]
    assert rejected(verifier, sign_own(keys, claims)) == "invalid_subject"


def test_tenant_comes_from_the_subject_not_the_claim(
    keys: KeyStore, settings: Settings, verifier: TokenVerifier
) -> None:
    principal = verifier.verify(sign_own(keys, own_claims(settings, tenant="other.example")))
    assert principal.tenant == "example.org"


# Size and garbage ----------------------------------------------------------------------------------
def test_oversized_token(keys: KeyStore, settings: Settings, verifier: TokenVerifier) -> None:
    limit = settings.identity.max_token_bytes
    token = issue(keys, settings, claims={"padding": "x" * limit})
    assert len(token) > limit
    assert rejected(verifier, token) == "token_too_large"
    assert rejected(verifier, "a" * (limit + 1)) == "token_too_large"
    with pytest.raises(AuthenticationError) as caught:
        verifier.cached(token)
    assert caught.value.code == "token_too_large"


def test_token_size_limit_is_configurable(
    ztai_home: Path, keys: KeyStore, revocations: RevocationList
) -> None:
    settings = load_settings(ztai_home / "ztai.yaml", identity={"max_token_bytes": 600})
    verifier = TokenVerifier(settings, keys, revocations)
    small = issue(keys, settings)
    assert len(small) <= 600
    assert verifier.verify(small).spiffe_id == ALICE
    big = issue(keys, settings, claims={"padding": "x" * 300})
    assert len(big) > 600
    assert rejected(verifier, big) == "token_too_large"


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("", id="empty"),
        pytest.param("a.b", id="two-parts"),
        pytest.param("a.b.c", id="three-parts"),
        pytest.param("a.b.c.d", id="four-parts"),
        pytest.param("....", id="dots"),
        pytest.param("!!!.***.###", id="not-base64"),
        pytest.param("\u00e9.\u00e9.\u00e9", id="non-ascii"),
        pytest.param("Bearer abc", id="bearer-prefix"),
        pytest.param(b64url(b'{"alg":"EdDSA"}'), id="header-only"),
        pytest.param(b64url(b'{"alg":"EdDSA"}') + "." + b64url(b"not json") + ".", id="payload-not-json"),
        pytest.param(b64url(b'{"alg":"EdDSA"}') + "." + b64url(b"[1, 2]") + ".", id="payload-a-list"),
        pytest.param(b64url(b"[1]") + "." + b64url(b"{}") + ".", id="header-a-list"),
        pytest.param(b64url(b"not json") + "." + b64url(b"{}") + ".", id="header-not-json"),
    ],
)
def test_garbage_is_rejected(token: str, verifier: TokenVerifier) -> None:
    assert rejected(verifier, token) == "malformed_token"


def test_kid_that_is_not_a_string(keys: KeyStore, settings: Settings, verifier: TokenVerifier) -> None:
    header = {"alg": "EdDSA", "kid": 7}
    token = craft(header, own_claims(settings), keys.active.private_key.sign)
    assert rejected(verifier, token) == "malformed_token"


# Revocation ------------------------------------------------------------------------------------------
def test_revoked_token_is_rejected(
    keys: KeyStore, settings: Settings, verifier: TokenVerifier, revocations: RevocationList
) -> None:
    issued = issue_token(
        keys,
        subject=ALICE,
        issuer=settings.issuer,
        audience=settings.identity.audience,
        ttl_seconds=300,
        max_ttl_seconds=settings.identity.max_ttl_seconds,
    )
    other = issue(keys, settings)
    revocations.revoke(issued.tenant, issued.jti, issued.expires_at, reason="compromised")
    assert rejected(verifier, issued.token) == "token_revoked"
    assert verifier.verify(other).spiffe_id == ALICE  # only that token


def test_revocation_is_per_tenant(
    keys: KeyStore, settings: Settings, verifier: TokenVerifier, revocations: RevocationList
) -> None:
    issued = issue_token(
        keys,
        subject=ALICE,
        issuer=settings.issuer,
        audience=settings.identity.audience,
        ttl_seconds=300,
        max_ttl_seconds=settings.identity.max_ttl_seconds,
    )
    revocations.revoke("other.example", issued.jti, issued.expires_at)
    assert verifier.verify(issued.token).jti == issued.jti


def test_revocation_by_another_replica(
    keys: KeyStore,
    settings: Settings,
    database: Database,
    verifier: TokenVerifier,
    revocations: RevocationList,
) -> None:
    token = issue(keys, settings)
    principal = verifier.verify(token)  # cached here

    replica = RevocationList(database)
    replica.refresh()
    replica.revoke(principal.tenant, principal.jti, principal.expires_at)

    assert verifier.verify(token) is principal  # not yet seen by this replica
    revocations.refresh()
    assert rejected(verifier, token) == "token_revoked"
    # A verifier started later (after the revocation) sees it from its first refresh.
    assert rejected(make_verifier(settings, database), token) == "token_revoked"


def test_refresh_picks_up_revocations_from_another_instance(database: Database) -> None:
    mine = RevocationList(database)
    theirs = RevocationList(database)
    assert mine.refresh() == 0
    theirs.refresh()
    expires = time.time() + 300

    theirs.revoke("example.org", "jti-1", expires)
    assert theirs.is_revoked("example.org", "jti-1")
    assert not mine.is_revoked("example.org", "jti-1")
    assert mine.refresh() == 1
    assert mine.is_revoked("example.org", "jti-1")

    # Later revocations too (the incremental refresh, after the watermark was set).
    theirs.revoke("example.org", "jti-2", expires)
    theirs.revoke("tenant-b.example", "jti-1", expires)
    assert mine.refresh() == 3
    assert mine.is_revoked("example.org", "jti-2")
    assert mine.is_revoked("tenant-b.example", "jti-1")
    assert not mine.is_revoked("example.org", "jti-3")
    assert not mine.is_revoked("tenant-c.example", "jti-1")


def test_refresh_ignores_revocations_of_expired_tokens(database: Database) -> None:
    writer = RevocationList(database)
    writer.revoke("example.org", "long-gone", time.time() - 3600)
    writer.revoke("example.org", "current", time.time() + 3600)
    reader = RevocationList(database)
    assert reader.refresh() == 1
    assert reader.is_revoked("example.org", "current")
    assert not reader.is_revoked("example.org", "long-gone")
    # The local entry of a long-expired token is pruned too.
    assert writer.refresh() == 1


def test_revoke_is_idempotent(database: Database) -> None:
    revocations = RevocationList(database)
    revocations.refresh()
    expires = time.time() + 300
    revocations.revoke("example.org", "jti-1", expires, reason="first")
    revocations.revoke("example.org", "jti-1", expires, reason="again")
    RevocationList(database).revoke("example.org", "jti-1", expires, reason="another replica")
    assert revocations.is_revoked("example.org", "jti-1")
    with database.sessions() as session:
        rows = session.execute(select(RevokedToken.reason)).scalars().all()
        count = session.execute(select(func.count()).select_from(RevokedToken)).scalar_one()
    assert count == 1
    assert rows == ["first"]
    assert revocations.refresh() == 1


def test_revoke_truncates_long_reasons(database: Database) -> None:
    RevocationList(database).revoke("example.org", "jti-1", time.time() + 60, reason="x" * 5000)
    with database.sessions() as session:
        reason = session.execute(select(RevokedToken.reason)).scalar_one()
    assert reason == "x" * 500


def test_stale_revocation_list_fails_closed(
    keys: KeyStore,
    settings: Settings,
    verifier: TokenVerifier,
    revocations: RevocationList,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    token = issue(keys, settings)
    verifier.verify(token)
    monkeypatch.setattr(revocations, "_fresh_at", time.monotonic() - 3600)
    with pytest.raises(StoreError) as caught:
        verifier.verify(token)  # even from the cache
    assert caught.value.code == "store_unavailable"
    with pytest.raises(StoreError):
        verifier.verify(issue(keys, settings))
    with pytest.raises(StoreError):
        revocations.is_revoked("example.org", "anything")
    # A successful refresh makes it usable again.
    revocations.refresh()
    assert verifier.verify(token).spiffe_id == ALICE


def test_never_refreshed_revocation_list_fails_closed(
    settings: Settings, keys: KeyStore, database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    revocations = RevocationList(database)
    monkeypatch.setattr(revocations, "_fresh_at", time.monotonic() - 3600)
    verifier = TokenVerifier(settings, keys, revocations)
    with pytest.raises(StoreError):
        verifier.verify(issue(keys, settings))


def test_unreadable_store_raises_and_then_goes_stale(
    database: Database, revocations: RevocationList, monkeypatch: pytest.MonkeyPatch
) -> None:
    with database.transaction() as session:
        session.execute(text("DROP TABLE revoked_tokens"))
    with pytest.raises(StoreError) as caught:
        revocations.refresh()
    assert caught.value.code == "store_unavailable"
    assert not revocations.is_revoked("example.org", "x")  # still fresh from the fixture's refresh
    monkeypatch.setattr(revocations, "_fresh_at", time.monotonic() - 3600)
    with pytest.raises(StoreError):
        revocations.is_revoked("example.org", "x")


def test_staleness_window_follows_the_refresh_interval(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    revocations = RevocationList(database, refresh_seconds=10.0)
    revocations.refresh()
    monkeypatch.setattr(revocations, "_fresh_at", time.monotonic() - 40)
    assert not revocations.is_revoked("example.org", "x")  # within 5 x 10 s
    monkeypatch.setattr(revocations, "_fresh_at", time.monotonic() - 60)
    with pytest.raises(StoreError):
        revocations.is_revoked("example.org", "x")


# Issuing ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ttl", [0, -1, 3601])
def test_issue_rejects_bad_ttl(ttl: int, keys: KeyStore, settings: Settings) -> None:
    with pytest.raises(MalformedRequest) as caught:
        issue(keys, settings, ttl=ttl)
    assert caught.value.code == "invalid_request"


@pytest.mark.parametrize("claim", ["iss", "sub", "aud", "exp", "iat", "nbf", "jti", "kind", "tenant"])
def test_issue_rejects_reserved_claims(claim: str, keys: KeyStore, settings: Settings) -> None:
    with pytest.raises(MalformedRequest) as caught:
        issue(keys, settings, claims={claim: "x"})
    assert caught.value.code == "invalid_request"


# parse_claims ---------------------------------------------------------------------------------------
def test_parse_claims_values_and_lists() -> None:
    claims = parse_claims(
        [
            "department=research",
            "models=gpt-4o",
            "groups=a, b ,c",
            "tools=",
            "labels=x,y",
            "note=a=b",
            " spaced =value ",
            "single=one,",
        ]
    )
    assert claims == {
        "department": "research",
        "models": ["gpt-4o"],  # a list claim, even with one value
        "groups": ["a", "b", "c"],
        "tools": [],
        "labels": ["x", "y"],  # commas make a list
        "note": "a=b",  # only the first '=' separates
        "spaced": "value ",
        "single": "one,",
    }
    assert parse_claims([]) == {}


@pytest.mark.parametrize("name", ["models", "groups", "scopes", "tools", "roles"])
def test_parse_claims_list_claims_are_always_lists(name: str) -> None:
    assert parse_claims([f"{name}=x"]) == {name: ["x"]}


def test_parse_claims_later_values_win() -> None:
    assert parse_claims(["team=a", "team=b"]) == {"team": "b"}


@pytest.mark.parametrize("claim", ["iss", "sub", "aud", "exp", "iat", "nbf", "jti", "kind", "tenant"])
def test_parse_claims_rejects_reserved_claims(claim: str) -> None:
    with pytest.raises(MalformedRequest) as caught:
        parse_claims([f"{claim}=x"])
    assert caught.value.code == "invalid_request"
    with pytest.raises(MalformedRequest):
        parse_claims([f" {claim} =x"])


@pytest.mark.parametrize("pair", ["novalue", "=value", " =value", "", "   "])
def test_parse_claims_rejects_bad_format(pair: str) -> None:
    with pytest.raises(MalformedRequest) as caught:
        parse_claims([pair])
    assert caught.value.code == "invalid_request"


def test_parse_claims_limits() -> None:
    assert parse_claims(["k=" + "v" * MAX_CLAIM_VALUE_LENGTH]) == {"k": "v" * MAX_CLAIM_VALUE_LENGTH}
    with pytest.raises(MalformedRequest):
        parse_claims(["k=" + "v" * (MAX_CLAIM_VALUE_LENGTH + 1)])
    assert len(parse_claims([f"c{i}=v" for i in range(MAX_CUSTOM_CLAIMS)])) == MAX_CUSTOM_CLAIMS
    with pytest.raises(MalformedRequest):
        parse_claims([f"c{i}=v" for i in range(MAX_CUSTOM_CLAIMS + 1)])


def test_parsed_claims_round_trip_through_a_token(
    keys: KeyStore, settings: Settings, verifier: TokenVerifier
) -> None:
    claims = parse_claims(["groups=ops,ml", "scopes=chat", "region=eu"])
    principal = verifier.verify(issue(keys, settings, claims=claims))
    assert principal.claim_set("groups") == ["ops", "ml"]
    assert principal.claim_set("scopes") == ["chat"]
    assert principal.claim_set("region") == ["eu"]
