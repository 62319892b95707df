"""Redaction, tokenization and incremental (streamed) filtering of content."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import orjson
import pytest

from ztai.detect.base import Finding, Source
from ztai.detect.canary import CanaryDetector
from ztai.detect.inspector import Inspection, Inspector
from ztai.detect.redact import TokenVault, redact, restore, select_spans, span_hash
from ztai.detect.vault import SessionVault
from ztai.gateway.answer_stream import filter_sse
from ztai.gateway.content import StreamFilter, filter_completion, inspect_request

EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.]+")
KEY = re.compile(r"sk-[A-Za-z0-9]{20,}")


class RegexDetector:
    """A small, real detector for these tests: e-mail addresses (PII) and sk- keys (secrets)."""

    name = "regex"

    def scan(self, text: str, source: Source) -> list[Finding]:
        found = [Finding("pii", "EMAIL_ADDRESS", m.start(), m.end(), 0.9) for m in EMAIL.finditer(text)]
        found += [Finding("secrets", "OPENAI_API_KEY", m.start(), m.end(), 1.0) for m in KEY.finditer(text)]
        return found


INSPECTOR = Inspector([], detectors=[RegexDetector()])


def test_redact_uses_typed_numbered_placeholders_and_restore_reverses_them() -> None:
    text = "write to ana@example.org and bo@example.org, then ana@example.org again"
    vault = TokenVault()
    redacted, replaced = redact(text, INSPECTOR.scan(text, "user"), vault, restorable=True)
    assert redacted == "write to <EMAIL_ADDRESS_1> and <EMAIL_ADDRESS_2>, then <EMAIL_ADDRESS_1> again"
    assert len(replaced) == 3 and len(vault) == 2
    assert restore(redacted, vault) == text
    assert "ana@example.org" not in str(vault.export())  # sealed at rest


def test_offsets_stay_right_in_multibyte_text() -> None:
    text = "😀 naïve 日本語 mail ana@example.org 🚀 key sk-ABCDEFGHIJKLMNOPQRSTUV end"
    redacted, _ = redact(text, INSPECTOR.scan(text, "user"))
    assert redacted == "😀 naïve 日本語 mail <EMAIL_ADDRESS_1> 🚀 key <OPENAI_API_KEY_1> end"


def test_overlapping_findings_keep_the_more_specific_one() -> None:
    findings = [
        Finding("pii", "URL", 0, 30, 0.5),
        Finding("secrets", "BASIC_AUTH_URL", 5, 25, 1.0),
        Finding("pii", "EMAIL_ADDRESS", 40, 50, 0.9),
    ]
    assert [f.type for f in select_spans(findings)] == ["BASIC_AUTH_URL", "EMAIL_ADDRESS"]


def test_span_hash_is_keyed() -> None:
    assert span_hash("123-45-6789", b"k1") != span_hash("123-45-6789", b"k2")
    assert span_hash("123-45-6789", b"k1") == span_hash("123-45-6789", b"k1")


async def test_request_inspection_covers_every_message_and_applies_obligations() -> None:
    payload = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "support bot for ops@example.org"},
            {"role": "user", "content": [{"type": "text", "text": "my key is sk-ABCDEFGHIJKLMNOPQRSTUV"}]},
            {"role": "tool", "content": "customer: ana@example.org"},
        ],
    }
    content = await inspect_request(INSPECTOR, payload)
    assert [s.source for s in content.inspection.scanned] == ["user", "user", "tool_output"]
    context = content.inspection.context()
    assert context["pii_types"] == ["EMAIL_ADDRESS"] and context["secret_types"] == ["OPENAI_API_KEY"]
    assert await content.apply(payload, [], SessionVault()) is None  # no obligation: unchanged
    vault = SessionVault()
    body = await content.apply(payload, ["tokenize"], vault)
    assert body is not None
    forwarded = orjson.loads(body)
    assert "sk-ABC" not in body.decode() and "example.org" not in body.decode()
    assert forwarded["messages"][1]["content"][0]["text"] == "my key is <OPENAI_API_KEY_1>"
    assert restore(forwarded["messages"][2]["content"], vault.tokens) == "customer: ana@example.org"


async def test_tokenize_replaces_only_identifying_personal_data_with_the_real_detectors() -> None:
    """The shipped PII defaults: places, companies and languages stay; e-mail addresses and a named
    person's data go. Embedding inputs carry no PII detector by default."""
    inspector = Inspector(["pii", "secrets"])
    payload = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "Hotels in Paris near the Eiffel Tower? Apple reported revenue."},
            {
                "role": "user",
                "content": "Translate to French: my name is Maria Lopez, maria.lopez@example.com",
            },
        ],
    }
    content = await inspect_request(inspector, payload)
    context = content.inspection.context()
    assert "LOCATION" in context["pii_types"]
    assert context["pii_identifying_types"] == ["EMAIL_ADDRESS", "PERSON"]
    body = await content.apply(payload, ["tokenize"], SessionVault())
    assert body is not None
    forwarded = orjson.loads(body)["messages"]
    assert forwarded[0]["content"] == "Hotels in Paris near the Eiffel Tower? Apple reported revenue."
    assert forwarded[1]["content"] == "Translate to French: my name is <PERSON_1>, <EMAIL_ADDRESS_1>"


