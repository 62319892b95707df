"""The OpenAI-compatible API: chat completions (incl. streaming), embeddings, models."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ztai.audit.events import answer_event, identity_event
from ztai.detect.inspector import Inspection, Inspector, audit_findings
from ztai.detect.vault import SESSION_HEADER, SessionVault
from ztai.errors import MalformedRequest, PermissionDenied, UpstreamError, UpstreamResponseInvalid, ZtaiError
from ztai.gateway import metrics
from ztai.gateway.answer_stream import filter_sse
from ztai.gateway.content import (
    RequestContent,
    StreamFilter,
    add_canary,
    filter_completion,
    inspect_request,
)
from ztai.gateway.pipeline import (
    Call,
    admit,
    authenticate,
    collect_context,
    decide_call,
    decision_request,
    enforce,
    parse_json_object,
    start_recording,
)
from ztai.gateway.responses import JSONResponse, error_body, sse_error_event
from ztai.gateway.runtime import RouteInspectors, Runtime
from ztai.gateway.scanning import off_loop
from ztai.gateway.sse import SseDecoder
from ztai.gateway.upstream import Upstream, Upstreams, passed_headers, read_decoded, relay
from ztai.policy import Entity

MAX_MODEL_NAME = 256
FINDING_COST_CHARS = 20  # hashing one finding for the audit costs about as much as scanning 20 characters


async def chat_completions(request: Request) -> Response:
    return await _model_call(request, action="chat", path="/chat/completions", required="messages")


async def embeddings(request: Request) -> Response:
    return await _model_call(request, action="embed", path="/embeddings", required="input")


async def _model_call(request: Request, *, action: str, path: str, required: str) -> Response:
    runtime: Runtime = request.app.state.runtime
    body, principal = await admit(runtime.identity, runtime.settings.server, request)
    payload = parse_json_object(body, runtime.settings.server.max_json_depth)
    model = _model_name(payload)
    if required not in payload:
        raise MalformedRequest(f"missing required field {required!r}")
    upstream = runtime.upstreams.for_model(model)  # unknown model: 404 before any decision is needed
    vault = runtime.inspection.vault_for(principal, request.headers.get(SESSION_HEADER))  # bad header: 422
    call = Call(path, action, "Model", model, body=body, payload=payload, principal=principal)
    inspectors = runtime.inspection.routes.get(action)
    content = await _inspect_input(runtime.audit.finding_key, call, inspectors)
    decision = decide_call(runtime, request, call)
    if decision.allowed and content is not None:
        # Before the audit commit starts: on SQLite a session vault's transaction would otherwise queue
        # behind it. A vault that cannot be written refuses the request (503), recorded first.
        try:
            body = await content.apply(payload, decision.obligations, vault) or body
        except ZtaiError:
            await start_recording(runtime, call)
            raise
    recording = start_recording(runtime, call)
    if not decision.allowed or runtime.settings.audit.commit_before_forward:
        await recording
        enforce(call)
    if runtime.inspection.canaries is not None and action == "chat":
        session = request.headers.get(SESSION_HEADER) or call.decision_id
        body = add_canary(payload, runtime.inspection.canaries.issue(f"{principal.tenant}/{session}"))
    output = _OutputGuard(runtime, request, call, inspectors, vault)
    answer = _Answer(runtime, call, stream=payload.get("stream") is True)
    # Nothing is answered before the decision is durable. If the commit fails, its AuditUnavailable (503)
    # replaces whatever the upstream said: fail closed.
    try:
        response = await _forward(runtime.upstreams, upstream, call, body, answer, output)
    except ZtaiError:
        await recording
        answer.record()
        raise
    try:
        await recording
    except ZtaiError:
        if response.background is not None:  # an opened upstream stream: give its connection back
            await response.background()
        raise
    answer.record()
    response.headers["x-ztai-decision-id"] = call.decision_id
    return response


@dataclass
class _Answer:
    """What the upstream answered an allowed call: recorded as a `model.answered` event after its
    decision record (linked by the decision id), queued once known — a stream's usage at its end."""

    runtime: Runtime
    call: Call
    stream: bool
    status: int | None = None
    usage: dict[str, int] = field(default_factory=dict)
    error: str = ""
    streaming: bool = False  # the relayed stream records the answer when it ends
    recorded: bool = False

    def answered(self, status: int, body: bytes = b"") -> None:
        self.status = status
        if body:
            self.usage = _usage(_json_or_none(body))

    def record(self) -> None:
        if self.recorded or self.streaming or (self.status is None and not self.error):
            return
        self.recorded = True
        principal = self.call.principal
        assert principal is not None
        self.runtime.audit.writer.record_soon(
            answer_event(
                decision_id=self.call.decision_id,
                tenant=principal.tenant,
                principal=principal.spiffe_id,
                resource=f"Model::{self.call.resource_id}",
                status=self.status,
                usage=self.usage,
                stream=self.stream,
                error=self.error,
            )
        )

    async def counted(self, chunks: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
        """The stream unchanged; the usage its events report (`stream_options.include_usage`) is
        recorded when it ends."""
        self.streaming = True
        decoder: SseDecoder | None = SseDecoder()
        try:
            async for chunk in chunks:
                if decoder is not None:
                    try:
                        events = decoder.feed(chunk)
                    except UpstreamError:  # an event too large to read: relayed, not counted
                        decoder, events = None, []
                    for event in events:
                        if '"usage"' in event.data:
                            self.usage = _usage(_json_or_none(event.data.encode())) or self.usage
                yield chunk
        except ZtaiError as failed:
            self.error = failed.code
            raise
        finally:
            await chunks.aclose()
            self.streaming = False
            self.record()


def _usage(answer: Any) -> dict[str, int]:
    """The token counts an OpenAI-style answer reports (`usage`), as integers; {} when none."""
    usage = answer.get("usage") if isinstance(answer, dict) else None
    if not isinstance(usage, dict):
        return {}
    return {
        name: value
        for name in ("prompt_tokens", "completion_tokens", "total_tokens")
        if isinstance(value := usage.get(name), int) and not isinstance(value, bool)
    }


async def _inspect_input(
    finding_key: bytes, call: Call, inspectors: RouteInspectors | None
) -> RequestContent | None:
    if inspectors is None or inspectors.input is None:
        return None
    stage = time.perf_counter()
    content = await inspect_request(inspectors.input, call.payload, inspectors.max_input_chars)
    call.content = content.inspection.context()
    # One keyed hash per finding: thousands of them (a pasted address list) are hashed off the loop.
    findings = content.inspection.findings
    call.findings = await off_loop(
        len(findings) * FINDING_COST_CHARS,
        lambda: audit_findings(content.inspection, finding_key),
    )
    metrics.STAGE["inspect"].observe(time.perf_counter() - stage)
    return content


async def _forward(
    upstreams: Upstreams, upstream: Upstream, call: Call, body: bytes, answer: _Answer, output: _OutputGuard
) -> Response:
    stage = time.perf_counter()
    try:
        if answer.stream:
            streamed = await upstreams.open_stream(upstream, call.route, body)
            metrics.STAGE["upstream"].observe(time.perf_counter() - stage)
            return await _streamed_response(upstream, call, streamed, output, answer)
        result = await upstreams.post(upstream, call.route, body)
        metrics.STAGE["upstream"].observe(time.perf_counter() - stage)
        answer.answered(result.status, result.body)
        return await _answer(call, result.status, result.headers, result.body, output)
    except UpstreamError as failed:
        metrics.UPSTREAM_ERRORS.labels(upstream.name).inc()
        answer.error = answer.error or failed.code
        raise


async def _answer(
    call: Call, status: int, headers: dict[str, str], content: bytes, output: _OutputGuard
) -> Response:
    """A whole (decoded) answer, filtered when it is a success; one that cannot be read is refused."""
    if status == 200:
        if call.action == "chat":
            content = await output.filter_completion(content)
        elif not isinstance(_json_or_none(content), dict):
            raise UpstreamResponseInvalid("the upstream answer cannot be inspected: it is not a JSON object")
    elif status == 429 and not _is_openai_error(content):
        # Rate limited: always a 429 in OpenAI's error shape (SDKs raise RateLimitError and honour the
        # passed retry-after), whatever the provider's body looked like.
        message = f"upstream {call.resource_id!r} is rate limited; retry later"
        content = orjson.dumps(error_body(message, "rate_limit_error", "rate_limit_exceeded"))
        headers = {**headers, "content-type": "application/json"}
    # Provider-side failures are reported as a bad gateway; client errors (4xx) pass through as they are.
    return Response(content, status_code=status if status < 500 else 502, headers=headers)


def _is_openai_error(content: bytes) -> bool:
    body = _json_or_none(content)
    return isinstance(body, dict) and isinstance(body.get("error"), dict)


async def _streamed_response(
    upstream: Upstream, call: Call, streamed: aiohttp.ClientResponse, output: _OutputGuard, answer: _Answer
) -> Response:
    headers = passed_headers(streamed)
    content_type = headers.get("content-type", "").partition(";")[0].strip().lower()
    answer.answered(streamed.status)
    if streamed.status != 200 or content_type != "text/event-stream":
        # An error, or an upstream that answered a stream request with one whole body: read and check it.
        try:
            body = await read_decoded(streamed, upstream)
        finally:
            streamed.release()
        answer.answered(streamed.status, body)
        return await _answer(call, streamed.status, headers, body, output)
    chunks: AsyncGenerator[bytes, None] = answer.counted(relay(streamed, upstream))
    if output.active:
        chunks = output.filter_stream(chunks, upstream.max_event_bytes)
    try:
        # Up to the first event that goes out: a failure before it is a plain error response (502, 403).
        first = await anext(chunks, b"")
    except BaseException:
        await chunks.aclose()
        streamed.release()  # the inner reader may not have reached its own release
        raise
    return StreamingResponse(
        _sse_errors(first, chunks),
        status_code=200,
        headers=headers,
        background=BackgroundTask(streamed.release),
    )


async def _sse_errors(first: bytes, chunks: AsyncGenerator[bytes, None]) -> AsyncIterator[bytes]:
    """The stream after its first event; a failure once the headers are out ends it with an SSE error
    event the SDKs surface (OpenAI error shape)."""
    try:
        if first:
            yield first
        async for chunk in chunks:
            yield chunk
    except ZtaiError as failed:
        yield sse_error_event(failed)
    finally:
        await chunks.aclose()


def _json_or_none(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


class _OutputGuard:
    """Scans the model's answer, decides on its findings with the same policies (action and resource as
    the request, `context.content` from the output), audits them, and redacts or refuses accordingly."""

    def __init__(
        self,
        runtime: Runtime,
        request: Request,
        call: Call,
        inspectors: RouteInspectors | None,
        vault: SessionVault,
    ) -> None:
        self._runtime, self._request, self._call, self._vault = runtime, request, call, vault
        self._inspector = inspectors.output if inspectors is not None else None
        self._holdback = inspectors.holdback if inspectors is not None else 0
        self._pending: list[Call] = []

    @property
    def active(self) -> bool:
        return self._inspector is not None or len(self._vault) > 0 or self._vault.shared

    def decide(self, inspection: Inspection) -> bool:
        """True when the output must be redacted; raises PermissionDenied when it must be refused."""
        if not inspection.findings:
            return False
        output_call = dataclasses.replace(
            self._call,
            content=inspection.context(),
            findings=audit_findings(inspection, self._runtime.audit.finding_key),
        )
        decision = decide_call(self._runtime, self._request, output_call)
        self._pending.append(output_call)
        if not decision.allowed:
            enforce(output_call)
        # In an answer only `redact` removes what the model wrote; `tokenize` is about the caller's own
        # data going to the provider, and those values are given back (restored) either way.
        return "redact" in decision.obligations

    async def flush_audit(self) -> None:
        while self._pending:
            await start_recording(self._runtime, self._pending.pop(0))

    async def filter_completion(self, body: bytes) -> bytes:
        inspector = self._inspector or _NO_DETECTORS
        try:
            filtered, _ = await filter_completion(body, inspector, self.decide, self._vault)
        finally:
            await self.flush_audit()  # durable before the answer (or the refusal) goes out
        return filtered

    async def filter_stream(
        self, chunks: AsyncIterator[bytes], max_event_bytes: int
    ) -> AsyncGenerator[bytes, None]:
        """The filtered stream; a refusal (PermissionDenied) is raised once its audit record is durable."""
        stream = StreamFilter(self._inspector or _NO_DETECTORS, self._holdback, self.decide, self._vault)
        try:
            async for event in filter_sse(chunks, stream, self.flush_audit, max_event_bytes):
                yield event
        except PermissionDenied:
            await self.flush_audit()
            raise


_NO_DETECTORS = Inspector([])


def _model_name(payload: dict[str, Any]) -> str:
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise MalformedRequest("missing required field 'model' (a string)")
    if len(model) > MAX_MODEL_NAME:
        raise MalformedRequest("field 'model' is too long")
    return model


async def list_models(request: Request) -> Response:
    """Only the models the caller may use (each checked against policy as a `chat` request)."""
    runtime: Runtime = request.app.state.runtime
    principal = await authenticate(runtime.identity, request)
    call = Call("/models", "chat", "Model", "", principal=principal)
    call.context = collect_context(call, request)
    names = sorted(runtime.upstreams.by_model)
    asked = decision_request(call)
    decisions = runtime.decider.evaluate_many(
        [dataclasses.replace(asked, resource=Entity("Model", name)) for name in names]
    )
    allowed = [name for name, decision in zip(names, decisions, strict=True) if decision.allowed]
    await runtime.audit.writer.record(
        identity_event(
            "models.list",
            tenant=principal.tenant,
            principal=principal.spiffe_id,
            details={"allowed": allowed, "policy_revision": runtime.policy.revision},
        )
    )
    created = int(time.time())
    data = [
        {"id": name, "object": "model", "created": created, "owned_by": runtime.upstreams.by_model[name].name}
        for name in allowed
    ]
    return JSONResponse({"object": "list", "data": data})
