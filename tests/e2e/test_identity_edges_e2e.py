"""End to end, through a real `ztai serve`: the edges between identities.

An external issuer's roles count only when its `claim_map` maps them; ztai never mints a token inside
an external issuer's namespace; an admin of one tenant cannot touch (or find) another tenant's tasks and
approvals.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from tests.e2e.conftest import Gateway, exchange_form, start_gateway
from tests.e2e.test_approvals_e2e import admin_api, gateway_database, hold_call
from ztai.agents.approvals import ApprovalStore

pytestmark = pytest.mark.e2e
IDP = "https://idp.test"
IDP_AUDIENCE = "ztai-e2e"
TENANT_B_ADMIN = "spiffe://tenant-b.example/user/ops"
HELLO = {"model": "mock", "messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture(scope="module")
def idp_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, idp_key: rsa.RSAPrivateKey) -> Iterator[Gateway]:
    home = tmp_path_factory.mktemp("identity-edges")
    jwk = {**RSAAlgorithm.to_jwk(idp_key.public_key(), as_dict=True), "kid": "idp-1", "use": "sig"}
    (home / "idp-jwks.json").write_text(json.dumps({"keys": [jwk]}))
    issuer = {
        "issuer": IDP,
        "audience": IDP_AUDIENCE,
        "jwks_file": "idp-jwks.json",
        "name": "idp.test",
        "claim_map": {"roles": {"values": {"idp-admins": "admin"}}},
    }
    env = {"ZTAI_IDENTITY__EXTERNAL_ISSUERS": json.dumps([issuer])}
    instance = start_gateway(home, extra_env=env)
    yield instance
    instance.close()


def idp_token(key: rsa.RSAPrivateKey, **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": IDP, "aud": IDP_AUDIENCE, "sub": "alice", "iat": now, "exp": now + 300, **claims}
    return jwt.encode(payload, key, algorithm="RS256", headers={"kid": "idp-1"})


def get(gateway: Gateway, path: str, token: str) -> httpx.Response:
    return httpx.get(f"{gateway.root_url}{path}", headers={"authorization": f"Bearer {token}"}, timeout=10)


def post(gateway: Gateway, path: str, token: str, **kwargs: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"}
    return httpx.post(f"{gateway.root_url}{path}", headers=headers, timeout=10, **kwargs)


# (a) an external issuer's roles count only when mapped ---------------------------------------------------
def test_unmapped_external_admin_role_is_refused(gateway: Gateway, idp_key: rsa.RSAPrivateKey) -> None:
    for claims in ({"roles": ["admin"]}, {"roles": "admin"}, {"roles": ["admin"], "groups": ["admin"]}):
        response = get(gateway, "/admin/approvals", idp_token(idp_key, **claims))
        assert response.status_code == 403, response.text
        assert response.json()["error"]["decision_id"].startswith("dec_")
    revoke = post(gateway, f"/admin/tasks/tsk_{'a' * 32}/revoke", idp_token(idp_key, roles=["admin"]))
    assert revoke.status_code == 403
    # Nor does an unmapped `models` claim open a model to it.
    chat = post(gateway, "/v1/chat/completions", idp_token(idp_key, models=["*"]), json=HELLO)
    assert chat.status_code == 403


def test_mapped_external_role_is_admin(gateway: Gateway, idp_key: rsa.RSAPrivateKey) -> None:
    response = get(gateway, "/admin/approvals", idp_token(idp_key, roles=["idp-admins"]))
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "list"


# (b) ztai never mints a token inside an external issuer's namespace --------------------------------------
@pytest.mark.parametrize(
    "subject",
    [
        "spiffe://example.org/user/idp.test/alice",
        "spiffe://example.org/agent/idp.test/bot",
        "spiffe://example.org/user/IDP.test/alice",
    ],
)
def test_token_issue_refuses_an_external_issuers_subject(gateway: Gateway, subject: str) -> None:
    result = gateway.cli("token", "issue", "--sub", subject, "--claim", "roles=admin", check=False)
    assert result.returncode == 2
    assert result.stdout == ""  # no token
    message = " ".join(result.stderr.split())
    assert "external issuer idp.test" in message and "does not issue tokens" in message


def test_token_issue_still_works_beside_the_namespace(gateway: Gateway) -> None:
    token = gateway.token("idp.test.alice", "models=mock")
    assert post(gateway, "/v1/chat/completions", token, json=HELLO).status_code == 200


# (c) an admin of another tenant gets 404 and changes nothing ----------------------------------------------
def tenant_b_admin(gateway: Gateway) -> str:
    return gateway.cli("token", "issue", "--sub", TENANT_B_ADMIN, "--claim", "roles=admin").stdout.strip()


def test_another_tenants_admin_cannot_revoke_a_task(gateway: Gateway) -> None:
    alice = gateway.token("alice", "tools=files/*", "models=mock")
    planner = gateway.token("planner", kind="agent")
    exchanged = httpx.post(f"{gateway.root_url}/oauth/token", data=exchange_form(alice, planner), timeout=10)
    assert exchanged.status_code == 200, exchanged.text
    task, task_token = exchanged.json()["task"], exchanged.json()["access_token"]

    other_admin = tenant_b_admin(gateway)
    foreign = post(gateway, f"/admin/tasks/{task}/revoke", other_admin, json={"reason": "attack"})
    assert foreign.status_code == 404, foreign.text
    assert foreign.json()["error"]["code"] == "not_found"
    assert "revoked" not in foreign.text
    never_issued = post(gateway, f"/admin/tasks/tsk_{'b' * 32}/revoke", gateway.token("ops", "roles=admin"))
    assert never_issued.status_code == 404
    time.sleep(1.5)  # past a revocation poll: had anything been recorded, it would be seen now
    assert post(gateway, "/v1/chat/completions", task_token, json=HELLO).status_code == 200

    # The CLI answers the same for the other tenant; the task's own tenant can revoke it.
    refused = gateway.cli("task", "revoke", task, "--tenant", "tenant-b.example", check=False)
    assert refused.returncode == 2 and "no task" in refused.stderr
    ours = post(gateway, f"/admin/tasks/{task}/revoke", gateway.token("ops", "roles=admin"))
    assert ours.status_code == 200 and ours.json()["revoked"] is True


def test_another_tenants_admin_cannot_decide_an_approval(gateway: Gateway) -> None:
    database = gateway_database(gateway)
    try:
        held = hold_call(database)
        other_admin = tenant_b_admin(gateway)
        for action in ("/approve", "/deny", ""):
            method = "GET" if not action else "POST"
            response = admin_api(gateway, method, f"/{held}{action}", other_admin)
            assert response.status_code == 404, response.text
        listed = admin_api(gateway, "GET", "?status=all", other_admin)
        assert listed.status_code == 200 and held not in listed.text
        assert ApprovalStore(database).get("example.org", held).status == "pending"  # unchanged
    finally:
        database.close()
