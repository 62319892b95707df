"""RFC 8693 token exchange (ztai.identity.exchange): root tasks, delegation, refusals, the CLI command.

Decisions are made by the real default Cedar policies (through the CLI's local authorizer) and recorded
in a real audit log on SQLite.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import ECAlgorithm
from typer.testing import CliRunner

from ztai.audit import AuditLog
from ztai.cli.main import app as cli_app
from ztai.cli.token_commands import policy_authorizer
from ztai.config import Settings, load_settings
from ztai.errors import AuthenticationError, ExchangeError, MalformedRequest, NotFound
from ztai.gateway.responses import oauth_error_body
from ztai.identity import KeyStore, RevocationList, TokenVerifier, issue_token, parse_claims
from ztai.identity.exchange import (
    ACCESS_TOKEN_TYPE,
    GRANT_TYPE,
    JWT_TOKEN_TYPE,
    ExchangeRequest,
    IssuedTask,
    TokenExchange,
)
from ztai.identity.task_tokens import TaskClaims, act_claim, task_claims
from ztai.store import Database, open_database

ALICE = "spiffe://example.org/user/alice"
PLANNER = "spiffe://example.org/agent/planner"
WORKER = "spiffe://example.org/agent/worker"
HELPER = "spiffe://example.org/agent/helper"
IDP = "https://idp.example.com"


# Fixtures and helpers -------------------------------------------------------------------------------
class World:
    """Keys, store, verifier and exchange of one ztai home."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = KeyStore.load(settings.data_path)
        self.database: Database = open_database(settings.store_url)
        self.database.migrate()
        self.revocations = RevocationList(self.database)
        self.revocations.refresh()
        self.verifier = TokenVerifier(settings, self.keys, self.revocations)
        self.exchange = TokenExchange(settings, self.keys, self.verifier)
        self.audit = AuditLog(self.database, self.keys.audit.private_key)
        self.authorize = policy_authorizer(settings, self.audit)

    def token(self, subject: str, ttl: int = 300, now: float | None = None, **claims: Any) -> str:
        return issue_token(
            self.keys,
            subject=subject,
            issuer=self.settings.issuer,
            audience=self.settings.identity.audience,
            ttl_seconds=ttl,
            max_ttl_seconds=self.settings.identity.max_ttl_seconds,
            claims=claims,
            now=now,
        ).token

    def run(
        self, subject_token: str, actor_token: str, details: dict[str, Any] | None = None, **extra: str
    ) -> IssuedTask:
        request = ExchangeRequest.from_fields(
            form(subject_token, actor_token, details, **extra), max_token_bytes=8192
        )
        return self.exchange.exchange(request, self.exchange.parties(request), self.authorize)

    def refused(
        self, subject_token: str, actor_token: str, details: dict[str, Any] | None = None, **extra: str
    ) -> ExchangeError:
        with pytest.raises(ExchangeError) as caught:
            self.run(subject_token, actor_token, details, **extra)
        return caught.value

    def task_of(self, token: str) -> TaskClaims:
        task = task_claims(self.verifier.verify(token), self.settings.issuer)
        assert task is not None
        return task

    def events(self) -> list[dict[str, Any]]:
        return [event for _, event in self.audit.tail(10_000)]

    def decisions(self) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("action") == "token.exchange"]


def form(subject: str, actor: str, details: dict[str, Any] | None = None, **extra: str) -> dict[str, str]:
    fields = {
        "grant_type": GRANT_TYPE,
        "subject_token": subject,
        "subject_token_type": JWT_TOKEN_TYPE,
        "actor_token": actor,
        "actor_token_type": JWT_TOKEN_TYPE,
    }
    if details is not None:
        fields["authorization_details"] = json.dumps({"type": "ztai_task", **details})
    fields.update(extra)
    return fields


@pytest.fixture
def world(settings: Settings) -> Iterator[World]:
    instance = World(settings)
    yield instance
    instance.database.close()


def world_with(ztai_home: Path, **overrides: Any) -> World:
    return World(load_settings(ztai_home / "ztai.yaml", **overrides))


def alice(world: World, ttl: int = 300, **claims: Any) -> str:
    return world.token(
        ALICE, ttl, tools=claims.pop("tools", ["files/*", "web/fetch"]), models=["mock"], **claims
    )


