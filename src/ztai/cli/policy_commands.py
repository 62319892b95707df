"""`ztai policy validate|test|reload`."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ztai.cli.common import ConfigOption, fail, settings_for
from ztai.config import DEFAULT_CONFIG_PATH, Settings
from ztai.errors import ZtaiError
from ztai.policy import PolicyEngine, model_entities
from ztai.policy.testing import run_file

app = typer.Typer(help="Validate, test and reload Cedar policies.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)


def _engine(settings: Settings) -> PolicyEngine:
    models = [(model, name) for name, upstream in settings.upstreams.items() for model in upstream.models]
    try:
        return PolicyEngine(settings.policy_path, model_entities(models))
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
