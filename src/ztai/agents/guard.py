"""The agent guard: one code path for every proposed tool call and every content an agent reads.

The MCP gateway, `/v1/agents/authorize` + `/v1/agents/observe`, and `ztai agents replay` all call
`AgentGuard.authorize` and `AgentGuard.observe`:

    authorize: task grant (tools, argument constraints, egress) -> tool profile (annotations) ->
               value provenance + session state -> Decider (Cedar `tool.call`; grant problems are
               refusals) -> approval -> budget -> one decision record
    observe:   detectors (as tool_output) -> value keys (trusted / untrusted / suspicious) -> session
               taint -> audit of the findings

The guard knows nothing of HTTP; the audit recorder and the stores are handed in.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from ztai.agents.annotations import (
    ToolProfile,
    descriptive,
    is_free_text_argument,
    stricter,
    tool_profile,
)
from ztai.agents.approvals import ApprovalStore, call_hash, preview
from ztai.agents.provenance import Digest, Observed, argument_values, observe_text
from ztai.agents.session import (
    FLAG_SUSPICIOUS,
    FLAG_TRUSTED,
    FLAG_UNTRUSTED,
    MemorySessionStore,
    SessionState,
    SessionStore,
)
from ztai.audit.events import identity_event
from ztai.config import AgentSettings, McpServerSettings, Settings
from ztai.detect.base import Detector, Source
from ztai.detect.canary import CanaryDetector
from ztai.detect.injection import InjectionDetector, InjectionModel
from ztai.detect.inspector import Inspection, Inspector, audit_findings
from ztai.identity.egress import call_egress
from ztai.identity.task_tokens import TaskClaims, task_claims
from ztai.identity.tokens import Principal
from ztai.policy import (
    Decider,
    Decision,
    DecisionRequest,
    Entity,
    PolicyEngine,
    principal_context,
    principal_entity,
)

Recorder = Callable[[dict[str, Any]], Awaitable[object]]
MAX_INPUT_DEPTH = 8
MAX_OBSERVED_CHARS = 1_000_000
CLAIMED_USER_NOTE = (
    "source 'user' posted with a task token counts as untrusted tool output: the user's own request is "
    "trusted only when posted with the user's own token and the task token (docs/agents.md)"
)
_INLINE_CHECK_BYTES = 8192  # arguments up to this size (as JSON) are checked on the event loop


@dataclass(frozen=True)
class Observation:
    """What observing one content item found and did to the session."""

    event_id: str
    trusted: bool
    flagged: bool
    injection_score: int
    findings: list[dict[str, Any]]
    session: dict[str, Any]
    note: str | None = None  # why content was trusted less than its label claimed

    def to_json(self) -> dict[str, Any]:
        return {
            "observation_id": self.event_id,
            "trusted": self.trusted,
            "flagged": self.flagged,
            "injection_score": self.injection_score,
            "findings": self.findings,
            "session": self.session,
            "note": self.note,
        }


@dataclass
class AgentGuard:
    settings: AgentSettings
    issuer: str
    decider: Decider  # decides tool calls and writes their decision records
    record: Recorder  # makes an audit event durable (raises to fail closed): content observations
    sessions: SessionStore
    inspector: Inspector  # detectors for tool output (findings -> audit and session flag)
    injection: InjectionModel | None  # for suspicious windows (value provenance)
    key: bytes  # deployment secret: value-key hashes, call hashes
    approvals: ApprovalStore | None = None
    canaries: CanaryDetector | None = None
    _tools: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # server -> name -> def

    @classmethod
    def build(
        cls,
        settings: Settings,
        policy: Decider | PolicyEngine,
        record: Recorder,
        key: bytes,
        *,
        sessions: SessionStore | None = None,
        approvals: ApprovalStore | None = None,
        canaries: CanaryDetector | None = None,
    ) -> AgentGuard:
        """A guard with the configured detectors for tool output and an in-process session store unless
        another (Redis) is given. A bare engine gets a Decider that records through `record`."""
        agents = settings.agents
        inspector = Inspector(["injection", "secrets"])
        injection = next(d for d in inspector.detectors if isinstance(d, InjectionDetector))
        extra: list[Detector] = [canaries] if canaries is not None else []
        inspector = Inspector([], detectors=[*inspector.detectors, *extra])
        store = sessions or MemorySessionStore(
            ttl_seconds=agents.session_ttl_seconds,
            max_values=agents.max_session_values,
            count_ttl_seconds=agents.max_task_ttl_seconds,
        )
        decider = policy if isinstance(policy, Decider) else Decider(policy, record)
        return cls(
            agents,
            settings.issuer,
            decider,
            record,
            store,
            inspector,
            injection.model,
            key,
            approvals=approvals,
            canaries=canaries,
        )

    def __post_init__(self) -> None:
        self._digest = Digest(hashlib.blake2b(b"ztai value keys\0" + self.key).digest())
        self._call_key = hashlib.blake2b(b"ztai call hash\0" + self.key).digest()

    # Tools ----------------------------------------------------------------------------------------------
    def learn_tools(self, server: str, tools: list[dict[str, Any]]) -> None:
        """Remember a server's tool definitions (from its tools/list answer) for their annotations."""
        known = self._tools.setdefault(server, {})
        for tool in tools[:10_000]:
            if isinstance(tool, dict) and isinstance(tool.get("name"), str):
                known[tool["name"]] = tool

    def visible_tools(
        self, principal: Principal, server: str, tools: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """The tools of a tools/list answer that the principal's task grants (none without a task)."""
        task = task_claims(principal, self.issuer)
        if task is None:
            return []
        return [
            t for t in tools if isinstance(t.get("name"), str) and task.grant.allows_tool(server, t["name"])
        ]

    def profile(self, server: str, tool: str, definition: Mapping[str, Any] | None = None) -> ToolProfile:
        """The tool's profile from what its server declared (tools/list) and the operator's overrides, or
        inferred; a caller's `definition` can only make it stricter."""
        server_settings: McpServerSettings | None = self.settings.mcp_servers.get(server)
        overrides = server_settings.tools.get(tool) if server_settings is not None else None
        known = self._tools.get(server, {}).get(tool)
        if definition is None:
            return tool_profile(server, known, tool, overrides)
        base = tool_profile(server, known if known is not None else descriptive(definition), tool, overrides)
        return stricter(base, tool_profile(server, definition, tool))

    # Authorize ------------------------------------------------------------------------------------------
    async def authorize(
        self,
        principal: Principal,
        server: str,
        tool: str,
        arguments: dict[str, Any],
        *,
        route: str,
        ip: str = "",
        definition: Mapping[str, Any] | None = None,
    ) -> Decision:
        """Decide a proposed tool call; the decision is durable in the audit log before this returns."""
        task = task_claims(principal, self.issuer)
        profile = self.profile(server, tool, definition)
        serialized = orjson.dumps(arguments)  # once: its size bounds the work, the canary scan reads it
        problems, egress_hosts = await self._check_grant(task, server, tool, arguments, len(serialized))
        state, provenance = await self._provenance(principal, task, profile, arguments)
        context = self._context(principal, task, profile, arguments, serialized, state, provenance, route, ip)
        context["tool"]["granted"] = not problems
        context["tool"]["egress_hosts"] = sorted(egress_hosts)
        hashed_call = self.call_hash(server, tool, arguments)
        asked = self._decision_request(principal, task, profile, server, tool, context, hashed_call, problems)
        evaluated = self.decider.evaluate(asked)
        decision = evaluated
        if task is not None and decision.effect == "require_approval" and self.approvals is not None:
            decision = await self._approval(principal, task, server, tool, arguments, hashed_call, decision)
        if task is not None and decision.allowed:
            over = await self._spend_budget(principal.tenant, task)
            if over:
                decision = decision.amended("deny", [*decision.reasons, over], decision.approval_id)
        await self.decider.record(asked, decision, evaluated)
        return decision

    def _decision_request(
        self,
        principal: Principal,
        task: TaskClaims | None,
        profile: ToolProfile,
        server: str,
        tool: str,
        context: dict[str, Any],
        hashed_call: str,
        problems: list[str],
    ) -> DecisionRequest:
        """The call as the Decider sees it: the acting agent (the task's actor), the tool, the context,
        the grant's problems as refusals and the tool profile as notes."""
        if task is not None:
            actor = principal_entity(task.actor, "agent")
        else:
            actor = principal_entity(principal.spiffe_id, principal.kind)
        return DecisionRequest(
            tenant=principal.tenant,
            principal=actor,
            action="tool.call",
            resource=Entity("Tool", f"{server}/{tool}"),
            context=context,
            route=context["request"]["route"],
            fingerprint=hashed_call,
            details={
                "jti": principal.jti,
                "subject": principal.spiffe_id,
                "task": task.task_id if task else "",
                "call_hash": hashed_call,
                "ip": context["network"]["ip"],
                "provenance": {k: context["tool"][k] for k in _PROVENANCE_KEYS},
            },
            # The grant is final: a call outside it is denied whatever policy says, and no approval (not
            # even one already given for this exact call) is looked up or consumed for it.
            refusals=tuple(problems),
            notes=tuple(profile.reasons()),
        )

    async def _check_grant(
        self, task: TaskClaims | None, server: str, tool: str, arguments: Mapping[str, Any], size: int
    ) -> tuple[list[str], set[str]]:
        """Why the call is outside the task's grant, and the hosts its arguments reach. A call with much
        text, or with pattern constraints, is read in a worker thread (RE2 matches without the GIL), so
        the event loop keeps serving other requests meanwhile."""

        def check() -> tuple[list[str], set[str]]:
            egress = call_egress(arguments)
            if task is None:
                return ["no task token: use token exchange"], egress.hosts
            return task.grant.check_call(server, tool, arguments, egress), egress.hosts

        patterns = task is not None and task.grant.has_patterns(server, tool)
        if patterns or size > _INLINE_CHECK_BYTES:
            return await asyncio.to_thread(check)
        return check()

    def call_hash(self, server: str, tool: str, arguments: Mapping[str, Any]) -> str:
        """A keyed hash naming one exact call (server, tool, arguments): approvals match retries by it."""
        return call_hash(self._call_key, server, tool, arguments)

    async def _provenance(
        self,
        principal: Principal,
        task: TaskClaims | None,
        profile: ToolProfile,
        arguments: Mapping[str, Any],
    ) -> tuple[SessionState, dict[str, list[str]]]:
        if task is None:  # no session to look values up in
            return SessionState(), {"action": [], "untrusted": [], "suspicious": [], "unseen": []}
        by_argument = argument_values(arguments)
        sensitive = set(profile.sensitive_arguments)
        # Entities (e-mails, URLs, IBANs, phones) of every argument and whole values of sensitive ones are
        # looked up for untrusted, suspicious and unseen sources; whole values of other arguments that are
        # not free text (an amount, a password, a hotel) for suspicious ones too.
        hashed = {
            name: [
                (self._digest(keys), whole, _is_weak(keys))
                for keys in groups
                if (whole := name in sensitive or not _is_word(keys)) or not is_free_text_argument(name)
            ]
            for name, groups in by_argument.items()
        }
        every_key = {key for groups in hashed.values() for keys, _, _ in groups for key in keys}
        action_keys = self._digest(_action_words(profile.name))
        state, seen = await self.sessions.lookup(principal.tenant, task.root, every_key | action_keys)
        untrusted, suspicious, unseen = set(), set(), set()
        for name, groups in hashed.items():
            for keys, tracked, weak in groups:
                bits = 0
                for key in keys:
                    bits |= seen.get(key, 0)
                # The user's request clears a value, except a short one (a number, a short word) that an
                # instruction in untrusted content also names: "June 13" asked for does not make
                # "delete file 13" asked for.
                if bits & FLAG_SUSPICIOUS and not (bits & FLAG_TRUSTED and not weak):
                    suspicious.add(name)
                if bits & FLAG_TRUSTED or not tracked:
                    continue
                if bits & FLAG_UNTRUSTED:
                    untrusted.add(name)
                elif name in sensitive:
                    unseen.add(name)
        action_bits = [seen.get(key, 0) for key in action_keys]
        instructed = any(b & FLAG_SUSPICIOUS for b in action_bits) and not any(
            b & FLAG_TRUSTED for b in action_bits
        )
        return state, {
            "action": ["instructed"] if instructed else [],
            "untrusted": sorted(untrusted),
            "suspicious": sorted(suspicious),
            "unseen": sorted(unseen),
        }

    def _context(
        self,
        principal: Principal,
        task: TaskClaims | None,
        profile: ToolProfile,
        arguments: Mapping[str, Any],
        serialized: bytes,
        state: SessionState,
        provenance: dict[str, list[str]],
        route: str,
        ip: str,
    ) -> dict[str, Any]:
        context = principal_context(
            principal.tenant,
            "agent" if task else principal.kind,
            principal.claims,
            principal.issuer,
            ip=ip,
            route=route,
            size=len(serialized),
        )
        if task is not None:
            context["delegation"] = task.context()
        context["session"] = state.context()
        context["tool"] = {
            "server": profile.server,
            "name": profile.name,
            "granted": False,
            "read_only": profile.read_only,
            "destructive": profile.destructive,
            "open_world": profile.open_world,
            "idempotent": profile.idempotent,
            "inferred": bool(profile.inferred),
            "sensitive_args": list(profile.sensitive_arguments),
            "args_from_untrusted": provenance["untrusted"],
            "args_from_suspicious": provenance["suspicious"],
            "args_unseen": provenance["unseen"],
            "action_from_suspicious": bool(provenance["action"]),
            "egress_hosts": [],  # filled in by authorize, from the grant check's reading
        }
        context["input"] = _cedar_value(dict(arguments), 0)
        if self.canaries is not None:
            text = serialized.decode()
            context["content"]["canary"] = bool(self.canaries.scan(text, "model_output"))
        return context

    async def _approval(
        self,
        principal: Principal,
        task: TaskClaims,
        server: str,
        tool: str,
        arguments: Mapping[str, Any],
        call_hash: str,
        decision: Decision,
    ) -> Decision:
        """Allowed when an operator approved this exact call (the approval is used up), else held."""
        approvals = self.approvals
        assert approvals is not None
        used = await asyncio.to_thread(
            approvals.consume, tenant=principal.tenant, task_id=task.task_id, call_hash=call_hash
        )
        if used is not None:
            return decision.amended("allow", [*decision.reasons, f"approved:{used}"], used)
        approval = await asyncio.to_thread(
            lambda: approvals.request(
                tenant=principal.tenant,
                task_id=task.task_id,
                principal=task.actor,
                server=server,
                tool=tool,
                call_hash=call_hash,
                preview=preview(arguments),
                reasons=decision.reasons,
                decision_id=decision.id,
                ttl_seconds=self.settings.approval_ttl_seconds,
            )
        )
        return decision.amended("require_approval", decision.reasons, str(approval.id))

    async def _spend_budget(self, tenant: str, task: TaskClaims) -> str | None:
        """Count the call against the task and every ancestor (a parent's budget covers all its
        descendants); the reason it is refused, if some task of the chain has none left."""
        limits = task.chain_limits("calls")
        exhausted = await self.sessions.spend_call(tenant, limits)
        if exhausted is None:
            return None
        limit = dict(limits)[exhausted]
        if exhausted == task.task_id:
            return f"call budget of task {exhausted} exhausted ({limit} calls)"
        return f"call budget of ancestor task {exhausted} exhausted ({limit} calls, shared by its sub-tasks)"

    # Observe --------------------------------------------------------------------------------------------
    async def observe(
        self,
        principal: Principal,
        *,
        server: str,
        tool: str,
        content: str,
        route: str,
        source: str = "tool_output",
    ) -> Observation:
        """Record content entering the task session: scanned as tool output (documents as `document`),
        its values remembered with their provenance; findings audited (type and span hash, never values).

        Labels only tighten: content is trusted only where the operator's config (`trusted: true`) or
        the server's declared annotations (`openWorldHint: false`) say so. `source="user"` is the
        caller's claim and counts as tool output (the observation's note says so); the user's own
        request enters through `observe_user_request`."""
        note = None
        if source == "user":
            source, note = "claimed:user", CLAIMED_USER_NOTE
        detect_source: Source = "document" if source == "document" else "tool_output"
        origin = f"mcp:{server}/{tool}" if server else source
        trusted = self._trusted_tool(server, tool)
        return await self._observe(principal, content, route, detect_source, trusted, origin, note=note)

    async def observe_user_request(
        self, principal: Principal, content: str, *, route: str, by: str
    ) -> Observation:
        """Record the user's own request to the task of `principal` (a task token's) as trusted content.
        Only for paths where ztai itself knows the user asked: the replay of a recorded trace, and
        `/v1/agents/observe` posted with the task subject's own token (`by` names who posted it)."""
        return await self._observe(principal, content, route, "user", True, "user", by=by)

    async def _observe(
        self,
        principal: Principal,
        content: str,
        route: str,
        detect_source: Source,
        trusted: bool,
        origin: str,
        *,
        note: str | None = None,
        by: str = "",
    ) -> Observation:
        task = task_claims(principal, self.issuer)
        content = content[:MAX_OBSERVED_CHARS]
        inspection, observed = await asyncio.to_thread(self._scan, content, detect_source, trusted)
        findings = audit_findings(inspection, self.key)
        summary = inspection.context()
        flagged = not trusted and bool(summary["injection_flagged"])
        state = SessionState()
        if task is not None:
            state = await self.sessions.record(
                principal.tenant, task.root, observed, trusted=trusted, source=origin, flagged=flagged
            )
        details: dict[str, Any] = {
            "route": route,
            "task": task.task_id if task else "",
            "source": origin,
            "trusted": trusted,
            "flagged": flagged,
            "injection_score": summary["injection_score"],
            "findings": findings,
            "chars": len(content),
        }
        if note:
            details["note"] = note
        if by:
            details["by"] = by
        event = identity_event(
            "content.observed",
            tenant=principal.tenant,
            principal=task.actor if task else principal.spiffe_id,
            details=details,
        )
        await self.record(event)
        return Observation(
            event["id"], trusted, flagged, int(summary["injection_score"]), findings, state.context(), note
        )

    def _scan(self, content: str, source: Source, trusted: bool) -> tuple[Inspection, Observed]:
        """Detectors and value keys of one content item, in one worker thread: the injection detector's
        analysis (cached for this text) also gives the window scores of value provenance."""
        inspection = self.inspector.inspect([(source, content)])
        detector = next((d for d in self.inspector.detectors if isinstance(d, InjectionDetector)), None)
        model = detector.model if detector is not None else self.injection
        analysis = detector.analyze(content, source) if detector is not None and not trusted else None
        observed = observe_text(
            content,
            trusted=trusted,
            digest=self._digest,
            model=model,
            suspicion=self._suspicion(detector, model),
            analysis=analysis,
            instructions=self.settings.instruction_spans,
        )
        return inspection, observed

    def _suspicion(self, detector: InjectionDetector | None, model: InjectionModel | None) -> float:
        """The window probability from which values count as suspicious: configured, else the detector's
        flag threshold."""
        if self.settings.suspicion_threshold is not None:
            return self.settings.suspicion_threshold
        if detector is not None:
            return detector.threshold
        return model.threshold if model is not None else 1.0

    def _trusted_tool(self, server: str, tool: str) -> bool:
        server_settings = self.settings.mcp_servers.get(server)
        if server_settings is not None and server_settings.trusted:
            return True
        profile = self.profile(server, tool)
        return not profile.open_world and "open_world" not in profile.inferred


_PROVENANCE_KEYS = (
    "args_from_untrusted",
    "args_from_suspicious",
    "args_unseen",
    "action_from_suspicious",
    "egress_hosts",
)


def _is_word(keys: set[str]) -> bool:
    return all(key.startswith("w:") for key in keys)


_NAME_PARTS = re.compile(r"[A-Za-z][a-z]+|[A-Z]+(?![a-z])")
_NAME_STOPWORDS = frozenset({"the", "and", "for", "from", "with", "all", "new", "api", "tool", "via"})


def _action_words(tool: str) -> set[str]:
    """Value keys of the words of a tool's name (`create_calendar_event`: create, calendar, event)."""
    words = {w.lower() for w in _NAME_PARTS.findall(tool[:128])}
    return {"w:" + w for w in words if len(w) >= 3 and w not in _NAME_STOPWORDS}


def _is_weak(keys: set[str]) -> bool:
    """A value too short to be told apart from a coincidence: a number of up to 4 digits or one word
    of up to 4 characters."""
    return all(key.startswith("w:") and " " not in key and len(key) <= 2 + 4 for key in keys)


def _cedar_value(value: Any, depth: int) -> Any:
    """Arguments as Cedar values: no nulls or floats in Cedar (floats become strings), bounded depth."""
    if depth > MAX_INPUT_DEPTH:
        return "..."
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**63 else str(value)
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else repr(value)
    if isinstance(value, Mapping):
        return {str(k): _cedar_value(v, depth + 1) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_cedar_value(v, depth + 1) for v in value if v is not None]
    return str(value)
