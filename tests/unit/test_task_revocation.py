"""Task revocation across replicas: the store (polled, SQLite and PostgreSQL) and Redis pub/sub.

Redis tests use $ZTAI_TEST_REDIS_URL (default redis://127.0.0.1:6379/0). Where no server answers they
skip with the reason, unless $ZTAI_TEST_REQUIRE_REDIS=1, in which case they fail.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis
from sqlalchemy import select

from tests.conftest import redis_url_or_skip
from ztai.config import Settings
from ztai.errors import AuthenticationError, MalformedRequest, NotFound, StoreError
from ztai.identity import KeyStore, RevocationList, TokenVerifier, issue_token
from ztai.identity.revocation import REVOCATION_CHANNEL, RevocationFeed, RevocationNotice
from ztai.identity.task_tokens import act_claim
from ztai.store import Database, IssuedTaskRecord
from ztai.store.shared import publish_once

TENANT = "example.org"
ROOT = "tsk_" + "1" * 32
CHILD = "tsk_" + "2" * 32
OTHER = "tsk_" + "3" * 32
AGENTS = ["spiffe://example.org/agent/worker", "spiffe://example.org/agent/planner"]


def task_token(keys: KeyStore, settings: Settings, chain: list[str]) -> str:
    """A task token as the exchange would issue it (subject alice, one actor per chain link)."""
    return issue_token(
        keys,
        subject="spiffe://example.org/user/alice",
        issuer=settings.issuer,
        audience="ztai",
        ttl_seconds=300,
        max_ttl_seconds=3600,
        claims={"tools": ["files/*"]},
        task={"task": chain[-1], "task_chain": chain, "act": act_claim(AGENTS[-len(chain) :]), "egress": []},
    ).token


def replica(database: Database, refresh_seconds: float = 1.0) -> RevocationList:
    revocations = RevocationList(database, refresh_seconds=refresh_seconds)
    revocations.refresh()
    return revocations


def refused(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(AuthenticationError) as caught:
        verifier.verify(token)
    return caught.value.code


# The store (polling) -----------------------------------------------------------------------------------------
def test_task_revocation_reaches_another_replica_through_the_store(database: Database) -> None:
    here, there = replica(database), replica(database)
    notice = here.revoke_task(TENANT, ROOT, time.time() + 600, reason="compromised")
    assert notice == RevocationNotice(TENANT, "task", ROOT, notice.expires_at)
    assert here.is_task_revoked(TENANT, [ROOT, CHILD])  # at once where it was revoked
    assert not there.is_task_revoked(TENANT, [ROOT, CHILD])  # elsewhere: at the next poll
    there.refresh()
    assert there.is_task_revoked(TENANT, [ROOT, CHILD]) and there.is_task_revoked(TENANT, [ROOT])
    assert not there.is_task_revoked(TENANT, [OTHER])
    assert not there.is_task_revoked("other.org", [ROOT, CHILD])  # per tenant
    assert not there.is_revoked(TENANT, ROOT)  # a task is not a token id


def test_revoking_a_task_twice_is_idempotent(database: Database) -> None:
    revocations = replica(database)
    revocations.revoke_task(TENANT, ROOT, time.time() + 600)
    revocations.revoke_task(TENANT, ROOT, time.time() + 600, reason="again")
    assert replica(database).is_task_revoked(TENANT, [ROOT])


def test_expired_task_revocations_are_not_loaded(database: Database) -> None:
    replica(database).revoke_task(TENANT, ROOT, time.time() - 10)
    assert not replica(database).is_task_revoked(TENANT, [ROOT])


@pytest.mark.parametrize(
    "task_id", ["", "tsk_", "tsk_XYZ12345", "task_" + "1" * 32, "tsk_" + "1" * 65, "tsk_1234567"]
)
def test_malformed_task_ids_are_refused(database: Database, task_id: str) -> None:
    with pytest.raises(MalformedRequest):
        replica(database).revoke_task(TENANT, task_id, time.time() + 600)


def test_verifier_refuses_tokens_of_a_revoked_task_and_its_sub_tasks(
    database: Database, settings: Settings
) -> None:
    keys = KeyStore.load(settings.data_path)
    elsewhere = replica(database)
    verifier = TokenVerifier(settings, keys, elsewhere)
    root, child, other = (task_token(keys, settings, chain) for chain in ([ROOT], [ROOT, CHILD], [OTHER]))
    for token in (root, child, other):
        verifier.verify(token)  # verified and cached
    replica(database).revoke_task(TENANT, ROOT, time.time() + 600)
    verifier.verify(child)  # not yet known here
    elsewhere.refresh()
    assert refused(verifier, root) == "token_revoked"  # cached principals are checked too
    assert refused(verifier, child) == "token_revoked"
    verifier.verify(other)


def test_revoking_a_sub_task_leaves_its_parent(database: Database, settings: Settings) -> None:
    keys = KeyStore.load(settings.data_path)
    revocations = replica(database)
    verifier = TokenVerifier(settings, keys, revocations)
    root, child = task_token(keys, settings, [ROOT]), task_token(keys, settings, [ROOT, CHILD])
    revocations.revoke_task(TENANT, CHILD, time.time() + 600)
    assert refused(verifier, child) == "token_revoked"
    verifier.verify(root)


def test_stale_list_refuses_task_tokens(database: Database, settings: Settings) -> None:
    revocations = replica(database, refresh_seconds=0.01)
    revocations._fresh_at -= 10  # as if the store had been unreachable for 10 s
    with pytest.raises(StoreError):
        revocations.is_task_revoked(TENANT, [ROOT])


def test_refresh_counts_tokens_and_tasks(database: Database) -> None:
    revocations = replica(database)
    revocations.revoke(TENANT, "a" * 32, time.time() + 600)
    revocations.revoke_task(TENANT, ROOT, time.time() + 600)
    assert replica(database).refresh() == 2


# Issued tasks: an admin revokes only a task ztai issued in their tenant --------------------------------------
def test_an_issued_task_can_be_revoked_in_its_tenant(database: Database) -> None:
    here = replica(database)
    here.record_task(TENANT, ROOT, time.time() + 300)
    here.record_task(TENANT, ROOT, time.time() + 300)  # idempotent
    assert replica(database).task_issued(TENANT, ROOT)
    notice = here.revoke_tenant_task(TENANT, ROOT, time.time() + 600, reason="compromised")
    assert notice.id == ROOT and replica(database).is_task_revoked(TENANT, [ROOT])


@pytest.mark.parametrize(
    ("tenant", "task_id"),
    [("other.org", ROOT), (TENANT, OTHER)],  # another tenant's task; a task ztai never issued
)
def test_revoking_a_task_not_issued_in_the_tenant_is_not_found(
    database: Database, tenant: str, task_id: str
) -> None:
    here = replica(database)
    here.record_task(TENANT, ROOT, time.time() + 300)
    with pytest.raises(NotFound) as caught:
        here.revoke_tenant_task(tenant, task_id, time.time() + 600)
    assert caught.value.status == 404
    # Nothing was recorded, here or anywhere.
    assert not here.is_task_revoked(tenant, [task_id])
    assert replica(database).refresh() == 0


def test_expired_tasks_are_no_longer_revocable_and_are_pruned(database: Database) -> None:
    here = replica(database)
    here.record_task(TENANT, ROOT, time.time() - 400)  # past its expiry and the grace
    assert not here.task_issued(TENANT, ROOT)
    with pytest.raises(NotFound):
        here.revoke_tenant_task(TENANT, ROOT, time.time() + 600)
    here.record_task(TENANT, CHILD, time.time() + 300)  # each record prunes what has expired
    with database.sessions() as session:
        assert session.scalars(select(IssuedTaskRecord.task_id)).all() == [CHILD]


def test_malformed_task_ids_are_refused_before_the_store(database: Database) -> None:
    with pytest.raises(MalformedRequest):
        replica(database).revoke_tenant_task(TENANT, "tsk_' OR 1=1 --", time.time() + 600)


# Notices --------------------------------------------------------------------------------------------------------
def test_notice_round_trip() -> None:
    for notice in (
        RevocationNotice(TENANT, "task", ROOT, 1_900_000_000),
        RevocationNotice(TENANT, "token", "ab" * 16, 1.0),
    ):
        assert RevocationNotice.decode(notice.encode()) == notice


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"[]",
        b'{"v": 2, "tenant": "t", "kind": "task", "id": "tsk_11111111", "exp": 1}',
        b'{"v": 1, "tenant": "", "kind": "task", "id": "tsk_11111111", "exp": 1}',
        b'{"v": 1, "tenant": "t", "kind": "task", "id": "tsk_XX", "exp": 1}',
        b'{"v": 1, "tenant": "t", "kind": "token", "id": "a b", "exp": 1}',
        b'{"v": 1, "tenant": "t", "kind": "key", "id": "abc", "exp": 1}',
        b'{"v": 1, "tenant": "t", "kind": "task", "id": "tsk_11111111", "exp": "soon"}',
        b'{"v": 1, "tenant": "t", "kind": "task", "id": "tsk_11111111", "exp": true}',
    ],
)
def test_malformed_notices_are_refused(database: Database, data: bytes) -> None:
    revocations = replica(database)
    with pytest.raises(MalformedRequest):
        revocations.apply_notice(data)
    assert revocations.refresh() == 0


def test_notice_cannot_pin_a_revocation_forever(database: Database) -> None:
    revocations = replica(database)
    revocations.apply_notice(RevocationNotice(TENANT, "task", ROOT, 2**40).encode())
    assert revocations._revoked_tasks[(TENANT, ROOT)] <= time.time() + 86_400


# Redis pub/sub ---------------------------------------------------------------------------------------------------
@pytest.fixture
def redis_url() -> str:
    return redis_url_or_skip()


async def started(feed: RevocationFeed) -> RevocationFeed:
    feed.start()
    await asyncio.wait_for(feed.channel.subscribed.wait(), 5)
    return feed


async def eventually(check: Callable[[], bool], timeout: float = 3.0) -> float:
    """Seconds until `check()` holds (fails the test after `timeout`)."""
    began = time.monotonic()
    while not check():
        assert time.monotonic() - began < timeout, "not within the timeout"
        await asyncio.sleep(0.005)
    return time.monotonic() - began


@pytest.fixture
async def replicas(tmp_path: Path, redis_url: str) -> AsyncIterator[tuple[RevocationList, RevocationList]]:
    """Two replicas sharing a store and Redis; they poll the store only once a minute."""
    from ztai.store import open_database

    database = open_database(f"sqlite:///{tmp_path / 'ztai.db'}")
    database.migrate()
    here, there = replica(database, refresh_seconds=60), replica(database, refresh_seconds=60)
    feeds = [await started(RevocationFeed(here, redis_url)), await started(RevocationFeed(there, redis_url))]
    yield here, there
    for feed in feeds:
        await feed.close()
    database.close()


async def test_pubsub_delivers_task_revocations_at_once(
    replicas: tuple[RevocationList, RevocationList],
) -> None:
    here, there = replicas
    await asyncio.to_thread(here.revoke_task, TENANT, ROOT, time.time() + 600)  # as the admin route does
    delay = await eventually(lambda: there.is_task_revoked(TENANT, [ROOT, CHILD]))
    assert delay < 1.0  # far sooner than the next poll (a minute away)
    assert not there.is_task_revoked("other.org", [ROOT])


async def test_pubsub_delivers_token_revocations(replicas: tuple[RevocationList, RevocationList]) -> None:
    here, there = replicas
    here.revoke(TENANT, "c" * 32, time.time() + 600)  # on the event loop thread itself
    await eventually(lambda: there.is_revoked(TENANT, "c" * 32))


async def test_cli_publish_reaches_listening_replicas(
    replicas: tuple[RevocationList, RevocationList], redis_url: str
) -> None:
    _, there = replicas
    notice = RevocationNotice(TENANT, "task", OTHER, time.time() + 600)
    assert await asyncio.to_thread(publish_once, redis_url, REVOCATION_CHANNEL, notice.encode())
    await eventually(lambda: there.is_task_revoked(TENANT, [OTHER]))


async def test_malformed_messages_do_not_stop_the_listener(
    replicas: tuple[RevocationList, RevocationList], redis_url: str
) -> None:
    here, there = replicas
    for garbage in (b"garbage", b"{}", b"x" * 10_000):
        await asyncio.to_thread(publish_once, redis_url, REVOCATION_CHANNEL, garbage)
    here.revoke_task(TENANT, CHILD, time.time() + 600)
    await eventually(lambda: there.is_task_revoked(TENANT, [CHILD]))


async def test_listener_reconnects_after_losing_its_connection(
    replicas: tuple[RevocationList, RevocationList], redis_url: str
) -> None:
    here, there = replicas
    admin = redis.Redis.from_url(redis_url)
    try:
        killed = admin.client_kill_filter(_type="pubsub")
    finally:
        admin.close()
    assert killed >= 2
    # The listeners subscribe again by themselves; then notices flow as before.
    await asyncio.sleep(0.2)
    here.revoke_task(TENANT, OTHER, time.time() + 600)
    await eventually(lambda: there.is_task_revoked(TENANT, [OTHER]), timeout=10)


async def test_unreachable_redis_leaves_polling_working(tmp_path: Path) -> None:
    from ztai.store import open_database

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead_url = f"redis://127.0.0.1:{sock.getsockname()[1]}/0"
    database = open_database(f"sqlite:///{tmp_path / 'ztai.db'}")
    database.migrate()
    here, there = replica(database), replica(database)
    feeds = [RevocationFeed(here, dead_url), RevocationFeed(there, dead_url)]
    for feed in feeds:
        feed.start()
    try:
        await asyncio.sleep(0.3)  # the listeners fail and retry in the background
        assert not any(feed.channel.subscribed.is_set() for feed in feeds)
        await asyncio.to_thread(here.revoke_task, TENANT, ROOT, time.time() + 600)  # publish fails quietly
        assert here.is_task_revoked(TENANT, [ROOT])
        there.refresh()
        assert there.is_task_revoked(TENANT, [ROOT])
        assert not publish_once(dead_url, REVOCATION_CHANNEL, b"x")
    finally:
        for feed in feeds:
            await feed.close()
        database.close()
