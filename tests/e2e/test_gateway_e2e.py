"""End to end: the real `ztai serve` and mock upstream, the official `openai` SDK, the `ztai` CLI."""

from __future__ import annotations

import base64
import json
import re
import sqlite3
import time

import httpx
import openai
import pytest
import yaml

from tests.e2e.conftest import Gateway

pytestmark = pytest.mark.e2e
HELLO = [{"role": "user", "content": "hello from the sdk"}]


def client(gateway: Gateway, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=token, max_retries=0, timeout=10)


def test_chat_completion_through_the_sdk(gateway: Gateway) -> None:
    reply = client(gateway, gateway.token("alice", "models=mock")).chat.completions.create(
        model="mock",
        messages=HELLO,  # type: ignore[arg-type]
    )
    assert reply.choices[0].message.content == "This is a mock reply to: hello from the sdk"
    assert reply.usage is not None and reply.usage.total_tokens > 0


def test_streaming_chat_completion_through_the_sdk(gateway: Gateway) -> None:
    words = [
        "please",
        "stream",
        "this",
        "considerably",
        "longer",
        "answer",
        "back",
        "to",
        "me",
        "one",
        "word",
        "after",
        "another",
    ]
    stream = client(gateway, gateway.token("alice", "models=mock")).chat.completions.create(
        model="mock",
        messages=[{"role": "user", "content": " ".join(words)}],
        stream=True,
    )
    pieces = [
        chunk.choices[0].delta.content for chunk in stream if chunk.choices and chunk.choices[0].delta.content
    ]
    # Really streamed: once the answer is longer than the inspection hold-back window (64 characters),
    # text goes out chunk by chunk while the model is still writing.
    assert len(pieces) >= 4
    assert "".join(pieces) == "This is a mock reply to: " + " ".join(words[:12])


def test_embeddings_through_the_sdk(gateway: Gateway) -> None:
    result = client(gateway, gateway.token("indexer", "models=mock", kind="agent")).embeddings.create(
        model="mock", input=["one", "two"]
    )
    assert len(result.data) == 2 and len(result.data[0].embedding) == 8


def test_models_lists_only_what_the_caller_may_use(gateway: Gateway) -> None:
    listed = client(gateway, gateway.token("alice", "models=mock")).models.list()
    assert [m.id for m in listed.data] == ["mock"]
    listed = client(gateway, gateway.token("bob", "models=mock,other")).models.list()
    assert sorted(m.id for m in listed.data) == ["mock", "other"]


def test_policy_denial_is_403_with_a_decision_id_and_no_policy_text(gateway: Gateway) -> None:
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client(gateway, gateway.token("bob", "models=other")).chat.completions.create(
            model="mock",
            messages=HELLO,  # type: ignore[arg-type]
        )
    body = denied.value.response.json()["error"]
    assert body["code"] == "denied" and body["decision_id"].startswith("dec_")
    assert "permit" not in body["message"] and "context" not in body["message"]
    assert denied.value.response.headers["x-ztai-decision-id"] == body["decision_id"]


def test_missing_garbage_and_expired_tokens_are_401(gateway: Gateway) -> None:
    url = f"{gateway.base_url}/chat/completions"
    body = {"model": "mock", "messages": HELLO}
    response = httpx.post(url, json=body)
    assert response.status_code == 401 and response.json()["error"]["code"] == "missing_token"
    assert response.headers["www-authenticate"].startswith("Bearer")
    response = httpx.post(url, json=body, headers={"authorization": "Bearer not.a.token"})
    assert response.status_code == 401
    expired = gateway.token("alice", "models=mock", ttl=1)
    time.sleep(2.1)
    with pytest.raises(openai.AuthenticationError) as rejected:
        client(gateway, expired).chat.completions.create(model="mock", messages=HELLO)  # type: ignore[arg-type]
    assert rejected.value.response.json()["error"]["code"] == "token_expired"


def test_revoked_token_is_refused_by_the_running_server(gateway: Gateway) -> None:
    token = gateway.token("carol", "models=mock")
    sdk = client(gateway, token)
    sdk.chat.completions.create(model="mock", messages=HELLO)  # type: ignore[arg-type]  # verified and cached
    jti = _claims(token)["jti"]
    gateway.cli("token", "revoke", jti, "--reason", "test")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            sdk.chat.completions.create(model="mock", messages=HELLO)  # type: ignore[arg-type]
        except openai.AuthenticationError as exc:
            assert exc.response.json()["error"]["code"] == "token_revoked"
            return
        time.sleep(0.2)
    pytest.fail("revoked token still accepted after 5s")


