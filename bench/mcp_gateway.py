"""MCP gateway overhead: the same MCP requests sent directly to an MCP server and through `ztai serve`.

Starts the test suite's workspace MCP server (written with the official `mcp` SDK; needs the `test`
extra) and a ztai gateway that proxies it at /mcp/workspace, gets a task token from ztai's token
exchange, then sends `--requests` sequential requests per method over one keep-alive connection (after
20 warm-up requests), in the 2026 stateless protocol (JSON answers), and prints p50 / p95 per method.
Through ztai, `tools/call` includes the grant check, the Cedar decision, the durable audit record and the
scan of the tool's output into the task session.

    python bench/mcp_gateway.py [--requests 300]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.conftest import exchange_form, free_port, start_gateway, stop, wait_until_ready
from tests.mcp_servers.workspace import API_KEY_ENV

VERSION = "2026-07-28"
META = {"io.modelcontextprotocol/protocolVersion": VERSION, "io.modelcontextprotocol/clientCapabilities": {}}
CASES = [
    ("server/discover", {}),
    ("tools/list", {}),
    ("tools/call", {"name": "search_files", "arguments": {"query": "report"}}),
]


def timed(url: str, bearer: str, method: str, params: dict[str, Any], count: int) -> tuple[float, float]:
    headers = {
        "authorization": f"Bearer {bearer}",
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": VERSION,
        "mcp-method": method,
    }
    if method == "tools/call":
        headers["mcp-name"] = params["name"]
    seconds: list[float] = []
    with httpx.Client(timeout=10) as client:
        for index in range(20 + count):
            body = {"jsonrpc": "2.0", "id": index, "method": method, "params": {**params, "_meta": META}}
            started = time.perf_counter()
            response = client.post(url, json=body, headers=headers)
            elapsed = time.perf_counter() - started
            if response.status_code != 200 or "result" not in response.json():
                sys.exit(f"{method} via {url} failed: {response.status_code} {response.text[:300]}")
            if index >= 20:
                seconds.append(elapsed)
    seconds.sort()
    return statistics.median(seconds) * 1000, seconds[int(len(seconds) * 0.95)] * 1000


def task_token(root_url: str, subject: str, actor: str) -> str:
    form = exchange_form(subject, actor, {"tools": ["workspace/*"]})
    response = httpx.post(f"{root_url}/oauth/token", data=form, timeout=10)
    response.raise_for_status()
    return str(response.json()["access_token"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the SDK's import turns request logging on
    key = "bench-upstream-key"
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.mcp_servers.workspace",
            "--port",
            str(port),
            "--json-response",
            "--stateless",
        ],
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, API_KEY_ENV: key},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    direct_url = f"http://127.0.0.1:{port}/mcp"
    with tempfile.TemporaryDirectory() as home:
        try:
            wait_until_ready(direct_url, server)
            config = f"\nagents:\n  mcp_servers:\n    workspace:\n      url: {direct_url}\n      api_key_env: WS_KEY\n"
            gateway = start_gateway(Path(home), extra_yaml=config, extra_env={"WS_KEY": key})
            try:
                token = task_token(
                    gateway.root_url,
                    gateway.token("alice", "tools=workspace/*", ttl=3600),
                    gateway.token("bench", kind="agent", ttl=3600),
                )
                for method, params in CASES:
                    p50_direct, p95_direct = timed(direct_url, key, method, params, args.requests)
                    p50_ztai, p95_ztai = timed(
                        f"{gateway.root_url}/mcp/workspace", token, method, params, args.requests
                    )
                    print(
                        f"{method:16s} direct p50 {p50_direct:5.2f} / p95 {p95_direct:5.2f} ms   "
                        f"ztai p50 {p50_ztai:5.2f} / p95 {p95_ztai:5.2f} ms   added p50 {p50_ztai - p50_direct:5.2f} ms"
                    )
            finally:
                gateway.close()
        finally:
            stop(server)


if __name__ == "__main__":
    main()