async def test_completion_output_is_scanned_redacted_and_the_callers_values_restored() -> None:
    vault = SessionVault()
    placeholder = vault.tokens.placeholder_for("EMAIL_ADDRESS", "ana@example.org")  # the caller's, from input
    answer = {
        "choices": [{"message": {"role": "assistant", "content": f"Mail {placeholder}; also bo@example.org"}}]
    }
    decided: list[Inspection] = []

    def decide(inspection: Inspection) -> bool:
        decided.append(inspection)
        return True

    body, inspection = await filter_completion(orjson.dumps(answer), INSPECTOR, decide, vault)
    content = orjson.loads(body)["choices"][0]["message"]["content"]
    assert content == "Mail ana@example.org; also <EMAIL_ADDRESS_2>"
    assert [f.type for f in inspection.findings] == ["EMAIL_ADDRESS"]


async def test_stream_filter_catches_a_secret_split_across_chunks() -> None:
    stream = StreamFilter(INSPECTOR, holdback=32, decide_output=lambda _: True, vault=SessionVault())
    deltas = ["Here is the key: sk-ABCDEF", "GHIJKLMNOP", "QRSTUVWXYZ and more text ", "that follows it."]
    released = "".join([await stream.feed(d) for d in deltas]) + await stream.flush()
    assert released == "Here is the key: <OPENAI_API_KEY_1> and more text that follows it."


async def test_stream_filter_delays_text_by_at_most_the_window() -> None:
    stream = StreamFilter(INSPECTOR, holdback=8, decide_output=lambda _: False, vault=SessionVault())
    assert await stream.feed("short") == ""
    assert await stream.feed(" text that is longer than the window") != ""


