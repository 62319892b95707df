"""Content inspection on the model-call path: what goes into the model and what comes out.

Input: every message of the request (system, user, assistant, tool) is scanned; the findings become
`context.content` for the decision, and the decision's obligations say what to do: `redact` replaces
secrets and personal data with placeholders, `tokenize` does the same but keeps the values (encrypted:
for the request, or in the session's vault, ztai.detect.vault) so the caller gets them back in the
answer. Output: the answer is scanned too, decided on again with the output's findings, and redacted per
that decision; streamed answers are filtered incrementally with a small hold-back window, so a value
split across chunks is still caught.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from ztai.detect.base import Finding, Source
from ztai.detect.canary import canary_instruction
from ztai.detect.inspector import Inspection, Inspector, ScannedText
from ztai.detect.redact import redact, replacements, restore
from ztai.detect.secrets import open_private_key
from ztai.detect.vault import SessionVault

REDACTING_OBLIGATIONS = frozenset({"redact", "tokenize"})
_ROLE_SOURCES: dict[str, Source] = {
    "tool": "tool_output",
    "function": "tool_output",
    "assistant": "model_output",
}
_TRUSTED_ROLES = frozenset({"system", "developer"})  # the app's own instructions: no injection scoring


def message_source(role: str) -> Source:
    return _ROLE_SOURCES.get(role, "user")


def _text_slots(payload: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], str]]:
    """(role, container, key) for every text in the request: chat messages (string or text parts) or
    embedding inputs."""
    messages = payload.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                continue
            role = str(message.get("role", "user"))
            content = message.get("content")
            if isinstance(content, str):
                yield role, message, "content"
            elif isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        yield role, part, "text"
    if isinstance(payload.get("input"), str):
        yield "user", payload, "input"
    elif isinstance(payload.get("input"), list):
        items = payload["input"]
        for index, item in enumerate(items):
            if isinstance(item, str):
                yield "user", _ListSlot(items, index), "value"


class _ListSlot(dict[str, Any]):
    """Lets a string inside a list be read and replaced like a dict entry."""

    def __init__(self, items: list[Any], index: int) -> None:
        super().__init__(value=items[index])
        self._items, self._index = items, index

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self._items[self._index] = value


@dataclass
class RequestContent:
    """The inspected request: findings per text slot, ready to be redacted."""

    inspection: Inspection
    slots: list[tuple[dict[str, Any], str, ScannedText]] = field(default_factory=list)

    async def apply(
        self, payload: dict[str, Any], obligations: list[str], vault: SessionVault
    ) -> bytes | None:
        """Carry out redaction obligations on the payload; the new body, or None when nothing changed."""
        if not REDACTING_OBLIGATIONS & set(obligations):
            return None
        tokenize = "tokenize" in obligations
        targets = [
            (container, key, scanned.text, replaceable)
            for container, key, scanned in self.slots
            if (replaceable := _replaceable(scanned.findings))
        ]
        if not targets:
            return None
        await vault.prepare(
            item for *_, text, found in targets for item in replacements(text, found, restorable=tokenize)
        )
        for container, key, text, found in targets:
            container[key], _ = redact(text, found, vault.tokens, restorable=tokenize)
        return orjson.dumps(payload)


def _replaceable(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.detector in ("pii", "secrets")]


async def _redacted(text: str, findings: list[Finding], vault: SessionVault) -> str:
    """`text` with its secrets and personal data replaced (for good: the model wrote them)."""
    found = _replaceable(findings)
    if not found:
        return text
    await vault.prepare(replacements(text, found))
    return redact(text, found, vault.tokens)[0]


async def _restored(text: str, vault: SessionVault) -> str:
    """`text` with the caller's own values put back in place of the vault's placeholders."""
    await vault.load(text)
    return restore(text, vault.tokens)


def inspect_request(inspector: Inspector, payload: dict[str, Any]) -> RequestContent:
    content = RequestContent(Inspection())
    for role, container, key in _text_slots(payload):
        text = container[key]
        if not text:
            continue
        exclude = ("injection",) if role in _TRUSTED_ROLES else ()
        scanned = ScannedText(message_source(role), text, inspector.scan(text, message_source(role), exclude))
        content.inspection.scanned.append(scanned)
        content.slots.append((container, key, scanned))
    return content


def add_canary(payload: dict[str, Any], token: str) -> bytes:
    """Put the canary into the request's system prompt (a new first message when there is none)."""
    messages = payload.get("messages")
    if isinstance(messages, list):
        line = canary_instruction(token)
        first = messages[0] if messages else None
        if (
            isinstance(first, dict)
            and first.get("role") in _TRUSTED_ROLES
            and isinstance(first.get("content"), str)
        ):
            first["content"] = f"{first['content']}\n\n{line}"
        else:
            messages.insert(0, {"role": "system", "content": line})
    return orjson.dumps(payload)


