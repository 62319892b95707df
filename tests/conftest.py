"""Shared fixtures: a ztai home (config, keys, policies) and a store on SQLite or PostgreSQL.

PostgreSQL tests use $ZTAI_TEST_POSTGRES_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/test),
Redis tests $ZTAI_TEST_REDIS_URL (default redis://127.0.0.1:6379/0). Where no server answers they skip
with the reason, unless $ZTAI_TEST_REQUIRE_POSTGRES=1 / $ZTAI_TEST_REQUIRE_REDIS=1 (set by CI), in which
case they fail.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import text

from ztai.config import Settings, load_settings
from ztai.identity import KeyStore
from ztai.policy.engine import DEFAULTS_DIR
from ztai.store import Database, open_database

POSTGRES_URL = os.environ.get("ZTAI_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REQUIRE_POSTGRES = os.environ.get("ZTAI_TEST_REQUIRE_POSTGRES") == "1"
REDIS_URL = os.environ.get("ZTAI_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRE_REDIS = os.environ.get("ZTAI_TEST_REQUIRE_REDIS") == "1"


def postgres_available() -> str | None:
    """None when PostgreSQL answers, else the reason it does not."""
    try:
        database = open_database(POSTGRES_URL)
        database.ping()
        database.close()
    except Exception as exc:
        return f"PostgreSQL not reachable at {POSTGRES_URL.split('@')[-1]}: {type(exc).__name__}"
    return None


def reset_postgres() -> None:
    database = open_database(POSTGRES_URL)
    with database.engine.begin() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE"))
        connection.execute(text("CREATE SCHEMA public"))
    database.close()


def redis_url_or_skip(url: str = REDIS_URL) -> str:
    """`url` when Redis answers there; else the test skips saying why (fails under REQUIRE_REDIS)."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1)
        client.ping()
        client.close()
    except (redis.RedisError, OSError) as exc:
        reason = f"Redis not reachable at {url.split('@')[-1]}: {type(exc).__name__}"
        if REQUIRE_REDIS:
            pytest.fail(f"{reason} (ZTAI_TEST_REQUIRE_REDIS=1)")
        pytest.skip(reason)
    return url


def store_url_for(kind: str, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'ztai.db'}"
    reason = postgres_available()
    if reason is not None:
        if REQUIRE_POSTGRES:
            pytest.fail(f"{reason} (ZTAI_TEST_REQUIRE_POSTGRES=1)")
        pytest.skip(reason)
    reset_postgres()
    return POSTGRES_URL


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty store: runs the test once on SQLite and once on PostgreSQL."""
    return store_url_for(str(request.param), tmp_path)


@pytest.fixture
def database(store_url: str) -> Iterator[Database]:
    db = open_database(store_url)
    db.migrate()
    yield db
    db.close()


@pytest.fixture
def ztai_home(tmp_path: Path) -> Path:
    """A directory laid out as `ztai init` leaves it (config, keys, policies), SQLite store."""
    config = tmp_path / "ztai.yaml"
    config.write_text(
        "trust_domain: example.org\n"
        "data_dir: data\n"
        "upstreams:\n"
        "  mock: {base_url: 'http://127.0.0.1:9100/v1', models: [mock]}\n"
    )
    (tmp_path / "data").mkdir(mode=0o700)
    KeyStore.create(tmp_path / "data")
    shutil.copytree(DEFAULTS_DIR, tmp_path / "policies")
    return tmp_path


@pytest.fixture
def settings(ztai_home: Path) -> Settings:
    return load_settings(ztai_home / "ztai.yaml")
