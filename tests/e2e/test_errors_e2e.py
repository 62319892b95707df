"""End to end: each protocol answers errors in its own form (ztai.gateway.responses), and a client that
goes away in the middle of its body is not an error (no traceback, counted as 499)."""

from __future__ import annotations

import re
import socket
import time

import httpx
import pytest

from tests.e2e.conftest import Gateway

pytestmark = pytest.mark.e2e


def _abandon_body(gateway: Gateway, path: str, token: str, content_type: str) -> None:
    """Send a request head promising 10,000 bytes, then only 10 of them, then hang up."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: 10000\r\n\r\n"
        )
        sock.sendall(head.encode() + b'{"model":')
        time.sleep(0.3)  # the route is reading the body by now


def _count(metrics: str, route: str, status: str) -> float:
    pattern = rf'ztai_requests_total{{route="{re.escape(route)}",status="{status}"}} ([0-9.e+]+)'
    found = re.search(pattern, metrics)
    return float(found.group(1)) if found else 0.0


def test_a_client_that_hangs_up_mid_body_logs_no_traceback(gateway: Gateway) -> None:
    token = gateway.token("dora", "models=mock")
    routes = {
        "/v1/chat/completions": "application/json",
        "/oauth/token": "application/x-www-form-urlencoded",
        "/mcp/workspace": "application/json",
    }
    for path, content_type in routes.items():
        _abandon_body(gateway, path, token, content_type)
    log = gateway.home / "serve.log"
    deadline = time.monotonic() + 10
    while True:
        metrics = httpx.get(f"{gateway.root_url}/metrics").text
        counted = {path: _count(metrics, path.replace("workspace", "{server}"), "499") for path in routes}
        if all(counted.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert all(value >= 1 for value in counted.values()), counted
    assert "Traceback" not in log.read_text() and "ClientDisconnect" not in log.read_text()
    # and the server still answers
    assert httpx.get(f"{gateway.root_url}/readyz").status_code == 200


def test_oauth_errors_are_rfc6749_json(gateway: Gateway) -> None:
    url = f"{gateway.root_url}/oauth/token"
    wrong_type = httpx.post(url, json={"grant_type": "x"})
    assert wrong_type.status_code == 400 and wrong_type.headers["cache-control"] == "no-store"
    assert wrong_type.json()["error"] == "invalid_request" and "error_description" in wrong_type.json()
    huge = httpx.post(
        url, content=b"a=" + b"b" * 2_000_000, headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert huge.status_code == 413 and huge.headers["cache-control"] == "no-store"
    assert huge.json()["error"] == "invalid_request" and "exceeds" in huge.json()["error_description"]
    assert "type" not in huge.json()  # not the OpenAI shape


def test_mcp_errors_before_the_message_is_read_are_json_rpc(gateway: Gateway) -> None:
    token = gateway.token("dora", "models=mock")
    headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
    huge = httpx.post(f"{gateway.root_url}/mcp/workspace", content=b"[" * 2_000_000, headers=headers)
    assert huge.status_code == 413
    body = huge.json()
    assert body["jsonrpc"] == "2.0" and body["id"] is None and body["error"]["code"] == -32600
    assert "exceeds" in body["error"]["message"]
    # a missing token stays a 401 with its challenge, as on every route
    anonymous = httpx.post(f"{gateway.root_url}/mcp/workspace", content=b"{}")
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"].startswith("Bearer")


def test_openai_errors_keep_their_shape(gateway: Gateway) -> None:
    token = gateway.token("dora", "models=mock")
    headers = {"authorization": f"Bearer {token}"}
    bad = httpx.post(f"{gateway.base_url}/chat/completions", content=b"{", headers=headers)
    assert bad.status_code == 422
    assert bad.json()["error"]["type"] == "invalid_request_error" and bad.json()["error"]["param"] is None
    deep = httpx.post(
        f"{gateway.base_url}/chat/completions", content=b'{"a":' * 100 + b"1" + b"}" * 100, headers=headers
    )
    assert deep.status_code == 422 and "nests deeper" in deep.json()["error"]["message"]