async def test_sse_stream_is_rewritten_event_by_event() -> None:
    def event(content: str | None, finish: str | None = None) -> bytes:
        delta = {} if content is None else {"content": content}
        body = {
            "id": "c1",
            "object": "chat.completion.chunk",
            "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return b"data: " + orjson.dumps(body) + b"\n\n"

    async def upstream() -> AsyncIterator[bytes]:
        for piece in [
            event("mail me at ana@exa"),
            event("mple.org please"),
            event(None, "stop"),
            b"data: [DONE]\n\n",
        ]:
            yield piece[:7]  # SSE events split at arbitrary byte boundaries
            yield piece[7:]

    released: list[int] = []

    async def before_release() -> None:
        released.append(1)

    stream = StreamFilter(INSPECTOR, holdback=16, decide_output=lambda _: True, vault=SessionVault())
    out = b"".join([chunk async for chunk in filter_sse(upstream(), stream, before_release)])
    texts = [
        orjson.loads(line[6:])["choices"][0]["delta"].get("content", "")
        for line in out.split(b"\n\n")
        if line.startswith(b"data: {")
    ]
    assert "".join(texts) == "mail me at <EMAIL_ADDRESS_1> please"
    assert out.endswith(b"data: [DONE]\n\n") and released


def test_canary_detector_finds_only_registered_canaries() -> None:
    canaries = CanaryDetector()
    token = canaries.issue("session-1")
    text = f"the secret reference is {token}, not ztc-00000000000000000000"
    findings = canaries.scan(text, "model_output")
    assert [(f.type, text[f.start : f.end]) for f in findings] == [("prompt_leak", token)]
    assert canaries.scan(text, "tool_output")[0].type == "canary_exfiltration"
    assert canaries.is_canary(token) and not canaries.is_canary("ztc-00000000000000000000")


def test_unknown_detector_names_fail_clearly() -> None:
    from ztai.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown detector"):
        Inspector(["nope"])


def test_canaries_are_one_per_session_and_shared_by_whoever_holds_the_key() -> None:
    key = b"k" * 32
    worker, other_worker = CanaryDetector(key), CanaryDetector(key)
    first = worker.issue("a")
    assert worker.issue("a") == first and worker.issue("b") != first
    assert other_worker.scan(f"leaked {first}", "tool_output")  # issued in one process, caught in another
    assert not CanaryDetector(b"x" * 32).scan(f"leaked {first}", "tool_output")  # another deployment
    forged = first[:14] + ("0" if first[14] != "0" else "1") + first[15:]
    assert not worker.is_canary(forged)


def test_add_canary_extends_the_system_prompt_or_adds_one() -> None:
    from ztai.gateway.content import add_canary

    with_system = {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    }
    body = orjson.loads(add_canary(with_system, "ztc-0123456789abcdef0123"))
    assert (
        body["messages"][0]["content"].startswith("Be brief.")
        and "ztc-0123456789abcdef0123" in body["messages"][0]["content"]
    )
    without = {"messages": [{"role": "user", "content": "hi"}]}
    body = orjson.loads(add_canary(without, "ztc-0123456789abcdef0123"))
    assert body["messages"][0]["role"] == "system" and len(body["messages"]) == 2


@pytest.mark.parametrize("chunk", [1, 3, 7, 16, 100])
async def test_a_streamed_private_key_is_held_until_its_end_line(chunk: int) -> None:
    """A PEM key is far longer than the hold-back window: it is held from BEGIN to END, then redacted."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from ztai.detect.inspector import load_detector

    key = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        .decode()
    )
    text = f"Here is the key:\n{key.strip()}\nKeep it safe; the rest of the answer follows with more words."
    stream = StreamFilter(
        Inspector([], detectors=[load_detector("secrets")]), 64, lambda _: True, SessionVault()
    )
    released = [await stream.feed(text[i : i + chunk]) for i in range(0, len(text), chunk)]
    released.append(await stream.flush())
    out = "".join(released)
    assert (
        out
        == "Here is the key:\n<PRIVATE_KEY_1>\nKeep it safe; the rest of the answer follows with more words."
    )
    assert not any(line in out for line in key.splitlines()[1:-1])
    # What came before the key went out long before the key's end arrived.
    assert "".join(released[: len(released) // 2]) == "Here is the key:\n"


def _chat_chunk(delta: dict[str, object], finish: str | None = None, index: int = 0) -> bytes:
    body = {"id": "c1", "object": "chat.completion.chunk", "model": "m"}
    body["choices"] = [{"index": index, "delta": delta, "finish_reason": finish}]
    return b"data: " + orjson.dumps(body) + b"\r\n\r\n"


async def _through(stream: StreamFilter, wire: list[bytes]) -> str:
    async def upstream() -> AsyncIterator[bytes]:
        for piece in wire:
            yield piece

    async def nothing() -> None:
        return None

    out = b"".join([chunk async for chunk in filter_sse(upstream(), stream, nothing)])
    texts = []
    for line in out.split(b"\n\n"):
        if line.startswith(b"data: {"):
            for choice in orjson.loads(line[6:])["choices"]:
                texts.append(choice["delta"].get("content") or "")
                for call in choice["delta"].get("tool_calls", []):
                    texts.append(call.get("function", {}).get("arguments", ""))
    return "".join(texts)


async def test_a_secret_split_at_every_boundary_never_leaks() -> None:
    """Every split point of the text into two deltas, and every split point of the wire bytes."""
    from ztai.detect.inspector import load_detector

    inspector = Inspector([], detectors=[load_detector("secrets"), load_detector("pii")])
    secret = "ghp_" + "Zk3v9QmT2xWb7LpR4nYc8HsD1fGj6KuE5aVo"
    text = f"use {secret} now"

    def make() -> StreamFilter:
        return StreamFilter(inspector, 64, lambda _: True, SessionVault())

    for split in range(len(text) + 1):
        wire = [_chat_chunk({"content": text[:split]}), _chat_chunk({"content": text[split:]})]
        wire += [_chat_chunk({}, "stop"), b"data: [DONE]\r\n\r\n"]
        assert await _through(make(), wire) == "use <GITHUB_TOKEN_1> now", split
        calls = [
            _chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": part}}]})
            for part in (text[:split], text[split:])
        ]
        assert await _through(make(), [*calls, b"data: [DONE]\r\n\r\n"]) == "use <GITHUB_TOKEN_1> now", split
    wire = b"".join([_chat_chunk({"content": text}), _chat_chunk({}, "stop"), b"data: [DONE]\r\n\r\n"])
    for split in range(1, len(wire)):
        assert await _through(make(), [wire[:split], wire[split:]]) == "use <GITHUB_TOKEN_1> now", split


async def test_restored_values_in_tool_call_arguments_are_json_escaped() -> None:
    vault = SessionVault()
    placeholder = vault.tokens.placeholder_for("PERSON", 'Ana "the boss" Lopez\\')
    arguments = orjson.dumps({"to": placeholder}).decode()
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}
    answer = {"choices": [{"message": {"role": "assistant", "content": None, "tool_calls": [call]}}]}
    body, _ = await filter_completion(orjson.dumps(answer), INSPECTOR, lambda _: False, vault)
    restored = orjson.loads(body)["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    assert orjson.loads(restored) == {"to": 'Ana "the boss" Lopez\\'}


async def test_a_large_request_is_scanned_off_the_event_loop_and_bounded() -> None:
    import threading

    from ztai.errors import PayloadTooLarge
    from ztai.gateway.scanning import OFF_LOOP_CHARS

    threads: list[str] = []

    class Recording(RegexDetector):
        def scan(self, text: str, source: Source) -> list[Finding]:
            threads.append(threading.current_thread().name)
            return super().scan(text, source)

    inspector = Inspector([], detectors=[Recording()])
    await inspect_request(inspector, {"messages": [{"role": "user", "content": "short"}]})
    big = {"messages": [{"role": "user", "content": "ana@example.org " * (OFF_LOOP_CHARS // 8)}]}
    content = await inspect_request(inspector, big)
    assert threads[0] == threading.current_thread().name and threads[1].startswith("ztai-inspect")
    assert len(content.inspection.findings) == OFF_LOOP_CHARS // 8
    with pytest.raises(PayloadTooLarge, match="at most 1000 are inspected") as refused:
        await inspect_request(inspector, big, max_chars=1000)
    assert refused.value.status == 413 and refused.value.code == "input_too_large"
