"""What the model provider sees when requests share a session vault: the real app in-process, in front
of a recording upstream (aiohttp) that answers with a scripted text."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from tests.loopback import in_process, serving
from ztai.config import load_settings
from ztai.gateway.runtime import Runtime
from ztai.identity import KeyStore, issue_token
from ztai.identity.task_tokens import act_claim

MARIA, JOHN = "maria.lopez@example.com", "john.smith@example.org"


@dataclass
class RecordingUpstream:
    url: str = ""
    seen: list[str] = field(default_factory=list)  # the user texts the provider received
    reply: str | None = None  # None: echo what it received

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        text = " | ".join(m["content"] for m in body["messages"] if m["role"] == "user")
        self.seen.append(text)
        answer = {
            "id": "c1",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": self.reply or text}}],
        }
        return web.json_response(answer)


@pytest.fixture
async def upstream() -> AsyncIterator[RecordingUpstream]:
    recorder = RecordingUpstream()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", recorder.handle)
    async with serving(app) as url:
        recorder.url = f"{url}/v1"
        yield recorder


@dataclass
class Client:
    http: httpx.AsyncClient
    home: Path
    runtime: Runtime

    def add_policy(self, name: str, text: str) -> None:
        (self.home / "policies" / name).write_text(text)
        self.runtime.reload_policies()

    def token(
        self, name: str, task: str | None = None, *, chain: tuple[str, ...] = (), agents: str = "b"
    ) -> str:
        """A token of user `name`; with `task`, a task token whose actors are `agents` (comma-separated,
        current actor first) and whose chain is `chain` (default: the task alone)."""
        extra: dict[str, Any] = {}
        if task is not None:
            actors = [f"spiffe://example.org/agent/{agent}" for agent in agents.split(",")]
            extra["task"] = {
                "task": task,
                "task_chain": list(chain or (task,)),
                "act": act_claim(actors),
            }
        return issue_token(
            KeyStore.load(self.home / "data"),
            subject=f"spiffe://example.org/user/{name}",
            issuer="spiffe://example.org/service/ztai",
            audience="ztai",
            ttl_seconds=300,
            max_ttl_seconds=3600,
            claims={"models": ["mock"]},
            **extra,
        ).token

    async def chat(self, token: str, *texts: str, session: str | None = None) -> str:
        headers = {"authorization": f"Bearer {token}"}
        if session is not None:
            headers["x-ztai-session"] = session
        messages = [{"role": "user", "content": text} for text in texts]
        response = await self.http.post(
            "/v1/chat/completions", json={"model": "mock", "messages": messages}, headers=headers
        )
        assert response.status_code == 200, response.text
        return str(response.json()["choices"][0]["message"]["content"])


@pytest.fixture
async def client(ztai_home: Path, upstream: RecordingUpstream) -> AsyncIterator[Client]:
    config = ztai_home / "ztai.yaml"
    config.write_text(config.read_text().replace("http://127.0.0.1:9100/v1", upstream.url))
    settings = load_settings(config)
    async with in_process(settings) as (http, app):
        yield Client(http, ztai_home, app.state.runtime)


async def test_the_provider_sees_one_placeholder_per_value_for_the_whole_session(
    client: Client, upstream: RecordingUpstream
) -> None:
    alice = client.token("alice")
    first = await client.chat(alice, f"write to {MARIA}", session="conv-1")
    second = await client.chat(
        alice, f"write to {MARIA}", f"and cc {JOHN}, then {MARIA} again", session="conv-1"
    )
    assert upstream.seen == [
        "write to <EMAIL_ADDRESS_1>",
        "write to <EMAIL_ADDRESS_1> | and cc <EMAIL_ADDRESS_2>, then <EMAIL_ADDRESS_1> again",
    ]
    assert first == f"write to {MARIA}" and MARIA in second and JOHN in second  # restored for alice
    # Without a session each request numbers on its own: JOHN is <EMAIL_ADDRESS_1> here.
    await client.chat(alice, f"cc {JOHN}")
    assert upstream.seen[-1] == "cc <EMAIL_ADDRESS_1>"


async def test_an_answer_naming_an_earlier_placeholder_is_restored_only_for_its_owner(
    client: Client, upstream: RecordingUpstream
) -> None:
    alice, bob = client.token("alice"), client.token("bob")
    await client.chat(alice, f"remember {MARIA}", session="s")
    upstream.reply = "I have written to <EMAIL_ADDRESS_1>."
    assert await client.chat(alice, "did you write?", session="s") == f"I have written to {MARIA}."
    assert await client.chat(bob, "did you write?", session="s") == "I have written to <EMAIL_ADDRESS_1>."


async def test_an_agent_task_is_a_session_of_its_own(client: Client, upstream: RecordingUpstream) -> None:
    task = "tsk_" + "ab" * 16
    first, later = client.token("alice", task), client.token("alice", task)  # two tokens of one task
    await client.chat(first, f"look up {MARIA}")
    upstream.reply = "Found <EMAIL_ADDRESS_1>."
    assert await client.chat(later, "result?") == f"Found {MARIA}."
    other_task = client.token("alice", "tsk_" + "cd" * 16)
    assert await client.chat(other_task, "result?") == "Found <EMAIL_ADDRESS_1>."


async def test_a_session_vault_of_a_task_belongs_to_its_user_and_root_agent(
    client: Client, upstream: RecordingUpstream
) -> None:
    root, sub = "tsk_" + "01" * 16, "tsk_" + "02" * 16
    assistant = client.token("alice", root, agents="assistant")
    await client.chat(assistant, f"look up {MARIA}", session="conv")
    upstream.reply = "Found <EMAIL_ADDRESS_1>."
    assert await client.chat(assistant, "result?", session="conv") == f"Found {MARIA}."
    # A sub-agent of the same task tree shares the vault, by header and by its root task.
    helper = client.token("alice", sub, chain=(root, sub), agents="helper,assistant")
    assert await client.chat(helper, "result?", session="conv") == f"Found {MARIA}."
    assert await client.chat(helper, "result?") == "Found <EMAIL_ADDRESS_1>."  # task:<root> is another
    # Another agent of the same user (a task of its own), and the user's own token: placeholders only.
    other = client.token("alice", "tsk_" + "03" * 16, agents="reader")
    assert await client.chat(other, "result?", session="conv") == "Found <EMAIL_ADDRESS_1>."
    assert await client.chat(client.token("alice"), "result?", session="conv") == "Found <EMAIL_ADDRESS_1>."
    # The same agent in a new root task of the same user names the same session: its vault.
    again = client.token("alice", "tsk_" + "04" * 16, agents="assistant")
    assert await client.chat(again, "result?", session="conv") == f"Found {MARIA}."


async def test_what_the_model_writes_is_redacted_with_the_sessions_numbering(
    client: Client, upstream: RecordingUpstream
) -> None:
    client.add_policy(
        "redact-all-pii.cedar",
        '@id("redact-all-pii")\n@obligation("redact")\n'
        'permit (principal, action == Action::"chat", resource is Model)\n'
        "when { !context.content.pii_types.isEmpty() && context.token.models.contains(resource.name) };\n",
    )
    alice = client.token("alice")
    await client.chat(alice, f"remember {MARIA}", session="s")  # tokenize and redact: tokenize wins
    assert upstream.seen == ["remember <EMAIL_ADDRESS_1>"]
    upstream.reply = f"Also reach {JOHN} and <EMAIL_ADDRESS_1>."
    # JOHN came from the model: redacted for good, numbered after MARIA in this session (never taking
    # her placeholder); MARIA is the caller's own and comes back.
    assert await client.chat(alice, "who else?", session="s") == f"Also reach <EMAIL_ADDRESS_2> and {MARIA}."
    upstream.reply = None
    await client.chat(alice, f"and {JOHN}?", session="s")  # now the caller sends JOHN: same placeholder
    assert upstream.seen[-1] == "and <EMAIL_ADDRESS_2>?"
