"""Call budgets over the whole delegation chain: a parent's `budget.calls` bounds the sum of the calls of
all its descendants, in one process (many coroutines) and across replicas sharing Redis."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import redis_url_or_skip
from tests.unit.test_agents_guard import INJECTED, MAIL_TOOLS, FakeApprovals
from ztai.agents.guard import AgentGuard
from ztai.agents.session import MemorySessionStore, RedisSessionStore, SessionStore
from ztai.config import load_settings
from ztai.identity.grants import TaskGrant
from ztai.identity.task_tokens import act_claim, task_claims
from ztai.identity.tokens import Principal
from ztai.policy import PolicyEngine
from ztai.policy.engine import DEFAULTS_DIR

ISSUER = "spiffe://example.org/service/ztai"
TENANT = "example.org"
REDIS_URL = os.environ.get("ZTAI_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture(autouse=True)
def _no_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ZTAI_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)


def new_task() -> str:
    return "tsk_" + secrets.token_hex(16)


def chain_principal(
    chain: list[str],
    budgets: list[dict[str, int]],
    *,
    ancestors: bool = True,
    tools: tuple[str, ...] = ("mail/*",),
) -> Principal:
    """A verified task token of the last task of `chain`; `budgets` per task, root first (as the
    exchange writes them: the task's own in `budget`, the ancestors' in `ancestor_budgets`)."""
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "spiffe://example.org/user/emma",
        "kind": "user",
        "tenant": TENANT,
        "jti": secrets.token_hex(16),
        "exp": int(time.time()) + 300,
        "task": chain[-1],
        "task_chain": chain,
        "act": act_claim([f"spiffe://example.org/agent/a{i}" for i in range(len(chain))]),
        **TaskGrant(tools=tools, egress=("*",), budget=budgets[-1]).to_claims(),
    }
    if ancestors and len(chain) > 1:
        claims["ancestor_budgets"] = budgets[:-1]
    return Principal(claims["sub"], "user", "emma", TENANT, ISSUER, claims["jti"], claims["exp"], claims)


def guard_on(store: SessionStore) -> AgentGuard:
    async def record(event: dict[str, Any]) -> None:
        return None

    guard = AgentGuard.build(
        load_settings(None),
        PolicyEngine(DEFAULTS_DIR),
        record,
        b"k" * 32,
        sessions=store,
        approvals=FakeApprovals(),
    )
    guard.learn_tools("mail", MAIL_TOOLS)
    return guard


def tree(parent_calls: int) -> tuple[Principal, list[Principal]]:
    """A root task with `budget.calls = parent_calls`, four sub-tasks (each inheriting that budget, as
    attenuation gives them) and a sub-sub-task under the first: the root and the five below it."""
    root = new_task()
    budget = {"calls": parent_calls}
    children = [[root, new_task()] for _ in range(4)]
    grandchild = [*children[0], new_task()]
    below = [chain_principal(c, [budget] * len(c)) for c in [*children, grandchild]]
    return chain_principal([root], [budget]), below


async def authorize_all(guards: list[AgentGuard], principals: list[Principal], rounds: int) -> list[str]:
    """Every principal calls `rounds` times on every guard, all at once."""
    calls = [
        guard.authorize(principal, "mail", "read_inbox", {}, route="t")
        for _ in range(rounds)
        for guard in guards
        for principal in principals
    ]
    return [decision.effect for decision in await asyncio.gather(*calls)]


# The chain's limits in the token ------------------------------------------------------------------------
def test_chain_limits_come_from_the_signed_claims() -> None:
    root, child, grandchild = new_task(), new_task(), new_task()
    budgets = [{"calls": 10, "tokens": 50}, {"calls": 5}, {"calls": 3}]
    principal = chain_principal([root, child, grandchild], budgets)
    task = task_claims(principal, ISSUER)
    assert task is not None
    assert task.chain_limits("calls") == ((root, 10), (child, 5), (grandchild, 3))
    assert task.chain_limits("tokens") == ((root, 50), (child, None), (grandchild, None))


def test_a_sub_task_token_without_ancestor_budgets_holds_every_ancestor_to_its_own() -> None:
    chain = [new_task(), new_task()]
    old = chain_principal(chain, [{"calls": 9}, {"calls": 4}], ancestors=False)
    task = task_claims(old, ISSUER)
    assert task is not None and task.chain_limits("calls") == ((chain[0], 4), (chain[1], 4))


@pytest.mark.parametrize("claim", [[], [{"calls": 0}], [{"calls": "2"}], [{"other": 1}], [5], {"calls": 2}])
def test_malformed_ancestor_budgets_fail_closed(claim: Any) -> None:
    from ztai.errors import AuthenticationError

    principal = chain_principal([new_task(), new_task()], [{"calls": 2}, {"calls": 2}])
    principal.claims["ancestor_budgets"] = claim
    with pytest.raises(AuthenticationError, match="ancestor_budgets"):
        task_claims(principal, ISSUER)


# One process ----------------------------------------------------------------------------------------------
def test_sub_tasks_share_the_parent_budget() -> None:
    guard = guard_on(MemorySessionStore(ttl_seconds=60))
    root, below = tree(parent_calls=2)
    effects = run_sequentially(guard, [*below, root], rounds=2)
    assert effects.count("allow") == 2  # not 2 per sub-task
    denied = run(guard.authorize(below[-1], "mail", "read_inbox", {}, route="t"))
    assert denied.effect == "deny"
    assert (
        f"call budget of ancestor task {root.claims['task']} exhausted (2 calls, shared by its sub-tasks)"
        in denied.reasons
    )


def test_many_coroutines_never_exceed_the_parent_budget() -> None:
    guard = guard_on(MemorySessionStore(ttl_seconds=60))
    root, below = tree(parent_calls=7)
    effects = run(authorize_all([guard], [root, *below], rounds=10))
    assert effects.count("allow") == 7 and len(effects) == 60


def test_a_sub_task_limit_below_the_parent_one_binds_the_sub_task_only() -> None:
    guard = guard_on(MemorySessionStore(ttl_seconds=60))
    root, child, other = new_task(), new_task(), new_task()
    narrow = chain_principal([root, child], [{"calls": 3}, {"calls": 1}])
    wide = chain_principal([root, other], [{"calls": 3}, {"calls": 3}])
    assert run_sequentially(guard, [narrow], rounds=2) == ["allow", "deny"]
    # The refusal of the narrow sub-task consumed nothing of the parent: two calls are left.
    assert run_sequentially(guard, [wide], rounds=3) == ["allow", "allow", "deny"]


def test_denied_and_held_calls_consume_no_budget() -> None:
    guard = guard_on(MemorySessionStore(ttl_seconds=60))
    root = new_task()
    limited = [{"calls": 1}, {"calls": 1}]
    child = chain_principal([root, new_task()], limited, tools=("mail/read_inbox", "mail/send_email"))
    ungranted = run(guard.authorize(child, "mail", "get_webpage", {"url": "https://x.example"}, route="t"))
    assert ungranted.effect == "deny"
    run(guard.observe(child, server="mail", tool="read_inbox", content=INJECTED, route="t"))
    held = run(guard.authorize(child, "mail", "send_email", {"recipients": ["a@b.example"]}, route="t"))
    assert held.effect == "require_approval"
    sibling = chain_principal([root, new_task()], limited)
    assert run_sequentially(guard, [sibling], rounds=2) == ["allow", "deny"]


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def run_sequentially(guard: AgentGuard, principals: list[Principal], rounds: int) -> list[str]:
    async def calls() -> list[str]:
        effects = []
        for principal in principals:
            for _ in range(rounds):
                effects.append((await guard.authorize(principal, "mail", "read_inbox", {}, route="t")).effect)
        return effects

    return run(calls())


# Replicas sharing Redis -----------------------------------------------------------------------------------
def with_replicas(count: int, scenario: Callable[[list[RedisSessionStore]], Awaitable[Any]]) -> Any:
    """Run `scenario` with `count` session stores, each on its own Redis connection pool (as replicas)."""
    redis_url_or_skip(REDIS_URL)
    import redis.asyncio as aioredis

    async def main() -> Any:
        clients = [aioredis.Redis.from_url(REDIS_URL) for _ in range(count)]
        stores = [RedisSessionStore(client, ttl_seconds=60, count_ttl_seconds=60) for client in clients]
        try:
            return await scenario(stores)
        finally:
            for store in stores:
                await store.close()

    return run(main())


def test_four_replicas_allow_exactly_the_parent_budget() -> None:
    root, below = tree(parent_calls=2)

    async def scenario(stores: list[RedisSessionStore]) -> list[str]:
        guards = [guard_on(store) for store in stores]
        effects = await authorize_all(guards, below, rounds=3)
        await forget(stores[0], [root, *below])
        return effects

    effects = with_replicas(4, scenario)
    assert effects.count("allow") == 2 and len(effects) == 4 * 5 * 3


def test_four_replicas_under_load_allow_exactly_the_limit() -> None:
    root, below = tree(parent_calls=25)

    async def scenario(stores: list[RedisSessionStore]) -> list[str]:
        guards = [guard_on(store) for store in stores]
        effects = await authorize_all(guards, [root, *below], rounds=5)
        await forget(stores[0], [root, *below])
        return effects

    effects = with_replicas(4, scenario)
    assert effects.count("allow") == 25 and len(effects) == 4 * 6 * 5


def test_redis_spend_is_all_or_nothing_across_the_chain() -> None:
    root, child, other = new_task(), new_task(), new_task()

    async def scenario(stores: list[RedisSessionStore]) -> list[str | None]:
        narrow = ((root, 3), (child, 1))
        wide = ((root, 3), (other, None))
        results = [await stores[i % 2].spend_call("t", chain) for i, chain in enumerate([narrow, narrow])]
        results += [await stores[1].spend_call("t", wide) for _ in range(3)]
        await stores[0]._redis.delete(*(f"ztai:c:t:{task}" for task in (root, child, other)))
        await stores[0]._redis.delete(f"ztai:s:t:{root}:m")
        return results

    assert with_replicas(2, scenario) == [None, child, None, None, root]


async def forget(store: RedisSessionStore, principals: list[Principal]) -> None:
    """Delete the keys a test created (the counters and the root session)."""
    tasks = {t for p in principals for t in p.claims["task_chain"]}
    keys = [f"ztai:c:{TENANT}:{t}" for t in tasks] + [f"ztai:s:{TENANT}:{t}:{s}" for t in tasks for s in "mv"]
    await store._redis.delete(*keys)
