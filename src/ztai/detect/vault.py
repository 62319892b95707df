"""Session tokenization vaults: one placeholder per value across a session, values encrypted at rest.

A request's `TokenVault` (ztai.detect.redact) numbers placeholders for that request only. A session vault
shares the numbering with every request of the same session, on every replica, and keeps the values the
caller may get back, so `<EMAIL_ADDRESS_1>` means the same address in turn 1 and in turn 9, and an answer
that names it is restored for the session's owner even when this request never carried the value.

Scope: a session is named by the caller (the `x-ztai-session` header) or, for an agent's task token, is
its root task. It belongs to the principal: its id is a keyed hash of (tenant, principal, session), so
another principal naming the same session gets another, empty vault, and the store names no one. For a
task token the principal is the task's subject *and* its root actor (the agent holding the root task):
another agent of the same user gets another vault, a sub-agent of the same task tree shares it.

At rest: each scope has its own AES-256-GCM key, derived (HKDF-SHA256) from the deployment's vault key
and the scope id; a value is sealed bound to its scope and digest, so rows cannot be moved between
sessions or values. Only values that may be given back (the caller's personal data) are sealed; for
secrets and what the model wrote only the keyed digest and placeholder are kept, so numbering stays
consistent and the value is nowhere. Digests are keyed (HMAC), so a short value such as an SSN cannot be
brute-forced from the store.

Keys: `ZTAI_VAULT_KEYS`, comma-separated base64url 32-byte keys (the first seals, every one unseals, so
keys rotate without losing live sessions); else a key derived from the deployment's audit key in
keys.json, which replicas share and `ZTAI_KEY_PASSPHRASE` protects like the signing keys.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import hmac
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ztai.detect.redact import Replacement, TokenVault, placeholders_in
from ztai.errors import ConfigError, MalformedRequest

KEYS_ENV = "ZTAI_VAULT_KEYS"
SESSION_HEADER = "x-ztai-session"
_SESSION_NAME = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
MAX_VALUE_CHARS = 4096  # longer findings are redacted for good rather than stored


def session_name(header: str | None, root_task: str | None) -> str | None:
    """The session a request belongs to: the caller's header, else the task token's root task, else
    none (the request gets a vault of its own). A malformed header is the caller's error."""
    if header:
        if not _SESSION_NAME.fullmatch(header):
            raise MalformedRequest(
                f"header {SESSION_HEADER} must be 1-128 characters of letters, digits and ._:@/+=-"
            )
        return header
    return f"task:{root_task}" if root_task else None


@dataclass(frozen=True)
class VaultKeys:
    """The deployment's vault keys: `keys[0]` seals, any of them unseals (by key id)."""

    keys: tuple[bytes, ...]
    index_key: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.keys or any(len(k) != 32 for k in self.keys):
            raise ConfigError(f"{KEYS_ENV}: each key must be 32 bytes (base64url)")
        # Scope ids and digests must not change when a key is added: they are keyed by the last (oldest)
        # key listed. Rotate by prepending a new key; dropping the last one ends every session vault.
        object.__setattr__(self, "index_key", _hkdf(self.keys[-1], b"ztai vault index"))

    @classmethod
    def load(cls, fallback_secret: bytes) -> VaultKeys:
        """From $ZTAI_VAULT_KEYS, else derived from `fallback_secret` (the deployment's audit key)."""
        configured = os.environ.get(KEYS_ENV, "").strip()
        if not configured:
            return cls((_hkdf(fallback_secret, b"ztai vault key"),))
        try:
            keys = tuple(_b64decode(part.strip()) for part in configured.split(","))
        except (ValueError, binascii.Error):
            raise ConfigError(f"{KEYS_ENV}: not base64url") from None
        return cls(keys)

    @staticmethod
    def key_id(key: bytes) -> str:
        return hashlib.sha256(b"ztai vault key id\0" + key).hexdigest()[:16]

    def scope(self, tenant: str, principal: str, session: str, root_actor: str = "") -> Scope:
        """The vault of `principal`'s `session`; for an agent's task, also of the agent that holds the
        task tree's root (`root_actor`), so another agent of the same user gets another vault."""
        parts = (tenant, principal, session, *((f"root-actor:{root_actor}",) if root_actor else ()))
        label = "\0".join(parts).encode()
        return Scope(hmac.new(self.index_key, label, hashlib.sha256).hexdigest()[:64], tenant, self)


