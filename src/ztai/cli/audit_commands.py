"""`ztai audit verify|proof|consistency|tail`."""

from __future__ import annotations

import base64
from typing import Annotated

import orjson
import typer
from rich.console import Console
from rich.table import Table

from ztai.audit import merkle
from ztai.cli.common import ConfigOption, fail, open_audit_log, settings_for
from ztai.config import DEFAULT_CONFIG_PATH

app = typer.Typer(help="Verify the audit log and print proofs.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)


@app.command("verify")
def verify(config: ConfigOption = DEFAULT_CONFIG_PATH) -> None:
    """Recompute every leaf and checkpoint; exit 1 naming the first bad entry if anything was altered.

    Example: ztai audit verify
    """
    database, keys, audit_log = open_audit_log(settings_for(config))
    try:
        report = audit_log.verify({keys.audit.kid: keys.audit.public_key})
    finally:
        database.close()
    if not report.ok:
        err.print(f"[bold red]audit log NOT intact[/bold red]: {report.problem}")
        raise typer.Exit(1)
    for note in report.notes:
        err.print(f"note: {note}")
    err.print(
        f"[green]audit log intact[/green]: {report.events} events, {report.checkpoints} signed checkpoints"
    )


@app.command("proof")
def proof(
    index: Annotated[int, typer.Argument(help="event index (0-based leaf number)")],
    tree_size: Annotated[int | None, typer.Option(help="prove against this checkpoint size")] = None,
    config: ConfigOption = DEFAULT_CONFIG_PATH,
) -> None:
    """Print (JSON) an inclusion proof of event N in a signed checkpoint, and check it.

    Example: ztai audit proof 42
    """
    database, _keys, audit_log = open_audit_log(settings_for(config))
    try:
        document = audit_log.inclusion_proof(index, tree_size)
    except (LookupError, merkle.ProofError) as exc:
        fail(str(exc))
    finally:
        database.close()
    merkle.verify_inclusion(
        _b64(document["leaf_hash"]),
        index,
        document["tree_size"],
        [_b64(h) for h in document["proof"]],
        _b64(document["checkpoint"]["root_hash"]),
    )
    typer.echo(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())


@app.command("consistency")
def consistency(
    old: Annotated[int, typer.Argument(help="older tree size (a checkpoint)")],
    new: Annotated[int, typer.Argument(help="newer tree size (a checkpoint)")],
    config: ConfigOption = DEFAULT_CONFIG_PATH,
) -> None:
    """Print (JSON) a consistency proof between two signed checkpoints, and check it.

    Example: ztai audit consistency 10 250
    """
    database, _keys, audit_log = open_audit_log(settings_for(config))
    try:
        document = audit_log.consistency_proof(old, new)
    except (LookupError, merkle.ProofError) as exc:
        fail(str(exc))
    finally:
        database.close()
    merkle.verify_consistency(
        old, new, _b64(document["old_root"]), _b64(document["new_root"]), [_b64(h) for h in document["proof"]]
    )
    typer.echo(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())


@app.command("tail")
def tail(
    lines: Annotated[int, typer.Option("-n", "--lines", help="how many events")] = 20,
    json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table")] = False,
    config: ConfigOption = DEFAULT_CONFIG_PATH,
) -> None:
    """Show the newest events.

    Example: ztai audit tail -n 50
    """
    database, _keys, audit_log = open_audit_log(settings_for(config))
    try:
        events = audit_log.tail(lines)
    finally:
        database.close()
    if json:
        for seq, event in events:
            typer.echo(orjson.dumps({"seq": seq, **event}).decode())
        return
    table = Table("#", "time", "kind", "principal", "action", "resource", "effect", "reasons")
    for seq, event in events:
        table.add_row(
            str(seq),
            event["time"][:23],
            event["kind"],
            event.get("principal", ""),
            event.get("action", ""),
            event.get("resource", ""),
            event.get("effect", ""),
            ", ".join(event.get("reasons", [])),
        )
    out.print(table)


def _b64(value: str) -> bytes:
    return base64.b64decode(value)
