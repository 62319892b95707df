"""`ztai policy validate|test|reload|whatif`."""

from __future__ import annotations

import os
import signal
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import orjson
import typer
from rich.console import Console
from rich.table import Table

from ztai.cli.common import ConfigOption, fail, open_audit_log, settings_for
from ztai.config import DEFAULT_CONFIG_PATH, Settings
from ztai.errors import ZtaiError
from ztai.policy import PolicyEngine, load_bundle, model_entities
from ztai.policy.testing import run_file
from ztai.policy.whatif import WhatIfReport, replay

app = typer.Typer(help="Validate, test and reload Cedar policies.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)


def _models(settings: Settings) -> list[dict[str, object]]:
    """The static entities of the configured models."""
    return model_entities(
        (model, name) for name, upstream in settings.upstreams.items() for model in upstream.models
    )


def _engine(settings: Settings) -> PolicyEngine:
    try:
        return PolicyEngine(settings.policy_path, _models(settings))
    except ZtaiError as exc:
        fail(exc.message)


@app.command("validate")
def validate(config: ConfigOption = DEFAULT_CONFIG_PATH) -> None:
    """Parse and validate the policy directory against the schema.

    Example: ztai policy validate
    """
    engine = _engine(settings_for(config))
    err.print(
        f"[green]valid[/green]: {len(engine.bundle.files)} files, {len(engine.bundle.names)} policies, "
        f"revision {engine.revision}"
    )


@app.command("test")
def test(
    file: Annotated[Path, typer.Argument(help="YAML file of request -> expected decision cases")],
    config: ConfigOption = DEFAULT_CONFIG_PATH,
) -> None:
    """Run policy test cases; exits non-zero when any case fails.

    Example: ztai policy test policies/tests.yaml
    """
    engine = _engine(settings_for(config))
    try:
        results = run_file(engine, file)
    except ZtaiError as exc:
        fail(exc.message)
    table = Table("", "case", "expected", "got", "reasons")
    for result in results:
        mark = "[green]pass[/green]" if result.passed else "[red]FAIL[/red]"
        table.add_row(
            mark, result.name, result.expected, result.decision.effect, ", ".join(result.decision.reasons)
        )
    out.print(table)
    failed = [r for r in results if not r.passed]
    for result in failed:
        err.print(f"[red]FAIL[/red] {result.name}: {result.problem}")
    err.print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    raise typer.Exit(1 if failed else 0)


@app.command("reload")
def reload(config: ConfigOption = DEFAULT_CONFIG_PATH) -> None:
    """Validate the policies, then tell the running server to load them (SIGHUP).

    A policy set that fails validation is not sent; the server keeps its current policies.
    Example: ztai policy reload
    """
    settings = settings_for(config)
    engine = _engine(settings)
    pid_file = settings.data_path / "ztai.pid"
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError):
        fail(f"no running server found (pid file {pid_file})")
    err.print(f"sent reload to server {pid}: revision {engine.revision}")


@app.command("whatif")
def whatif(
    policies: Annotated[Path, typer.Option("--policies", help="directory of the candidate *.cedar files")],
    since: Annotated[
        str | None, typer.Option(help="only decisions recorded at or after this time (ISO 8601, UTC default)")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="at most this many decisions, the newest")] = 10_000,
    json: Annotated[bool, typer.Option("--json", help="one JSON line per changed decision")] = False,
    config: ConfigOption = DEFAULT_CONFIG_PATH,
) -> None:
    """Decide recorded decisions again with a candidate policy set; print what would change.

    Nothing is written. Decisions recorded under another schema are counted as not replayable.
    --json prints {"decision_id", "before", "after", "reasons"} per changed decision, then a summary line.
    Example: ztai policy whatif --policies ./candidate --since 2026-12-01T00:00:00Z --json
    """
    settings = settings_for(config)
    try:
        candidate = load_bundle(policies, _models(settings))
    except ZtaiError as exc:
        fail(exc.message)
    start = parse_since(since) if since is not None else None
    database, _keys, audit_log = open_audit_log(settings)
    try:
        report = replay(audit_log.decisions(since=start, limit=limit), candidate)
    finally:
        database.close()
    if json:
        for change in report.changes:
            typer.echo(orjson.dumps(change.to_json()).decode())
        typer.echo(orjson.dumps({"summary": report.summary()}).decode())
        return
    print_report(report)


def parse_since(text: str) -> datetime:
    """An ISO 8601 time; without an offset it is UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        fail(f"--since must be an ISO 8601 time, e.g. 2026-12-01T09:00:00Z (got {text!r})")
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def print_report(report: WhatIfReport) -> None:
    summary = report.summary()
    out.print(
        f"{summary['considered']} recorded decisions considered: {summary['replayed']} replayed, "
        f"{summary['not_replayable']} not replayable"
        + "".join(f", {count} {why}" for why, count in summary["not_replayable_by_reason"].items())
    )
    out.print(f"{summary['changed']} would change with revision {summary['candidate_revision']}")
    if not report.changes:
        return
    effects = Table("before -> after", "decisions")
    for transition, count in summary["by_effect"].items():
        effects.add_row(transition, str(count))
    out.print(effects)
    table = Table("policy", "decisions")
    for policy, count in summary["by_policy"].items():
        table.add_row(policy, str(count))
    out.print(table)
