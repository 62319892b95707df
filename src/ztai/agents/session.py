"""Task sessions: taint, value provenance and call budgets, per tenant and root task.

A session belongs to a task tree (the root task id): a sub-agent inherits what its parent has read, and
what it reads taints the whole tree. Two stores with one interface: in-process (one gateway process) and
Redis (several replicas share the state; correctness must not depend on one process's memory).

Call budgets cover the chain: each task has a counter of the calls made by it and all its descendants,
and a call is counted only when every task of its chain (root first) stays within its own limit — checked
and counted in one step (no await in memory, one Lua script in Redis), so concurrent calls from any
number of sub-agents and replicas never exceed a parent's limit, and a refused call counts nowhere.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ztai.agents.provenance import Observed
from ztai.store.shared import shared_state

FLAG_TRUSTED, FLAG_UNTRUSTED, FLAG_SUSPICIOUS = 1, 2, 4
# (task id, that task's call limit or None for unlimited) for every task of a chain, root first.
ChainLimits = Sequence[tuple[str, int | None]]


@dataclass
class SessionState:
    """What policy sees as context.session."""

    tainted: bool = False
    flagged: bool = False
    max_injection_score: int = 0
    untrusted_sources: set[str] = field(default_factory=set)
    calls: int = 0

    def context(self) -> dict[str, Any]:
        return {
            "tainted": self.tainted,
            "flagged": self.flagged,
            "max_injection_score": self.max_injection_score,
            "untrusted_sources": sorted(self.untrusted_sources),
            "calls": self.calls,
        }


class SessionStore(Protocol):
    async def record(
        self, tenant: str, session: str, observed: Observed, *, trusted: bool, source: str, flagged: bool
    ) -> SessionState: ...

    async def lookup(
        self, tenant: str, session: str, keys: set[bytes]
    ) -> tuple[SessionState, dict[bytes, int]]:
        """The session's state and, for each key, FLAG_* bits of where it was seen (absent: nowhere)."""
        ...

    async def spend_call(self, tenant: str, chain: ChainLimits) -> str | None:
        """Count one tool call against every task of `chain` (root first) if each task's total, its
        descendants' calls included, stays within its limit; atomically. None: counted. Otherwise the id
        of the first task whose limit is reached, and nothing is counted."""
        ...

    async def close(self) -> None: ...


@dataclass
class _Session:
    state: SessionState = field(default_factory=SessionState)
    values: dict[bytes, int] = field(default_factory=dict)
    touched: float = field(default_factory=time.monotonic)


class MemorySessionStore:
    """Sessions in this process (the embedded default). Bounded: least recently used sessions go first,
    idle ones expire, and one session remembers at most `max_values` value keys."""

    def __init__(
        self,
        *,
        ttl_seconds: float = 7200,
        max_sessions: int = 10_000,
        max_values: int = 50_000,
        count_ttl_seconds: float | None = None,
    ) -> None:
        self._sessions: OrderedDict[tuple[str, str], _Session] = OrderedDict()
        self._calls: dict[tuple[str, str], tuple[int, float]] = {}
        self._ttl = ttl_seconds
        # Call counters must outlive every token of their task (see RedisSessionStore).
        self._count_ttl = max(ttl_seconds, count_ttl_seconds or 0)
        self._max_sessions = max_sessions
        self._max_values = max_values

    def _get(self, tenant: str, session: str) -> _Session:
        key = (tenant, session)
        now = time.monotonic()
        found = self._sessions.get(key)
        if found is None or now - found.touched > self._ttl:
            found = _Session()
            self._sessions[key] = found
        found.touched = now
        self._sessions.move_to_end(key)
        while len(self._sessions) > self._max_sessions:
            self._sessions.popitem(last=False)
        return found

    async def record(
        self, tenant: str, session: str, observed: Observed, *, trusted: bool, source: str, flagged: bool
    ) -> SessionState:
        entry = self._get(tenant, session)
        values = entry.values
        bit = FLAG_TRUSTED if trusted else FLAG_UNTRUSTED
        for key in observed.values:
            if key in values or len(values) < self._max_values:
                values[key] = values.get(key, 0) | bit
        for key in observed.suspicious:
            if key in values or len(values) < self._max_values:
                values[key] = values.get(key, 0) | FLAG_SUSPICIOUS | FLAG_UNTRUSTED
        state = entry.state
        if not trusted:
            state.tainted = True
            state.untrusted_sources.add(source[:200])
            state.flagged = state.flagged or flagged
            state.max_injection_score = max(state.max_injection_score, round(observed.max_probability * 100))
        return state

    async def lookup(
        self, tenant: str, session: str, keys: set[bytes]
    ) -> tuple[SessionState, dict[bytes, int]]:
        entry = self._get(tenant, session)
        return entry.state, {k: entry.values[k] for k in keys if k in entry.values}

    async def spend_call(self, tenant: str, chain: ChainLimits) -> str | None:
        # No await from the check to the last increment: atomic among the coroutines of this process.
        now = time.monotonic()
        counts = [self._count(tenant, task, now) for task, _ in chain]
        for (task, limit), count in zip(chain, counts, strict=True):
            if limit is not None and count + 1 > limit:
                return task
        for (task, _), count in zip(chain, counts, strict=True):
            self._calls[(tenant, task)] = (count + 1, now)
        if len(self._calls) > 4 * self._max_sessions:
            for key in [k for k, (_, seen) in self._calls.items() if now - seen > self._count_ttl]:
                del self._calls[key]
        if chain:
            self._get(tenant, chain[0][0]).state.calls += 1
        return None

    def _count(self, tenant: str, task: str, now: float) -> int:
        count, seen = self._calls.get((tenant, task), (0, now))
        return count if now - seen <= self._count_ttl else 0

    async def close(self) -> None:
        self._sessions.clear()


