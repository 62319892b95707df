"""The answer path against a hostile upstream: the real app in-process (shipped detectors and policies)
in front of a scripted aiohttp provider that compresses, uses CRLF, streams several choices and tool
calls, splits values anywhere, sends garbage or oversize events. Nothing may pass uninspected."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from tests.loopback import in_process, serving
from ztai.config import load_settings
from ztai.gateway.runtime import Runtime
from ztai.gateway.sse import SseDecoder
from ztai.identity import KeyStore, issue_token

SECRET = "ghp_" + "Zk3v9QmT2xWb7LpR4nYc8HsD1fGj6KuE5aVo"
EMAIL = "maria.lopez@example.com"
MAX_RESPONSE, MAX_EVENT = 200_000, 8192
REDACT_PII = (
    '@id("redact-answer-pii")\n@obligation("redact")\n'
    'permit (principal, action == Action::"chat", resource is Model)\n'
    "when { !context.content.pii_types.isEmpty() && context.token.models.contains(resource.name) };\n"
)


@dataclass
class Provider:
    """Answers every request with the scripted status, headers and body chunks; records what it got."""

    url: str = ""
    status: int = 200
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "application/json"})
    chunks: list[bytes] = field(default_factory=list)
    seen: list[dict[str, Any]] = field(default_factory=list)
    accept_encoding: list[str] = field(default_factory=list)

    def answer(self, body: bytes, content_type: str = "application/json", encoding: str = "") -> None:
        self.headers = {"content-type": content_type}
        if encoding:
            self.headers["content-encoding"] = encoding
        self.chunks = [body]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(await request.json())
        self.accept_encoding.append(request.headers.get("accept-encoding", ""))
        response = web.StreamResponse(status=self.status, headers=self.headers)
        await response.prepare(request)
        for chunk in self.chunks:
            await response.write(chunk)
        await response.write_eof()
        return response


@pytest.fixture
async def provider() -> AsyncIterator[Provider]:
    scripted = Provider()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", scripted.handle)
    async with serving(app) as url:
        scripted.url = f"{url}/v1"
        yield scripted


@dataclass
class Gateway:
    http: httpx.AsyncClient
    runtime: Runtime
    home: Path

    def token(self) -> str:
        return issue_token(
            KeyStore.load(self.home / "data"),
            subject="spiffe://example.org/user/alice",
            issuer="spiffe://example.org/service/ztai",
            audience="ztai",
            ttl_seconds=300,
            max_ttl_seconds=3600,
            claims={"models": ["mock"]},
        ).token

    async def chat(self, text: str = "hi", **extra: Any) -> httpx.Response:
        payload = {"model": "mock", "messages": [{"role": "user", "content": text}], **extra}
        return await self.http.post(
            "/v1/chat/completions", json=payload, headers={"authorization": f"Bearer {self.token()}"}
        )


@pytest.fixture
async def gateway(ztai_home: Path, provider: Provider) -> AsyncIterator[Gateway]:
    config = ztai_home / "ztai.yaml"
    config.write_text(
        config.read_text().replace(
            "{base_url: 'http://127.0.0.1:9100/v1', models: [mock]}",
            f"{{base_url: '{provider.url}', models: [mock], max_response_bytes: {MAX_RESPONSE}, "
            f"max_event_bytes: {MAX_EVENT}}}",
        )
    )
    (ztai_home / "policies" / "redact-answer-pii.cedar").write_text(REDACT_PII)
    settings = load_settings(config)
    async with in_process(settings) as (http, app):
        yield Gateway(http, app.state.runtime, ztai_home)


def completion(message: dict[str, Any]) -> bytes:
    answer = {"id": "c1", "object": "chat.completion", "model": "mock", "choices": []}
    answer["choices"] = [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": "stop"}]
    return orjson.dumps(answer)


def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion.chunk", "model": "mock", "choices": choices}


def text_stream(*pieces: str, index: int = 0) -> list[dict[str, Any]]:
    events = [
        chunk([{"index": index, "delta": {"content": piece}, "finish_reason": None}]) for piece in pieces
    ]
    return [*events, chunk([{"index": index, "delta": {}, "finish_reason": "stop"}])]


def sse(events: list[dict[str, Any]], ending: str = "\n") -> bytes:
    lines = [f"data: {orjson.dumps(event).decode()}{ending}{ending}" for event in events]
    return ("".join(lines) + f"data: [DONE]{ending}{ending}").encode()


def streamed(response: httpx.Response) -> tuple[dict[tuple[int, int | str], str], list[dict[str, Any]]]:
    """What the client reassembles: text per (choice, 'content') and arguments per (choice, tool call)."""
    assert response.status_code == 200, response.text
    decoder = SseDecoder()
    events = decoder.feed(response.content) + decoder.close()
    assert events[-1].data == "[DONE]"
    out: dict[tuple[int, int | str], str] = {}
    documents = [orjson.loads(event.data) for event in events[:-1]]
    for document in documents:
        for choice in document.get("choices", []):
            delta = choice["delta"]
            if delta.get("content"):
                out[(choice["index"], "content")] = (
                    out.get((choice["index"], "content"), "") + delta["content"]
                )
            for call in delta.get("tool_calls", []):
                key = (choice["index"], call["index"])
                out[key] = out.get(key, "") + call.get("function", {}).get("arguments", "")
    return out, documents


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


ENCODERS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,  # the zlib-wrapped deflate HTTP means
    "deflate-raw": raw_deflate,  # what some servers send as "deflate"
}


# Compression -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding", sorted(ENCODERS))
async def test_a_compressed_answer_is_decoded_inspected_and_redacted(
    gateway: Gateway, provider: Provider, encoding: str
) -> None:
    body = completion({"content": f"the token is {SECRET}, mail {EMAIL}"})
    provider.answer(ENCODERS[encoding](body), encoding=encoding.removesuffix("-raw"))
    response = await gateway.chat()
    assert response.status_code == 200, response.text
    assert "content-encoding" not in response.headers
    content = response.json()["choices"][0]["message"]["content"]
    assert content == "the token is <GITHUB_TOKEN_1>, mail <EMAIL_ADDRESS_1>"


@pytest.mark.parametrize("encoding", sorted(ENCODERS))
async def test_a_compressed_stream_is_decoded_and_filtered(
    gateway: Gateway, provider: Provider, encoding: str
) -> None:
    stream = sse(text_stream("the token is ", SECRET[:10], SECRET[10:], " and more words to follow"))
    provider.answer(ENCODERS[encoding](stream), "text/event-stream", encoding.removesuffix("-raw"))
    response = await gateway.chat(stream=True)
    assert "content-encoding" not in response.headers
    texts, _ = streamed(response)
    assert texts == {(0, "content"): "the token is <GITHUB_TOKEN_1> and more words to follow"}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("encoding", ["br", "zstd", "x-unknown", "gzip, gzip"])
async def test_an_answer_in_an_encoding_ztai_cannot_read_is_refused(
    gateway: Gateway, provider: Provider, encoding: str, stream: bool
) -> None:
    provider.answer(completion({"content": SECRET}), "text/event-stream" if stream else "application/json")
    provider.headers["content-encoding"] = encoding
    response = await gateway.chat(stream=stream)
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "upstream_encoding_unsupported" and error["type"] == "upstream_error"
    assert SECRET not in response.text
    assert provider.seen[-1]  # it was asked; its answer never got through


async def test_the_provider_is_asked_only_for_encodings_ztai_decodes(
    gateway: Gateway, provider: Provider
) -> None:
    provider.answer(completion({"content": "fine"}))
    assert (await gateway.chat()).status_code == 200
    assert provider.accept_encoding == ["gzip, deflate"]


async def test_a_zip_bomb_stops_at_the_response_bound(gateway: Gateway, provider: Provider) -> None:
    bomb = gzip.compress(b'{"choices": [' + b" " * (50 * MAX_RESPONSE) + b"]}")
    assert len(bomb) < MAX_RESPONSE // 10
    provider.answer(bomb, encoding="gzip")
    response = await gateway.chat()
    assert response.status_code == 502 and response.json()["error"]["code"] == "upstream_response_too_large"
    provider.answer(gzip.compress(sse(text_stream("x" * 1000) * 400)), "text/event-stream", "gzip")
    response = await gateway.chat(stream=True)  # a stream is bounded as a whole too
    assert b"upstream_response_too_large" in response.content


@pytest.mark.parametrize(
    ("body", "encoding"),
    [
        (b"<html>502 Bad Gateway</html>", ""),
        (b'{"choices": "nope"}', ""),
        (b'{"object": "chat.completion"}', ""),
        (b'{"choices": [{"text": "no message object"}]}', ""),
        (b"[1, 2, 3]", ""),
        (gzip.compress(completion({"content": SECRET}))[:-12], "gzip"),  # truncated
        (b"\x1f\x8b not really gzip" + SECRET.encode(), "gzip"),
        (b"", "deflate"),
    ],
)
async def test_an_answer_that_cannot_be_read_is_refused_never_passed_on(
    gateway: Gateway, provider: Provider, body: bytes, encoding: str
) -> None:
    provider.answer(body, encoding=encoding)
    response = await gateway.chat()
    assert response.status_code == 502, response.text
    assert response.json()["error"]["code"] == "upstream_response_invalid"
    assert SECRET not in response.text and "html" not in response.text


async def test_a_broken_stream_event_is_refused(gateway: Gateway, provider: Provider) -> None:
    provider.answer(b"data: {not json " + SECRET.encode() + b"\n\n", "text/event-stream")
    first = await gateway.chat(stream=True)  # before anything went out: a plain 502
    assert first.status_code == 502 and first.json()["error"]["code"] == "upstream_response_invalid"
    good = sse(text_stream("a long enough opening text that goes out before the window fills up"))
    provider.answer(good.replace(b"data: [DONE]", b"data: {broken " + SECRET.encode()), "text/event-stream")
    later = await gateway.chat(stream=True)  # after the headers: the stream ends with an error event
    assert later.status_code == 200 and SECRET not in later.text
    events = SseDecoder().feed(later.content)
    assert orjson.loads(events[-1].data)["error"]["code"] == "upstream_response_invalid"


async def test_an_oversize_stream_event_is_refused(gateway: Gateway, provider: Provider) -> None:
    provider.answer(sse(text_stream("y" * (MAX_EVENT + 10))), "text/event-stream")
    response = await gateway.chat(stream=True)
    assert response.status_code == 502 and response.json()["error"]["code"] == "upstream_event_too_large"
    # One line that never ends is refused the same way, without waiting for it to end.
    provider.answer(b"data: " + b"z" * (2 * MAX_EVENT), "text/event-stream")
    response = await gateway.chat(stream=True)
    assert response.status_code == 502 and response.json()["error"]["code"] == "upstream_event_too_large"


# Line endings ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ending", ["\r\n", "\r", "\n"])
async def test_every_sse_line_ending_is_filtered(gateway: Gateway, provider: Provider, ending: str) -> None:
    stream = sse(
        text_stream(f"key {SECRET[:12]}", f"{SECRET[12:]} mail {EMAIL[:6]}", f"{EMAIL[6:]} done"), ending
    )
    provider.answer(stream, "text/event-stream")
    texts, _ = streamed(await gateway.chat(stream=True))
    assert texts == {(0, "content"): "key <GITHUB_TOKEN_1> mail <EMAIL_ADDRESS_1> done"}


# Several choices, tool calls ---------------------------------------------------------------------------
async def test_each_streamed_choice_is_filtered_and_stays_under_its_index(
    gateway: Gateway, provider: Provider
) -> None:
    first = ["the first choice says ", SECRET[:9], SECRET[9:], " then stops here"]
    second = ["and the second mails ", EMAIL[:5], EMAIL[5:], " for the record"]
    events = [
        chunk([{"index": 0, "delta": {"content": a}}, {"index": 1, "delta": {"content": b}}])
        for a, b in zip(first, second, strict=True)
    ]
    events += [chunk([{"index": 1, "delta": {}, "finish_reason": "stop"}])]  # choice 1 ends first
    events += [chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}])]
    provider.answer(sse(events), "text/event-stream")
    texts, documents = streamed(await gateway.chat(stream=True, n=2))
    assert texts == {
        (0, "content"): "the first choice says <GITHUB_TOKEN_1> then stops here",
        (1, "content"): "and the second mails <EMAIL_ADDRESS_1> for the record",
    }
    finished = [c["index"] for d in documents for c in d["choices"] if c.get("finish_reason")]
    assert finished == [1, 0]


async def test_streamed_tool_call_arguments_are_redacted_and_the_callers_values_restored(
    gateway: Gateway, provider: Provider
) -> None:
    provider.answer(completion({"content": "ok"}))
    await gateway.chat(f"write to {EMAIL}")  # the caller's value becomes <EMAIL_ADDRESS_1> for the model
    assert EMAIL not in orjson.dumps(provider.seen[-1]).decode()
    arguments = f'{{"to": "<EMAIL_ADDRESS_1>", "token": "{SECRET}", "note": "split anywhere"}}'
    pieces = [arguments[i : i + 7] for i in range(0, len(arguments), 7)]
    start = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "send", "arguments": ""}}
    events = [chunk([{"index": 0, "delta": {"role": "assistant", "tool_calls": [start]}}])]
    events += [
        chunk([{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": p}}]}}])
        for p in pieces
    ]
    events += [chunk([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}])]
    provider.answer(sse(events), "text/event-stream")
    texts, documents = streamed(await gateway.chat(stream=True))
    assert SECRET not in str(documents)
    # No session: the earlier request's placeholder is not this request's, so it stays as it is.
    expected = {"to": "<EMAIL_ADDRESS_1>", "token": "<GITHUB_TOKEN_1>", "note": "split anywhere"}
    assert orjson.loads(texts[(0, 0)]) == expected
    assert documents[0]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "send"


async def test_tool_call_arguments_get_the_callers_values_back(gateway: Gateway, provider: Provider) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "send", "arguments": ""}}
    call["function"]["arguments"] = f'{{"to": "<EMAIL_ADDRESS_1>", "token": "{SECRET}"}}'
    provider.answer(completion({"content": None, "tool_calls": [call]}))
    response = await gateway.chat(f"send the invoice to {EMAIL}")
    assert provider.seen[-1]["messages"][-1]["content"] == "send the invoice to <EMAIL_ADDRESS_1>"
    message = response.json()["choices"][0]["message"]
    assert orjson.loads(message["tool_calls"][0]["function"]["arguments"]) == {
        "to": EMAIL,
        "token": "<GITHUB_TOKEN_1>",
    }
    legacy = {"name": "send", "arguments": f'{{"token": "{SECRET}", "to": "<EMAIL_ADDRESS_1>"}}'}
    provider.answer(completion({"content": None, "function_call": legacy}))
    message = (await gateway.chat(f"send the invoice to {EMAIL}")).json()["choices"][0]["message"]
    assert orjson.loads(message["function_call"]["arguments"]) == {"token": "<GITHUB_TOKEN_1>", "to": EMAIL}


async def test_streamed_tool_call_arguments_get_the_callers_values_back(
    gateway: Gateway, provider: Provider
) -> None:
    arguments = '{"to": "<EMAIL_ADDRESS_1>"}'
    events = [
        chunk(
            [
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [
                            {
                                "index": 1,
                                "id": "c",
                                "type": "function",
                                "function": {"name": "f", "arguments": arguments[:9]},
                            }
                        ]
                    },
                }
            ]
        ),
        chunk(
            [{"index": 0, "delta": {"tool_calls": [{"index": 1, "function": {"arguments": arguments[9:]}}]}}]
        ),
        chunk([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]),
    ]
    provider.answer(sse(events), "text/event-stream")
    texts, _ = streamed(await gateway.chat(f"mail {EMAIL}", stream=True))
    assert orjson.loads(texts[(0, 1)]) == {"to": EMAIL}


# History -----------------------------------------------------------------------------------------------
async def test_tool_calls_in_the_history_are_redacted_before_the_provider_sees_them(
    gateway: Gateway, provider: Provider
) -> None:
    provider.answer(completion({"content": "done"}))
    history = [
        {"role": "user", "content": "deploy please"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "deploy", "arguments": f'{{"token": "{SECRET}"}}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": f"deployed; notified {EMAIL}"},
        {
            "role": "assistant",
            "content": None,
            "function_call": {"name": "f", "arguments": f'{{"t": "{SECRET}"}}'},
        },
    ]
    response = await gateway.http.post(
        "/v1/chat/completions",
        json={"model": "mock", "messages": history},
        headers={"authorization": f"Bearer {gateway.token()}"},
    )
    assert response.status_code == 200, response.text
    sent = provider.seen[-1]["messages"]
    assert SECRET not in orjson.dumps(sent).decode() and EMAIL not in orjson.dumps(sent).decode()
    assert orjson.loads(sent[1]["tool_calls"][0]["function"]["arguments"]) == {"token": "<GITHUB_TOKEN_1>"}
    assert sent[2]["content"] == "deployed; notified <EMAIL_ADDRESS_1>"
    assert orjson.loads(sent[3]["function_call"]["arguments"]) == {"t": "<GITHUB_TOKEN_1>"}


# Load --------------------------------------------------------------------------------------------------
async def test_the_revocation_list_stays_fresh_through_a_large_request(
    gateway: Gateway, provider: Provider
) -> None:
    """5,000 e-mail addresses (~100 KB) are scanned off the loop: the revocation refresher (every second;
    stale, so 503, after five) keeps its schedule meanwhile, and the next request is served."""
    import time

    provider.answer(completion({"content": "ok"}))
    large = " ".join(f"user{i}@example.com" for i in range(5000))
    revocations = gateway.runtime.identity.revocations
    started = time.monotonic()
    response = await gateway.chat(large)
    took = time.monotonic() - started
    assert response.status_code == 200, response.text
    assert (
        EMAIL not in orjson.dumps(provider.seen[-1]).decode()
        and "user4999@" not in orjson.dumps(provider.seen[-1]).decode()
    )
    age = time.monotonic() - revocations._fresh_at
    assert age < 2.5, (age, took)  # refreshed during the request, whatever it took
    assert (await gateway.chat("and a small one")).status_code == 200
    assert (await gateway.http.get("/readyz")).json()["checks"]["revocations"] == "ok"


async def test_a_request_with_more_text_than_the_route_inspects_is_refused(
    gateway: Gateway, provider: Provider
) -> None:
    provider.answer(completion({"content": "ok"}))
    limit = gateway.runtime.settings.detect.chat.max_input_chars
    response = await gateway.chat("word " * (limit // 5 + 1))
    assert response.status_code == 413 and response.json()["error"]["code"] == "input_too_large"
    assert not provider.seen


async def test_fields_ztai_does_not_inspect_are_dropped_not_passed_on(
    gateway: Gateway, provider: Provider
) -> None:
    provider.answer(
        completion({"content": "fine", "reasoning_content": SECRET, "audio": {"transcript": SECRET}})
    )
    response = await gateway.chat()
    assert response.status_code == 200 and SECRET not in response.text
    assert response.json()["choices"][0]["message"] == {"role": "assistant", "content": "fine"}
    events = text_stream("a text long enough to be released before the stream ends, surely")
    events[0]["choices"][0]["delta"]["reasoning_content"] = SECRET
    events[1]["choices"][0]["message"] = {"content": SECRET}
    events[1]["choices"][0]["logprobs"] = {"content": [{"token": SECRET}]}
    provider.answer(sse(events), "text/event-stream")
    response = await gateway.chat(stream=True)
    assert SECRET not in response.text


# The upstream's status and token usage, recorded after the decision ------------------------------------
async def answered(gateway: Gateway, decision_id: str) -> dict[str, Any]:
    """The `model.answered` event of a decision (queued after the answer, committed by the writer)."""
    for _ in range(500):
        for _seq, event in gateway.runtime.audit.log.tail(50):
            if event["kind"] == "model.answered" and event["decision_id"] == decision_id:
                return event
        await asyncio.sleep(0.01)
    raise AssertionError(f"no model.answered event for {decision_id}")


USAGE = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}


async def test_the_status_and_usage_of_an_answer_are_recorded(gateway: Gateway, provider: Provider) -> None:
    provider.answer(orjson.dumps({**orjson.loads(completion({"content": "fine"})), "usage": USAGE}))
    response = await gateway.chat()
    event = await answered(gateway, response.headers["x-ztai-decision-id"])
    assert (event["status"], event["usage"], event["stream"]) == (200, USAGE, False)
    assert event["principal"] == "spiffe://example.org/user/alice" and event["resource"] == "Model::mock"
    decisions = [e for _, e in gateway.runtime.audit.log.tail(50) if e["kind"] == "decision"]
    assert decisions[-1]["id"] == event["decision_id"]  # the decision record came first


async def test_the_usage_a_stream_reports_at_its_end_is_recorded(
    gateway: Gateway, provider: Provider
) -> None:
    events = [*text_stream("all ", "good"), chunk([]) | {"usage": USAGE}]
    provider.answer(sse(events), "text/event-stream")
    response = await gateway.chat(stream=True, stream_options={"include_usage": True})
    texts, _ = streamed(response)
    assert texts == {(0, "content"): "all good"}
    event = await answered(gateway, response.headers["x-ztai-decision-id"])
    assert (event["status"], event["usage"], event["stream"]) == (200, USAGE, True)


async def test_an_upstream_failure_is_recorded_with_its_status(gateway: Gateway, provider: Provider) -> None:
    provider.status = 500
    provider.answer(b'{"error": {"message": "down"}}')
    response = await gateway.chat()
    assert response.status_code == 502
    event = await answered(gateway, response.headers["x-ztai-decision-id"])
    assert (event["status"], event["usage"]) == (500, {})
