"""`ztai audit verify|proof|consistency|tail`."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import orjson
import typer
from rich.console import Console
from rich.table import Table

from ztai.audit import Checkpoint, merkle
from ztai.audit.witness import read_witness_file
from ztai.cli.common import ConfigOption, fail, open_audit_log, settings_for
from ztai.config import DEFAULT_CONFIG_PATH
from ztai.errors import CheckpointError

app = typer.Typer(help="Verify the audit log and print proofs.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)


@app.command("verify")
def verify(
    witness: Annotated[
        Path | None,
        typer.Option(
            "--witness",
            help="a witness file (audit.witness.file, or the OCSF export with audit.witness.ocsf):"
            " also detect deleted newest checkpoints and events, and any divergence from it",
        ),
    ] = None,
    max_uncovered_seconds: Annotated[
        float | None,
        typer.Option(help="fail when events have waited longer than this for a checkpoint"),
    ] = None,
    config: ConfigOption = DEFAULT_CONFIG_PATH,
) -> None:
    """Recompute every leaf and checkpoint; exit 1 naming the first bad entry if anything was altered,
    or if events have stayed uncovered by a checkpoint longer than audit.max_uncovered_seconds.

    Example: ztai audit verify --witness /var/log/ztai/checkpoints.jsonl
    """
    settings = settings_for(config)
    witnessed = _read_witness(witness) if witness is not None else None
    database, keys, audit_log = open_audit_log(settings)
    try:
        report = audit_log.verify({keys.audit.kid: keys.audit.public_key}, witnessed)
    finally:
        database.close()
    if not report.ok:
        err.print(f"[bold red]audit log NOT intact[/bold red]: {report.problem}")
        raise typer.Exit(1)
    for note in report.notes:
        err.print(f"note: {note}")
    bound = max_uncovered_seconds if max_uncovered_seconds is not None else settings.audit.uncovered_bound
    waited = (datetime.now(UTC) - report.uncovered_since).total_seconds() if report.uncovered_since else 0.0
    if waited > bound:
        err.print(
            f"[bold red]audit log NOT covered[/bold red]: {report.uncovered} events have waited {waited:.0f}s"
            f" for a signed checkpoint (bound {bound:g}s): checkpoints are not being written, and"
            " unsigned events can be deleted unnoticed"
        )
        raise typer.Exit(1)
    err.print(
        f"[green]audit log intact[/green]: {report.events} events, {report.checkpoints} signed checkpoints"
    )


def _read_witness(path: Path) -> list[Checkpoint]:
    try:
        found = read_witness_file(path)
    except OSError as exc:
        fail(f"cannot read the witness file {path}: {exc.strerror or exc}")
    for skipped in found.skipped:
        err.print(f"[yellow]warning:[/yellow] witness file {skipped}, skipped")
    if not found.checkpoints:
        err.print(
            f"[bold red]audit log NOT verified[/bold red]: the witness file {path} holds no checkpoints"
        )
        raise typer.Exit(1)
    return found.checkpoints


@app.command("repair-frontier")
def repair_frontier(config: ConfigOption = DEFAULT_CONFIG_PATH) -> None:
    """Rewrite stored checkpoint frontiers that no longer match the tree, so checkpoints resume.

    A frontier is derived data; it is rewritten only where the stored events reproduce the signed root.
    Example: ztai audit repair-frontier
    """
    database, keys, audit_log = open_audit_log(settings_for(config))
    try:
        repaired = audit_log.repair_frontiers({keys.audit.kid: keys.audit.public_key})
    except CheckpointError as exc:
        fail(f"nothing repaired: {exc}; run `ztai audit verify`")
    finally:
        database.close()
    if repaired:
        err.print(f"repaired the frontiers of the checkpoints at tree sizes {', '.join(map(str, repaired))}")
    else:
        err.print("every stored frontier matches the tree: nothing to repair")


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
