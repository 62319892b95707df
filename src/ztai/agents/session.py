"""Task sessions: taint, value provenance and call budgets, per tenant and root task.

A session belongs to a task tree (the root task id): a sub-agent inherits what its parent has read, and
what it reads taints the whole tree. Two stores with one interface: in-process (one gateway process) and
Redis (several replicas share the state; correctness must not depend on one process's memory).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol

from ztai.agents.provenance import Observed

FLAG_TRUSTED, FLAG_UNTRUSTED, FLAG_SUSPICIOUS = 1, 2, 4


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

    async def count_call(self, tenant: str, tasks: tuple[str, ...]) -> dict[str, int]:
        """Count one tool call against every task in the chain; returns each task's total."""
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
        self, *, ttl_seconds: float = 7200, max_sessions: int = 10_000, max_values: int = 50_000
    ) -> None:
        self._sessions: OrderedDict[tuple[str, str], _Session] = OrderedDict()
        self._calls: dict[tuple[str, str], tuple[int, float]] = {}
        self._ttl = ttl_seconds
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

    async def count_call(self, tenant: str, tasks: tuple[str, ...]) -> dict[str, int]:
        now = time.monotonic()
        totals: dict[str, int] = {}
        for task in tasks:
            count, _ = self._calls.get((tenant, task), (0, now))
            self._calls[(tenant, task)] = (count + 1, now)
            totals[task] = count + 1
        if len(self._calls) > 4 * self._max_sessions:
            for key in [k for k, (_, seen) in self._calls.items() if now - seen > self._ttl]:
                del self._calls[key]
        entry = self._get(tenant, tasks[0]) if tasks else None
        if entry is not None:
            entry.state.calls += 1
        return totals

    async def close(self) -> None:
        self._sessions.clear()


class RedisSessionStore:
    """Sessions in Redis, shared by every replica. Keys: `ztai:s:<tenant>:<session>:v` (hash: value key →
    FLAG bits, OR-ed atomically in a Lua script), `...:m` (hash: state), `...:src` (set), and
    `ztai:c:<tenant>:<task>` (call counters). Everything expires `ttl_seconds` after the last write."""

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

    def __init__(self, client: Any, *, ttl_seconds: int = 7200, max_values: int = 50_000) -> None:
        self._redis = client
        self._ttl = int(ttl_seconds)
        self._max_values = max_values
        self._script = client.register_script(self._RECORD)

    @staticmethod
    def _key(tenant: str, session: str) -> str:
        return f"ztai:s:{tenant}:{session}"

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

    async def count_call(self, tenant: str, tasks: tuple[str, ...]) -> dict[str, int]:
        async with self._redis.pipeline(transaction=True) as pipe:
            for task in tasks:
                pipe.incr(f"ztai:c:{tenant}:{task}")
                pipe.expire(f"ztai:c:{tenant}:{task}", self._ttl)
            if tasks:
                pipe.hincrby(self._key(tenant, tasks[0]) + ":m", "calls", 1)
                pipe.expire(self._key(tenant, tasks[0]) + ":m", self._ttl)
            results = await pipe.execute()
        return {task: int(results[2 * i]) for i, task in enumerate(tasks)}

    async def close(self) -> None:
        await asyncio.shield(self._redis.aclose())


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
