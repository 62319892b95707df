"""`ztai approvals list|approve|deny`: tool calls held for a human decision. Every decision is audited."""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Annotated

import orjson
import typer
from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

from ztai.agents.approvals import ApprovalStore, approval_event, approval_json
from ztai.cli.common import ConfigOption, fail, open_audit_log, open_database_for, record_events, settings_for
from ztai.config import DEFAULT_CONFIG_PATH
from ztai.errors import ZtaiError
from ztai.store import Approval

app = typer.Typer(help="List, approve and deny tool calls held for approval.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)

TenantOption = Annotated[
    str | None, typer.Option(help="only this tenant's approvals (default: every tenant)")
]
ByOption = Annotated[str | None, typer.Option(help="who decides (recorded; default: cli:<login name>)")]
NoteOption = Annotated[str, typer.Option(help="why (recorded in the audit log)")]


@app.command("list")
def list_approvals(
    status: Annotated[str, typer.Option(help="pending, approved, denied, used, expired or all")] = "pending",
    tenant: TenantOption = None,
    limit: Annotated[int, typer.Option(help="at most this many, newest first")] = 100,
    json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table")] = False,
    config: ConfigOption = DEFAULT_CONFIG_PATH,
) -> None:
    """Show approvals (pending ones by default), newest first.

    Example: ztai approvals list --status all --json
    """
    database = open_database_for(settings_for(config))
    try:
        rows = ApprovalStore(database).list(tenant, status, limit)
    except ZtaiError as exc:
        fail(exc.message)
    finally:
        database.close()
    if json:
        for row in rows:
            typer.echo(orjson.dumps({**approval_json(row), "tenant": row.tenant}).decode())
        return
    if not rows:
        err.print("no approvals" + ("" if status == "all" else f" with status {status}"))
        return
    out.print(_table(rows))


def _table(rows: list[Approval]) -> Table:
    """One block of `field  value` lines per approval: readable in any terminal width (nine columns
    side by side are not). Ids and names fold when they must wrap; they are never cut short."""
    table = Table.grid(Column(style="bold", no_wrap=True), Column(overflow="fold"), padding=(0, 2))
    for index, row in enumerate(rows):
        document = approval_json(row)
        fields = {
            "id": row.id,
            "status": row.status,
            "call": f"{row.server}/{row.tool}",
            "task": row.task_id,
            "principal": row.principal,
            "tenant": row.tenant,
            "preview": row.preview,
            "reasons": ", ".join(document["reasons"]),
            "expires": document["expires_at"][:19],
        }
        if index:
            table.add_row("", "")
        for name, value in fields.items():
            # Text, not markup: previews and names come from agents' calls ("[...]" must print as it is).
            table.add_row(name, Text(value))
    return table


@app.command("approve")
def approve(
    approval_id: Annotated[str, typer.Argument(metavar="ID", help="the approval id (apr_...)")],
    by: ByOption = None,
    note: NoteOption = "",
    tenant: TenantOption = None,
    config: ConfigOption = DEFAULT_CONFIG_PATH,
) -> None:
    """Approve a pending call: the agent's next identical call goes through (once).

    Example: ztai approvals approve apr_0123456789abcdef01234567 --note "checked with Alice"
    """
    _decide(config, approval_id, approve=True, by=by, note=note, tenant=tenant)


@app.command("deny")
def deny(
    approval_id: Annotated[str, typer.Argument(metavar="ID", help="the approval id (apr_...)")],
    by: ByOption = None,
    note: NoteOption = "",
    tenant: TenantOption = None,
    config: ConfigOption = DEFAULT_CONFIG_PATH,
) -> None:
    """Deny a pending call: retrying it asks for a new approval.

    Example: ztai approvals deny apr_0123456789abcdef01234567 --note "unknown recipient"
    """
    _decide(config, approval_id, approve=False, by=by, note=note, tenant=tenant)


def _decide(
    config: Path, approval_id: str, *, approve: bool, by: str | None, note: str, tenant: str | None
) -> None:
    decider = by or _login_name()
    settings = settings_for(config)
    database, _keys, audit_log = open_audit_log(settings)
    try:
        approval = ApprovalStore(database).decide(tenant, approval_id, approve, decider)
        record_events(settings, audit_log, [approval_event(approval, by=decider, note=note, via="cli")])
    except ZtaiError as exc:
        fail(exc.message)
    finally:
        database.close()
    err.print(
        f"{approval.status} {approval.id}: {approval.server}/{approval.tool} "
        f"for task {approval.task_id} ({approval.principal})"
    )


def _login_name() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):  # no login name (containers without a passwd entry)
        return "cli"
