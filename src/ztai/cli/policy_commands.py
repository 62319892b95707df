"""`ztai policy validate|test|reload|whatif`."""

from __future__ import annotations

import logging
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import orjson
import typer
from rich.console import Console
from rich.table import Table

from ztai.audit import AuditLog
from ztai.cli.common import (
    ConfigOption,
    fail,
    load_keys,
    open_audit_log,
    open_database_for,
    record_events,
    settings_for,
)
from ztai.cli.pidfile import StalePidFile, running_server
from ztai.config import DEFAULT_CONFIG_PATH, Settings
from ztai.errors import PolicyError, ZtaiError
from ztai.policy import PolicyEngine, load_bundle, model_entities
from ztai.policy.reloads import POLICY_CHANNEL, REFUSED, PolicyReloads, ReloadRequest, reload_event
from ztai.policy.testing import run_file
from ztai.policy.whatif import WhatIfReport, replay
from ztai.store.shared import publish_once

app = typer.Typer(help="Validate, test and reload Cedar policies.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)
log = logging.getLogger("ztai.cli")


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
def reload(
    config: ConfigOption = DEFAULT_CONFIG_PATH,
    wait: Annotated[
        float, typer.Option(help="seconds to wait for every worker to confirm (0: do not wait)")
    ] = 10.0,
) -> None:
    """Validate the policies, then have every worker of the running server swap to them in place.

    The revision is recorded in the store; each worker (and each replica sharing the store) loads it,
    checks it is the validated revision and swaps atomically, without restarting. An invalid set is
    refused (exit code 2) and the server keeps its current policies.
    Example: ztai policy reload
    """
    settings = settings_for(config)
    try:  # a pid file is trusted only while its server holds the lock: never act on a stale one
        server = running_server(settings.data_path)
    except StalePidFile as exc:
        fail(exc.message)
    if server is None:
        fail(f"no running server found (pid file {settings.data_path / 'ztai.pid'})")
    try:
        request, after = submit_reload(settings, "cli")
    except ZtaiError as exc:
        fail(exc.message)
    err.print(f"reload {request.id} requested: revision {request.revision} (server {server.pid})")
    if wait > 0:
        _await_workers(settings, request, after, server.workers, wait)


def submit_reload(settings: Settings, requested_by: str) -> tuple[ReloadRequest, int]:
    """Validate the policy directory and record a reload request (and tell the workers over Redis when
    configured). Returns the request and the audit log's size before it. An invalid set raises
    PolicyError, after its refusal was audited; nothing is requested then."""
    database = open_database_for(settings)
    try:
        reloads = PolicyReloads(database)
        try:
            engine = PolicyEngine(settings.policy_path, _models(settings))
        except PolicyError as exc:
            audit_log = AuditLog(database, load_keys(settings).audit.private_key)
            refused = reload_event(
                REFUSED,
                tenant=settings.trust_domain,
                principal=settings.issuer,
                request=None,
                revision="",
                previous="",
                problem=f"{requested_by}: {exc.message}",
            )
            record_events(settings, audit_log, [refused])
            raise
        after = reloads.next_audit_seq()
        request = reloads.request(engine.revision, requested_by)
    finally:
        database.close()
    if settings.store.redis_url:
        publish_once(settings.store.redis_url, POLICY_CHANNEL, orjson.dumps({"v": 1, "id": request.id}))
    return request, after


def request_reload_quietly(settings: Settings, requested_by: str) -> None:
    """`submit_reload` for the server's SIGHUP handler: failures are logged, never raised."""
    try:
        request, _ = submit_reload(settings, requested_by)
    except ZtaiError as exc:
        log.error("policy reload (%s) refused, the active policies stay: %s", requested_by, exc.message)
        return
    log.warning("policy reload %d requested (%s): revision %s", request.id, requested_by, request.revision)


def _await_workers(settings: Settings, request: ReloadRequest, after: int, workers: int, wait: float) -> None:
    """Wait until the local server's `workers` workers applied `request` (replicas on other hosts report
    too: a refusal anywhere exits non-zero, as does a timeout)."""
    host = socket.gethostname()
    database = open_database_for(settings)
    deadline = time.monotonic() + wait
    try:
        while True:
            outcomes = PolicyReloads(database).outcomes(request.id, after)
            refused = [event for event in outcomes if event["kind"] == REFUSED]
            if refused:
                worker = refused[0]["reload"]["worker"]
                fail(f"worker {worker} refused the reload: {'; '.join(refused[0]['reasons'])}", code=1)
            here = [event for event in outcomes if event["reload"]["worker"].startswith(f"{host}:")]
            if len(here) >= workers:
                err.print(f"[green]applied[/green] by {len(here)} of {workers} worker(s), no restart")
                return
            if time.monotonic() > deadline:
                fail(f"only {len(here)} of {workers} worker(s) confirmed within {wait:g}s", code=1)
            time.sleep(0.1)
    except ZtaiError as exc:
        fail(exc.message)
    finally:
        database.close()


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