ROOT_GRANT = {
    "tools": ["files/*", "web/fetch"],
    "egress": ["*.example.com"],
    "budget": {"calls": 10, "tokens": 5000},
    "constraints": {"files/*": {"path": [{"prefix": "/srv/"}]}},
}


def root_task(world: World, **grant: Any) -> IssuedTask:
    return world.run(alice(world), world.token(PLANNER), {**ROOT_GRANT, **grant})


# Root tasks ---------------------------------------------------------------------------------------------
def test_root_task_token(world: World) -> None:
    started = int(time.time())
    issued = root_task(world)
    claims = world.verifier.verify(issued.token.token).claims
    assert claims["sub"] == ALICE and claims["kind"] == "user" and claims["tenant"] == "example.org"
    assert re.fullmatch(r"tsk_[0-9a-f]{32}", claims["task"])
    assert claims["task_chain"] == [claims["task"]]
    assert claims["act"] == {"sub": PLANNER}
    assert claims["models"] == ["mock"]
    assert claims["tools"] == ["files/*", "web/fetch"] and claims["egress"] == ["*.example.com"]
    assert claims["budget"] == {"calls": 10, "tokens": 5000}
    assert claims["constraints"] == {"files/*": {"path": [{"prefix": "/srv/"}]}}
    assert "roles" not in claims  # nothing else of the subject's token is carried over
    # The default task lifetime is bounded by the subject token's (300 s here).
    assert claims["exp"] <= started + 300 + 1 and claims["exp"] - claims["iat"] <= 300
    task = world.task_of(issued.token.token)
    assert (task.subject, task.actors, task.depth, task.chain) == (ALICE, (PLANNER,), 1, (claims["task"],))
    body = issued.response()
    assert body["access_token"] == issued.token.token and body["task"] == claims["task"]
    assert body["issued_token_type"] == JWT_TOKEN_TYPE and body["token_type"] == "Bearer"
    assert 0 < body["expires_in"] <= 300


def test_the_decision_is_recorded_with_the_exchange_context(world: World) -> None:
    issued = root_task(world)
    (decision,) = world.decisions()
    assert decision["id"] == issued.decision_id and decision["effect"] == "allow"
    assert decision["principal"] == ALICE and decision["resource"] == f"Agent::{PLANNER}"
    assert decision["reasons"] == ["exchange-within-subject-tools"]
    details = issued.audit_details()
    assert details["task"] == issued.task.task_id and details["actors"] == [PLANNER]
    assert issued.token.token not in json.dumps(details)


def test_default_ttl_and_the_maximum(ztai_home: Path) -> None:
    world = world_with(ztai_home, agents={"default_task_ttl_seconds": 120, "max_task_ttl_seconds": 600})
    long_lived = alice(world, ttl=3600)
    actor = world.token(PLANNER)
    issued = world.run(long_lived, actor, {"tools": ["files/*"]})
    claims = world.verifier.verify(issued.token.token).claims
    assert claims["exp"] - claims["iat"] == 120
    issued = world.run(long_lived, actor, {"tools": ["files/*"], "ttl_seconds": 600})
    claims = world.verifier.verify(issued.token.token).claims
    assert claims["exp"] - claims["iat"] == 600
    refusal = world.refused(long_lived, actor, {"tools": ["files/*"], "ttl_seconds": 601})
    assert refusal.code == "invalid_scope" and "maximum task lifetime 600" in refusal.message


def test_task_never_outlives_the_subject_token(world: World) -> None:
    subject = alice(world, ttl=60)
    subject_exp = world.verifier.verify(subject).expires_at
    issued = world.run(subject, world.token(PLANNER), {"tools": ["files/*"]})
    assert issued.token.expires_at <= subject_exp
    refusal = world.refused(subject, world.token(PLANNER), {"tools": ["files/*"], "ttl_seconds": 120})
    assert refusal.code == "invalid_scope" and "subject token's remaining lifetime" in refusal.message


def test_policy_refuses_tools_the_subject_token_does_not_list(world: World) -> None:
    refusal = world.refused(
        alice(world, tools=["files/read_file"]), world.token(PLANNER), {"tools": ["mail/send"]}
    )
    assert refusal.code == "invalid_target" and refusal.decision_id.startswith("dec_")
    body = oauth_error_body(refusal)
    assert body["error"] == "invalid_target" and body["decision_id"] == refusal.decision_id
    (decision,) = world.decisions()
    assert decision["id"] == refusal.decision_id and decision["effect"] == "deny"


