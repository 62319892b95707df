"""`ztai token issue|exchange|revoke` and `ztai keys rotate`. Every issuance and revocation is audited."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console

from ztai.audit import AuditLog
from ztai.audit.events import identity_event
from ztai.cli.common import ConfigOption, fail, open_audit_log, record_events, settings_for
from ztai.cli.task_commands import revoke_and_record
from ztai.config import DEFAULT_CONFIG_PATH, Settings
from ztai.errors import ExchangeError, ZtaiError
from ztai.identity import RevocationList, TokenVerifier, issue_token, parse_claims
from ztai.identity.exchange import (
    GRANT_TYPE,
    JWT_TOKEN_TYPE,
    Authorize,
    ExchangePlan,
    ExchangeRequest,
    TokenExchange,
)
from ztai.identity.external import refuse_foreign_subject
from ztai.policy import (
    Decider,
    Decision,
    DecisionRequest,
    Entity,
    PolicyEngine,
    model_entities,
    principal_context,
    principal_entity,
)

app = typer.Typer(help="Issue and revoke tokens.", no_args_is_help=True)
keys_app = typer.Typer(help="Manage signing keys.", no_args_is_help=True)
err = Console(stderr=True)


@app.command("issue")
def issue(
    sub: Annotated[str, typer.Option(help="subject SPIFFE ID, spiffe://<trust-domain>/<kind>/<name>")],
    ttl: Annotated[int | None, typer.Option(help="lifetime in seconds (default from config)")] = None,
    claim: Annotated[list[str] | None, typer.Option(help="extra claim k=v; commas make a list")] = None,
    config: ConfigOption = DEFAULT_CONFIG_PATH,
) -> None:
    """Print a signed token for SUB (only the token, on stdout).

    Example: ztai token issue --sub spiffe://example.org/user/alice --ttl 300 --claim models=mock
    """
    typer.echo(_issue(config, sub, ttl, claim or []))


def _issue(config: Path, subject: str, ttl: int | None, claims: list[str]) -> str:
    settings = settings_for(config)
    database, keys, audit_log = open_audit_log(settings)
    try:
        refuse_foreign_subject(settings, subject)
        extra_claims = parse_claims(claims)
        issued = issue_token(
            keys,
            subject=subject,
            issuer=settings.issuer,
            audience=settings.identity.audience,
            ttl_seconds=ttl if ttl is not None else settings.identity.default_ttl_seconds,
            max_ttl_seconds=settings.identity.max_ttl_seconds,
            claims=extra_claims,
        )
        # Durable before the token is handed out: no unrecorded credentials.
        record_events(
            settings,
            audit_log,
            [
                identity_event(
                    "token.issued",
                    tenant=issued.tenant,
                    principal=issued.subject,
                    details={
                        "jti": issued.jti,
                        "expires_at": issued.expires_at,
                        "token_kind": issued.kind,
                        "claims": sorted(extra_claims),
                        "by": "cli",
                    },
                )
            ],
        )
    except ZtaiError as exc:
        fail(exc.message)
    finally:
        database.close()
    return issued.token


def issue_for_demo(config: Path) -> str:
    return _issue(config, "spiffe://example.org/user/demo", 3600, ["models=mock"])


@app.command("exchange")
def exchange(
    subject_token: Annotated[
        str,
        typer.Option(
            help="the subject's token (a user's or service's, or a parent task token)",
            envvar="ZTAI_SUBJECT_TOKEN",
        ),
    ],
    actor_token: Annotated[
        str,
        typer.Option(help="the identity token of the agent that takes the task", envvar="ZTAI_ACTOR_TOKEN"),
    ],
    tools: Annotated[
        str | None, typer.Option(help="granted tools, <server>/<tool> or <server>/*, comma-separated")
    ] = None,
    egress: Annotated[
        str | None, typer.Option(help="hosts tool arguments may reach, comma-separated")
    ] = None,
    budget_calls: Annotated[int | None, typer.Option(help="at most this many tool calls")] = None,
    budget_tokens: Annotated[int | None, typer.Option(help="at most this many model tokens")] = None,
    ttl: Annotated[
        int | None, typer.Option(help="lifetime in seconds (default agents.default_task_ttl_seconds)")
    ] = None,
    constraints: Annotated[
        str | None,
        typer.Option(help='argument constraints, JSON: {"<server>/<tool>": {"arg": [{"prefix": "/tmp/"}]}}'),
    ] = None,
    config: ConfigOption = DEFAULT_CONFIG_PATH,
) -> None:
    """Exchange a subject's token and an agent's token for a task token (RFC 8693); prints only the token.

    The same checks as POST /oauth/token: both tokens verified, the grant within the subject's (or the
    parent task's), policy `token.exchange` decided and recorded. Tokens may come from the variables
    ZTAI_SUBJECT_TOKEN and ZTAI_ACTOR_TOKEN instead of the command line.

    Example: ztai token exchange --subject-token "$USER" --actor-token "$AGENT" --tools files/read_file
    """
    details: dict[str, Any] = {"type": "ztai_task"}
    if tools is not None:
        details["tools"] = _split(tools)
    if egress is not None:
        details["egress"] = _split(egress)
    budget = {k: v for k, v in (("calls", budget_calls), ("tokens", budget_tokens)) if v is not None}
    if budget:
        details["budget"] = budget
    if ttl is not None:
        details["ttl_seconds"] = ttl
    if constraints is not None:
        try:
            details["constraints"] = orjson.loads(constraints)
        except orjson.JSONDecodeError:
            fail("--constraints must be JSON")
    fields = {
        "grant_type": GRANT_TYPE,
        "subject_token": subject_token,
        "subject_token_type": JWT_TOKEN_TYPE,
        "actor_token": actor_token,
        "actor_token_type": JWT_TOKEN_TYPE,
        "authorization_details": orjson.dumps(details).decode(),
    }
    typer.echo(_exchange(config, fields))


def _split(values: str) -> list[str]:
    return [value.strip() for value in values.split(",") if value.strip()]


def _exchange(config: Path, fields: dict[str, str]) -> str:
    settings = settings_for(config)
    database, keys, audit_log = open_audit_log(settings)
    try:
        revocations = RevocationList(database, refresh_seconds=settings.identity.revocation_refresh_seconds)
        revocations.refresh()
        tokens = TokenExchange(settings, keys, TokenVerifier(settings, keys, revocations))
        request = ExchangeRequest.from_fields(fields, max_token_bytes=settings.identity.max_token_bytes)
        parties = tokens.parties(request)
        fingerprint = hashlib.sha256(orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)).hexdigest()
        issued = tokens.exchange(request, parties, policy_authorizer(settings, audit_log, fingerprint))
        revocations.record_task(issued.token.tenant, issued.task.task_id, issued.token.expires_at)
        details = {**issued.audit_details(), "by": "cli"}
        record_events(
            settings,
            audit_log,
            [
                identity_event(
                    "token.issued",
                    tenant=issued.token.tenant,
                    principal=issued.token.subject,
                    details=details,
                )
            ],
        )
    except ExchangeError as exc:
        decision = f" (decision {exc.decision_id})" if exc.decision_id else ""
        fail(f"{exc.code}: {exc.message}{decision}")
    except ZtaiError as exc:
        fail(exc.message)
    finally:
        database.close()
    err.print(f"task {issued.task.task_id}, expires in {issued.token.expires_at - int(time.time())}s")
    return issued.token.token


def policy_authorizer(settings: Settings, audit_log: AuditLog, fingerprint: str = "") -> Authorize:
    """Cedar `token.exchange` decided by the Decider locally (as the gateway would, without network
    facts); each decision record is appended to the audit log before the decision is returned."""
    models = [(model, name) for name, upstream in settings.upstreams.items() for model in upstream.models]
    decider = Decider(PolicyEngine(settings.policy_path, model_entities(models)))
    route = "cli:token exchange"

    def authorize(plan: ExchangePlan) -> Decision:
        subject, actor = plan.parties.subject, plan.parties.actor
        context = principal_context(
            subject.tenant, subject.kind, subject.claims, subject.issuer, ip="", route=route
        )
        context.update(plan.policy_context())
        request = DecisionRequest(
            tenant=subject.tenant,
            principal=principal_entity(subject.spiffe_id, subject.kind),
            action="token.exchange",
            resource=Entity(plan.resource_type, actor.spiffe_id),
            context=context,
            route=route,
            fingerprint=fingerprint,
            details={"jti": subject.jti},
        )
        decision = decider.evaluate(request)
        record_events(settings, audit_log, [decider.record_of(request, decision)])
        return decision

    return authorize


@app.command("revoke")
def revoke(
    jti: Annotated[str, typer.Argument(help="the token's jti claim")],
    reason: Annotated[str, typer.Option(help="why (recorded in the audit log)")] = "",
    tenant: Annotated[str | None, typer.Option(help="tenant (default: the configured trust domain)")] = None,
    config: ConfigOption = DEFAULT_CONFIG_PATH,
) -> None:
    """Revoke a token everywhere (every replica refuses it within a second or so).

    Example: ztai token revoke 4f1c2e9a0b7d4c3e8f6a5b2c1d0e9f8a --reason "laptop lost"
    """
    revoke_and_record(settings_for(config), tenant, "token", jti, reason)
    err.print(f"revoked {jti}")


@keys_app.command("rotate")
def rotate(config: ConfigOption = DEFAULT_CONFIG_PATH) -> None:
    """Start signing with a new key; the old one verifies until its tokens have expired.

    Example: ztai keys rotate
    """
    settings = settings_for(config)
    database, keys, audit_log = open_audit_log(settings)
    try:
        old = keys.active.kid
        lifetime = settings.identity.max_ttl_seconds + settings.identity.leeway_seconds
        fresh = keys.rotate(lifetime)
        record_events(
            settings,
            audit_log,
            [
                identity_event(
                    "keys.rotated",
                    tenant=settings.trust_domain,
                    principal=settings.issuer,
                    details={"old_kid": old, "new_kid": fresh.kid, "by": "cli"},
                )
            ],
        )
    finally:
        database.close()
    err.print(f"now signing with {fresh.kid}; {old} stays valid for verification for {lifetime}s")
