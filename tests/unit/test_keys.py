"""Signing keys: creation, file permissions, JWKS, rotation, reloading and encryption at rest."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import stat
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

import ztai.identity.verifier as verifier_module
from ztai.config import Settings
from ztai.errors import AuthenticationError, ConfigError
from ztai.identity import KeyStore, RevocationList, TokenVerifier, issue_token
from ztai.identity.keys import KEYS_FILE, PASSPHRASE_ENV, key_id, public_jwk
from ztai.store import Database

ALICE = "spiffe://example.org/user/alice"


# Helpers -------------------------------------------------------------------------------------------
def issue(keys: KeyStore, settings: Settings) -> str:
    return issue_token(
        keys,
        subject=ALICE,
        issuer=settings.issuer,
        audience=settings.identity.audience,
        ttl_seconds=300,
        max_ttl_seconds=settings.identity.max_ttl_seconds,
    ).token


def make_verifier(settings: Settings, keys: KeyStore, database: Database) -> TokenVerifier:
    revocations = RevocationList(database)
    revocations.refresh()
    return TokenVerifier(settings, keys, revocations)


def max_lifetime(settings: Settings) -> float:
    """The lifetime the verifier allows a token (and so a retired key)."""
    return float(settings.identity.max_ttl_seconds + settings.identity.leeway_seconds)


def file_mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def raw_private(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def kid_of(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


def backdate(path: Path) -> None:
    """Give the keys file an old mtime, so a later save is seen as a change even on coarse clocks."""
    old = time.time() - 100
    os.utime(path, (old, old))


# Creation and loading ------------------------------------------------------------------------------
def test_create_writes_keys_with_mode_0600(tmp_path: Path) -> None:
    data_dir = tmp_path / "fresh" / "data"
    keys = KeyStore.create(data_dir)

    path = data_dir / KEYS_FILE
    assert keys.path == path
    assert file_mode(path) == 0o600
    assert file_mode(data_dir) & 0o077 == 0
    assert not (data_dir / "keys.tmp").exists()
    document = json.loads(path.read_text())
    assert set(document) == {"signing", "audit"}
    assert len(document["signing"]) == 1
    entry = document["signing"][0]
    assert entry["kid"] == keys.active.kid
    assert entry["retired_at"] is None
    assert entry["pem"].startswith("-----BEGIN PRIVATE KEY-----")
    assert document["audit"]["kid"] == keys.audit.kid != keys.active.kid


def test_create_never_overwrites(tmp_path: Path) -> None:
    KeyStore.create(tmp_path)
    before = (tmp_path / KEYS_FILE).read_bytes()
    with pytest.raises(ConfigError) as caught:
        KeyStore.create(tmp_path)
    assert caught.value.code == "invalid_config"
    assert (tmp_path / KEYS_FILE).read_bytes() == before


def test_create_respects_a_restrictive_umask(tmp_path: Path) -> None:
    previous = os.umask(0o077)
    try:
        KeyStore.create(tmp_path / "data")
    finally:
        os.umask(previous)
    assert file_mode(tmp_path / "data" / KEYS_FILE) == 0o600


def test_load_round_trips(tmp_path: Path) -> None:
    created = KeyStore.create(tmp_path)
    loaded = KeyStore.load(tmp_path)
    assert [k.kid for k in loaded.signing] == [k.kid for k in created.signing]
    assert loaded.active.created_at == created.active.created_at
    assert raw_private(loaded.active.private_key) == raw_private(created.active.private_key)
    assert raw_private(loaded.audit.private_key) == raw_private(created.audit.private_key)
    assert loaded.audit.kid == created.audit.kid


def test_load_without_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        KeyStore.load(tmp_path)
    assert caught.value.code == "invalid_config"
    assert "ztai init" in caught.value.message


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o666, 0o610, 0o601], ids=oct)
def test_load_refuses_a_file_readable_by_others(mode: int, tmp_path: Path) -> None:
    KeyStore.create(tmp_path)
    (tmp_path / KEYS_FILE).chmod(mode)
    with pytest.raises(ConfigError) as caught:
        KeyStore.load(tmp_path)
    assert caught.value.code == "invalid_config"
    assert "chmod 600" in caught.value.message


@pytest.mark.parametrize("mode", [0o600, 0o400], ids=oct)
def test_load_accepts_owner_only_modes(mode: int, tmp_path: Path) -> None:
    KeyStore.create(tmp_path)
    (tmp_path / KEYS_FILE).chmod(mode)
    assert KeyStore.load(tmp_path).active.kid


def test_load_refuses_a_key_that_is_not_ed25519(tmp_path: Path) -> None:
    KeyStore.create(tmp_path)
    path = tmp_path / KEYS_FILE
    document = json.loads(path.read_text())
    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    document["signing"][0]["pem"] = ec_pem.decode()
    path.write_text(json.dumps(document))
    with pytest.raises(ConfigError) as caught:
        KeyStore.load(tmp_path)
    assert "not Ed25519" in caught.value.message


def test_load_refuses_a_garbled_pem(tmp_path: Path) -> None:
    KeyStore.create(tmp_path)
    path = tmp_path / KEYS_FILE
    document = json.loads(path.read_text())
    document["signing"][0]["pem"] = "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n"
    path.write_text(json.dumps(document))
    with pytest.raises(ConfigError):
        KeyStore.load(tmp_path)


# Key ids and JWKS ---------------------------------------------------------------------------------
def test_key_id_is_the_rfc7638_thumbprint() -> None:
    # RFC 8037, appendix A.2 and A.3: the Ed25519 test key and its JWK thumbprint.
    x = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
    public = Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(x + "="))
    assert public_jwk(public) == {"kty": "OKP", "crv": "Ed25519", "x": x}
    assert key_id(public) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def test_jwks_publishes_public_keys_only(settings: Settings) -> None:
    keys = KeyStore.load(settings.data_path)
    document = keys.jwks(max_lifetime(settings))
    assert len(document["keys"]) == 1
    (jwk,) = document["keys"]
    assert jwk == {**public_jwk(keys.active.public_key), "kid": keys.active.kid, "alg": "EdDSA", "use": "sig"}
    assert "d" not in jwk
    assert keys.audit.kid not in {k["kid"] for k in document["keys"]}


def test_jwks_verifies_issued_tokens(settings: Settings) -> None:
    """A relying party holding only the JWKS can verify ztai's tokens."""
    keys = KeyStore.load(settings.data_path)
    token = issue(keys, settings)
    by_kid = {k["kid"]: jwt.PyJWK(k) for k in keys.jwks(max_lifetime(settings))["keys"]}
    claims = jwt.decode(
        token, key=by_kid[kid_of(token)], algorithms=["EdDSA"], audience="ztai", issuer=settings.issuer
    )
    assert claims["sub"] == ALICE