def test_subject_without_tools_claim_can_hand_out_no_tools(world: World) -> None:
    subject = world.token(ALICE, models=["mock"])
    assert (
        world.refused(subject, world.token(PLANNER), {"tools": ["files/read_file"]}).code == "invalid_target"
    )
    issued = world.run(subject, world.token(PLANNER))  # an empty grant: nothing unlisted
    assert issued.task.grant.tools == ()


def test_a_service_may_be_subject_and_actor(world: World) -> None:
    subject = world.token("spiffe://example.org/service/ci", tools=["*"])
    issued = world.run(subject, world.token("spiffe://example.org/service/runner"), {"tools": ["build/run"]})
    claims = world.verifier.verify(issued.token.token).claims
    assert claims["kind"] == "service" and claims["act"] == {"sub": "spiffe://example.org/service/runner"}
    assert world.decisions()[-1]["resource"] == "Service::spiffe://example.org/service/runner"


# Delegation ---------------------------------------------------------------------------------------------
def test_delegation_intersects_the_parent_grant(world: World) -> None:
    parent = root_task(world)
    child = world.run(
        parent.token.token,
        world.token(WORKER),
        {
            "tools": ["files/read_file"],
            "egress": ["api.example.com"],
            "budget": {"calls": 5},
            "constraints": {"files/read_file": {"path": [{"max_length": 64}]}},
        },
    )
    task = world.task_of(child.token.token)
    assert task.chain == (parent.task.task_id, child.task.task_id)
    assert task.actors == (WORKER, PLANNER) and task.subject == ALICE and task.depth == 2
    assert task.grant.tools == ("files/read_file",) and task.grant.egress == ("api.example.com",)
    assert task.grant.budget == {"calls": 5, "tokens": 5000}  # what is not asked for is inherited
    assert task.grant.constraints_for("files", "read_file") == {
        "path": [{"prefix": "/srv/"}, {"max_length": 64}]
    }
    claims = world.verifier.verify(child.token.token).claims
    assert claims["act"] == act_claim([WORKER, PLANNER]) == {"sub": WORKER, "act": {"sub": PLANNER}}
    assert claims["models"] == ["mock"] and claims["sub"] == ALICE
    assert child.token.expires_at <= parent.token.expires_at
    assert child.parent_task == parent.task.task_id
    decision = world.decisions()[-1]
    assert decision["effect"] == "allow" and decision["resource"] == f"Agent::{WORKER}"


def test_sub_task_tokens_carry_their_ancestors_budgets(world: World) -> None:
    parent = root_task(world)  # budget: 10 calls, 5000 tokens
    assert "ancestor_budgets" not in world.verifier.verify(parent.token.token).claims
    child = world.run(parent.token.token, world.token(WORKER), {"budget": {"calls": 5}})
    grandchild = world.run(child.token.token, world.token(HELPER), {})
    claims = world.verifier.verify(grandchild.token.token).claims
    assert claims["ancestor_budgets"] == [{"calls": 10, "tokens": 5000}, {"calls": 5, "tokens": 5000}]
    task = world.task_of(grandchild.token.token)
    ids = (parent.task.task_id, child.task.task_id, grandchild.task.task_id)
    assert task.chain_limits("calls") == tuple(zip(ids, (10, 5, 5), strict=True))


def test_delegation_without_details_inherits_everything(world: World) -> None:
    parent = root_task(world)
    child = world.run(parent.token.token, world.token(WORKER))
    assert child.task.grant == parent.task.grant


@pytest.mark.parametrize(
    ("details", "needle"),
    [
        pytest.param({"tools": ["mail/send"]}, "tools exceed", id="tool"),
        pytest.param({"tools": ["files/*", "web/*"]}, "tools exceed", id="server-wildcard"),
        pytest.param({"egress": ["evil.test"]}, "egress exceeds", id="egress"),
        pytest.param({"egress": ["*"]}, "egress exceeds", id="egress-wildcard"),
        pytest.param({"budget": {"calls": 11}}, "calls budget", id="budget"),
        pytest.param({"ttl_seconds": 100_000}, "maximum task lifetime", id="ttl-over-maximum"),
        pytest.param({"ttl_seconds": 3000}, "parent task's remaining lifetime", id="ttl-over-parent"),
    ],
)
def test_widening_a_delegated_grant_is_refused(world: World, details: dict[str, Any], needle: str) -> None:
    parent = root_task(world)
    refusal = world.refused(parent.token.token, world.token(WORKER), details)
    assert refusal.code == "invalid_scope" and needle in refusal.message
    assert refusal.decision_id == ""  # refused before policy was asked


