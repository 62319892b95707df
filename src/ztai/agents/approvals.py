"""Held tool calls: approvals requested by the agent guard, decided by a human, consumed by one retry.

A side-effecting call that policy holds (`require_approval`) becomes a `pending` row. An administrator
approves or denies it (admin API, `ztai approvals`); the agent retries the *same* call (same keyed hash of
server, tool and arguments) and the first retry after approval turns the row `used` — one approval, one
call. The store never holds the arguments: only that keyed hash and a short redacted preview for humans.

A row that is still `pending` or `approved` past its `expires_at` is reported as `expired` (never rewritten
on read); the one deadline covers both the decision and the retry.
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import Select, select, text, update

from ztai.audit.events import new_event_id, now_iso
from ztai.errors import Conflict, MalformedRequest, NotFound, SelfApproval
from ztai.store import Approval, Database, aware, rows_changed

STATUSES = ("pending", "approved", "denied", "used")
LIST_FILTERS = (*STATUSES, "expired", "all")
MAX_LIST = 1000
APPROVAL_ID = re.compile(r"apr_[0-9a-f]{24}")
_CALL_HASH = re.compile(r"[0-9a-f]{32,64}")
_OPEN = ("pending", "approved")  # states that expire
_ADVISORY_NAMESPACE = 0x7A7461  # PostgreSQL advisory locks of `request` (two-key space, own namespace)


class ApprovalStore:
    """Approvals in the store (synchronous; the gateway calls it through `asyncio.to_thread`)."""

    def __init__(self, database: Database, *, clock: Callable[[], datetime] | None = None) -> None:
        self._database = database
        self._clock = clock or (lambda: datetime.now(UTC))

    def request(
        self,
        *,
        tenant: str,
        task_id: str,
        principal: str,
        server: str,
        tool: str,
        call_hash: str,
        preview: str,
        reasons: list[str],
        decision_id: str,
        ttl_seconds: int,
    ) -> Approval:
        """The open (pending or approved, unexpired) approval for this call, or a new pending one.

        An agent retrying a held call gets the same approval back instead of piling up new ones."""
        _check_lengths(tenant=(tenant, 255), task_id=(task_id, 64), principal=(principal, 2048))
        _check_lengths(server=(server, 255), tool=(tool, 255), decision_id=(decision_id, 64))
        if not _CALL_HASH.fullmatch(call_hash):
            raise MalformedRequest("call_hash must be 32 to 64 lowercase hex digits")
        if ttl_seconds < 1:
            raise MalformedRequest("ttl_seconds must be positive")
        now = self._clock()
        with self._database.guarded("record the approval request") as session:
            if self._database.is_postgres:
                # Serialise requests for the same call across replicas (SQLite's BEGIN IMMEDIATE already
                # does): two retries racing must not both create a row.
                lock = int(call_hash[:8], 16) - 2**31
                session.execute(
                    text("SELECT pg_advisory_xact_lock(:ns, :key)"), {"ns": _ADVISORY_NAMESPACE, "key": lock}
                )
            existing = session.scalars(
                _for_call(tenant, task_id, call_hash)
                .where(Approval.status.in_(_OPEN), Approval.expires_at > now)
                .order_by(Approval.created_at)
                .limit(1)
            ).first()
            if existing is not None:
                return existing
            approval = Approval(
                id=f"apr_{secrets.token_hex(12)}",
                tenant=tenant,
                task_id=task_id,
                principal=principal,
                server=server,
                tool=tool,
                call_hash=call_hash,
                preview=preview[:2000],
                reasons=_reasons_json(reasons),
                decision_id=decision_id,
                status="pending",
                created_at=now,
                expires_at=now + timedelta(seconds=ttl_seconds),
                decided_at=None,
                decided_by="",
            )
            session.add(approval)
        return approval

    def consume(self, *, tenant: str, task_id: str, call_hash: str) -> str | None:
        """Turn the approved, unexpired approval of this call into `used`; its id, or None if none.

        The conditional UPDATE is the arbiter: of replicas racing for one approval, exactly one sees
        a row count of 1 (PostgreSQL re-checks the WHERE after the winner commits; SQLite serialises)."""
        now = self._clock()
        with self._database.guarded("consume the approval") as session:
            candidates = session.scalars(
                select(Approval.id)
                .where(
                    Approval.tenant == tenant, Approval.task_id == task_id, Approval.call_hash == call_hash
                )
                .where(Approval.status == "approved", Approval.expires_at > now)
                .order_by(Approval.created_at)
                .limit(5)
            ).all()
            for approval_id in candidates:
                claimed = rows_changed(
                    session,
                    update(Approval)
                    .where(
                        Approval.id == approval_id, Approval.status == "approved", Approval.expires_at > now
                    )
                    .values(status="used")
                    .execution_options(synchronize_session=False),
                )
                if claimed == 1:
                    return approval_id
        return None

    def get(self, tenant: str | None, approval_id: str) -> Approval:
        """The approval `approval_id` (of `tenant`, unless None); NotFound otherwise."""
        if not APPROVAL_ID.fullmatch(approval_id):
            raise NotFound(f"no approval {approval_id[:64]!r}")
        now = self._clock()
        with self._database.guarded("read the approval", write=False) as session:
            approval = session.scalars(_by_id(tenant, approval_id)).first()
        if approval is None:
            raise NotFound(f"no approval {approval_id}")
        return _reported(approval, now)

    def list(
        self, tenant: str | None, status: str | None = "pending", limit: int = 100
    ) -> builtins.list[Approval]:
        """Approvals newest first, filtered by status (`expired`, or `all`/None for every row)."""
        if status is not None and status not in LIST_FILTERS:
            raise MalformedRequest(f"status must be one of {', '.join(LIST_FILTERS)}")
        if not 1 <= limit <= MAX_LIST:
            raise MalformedRequest(f"limit must be between 1 and {MAX_LIST}")
        now = self._clock()
        query = select(Approval).order_by(Approval.created_at.desc(), Approval.id).limit(limit)
        if tenant is not None:
            query = query.where(Approval.tenant == tenant)
        if status == "expired":
            query = query.where(Approval.status.in_(_OPEN), Approval.expires_at <= now)
        elif status in _OPEN:
            query = query.where(Approval.status == status, Approval.expires_at > now)
        elif status in STATUSES:
            query = query.where(Approval.status == status)
        with self._database.guarded("list approvals", write=False) as session:
            rows = session.scalars(query).all()
        return [_reported(row, now) for row in rows]

    def decide(self, tenant: str | None, approval_id: str, approve: bool, by: str) -> Approval:
        """Approve or deny a pending, unexpired approval as `by`.

        NotFound (404) for no such approval (or another tenant's), SelfApproval (403) when `by` made the
        held call, Conflict (409) when it was decided already or has expired."""
        if not APPROVAL_ID.fullmatch(approval_id):
            raise NotFound(f"no approval {approval_id[:64]!r}")
        _check_lengths(by=(by, 2048))
        now = self._clock()
        statement = (
            update(Approval)
            .where(Approval.id == approval_id, Approval.status == "pending", Approval.expires_at > now)
            .where(Approval.principal != by)
            .values(status="approved" if approve else "denied", decided_at=now, decided_by=by[:2048])
            .execution_options(synchronize_session=False)
        )
        if tenant is not None:
            statement = statement.where(Approval.tenant == tenant)
        with self._database.guarded("decide the approval") as session:
            changed = rows_changed(session, statement)
            approval = session.scalars(_by_id(tenant, approval_id)).first()
        if approval is None:
            raise NotFound(f"no approval {approval_id}")
        if changed != 1:
            if approval.principal == by:
                raise SelfApproval(
                    f"approval {approval_id} is for a call by {by}: it cannot decide it itself"
                )
            current = status_of(approval, now)
            if current == "expired":
                raise Conflict(f"approval {approval_id} has expired", code="approval_expired")
            raise Conflict(f"approval {approval_id} is already {current}", code="approval_decided")
        return approval


def _for_call(tenant: str, task_id: str, call_hash: str) -> Select[Approval]:
    return select(Approval).where(
        Approval.tenant == tenant, Approval.task_id == task_id, Approval.call_hash == call_hash
    )


def _by_id(tenant: str | None, approval_id: str) -> Select[Approval]:
    query = select(Approval).where(Approval.id == approval_id)
    # Another tenant's approval reads as absent, so its existence does not leak.
    return query.where(Approval.tenant == tenant) if tenant is not None else query


def _check_lengths(**fields: tuple[str, int]) -> None:
    for name, (value, limit) in fields.items():
        if not value or len(value) > limit:
            raise MalformedRequest(f"{name} must be 1 to {limit} characters")


def _reasons_json(reasons: list[str]) -> str:
    bounded = [reason[:200] for reason in reasons[:20]]
    encoded = orjson.dumps(bounded)
    while len(encoded) > 4000:  # the column's size; drop whole reasons rather than cut JSON
        bounded.pop()
        encoded = orjson.dumps(bounded)
    return encoded.decode()


def status_of(approval: Approval, now: datetime) -> str:
    """The status as reported: open rows past their deadline are `expired`."""
    if approval.status in _OPEN and aware(approval.expires_at) <= now:
        return "expired"
    return approval.status


def _reported(approval: Approval, now: datetime) -> Approval:
    # The row is detached (its session is closed): this changes what the caller sees, never the store.
    approval.status = status_of(approval, now)
    return approval


def approval_reasons(approval: Approval) -> list[str]:
    """The stored reasons (a JSON list) as a list; tolerant of an empty column."""
    try:
        value = orjson.loads(approval.reasons or "[]")
    except orjson.JSONDecodeError:
        return []
    return [str(item) for item in value] if isinstance(value, list) else []


def approval_json(approval: Approval) -> dict[str, Any]:
    """The public shape of an approval (admin API, `ztai approvals list --json`)."""
    return {
        "id": approval.id,
        "status": approval.status,
        "task": approval.task_id,
        "principal": approval.principal,
        "server": approval.server,
        "tool": approval.tool,
        "preview": approval.preview,
        "reasons": approval_reasons(approval),
        "decision_id": approval.decision_id,
        "created_at": aware(approval.created_at).isoformat(),
        "expires_at": aware(approval.expires_at).isoformat(),
        "decided_at": aware(approval.decided_at).isoformat() if approval.decided_at else None,
        "decided_by": approval.decided_by,
    }


def approval_event(approval: Approval, *, by: str, note: str = "", via: str) -> dict[str, Any]:
    """The audit event of a decision (`approval.approved` / `approval.denied`) on `approval`."""
    kind = f"approval.{approval.status}"
    return {
        "id": new_event_id(),
        "kind": kind,
        "time": now_iso(),
        "tenant": approval.tenant,
        "principal": by,
        "action": kind,
        "resource": f"Tool::{approval.server}/{approval.tool}",
        "effect": "allow",
        "reasons": [],
        "approval_id": approval.id,
        "task": approval.task_id,
        "requested_by": approval.principal,
        "decision_id": approval.decision_id,
        "call_hash": approval.call_hash,
        "note": note[:500],
        "via": via,
    }


# Call identity and preview ------------------------------------------------------------------------
def call_hash(key: bytes, server: str, tool: str, arguments: Any) -> str:
    """Keyed HMAC-SHA256 of the canonical JSON of (server, tool, arguments): matches a retried call
    without storing its arguments (and without letting anyone confirm guessed arguments)."""
    try:
        canonical = orjson.dumps(
            {"server": server, "tool": tool, "arguments": arguments}, option=orjson.OPT_SORT_KEYS
        )
    except (orjson.JSONEncodeError, TypeError):
        raise MalformedRequest("tool arguments are not representable as JSON") from None
    return hmac.new(key, b"ztai approval call\0" + canonical, hashlib.sha256).hexdigest()


PREVIEW_CHARS = 500
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]{1,64}@([A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})+)")
_URL = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]{0,15})://(?:[^/\s@]{0,256}@)?([A-Za-z0-9.-]{1,253})")
_NAME = re.compile(r"[^A-Za-z0-9_.\-]")


def preview(arguments: Any) -> str:
    """A short, redacted description of tool arguments for the human deciding.

    Names, types and lengths; emails show only their domain, URLs only scheme and host (the places
    data could leave to); booleans and null as they are. No other value is shown."""
    if isinstance(arguments, dict):
        text_ = ", ".join(
            f"{_name(key)}: {_describe(value, 1)}" for key, value in list(arguments.items())[:12]
        )
        if len(arguments) > 12:
            text_ += f", … {len(arguments) - 12} more"
    else:
        text_ = _describe(arguments, 1)
    return text_ if len(text_) <= PREVIEW_CHARS else text_[: PREVIEW_CHARS - 1] + "…"


def _name(key: object) -> str:
    name = _NAME.sub("?", str(key))
    return name if len(name) <= 40 else name[:39] + "…"


def _describe(value: Any, depth: int) -> str:
    if value is None or isinstance(value, bool):
        return orjson.dumps(value).decode()
    if isinstance(value, int | float):
        return type(value).__name__
    if isinstance(value, str):
        return _describe_string(value)
    if isinstance(value, list):
        if depth >= 3 or not value:
            return f"list({len(value)})"
        items = ", ".join(_describe(item, depth + 1) for item in value[:3])
        return f"list({len(value)})[{items}{', …' if len(value) > 3 else ''}]"
    if isinstance(value, dict):
        if depth >= 3 or not value:
            return f"object({len(value)})"
        fields = ", ".join(f"{_name(k)}: {_describe(v, depth + 1)}" for k, v in list(value.items())[:5])
        return f"object({len(value)}){{{fields}{', …' if len(value) > 5 else ''}}}"
    return type(value).__name__


def _describe_string(value: str) -> str:
    email = _EMAIL.fullmatch(value)
    if email:
        return f"email(@{email.group(1).lower()})"
    url = _URL.match(value)
    if url and not any(char.isspace() for char in value):
        return f"url({url.group(1).lower()}://{url.group(2).lower()})"
    description = f"str({len(value)})"
    hosts = _distinct(match.group(2).lower() for match in _URL.finditer(value))
    domains = _distinct("@" + match.group(1).lower() for match in _EMAIL.finditer(value))
    if hosts:
        description += f" urls[{_joined(hosts)}]"
    if domains:
        description += f" emails[{_joined(domains)}]"
    return description


def _distinct(values: Iterator[str]) -> list[str]:
    seen: dict[str, None] = {}
    for value in values:
        seen.setdefault(value, None)
    return list(seen)


def _joined(values: list[str]) -> str:
    shown = ", ".join(values[:4])
    return shown + (f", +{len(values) - 4}" if len(values) > 4 else "")