class RedisSessionStore:
    """Sessions in Redis, shared by every replica. Keys: `ztai:s:<tenant>:<session>:v` (hash: value key →
    FLAG bits, OR-ed atomically in a Lua script), `...:m` (hash: state), `...:src` (set), and
    `ztai:c:<tenant>:<task>` (call counters: the task's calls and its descendants'). Everything expires
    `ttl_seconds` after the last write; counters no sooner than `count_ttl_seconds` (the longest task
    lifetime), so a budget is never forgotten while a token of its task is still valid."""

    _RECORD = """
local flags = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local size = redis.call('HLEN', KEYS[1])
for i = 4, #ARGV, 2 do
  local current = redis.call('HGET', KEYS[1], ARGV[i])
  if current or size < limit then
    local bits = tonumber(ARGV[i + 1])
    redis.call('HSET', KEYS[1], ARGV[i], bit.bor(tonumber(current or '0'), bits))
    if not current then size = size + 1 end
  end
end
redis.call('EXPIRE', KEYS[1], ttl)
return size
"""

    # KEYS[1]: the root session's state hash; KEYS[2..]: the chain's counters, root first; ARGV[1]: the
    # state's ttl, ARGV[2]: the counters' ttl, ARGV[3..]: each counter's limit (-1: none). Returns 0 when
    # counted, else the (1-based) position in the chain of the first task whose limit is reached.
    _SPEND = """
for i = 2, #KEYS do
  local limit = tonumber(ARGV[i + 1])
  if limit >= 0 and tonumber(redis.call('GET', KEYS[i]) or '0') + 1 > limit then
    return i - 1
  end
end
for i = 2, #KEYS do
  redis.call('INCR', KEYS[i])
  redis.call('EXPIRE', KEYS[i], ARGV[2])
end
redis.call('HINCRBY', KEYS[1], 'calls', 1)
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 0
"""

    def __init__(
        self,
        client: Any,
        *,
        ttl_seconds: int = 7200,
        max_values: int = 50_000,
        count_ttl_seconds: int | None = None,
    ) -> None:
        self._redis = client
        self._ttl = int(ttl_seconds)
        self._count_ttl = max(self._ttl, int(count_ttl_seconds or 0))
        self._max_values = max_values
        self._script = client.register_script(self._RECORD)
        self._spend = client.register_script(self._SPEND)

    @staticmethod
    def _key(tenant: str, session: str) -> str:
        return f"ztai:s:{tenant}:{session}"

    @shared_state("record the session")
    async def record(
        self, tenant: str, session: str, observed: Observed, *, trusted: bool, source: str, flagged: bool
    ) -> SessionState:
        base = self._key(tenant, session)
        bit = FLAG_TRUSTED if trusted else FLAG_UNTRUSTED
        bits: dict[bytes, int] = dict.fromkeys(observed.values, bit)
        for key in observed.suspicious:
            bits[key] = bits.get(key, 0) | FLAG_SUSPICIOUS | FLAG_UNTRUSTED
        items = list(bits.items())
        for start in range(0, len(items), 2000):  # bounded script arguments
            argv: list[Any] = [bit, self._ttl, self._max_values]
            for key, value in items[start : start + 2000]:
                argv.extend((key, value))
            await self._script(keys=[base + ":v"], args=argv)
        async with self._redis.pipeline(transaction=True) as pipe:
            if not trusted:
                pipe.hset(base + ":m", "tainted", 1)
                if flagged:
                    pipe.hset(base + ":m", "flagged", 1)
                pipe.sadd(base + ":src", source[:200])
                pipe.expire(base + ":src", self._ttl)
                score = round(observed.max_probability * 100)
                pipe.eval(
                    "local c = tonumber(redis.call('HGET', KEYS[1], 'score') or '0') "
                    "if tonumber(ARGV[1]) > c then redis.call('HSET', KEYS[1], 'score', ARGV[1]) end "
                    "return 1",
                    1,
                    base + ":m",
                    score,
                )
            pipe.hsetnx(base + ":m", "calls", 0)
            pipe.expire(base + ":m", self._ttl)
            await pipe.execute()
        state, _ = await self.lookup(tenant, session, set())
        return state

    @shared_state("read the session")
    async def lookup(
        self, tenant: str, session: str, keys: set[bytes]
    ) -> tuple[SessionState, dict[bytes, int]]:
        base = self._key(tenant, session)
        ordered = list(keys)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(base + ":m")
            pipe.smembers(base + ":src")
            if ordered:
                pipe.hmget(base + ":v", ordered)
            results = await pipe.execute()
        meta = {_text(k): _text(v) for k, v in (results[0] or {}).items()}
        state = SessionState(
            tainted=meta.get("tainted") == "1",
            flagged=meta.get("flagged") == "1",
            max_injection_score=int(meta.get("score") or 0),
            untrusted_sources={_text(s) for s in results[1] or ()},
            calls=int(meta.get("calls") or 0),
        )
        found: dict[bytes, int] = {}
        if ordered:
            for key, value in zip(ordered, results[2], strict=True):
                if value is not None:
                    found[key] = int(value)
        return state, found

    @shared_state("count the call")
    async def spend_call(self, tenant: str, chain: ChainLimits) -> str | None:
        if not chain:
            return None
        keys = [self._key(tenant, chain[0][0]) + ":m", *(f"ztai:c:{tenant}:{task}" for task, _ in chain)]
        limits = [-1 if limit is None else int(limit) for _, limit in chain]
        refused = int(await self._spend(keys=keys, args=[self._ttl, self._count_ttl, *limits]))
        return chain[refused - 1][0] if refused else None

    async def close(self) -> None:
        await asyncio.shield(self._redis.aclose())


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
