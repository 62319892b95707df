"""Session tokenization vaults: keys and sealing, the store on SQLite and PostgreSQL (numbering, expiry,
limits, races, encryption at rest), and the vault as two requests of one session use it."""

from __future__ import annotations

import asyncio
import base64
import os
import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from ztai.detect.redact import Replacement, redact, restore
from ztai.detect.vault import KEYS_ENV, SessionVault, VaultKeys, session_name
from ztai.detect.vault_store import SqlVaultStore
from ztai.errors import ConfigError, MalformedRequest
from ztai.store import Database, VaultEntry

ALICE = "spiffe://example.org/user/alice"
BOB = "spiffe://example.org/user/bob"
KEYS = VaultKeys((os.urandom(32),))


def email(value: str, restorable: bool = True) -> Replacement:
    return Replacement("EMAIL_ADDRESS", value, restorable)


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def store_for(
    database: Database, *, ttl: int = 3600, max_entries: int = 100, clock: Clock | None = None
) -> SqlVaultStore:
    return SqlVaultStore(database, ttl_seconds=ttl, max_entries=max_entries, clock=clock)


async def tokenize(vault: SessionVault, text: str, *values: Replacement) -> str:
    """What the gateway does with a request: assign placeholders for the values, then replace them."""
    await vault.prepare(values)
    for item in values:
        text = text.replace(item.value, vault.tokens.placeholder_for(item.kind, item.value))
    return text


async def restored(vault: SessionVault, text: str) -> str:
    await vault.load(text)
    return restore(text, vault.tokens)


# Keys, scopes and sealing -----------------------------------------------------------------------------
def test_session_names_come_from_the_header_or_the_root_task() -> None:
    assert session_name("chat-42", "tsk_1") == "chat-42"
    assert session_name(None, "tsk_1") == "task:tsk_1"
    assert session_name(None, None) is None and session_name("", None) is None
    for bad in ["x" * 129, "has space", "semi;colon", "new\nline"]:
        with pytest.raises(MalformedRequest):
            session_name(bad, None)


def test_scopes_belong_to_tenant_principal_and_session() -> None:
    scope = KEYS.scope("example.org", ALICE, "s1")
    assert scope.id == KEYS.scope("example.org", ALICE, "s1").id
    others = {
        KEYS.scope("example.org", BOB, "s1").id,
        KEYS.scope("other.org", ALICE, "s1").id,
        KEYS.scope("example.org", ALICE, "s2").id,
        VaultKeys((os.urandom(32),)).scope("example.org", ALICE, "s1").id,
        KEYS.scope("example.org", ALICE, "s1", "spiffe://example.org/agent/a").id,  # an agent's task
        KEYS.scope("example.org", ALICE, "s1", "spiffe://example.org/agent/b").id,
    }
    assert scope.id not in others and len(others) == 6
    assert KEYS.scope("example.org", ALICE, "s1", "").id == scope.id  # no root actor: the principal's
    assert ALICE not in scope.id and len(scope.id) == 64


def test_sealed_values_open_only_in_their_scope_and_row() -> None:
    scope, other = KEYS.scope("example.org", ALICE, "s1"), KEYS.scope("example.org", BOB, "s1")
    digest = scope.digest("EMAIL_ADDRESS", "ana@example.org")
    sealed, key_id = scope.seal(digest, "ana@example.org")
    assert b"ana@example.org" not in sealed
    assert scope.unseal(digest, sealed, key_id) == "ana@example.org"
    assert other.unseal(digest, sealed, key_id) is None  # moved to another session
    assert (
        scope.unseal(scope.digest("EMAIL_ADDRESS", "bo@example.org"), sealed, key_id) is None
    )  # another row
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    assert scope.unseal(digest, tampered, key_id) is None
    assert scope.unseal(digest, sealed, "0" * 16) is None  # a key no longer configured
    # Digests are keyed per session: equal values do not correlate across sessions or deployments.
    assert digest != other.digest("EMAIL_ADDRESS", "ana@example.org")


