"""Shared pieces of the CLI: the --config option, loading settings, opening the store, failing clearly."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from ztai.audit import AuditLog
from ztai.audit.witness import build_witnesses, deliver_now
from ztai.config import Settings, load_settings
from ztai.errors import ZtaiError
from ztai.identity import KeyStore
from ztai.store import Database, open_database

ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="path to ztai.yaml", envvar="ZTAI_CONFIG", show_default=True)
]

_stderr = Console(stderr=True)


def fail(message: str, code: int = 2) -> NoReturn:
    _stderr.print(f"[bold red]error:[/bold red] {message}", highlight=False)
    raise SystemExit(code)


def settings_for(config: Path) -> Settings:
    try:
        return load_settings(config)
    except ZtaiError as exc:
        fail(exc.message)


def open_database_for(settings: Settings) -> Database:
    """Open the store and bring its schema up to date."""
    try:
        database = open_database(
            settings.store_url,
            sqlite_synchronous=settings.store.sqlite_synchronous,
            pool_size=settings.store.pool_size,
        )
        database.migrate()
    except ZtaiError as exc:
        fail(exc.message)
    except Exception as exc:  # driver errors: say which store, never the password
        fail(f"cannot open the store {settings.store_url.split('@')[-1]}: {type(exc).__name__}: {exc}")
    return database


def load_keys(settings: Settings) -> KeyStore:
    try:
        return KeyStore.load(settings.data_path)
    except ZtaiError as exc:
        fail(exc.message)


def open_audit_log(settings: Settings) -> tuple[Database, KeyStore, AuditLog]:
    database = open_database_for(settings)
    keys = load_keys(settings)
    return database, keys, AuditLog(database, keys.audit.private_key)


def record_events(settings: Settings, audit_log: AuditLog, events: list[dict[str, Any]]) -> None:
    """Append `events` (durable when this returns), then sign a checkpoint covering them and hand it to
    the witnesses: with no server running nothing else would, and events left uncovered fail
    `ztai audit verify` once they are older than `audit.max_uncovered_seconds`."""
    audit_log.append(events)
    try:
        checkpoint = audit_log.checkpoint()
    except Exception as exc:  # the events are recorded; say loudly that they are not yet signed
        _stderr.print(f"[bold red]warning:[/bold red] recorded, but no checkpoint could be written: {exc}")
        return
    if checkpoint is None:
        return
    for failure in deliver_now(build_witnesses(settings.audit.witness, settings.path), checkpoint):
        _stderr.print(f"[yellow]warning:[/yellow] checkpoint not delivered to the witness {failure}")
