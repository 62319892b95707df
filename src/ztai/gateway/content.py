"""Content inspection on the model-call path: what goes into the model and what comes out.

Input: every message of the request (system, user, assistant, tool) is scanned; the findings become
`context.content` for the decision, and the decision's obligations say what to do: `redact` replaces
secrets and personal data with placeholders, `tokenize` does the same but keeps the values (encrypted:
for the request, or in the session's vault, ztai.detect.vault) so the caller gets them back in the
answer. Assistant messages' tool-call arguments are scanned as what the model wrote (`model_output`),
`tool` messages as `tool_output`. Output: the answer (text, refusals, tool-call arguments) is scanned too,
decided on again with the output's findings, and redacted per that decision; streamed answers are
filtered incrementally (`StreamFilter`, one per choice and tool call: ztai.gateway.answer_stream) with a
small hold-back window, so a value split across chunks is still caught. An answer that cannot be read is
refused, never passed on unread.

Large texts are scanned and redacted off the event loop (ztai.gateway.scanning), and a request's texts
are bounded in all (`detect.<route>.max_input_chars`, 413 beyond).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from ztai.detect.base import Finding, Source
from ztai.detect.canary import canary_instruction
from ztai.detect.inspector import Inspection, Inspector, ScannedText
from ztai.detect.redact import placeholders_in, redact, replacements, restore
from ztai.detect.secrets import open_private_key
from ztai.detect.vault import SessionVault
from ztai.errors import PayloadTooLarge, UpstreamResponseInvalid
from ztai.gateway.scanning import ScanTask, off_loop, scan_texts

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
            for container in _call_functions(message):  # what the model wrote as tool-call arguments
                yield "assistant", container, "arguments"
    if isinstance(payload.get("input"), str):
        yield "user", payload, "input"
    elif isinstance(payload.get("input"), list):
        items = payload["input"]
        for index, item in enumerate(items):
            if isinstance(item, str):
                yield "user", _ListSlot(items, index), "value"


def _call_functions(message: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The `function` objects of a message's (or a stream delta's) tool calls with string arguments, and a
    legacy `function_call`."""
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else []:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            yield function
    legacy = message.get("function_call")
    if isinstance(legacy, dict) and isinstance(legacy.get("arguments"), str):
        yield legacy


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
        size = sum(len(text) for _, _, text, _ in targets)
        items = await off_loop(
            size,
            lambda: [
                r for *_, text, found in targets for r in replacements(text, found, restorable=tokenize)
            ],
        )
        await vault.prepare(items)
        redacted = await off_loop(
            size,
            lambda: [
                redact(text, found, vault.tokens, restorable=tokenize)[0] for *_, text, found in targets
            ],
        )
        for (container, key, _, _), text in zip(targets, redacted, strict=True):
            container[key] = text
        return orjson.dumps(payload)


def _replaceable(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.detector in ("pii", "secrets")]


async def _redacted(text: str, findings: list[Finding], vault: SessionVault) -> str:
    """`text` with its secrets and personal data replaced (for good: the model wrote them)."""
    found = _replaceable(findings)
    if not found:
        return text
    await vault.prepare(await off_loop(len(text), lambda: replacements(text, found)))
    return await off_loop(len(text), lambda: redact(text, found, vault.tokens)[0])


async def _restored(text: str, vault: SessionVault, *, in_json: bool = False) -> str:
    """`text` with the caller's own values put back in place of the vault's placeholders; `in_json`:
    the text is inside a JSON string (tool-call arguments), so values go back JSON-escaped."""
    await vault.load(text)
    if not in_json:
        return await off_loop(len(text), lambda: restore(text, vault.tokens))
    for placeholder in placeholders_in(text):
        value = vault.tokens.value_of(placeholder)
        if value is not None:
            text = text.replace(placeholder, orjson.dumps(value).decode()[1:-1])
    return text


async def inspect_request(
    inspector: Inspector, payload: dict[str, Any], max_chars: int | None = None
) -> RequestContent:
    """Scan every text of the request; more than `max_chars` characters in all is refused (413)."""
    slots = [(role, container, key) for role, container, key in _text_slots(payload) if container[key]]
    total = sum(len(container[key]) for _, container, key in slots)
    if max_chars is not None and total > max_chars:
        raise PayloadTooLarge(
            f"the request carries {total} characters of text; at most {max_chars} are inspected",
            code="input_too_large",
        )
    tasks: list[ScanTask] = [
        (container[key], message_source(role), ("injection",) if role in _TRUSTED_ROLES else ())
        for role, container, key in slots
    ]
    content = RequestContent(Inspection())
    for (_, container, key), (text, source, _), findings in zip(
        slots, tasks, await scan_texts(inspector, tasks), strict=True
    ):
        scanned = ScannedText(source, text, findings)
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
TEXT_FIELDS = ("content", "refusal")
# What a filtered message (or stream delta) keeps: fields ztai inspects or that carry no model text.
# Anything else (`reasoning_content`, `audio` transcripts, extensions) is dropped rather than passed on
# unread.
_MESSAGE_FIELDS = frozenset({"role", "content", "refusal", "tool_calls", "function_call", "annotations"})