# Output ------------------------------------------------------------------------------------------
async def filter_completion(
    body: bytes, inspector: Inspector, decide_output: Callable[[Inspection], bool], vault: SessionVault
) -> tuple[bytes, Inspection]:
    """Filter a non-streamed chat completion's message contents. `decide_output(inspection)` returns
    whether to redact (and raises when the output must be refused)."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body, Inspection()
    choices = document.get("choices") if isinstance(document, dict) else None
    if not isinstance(choices, list):
        return body, Inspection()
    messages: list[dict[str, Any]] = [
        c["message"] for c in choices if isinstance(c, dict) and isinstance(c.get("message"), dict)
    ]
    texts = [m for m in messages if isinstance(m.get("content"), str)]
    inspection = Inspection(
        [
            ScannedText("model_output", m["content"], inspector.scan(m["content"], "model_output"))
            for m in texts
        ]
    )
    redact_output = decide_output(inspection)
    for message, scanned in zip(texts, inspection.scanned, strict=True):
        text = await _redacted(scanned.text, scanned.findings, vault) if redact_output else scanned.text
        message["content"] = await _restored(text, vault)
    return orjson.dumps(document), inspection


class StreamFilter:
    """Filters the text deltas of an SSE chat stream with a hold-back window.

    Text is released only once it lies more than `holdback` characters behind the newest text and no
    finding overlaps the cut, so a secret split across chunks is still seen whole; a private key block
    (longer than any window) is held from its BEGIN line until its END line. The first token is delayed
    by at most the window (or until the stream ends).
    """

    def __init__(
        self,
        inspector: Inspector,
        holdback: int,
        decide_output: Callable[[Inspection], bool],
        vault: SessionVault,
    ) -> None:
        self._inspector = inspector
        self._holdback = holdback
        self._decide_output = decide_output  # True: redact; raises when the output must be refused
        self._vault = vault
        self._pending = ""
        self._holds_keys = "secrets" in inspector.names

    async def feed(self, delta: str) -> str:
        """Add a delta; return the text that can be released now (possibly empty)."""
        self._pending += delta
        if len(self._pending) <= self._holdback:
            return ""
        findings = self._inspector.scan(self._pending, "model_output")
        cut = len(self._pending) - self._holdback
        for finding in findings:
            if finding.start < cut < finding.end:
                cut = finding.start
        if self._holds_keys and (opening := open_private_key(self._pending)) is not None:
            cut = min(cut, opening)  # a private key block is released only once it is whole
        cut = self._safe_cut(cut)
        return await self._release(cut, [f for f in findings if f.end <= cut])

    async def flush(self) -> str:
        findings = self._inspector.scan(self._pending, "model_output")
        return await self._release(len(self._pending), findings)

    def _safe_cut(self, cut: int) -> int:
        # Never split a vault placeholder such as <EMAIL_ADDRESS_1>: restore needs it whole.
        opening = self._pending.rfind("<", 0, cut)
        if opening != -1 and ">" not in self._pending[opening:cut]:
            return opening
        return cut

    async def _release(self, cut: int, findings: list[Finding]) -> str:
        text, self._pending = self._pending[:cut], self._pending[cut:]
        if findings and self._decide_output(Inspection([ScannedText("model_output", text, findings)])):
            text = await _redacted(text, findings, self._vault)
        return await _restored(text, self._vault)


async def filter_sse(
    chunks: AsyncIterator[bytes], stream: StreamFilter, before_release: Callable[[], Awaitable[None]]
) -> AsyncIterator[bytes]:
    """Re-emit an OpenAI chat SSE stream with its content deltas passed through `stream`.

    `before_release` runs before each event goes out (it makes pending audit records durable)."""
    buffer = b""
    template: dict[str, Any] | None = None
    async for chunk in chunks:
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            async for out in _filter_event(event, stream, template):
                await before_release()
                yield out
            template = _template(event) or template
    if buffer.strip():
        async for out in _filter_event(buffer, stream, template):
            await before_release()
            yield out


def _template(event: bytes) -> dict[str, Any] | None:
    document = _event_json(event)
    if document is None:
        return None
    return {k: v for k, v in document.items() if k != "choices"}


def _event_json(event: bytes) -> dict[str, Any] | None:
    line = event.strip()
    if not line.startswith(b"data:") or line == b"data: [DONE]":
        return None
    try:
        document = orjson.loads(line[5:])
    except orjson.JSONDecodeError:
        return None
    return document if isinstance(document, dict) else None


async def _filter_event(
    event: bytes, stream: StreamFilter, template: dict[str, Any] | None
) -> AsyncIterator[bytes]:
    document = _event_json(event)
    if document is None:
        if event.strip() == b"data: [DONE]":
            rest = await stream.flush()
            if rest:
                yield _content_event(template, rest)
        yield event + b"\n\n"
        return
    choices = document.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        yield event + b"\n\n"
        return
    choice: dict[str, Any] = choices[0]
    delta: dict[str, Any] = choice["delta"] if isinstance(choice.get("delta"), dict) else {}
    finishing = choice.get("finish_reason") is not None
    if isinstance(delta.get("content"), str):
        released = await stream.feed(delta["content"])
        if finishing:
            released += await stream.flush()
        delta["content"] = released
        if not released and not finishing and set(delta) <= {"content"}:
            return  # all of it held back for now
    elif finishing:
        rest = await stream.flush()
        if rest:
            yield _content_event(document, rest)
    yield b"data: " + orjson.dumps(document) + b"\n\n"


def _content_event(template: dict[str, Any] | None, text: str) -> bytes:
    document = {k: v for k, v in (template or {}).items() if k != "choices"}
    document.setdefault("object", "chat.completion.chunk")
    document["choices"] = [{"index": 0, "delta": {"content": text}, "finish_reason": None}]
    return b"data: " + orjson.dumps(document) + b"\n\n"
