"""Real processes on loopback: `ztai mock-upstream` and `ztai serve`, driven by the `ztai` CLI."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import store_url_for
from ztai.identity.exchange import GRANT_TYPE, JWT_TOKEN_TYPE

ZTAI = [sys.executable, "-m", "ztai.cli.main"]


def exchange_form(subject: str, actor: str, details: dict[str, Any] | None = None) -> dict[str, str]:
    """The RFC 8693 form for `POST /oauth/token`: `actor` acting for `subject`; `details` (the task's
    tools, constraints, egress...) become a `ztai_task` authorization_details entry."""
    form = {
        "grant_type": GRANT_TYPE,
        "subject_token": subject,
        "subject_token_type": JWT_TOKEN_TYPE,
        "actor_token": actor,
        "actor_token_type": JWT_TOKEN_TYPE,
    }
    if details is not None:
        form["authorization_details"] = orjson.dumps({"type": "ztai_task", **details}).decode()
    return form


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited early with {process.returncode}: {url}")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout}s")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Gateway:
    home: Path
    port: int
    mock_port: int
    env: dict[str, str]
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    server: subprocess.Popen[bytes] | None = None

    @property
    def config(self) -> Path:
        return self.home / "ztai.yaml"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*ZTAI, *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=60,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"ztai {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    def token(self, name: str = "alice", *claims: str, ttl: int = 300, kind: str = "user") -> str:
        claim_args = [arg for claim in claims for arg in ("--claim", claim)]
        result = self.cli(
            "token", "issue", "--sub", f"spiffe://example.org/{kind}/{name}", "--ttl", str(ttl), *claim_args
        )
        return result.stdout.strip()

    def start_server(self, *extra: str) -> None:
        log = (self.home / "serve.log").open("ab")
        self.server = subprocess.Popen(
            [
                *ZTAI,
                "serve",
                "--config",
                str(self.config),
                "--port",
                str(self.port),
                "--upstream",
                f"mock=http://127.0.0.1:{self.mock_port}/v1",
                *extra,
            ],
            env=self.env,
            stdout=log,
            stderr=log,
        )
        self.processes.append(self.server)
        wait_until_ready(f"{self.root_url}/readyz", self.server)

    def stop_server(self) -> None:
        if self.server is not None:
            stop(self.server)

    def close(self) -> None:
        for process in reversed(self.processes):
            stop(process)


def start_gateway(
    tmp_path: Path,
    store_url: str = "",
    extra_yaml: str = "",
    extra_env: dict[str, str] | None = None,
    serve_args: tuple[str, ...] = (),
) -> Gateway:
    mock_port, port = free_port(), free_port()
    env = {
        **os.environ,
        "ZTAI_IDENTITY__LEEWAY_SECONDS": "0",
        "NO_COLOR": "1",
        "COLUMNS": "200",
        **(extra_env or {}),
    }
    if store_url:
        env["ZTAI_STORE__URL"] = store_url
    gateway = Gateway(tmp_path, port, mock_port, env)
    gateway.cli("init", "--trust-domain", "example.org")
    with gateway.config.open("a") as config:
        config.write(
            "\n# test additions\n"
            f"  other:\n    base_url: http://127.0.0.1:{mock_port}/v1\n    models: [other]\n"
            f"  dead:\n    base_url: http://127.0.0.1:{free_port()}/v1\n    models: [dead]\n"
            f"  slow:\n    base_url: http://127.0.0.1:{mock_port}/v1\n    models: [slow]\n    timeout_seconds: 0.5\n"
        )
        config.write(extra_yaml)
    # Checkpoints often, so `audit verify` covers the traffic of a test quickly.
    env["ZTAI_AUDIT__CHECKPOINT_INTERVAL_SECONDS"] = "0.2"
    mock = subprocess.Popen(
        [*ZTAI, "mock-upstream", "--port", str(mock_port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    gateway.processes.append(mock)
    wait_until_ready(f"http://127.0.0.1:{mock_port}/v1/models", mock)
    try:
        gateway.start_server(*serve_args)
    except Exception:
        gateway.close()
        print((tmp_path / "serve.log").read_text())
        raise
    return gateway


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One gateway (SQLite) shared by the tests of a module."""
    instance = start_gateway(tmp_path_factory.mktemp("gateway"))
    yield instance
    instance.close()


@pytest.fixture
def fresh_gateway(tmp_path: Path) -> Iterator[Gateway]:
    """A gateway of its own, for tests that break it."""
    instance = start_gateway(tmp_path)
    yield instance
    instance.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def gateway_on_each_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Gateway]:
    url = store_url_for(str(request.param), tmp_path)
    instance = start_gateway(tmp_path, store_url=url if request.param == "postgresql" else "")
    yield instance
    instance.close()