def only_inspected(message: dict[str, Any]) -> dict[str, Any]:
    """`message` (or a stream delta) without the fields ztai does not inspect (in place)."""
    for key in [k for k in message if k not in _MESSAGE_FIELDS]:
        del message[key]
    return message


def _answer_slots(message: dict[str, Any]) -> Iterator[tuple[dict[str, Any], str, bool]]:
    """(container, key, in_json) for every text the model wrote in a message or a stream delta: its
    content and refusal, and its tool calls' arguments (JSON text)."""
    for key in TEXT_FIELDS:
        if isinstance(message.get(key), str):
            yield message, key, False
    for function in _call_functions(message):
        yield function, "arguments", True


def unreadable(what: str) -> UpstreamResponseInvalid:
    return UpstreamResponseInvalid(f"the upstream answer cannot be inspected: {what}")


def _completion_choices(body: bytes) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The completion document and its choices; an answer of any other shape is refused (502)."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise unreadable("it is not JSON") from None
    choices = document.get("choices") if isinstance(document, dict) else None
    if not isinstance(choices, list):
        raise unreadable("it is not a chat completion (no 'choices' list)")
    if not all(isinstance(c, dict) and isinstance(c.get("message"), dict) for c in choices):
        raise unreadable("a choice carries no 'message' object")
    return document, choices


async def filter_completion(
    body: bytes, inspector: Inspector, decide_output: Callable[[Inspection], bool], vault: SessionVault
) -> tuple[bytes, Inspection]:
    """Filter a non-streamed chat completion: every choice's content, refusal and tool-call arguments.
    `decide_output(inspection)` returns whether to redact (and raises when the output must be refused).
    Raises UpstreamResponseInvalid for a body that is not a chat completion."""
    document, choices = _completion_choices(body)
    slots = [slot for choice in choices for slot in _answer_slots(only_inspected(choice["message"]))]
    tasks: list[ScanTask] = [(container[key], "model_output", ()) for container, key, _ in slots]
    found = await scan_texts(inspector, tasks)
    inspection = Inspection([ScannedText("model_output", t[0], f) for t, f in zip(tasks, found, strict=True)])
    redact_output = decide_output(inspection)
    for (container, key, in_json), scanned in zip(slots, inspection.scanned, strict=True):
        text = await _redacted(scanned.text, scanned.findings, vault) if redact_output else scanned.text
        container[key] = await _restored(text, vault, in_json=in_json)
    for choice in choices:
        if choice.get("logprobs") is not None:
            choice["logprobs"] = None  # its tokens spell out the unfiltered text
    return orjson.dumps(document), inspection


class StreamFilter:
    """Filters one text of an SSE chat stream (a choice's content, or one tool call's arguments) with a
    hold-back window.

    Text is released only once it lies more than `holdback` characters behind the newest text and no
    finding overlaps the cut, so a secret split across chunks is still seen whole; a private key block
    (longer than any window) is held from its BEGIN line until its END line. The first token is delayed
    by at most the window (or until the stream ends). `in_json`: the text is JSON (tool-call arguments),
    so restored values are JSON-escaped.
    """

    def __init__(
        self,
        inspector: Inspector,
        holdback: int,
        decide_output: Callable[[Inspection], bool],
        vault: SessionVault,
        *,
        in_json: bool = False,
    ) -> None:
        self._inspector = inspector
        self._holdback = holdback
        self._decide_output = decide_output  # True: redact; raises when the output must be refused
        self._vault = vault
        self._in_json = in_json
        self._pending = ""
        self._holds_keys = "secrets" in inspector.names

    def fork(self, *, in_json: bool) -> StreamFilter:
        """A fresh filter with the same detectors, window, decision and vault (for another text)."""
        return StreamFilter(
            self._inspector, self._holdback, self._decide_output, self._vault, in_json=in_json
        )

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    async def feed(self, delta: str) -> str:
        """Add a delta; return the text that can be released now (possibly empty)."""
        self._pending += delta
        if len(self._pending) <= self._holdback:
            return ""
        findings = await self._scan()
        cut = len(self._pending) - self._holdback
        for finding in findings:
            if finding.start < cut < finding.end:
                cut = finding.start
        if self._holds_keys and (opening := open_private_key(self._pending)) is not None:
            cut = min(cut, opening)  # a private key block is released only once it is whole
        cut = self._safe_cut(cut)
        return await self._release(cut, [f for f in findings if f.end <= cut])

    async def flush(self) -> str:
        if not self._pending:
            return ""
        return await self._release(len(self._pending), await self._scan())

    async def _scan(self) -> list[Finding]:
        return (await scan_texts(self._inspector, [(self._pending, "model_output", ())]))[0]

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
        return await _restored(text, self._vault, in_json=self._in_json)