# Rotation -------------------------------------------------------------------------------------------
def test_rotate_retires_the_old_key(settings: Settings) -> None:
    keys = KeyStore.load(settings.data_path)
    old = keys.active
    before = time.time()
    fresh = keys.rotate(max_lifetime(settings))

    assert fresh.kid != old.kid
    assert keys.active.kid == fresh.kid
    assert fresh.retired_at is None
    retired = next(k for k in keys.signing if k.kid == old.kid)
    assert retired.retired_at is not None and before <= retired.retired_at <= time.time()
    assert retired.created_at == old.created_at
    # Persisted, with the same permissions.
    reloaded = KeyStore.load(settings.data_path)
    assert [(k.kid, k.retired_at) for k in reloaded.signing] == [(k.kid, k.retired_at) for k in keys.signing]
    assert reloaded.active.kid == fresh.kid
    assert file_mode(keys.path) == 0o600
    # The audit key does not rotate with the token keys.
    assert reloaded.audit.kid == keys.audit.kid


def test_rotation_keeps_old_tokens_valid(settings: Settings, database: Database) -> None:
    keys = KeyStore.load(settings.data_path)
    verifier = make_verifier(settings, keys, database)
    old_kid = keys.active.kid
    old_token = issue(keys, settings)

    fresh = keys.rotate(max_lifetime(settings))
    new_token = issue(keys, settings)

    assert kid_of(old_token) == old_kid
    assert kid_of(new_token) == fresh.kid != old_kid
    assert verifier.verify(old_token).spiffe_id == ALICE
    assert verifier.verify(new_token).spiffe_id == ALICE
    # And so does a verifier started after the rotation, from the file.
    restarted = make_verifier(settings, KeyStore.load(settings.data_path), database)
    assert restarted.verify(old_token).spiffe_id == ALICE
    assert restarted.verify(new_token).spiffe_id == ALICE

    jwks_kids = [k["kid"] for k in keys.jwks(max_lifetime(settings))["keys"]]
    assert jwks_kids == [old_kid, fresh.kid]