def test_bad_requests_get_clear_errors_and_statuses(gateway: Gateway) -> None:
    url = f"{gateway.base_url}/chat/completions"
    auth = {"authorization": f"Bearer {gateway.token('alice', 'models=mock')}"}
    cases = [
        (b'{"model": "mock", "messages": [', 422, "invalid_request"),
        (b'["not", "an", "object"]', 422, "invalid_request"),
        (b'{"messages": []}', 422, "invalid_request"),
        (b'{"model": "mock"}', 422, "invalid_request"),
        (b'{"model": "nope", "messages": []}', 404, "model_not_found"),
        (b'{"model": "mock", "messages": ' + b"[" * 100 + b"]" * 100 + b"}", 422, "invalid_request"),
        (b'{"model": "mock", "messages": [], "pad": "' + b"x" * 2_000_000 + b'"}', 413, "request_too_large"),
    ]
    for body, status, code in cases:
        response = httpx.post(url, content=body, headers={**auth, "content-type": "application/json"})
        assert response.status_code == status, (body[:40], response.text)
        error = response.json()["error"]
        assert error["code"] == code and error["message"] and "Traceback" not in response.text


def test_upstream_failures_are_502_and_504(gateway: Gateway) -> None:
    sdk = client(gateway, gateway.token("alice", "models=mock,dead,slow"))
    with pytest.raises(openai.InternalServerError) as failed:
        sdk.chat.completions.create(model="mock", messages=[{"role": "user", "content": "[[mock:error]]"}])
    assert failed.value.status_code == 502
    with pytest.raises(openai.InternalServerError) as unreachable:
        sdk.chat.completions.create(model="dead", messages=HELLO)  # type: ignore[arg-type]
    assert unreachable.value.status_code == 502
    with pytest.raises(openai.InternalServerError) as slow:
        sdk.chat.completions.create(
            model="slow", messages=[{"role": "user", "content": "[[mock:sleep:2000]]"}]
        )
    assert slow.value.status_code == 504


def test_health_readiness_metrics_and_jwks(gateway: Gateway) -> None:
    assert httpx.get(f"{gateway.root_url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{gateway.root_url}/readyz").json()
    assert ready["status"] == "ready" and ready["checks"]["store"] == "ok"
    client(gateway, gateway.token("alice", "models=mock")).chat.completions.create(
        model="mock",
        messages=HELLO,  # type: ignore[arg-type]
    )
    metrics = httpx.get(f"{gateway.root_url}/metrics").text
    assert re.search(r'ztai_decisions_total\{action="chat",effect="allow"\} [1-9]', metrics)
    for stage in ("authenticate", "decide", "audit", "upstream"):
        assert f'ztai_stage_seconds_count{{stage="{stage}"}}' in metrics
    keys = httpx.get(f"{gateway.root_url}/.well-known/jwks.json").json()["keys"]
    assert keys and keys[0]["kty"] == "OKP" and "d" not in keys[0]


def test_key_rotation_keeps_old_tokens_valid_and_new_ones_work(gateway: Gateway) -> None:
    old = gateway.token("alice", "models=mock")
    gateway.cli("keys", "rotate")
    new = gateway.token("alice", "models=mock")
    for token in (old, new):
        client(gateway, token).chat.completions.create(model="mock", messages=HELLO)  # type: ignore[arg-type]
    kids = {k["kid"] for k in httpx.get(f"{gateway.root_url}/.well-known/jwks.json").json()["keys"]}
    assert len(kids) == 2


def test_policy_reload_applies_valid_policies_and_rejects_invalid_ones(gateway: Gateway) -> None:
    sdk = client(gateway, gateway.token("mallory", "models=mock"))
    sdk.chat.completions.create(model="mock", messages=HELLO)  # type: ignore[arg-type]
    block = gateway.home / "policies" / "block.cedar"
    block.write_text(
        '@id("block-mallory")\nforbid (principal == User::"spiffe://example.org/user/mallory", action, resource);\n'
    )
    try:
        gateway.cli("policy", "reload")
        _eventually_denied(sdk)
        broken = gateway.home / "policies" / "broken.cedar"
        broken.write_text("permit (principal, action, resource) when { context.nope };")
        result = gateway.cli("policy", "reload", check=False)
        assert result.returncode != 0 and "nope" in result.stderr
        broken.unlink()
    finally:
        block.unlink()
        gateway.cli("policy", "reload")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            sdk.chat.completions.create(model="mock", messages=HELLO)  # type: ignore[arg-type]
            return
        except openai.PermissionDeniedError:
            time.sleep(0.1)
    pytest.fail("policy reload did not restore access")


