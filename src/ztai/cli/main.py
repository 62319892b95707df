"""The `ztai` command. One sub-command group per package; every command takes `--config PATH`."""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Annotated

import orjson
import typer
from rich.console import Console

from ztai.cli import (
    agent_commands,
    approval_commands,
    audit_commands,
    policy_commands,
    scan_command,
    task_commands,
    token_commands,
    vault_commands,
)
from ztai.cli.common import ConfigOption, fail, open_database_for, settings_for
from ztai.cli.pidfile import PidFile, ServerRunning
from ztai.config import DEFAULT_CONFIG_PATH, Settings, with_upstreams
from ztai.errors import ZtaiError
from ztai.identity import KeyStore
from ztai.policy.engine import DEFAULTS_DIR

app = typer.Typer(
    name="ztai",
    help="Zero Trust AI: a verifying gateway for model calls, agents and model loading.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(token_commands.app, name="token")
app.add_typer(token_commands.keys_app, name="keys")
app.add_typer(policy_commands.app, name="policy")
app.add_typer(audit_commands.app, name="audit")
app.add_typer(agent_commands.app, name="agents")
app.add_typer(approval_commands.app, name="approvals")
app.add_typer(task_commands.app, name="task")
app.add_typer(vault_commands.app, name="vault")
app.command("scan")(scan_command.scan)

err = Console(stderr=True)

CONFIG_TEMPLATE = """\
# ztai configuration. Every key can be overridden by a ZTAI_* environment variable,
# nested keys joined by a double underscore (e.g. ZTAI_SERVER__PORT=9000, ZTAI_STORE__URL=...).
trust_domain: {trust_domain}
data_dir: .ztai            # keys, SQLite database, pid file (relative to this file)

server:
  host: 127.0.0.1
  port: 8787
  max_body_bytes: 1048576
  # Connections: the head (request line + headers) at most max_header_bytes (else 431) and max_headers
  # fields (else 400); head and body within their timeouts (else 408); at most max_connections per worker
  # max_header_bytes: 65536
  # max_headers: 100
  # header_timeout_seconds: 10
  # body_timeout_seconds: 60
  # keep_alive_timeout_seconds: 5
  # max_connections: 4096
  access_log: false        # true: one JSON line per request on stderr; or a file, e.g. .ztai/access.jsonl

store:
  url: ""                  # empty: SQLite in data_dir; or postgresql+psycopg://user@host/db
  sqlite_synchronous: FULL # FULL: every audit commit survives power loss
  # redis_url: redis://127.0.0.1:6379/0   # shared fast state for several replicas
  # redis_timeout_seconds: 2              # a Redis outage answers 503 within this

identity:
  audience: ztai
  default_ttl_seconds: 300
  max_ttl_seconds: 3600
  leeway_seconds: 5
  # external_issuers:      # accept tokens of an OIDC provider
  #   - issuer: https://login.example.org   # subjects become spiffe://<td>/user/login.example.org/<sub>
  #     audience: ztai
  #     jwks_url: https://login.example.org/.well-known/jwks.json
  #     claim_map:         # its roles/models/tools/groups/scopes count only as mapped; the rest is dropped
  #       roles: {{claim: groups, values: {{idp-admins: admin}}}}
  # spiffe_bundles:        # accept JWT-SVIDs of a SPIFFE trust domain
  #   - trust_domain: prod.example.org
  #     bundle_file: bundle.jwks

policy:
  dir: policies            # *.cedar files, validated at start and on reload
  # reload_poll_seconds: 1 # how soon each worker sees `ztai policy reload` (at once with Redis)

audit:
  checkpoint_interval_seconds: 2
  ocsf_file: ""            # e.g. .ztai/audit.ocsf.jsonl for a SIEM
  commit_before_forward: false  # true: commit the audit event before the upstream sees the request
  # auth_failures_per_window: 10     # failed authentications audited per client and reason per window
  # auth_failure_window_seconds: 60  # (per worker); the rest are counted in one summary event
  # max_uncovered_seconds: 30  # events older than this with no checkpoint: /readyz 503, verify fails
  witness:                 # each signed checkpoint also goes here (ztai audit verify --witness FILE)
    file: ""               # e.g. /var/log/ztai/checkpoints.jsonl, on storage the database admins cannot edit
    url: ""                # POST each checkpoint as JSON, e.g. https://witness.example.org/ztai
    ocsf: false            # true: also into ocsf_file, for the SIEM

detect:                    # content detectors per route; policies/content.cedar decides what findings mean
  # max_input_chars: all the texts of one request together; more is refused (413) rather than scanned
  chat: {{input: [injection, pii, secrets], output: [pii, secrets], max_input_chars: 500000}}
  embeddings: {{input: [secrets], output: [], max_input_chars: 500000}}  # + pii: tokenize embedding inputs
  pii:                     # which personal data is tokenized (every type is still reported and audited)
    identifying_types: [EMAIL_ADDRESS, PHONE_NUMBER, US_SSN, US_DRIVER_LICENSE, CREDIT_CARD, IBAN_CODE,
                        STREET_ADDRESS, PERSON]
    person_min_score: 0.9  # a name counts from this tagger confidence on, and only name-shaped
  stream_holdback_chars: 64  # streamed answers are held back this much so split values are still caught
  canaries: false          # true: a canary token in every system prompt; seeing it again is a leak
  scan_cache_entries: 4096  # findings kept per (detector, source, text): resent turns are not rescanned
  scan_cache_chars: 1048576 # and the characters those entries may hold (0 entries: no cache)

upstreams:
  mock:                    # the built-in mock (`ztai mock-upstream --port 9100`)
    base_url: http://127.0.0.1:9100/v1
    models: [mock]
    # max_response_bytes: 16777216  # an answer (decoded) or a whole stream beyond this: 502
    # max_event_bytes: 1048576      # one stream event beyond this: refused
  # openai:
  #   base_url: https://api.openai.com/v1
  #   api_key_env: OPENAI_API_KEY   # the variable's name; the key never appears in config or logs
  #   models: [gpt-4o-mini]
"""


@app.command()
def init(
    config: ConfigOption = DEFAULT_CONFIG_PATH,
    trust_domain: Annotated[
        str, typer.Option(help="SPIFFE trust domain (your organisation)")
    ] = "example.org",
) -> None:
    """Create ztai.yaml, the data directory, signing keys, default policies and the database.

    Example: ztai init --trust-domain example.org
    """
    if not config.exists():
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(CONFIG_TEMPLATE.format(trust_domain=trust_domain))
        err.print(f"wrote {config}")
    settings = settings_for(config)
    data = settings.data_path
    data.mkdir(parents=True, exist_ok=True, mode=0o700)
    if (data / "keys.json").exists():
        err.print(f"keys already exist in {data} (rotate with `ztai keys rotate`)")
    else:
        KeyStore.create(data)
        err.print(f"created signing keys in {data / 'keys.json'} (mode 0600)")
    policies = settings.policy_path
    if not policies.exists():
        shutil.copytree(DEFAULTS_DIR, policies, ignore=shutil.ignore_patterns("__pycache__"))
        err.print(f"copied default policies to {policies}")
    open_database_for(settings).close()
    err.print(f"database ready at {settings.store_url.split('@')[-1]}")


@app.command()
def serve(
    config: ConfigOption = DEFAULT_CONFIG_PATH,
    host: Annotated[str | None, typer.Option(help="address to bind")] = None,
    port: Annotated[int | None, typer.Option(help="port to bind")] = None,
    workers: Annotated[int | None, typer.Option(help="worker processes")] = None,
    upstream: Annotated[
        list[str] | None, typer.Option(help="NAME=URL: an upstream serving model NAME (repeatable)")
    ] = None,
) -> None:
    """Run the gateway.

    Example: ztai serve --port 8787 --upstream mock=http://127.0.0.1:9100/v1
    """
    extra = _parse_upstreams(upstream or [])
    settings = with_upstreams(settings_for(config), extra)
    bind_host = host or settings.server.host
    bind_port = port or settings.server.port
    worker_count = workers or settings.server.workers
    problem = settings.shared_state_problem(worker_count)
    if problem:
        fail(problem)  # exit code 2, before anything starts
    pid_file: PidFile | None = None
    try:  # before anything else: a second server must never touch the running one's pid file
        pid_file = PidFile.acquire(settings.data_path, host=bind_host, port=bind_port, workers=worker_count)
    except ServerRunning as exc:
        # Another replica on this data directory owns it; this one serves too (the store and Redis
        # are shared, so it applies the same reloads and revocations) but has no pid file of its own.
        err.print(f"{exc.message}: this server runs without a pid file")
    try:
        _serve(settings, config, extra, bind_host, bind_port, worker_count)
    finally:
        if pid_file is not None:
            pid_file.release()


def _serve(
    settings: Settings,
    config: Path,
    extra: dict[str, dict[str, object]],
    bind_host: str,
    bind_port: int,
    worker_count: int,
) -> None:
    import uvicorn

    from ztai.cli.supervisor import run_workers
    from ztai.gateway import connection
    from ztai.gateway.app import CONFIG_ENV, UPSTREAMS_ENV, create_app

    open_database_for(settings).close()  # migrate once, before any worker starts
    common = {
        "host": bind_host,
        "port": bind_port,
        "loop": "uvloop",
        **connection.uvicorn_options(settings.server),
        "access_log": False,
        "log_level": "warning",
        "timeout_graceful_shutdown": 10,
    }
    err.print(
        f"ztai serving on http://{bind_host}:{bind_port}/v1 ({worker_count} worker(s)); "
        f"policies {settings.policy_path}"
    )
    if worker_count == 1:
        uvicorn.run(create_app(settings), **common)
        return
    os.environ[CONFIG_ENV] = str(config.resolve())
    os.environ[UPSTREAMS_ENV] = orjson.dumps(extra).decode()
    os.environ["ZTAI_SERVER__WORKERS"] = str(worker_count)  # each worker sees it must share state
    metrics_dir = settings.data_path / "prometheus"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    # SIGHUP to the supervisor reloads the policies in every worker (uvicorn's own handling would restart
    # them): validated and recorded here, applied by each worker in place.
    run_workers(
        "ztai.gateway.app:app_from_environment",
        worker_count,
        common,
        on_hup=lambda: policy_commands.request_reload_quietly(settings, "SIGHUP"),
    )


def _parse_upstreams(values: list[str]) -> dict[str, dict[str, object]]:
    upstreams: dict[str, dict[str, object]] = {}
    for value in values:
        name, sep, url = value.partition("=")
        if not sep or not name or not url:
            raise typer.BadParameter(f"--upstream {value!r}: expected NAME=URL")
        upstreams[name] = {"base_url": url, "models": [name]}
    return upstreams


@app.command("mock-upstream")
def mock_upstream(
    port: Annotated[int, typer.Option(help="port to bind")] = 9100,
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    config: ConfigOption = DEFAULT_CONFIG_PATH,
) -> None:
    """Serve an OpenAI-compatible mock provider (canned and streamed replies) on 127.0.0.1.

    Example: ztai mock-upstream --port 9100
    """
    import uvicorn

    from ztai.gateway.mock_upstream import create_mock_app

    err.print(f"mock upstream on http://{host}:{port}/v1 (model: mock)")
    uvicorn.run(
        create_mock_app(),
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


@app.command()
def demo(config: ConfigOption = DEFAULT_CONFIG_PATH) -> None:
    """Initialise if needed, start the mock upstream, print a demo token and serve on :8787.

    Example: ztai demo
    """
    import subprocess
    import time

    if not config.exists():
        init(config=config, trust_domain="example.org")
    mock = subprocess.Popen([sys.executable, "-m", "ztai.cli.main", "mock-upstream", "--port", "9100"])
    try:
        time.sleep(0.5)
        token = token_commands.issue_for_demo(config)
        # Plain print, not Rich: a wrapped token could not be copied.
        print(
            "\nTry it (token valid for 1 hour, may call model 'mock'):\n"
            f"  export ZTAI_TOKEN={token}\n"
            '  curl -s http://127.0.0.1:8787/v1/chat/completions -H "Authorization: Bearer $ZTAI_TOKEN" '
            "-H 'content-type: application/json' "
            '-d \'{"model":"mock","messages":[{"role":"user","content":"hello"}]}\'\n',
            file=sys.stderr,
            flush=True,
        )
        serve(config=config, host=None, port=None, workers=None, upstream=["mock=http://127.0.0.1:9100/v1"])
    finally:
        mock.send_signal(signal.SIGTERM)
        mock.wait(timeout=10)


def main() -> None:
    try:
        app()
    except ZtaiError as exc:
        fail(exc.message)


if __name__ == "__main__":
    main()