def test_rotating_twice_keeps_every_unexpired_key(settings: Settings, database: Database) -> None:
    keys = KeyStore.load(settings.data_path)
    tokens = [issue(keys, settings)]
    for _ in range(2):
        keys.rotate(max_lifetime(settings))
        tokens.append(issue(keys, settings))
    assert len({kid_of(t) for t in tokens}) == 3
    assert [k.retired_at is None for k in keys.signing] == [False, False, True]
    assert len(keys.jwks(max_lifetime(settings))["keys"]) == 3
    verifier = make_verifier(settings, KeyStore.load(settings.data_path), database)
    for token in tokens:
        assert verifier.verify(token).spiffe_id == ALICE


def test_retired_key_past_its_lifetime_is_dropped(settings: Settings, database: Database) -> None:
    keys = KeyStore.load(settings.data_path)
    old_kid = keys.active.kid
    old_token = issue(keys, settings)
    keys.rotate(max_lifetime(settings))
    new_token = issue(keys, settings)

    # Pretend the old key was retired long ago: every token it signed would have expired.
    long_ago = time.time() - 10 * max_lifetime(settings)
    keys.signing = [
        dataclasses.replace(k, retired_at=long_ago) if k.kid == old_kid else k for k in keys.signing
    ]
    keys.save()

    assert [k["kid"] for k in keys.jwks(max_lifetime(settings))["keys"]] == [kid_of(new_token)]
    assert keys.verification_key(old_kid, max_lifetime(settings)) is None
    assert keys.verification_key(kid_of(new_token), max_lifetime(settings)) is not None
    verifier = make_verifier(settings, KeyStore.load(settings.data_path), database)
    with pytest.raises(AuthenticationError) as caught:
        verifier.verify(old_token)
    assert caught.value.code == "unknown_key"
    assert verifier.verify(new_token).spiffe_id == ALICE

    # The next rotation removes it from the file altogether.
    keys.rotate(max_lifetime(settings))
    assert old_kid not in {k.kid for k in KeyStore.load(settings.data_path).signing}


def test_retired_key_still_within_its_lifetime_verifies(settings: Settings, database: Database) -> None:
    keys = KeyStore.load(settings.data_path)
    old_kid = keys.active.kid
    old_token = issue(keys, settings)
    keys.rotate(max_lifetime(settings))
    almost = time.time() - max_lifetime(settings) + 60
    keys.signing = [
        dataclasses.replace(k, retired_at=almost) if k.kid == old_kid else k for k in keys.signing
    ]
    keys.save()
    verifier = make_verifier(settings, KeyStore.load(settings.data_path), database)
    assert verifier.verify(old_token).spiffe_id == ALICE
    assert old_kid in {k["kid"] for k in keys.jwks(max_lifetime(settings))["keys"]}


def test_rotate_with_zero_lifetime_drops_retired_keys(tmp_path: Path) -> None:
    keys = KeyStore.create(tmp_path)
    first = keys.active.kid
    second = keys.rotate(3600).kid
    assert [k.kid for k in keys.signing] == [first, second]
    third = keys.rotate(0).kid
    assert [k.kid for k in keys.signing] == [second, third]  # `first` was already retired
    assert keys.jwks(0)["keys"][-1]["kid"] == third
    assert [k["kid"] for k in keys.jwks(0)["keys"]] == [third]


# Reloading ----------------------------------------------------------------------------------------
def test_reload_if_changed_picks_up_another_instances_rotation(settings: Settings) -> None:
    backdate(settings.data_path / KEYS_FILE)
    server = KeyStore.load(settings.data_path)
    assert server.reload_if_changed() is False

    cli = KeyStore.load(settings.data_path)
    fresh = cli.rotate(max_lifetime(settings))

    assert server.reload_if_changed() is True
    assert server.active.kid == fresh.kid
    assert [k.kid for k in server.signing] == [k.kid for k in cli.signing]
    assert server.reload_if_changed() is False


