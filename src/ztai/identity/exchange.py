"""RFC 8693 token exchange: a subject's token plus an agent's identity token yield a task token.

The subject (a user, service or agent) hands a task to an actor (an agent or service). The new token's
`sub` is the subject, its `act` claim the chain of actors (current one outermost), its `task_chain` the
task ids from the root task down, and it carries the task's grant (`ztai.identity.grants.TaskGrant`).
When the subject token is itself a task token the exchange delegates a sub-task: the grant is the
parent's intersected with the request (`attenuate`, anything broader is refused), the lifetime ends no
later than the parent's, and the chain may grow only to `agents.max_delegation_depth`.

One sequence serves the HTTP endpoint and the CLI: `parties` (verify both tokens) -> `plan` (everything
the new token will say) -> the caller's `authorize(plan)` (the Decider: Cedar `token.exchange`,
recorded) -> `issue`.
Nothing here knows HTTP; errors are `ExchangeError`s carrying the RFC 6749 §5.2 error code.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import orjson

from ztai.config import Settings
from ztai.errors import AuthenticationError, ExchangeError, GrantError
from ztai.identity.grants import GrantRequest, attenuate, unlisted_tools
from ztai.identity.keys import KeyStore
from ztai.identity.task_tokens import TaskClaims, act_claim, task_claims
from ztai.identity.tokens import IssuedToken, Principal, issue_token
from ztai.identity.verifier import TokenVerifier
from ztai.policy.decision import Decision

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"  # noqa: S105 (a type URI, not a secret)
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105
TOKEN_TYPES = (JWT_TOKEN_TYPE, ACCESS_TOKEN_TYPE)
SUBJECT_KINDS = ("user", "service", "agent")  # the principals Cedar's token.exchange accepts
ACTOR_KINDS = ("agent", "service")
MAX_FORM_FIELDS = 16
MAX_DETAILS_BYTES = 65_536
MAX_SHORT_FIELD = 512
# RFC 8693 §2.2.2: an invalid or unacceptable subject_token or actor_token MUST be `invalid_request`.
BAD_TOKEN = "invalid_request"  # noqa: S105 (an error code)


# The request ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExchangeRequest:
    """A validated token-exchange request (the form fields of RFC 8693 §2.1)."""

    subject_token: str
    actor_token: str
    grant: GrantRequest
    audience: str = ""

    @classmethod
    def from_form(cls, body: bytes, *, max_token_bytes: int) -> ExchangeRequest:
        """Parse an `application/x-www-form-urlencoded` body; raises ExchangeError."""
        try:
            pairs = parse_qsl(
                body.decode("utf-8"),
                keep_blank_values=True,
                strict_parsing=True,
                max_num_fields=MAX_FORM_FIELDS,
            )
        except (UnicodeDecodeError, ValueError):
            raise ExchangeError(
                "invalid_request", f"body must be a form (at most {MAX_FORM_FIELDS} fields)"
            ) from None
        fields: dict[str, str] = {}
        for name, value in pairs:
            if name in fields:  # RFC 6749 §3.2: parameters MUST NOT be included more than once
                raise ExchangeError("invalid_request", f"parameter {name[:40]!r} given more than once")
            fields[name] = value
        return cls.from_fields(fields, max_token_bytes=max_token_bytes)

    @classmethod
    def from_fields(cls, fields: Mapping[str, str], *, max_token_bytes: int) -> ExchangeRequest:
        grant_type = fields.get("grant_type", "")
        if grant_type != GRANT_TYPE:
            if not grant_type:
                raise ExchangeError("invalid_request", "missing grant_type")
            raise ExchangeError("unsupported_grant_type", f"only {GRANT_TYPE} is supported here")
        for name in ("resource", "scope"):  # a restriction we would silently ignore: refuse instead
            if name in fields:
                code = "invalid_target" if name == "resource" else "invalid_scope"
                raise ExchangeError(code, f"{name} is not supported: use audience / authorization_details")
        subject = _token_field(fields, "subject_token", max_token_bytes)
        actor = _token_field(fields, "actor_token", max_token_bytes)
        requested = fields.get("requested_token_type", JWT_TOKEN_TYPE)
        if requested not in TOKEN_TYPES:
            raise ExchangeError("invalid_request", "requested_token_type must be a JWT access token")
        audience = _short(fields, "audience")
        return cls(subject, actor, _grant_request(fields.get("authorization_details")), audience)


def _token_field(fields: Mapping[str, str], name: str, max_bytes: int) -> str:
    token = fields.get(name, "")
    if not token:
        raise ExchangeError("invalid_request", f"missing {name}")
    if len(token) > max_bytes:
        raise ExchangeError(BAD_TOKEN, f"{name} is larger than {max_bytes} bytes")
    token_type = fields.get(f"{name}_type", "")
    if token_type not in TOKEN_TYPES:
        raise ExchangeError("invalid_request", f"{name}_type must be {JWT_TOKEN_TYPE} or {ACCESS_TOKEN_TYPE}")
    return token


def _short(fields: Mapping[str, str], name: str) -> str:
    value = fields.get(name, "")
    if len(value) > MAX_SHORT_FIELD:
        raise ExchangeError("invalid_request", f"{name} is longer than {MAX_SHORT_FIELD} characters")
    return value


def _grant_request(details: str | None) -> GrantRequest:
    if details is None or not details.strip():
        return GrantRequest()
    if len(details) > MAX_DETAILS_BYTES:
        raise ExchangeError("invalid_authorization_details", f"larger than {MAX_DETAILS_BYTES} bytes")
    try:
        parsed = orjson.loads(details)
    except orjson.JSONDecodeError:
        raise ExchangeError("invalid_authorization_details", "authorization_details is not JSON") from None
    try:
        return GrantRequest.parse(parsed)
    except GrantError as exc:  # RFC 9396 §5: malformed authorization details
        raise ExchangeError("invalid_authorization_details", exc.message) from None


# The plan ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Parties:
    """The verified subject and actor; `parent` is the subject's task when it holds a task token."""

    subject: Principal
    actor: Principal
    parent: TaskClaims | None


