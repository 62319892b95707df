"""Trust in other issuers: OIDC providers (JWKS file) and SPIFFE trust domains (JWT bundles)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from pydantic import ValidationError

import ztai.identity.external as external_module
from ztai.config import ExternalIssuerSettings, Settings, load_settings
from ztai.errors import AuthenticationError, ConfigError, MalformedRequest
from ztai.identity import KeyStore, RevocationList, TokenVerifier
from ztai.identity.external import ExternalIssuer, foreign_owner, refuse_foreign_subject
from ztai.policy import principal_context
from ztai.store import Database

IDP = "https://idp.example.com"
IDP_AUDIENCE = "ztai-api"
IDP_JWKS = "idp-jwks.json"
PROD = "prod.example.org"
STAGING = "staging.example.org"
API_SVID = f"spiffe://{PROD}/service/api"


# Keys and documents ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def rsa_jwk(key: rsa.RSAPrivateKey, kid: str, **extra: Any) -> dict[str, Any]:
    return {**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, "use": "sig", **extra}


def ec_jwk(key: ec.EllipticCurvePrivateKey, kid: str, **extra: Any) -> dict[str, Any]:
    return {**ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, **extra}


def write_jwks(path: Path, *keys: dict[str, Any]) -> None:
    path.write_text(json.dumps({"keys": list(keys)}))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def idp_claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {"iss": IDP, "sub": "alice", "aud": IDP_AUDIENCE, "iat": now, "exp": now + 300}
    claims.update(overrides)
    return claims


def idp_token(key: Any, kid: str | None = "rsa-1", algorithm: str = "RS256", **overrides: Any) -> str:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(idp_claims(**overrides), key, algorithm=algorithm, headers=headers)


def svid_claims(**overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {"sub": API_SVID, "aud": "ztai", "exp": int(time.time()) + 300}
    claims.update(overrides)
    return claims


def svid_token(key: ec.EllipticCurvePrivateKey, kid: str | None = "svid-1", **overrides: Any) -> str:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(svid_claims(**overrides), key, algorithm="ES256", headers=headers)


def make_verifier(settings: Settings, database: Database) -> TokenVerifier:
    revocations = RevocationList(database)
    revocations.refresh()
    return TokenVerifier(settings, KeyStore.load(settings.data_path), revocations)


def rejected(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(AuthenticationError) as caught:
        verifier.verify(token)
    return caught.value.code


def b32_path(subject: str, kind: str = "user") -> str:
    encoded = base64.b32encode(subject.encode()).decode().rstrip("=").lower()
    return f"spiffe://example.org/{kind}/idp.example.com/ext/{encoded}"


def idp_settings(ztai_home: Path, **issuer: Any) -> Settings:
    entry = {"issuer": IDP, "audience": IDP_AUDIENCE, "jwks_file": IDP_JWKS, **issuer}
    return load_settings(ztai_home / "ztai.yaml", identity={"external_issuers": [entry]})


# External OIDC issuers ----------------------------------------------------------------------------
@pytest.fixture
def idp_home(ztai_home: Path, rsa_key: rsa.RSAPrivateKey) -> Path:
    write_jwks(ztai_home / IDP_JWKS, rsa_jwk(rsa_key, "rsa-1"))
    return ztai_home


@pytest.fixture
def idp_verifier(idp_home: Path, database: Database) -> TokenVerifier:
    return make_verifier(idp_settings(idp_home), database)


def test_external_token_maps_to_a_user(rsa_key: rsa.RSAPrivateKey, idp_verifier: TokenVerifier) -> None:
    exp = int(time.time()) + 120
    token = idp_token(rsa_key, email="alice@example.com", groups=["ml"], exp=exp)
    principal = idp_verifier.verify(token)
    assert principal.spiffe_id == "spiffe://example.org/user/idp.example.com/alice"
    assert (principal.kind, principal.name, principal.tenant) == (
        "user",
        "idp.example.com/alice",
        "example.org",
    )
    assert principal.issuer == IDP
    assert principal.claims["email"] == "alice@example.com"
    assert principal.claim_set("groups") == []  # an authority claim, and this issuer maps none
    # Without a `jti` the token's digest stands in (so the token can still be revoked).
    assert len(principal.jti) == 40 and int(principal.jti, 16) >= 0
    assert principal.expires_at == exp
    assert idp_verifier.verify(token) is principal  # cached


def test_external_subjects_never_collide_with_ztai_identities_or_other_issuers(
    idp_home: Path, rsa_key: rsa.RSAPrivateKey, database: Database
) -> None:
    named = make_verifier(idp_settings(idp_home, name="corp-sso"), database)
    assert named.verify(idp_token(rsa_key)).spiffe_id == "spiffe://example.org/user/corp-sso/alice"
    default = make_verifier(idp_settings(idp_home), database)
    assert default.verify(idp_token(rsa_key)).spiffe_id != "spiffe://example.org/user/alice"
    with pytest.raises(ValidationError):
        ExternalIssuerSettings(issuer=IDP, audience=IDP_AUDIENCE, jwks_file=IDP_JWKS, name="bad/name")


@pytest.mark.parametrize("claim", ["roles", "models", "tools", "groups", "scopes"])
def test_unmapped_authority_claims_of_an_external_issuer_are_dropped(
    claim: str, rsa_key: rsa.RSAPrivateKey, idp_verifier: TokenVerifier
) -> None:
    principal = idp_verifier.verify(idp_token(rsa_key, **{claim: ["admin", "*"], "email": "a@b.c"}))
    assert claim not in principal.claims
    assert principal.claim_set(claim) == []
    assert principal.claims["email"] == "a@b.c"  # other claims stay (policies do not read them)
    context = principal_context("example.org", "user", principal.claims, IDP, ip="", route="/admin")
    assert context["token"][claim] == []


def test_mapped_authority_claims_count_only_as_mapped(
    idp_home: Path, rsa_key: rsa.RSAPrivateKey, database: Database
) -> None:
    claim_map = {
        "roles": {"claim": "groups", "values": {"idp-admins": "admin", "idp-ops": "admin"}},
        "models": {"values": {"gpt": "mock"}},
    }
    verifier = make_verifier(idp_settings(idp_home, claim_map=claim_map), database)
    token = idp_token(
        rsa_key,
        groups=["idp-admins", "idp-ops", "admin", "IDP-ADMINS"],
        roles=["admin"],  # the issuer's own `roles` are not read: roles come from `groups`
        models=["gpt", "*"],
        tools=["files/*"],
    )
    claims = verifier.verify(token).claims
    assert claims["roles"] == ["admin"]
    assert claims["models"] == ["mock"]
    assert "groups" not in claims and "tools" not in claims
    # A single string value is read as one value; nothing mapped means no claim at all.
    assert verifier.verify(idp_token(rsa_key, sub="bob", groups="idp-ops")).claims["roles"] == ["admin"]
    unmapped = verifier.verify(idp_token(rsa_key, sub="carol", groups=["admin"], roles=["admin"]))
    assert "roles" not in unmapped.claims
    weird = verifier.verify(idp_token(rsa_key, sub="dave", groups={"idp-admins": True}))
    assert "roles" not in weird.claims


def test_claim_map_is_validated(ztai_home: Path) -> None:
    for claim_map in ({"admin": {"values": {}}}, {"roles": {"values": {"a": 1}, "other": 1}}):
        with pytest.raises(ConfigError):
            idp_settings(ztai_home, claim_map=claim_map)


def test_ztai_never_mints_into_another_issuers_namespace(idp_home: Path) -> None:
    settings = load_settings(
        idp_home / "ztai.yaml",
        identity={
            "external_issuers": [
                {"issuer": IDP, "audience": IDP_AUDIENCE, "jwks_file": IDP_JWKS},
                {"issuer": "https://sso.test", "audience": "x", "jwks_file": IDP_JWKS, "name": "Corp"},
            ],
            "spiffe_bundles": [{"trust_domain": PROD, "bundle_file": "b.json"}],
        },
    )
    refused = [
        "spiffe://example.org/user/idp.example.com/alice",
        "spiffe://example.org/user/idp.example.com/ext/mfrgg",
        "spiffe://example.org/agent/idp.example.com/bot",  # any kind: the issuer's name is its namespace
        "spiffe://example.org/user/idp.example.com",
        "spiffe://example.org/user/IDP.example.com/alice",
        "spiffe://example.org/user/corp/alice",
        f"spiffe://{PROD}/service/api",  # a trusted SPIFFE trust domain's SPIRE vouches for it
    ]
    for subject in refused:
        assert foreign_owner(settings, subject), subject
        with pytest.raises(MalformedRequest) as caught:
            refuse_foreign_subject(settings, subject)
        assert caught.value.code == "foreign_subject"
        assert "does not issue tokens" in caught.value.message
    allowed = [
        "spiffe://example.org/user/alice",
        "spiffe://example.org/user/idp.example.com.evil/alice",
        "spiffe://example.org/user/alice/idp.example.com",
        "spiffe://other.example.org/user/idp.example.com/alice",  # another tenant: no issuer there
    ]
    for subject in allowed:
        assert foreign_owner(settings, subject) == "", subject
        refuse_foreign_subject(settings, subject)
    with pytest.raises(AuthenticationError):
        refuse_foreign_subject(settings, "not-a-spiffe-id")


def test_external_token_jti_is_kept(rsa_key: rsa.RSAPrivateKey, idp_verifier: TokenVerifier) -> None:
    assert idp_verifier.verify(idp_token(rsa_key, jti="idp-jti-1")).jti == "idp-jti-1"


def test_external_token_from_a_yaml_config(
    idp_home: Path, rsa_key: rsa.RSAPrivateKey, database: Database
) -> None:
    config = idp_home / "ztai.yaml"
    config.write_text(
        config.read_text()
        + "identity:\n"
        + "  external_issuers:\n"
        + f"    - {{issuer: '{IDP}', audience: {IDP_AUDIENCE}, jwks_file: {IDP_JWKS}, principal_kind: agent}}\n"
    )
    verifier = make_verifier(load_settings(config), database)
    assert (
        verifier.verify(idp_token(rsa_key, sub="bot-7")).spiffe_id
        == "spiffe://example.org/agent/idp.example.com/bot-7"
    )


def test_external_token_with_another_subject_claim(
    idp_home: Path, rsa_key: rsa.RSAPrivateKey, database: Database
) -> None:
    verifier = make_verifier(idp_settings(idp_home, subject_claim="preferred_username"), database)
    token = idp_token(rsa_key, sub="00u1a2b3c", preferred_username="alice")
    assert verifier.verify(token).spiffe_id == "spiffe://example.org/user/idp.example.com/alice"
    assert rejected(verifier, idp_token(rsa_key, sub="00u1a2b3c")) == "invalid_subject"


def test_subject_with_at_sign_is_encoded(rsa_key: rsa.RSAPrivateKey, idp_verifier: TokenVerifier) -> None:
    alice = idp_verifier.verify(idp_token(rsa_key, sub="alice@example.com"))
    assert alice.spiffe_id == b32_path("alice@example.com")
    assert alice.spiffe_id.startswith("spiffe://example.org/user/idp.example.com/ext/")
    other = idp_verifier.verify(idp_token(rsa_key, sub="alice@example.org"))
    assert other.spiffe_id == b32_path("alice@example.org")
    assert other.spiffe_id != alice.spiffe_id


def test_subject_mapping_never_collides() -> None:
    issuer = ExternalIssuer(
        ExternalIssuerSettings(issuer=IDP, audience=IDP_AUDIENCE, jwks_file=IDP_JWKS), Path("."), 5
    )
    subjects = [
        "alice",
        "Alice",
        "ALICE",
        "alice@example.com",
        "alice@example.org",
        "alice@example.co",
        "ext",
        "ext/alice",
        "alice/../admin",
        ".",
        "..",
        "...",
        "a b",
        "a_b",
        "a-b",
        "\u00e1lice",
        "a" * 255,
        "a" * 256,
        "123",
        "mfrgg",  # the base32 of "abc": as a plain subject it stays in its own, shorter path
        "abc@",
        "abc",
    ]
    paths = [issuer.subject_path({"sub": s}) for s in subjects]
    assert len(set(paths)) == len(subjects)
    for subject, path in zip(subjects, paths, strict=True):
        kind, issuer_name, *rest = path.split("/")
        assert (kind, issuer_name) == ("user", "idp.example.com")
        assert all(segment and segment not in (".", "..") for segment in rest)
        if len(rest) == 2:
            assert rest[0] == "ext"
            padded = rest[1].upper() + "=" * (-len(rest[1]) % 8)
            assert base64.b32decode(padded).decode() == subject  # reversible, so injective
        else:
            assert rest == [subject]
    with pytest.raises(AuthenticationError) as caught:
        issuer.subject_path({"sub": ""})
    assert caught.value.code == "invalid_subject"
    with pytest.raises(AuthenticationError):
        issuer.subject_path({})


@pytest.mark.parametrize("subject", ["", "a" * 1300 + "@x"])
def test_unusable_external_subjects(
    subject: str, rsa_key: rsa.RSAPrivateKey, idp_verifier: TokenVerifier
) -> None:
    assert rejected(idp_verifier, idp_token(rsa_key, sub=subject)) == "invalid_subject"


def test_external_wrong_audience(rsa_key: rsa.RSAPrivateKey, idp_verifier: TokenVerifier) -> None:
    assert rejected(idp_verifier, idp_token(rsa_key, aud="ztai")) == "wrong_audience"
    assert rejected(idp_verifier, idp_token(rsa_key, aud=["other-app"])) == "wrong_audience"
    assert (
        idp_verifier.verify(idp_token(rsa_key, aud=["other-app", IDP_AUDIENCE])).name
        == "idp.example.com/alice"
    )


def test_external_wrong_issuer(rsa_key: rsa.RSAPrivateKey, idp_verifier: TokenVerifier) -> None:
    # Signed by the trusted key but claiming an issuer that is not configured: there is no trust for it.
    # Its subject is no SPIFFE ID, so it fails as a (would-be) JWT-SVID on the subject.
    for issuer in ["https://evil.example.com", IDP + "/", IDP.upper()]:
        assert rejected(idp_verifier, idp_token(rsa_key, iss=issuer)) == "invalid_subject"
    token = idp_token(
        rsa_key, iss="https://evil.example.com", sub="spiffe://example.org/user/idp.example.com/alice"
    )
    assert rejected(idp_verifier, token) == "unknown_issuer"


def test_external_expired(rsa_key: rsa.RSAPrivateKey, idp_verifier: TokenVerifier) -> None:
    now = int(time.time())
    assert rejected(idp_verifier, idp_token(rsa_key, iat=now - 400, exp=now - 60)) == "token_expired"
    # Within the leeway (5 s) it is still accepted.
    assert idp_verifier.verify(idp_token(rsa_key, iat=now - 400, exp=now - 2)).name == "idp.example.com/alice"


def test_external_not_yet_valid(rsa_key: rsa.RSAPrivateKey, idp_verifier: TokenVerifier) -> None:
    now = int(time.time())
    assert rejected(idp_verifier, idp_token(rsa_key, nbf=now + 120)) == "token_not_yet_valid"


@pytest.mark.parametrize("claim", ["exp", "iat", "sub", "aud"])
def test_external_required_claims(
    claim: str, rsa_key: rsa.RSAPrivateKey, idp_verifier: TokenVerifier
) -> None:
    claims = idp_claims()
    del claims[claim]
    token = jwt.encode(claims, rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
    assert rejected(idp_verifier, token) == "malformed_token"


def test_external_unknown_kid(rsa_key: rsa.RSAPrivateKey, idp_verifier: TokenVerifier) -> None:
    assert rejected(idp_verifier, idp_token(rsa_key, kid="rsa-2")) == "unknown_key"


def test_external_token_without_kid(
    idp_home: Path, rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey, database: Database
) -> None:
    # With a single key in the JWKS a token without kid is checked against it...
    verifier = make_verifier(idp_settings(idp_home), database)
    assert verifier.verify(idp_token(rsa_key, kid=None)).name == "idp.example.com/alice"
    # ...with several it is ambiguous and rejected.
    write_jwks(idp_home / IDP_JWKS, rsa_jwk(rsa_key, "rsa-1"), rsa_jwk(other_rsa_key, "rsa-2"))
    verifier = make_verifier(idp_settings(idp_home), database)
    assert rejected(verifier, idp_token(rsa_key, kid=None)) == "unknown_key"


def test_external_bad_signature(
    rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey, idp_verifier: TokenVerifier
) -> None:
    assert rejected(idp_verifier, idp_token(other_rsa_key, kid="rsa-1")) == "bad_signature"
    header, _payload, signature = idp_token(rsa_key).split(".")
    forged = b64url(json.dumps(idp_claims(sub="admin")).encode())
    assert rejected(idp_verifier, f"{header}.{forged}.{signature}") == "bad_signature"


def test_external_algorithm_attacks(
    rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey, idp_verifier: TokenVerifier
) -> None:
    # HS256 keyed with the issuer's public key (PEM): not in the issuer's algorithms.
    secret = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signing_input = (
        f"{b64url(json.dumps({'alg': 'HS256', 'kid': 'rsa-1'}).encode())}."
        f"{b64url(json.dumps(idp_claims()).encode())}"
    )
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    assert rejected(idp_verifier, f"{signing_input}.{b64url(mac)}") == "bad_algorithm"
    # alg none.
    unsigned = (
        f"{b64url(json.dumps({'alg': 'none', 'kid': 'rsa-1'}).encode())}.{signing_input.split('.')[1]}."
    )
    assert rejected(idp_verifier, unsigned) == "bad_algorithm"
    # ES256 is an allowed algorithm, but the key named by the kid is an RSA key.
    assert rejected(idp_verifier, idp_token(ec_key, kid="rsa-1", algorithm="ES256")) == "bad_algorithm"


def test_external_issuer_algorithms_are_enforced(
    idp_home: Path, rsa_key: rsa.RSAPrivateKey, database: Database
) -> None:
    verifier = make_verifier(idp_settings(idp_home, algorithms=["ES256"]), database)
    assert rejected(verifier, idp_token(rsa_key)) == "bad_algorithm"


def test_external_ec_issuer(ztai_home: Path, ec_key: ec.EllipticCurvePrivateKey, database: Database) -> None:
    write_jwks(ztai_home / IDP_JWKS, ec_jwk(ec_key, "ec-1", use="sig"))
    verifier = make_verifier(idp_settings(ztai_home), database)
    token = idp_token(ec_key, kid="ec-1", algorithm="ES256", sub="bob")
    assert verifier.verify(token).spiffe_id == "spiffe://example.org/user/idp.example.com/bob"


def test_jwks_skips_encryption_and_unusable_keys(
    ztai_home: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey, database: Database
) -> None:
    write_jwks(
        ztai_home / IDP_JWKS,
        {**rsa_jwk(rsa_key, "enc-1"), "use": "enc"},
        {"kty": "XYZ", "kid": "weird"},
        ec_jwk(ec_key, "ec-1"),
    )
    verifier = make_verifier(idp_settings(ztai_home), database)
    assert rejected(verifier, idp_token(rsa_key, kid="enc-1")) == "unknown_key"
    assert verifier.verify(idp_token(ec_key, kid="ec-1", algorithm="ES256")).name == "idp.example.com/alice"


def test_jwks_is_refetched_for_a_new_kid(
    idp_home: Path,
    rsa_key: rsa.RSAPrivateKey,
    other_rsa_key: rsa.RSAPrivateKey,
    idp_verifier: TokenVerifier,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert idp_verifier.verify(idp_token(rsa_key)).name == "idp.example.com/alice"  # JWKS loaded

    # The provider rotates: a new key appears in its JWKS.
    write_jwks(idp_home / IDP_JWKS, rsa_jwk(rsa_key, "rsa-1"), rsa_jwk(other_rsa_key, "rsa-2"))
    new_token = idp_token(other_rsa_key, kid="rsa-2", sub="bob")
    # Re-reading for unknown kids is rate-limited (10 s), so right after a load it is not re-read...
    assert rejected(idp_verifier, new_token) == "unknown_key"
    # ...but once the interval has passed the new key is picked up.
    monkeypatch.setattr(external_module, "_MIN_UNKNOWN_KID_REFETCH_SECONDS", 0.0)
    assert idp_verifier.verify(new_token).name == "idp.example.com/bob"
    assert idp_verifier.verify(idp_token(rsa_key)).name == "idp.example.com/alice"


def test_jwks_refresh_drops_removed_keys(
    idp_home: Path,
    rsa_key: rsa.RSAPrivateKey,
    other_rsa_key: rsa.RSAPrivateKey,
    database: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = idp_settings(idp_home, refresh_seconds=1.0)
    verifier = make_verifier(settings, database)
    assert verifier.verify(idp_token(rsa_key, sub="first")).name == "idp.example.com/first"
    write_jwks(idp_home / IDP_JWKS, rsa_jwk(other_rsa_key, "rsa-2"))
    # Once the refresh interval has passed, the JWKS is re-read: rsa-1 is gone.
    real_monotonic = time.monotonic
    clock = SimpleNamespace(monotonic=lambda: real_monotonic() + 2.0, time=time.time)
    monkeypatch.setattr(external_module, "time", clock)
    assert rejected(verifier, idp_token(rsa_key, sub="second")) == "unknown_key"
    assert verifier.verify(idp_token(other_rsa_key, kid="rsa-2", sub="third")).name == "idp.example.com/third"


def test_jwks_unavailable(ztai_home: Path, rsa_key: rsa.RSAPrivateKey, database: Database) -> None:
    verifier = make_verifier(idp_settings(ztai_home), database)  # no JWKS file written
    assert rejected(verifier, idp_token(rsa_key)) == "jwks_unavailable"
    (ztai_home / IDP_JWKS).write_text("not json")
    assert rejected(verifier, idp_token(rsa_key)) == "jwks_unavailable"
    (ztai_home / IDP_JWKS).write_text("[]")
    assert rejected(verifier, idp_token(rsa_key)) == "jwks_unavailable"


def test_jwks_outage_keeps_the_last_good_keys(
    idp_home: Path,
    rsa_key: rsa.RSAPrivateKey,
    idp_verifier: TokenVerifier,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert idp_verifier.verify(idp_token(rsa_key, sub="before")).name == "idp.example.com/before"
    (idp_home / IDP_JWKS).unlink()
    monkeypatch.setattr(external_module, "_MIN_UNKNOWN_KID_REFETCH_SECONDS", 0.0)
    assert rejected(idp_verifier, idp_token(rsa_key, kid="rsa-9")) == "unknown_key"  # tried, failed
    assert idp_verifier.verify(idp_token(rsa_key, sub="during")).name == "idp.example.com/during"


def test_external_token_can_be_revoked(
    rsa_key: rsa.RSAPrivateKey, idp_home: Path, database: Database
) -> None:
    revocations = RevocationList(database)
    revocations.refresh()
    verifier = TokenVerifier(idp_settings(idp_home), KeyStore.load(idp_home / "data"), revocations)
    token = idp_token(rsa_key)
    principal = verifier.verify(token)
    revocations.revoke(principal.tenant, principal.jti, principal.expires_at)
    assert rejected(verifier, token) == "token_revoked"
    assert verifier.verify(idp_token(rsa_key, sub="bob")).name == "idp.example.com/bob"


async def test_external_verify_async(rsa_key: rsa.RSAPrivateKey, idp_verifier: TokenVerifier) -> None:
    token = idp_token(rsa_key)
    principal = await idp_verifier.verify_async(token)
    assert principal.spiffe_id == "spiffe://example.org/user/idp.example.com/alice"
    assert await idp_verifier.verify_async(token) is principal


def test_external_issuer_cannot_reuse_ztai_issuer(idp_home: Path, database: Database) -> None:
    settings = idp_settings(idp_home, issuer="spiffe://example.org/service/ztai")
    with pytest.raises(ConfigError):
        make_verifier(settings, database)


@pytest.mark.parametrize(
    "entry",
    [
        {"issuer": IDP, "audience": IDP_AUDIENCE},
        {"issuer": IDP, "audience": IDP_AUDIENCE, "jwks_file": IDP_JWKS, "jwks_url": "https://idp/jwks"},
        {"issuer": IDP, "audience": IDP_AUDIENCE, "jwks_file": IDP_JWKS, "principal_kind": "robot"},
        {"issuer": IDP, "jwks_file": IDP_JWKS},
    ],
)
def test_external_issuer_config_is_validated(entry: dict[str, Any], ztai_home: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(ztai_home / "ztai.yaml", identity={"external_issuers": [entry]})
    assert "external_issuers" in caught.value.message


# SPIFFE JWT-SVIDs -----------------------------------------------------------------------------------
def write_bundle(path: Path, *keys: dict[str, Any]) -> None:
    write_jwks(path, *[{**k, "use": "jwt-svid"} for k in keys])


def spiffe_settings(ztai_home: Path, *bundles: dict[str, Any]) -> Settings:
    return load_settings(ztai_home / "ztai.yaml", identity={"spiffe_bundles": list(bundles)})


@pytest.fixture
def prod_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def svid_verifier(ztai_home: Path, prod_key: ec.EllipticCurvePrivateKey, database: Database) -> TokenVerifier:
    write_bundle(ztai_home / "prod-bundle.json", ec_jwk(prod_key, "svid-1"))
    settings = spiffe_settings(
        ztai_home, {"trust_domain": PROD, "bundle_file": "prod-bundle.json", "audience": "ztai"}
    )
    return make_verifier(settings, database)


def test_jwt_svid_verifies(prod_key: ec.EllipticCurvePrivateKey, svid_verifier: TokenVerifier) -> None:
    claims = svid_claims()
    token = jwt.encode(claims, prod_key, algorithm="ES256", headers={"kid": "svid-1"})
    principal = svid_verifier.verify(token)
    assert principal.spiffe_id == API_SVID
    assert (principal.kind, principal.name, principal.tenant) == ("service", "api", PROD)
    assert principal.issuer == f"spiffe://{PROD}"
    assert principal.expires_at == claims["exp"]
    assert len(principal.jti) == 40
    assert svid_verifier.verify(token) is principal


def test_jwt_svid_authority_claims_count_only_mapped(
    ztai_home: Path, prod_key: ec.EllipticCurvePrivateKey, database: Database
) -> None:
    write_bundle(ztai_home / "prod-bundle.json", ec_jwk(prod_key, "svid-1"))
    bundle = {"trust_domain": PROD, "bundle_file": "prod-bundle.json"}
    plain = make_verifier(spiffe_settings(ztai_home, bundle), database)
    token = svid_token(prod_key, roles=["admin"], models=["*"], tools=["files/*"])
    assert not {"roles", "models", "tools"} & set(plain.verify(token).claims)
    mapped = {**bundle, "claim_map": {"roles": {"values": {"spire-admin": "admin"}}}}
    verifier = make_verifier(spiffe_settings(ztai_home, mapped), database)
    assert verifier.verify(svid_token(prod_key, roles=["spire-admin", "admin"])).claims["roles"] == ["admin"]


def test_jwt_svid_keeps_its_iss_and_jti(
    prod_key: ec.EllipticCurvePrivateKey, svid_verifier: TokenVerifier
) -> None:
    token = svid_token(prod_key, iss="https://spire.prod.example.org", jti="svid-jti", aud=["ztai", "x"])
    principal = svid_verifier.verify(token)
    assert (principal.issuer, principal.jti) == ("https://spire.prod.example.org", "svid-jti")


def test_jwt_svid_from_an_unconfigured_trust_domain(
    prod_key: ec.EllipticCurvePrivateKey, svid_verifier: TokenVerifier
) -> None:
    token = svid_token(prod_key, sub="spiffe://other.example.org/service/api")
    assert rejected(svid_verifier, token) == "unknown_issuer"
    # ztai's own trust domain is not trusted for JWT-SVIDs unless configured.
    assert (
        rejected(svid_verifier, svid_token(prod_key, sub="spiffe://example.org/service/api"))
        == "unknown_issuer"
    )


def test_jwt_svid_wrong_audience(prod_key: ec.EllipticCurvePrivateKey, svid_verifier: TokenVerifier) -> None:
    assert rejected(svid_verifier, svid_token(prod_key, aud="not-ztai")) == "invalid_svid"
    assert rejected(svid_verifier, svid_token(prod_key, aud=[])) == "invalid_svid"


def test_jwt_svid_expired(prod_key: ec.EllipticCurvePrivateKey, svid_verifier: TokenVerifier) -> None:
    token = svid_token(prod_key, exp=int(time.time()) - 60)
    assert rejected(svid_verifier, token) == "invalid_svid"  # no leeway for JWT-SVIDs


def test_jwt_svid_not_yet_valid(prod_key: ec.EllipticCurvePrivateKey, svid_verifier: TokenVerifier) -> None:
    assert rejected(svid_verifier, svid_token(prod_key, nbf=int(time.time()) + 300)) == "invalid_svid"


def test_jwt_svid_signature_and_key_checks(
    prod_key: ec.EllipticCurvePrivateKey, svid_verifier: TokenVerifier
) -> None:
    attacker = ec.generate_private_key(ec.SECP256R1())
    assert rejected(svid_verifier, svid_token(attacker)) == "invalid_svid"  # right kid, wrong key
    assert rejected(svid_verifier, svid_token(prod_key, kid="svid-2")) == "invalid_svid"  # unknown kid
    assert rejected(svid_verifier, svid_token(prod_key, kid=None)) == "invalid_svid"  # no kid


def test_jwt_svid_algorithm_attacks(
    prod_key: ec.EllipticCurvePrivateKey, svid_verifier: TokenVerifier
) -> None:
    payload = b64url(json.dumps(svid_claims()).encode())
    unsigned = f"{b64url(json.dumps({'alg': 'none', 'kid': 'svid-1'}).encode())}.{payload}."
    assert rejected(svid_verifier, unsigned) == "bad_algorithm"
    public_jwk = json.dumps(ec_jwk(prod_key, "svid-1")).encode()
    signing_input = f"{b64url(json.dumps({'alg': 'HS256', 'kid': 'svid-1'}).encode())}.{payload}"
    mac = hmac.new(public_jwk, signing_input.encode(), hashlib.sha256).digest()
    assert rejected(svid_verifier, f"{signing_input}.{b64url(mac)}") == "invalid_svid"


def test_jwt_svid_subject_must_be_a_ztai_principal(
    prod_key: ec.EllipticCurvePrivateKey, svid_verifier: TokenVerifier
) -> None:
    # A common SPIRE shape, but not /<kind>/<name> with a ztai kind.
    token = svid_token(prod_key, sub=f"spiffe://{PROD}/ns/default/sa/api")
    assert rejected(svid_verifier, token) == "invalid_subject"
    assert (
        rejected(svid_verifier, svid_token(prod_key, sub=f"spiffe://{PROD}/service/../api"))
        == "invalid_subject"
    )


def test_jwt_svid_is_checked_against_its_own_trust_domain(
    ztai_home: Path, prod_key: ec.EllipticCurvePrivateKey, database: Database
) -> None:
    staging_key = ec.generate_private_key(ec.SECP256R1())
    write_bundle(ztai_home / "prod-bundle.json", ec_jwk(prod_key, "prod-1"))
    write_bundle(ztai_home / "staging-bundle.json", ec_jwk(staging_key, "staging-1"))
    settings = spiffe_settings(
        ztai_home,
        {"trust_domain": PROD, "bundle_file": "prod-bundle.json"},
        {"trust_domain": STAGING, "bundle_file": "staging-bundle.json"},
    )
    verifier = make_verifier(settings, database)
    staging_svid = svid_token(staging_key, kid="staging-1", sub=f"spiffe://{STAGING}/service/api")
    assert verifier.verify(staging_svid).tenant == STAGING
    # Staging's key cannot vouch for a production identity.
    forged = svid_token(staging_key, kid="staging-1", sub=API_SVID)
    assert rejected(verifier, forged) == "invalid_svid"
    assert verifier.verify(svid_token(prod_key, kid="prod-1")).tenant == PROD


def test_jwt_svid_with_an_rsa_bundle(ztai_home: Path, rsa_key: rsa.RSAPrivateKey, database: Database) -> None:
    write_bundle(ztai_home / "prod-bundle.json", rsa_jwk(rsa_key, "rsa-svid"))
    settings = spiffe_settings(ztai_home, {"trust_domain": PROD, "bundle_file": "prod-bundle.json"})
    verifier = make_verifier(settings, database)
    token = jwt.encode(svid_claims(), rsa_key, algorithm="RS256", headers={"kid": "rsa-svid"})
    assert verifier.verify(token).spiffe_id == API_SVID


def test_jwt_svid_can_be_revoked(
    ztai_home: Path, prod_key: ec.EllipticCurvePrivateKey, database: Database
) -> None:
    write_bundle(ztai_home / "prod-bundle.json", ec_jwk(prod_key, "svid-1"))
    settings = spiffe_settings(ztai_home, {"trust_domain": PROD, "bundle_file": "prod-bundle.json"})
    revocations = RevocationList(database)
    revocations.refresh()
    verifier = TokenVerifier(settings, KeyStore.load(settings.data_path), revocations)
    token = svid_token(prod_key)
    principal = verifier.verify(token)
    revocations.revoke(principal.tenant, principal.jti, principal.expires_at)
    assert rejected(verifier, token) == "token_revoked"


async def test_jwt_svid_verify_async(
    prod_key: ec.EllipticCurvePrivateKey, svid_verifier: TokenVerifier
) -> None:
    principal = await svid_verifier.verify_async(svid_token(prod_key))
    assert principal.spiffe_id == API_SVID


@pytest.mark.parametrize("content", [None, "", "not json", '{"keys": [{"kty": "EC"}]}'])
def test_bad_bundle_file_is_a_config_error(content: str | None, ztai_home: Path, database: Database) -> None:
    if content is not None:
        (ztai_home / "prod-bundle.json").write_text(content)
    settings = spiffe_settings(ztai_home, {"trust_domain": PROD, "bundle_file": "prod-bundle.json"})
    with pytest.raises(ConfigError) as caught:
        make_verifier(settings, database)
    assert "spiffe_bundles" in caught.value.message


def test_bundle_entries_need_a_kid(
    ztai_home: Path, prod_key: ec.EllipticCurvePrivateKey, database: Database
) -> None:
    jwk = ec_jwk(prod_key, "x")
    del jwk["kid"]
    write_bundle(ztai_home / "prod-bundle.json", jwk)
    settings = spiffe_settings(ztai_home, {"trust_domain": PROD, "bundle_file": "prod-bundle.json"})
    with pytest.raises(ConfigError):
        make_verifier(settings, database)
