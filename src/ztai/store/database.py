"""Engine creation and schema migrations (Alembic, run programmatically).

The engine is synchronous: blocking calls run on worker threads (`asyncio.to_thread`) or on the audit
writer's own thread, never on the event loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, Executable, create_engine, event, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from ztai.errors import ConfigError, StoreError

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


@dataclass
class Database:
    engine: Engine
    sessions: sessionmaker[Session]

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on error."""
        with self.sessions.begin() as session:
            yield session

    @contextmanager
    def guarded(self, what: str, *, write: bool = True) -> Iterator[Session]:
        """A transaction (or a plain session with `write=False`) whose driver errors become a
        StoreError naming `what` (503), never a stack trace or a connection string."""
        try:
            with self.transaction() if write else self.sessions() as session:
                yield session
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot {what}: {type(exc).__name__}") from exc

    def ping(self) -> None:
        try:
            with self.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            raise StoreError(f"store unreachable: {type(exc).__name__}") from exc

    def migrate(self) -> None:
        """Bring the schema to the newest revision (idempotent)."""
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        with self.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def close(self) -> None:
        self.engine.dispose()


def rows_changed(session: Session, statement: Executable) -> int:
    """The row count of an UPDATE or DELETE (its result is a CursorResult; the generic type hides it)."""
    return cast(CursorResult[Any], session.execute(statement)).rowcount


def aware(value: datetime) -> datetime:
    """A datetime read from the store, in UTC (SQLite returns naive ones; everything is stored in UTC)."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def open_database(url: str, *, sqlite_synchronous: str = "FULL", pool_size: int = 5) -> Database:
    """Create the engine for `url` (sqlite:///FILE or postgresql+psycopg://...)."""
    if url.startswith("sqlite"):
        path = url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10})
        _configure_sqlite(engine, sqlite_synchronous)
    elif url.startswith("postgresql"):
        if not url.startswith("postgresql+psycopg://"):
            raise ConfigError("store.url: use the psycopg 3 driver, postgresql+psycopg://...")
        engine = create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)
    else:
        raise ConfigError("store.url: expected sqlite:///PATH or postgresql+psycopg://...")
    return Database(engine=engine, sessions=sessionmaker(engine, expire_on_commit=False))


def _configure_sqlite(engine: Engine, synchronous: str) -> None:
    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        # WAL lets readers (verify, readyz) run beside the writer; FULL makes each commit durable
        # against power loss. Python's sqlite3 must not open transactions implicitly: we BEGIN ourselves.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection: Any) -> None:
        # Take the write lock at BEGIN so concurrent writers (several workers) queue instead of failing.
        connection.exec_driver_sql("BEGIN IMMEDIATE")