@dataclass(frozen=True)
class ExchangePlan:
    """Everything the new task token will say, before policy has been asked."""

    parties: Parties
    task: TaskClaims  # the new task: id, chain, subject, actors, grant
    ttl_seconds: int
    issued_at: float
    unlisted: tuple[str, ...]  # requested tools the subject's token does not list

    @property
    def resource_type(self) -> str:
        """The Cedar entity type of the actor (the resource of `token.exchange`)."""
        return "Agent" if self.parties.actor.kind == "agent" else "Service"

    def policy_context(self) -> dict[str, Any]:
        """What the exchange adds to the policy context: `context.exchange`, and `context.delegation`
        when the subject is itself a task token (the request is made within the parent task)."""
        context: dict[str, Any] = {
            "exchange": {
                "tools": list(self.task.grant.tools),
                "unlisted_tools": list(self.unlisted),
                "egress": list(self.task.grant.egress),
                "delegated": self.parties.parent is not None,
                "depth": self.task.depth,
                "ttl_seconds": self.ttl_seconds,
            }
        }
        if self.parties.parent is not None:
            context["delegation"] = self.parties.parent.context()
        return context


# The caller's policy answer for a plan (the Decider's, recorded by the caller).
Authorize = Callable[[ExchangePlan], Decision]


@dataclass(frozen=True)
class IssuedTask:
    """A signed task token and what it grants."""

    token: IssuedToken
    task: TaskClaims
    decision_id: str
    subject_jti: str

    @property
    def parent_task(self) -> str:
        return self.task.chain[-2] if len(self.task.chain) > 1 else ""

    def response(self, now: float | None = None) -> dict[str, Any]:
        """The RFC 8693 §2.2.1 success body."""
        current = int(now if now is not None else time.time())
        return {
            "access_token": self.token.token,
            "issued_token_type": JWT_TOKEN_TYPE,
            "token_type": "Bearer",
            "expires_in": max(0, self.token.expires_at - current),
            "task": self.task.task_id,
        }

    def audit_details(self) -> dict[str, Any]:
        """Details for the `token.issued` audit event: ids and the grant, never the token."""
        return {
            "jti": self.token.jti,
            "expires_at": self.token.expires_at,
            "token_kind": self.token.kind,
            "task": self.task.task_id,
            "parent_task": self.parent_task,
            "task_chain": list(self.task.chain),
            "actors": list(self.task.actors),
            "tools": list(self.task.grant.tools),
            "egress": list(self.task.grant.egress),
            "budget": dict(self.task.grant.budget),
            "subject_jti": self.subject_jti,
            "decision_id": self.decision_id,
        }