@dataclass(frozen=True)
class Scope:
    """One session vault's id, and what seals and unseals its values."""

    id: str
    tenant: str
    keys: VaultKeys = field(repr=False)

    def digest(self, kind: str, value: str) -> str:
        data = self.id.encode() + b"\0" + kind.encode() + b"\0" + value.encode()
        return hmac.new(self.keys.index_key, data, hashlib.sha256).hexdigest()

    def seal(self, digest: str, value: str) -> tuple[bytes, str]:
        key = self.keys.keys[0]
        nonce = os.urandom(12)
        sealed = nonce + AESGCM(self._key(key)).encrypt(nonce, value.encode(), self._aad(digest))
        return sealed, VaultKeys.key_id(key)

    def unseal(self, digest: str, sealed: bytes, key_id: str) -> str | None:
        """The value, or None when no configured key opens it (rotated away) or it was tampered with."""
        for key in self.keys.keys:
            if hmac.compare_digest(VaultKeys.key_id(key), key_id):
                try:
                    plain = AESGCM(self._key(key)).decrypt(sealed[:12], sealed[12:], self._aad(digest))
                except InvalidTag:
                    return None
                return plain.decode()
        return None

    def _key(self, key: bytes) -> bytes:
        return _scope_key(key, self.id)

    def _aad(self, digest: str) -> bytes:
        return self.id.encode() + b"\0" + digest.encode()


@dataclass(frozen=True, slots=True)
class NewEntry:
    """A value to place in a session vault (sealed only when it may be given back)."""

    kind: str
    digest: str
    sealed: bytes | None
    key_id: str


@dataclass(frozen=True, slots=True)
class StoredEntry:
    placeholder: str
    kind: str
    digest: str
    sealed: bytes | None
    key_id: str


class VaultStore(Protocol):
    """Where session vaults live (ztai.detect.vault_store.SqlVaultStore). Blocking: called on a thread."""

    def assign(self, scope: Scope, entries: list[NewEntry]) -> dict[str, str | None]:
        """Placeholders for the entries' digests: existing ones, else new numbers (None when the
        session is full). Also pushes the session's expiry forward."""
        ...

    def fetch(self, scope: Scope, placeholders: list[str]) -> list[StoredEntry]:
        """The live session's entries for these placeholders."""
        ...

    def forget(self, scope: Scope) -> int:
        """Delete the session's vault; returns how many entries it held."""
        ...


class SessionVault:
    """The vault one request uses. Without a store (no session) it is a plain per-request `TokenVault`;
    with one, placeholders are assigned by the store before `redact` runs (`prepare`) and placeholders
    in an answer are looked up before `restore` runs (`load`). `tokens` is what redact/restore use."""

    def __init__(self, store: VaultStore | None = None, scope: Scope | None = None) -> None:
        self.tokens = TokenVault(assigned_elsewhere=store is not None)
        self._store, self._scope = store, scope
        self._looked_up: set[str] = set()

    @property
    def shared(self) -> bool:
        return self._store is not None

    async def prepare(self, items: Iterable[Replacement]) -> None:
        """Make sure every item has its placeholder in `tokens` (one store round trip for the new ones)."""
        if self._store is None or self._scope is None:
            return
        scope = self._scope
        pending: dict[str, tuple[Replacement, NewEntry]] = {}
        for item in items:
            if self._known(item):
                continue
            digest = scope.digest(item.kind, item.value)
            keep = item.restorable and len(item.value) <= MAX_VALUE_CHARS
            sealed, key_id = scope.seal(digest, item.value) if keep else (None, "")
            if digest not in pending or (sealed is not None and pending[digest][1].sealed is None):
                pending[digest] = (item, NewEntry(item.kind, digest, sealed, key_id))
        if not pending:
            return
        assigned = await asyncio.to_thread(
            self._store.assign, scope, [entry for _, entry in pending.values()]
        )
        for digest, (item, entry) in pending.items():
            placeholder = assigned.get(digest)
            if placeholder is None:  # the session is full: redacted for good, with no number
                self.tokens.adopt(f"<{item.kind}>", item.kind, item.value, restorable=False)
                continue
            self.tokens.adopt(placeholder, item.kind, item.value, restorable=entry.sealed is not None)
            self._looked_up.add(placeholder)

    async def load(self, text: str) -> None:
        """Fetch the session's values for placeholders in `text` that this request has not seen."""
        if self._store is None or self._scope is None:
            return
        wanted = sorted(placeholders_in(text) - self._looked_up)
        if not wanted:
            return
        self._looked_up.update(wanted)
        scope = self._scope
        for entry in await asyncio.to_thread(self._store.fetch, scope, wanted):
            if entry.sealed is None:
                continue
            value = scope.unseal(entry.digest, entry.sealed, entry.key_id)
            if value is not None:
                self.tokens.adopt(entry.placeholder, entry.kind, value, restorable=True)

    def _known(self, item: Replacement) -> bool:
        try:
            self.tokens.placeholder_for(item.kind, item.value, restorable=item.restorable)
        except LookupError:
            return False
        return True

    def __len__(self) -> int:
        return len(self.tokens)


@functools.lru_cache(maxsize=4096)
def _scope_key(key: bytes, scope_id: str) -> bytes:
    """A session vault's own key (derived once per session and process, not per value)."""
    return _hkdf(key, b"ztai vault scope\0" + scope_id.encode())


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