def test_verifier_picks_up_a_rotation_done_elsewhere(settings: Settings, database: Database) -> None:
    backdate(settings.data_path / KEYS_FILE)
    server_keys = KeyStore.load(settings.data_path)
    verifier = make_verifier(settings, server_keys, database)
    old_token = issue(server_keys, settings)
    assert verifier.verify(old_token).spiffe_id == ALICE

    cli = KeyStore.load(settings.data_path)
    cli.rotate(max_lifetime(settings))
    new_token = issue(cli, settings)  # signed by a key the server has not loaded yet

    assert verifier.verify(new_token).spiffe_id == ALICE
    assert server_keys.active.kid == kid_of(new_token)
    assert verifier.verify(old_token).spiffe_id == ALICE


def test_key_reload_is_rate_limited(
    settings: Settings, database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    backdate(settings.data_path / KEYS_FILE)
    server_keys = KeyStore.load(settings.data_path)
    verifier = make_verifier(settings, server_keys, database)
    monkeypatch.setattr(verifier_module, "_KEY_RELOAD_INTERVAL", 3600.0)  # independent of the test's speed
    verifier._keys_checked_at = time.monotonic() - 7200
    # An unknown kid makes the verifier look at the file once...
    bogus = jwt.encode(
        {"iss": settings.issuer}, Ed25519PrivateKey.generate(), algorithm="EdDSA", headers={"kid": "x"}
    )
    with pytest.raises(AuthenticationError) as caught:
        verifier.verify(bogus)
    assert caught.value.code == "unknown_key"

    cli = KeyStore.load(settings.data_path)
    cli.rotate(max_lifetime(settings))
    new_token = issue(cli, settings)
    # ...and not again within the reload interval, so unknown kids cannot make it re-read keys constantly.
    with pytest.raises(AuthenticationError) as caught:
        verifier.verify(new_token)
    assert caught.value.code == "unknown_key"

    monkeypatch.setattr(verifier_module, "_KEY_RELOAD_INTERVAL", 0.0)
    assert verifier.verify(new_token).spiffe_id == ALICE


# Encryption at rest ---------------------------------------------------------------------------------
def test_keys_are_encrypted_with_a_passphrase(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, "correct horse battery staple")
    created = KeyStore.create(tmp_path)

    text = (tmp_path / KEYS_FILE).read_text()
    document = json.loads(text)
    for entry in [*document["signing"], document["audit"]]:
        assert entry["pem"].startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert "BEGIN PRIVATE KEY" not in text

    loaded = KeyStore.load(tmp_path)
    assert raw_private(loaded.active.private_key) == raw_private(created.active.private_key)
    assert raw_private(loaded.audit.private_key) == raw_private(created.audit.private_key)

    monkeypatch.delenv(PASSPHRASE_ENV)
    with pytest.raises(ConfigError) as caught:
        KeyStore.load(tmp_path)
    assert caught.value.code == "invalid_config"
    assert PASSPHRASE_ENV in caught.value.message

    monkeypatch.setenv(PASSPHRASE_ENV, "")
    with pytest.raises(ConfigError):
        KeyStore.load(tmp_path)


def test_wrong_passphrase_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, "right")
    KeyStore.create(tmp_path)
    monkeypatch.setenv(PASSPHRASE_ENV, "wrong")
    with pytest.raises(ConfigError) as caught:
        KeyStore.load(tmp_path)
    assert caught.value.code == "invalid_config"


def test_encrypted_keys_sign_and_rotate(
    settings: Settings, database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Keys created in the clear are encrypted by the next save once a passphrase is set.
    monkeypatch.setenv(PASSPHRASE_ENV, "s3cret")
    keys = KeyStore.load(settings.data_path)
    old_token = issue(keys, settings)
    keys.rotate(max_lifetime(settings))
    document = json.loads((settings.data_path / KEYS_FILE).read_text())
    assert all(e["pem"].startswith("-----BEGIN ENCRYPTED") for e in [*document["signing"], document["audit"]])

    verifier = make_verifier(settings, KeyStore.load(settings.data_path), database)
    assert verifier.verify(old_token).spiffe_id == ALICE
    assert verifier.verify(issue(keys, settings)).spiffe_id == ALICE
