"""Signing keys: Ed25519 keys for tokens (rotatable) and one for audit checkpoints.

Keys live in `<data_dir>/keys.json`, created with mode 0600. When `ZTAI_KEY_PASSPHRASE` is set the
private keys are additionally encrypted at rest (PKCS#8, best available encryption). A rotated key stops
signing at once but stays published in the JWKS, and accepted, until every token it signed has expired.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ztai.errors import ConfigError

PASSPHRASE_ENV = "ZTAI_KEY_PASSPHRASE"  # noqa: S105 (the variable name, not a secret)
KEYS_FILE = "keys.json"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_jwk(public_key: Ed25519PublicKey) -> dict[str, str]:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)}


def key_id(public_key: Ed25519PublicKey) -> str:
    """RFC 7638 JWK thumbprint."""
    jwk = public_jwk(public_key)
    canonical = json.dumps(jwk, sort_keys=True, separators=(",", ":")).encode()
    return b64url(hashlib.sha256(canonical).digest())


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private_key: Ed25519PrivateKey
    created_at: float
    retired_at: float | None = None  # no longer signs; verifies until retired_at + max token lifetime

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()


class KeyStore:
    """The keys of one ztai deployment, read from and written to `<data_dir>/keys.json`."""

    def __init__(self, path: Path, signing: list[SigningKey], audit: SigningKey) -> None:
        self.path = path
        self.signing = signing
        self.audit = audit
        self._mtime = _mtime(path)

    # Creation and loading ---------------------------------------------------------------------
    @classmethod
    def create(cls, data_dir: Path) -> KeyStore:
        """Create fresh keys (fails if keys already exist: never overwrite keys silently)."""
        path = data_dir / KEYS_FILE
        if path.exists():
            raise ConfigError(f"{path} already exists; rotate with `ztai keys rotate`")
        store = cls(path, [_new_key()], _new_key())
        store.save()
        return store

    @classmethod
    def load(cls, data_dir: Path) -> KeyStore:
        path = data_dir / KEYS_FILE
        if not path.exists():
            raise ConfigError(f"no keys at {path}: run `ztai init` first")
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ConfigError(f"{path} is readable by others (mode {oct(mode)}); run chmod 600")
        try:
            document = json.loads(path.read_text())
            return cls(path, [_decode(entry) for entry in document["signing"]], _decode(document["audit"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path} is corrupt: {type(exc).__name__}: {exc}") from None

    def save(self) -> None:
        document = {"signing": [_encode(k) for k in self.signing], "audit": _encode(self.audit)}
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temporary = self.path.with_suffix(".tmp")
        temporary.unlink(missing_ok=True)  # a stale file could carry looser permissions
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            json.dump(document, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)
        self._mtime = _mtime(self.path)

    def reload_if_changed(self) -> bool:
        """Pick up a rotation done by another process (the CLI). Returns True when keys changed."""
        if _mtime(self.path) == self._mtime:
            return False
        fresh = KeyStore.load(self.path.parent)
        self.signing, self.audit, self._mtime = fresh.signing, fresh.audit, fresh._mtime
        return True

    def audit_secret(self) -> bytes:
        """The audit key's raw bytes: the root from which keyed hashes and the default vault key are
        derived (never used as a key directly)."""
        return self.audit.private_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    # Use --------------------------------------------------------------------------------------
    @property
    def active(self) -> SigningKey:
        return next(k for k in reversed(self.signing) if k.retired_at is None)

    def rotate(self, max_token_lifetime: float) -> SigningKey:
        """Start signing with a new key; drop retired keys whose tokens have all expired."""
        now = time.time()
        kept = [k for k in self.signing if k.retired_at is None or k.retired_at + max_token_lifetime > now]
        retired = [SigningKey(k.kid, k.private_key, k.created_at, k.retired_at or now) for k in kept]
        fresh = _new_key()
        self.signing = [*retired, fresh]
        self.save()
        return fresh

    def verification_key(self, kid: str, max_token_lifetime: float) -> Ed25519PublicKey | None:
        now = time.time()
        for key in self.signing:
            if key.kid == kid and (key.retired_at is None or key.retired_at + max_token_lifetime > now):
                return key.public_key
        return None

    def jwks(self, max_token_lifetime: float) -> dict[str, Any]:
        now = time.time()
        keys = [
            {**public_jwk(k.public_key), "kid": k.kid, "alg": "EdDSA", "use": "sig"}
            for k in self.signing
            if k.retired_at is None or k.retired_at + max_token_lifetime > now
        ]
        return {"keys": keys}


def _new_key() -> SigningKey:
    private_key = Ed25519PrivateKey.generate()
    return SigningKey(key_id(private_key.public_key()), private_key, time.time())


def _passphrase() -> bytes | None:
    value = os.environ.get(PASSPHRASE_ENV)
    return value.encode() if value else None


def _encode(key: SigningKey) -> dict[str, Any]:
    passphrase = _passphrase()
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    pem = key.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    return {"kid": key.kid, "pem": pem.decode(), "created_at": key.created_at, "retired_at": key.retired_at}


def _decode(entry: dict[str, Any]) -> SigningKey:
    pem = entry["pem"].encode()
    encrypted = b"ENCRYPTED" in pem.split(b"\n", 1)[0]
    passphrase = _passphrase() if encrypted else None
    if encrypted and passphrase is None:
        raise ConfigError(f"signing keys are encrypted: set {PASSPHRASE_ENV}")
    try:
        private_key = serialization.load_pem_private_key(pem, password=passphrase)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"cannot read signing key {entry['kid']}: {exc}") from None
    if not isinstance(private_key, Ed25519PrivateKey):
        raise ConfigError(f"signing key {entry['kid']} is not Ed25519")
    return SigningKey(entry["kid"], private_key, entry["created_at"], entry.get("retired_at"))


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime_ns / 1e9
    except FileNotFoundError:
        return 0.0