def test_cli_policy_test_and_validate(gateway: Gateway) -> None:
    cases = gateway.home / "policies" / "tests.yaml"
    result = gateway.cli("policy", "test", str(cases))
    expected = len(yaml.safe_load(cases.read_text())["cases"])
    assert f"{expected} passed, 0 failed" in result.stderr
    assert gateway.cli("policy", "validate").returncode == 0


def test_audit_log_records_every_decision_and_verifies(gateway: Gateway) -> None:
    sdk = client(gateway, gateway.token("dave", "models=mock"))
    for _ in range(5):
        sdk.chat.completions.create(model="mock", messages=HELLO)  # type: ignore[arg-type]
    time.sleep(0.5)  # a checkpoint covers them
    tail = gateway.cli("audit", "tail", "-n", "200", "--json").stdout.splitlines()
    events = [json.loads(line) for line in tail]
    kinds = {e["kind"] for e in events}
    assert {"decision", "token.issued"} <= kinds
    dave = [e for e in events if e["kind"] == "decision" and e["principal"].endswith("/dave")]
    assert len(dave) == 5 and all(e["effect"] == "allow" and e["request"]["fingerprint"] for e in dave)
    assert not any("eyJ" in line for line in tail)  # no token ever lands in the log
    verify = gateway.cli("audit", "verify")
    assert "intact" in verify.stderr
    proof = gateway.cli("audit", "proof", str(dave[0]["seq"]))
    assert '"proof"' in proof.stdout


def _claims(token: str) -> dict[str, str]:
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


def _eventually_denied(sdk: openai.OpenAI) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            sdk.chat.completions.create(model="mock", messages=HELLO)  # type: ignore[arg-type]
        except openai.PermissionDeniedError:
            return
        time.sleep(0.1)
    pytest.fail("policy reload was not applied within 5s")


def test_fail_closed_when_the_audit_store_refuses_writes(fresh_gateway: Gateway) -> None:
    sdk = client(fresh_gateway, fresh_gateway.token("erin", "models=mock"))
    sdk.chat.completions.create(model="mock", messages=HELLO)  # type: ignore[arg-type]
    database = sqlite3.connect(fresh_gateway.home / ".ztai" / "ztai.db")
    database.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON audit_events BEGIN SELECT RAISE(ABORT, 'store read-only'); END"
    )
    database.commit()
    with pytest.raises(openai.InternalServerError) as refused:
        sdk.chat.completions.create(model="mock", messages=HELLO)  # type: ignore[arg-type]
    assert refused.value.status_code == 503
    assert refused.value.response.json()["error"]["code"] == "audit_unavailable"
    assert httpx.get(f"{fresh_gateway.root_url}/readyz").status_code == 503
    database.execute("DROP TRIGGER refuse")
    database.commit()
    sdk.chat.completions.create(model="mock", messages=HELLO)  # type: ignore[arg-type]  # recovers


def test_audit_verify_detects_a_tampered_row(fresh_gateway: Gateway) -> None:
    sdk = client(fresh_gateway, fresh_gateway.token("frank", "models=mock"))
    for _ in range(3):
        sdk.chat.completions.create(model="mock", messages=HELLO)  # type: ignore[arg-type]
    fresh_gateway.stop_server()  # writes a final checkpoint
    assert fresh_gateway.cli("audit", "verify").returncode == 0
    database = sqlite3.connect(fresh_gateway.home / ".ztai" / "ztai.db")
    seq, body = database.execute(
        "SELECT seq, body FROM audit_events WHERE kind = 'decision' ORDER BY seq LIMIT 1"
    ).fetchone()
    database.execute(
        "UPDATE audit_events SET body = ? WHERE seq = ?", (body.replace(b'"allow"', b'"deny"'), seq)
    )
    database.commit()
    result = fresh_gateway.cli("audit", "verify", check=False)
    assert result.returncode != 0 and f"event {seq}" in result.stderr


def test_same_flow_on_each_store(gateway_on_each_store: Gateway) -> None:
    gateway = gateway_on_each_store
    sdk = client(gateway, gateway.token("grace", "models=mock"))
    for _ in range(3):
        sdk.chat.completions.create(model="mock", messages=HELLO)  # type: ignore[arg-type]
    with pytest.raises(openai.PermissionDeniedError):
        client(gateway, gateway.token("heidi", "models=other")).chat.completions.create(
            model="mock",
            messages=HELLO,  # type: ignore[arg-type]
        )
    gateway.stop_server()
    verify = gateway.cli("audit", "verify")
    assert "intact" in verify.stderr