def test_depth_limit(ztai_home: Path) -> None:
    world = world_with(ztai_home, agents={"max_delegation_depth": 2})
    parent = world.run(alice(world), world.token(PLANNER), {"tools": ["files/*"]})
    child = world.run(parent.token.token, world.token(WORKER))
    refusal = world.refused(child.token.token, world.token(HELPER))
    assert refusal.code == "invalid_request" and "max_delegation_depth" in refusal.message


def test_expired_parent_task_is_refused(world: World) -> None:
    task_id = "tsk_" + "a" * 32
    parent = issue_token(
        world.keys,
        subject=ALICE,
        issuer=world.settings.issuer,
        audience="ztai",
        ttl_seconds=60,
        max_ttl_seconds=3600,
        claims={"tools": ["files/*"]},
        task={"task": task_id, "task_chain": [task_id], "act": act_claim([PLANNER]), "egress": []},
        now=time.time() - 600,
    )
    refusal = world.refused(parent.token, world.token(WORKER))
    assert refusal.code == "invalid_request" and "expired" in refusal.message


def test_revoked_parent_task_refuses_the_child_exchange(world: World) -> None:
    parent = root_task(world)
    child = world.run(parent.token.token, world.token(WORKER))
    world.revocations.revoke_task("example.org", parent.task.task_id, time.time() + 3600)
    refusal = world.refused(parent.token.token, world.token(WORKER))
    assert refusal.code == "invalid_request" and "revoked" in refusal.message
    refusal = world.refused(child.token.token, world.token(HELPER))  # a grandchild neither
    assert refusal.code == "invalid_request" and "revoked" in refusal.message


# Forged or widened act chains ------------------------------------------------------------------------------
def test_task_claims_cannot_be_minted_by_token_issue(world: World) -> None:
    for claim in ("act", "task", "task_chain", "egress", "budget", "constraints", "ancestor_budgets"):
        with pytest.raises(MalformedRequest):
            parse_claims([f"{claim}=spiffe://example.org/agent/evil"])
        with pytest.raises(MalformedRequest):
            world.token(ALICE, **{claim: "x"})


def test_token_signed_by_another_key_is_refused(world: World) -> None:
    now = int(time.time())
    task_id = "tsk_" + "b" * 32
    forged_claims = {
        "iss": world.settings.issuer,
        "sub": ALICE,
        "aud": "ztai",
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": "f" * 32,
        "kind": "user",
        "tenant": "example.org",
        "task": task_id,
        "task_chain": [task_id],
        "act": {"sub": PLANNER},
        "tools": ["*"],
    }
    forged = jwt.encode(
        forged_claims, Ed25519PrivateKey.generate(), algorithm="EdDSA", headers={"kid": world.keys.active.kid}
    )
    refusal = world.refused(forged, world.token(WORKER))
    assert refusal.code == "invalid_request" and refusal.message.startswith("subject_token:")
    refusal = world.refused(alice(world), forged)
    assert refusal.code == "invalid_request" and refusal.message.startswith("actor_token:")


def test_act_chain_and_task_chain_must_agree(world: World) -> None:
    ids = ["tsk_" + "c" * 32, "tsk_" + "d" * 32]
    mismatched = issue_token(
        world.keys,
        subject=ALICE,
        issuer=world.settings.issuer,
        audience="ztai",
        ttl_seconds=300,
        max_ttl_seconds=3600,
        task={"task": ids[1], "task_chain": ids, "act": act_claim([WORKER])},
    )
    refusal = world.refused(mismatched.token, world.token(HELPER))
    assert refusal.code == "invalid_request" and "disagree" in refusal.message


def test_actor_must_be_a_plain_agent_or_service_identity(world: World) -> None:
    subject = alice(world)
    user_actor = world.refused(subject, world.token("spiffe://example.org/user/bob"))
    assert user_actor.code == "invalid_request" and "agent's or service's" in user_actor.message
    agent_task = world.run(world.token("spiffe://example.org/agent/boss", tools=["*"]), world.token(PLANNER))
    task_actor = world.refused(subject, agent_task.token.token)
    assert task_actor.code == "invalid_request" and "not a task token" in task_actor.message
    model_subject = world.refused(
        world.token("spiffe://example.org/model/m", tools=["*"]), world.token(PLANNER)
    )
    assert model_subject.code == "invalid_request"
    foreign = world.refused(subject, world.token("spiffe://other.example/agent/planner"))
    assert foreign.code == "invalid_target" and "tenant" in foreign.message


