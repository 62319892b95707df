"""Replay recorded agent traces through the guard: the same decisions the live gateway would make.

A trace (one JSON object per line; format in docs/agents.md):

    {"id": str, "user_prompt": str, "principal": str,
     "tools": [{"name", "description", "inputSchema", "annotations"?, "_meta"?}],
     "events": [{"type": "tool_call", "name", "arguments"} | {"type": "tool_result", "name", "content"}]}

Each trace runs as its own task: `principal` is the subject, a replay agent the actor, and the task grants
every tool the trace lists (egress to any host), so what decides is policy, annotations and session taint.
The user prompt enters the session as trusted content, tool results as untrusted unless their tool says
`openWorldHint: false`. For every tool call one result is produced: `{"trace", "index", "effect",
"reasons"}` (`index` is the event's position in `events`).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from ztai.agents.guard import AgentGuard
from ztai.errors import MalformedRequest, ZtaiError
from ztai.identity.grants import TaskGrant
from ztai.identity.spiffe_ids import parse_spiffe_id
from ztai.identity.task_tokens import act_claim
from ztai.identity.tokens import Principal

REPLAY_SERVER = "replay"
MAX_TRACE_EVENTS = 10_000


@dataclass(frozen=True)
class Trace:
    id: str
    user_prompt: str
    principal: str
    tools: list[dict[str, Any]]
    events: list[dict[str, Any]]

    @classmethod
    def parse(cls, line: str | bytes) -> Trace:
        try:
            data = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise MalformedRequest(f"trace is not valid JSON: {exc.msg}") from None
        if not isinstance(data, dict):
            raise MalformedRequest("trace must be a JSON object")
        for name, kind in (
            ("id", str),
            ("user_prompt", str),
            ("principal", str),
            ("tools", list),
            ("events", list),
        ):
            if not isinstance(data.get(name), kind):
                raise MalformedRequest(f"trace field {name!r} must be a {kind.__name__}")
        if len(data["events"]) > MAX_TRACE_EVENTS:
            raise MalformedRequest(f"trace has more than {MAX_TRACE_EVENTS} events")
        for index, event in enumerate(data["events"]):
            if not isinstance(event, dict) or event.get("type") not in ("tool_call", "tool_result"):
                raise MalformedRequest(f"event {index}: type must be tool_call or tool_result")
            if not isinstance(event.get("name"), str):
                raise MalformedRequest(f"event {index}: name must be a string")
            if event["type"] == "tool_call" and not isinstance(event.get("arguments", {}), dict):
                raise MalformedRequest(f"event {index}: arguments must be an object")
        return cls(data["id"], data["user_prompt"], data["principal"], data["tools"], data["events"])


def replay_principal(trace: Trace, issuer: str, trust_domain: str) -> Principal:
    """The task-token principal a trace runs as (the claims a token exchange would have signed)."""
    subject = parse_spiffe_id(trace.principal)
    task = "tsk_" + secrets.token_hex(16)
    names = [t["name"] for t in trace.tools if isinstance(t, dict) and isinstance(t.get("name"), str)]
    grant = TaskGrant(tools=tuple(f"{REPLAY_SERVER}/{name}" for name in names), egress=("*",))
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": subject.uri,
        "kind": subject.kind,
        "tenant": subject.trust_domain,
        "jti": secrets.token_hex(16),
        "iat": now,
        "exp": now + 3600,
        "task": task,
        "task_chain": [task],
        "act": act_claim([f"spiffe://{trust_domain}/agent/replay"]),
        **grant.to_claims(),
    }
    return Principal(
        spiffe_id=subject.uri,
        kind=subject.kind,
        name=subject.name,
        tenant=subject.trust_domain,
        issuer=issuer,
        jti=claims["jti"],
        expires_at=float(claims["exp"]),
        claims=claims,
    )


async def replay_trace(
    guard: AgentGuard, trace: Trace, *, issuer: str, trust_domain: str
) -> AsyncIterator[dict[str, Any]]:
    """The decision for every tool call of `trace`, in order."""
    principal = replay_principal(trace, issuer, trust_domain)
    guard.learn_tools(REPLAY_SERVER, trace.tools)
    definitions = {t.get("name"): t for t in trace.tools if isinstance(t, dict)}
    route = "replay"
    # ztai itself replays the trace, so its user prompt is the user's request (trusted).
    await guard.observe_user_request(principal, trace.user_prompt, route=route, by="replay")
    for index, event in enumerate(trace.events):
        name = event["name"]
        if event["type"] == "tool_result":
            content = event.get("content")
            text = content if isinstance(content, str) else orjson.dumps(content).decode()
            await guard.observe(principal, server=REPLAY_SERVER, tool=name, content=text, route=route)
            continue
        decision = await guard.authorize(
            principal,
            REPLAY_SERVER,
            name,
            event.get("arguments") or {},
            route=route,
            definition=definitions.get(name),
        )
        yield {"trace": trace.id, "index": index, "effect": decision.effect, "reasons": decision.reasons}


async def replay_lines(
    guard: AgentGuard, lines: Iterable[str | bytes], *, issuer: str, trust_domain: str
) -> AsyncIterator[dict[str, Any]]:
    """Replay every trace of a JSONL stream; a bad line yields an `error` result and the replay goes on."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            trace = Trace.parse(line)
            async for result in replay_trace(guard, trace, issuer=issuer, trust_domain=trust_domain):
                yield result
        except ZtaiError as exc:
            yield {"line": number, "error": exc.message}
