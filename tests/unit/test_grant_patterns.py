"""`pattern` constraints of task grants: RE2, linear time, bounded size, refused at exchange when unsafe.

Catastrophic patterns of backtracking engines are accepted and fast, or refused; matching a long
adversarial value takes microseconds to milliseconds, and a call's total matching work is bounded.
"""

from __future__ import annotations

import asyncio
import random
import re
import threading
import time
from typing import Any

import pytest

from ztai.errors import GrantError
from ztai.identity.grants import (
    MAX_PATTERN_INPUT,
    GrantRequest,
    TaskGrant,
    check_arguments,
    compiled_pattern,
)


def grant_with(pattern: str) -> GrantRequest:
    return GrantRequest.parse(
        {
            "type": "ztai_task",
            "tools": ["mail/*"],
            "constraints": {"mail/send": {"to": [{"pattern": pattern}]}},
        }
    )


def violations(pattern: str, value: Any) -> list[str]:
    return check_arguments(grant_with(pattern).constraints["mail/send"], {"to": value})


CATASTROPHIC = [
    "(a+)+$",
    "(a|aa)*b",
    "(x+x+)+y",
    "(a*)*b",
    "((a+)+)+c",
    "(a|a?)+b",
    "(.*a){20}",
    "(a{30}){30}",
]


@pytest.mark.parametrize("pattern", CATASTROPHIC)
def test_catastrophic_patterns_are_accepted_and_match_in_linear_time(pattern: str) -> None:
    started = time.perf_counter()
    grant_with(pattern)  # accepted at exchange, quickly
    assert time.perf_counter() - started < 0.5
    value = "a" * (MAX_PATTERN_INPUT - 1) + "!"  # the adversarial input of backtracking engines
    started = time.perf_counter()
    for _ in range(10):
        violations(pattern, value)
    assert (time.perf_counter() - started) / 10 < 0.005  # microseconds in practice; 4.2 s with `re`


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        pytest.param(r"(a)\1", "invalid escape", id="backreference"),
        pytest.param(r"(?=a)a", "perl operator", id="lookahead"),
        pytest.param(r"(?<!a)b", "perl operator", id="lookbehind"),
        pytest.param(r"(?>a+)", "perl operator", id="atomic-group"),
        pytest.param(r"(a{1000}){1000}", "repetition", id="huge-counted-repetition"),
        pytest.param(r"((((a{10}){10}){10}){10})", "repetition", id="nested-counted-repetition"),
        pytest.param(r"\pL\pL", "instructions", id="program-too-large"),
        pytest.param(r"[\p{L}\p{N}]{200}", "", id="unicode-classes-too-large"),
        pytest.param(r"a++", "", id="possessive"),
        pytest.param(r"(", "missing", id="malformed"),
    ],
)
def test_unsafe_or_oversized_patterns_are_refused_at_exchange(pattern: str, reason: str) -> None:
    started = time.perf_counter()
    with pytest.raises(GrantError) as refused:
        grant_with(pattern)
    assert time.perf_counter() - started < 0.5
    assert refused.value.status == 400 and refused.value.code == "invalid_scope"
    assert "RE2 syntax" in refused.value.message and reason in refused.value.message


def test_pattern_length_is_bounded() -> None:
    with pytest.raises(GrantError, match="at most 256 characters"):
        grant_with("a" * 257)


@pytest.mark.parametrize(
    ("pattern", "value", "matches"),
    [
        ("a|b", "a", True),
        ("a|b", "b", True),
        ("a|b", "ab", False),  # the alternation must match the whole value, not a prefix
        ("^a|b$", "ab", False),
        ("abc$", "abc", True),
        ("abc$", "abc\n", False),  # as re.fullmatch: `$` does not swallow a final newline
        ("^abc", "abc", True),
        (".*@example\\.org", "x@example.org", True),
        (".*@example\\.org", "x@example.org.evil.ru", False),
        (".*@example\\.org", "x@example.org\n", False),  # `.` does not match a newline
        ("(?i)[a-z]+", "ABC", True),
        ("[a-z]+", "abc1", False),
        ("\\d{4}", "2024", True),
    ],
)
def test_full_match_semantics_are_those_of_re_fullmatch(pattern: str, value: str, matches: bool) -> None:
    assert (re.fullmatch(pattern, value) is not None) is matches  # what the constraint meant before
    assert (violations(pattern, value) == []) is matches


def test_a_value_over_the_input_limit_fails_closed() -> None:
    assert violations("a*", "a" * MAX_PATTERN_INPUT) == []
    assert violations("a*", "a" * (MAX_PATTERN_INPUT + 1)) == ["argument 'to' violates constraint pattern"]
    assert violations(".*", ["ok", "x" * (MAX_PATTERN_INPUT + 1)]) != []  # each item of a list is checked


def test_dfa_hostile_patterns_stay_bounded() -> None:
    """A pattern whose DFA explodes falls back to RE2's NFA: still linear, milliseconds per value."""
    pattern = "(?:[ab]*a[ab]{20}){20}z"
    value = "".join(random.Random(1).choice("ab") for _ in range(MAX_PATTERN_INPUT))
    started = time.perf_counter()
    assert violations(pattern, value) != []
    assert time.perf_counter() - started < 1.0


def test_a_call_has_a_bounded_matching_budget() -> None:
    pattern = "(?:[ab]*a[ab]{20}){20}z"  # ~450 instructions: 4 KB values cost ~2M units each
    values = ["ab" * (MAX_PATTERN_INPUT // 2)] * 30
    started = time.perf_counter()
    found = violations(pattern, values)
    assert found == ["argument 'to': pattern constraints need more matching than allowed"]
    assert time.perf_counter() - started < 0.5  # refused before matching anything


def test_tokens_with_patterns_re2_cannot_compile_fail_closed() -> None:
    """A task token issued before patterns were checked at exchange: its pattern fails every value."""
    grant = TaskGrant.from_claims(
        {"tools": ["mail/*"], "constraints": {"mail/send": {"to": [{"pattern": "(a)\\1"}]}}}
    )
    assert grant.check_call("mail", "send", {"to": "aa"}) == ["argument 'to' violates constraint pattern"]


def test_compiled_patterns_are_cached() -> None:
    assert compiled_pattern("[a-z]+@example\\.org") is compiled_pattern("[a-z]+@example\\.org")


def test_matching_releases_the_event_loop_when_run_in_a_thread() -> None:
    """The guard runs pattern checks with asyncio.to_thread; RE2 matches without holding the GIL, so
    the loop keeps ticking while a slow match runs."""
    pattern = compiled_pattern("(?:[ab]*a[ab]{30}){30}z")
    value = "".join(random.Random(2).choice("ab") for _ in range(MAX_PATTERN_INPUT))

    async def main() -> tuple[int, float]:
        ticks = 0
        done = threading.Event()

        def match_many() -> None:
            for _ in range(10):
                pattern.fullmatch(value)
            done.set()

        started = time.perf_counter()
        worker = asyncio.create_task(asyncio.to_thread(match_many))
        gap = 0.0
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gap, last, ticks = max(gap, now - last), now, ticks + 1
        await worker
        assert time.perf_counter() - started > 0.05  # the matching took a while...
        return ticks, gap

    ticks, gap = asyncio.run(main())
    assert ticks > 10 and gap < 0.1  # ...and the loop went on meanwhile