def test_external_issuer_token_with_task_claims_is_not_a_task_token(ztai_home: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = {**ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": "idp-1"}
    (ztai_home / "idp.json").write_text(json.dumps({"keys": [jwk]}))
    issuer = {"issuer": IDP, "audience": "ztai", "jwks_file": "idp.json", "algorithms": ["ES256"]}
    # The issuer's tools count only because they are mapped (an unmapped `tools` claim is dropped).
    issuer["claim_map"] = {"tools": {"values": {"files/*": "files/*"}}}
    world = world_with(ztai_home, identity={"external_issuers": [issuer]})
    now = int(time.time())
    smuggled = "tsk_" + "e" * 32
    claims = {
        "iss": IDP,
        "sub": "alice",
        "aud": "ztai",
        "iat": now,
        "exp": now + 300,
        "tools": ["files/*"],
        "task": smuggled,
        "task_chain": [smuggled],
        "act": {"sub": "spiffe://example.org/agent/admin-bot"},
    }
    external = jwt.encode(claims, key, algorithm="ES256", headers={"kid": "idp-1"})
    issued = world.run(external, world.token(PLANNER), {"tools": ["files/read_file"]})
    task = world.task_of(issued.token.token)
    assert task.subject == "spiffe://example.org/user/idp.example.com/alice"
    assert task.chain == (issued.task.task_id,) and task.chain[0] != smuggled  # a root task, not a child
    assert task.actors == (PLANNER,)  # the smuggled act chain is not carried
    decision = world.decisions()[-1]
    assert decision["effect"] == "allow"
    # Revoking the smuggled id touches nothing: it was never a task of ours (an admin gets 404).
    with pytest.raises(NotFound):
        world.revocations.revoke_tenant_task("example.org", smuggled, time.time() + 3600)
    world.revocations.revoke_task("example.org", smuggled, time.time() + 3600)
    world.verifier.verify(issued.token.token)
    # Nor may an external token carrying task claims act for anyone.
    refusal = world.refused(alice(world), external)
    assert refusal.code == "invalid_request"


# The request --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "code"),
    [
        pytest.param({"grant_type": ""}, "invalid_request", id="no-grant-type"),
        pytest.param({"grant_type": "client_credentials"}, "unsupported_grant_type", id="other-grant"),
        pytest.param({"subject_token": ""}, "invalid_request", id="no-subject"),
        pytest.param({"actor_token": ""}, "invalid_request", id="no-actor"),
        pytest.param(
            {"subject_token_type": "urn:ietf:params:oauth:token-type:saml2"}, "invalid_request", id="saml"
        ),
        pytest.param({"actor_token_type": ""}, "invalid_request", id="no-actor-type"),
        pytest.param({"requested_token_type": "urn:x"}, "invalid_request", id="requested-type"),
        pytest.param({"resource": "https://x"}, "invalid_target", id="resource"),
        pytest.param({"scope": "admin"}, "invalid_scope", id="scope"),
        pytest.param({"audience": "a" * 600}, "invalid_request", id="long-audience"),
        pytest.param({"authorization_details": "{not json"}, "invalid_authorization_details", id="bad-json"),
        pytest.param(
            {"authorization_details": '{"type":"ztai_task","admin":true}'},
            "invalid_authorization_details",
            id="unknown-field",
        ),
        pytest.param(
            {"authorization_details": '[{"type":"other"}]'}, "invalid_authorization_details", id="other-type"
        ),
        pytest.param(
            {"authorization_details": '{"tools":["no-slash"]}'},
            "invalid_authorization_details",
            id="bad-tool",
        ),
        pytest.param({"authorization_details": "[" * 70_000}, "invalid_authorization_details", id="huge"),
    ],
)
def test_malformed_requests(change: dict[str, str], code: str) -> None:
    fields = form("subject", "actor", {"tools": ["files/*"]})
    fields.update(change)
    with pytest.raises(ExchangeError) as caught:
        ExchangeRequest.from_fields(fields, max_token_bytes=8192)
    assert caught.value.code == code and caught.value.status == 400


def test_form_body_parsing() -> None:
    body = (
        f"grant_type={GRANT_TYPE}&subject_token=s.t.x&subject_token_type={ACCESS_TOKEN_TYPE}"
        f"&actor_token=a.b.c&actor_token_type={JWT_TOKEN_TYPE}&audience=ztai"
    ).encode()
    request = ExchangeRequest.from_form(body, max_token_bytes=8192)
    assert (request.subject_token, request.actor_token, request.audience) == ("s.t.x", "a.b.c", "ztai")
    for bad in (body + b"&actor_token=again", body + b"&x=1" * 20, b"\xff\xfe", b"=&="):
        with pytest.raises(ExchangeError) as caught:
            ExchangeRequest.from_form(bad, max_token_bytes=8192)
        assert caught.value.code == "invalid_request"
    with pytest.raises(ExchangeError) as caught:
        ExchangeRequest.from_form(body.replace(b"s.t.x", b"s" * 9000), max_token_bytes=8192)
    assert caught.value.code == "invalid_request" and "larger than 8192" in caught.value.message


def test_audience_must_be_ztai(world: World) -> None:
    assert (
        world.refused(alice(world), world.token(PLANNER), audience="https://elsewhere").code
        == "invalid_target"
    )
    world.run(alice(world), world.token(PLANNER), audience="ztai")


def test_grant_too_large_for_a_token_is_refused(world: World) -> None:
    subject = world.token(ALICE, tools=["*"])
    tools = [f"server{i:03d}/{'t' * 100}" for i in range(80)]
    refusal = world.refused(subject, world.token(PLANNER), {"tools": tools})
    assert refusal.code == "invalid_scope" and "larger than 8192 bytes" in refusal.message


# The CLI --------------------------------------------------------------------------------------------------------
def test_cli_exchange_and_task_revoke(world: World, ztai_home: Path) -> None:
    runner = CliRunner()
    config = str(ztai_home / "ztai.yaml")
    args = ["token", "exchange", "--subject-token", alice(world), "--actor-token", world.token(PLANNER)]
    args += [
        "--tools",
        "files/read_file",
        "--egress",
        "api.example.com",
        "--budget-calls",
        "3",
        "--ttl",
        "120",
    ]
    args += ["--constraints", '{"files/read_file": {"path": [{"prefix": "/srv/"}]}}', "--config", config]
    result = runner.invoke(cli_app, args)
    assert result.exit_code == 0, result.output
    token = result.stdout.strip().splitlines()[-1]
    task = world.task_of(token)
    assert task.grant.tools == ("files/read_file",) and task.grant.budget == {"calls": 3}
    assert task.grant.egress == ("api.example.com",) and task.actors == (PLANNER,)
    claims = world.verifier.verify(token).claims
    assert claims["exp"] - claims["iat"] == 120
    issued = [e for e in world.events() if e["kind"] == "token.issued" and e.get("task") == task.task_id]
    assert issued and issued[0]["by"] == "cli" and token not in json.dumps(issued)

    denied = runner.invoke(cli_app, [*args[:6], "--tools", "mail/send", "--config", config])
    message = " ".join(denied.output.split())  # Rich wraps long lines
    assert denied.exit_code != 0 and "invalid_target" in message and "(decision dec_" in message

    revoked = runner.invoke(cli_app, ["task", "revoke", task.task_id, "--reason", "test", "--config", config])
    assert revoked.exit_code == 0, revoked.output
    world.revocations.refresh()
    with pytest.raises(AuthenticationError) as caught:
        world.verifier.verify(token)
    assert caught.value.code == "token_revoked"
    malformed = runner.invoke(cli_app, ["task", "revoke", "not-a-task", "--config", config])
    assert malformed.exit_code != 0
    # A task the exchange did not issue in the tenant: refused, nothing revoked.
    for extra in ([], ["--tenant", "other.example"]):
        unknown = "tsk_" + "9" * 32 if not extra else task.task_id
        missing = runner.invoke(cli_app, ["task", "revoke", unknown, *extra, "--config", config])
        assert missing.exit_code == 2 and "no task" in missing.output, missing.output
        world.revocations.refresh()
        assert not world.revocations.is_task_revoked(extra[-1] if extra else "example.org", [unknown])
