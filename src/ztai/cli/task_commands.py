"""`ztai task revoke`: end an agent task and all its sub-tasks on every replica."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated

import typer
from rich.console import Console

from ztai.audit.events import identity_event
from ztai.cli.common import ConfigOption, fail, open_audit_log, record_events, settings_for
from ztai.config import DEFAULT_CONFIG_PATH, Settings
from ztai.errors import ZtaiError
from ztai.identity import RevocationList
from ztai.identity.revocation import REVOCATION_CHANNEL
from ztai.store.shared import publish_once

app = typer.Typer(help="Agent tasks (task tokens from token exchange).", no_args_is_help=True)
err = Console(stderr=True)


class RedisPublisher:
    """Publishes revocation notices from the CLI when `store.redis_url` is set (replicas then learn at
    once; otherwise, or when Redis is down, they learn at their next poll of the store)."""

    def __init__(self, settings: Settings) -> None:
        self.url = settings.store.redis_url
        self.failed = False

    @property
    def callback(self) -> Callable[[bytes], None] | None:
        return self._publish if self.url else None

    def _publish(self, data: bytes) -> None:
        self.failed = not publish_once(self.url, REVOCATION_CHANNEL, data)

    def report(self) -> None:
        if self.failed:
            err.print("[yellow]warning:[/yellow] Redis unreachable; replicas learn at their next store poll")


@app.command("revoke")
def revoke(
    task_id: Annotated[str, typer.Argument(help="the task id (the `task` claim, tsk_...)")],
    reason: Annotated[str, typer.Option(help="why (recorded in the audit log)")] = "",
    tenant: Annotated[str | None, typer.Option(help="tenant (default: the configured trust domain)")] = None,
    config: ConfigOption = DEFAULT_CONFIG_PATH,
) -> None:
    """Revoke a task: every token of it and of its sub-tasks is refused, on every replica.

    Example: ztai task revoke tsk_4f1c2e9a0b7d4c3e8f6a5b2c1d0e9f8a --reason "agent misbehaved"
    """
    revoke_and_record(settings_for(config), tenant, "task", task_id, reason)
    err.print(f"revoked {task_id} and its sub-tasks")


def revoke_and_record(settings: Settings, tenant: str | None, kind: str, ident: str, reason: str) -> None:
    """Revoke a token (`kind` "token", ident = jti) or a task (`kind` "task"): durable in the store,
    pushed to the replicas over Redis when configured, and audited. Exits with a message on failure."""
    database, _keys, audit_log = open_audit_log(settings)
    owner = tenant or settings.trust_domain
    publisher = RedisPublisher(settings)
    # Tokens live at most identity.max_ttl_seconds (+ leeway): the revocation is kept that long.
    expires = time.time() + settings.identity.max_ttl_seconds + settings.identity.leeway_seconds
    field = "task" if kind == "task" else "jti"
    try:
        revocations = RevocationList(database, publish=publisher.callback)
        if kind == "task":
            revocations.revoke_tenant_task(owner, ident, expires, reason)  # a task issued in `owner` only
        else:
            revocations.revoke(owner, ident, expires, reason)
        event = identity_event(
            f"{kind}.revoked",
            tenant=owner,
            principal=f"{field}:{ident}",
            details={field: ident, "reason": reason, "by": "cli"},
        )
        record_events(settings, audit_log, [event])
    except ZtaiError as exc:
        fail(exc.message)
    finally:
        database.close()
    publisher.report()