def test_keys_rotate_by_prepending(monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = os.urandom(32), os.urandom(32)
    encode = lambda key: base64.urlsafe_b64encode(key).rstrip(b"=").decode()  # noqa: E731
    monkeypatch.setenv(KEYS_ENV, encode(old))
    before = VaultKeys.load(b"unused").scope("t", ALICE, "s")
    digest = before.digest("EMAIL_ADDRESS", "ana@example.org")
    sealed, key_id = before.seal(digest, "ana@example.org")
    monkeypatch.setenv(KEYS_ENV, f"{encode(new)}, {encode(old)}")
    after = VaultKeys.load(b"unused").scope("t", ALICE, "s")
    assert after.id == before.id and after.digest("EMAIL_ADDRESS", "ana@example.org") == digest
    assert after.unseal(digest, sealed, key_id) == "ana@example.org"  # old values still open
    assert after.seal(digest, "x")[1] == VaultKeys.key_id(new)  # new ones use the new key
    monkeypatch.setenv(KEYS_ENV, "not base64 !")
    with pytest.raises(ConfigError):
        VaultKeys.load(b"unused")
    monkeypatch.setenv(KEYS_ENV, encode(b"short"))
    with pytest.raises(ConfigError, match="32 bytes"):
        VaultKeys.load(b"unused")
    monkeypatch.delenv(KEYS_ENV)
    assert VaultKeys.load(b"a").keys != VaultKeys.load(b"b").keys  # derived from the deployment's key


# The store ----------------------------------------------------------------------------------------------
async def test_placeholders_are_shared_by_the_requests_of_a_session(database: Database) -> None:
    store = store_for(database)
    scope = KEYS.scope("example.org", ALICE, "chat-1")
    first = SessionVault(store, scope)
    assert await tokenize(first, "mail ana@example.org", email("ana@example.org")) == "mail <EMAIL_ADDRESS_1>"
    # A later request (another process, same store): the old value keeps its number, a new one continues.
    second = SessionVault(store, scope)
    sent = await tokenize(
        second, "cc bo@example.org and ana@example.org", email("bo@example.org"), email("ana@example.org")
    )
    assert sent == "cc <EMAIL_ADDRESS_2> and <EMAIL_ADDRESS_1>"
    # A third request that never carried the values gets them back in the model's answer.
    third = SessionVault(store, scope)
    answer = "Sent to <EMAIL_ADDRESS_1>, copy to <EMAIL_ADDRESS_2>; <EMAIL_ADDRESS_9> is unknown."
    assert await restored(third, answer) == (
        "Sent to ana@example.org, copy to bo@example.org; <EMAIL_ADDRESS_9> is unknown."
    )
    # Another principal naming the same session has a vault of its own: nothing to restore, own numbering.
    bob = SessionVault(store, KEYS.scope("example.org", BOB, "chat-1"))
    assert await restored(bob, answer) == answer
    assert await tokenize(bob, "x zed@example.org", email("zed@example.org")) == "x <EMAIL_ADDRESS_1>"


async def test_values_are_encrypted_at_rest_and_secrets_not_kept(database: Database) -> None:
    store = store_for(database)
    scope = KEYS.scope("example.org", ALICE, "s")
    vault = SessionVault(store, scope)
    await vault.prepare([email("ana@example.org"), Replacement("GITHUB_TOKEN", "ghp_" + "a" * 36, False)])
    with database.transaction() as session:
        rows = {row.kind: row for row in session.scalars(select(VaultEntry))}
    stored = b"".join(
        (row.sealed or b"") + row.digest.encode() + row.placeholder.encode() for row in rows.values()
    )
    assert b"ana@example.org" not in stored and b"ghp_" not in stored
    assert rows["EMAIL_ADDRESS"].sealed is not None
    assert rows["GITHUB_TOKEN"].sealed is None  # numbered, never stored
    fresh = SessionVault(store, scope)
    assert await restored(fresh, "<GITHUB_TOKEN_1> <EMAIL_ADDRESS_1>") == "<GITHUB_TOKEN_1> ana@example.org"


async def test_a_value_first_written_by_the_model_becomes_restorable_once_the_caller_sends_it(
    database: Database,
) -> None:
    store = store_for(database)
    scope = KEYS.scope("example.org", ALICE, "s")
    await SessionVault(store, scope).prepare([email("ana@example.org", restorable=False)])
    assert await restored(SessionVault(store, scope), "<EMAIL_ADDRESS_1>") == "<EMAIL_ADDRESS_1>"
    await SessionVault(store, scope).prepare([email("ana@example.org")])
    assert await restored(SessionVault(store, scope), "<EMAIL_ADDRESS_1>") == "ana@example.org"


async def test_vaults_expire_after_their_last_use_and_are_purged(database: Database) -> None:
    clock = Clock()
    store = store_for(database, ttl=600, clock=clock)
    scope = KEYS.scope("example.org", ALICE, "s")
    await SessionVault(store, scope).prepare([email("ana@example.org")])
    clock.now += timedelta(seconds=500)
    await SessionVault(store, scope).prepare([email("ana@example.org")])  # a use: 600 s more from here
    clock.now += timedelta(seconds=500)
    assert await restored(SessionVault(store, scope), "<EMAIL_ADDRESS_1>") == "ana@example.org"
    clock.now += timedelta(seconds=101)
    assert await restored(SessionVault(store, scope), "<EMAIL_ADDRESS_1>") == "<EMAIL_ADDRESS_1>"
    assert store.stats()["live_sessions"] == 0
    assert store.purge() == 1 and store.stats()["entries"] == 0
    # An expired vault starts over.
    assert (
        await tokenize(SessionVault(store, scope), "bo@example.org", email("bo@example.org"))
        == "<EMAIL_ADDRESS_1>"
    )


async def test_a_full_vault_redacts_new_values_for_good(database: Database) -> None:
    store = store_for(database, max_entries=2)
    scope = KEYS.scope("example.org", ALICE, "s")
    vault = SessionVault(store, scope)
    values = [email(f"user{i}@example.org") for i in range(3)]
    sent = await tokenize(vault, " ".join(v.value for v in values), *values)
    assert sent == "<EMAIL_ADDRESS_1> <EMAIL_ADDRESS_2> <EMAIL_ADDRESS>"
    assert "user2" not in await restored(vault, sent)


async def test_forgetting_a_session_deletes_its_values(database: Database) -> None:
    store = store_for(database)
    scope = KEYS.scope("example.org", ALICE, "s")
    await SessionVault(store, scope).prepare([email("ana@example.org"), email("bo@example.org")])
    await SessionVault(store, KEYS.scope("example.org", BOB, "s")).prepare([email("zed@example.org")])
    assert store.forget(scope) == 2
    assert await restored(SessionVault(store, scope), "<EMAIL_ADDRESS_1>") == "<EMAIL_ADDRESS_1>"
    assert store.stats() == {"live_sessions": 1, "entries": 1, "sealed_values": 1}


def test_racing_requests_never_split_or_share_a_placeholder(database: Database) -> None:
    """Eight threads (replicas) tokenize overlapping values in one session at once."""
    store = store_for(database, max_entries=1000)
    scope = KEYS.scope("example.org", ALICE, "race")
    results: list[dict[str, str]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker(offset: int) -> None:
        values = [email(f"user{(offset + i) % 12}@example.org") for i in range(6)]
        try:
            barrier.wait()
            vault = SessionVault(store, scope)
            asyncio.run(vault.prepare(values))
            results.append({v.value: vault.tokens.placeholder_for(v.kind, v.value) for v in values})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    by_value: dict[str, set[str]] = {}
    for seen in results:
        for value, placeholder in seen.items():
            by_value.setdefault(value, set()).add(placeholder)
    assert all(len(p) == 1 for p in by_value.values())  # one placeholder per value, everywhere
    placeholders = [next(iter(p)) for p in by_value.values()]
    assert len(set(placeholders)) == len(placeholders) == 12  # no placeholder for two values
    assert sorted(placeholders) == sorted(f"<EMAIL_ADDRESS_{n}>" for n in range(1, 13))


async def test_a_request_without_a_session_numbers_on_its_own() -> None:
    vault = SessionVault()
    text, _ = redact("ana@example.org", [], vault.tokens)
    await vault.prepare([email("ana@example.org")])  # nothing to do without a store
    assert not vault.shared and text == "ana@example.org"
    assert vault.tokens.placeholder_for("EMAIL_ADDRESS", "ana@example.org") == "<EMAIL_ADDRESS_1>"
