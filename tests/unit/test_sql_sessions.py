"""Agent sessions in the SQL store: the same answers as the other stores, shared by separate engines (as
separate workers would hold), atomic under concurrency, bounded and expiring; SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from tests.unit.test_agents_guard import check_session_store
from ztai.agents.provenance import Observed
from ztai.agents.session import FLAG_SUSPICIOUS, FLAG_TRUSTED, FLAG_UNTRUSTED
from ztai.agents.sql_sessions import SqlSessionStore
from ztai.store import Database, open_database


@pytest.fixture
def databases(store_url: str) -> Iterator[tuple[Database, Database]]:
    """Two engines on one fresh store, like two gateway workers."""
    first, second = open_database(store_url), open_database(store_url)
    first.migrate()
    yield first, second
    first.close()
    second.close()


def key(n: int) -> bytes:
    return n.to_bytes(8, "big")


async def test_the_sql_store_agrees_with_the_others(databases: tuple[Database, Database]) -> None:
    await check_session_store(SqlSessionStore(databases[0], ttl_seconds=60))


async def test_workers_sharing_the_store_lose_no_update(databases: tuple[Database, Database]) -> None:
    workers = [SqlSessionStore(database, ttl_seconds=60) for database in databases]
    session = "tsk_" + secrets.token_hex(8)

    async def observe(n: int) -> None:
        store = workers[n % 2]
        trusted = n % 3 == 0
        observed = Observed(values={key(0), key(n + 1)}, suspicious=set() if trusted else {key(1000)})
        await store.record("t", session, observed, trusted=trusted, source=f"s{n % 4}", flagged=n == 7)

    await asyncio.gather(*(observe(n) for n in range(24)))
    chain = ((session, 15), ("tsk_leaf", None))
    refused = await asyncio.gather(*(workers[n % 2].spend_call("t", chain) for n in range(20)))
    state, seen = await workers[1].lookup("t", session, {key(0), key(1000), *(key(n + 1) for n in range(24))})
    assert seen[key(0)] == FLAG_TRUSTED | FLAG_UNTRUSTED  # OR-ed across both workers
    assert seen[key(1000)] == FLAG_SUSPICIOUS | FLAG_UNTRUSTED and len(seen) == 26
    assert (
        state.flagged
        and state.tainted
        and state.untrusted_sources == {f"s{n % 4}" for n in range(24) if n % 3}
    )
    # Exactly the limit across both workers: each call counted once, none over the budget.
    assert refused.count(None) == 15 and refused.count(session) == 5
    assert state.calls == 15


async def test_sessions_are_bounded_and_expire(databases: tuple[Database, Database]) -> None:
    now = [datetime(2030, 1, 1, tzinfo=UTC)]
    store = SqlSessionStore(databases[0], ttl_seconds=60, max_values=100, clock=lambda: now[0])
    session = "tsk_" + secrets.token_hex(8)
    await store.record(
        "t", session, Observed(values={key(n) for n in range(150)}), trusted=False, source="x", flagged=True
    )
    await store.record(
        "t",
        session,
        Observed(values={key(n) for n in range(90, 200)}),
        trusted=True,
        source="u",
        flagged=False,
    )
    _, seen = await store.lookup("t", session, {key(n) for n in range(200)})
    assert len(seen) == 100  # no more keys than the bound, and the known ones still updated
    assert all(seen[key(n)] == FLAG_TRUSTED | FLAG_UNTRUSTED for n in range(90, 100) if key(n) in seen)
    assert await store.spend_call("t", ((session, 1),)) is None

    now[0] += timedelta(seconds=61)
    state, seen = await store.lookup("t", session, {key(1)})
    assert not state.tainted and seen == {}  # expired: nothing is remembered
    assert await store.spend_call("t", ((session, 1),)) is None  # an idle counter starts over
    state, seen = await store.lookup("t", session, {key(1)})
    assert not state.flagged and state.calls == 1 and seen == {}  # the old session's keys are gone

    now[0] += timedelta(seconds=61)
    assert store.purge() == 1
    assert store.purge() == 0
