"""`ztai agents replay`: decide recorded agent traces with the live gateway's code path."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import orjson
import typer

from ztai.agents.guard import AgentGuard
from ztai.agents.replay import replay_lines
from ztai.cli.common import ConfigOption, fail, settings_for
from ztai.config import DEFAULT_CONFIG_PATH, load_settings
from ztai.errors import ZtaiError
from ztai.policy import PolicyEngine
from ztai.policy.engine import DEFAULTS_DIR

app = typer.Typer(help="Agents: replay traces through the tool-call guard.", no_args_is_help=True)


@app.command("replay")
def replay(
    file: Annotated[Path, typer.Argument(help="traces, one JSON object per line ('-' for stdin)")],
    config: ConfigOption = DEFAULT_CONFIG_PATH,
) -> None:
    """Print one JSON line per tool call: {"trace", "index", "effect", "reasons"}.

    Uses the policies of the config (the packaged defaults when there is no config file). Trace format:
    docs/agents.md. Example: ztai agents replay traces.jsonl > decisions.jsonl
    """
    try:
        settings = settings_for(config) if config.exists() else load_settings(None)
        policy_dir = settings.policy_path if settings.policy_path.is_dir() else DEFAULTS_DIR
        policy = PolicyEngine(policy_dir)
    except ZtaiError as exc:
        fail(exc.message)

    async def discard(_event: dict[str, object]) -> None:
        return None  # an evaluation: decisions are printed, not written to the audit log

    guard = AgentGuard.build(settings, policy, discard, b"ztai replay")
    handle = sys.stdin.buffer if str(file) == "-" else _open(file)

    async def run() -> None:
        out = sys.stdout.buffer
        async for result in replay_lines(
            guard, handle, issuer=settings.issuer, trust_domain=settings.trust_domain
        ):
            out.write(orjson.dumps(result) + b"\n")
        out.flush()

    asyncio.run(run())


def _open(file: Path):  # type: ignore[no-untyped-def]
    try:
        return file.open("rb")
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror}")
