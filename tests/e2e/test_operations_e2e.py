"""End to end, operating the server (issue 11, "Operable"): `ztai serve --workers 2` with the access log
on, policy reload in place (same worker processes, new decisions; an invalid set refused), SIGHUP, the
owned pid file, failed authentications in the audit log (rate-limited), upstream rate-limit headers
through the `openai` SDK."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from sqlalchemy import select

from tests.e2e.conftest import ZTAI, Gateway, exchange_form, free_port, start_gateway
from ztai.config import load_settings
from ztai.store import AuditEvent, open_database

pytestmark = pytest.mark.e2e
HELLO = [{"role": "user", "content": "hello from the sdk"}]
ACCESS_LOG = "access.jsonl"
FORBID_CHAT = '@id("reload-forbids-chat")\nforbid (principal, action == Action::"chat", resource);\n'


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """Two workers, the access log in a file, failed authentications audited 3 per client and reason
    per 2 s window."""
    env = {
        "ZTAI_SERVER__ACCESS_LOG": ACCESS_LOG,
        "ZTAI_AUDIT__AUTH_FAILURES_PER_WINDOW": "3",
        "ZTAI_AUDIT__AUTH_FAILURE_WINDOW_SECONDS": "2",
    }
    instance = start_gateway(tmp_path_factory.mktemp("ops"), extra_env=env, serve_args=("--workers", "2"))
    yield instance
    instance.close()


def client(gateway: Gateway, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=token, max_retries=0, timeout=10)


def worker_pids(gateway: Gateway) -> set[int]:
    """The processes the server's supervisor started (its workers, and multiprocessing's helpers)."""
    assert gateway.server is not None
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == gateway.server.pid:
            children.add(int(stat.parent.name))
    return children


def audit_events(gateway: Gateway, *kinds: str) -> list[dict[str, Any]]:
    database = open_database(load_settings(gateway.config).store_url)
    try:
        with database.sessions() as session:
            query = select(AuditEvent.body).order_by(AuditEvent.seq)
            if kinds:
                query = query.where(AuditEvent.kind.in_(kinds))
            return [orjson.loads(body) for body in session.scalars(query).all()]
    finally:
        database.close()


def chat_statuses(gateway: Gateway, token: str, count: int) -> list[int]:
    """Status of `count` chat requests, each on a connection of its own (spread over the workers)."""
    statuses = []
    for _ in range(count):
        with httpx.Client(timeout=10) as http:
            response = http.post(
                f"{gateway.base_url}/chat/completions",
                json={"model": "mock", "messages": HELLO},
                headers={"authorization": f"Bearer {token}"},
            )
            statuses.append(response.status_code)
    return statuses


def revisions_seen(gateway: Gateway, count: int = 12) -> set[str]:
    seen = set()
    for _ in range(count):
        with httpx.Client(timeout=10) as http:
            seen.add(http.get(f"{gateway.root_url}/readyz").json()["checks"]["policy"])
    return seen


# Policy reload ------------------------------------------------------------------------------------------
def test_reload_swaps_the_policies_of_every_worker_without_restarting_them(workers: Gateway) -> None:
    token = workers.token("alice", "models=mock")
    before = worker_pids(workers)
    assert len(before) >= 2
    assert set(chat_statuses(workers, token, 8)) == {200}
    [old_revision] = revisions_seen(workers)
    block = workers.home / "policies" / "zz_block.cedar"
    block.write_text(FORBID_CHAT)
    try:
        result = workers.cli("policy", "reload")
        assert "applied by 2 of 2 worker(s)" in result.stderr
        # Every worker has swapped (the CLI waited for both): every request on any worker is denied now.
        assert set(chat_statuses(workers, token, 10)) == {403}
        [new_revision] = revisions_seen(workers)
        assert new_revision != old_revision
        assert worker_pids(workers) == before  # the same processes: nothing restarted
        events = audit_events(workers, "policy.reloaded")
        applied = [e for e in events if e["reload"]["revision"] == new_revision]
        assert len({e["reload"]["worker"] for e in applied}) == 2  # one outcome per worker
        assert {int(e["reload"]["worker"].rpartition(":")[2]) for e in applied} <= before
        assert all(e["reload"]["previous"] == old_revision for e in applied)
    finally:
        block.unlink()
    workers.cli("policy", "reload")
    assert set(chat_statuses(workers, token, 6)) == {200}
    assert worker_pids(workers) == before


def test_an_invalid_policy_set_is_refused_and_the_workers_keep_theirs(workers: Gateway) -> None:
    token = workers.token("alice", "models=mock")
    [revision] = revisions_seen(workers)
    broken = workers.home / "policies" / "zz_broken.cedar"
    broken.write_text('permit (principal, action == Action::"no-such-action", resource);\n')
    try:
        result = workers.cli("policy", "reload", check=False)
    finally:
        broken.unlink()
    assert result.returncode == 2
    assert "failed validation" in result.stderr and "no-such-action" in result.stderr  # Cedar's own words
    assert revisions_seen(workers) == {revision}
    assert set(chat_statuses(workers, token, 4)) == {200}
    [refused] = [
        e for e in audit_events(workers, "policy.reload_refused") if "no-such-action" in e["reasons"][0]
    ]
    assert refused["effect"] == "deny" and refused["reload"]["id"] is None  # nothing was requested


def test_sighup_to_the_supervisor_reloads_in_place(workers: Gateway) -> None:
    assert workers.server is not None
    token = workers.token("alice", "models=mock")
    before = worker_pids(workers)
    block = workers.home / "policies" / "zz_block.cedar"
    block.write_text(FORBID_CHAT)
    try:
        os.kill(workers.server.pid, signal.SIGHUP)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and set(chat_statuses(workers, token, 4)) != {403}:
            time.sleep(0.2)
        assert set(chat_statuses(workers, token, 6)) == {403}
    finally:
        block.unlink()
    os.kill(workers.server.pid, signal.SIGHUP)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and set(chat_statuses(workers, token, 4)) != {200}:
        time.sleep(0.2)
    assert set(chat_statuses(workers, token, 6)) == {200}
    assert worker_pids(workers) == before and workers.server.poll() is None


def test_sighup_reloads_a_single_process_server_in_place(fresh_gateway: Gateway) -> None:
    gateway = fresh_gateway
    assert gateway.server is not None
    token = gateway.token("alice", "models=mock")
    assert chat_statuses(gateway, token, 1) == [200]
    (gateway.home / "policies" / "zz_block.cedar").write_text(FORBID_CHAT)
    os.kill(gateway.server.pid, signal.SIGHUP)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and chat_statuses(gateway, token, 1) != [403]:
        time.sleep(0.2)
    assert chat_statuses(gateway, token, 2) == [403, 403]
    assert gateway.server.poll() is None  # the same process, still serving
    [event] = audit_events(gateway, "policy.reloaded")
    assert event["reload"]["worker"].endswith(f":{gateway.server.pid}")


# The pid file -------------------------------------------------------------------------------------------
def test_a_second_server_that_fails_to_start_leaves_the_pid_file_alone(workers: Gateway) -> None:
    pid_file = workers.home / ".ztai" / "ztai.pid"
    recorded = pid_file.read_bytes()
    assert workers.server is not None and orjson.loads(recorded)["pid"] == workers.server.pid
    second = subprocess.run(  # the same port: it cannot bind, and exits
        [*ZTAI, "serve", "--config", str(workers.config), "--port", str(workers.port)],
        capture_output=True,
        text=True,
        env=workers.env,
        timeout=60,
    )
    assert second.returncode != 0 and "another ztai server is running" in second.stderr
    assert pid_file.read_bytes() == recorded
    workers.cli("policy", "reload")  # the running server is still found, and reloads


def test_a_stale_pid_file_is_reported_and_its_process_never_signalled(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path, free_port(), free_port(), {**os.environ, "NO_COLOR": "1"})
    gateway.cli("init")
    bystander = subprocess.Popen(["sleep", "60"])  # SIGHUP would end it
    try:
        # Written as a server would, but no server holds the lock: the pid now belongs to someone else.
        record = {"pid": bystander.pid, "started": "1", "token": "00", "host": "", "port": 0, "workers": 1}
        (tmp_path / ".ztai" / "ztai.pid").write_bytes(orjson.dumps(record))
        result = gateway.cli("policy", "reload", check=False)
        assert result.returncode == 2 and "stale pid file" in result.stderr
        time.sleep(0.2)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


# Failed authentications ---------------------------------------------------------------------------------
def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(data)).rstrip(b"=").decode()


def test_failed_authentications_are_audited_with_reason_and_fingerprint_never_the_token(
    workers: Gateway,
) -> None:
    valid = workers.token("alice", "models=mock")
    other = workers.token("bob", "models=mock")
    expired = workers.token("carol", "models=mock", ttl=1)
    expires = time.time() + 2.1  # past its `exp` (whole seconds) with no leeway
    header, payload, _signature = valid.split(".")
    claims = orjson.loads(base64.urlsafe_b64decode(payload + "=="))
    bad = {
        "bad_algorithm": f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{payload}.",
        "bad_signature": f"{header}.{payload}.{other.split('.')[2]}",
        "unknown_key": f"{_b64({'alg': 'EdDSA', 'kid': 'no-such-key'})}.{payload}.{other.split('.')[2]}",
        "malformed_token": "not.a.token",
    }
    assert claims["sub"].endswith("/alice")
    url = f"{workers.base_url}/chat/completions"
    body = {"model": "mock", "messages": HELLO}
    for token in bad.values():
        assert httpx.post(url, json=body, headers={"authorization": f"Bearer {token}"}).status_code == 401
    assert httpx.post(url, json=body).status_code == 401  # no token at all
    time.sleep(max(0.0, expires - time.time()))
    assert httpx.post(url, json=body, headers={"authorization": f"Bearer {expired}"}).status_code == 401
    reasons = {*bad, "missing_token", "token_expired"}
    events = _eventually(
        lambda: audit_events(workers, "auth.failed"), lambda found: reasons <= _reasons(found)
    )
    for event in events:
        assert event["effect"] == "deny" and event["principal"] == ""
        assert event["request"]["route"] == "/v1/chat/completions" and event["request"]["ip"] == "127.0.0.1"
    fingerprints = {e["reasons"][0]: e["request"].get("token_fingerprint") for e in events}
    assert fingerprints["missing_token"] is None and fingerprints["bad_signature"]
    everything = b"".join(orjson.dumps(e) for e in audit_events(workers))
    for token in [*bad.values(), expired]:
        assert token.encode() not in everything
    assert other.split(".")[2].encode() not in everything


def test_a_flood_of_failures_is_rate_limited_and_the_rest_counted(workers: Gateway) -> None:
    before = audit_events(workers, "auth.failed", "auth.failures_suppressed")
    flood = "Bearer " + f"{_b64({'alg': 'none'})}.{_b64({'sub': 'x'})}."
    sent = 40
    with httpx.Client(timeout=10) as http:  # one connection: one worker, one client address
        for _ in range(sent):
            response = http.get(f"{workers.base_url}/models", headers={"authorization": flood})
            assert response.status_code == 401

    def tally(events: list[dict[str, Any]]) -> tuple[int, int]:
        new = [e for e in events if e not in before and e["reasons"] == ["bad_algorithm"]]
        written = sum(1 for e in new if e["kind"] == "auth.failed" and e["request"]["route"] == "/v1/models")
        suppressed = sum(e["request"]["suppressed"] for e in new if e["kind"] == "auth.failures_suppressed")
        return written, suppressed

    events = _eventually(
        lambda: audit_events(workers, "auth.failed", "auth.failures_suppressed"),
        lambda found: sum(tally(found)) >= sent,
    )
    written, suppressed = tally(events)
    assert written + suppressed == sent
    assert suppressed > 0 and written < sent
    metrics = httpx.get(f"{workers.root_url}/metrics").text
    assert 'ztai_auth_failures_total{reason="bad_algorithm"}' in metrics


def test_failed_token_exchanges_are_audited_too(workers: Gateway) -> None:
    actor = workers.token("assistant", kind="agent")
    expired = workers.token("frank", ttl=1)
    time.sleep(2.1)
    response = httpx.post(f"{workers.root_url}/oauth/token", data=exchange_form(expired, actor), timeout=10)
    assert (
        response.status_code == 400 and "subject_token: token expired" in response.json()["error_description"]
    )
    events = _eventually(
        lambda: audit_events(workers, "auth.failed"),
        lambda found: any(e["request"]["route"] == "/oauth/token" for e in found),
    )
    [event] = [e for e in events if e["request"]["route"] == "/oauth/token"]
    assert event["reasons"] == ["token_expired"] and expired.encode() not in orjson.dumps(event)


def _reasons(events: list[dict[str, Any]]) -> set[str]:
    return {event["reasons"][0] for event in events}


def _eventually(read: Any, done: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = read()
        if done(found) or time.monotonic() > deadline:
            assert done(found), found
            return found
        time.sleep(0.2)


# The access log -----------------------------------------------------------------------------------------
def test_the_access_log_has_one_json_line_per_request_and_no_secrets(workers: Gateway) -> None:
    token = workers.token("dave", "models=mock")
    completion = client(workers, token).chat.completions.with_raw_response.create(
        model="mock",
        messages=HELLO,  # type: ignore[arg-type]
    )
    decision_id = completion.headers["x-ztai-decision-id"]
    httpx.get(f"{workers.root_url}/healthz?secret=in-query")
    log = workers.home / ACCESS_LOG

    def lines() -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in log.read_bytes().splitlines()] if log.exists() else []

    entries = _eventually(lines, lambda found: any(e["decision_id"] == decision_id for e in found))
    [entry] = [e for e in entries if e["decision_id"] == decision_id]
    assert entry["principal"] == "spiffe://example.org/user/dave"
    assert entry["route"] == "/v1/chat/completions" and entry["method"] == "POST" and entry["status"] == 200
    assert entry["latency_ms"] > 0 and entry["bytes_in"] > 0 and entry["bytes_out"] > 0
    assert set(entry) == {
        "time", "method", "route", "path", "status", "latency_ms", "bytes_in", "bytes_out",
        "decision_id", "principal", "ip", "pid",
    }  # fmt: skip
    health = _eventually(lines, lambda found: any(e["route"] == "/healthz" for e in found))
    assert all("secret" not in e["path"] for e in health)
    text = log.read_text()
    assert token not in text and "hello from the sdk" not in text and "in-query" not in text


# Upstream rate limits -----------------------------------------------------------------------------------
def test_upstream_rate_limit_headers_reach_the_sdk(workers: Gateway) -> None:
    sdk = client(workers, workers.token("erin", "models=mock"))
    ok = sdk.chat.completions.with_raw_response.create(model="mock", messages=HELLO)  # type: ignore[arg-type]
    assert ok.headers["x-ratelimit-limit-requests"] == "1000"
    assert ok.headers["x-ratelimit-remaining-requests"] == "999"
    assert "x-mock-internal" not in ok.headers  # only the rate-limit family, not every upstream header
    with sdk.chat.completions.with_streaming_response.create(
        model="mock",
        messages=HELLO,  # type: ignore[arg-type]
        stream=True,
    ) as streamed:
        assert streamed.headers["x-ratelimit-reset-requests"] == "7s"
        assert "x-mock-internal" not in streamed.headers
    for marker in ("[[mock:rate-limit]]", "[[mock:rate-limit-plain]]"):
        for stream in (False, True):
            with pytest.raises(openai.RateLimitError) as limited:
                sdk.chat.completions.create(
                    model="mock",
                    messages=[{"role": "user", "content": f"go {marker}"}],
                    stream=stream,
                )
            response = limited.value.response
            assert response.status_code == 429
            assert response.headers["retry-after"] == "7"
            assert response.headers["x-ratelimit-remaining-requests"] == "0"
            assert "x-mock-internal" not in response.headers
            assert response.json()["error"]["code"] == "rate_limit_exceeded"
            assert response.headers["x-ztai-decision-id"].startswith("dec_")
