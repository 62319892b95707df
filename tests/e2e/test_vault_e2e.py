"""End to end: session tokenization vaults through the real server, with the openai SDK and the CLI."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.e2e.conftest import Gateway, exchange_form

pytestmark = pytest.mark.e2e
MARIA = "maria.lopez@example.com"


def client(gateway: Gateway, token: str, session: str | None = None) -> openai.OpenAI:
    headers = {"x-ztai-session": session} if session else None
    return openai.OpenAI(
        base_url=gateway.base_url, api_key=token, max_retries=0, timeout=20, default_headers=headers
    )


def ask(sdk: openai.OpenAI, text: str, *, stream: bool = False) -> str:
    # The mock answers with the words it received: what it echoes is what the provider saw.
    if stream:
        chunks = sdk.chat.completions.create(
            model="mock", messages=[{"role": "user", "content": text}], stream=True
        )
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reply = sdk.chat.completions.create(model="mock", messages=[{"role": "user", "content": text}])
    return reply.choices[0].message.content or ""


def test_a_session_vault_serves_its_owner_across_requests_and_restarts(
    gateway_on_each_store: Gateway,
) -> None:
    gateway = gateway_on_each_store
    alice_token, bob_token = gateway.token("alice", "models=mock"), gateway.token("bob", "models=mock")
    alice = client(gateway, alice_token, "conv-1")
    assert MARIA in ask(alice, f"please email {MARIA} about the invoice")
    # A later request of the session names only the placeholder (as a model's earlier answer would):
    # the answer is restored for alice, streamed or not, though this request never carried the value.
    assert MARIA in ask(alice, "and remind <EMAIL_ADDRESS_1> tomorrow")
    assert MARIA in ask(alice, "and remind <EMAIL_ADDRESS_1> tomorrow", stream=True)
    # Not for bob naming the same session, and not for alice outside it.
    assert "<EMAIL_ADDRESS_1>" in ask(client(gateway, bob_token, "conv-1"), "remind <EMAIL_ADDRESS_1>")
    assert "<EMAIL_ADDRESS_1>" in ask(client(gateway, alice_token), "remind <EMAIL_ADDRESS_1>")

    stats = json.loads(gateway.cli("vault", "stats").stdout)
    assert stats["live_sessions"] >= 1 and stats["sealed_values"] >= 1

    gateway.stop_server()  # the vault is in the store, encrypted: a restart keeps the session
    gateway.start_server()
    assert MARIA in ask(alice, "remind <EMAIL_ADDRESS_1>")

    forgotten = httpx.delete(
        f"{gateway.base_url}/vault/sessions/conv-1", headers={"authorization": f"Bearer {alice_token}"}
    )
    assert forgotten.status_code == 200 and forgotten.json()["forgotten_entries"] == 1
    assert "<EMAIL_ADDRESS_1>" in ask(alice, "remind <EMAIL_ADDRESS_1>")
    events = [
        json.loads(line) for line in gateway.cli("audit", "tail", "-n", "20", "--json").stdout.splitlines()
    ]
    assert any(e.get("kind") == "vault.forgotten" or e.get("action") == "vault.forgotten" for e in events)


def test_a_malformed_session_header_is_refused_clearly(gateway: Gateway) -> None:
    sdk = client(gateway, gateway.token("alice", "models=mock"), "no spaces allowed")
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        ask(sdk, "hello")
    assert "x-ztai-session" in refused.value.response.json()["error"]["message"]


def test_the_cli_forgets_a_principals_session(gateway: Gateway) -> None:
    token = gateway.token("carol", "models=mock")
    sdk = client(gateway, token, "conv-9")
    assert MARIA in ask(sdk, f"write to {MARIA}")
    result = gateway.cli(
        "vault", "forget", "--principal", "spiffe://example.org/user/carol", "--session", "conv-9"
    )
    assert "forgot 1 entries" in result.stderr
    assert "<EMAIL_ADDRESS_1>" in ask(sdk, "remind <EMAIL_ADDRESS_1>")
    assert gateway.cli("vault", "purge").returncode == 0


def agent_token(gateway: Gateway, user: str, agent: str, tools: list[str]) -> str:
    """A task token of `agent` acting for `user`, from the real token exchange."""
    subject = gateway.token(user, "models=mock", "tools=mail/*")
    form = exchange_form(subject, gateway.token(agent, kind="agent"), {"tools": tools})
    response = httpx.post(f"{gateway.root_url}/oauth/token", data=form, timeout=10)
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def test_another_agent_of_the_same_user_naming_the_session_gets_placeholders(gateway: Gateway) -> None:
    assistant = client(gateway, agent_token(gateway, "emma", "assistant", ["mail/*"]), "conv-emma")
    assert MARIA in ask(assistant, f"please email {MARIA} about the invoice")
    assert MARIA in ask(assistant, "and remind <EMAIL_ADDRESS_1> tomorrow")
    # An agent granted only read_inbox, acting for the same user, names the same session: no values.
    reader = client(gateway, agent_token(gateway, "emma", "reader", ["mail/read_inbox"]), "conv-emma")
    assert "<EMAIL_ADDRESS_1>" in ask(reader, "remind <EMAIL_ADDRESS_1>")
    assert MARIA not in ask(reader, "remind <EMAIL_ADDRESS_1>")
    # Nor does the user's own token: the agent's vault is the agent's.
    user = client(gateway, gateway.token("emma", "models=mock"), "conv-emma")
    assert MARIA not in ask(user, "remind <EMAIL_ADDRESS_1>")
    # The operator ends the agent's vault by naming the user, the root agent and the session.
    forgotten = gateway.cli(
        "vault",
        "forget",
        "--principal",
        "spiffe://example.org/user/emma",
        "--agent",
        "spiffe://example.org/agent/assistant",
        "--session",
        "conv-emma",
    )
    assert "forgot 1 entries" in forgotten.stderr
    assert MARIA not in ask(assistant, "remind <EMAIL_ADDRESS_1>")
