"""`ztai vault`: session tokenization vaults (what is held, ending one, purging expired ones)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import orjson
import typer
from rich.console import Console

from ztai.audit import AuditLog
from ztai.audit.events import identity_event
from ztai.cli.common import ConfigOption, fail, open_audit_log, record_events, settings_for
from ztai.config import DEFAULT_CONFIG_PATH, Settings
from ztai.detect.vault import VaultKeys, session_name
from ztai.detect.vault_store import SqlVaultStore
from ztai.errors import ZtaiError
from ztai.identity import KeyStore

app = typer.Typer(
    help="Session tokenization vaults (values kept encrypted for a session).", no_args_is_help=True
)
err = Console(stderr=True)


@contextmanager
def _opened(config: Path) -> Iterator[tuple[Settings, SqlVaultStore, KeyStore, AuditLog]]:
    settings = settings_for(config)
    database, keys, audit_log = open_audit_log(settings)
    vault = settings.detect.vault
    try:
        yield (
            settings,
            SqlVaultStore(database, ttl_seconds=vault.ttl_seconds, max_entries=vault.max_entries),
            keys,
            audit_log,
        )
    except ZtaiError as exc:
        fail(exc.message)
    finally:
        database.close()


@app.command("stats")
def stats(config: ConfigOption = DEFAULT_CONFIG_PATH) -> None:
    """Print how many session vaults are live and how many values they hold, as JSON."""
    with _opened(config) as (_settings, store, _keys, _log):
        typer.echo(orjson.dumps(store.stats()).decode())


@app.command("purge")
def purge(config: ConfigOption = DEFAULT_CONFIG_PATH) -> None:
    """Delete expired session vaults now (the gateway does it every detect.vault.purge_interval_seconds)."""
    with _opened(config) as (_settings, store, _keys, _log):
        removed = store.purge()
    err.print(f"purged {removed} entries of expired session vaults")


@app.command("forget")
def forget(
    principal: Annotated[
        str, typer.Option(help="the session owner's SPIFFE ID, e.g. spiffe://example.org/user/alice")
    ],
    session: Annotated[str, typer.Option(help="the session name (x-ztai-session), or task:<root task id>")],
    tenant: Annotated[str | None, typer.Option(help="tenant (default: the configured trust domain)")] = None,
    agent: Annotated[
        str,
        typer.Option(help="for a vault of an agent's task tokens: the agent holding the root task"),
    ] = "",
    config: ConfigOption = DEFAULT_CONFIG_PATH,
) -> None:
    """End one principal's session vault now: its values are deleted (audited).

    Example: ztai vault forget --principal spiffe://example.org/user/alice --session chat-42
    """
    with _opened(config) as (settings, store, keys, audit_log):
        owner = tenant or settings.trust_domain
        name = session_name(session, None)
        assert name is not None
        scope = VaultKeys.load(keys.audit_secret()).scope(owner, principal, name, agent)
        removed = store.forget(scope)
        event = identity_event(
            "vault.forgotten",
            tenant=owner,
            principal=principal,
            details={"scope": scope.id, "entries": removed, "by": "cli"},
        )
        record_events(settings, audit_log, [event])
    err.print(f"forgot {removed} entries of that session vault")