# The exchange -----------------------------------------------------------------------------------------
class TokenExchange:
    """Turns verified subject and actor tokens into task tokens, under the configured limits."""

    def __init__(self, settings: Settings, keys: KeyStore, verifier: TokenVerifier) -> None:
        self._settings = settings
        self._keys = keys
        self._verifier = verifier

    def parties(self, request: ExchangeRequest) -> Parties:
        """Verify both tokens (signature, expiry, revocation incl. revoked tasks). Blocking for external
        issuers whose JWKS must be fetched: on an event loop use `parties_async`."""
        subject = self._verified(lambda: self._verifier.verify(request.subject_token), "subject_token")
        actor = self._verified(lambda: self._verifier.verify(request.actor_token), "actor_token")
        return self._check_parties(subject, actor)

    async def parties_async(
        self,
        request: ExchangeRequest,
        on_failure: Callable[[AuthenticationError, str], None] | None = None,
    ) -> Parties:
        """`parties` on an event loop; `on_failure` hears of a token that fails verification (with the
        token), e.g. to audit it, before ExchangeError is raised."""
        verified: list[Principal] = []
        for name, token in (("subject_token", request.subject_token), ("actor_token", request.actor_token)):
            try:
                verified.append(await self._verifier.verify_async(token))
            except AuthenticationError as exc:
                if on_failure is not None:
                    on_failure(exc, token)
                raise ExchangeError(BAD_TOKEN, f"{name}: {exc.message}") from None
        return self._check_parties(*verified)

    @staticmethod
    def _verified(verify: Callable[[], Principal], name: str) -> Principal:
        try:
            return verify()
        except AuthenticationError as exc:
            raise ExchangeError(BAD_TOKEN, f"{name}: {exc.message}") from None

    def _check_parties(self, subject: Principal, actor: Principal) -> Parties:
        if subject.kind not in SUBJECT_KINDS:
            raise ExchangeError(BAD_TOKEN, "subject_token must be a user's, service's or agent's token")
        try:
            parent = task_claims(subject, self._settings.issuer)
        except AuthenticationError as exc:
            raise ExchangeError(BAD_TOKEN, f"subject_token: {exc.message}") from None
        if actor.kind not in ACTOR_KINDS:
            raise ExchangeError(BAD_TOKEN, "actor_token must be an agent's or service's identity token")
        if any(name in actor.claims for name in ("task", "task_chain", "act")):
            # Whoever acts must speak for itself: a delegated token cannot become someone else's actor.
            raise ExchangeError(BAD_TOKEN, "actor_token must be a plain identity token, not a task token")
        if actor.tenant != subject.tenant:
            raise ExchangeError("invalid_target", "the actor belongs to another tenant than the subject")
        return Parties(subject, actor, parent)

    def plan(self, request: ExchangeRequest, parties: Parties, *, now: float | None = None) -> ExchangePlan:
        """Work out the new task (grant, chain, lifetime) within every limit; raises ExchangeError."""
        settings, parent = self._settings, parties.parent
        if request.audience and request.audience != settings.identity.audience:
            raise ExchangeError(
                "invalid_target", f"task tokens are issued for audience {settings.identity.audience!r}"
            )
        depth = (parent.depth if parent else 0) + 1
        if depth > settings.agents.max_delegation_depth:
            raise ExchangeError(
                BAD_TOKEN,
                f"delegation would reach depth {depth}; at most {settings.agents.max_delegation_depth} "
                "actors may be chained (agents.max_delegation_depth)",
            )
        try:
            grant = attenuate(parent.grant if parent else None, request.grant)
        except GrantError as exc:
            raise ExchangeError("invalid_scope", exc.message) from None
        issued_at = time.time() if now is None else now
        ttl = self._lifetime(request.grant.ttl_seconds, parties, issued_at)
        listed = parent.grant.tools if parent else tuple(parties.subject.claim_set("tools"))
        task_id = f"tsk_{secrets.token_hex(16)}"
        task = TaskClaims(
            task_id=task_id,
            chain=(*(parent.chain if parent else ()), task_id),
            subject=parties.subject.spiffe_id,
            actors=(parties.actor.spiffe_id, *(parent.actors if parent else ())),
            grant=grant,
            ancestor_budgets=(*parent.ancestor_budgets, dict(parent.grant.budget)) if parent else (),
        )
        return ExchangePlan(parties, task, ttl, issued_at, tuple(unlisted_tools(grant.tools, listed)))

    def _lifetime(self, requested: int | None, parties: Parties, now: float) -> int:
        agents, identity = self._settings.agents, self._settings.identity
        ceiling = min(agents.max_task_ttl_seconds, identity.max_ttl_seconds)
        remaining = int(parties.subject.expires_at - now)  # floor: the new exp is never past the subject's
        whose = "the parent task's" if parties.parent else "the subject token's"
        if remaining < 1:
            raise ExchangeError(BAD_TOKEN, f"subject_token: {whose} lifetime is over")
        if requested is None:
            return min(agents.default_task_ttl_seconds, ceiling, remaining)
        if requested > ceiling:
            raise ExchangeError(
                "invalid_scope", f"ttl_seconds {requested} exceeds the maximum task lifetime {ceiling}"
            )
        if requested > remaining:
            raise ExchangeError(
                "invalid_scope", f"ttl_seconds {requested} exceeds {whose} remaining lifetime ({remaining}s)"
            )
        return requested

    def issue(self, plan: ExchangePlan, decision_id: str) -> IssuedTask:
        """Sign the task token of an authorized plan."""
        subject, task = plan.parties.subject, plan.task
        claims: dict[str, Any] = {"tools": list(task.grant.tools)}
        if "models" in subject.claims:
            claims["models"] = subject.claim_set("models")
        # The grant's tools travel as the ordinary `tools` claim; the rest are reserved task claims.
        task_part = {key: value for key, value in task.grant.to_claims().items() if key != "tools"}
        task_part.update(
            {"task": task.task_id, "task_chain": list(task.chain), "act": act_claim(task.actors)}
        )
        if task.ancestor_budgets:  # a parent's budget bounds the calls of all its descendants
            task_part["ancestor_budgets"] = [dict(budget) for budget in task.ancestor_budgets]
        issued = issue_token(
            self._keys,
            subject=task.subject,
            issuer=self._settings.issuer,
            audience=self._settings.identity.audience,
            ttl_seconds=plan.ttl_seconds,
            max_ttl_seconds=self._settings.identity.max_ttl_seconds,
            claims=claims,
            task=task_part,
            now=plan.issued_at,
        )
        limit = self._settings.identity.max_token_bytes
        if len(issued.token) > limit:  # a token no replica would accept must not be handed out
            raise ExchangeError(
                "invalid_scope", f"the requested grant makes the token larger than {limit} bytes"
            )
        return IssuedTask(issued, task, decision_id, subject.jti)

    def exchange(self, request: ExchangeRequest, parties: Parties, authorize: Authorize) -> IssuedTask:
        """Plan, ask `authorize` (policy), and issue; raises ExchangeError (`invalid_target` on denial)."""
        plan = self.plan(request, parties)
        decision = authorize(plan)
        # Obligations cannot be carried out on a token exchange: only a plain allow issues a token.
        if decision.effect != "allow":
            raise ExchangeError(
                "invalid_target",
                f"policy does not allow this delegation to {parties.actor.spiffe_id} "
                f"({decision.effect}: {', '.join(decision.reasons)})",
                decision_id=decision.id,
            )
        return self.issue(plan, decision.id)


__all__ = [
    "ACCESS_TOKEN_TYPE",
    "GRANT_TYPE",
    "JWT_TOKEN_TYPE",
    "Authorize",
    "ExchangeError",
    "ExchangePlan",
    "ExchangeRequest",
    "IssuedTask",
    "Parties",
    "TokenExchange",
]
