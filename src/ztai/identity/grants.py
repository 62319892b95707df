"""Task grants: what a task token lets an agent do, and how a grant shrinks when it is delegated.

A grant names tools per MCP server (`"<server>/<tool>"`, or `"<server>/*"`), argument constraints per
tool, where the arguments' URLs and hosts may send a client (`egress`, read by `ztai.identity.egress`),
and a budget (tool calls, model tokens). It travels in the task token's claims. `attenuate(parent,
request)` builds a sub-agent's grant: every part is intersected with the parent's and a request for
anything broader is refused with `GrantError` naming it, so a delegated grant is never wider than the one
it came from.

`pattern` constraints are RE2 expressions (`google-re2`): matched in time linear in the value whatever
the pattern, with bounded memory; a pattern RE2 cannot compile (backreferences, lookaround) or that
compiles too large is refused at token exchange, and a value longer than MAX_PATTERN_INPUT fails it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import re2

from ztai.errors import GrantError
from ztai.identity.egress import (
    Egress,
    Target,
    call_egress,
    entry_covered,
    find_urls,
    host_covered,
    parse_entry,
    target_allowed,
)

MAX_TOOLS = 256
MAX_HOSTS = 64
MAX_CONSTRAINTS = 256
MAX_PATTERN_LENGTH = 256  # characters of a `pattern` constraint
MAX_PATTERN_PROGRAM = 2000  # RE2 program size (instructions) of one compiled pattern
PATTERN_MAX_MEM = 1 << 20  # RE2 memory budget of one compiled pattern (its program and DFA cache)
MAX_PATTERN_INPUT = 4096  # characters a pattern is matched against; a longer value fails the constraint
MAX_PATTERN_WORK = 20_000_000  # program size x characters matched, over one call (at worst ~0.3 s)
MAX_ENUM = 256
BUDGET_KINDS = ("calls", "tokens")
CONSTRAINT_KINDS = ("enum", "pattern", "prefix", "min", "max", "max_length", "hosts")
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}/(\*|[A-Za-z0-9._:-]{1,128})$")


Constraint = dict[str, Any]


@dataclass(frozen=True)
class TaskGrant:
    """The tools, argument constraints, egress hosts and budget of one task."""

    tools: tuple[str, ...] = ()
    constraints: dict[str, dict[str, list[Constraint]]] = field(default_factory=dict)
    egress: tuple[str, ...] = ()
    budget: dict[str, int] = field(default_factory=dict)

    # Claims -----------------------------------------------------------------------------------------
    @classmethod
    def from_claims(cls, claims: Mapping[str, Any]) -> TaskGrant:
        """The grant of a task token (its claims were signed by ztai, so they are trusted as written)."""
        return cls(
            tools=tuple(str(t) for t in claims.get("tools") or ()),
            constraints={
                k: {a: list(c) for a, c in v.items()} for k, v in (claims.get("constraints") or {}).items()
            },
            egress=tuple(str(h) for h in claims.get("egress") or ()),
            budget={k: int(v) for k, v in (claims.get("budget") or {}).items()},
        )

    def to_claims(self) -> dict[str, Any]:
        claims: dict[str, Any] = {"tools": list(self.tools)}
        if self.constraints:
            claims["constraints"] = self.constraints
        claims["egress"] = list(self.egress)
        if self.budget:
            claims["budget"] = dict(self.budget)
        return claims

    # Questions ---------------------------------------------------------------------------------------
    def allows_tool(self, server: str, tool: str) -> bool:
        return f"{server}/{tool}" in self.tools or f"{server}/*" in self.tools

    def constraints_for(self, server: str, tool: str) -> dict[str, list[Constraint]]:
        merged: dict[str, list[Constraint]] = {}
        for key in (f"{server}/*", f"{server}/{tool}"):
            for argument, rules in self.constraints.get(key, {}).items():
                merged.setdefault(argument, []).extend(rules)
        return merged

    def allows_host(self, host: str) -> bool:
        """Whether http and https to `host` are granted."""
        return target_allowed(Target("", host), self.egress)

    def check_call(
        self, server: str, tool: str, arguments: Mapping[str, Any], egress: Egress | None = None
    ) -> list[str]:
        """Why this call is outside the grant (empty: inside). Reasons name the part, never a value.
        `egress`: the arguments' `call_egress`, when the caller has it already."""
        if not self.allows_tool(server, tool):
            return [f"tool {server}/{tool} is not granted to this task"]
        problems = check_arguments(self.constraints_for(server, tool), arguments)
        egress = call_egress(arguments) if egress is None else egress
        problems.extend(egress.problems)
        for target in sorted(egress.targets, key=lambda t: (t.scheme, t.host or "")):
            if not target_allowed(target, self.egress):
                problems.append(f"egress to {target.describe()} is not granted to this task")
        return problems

    def has_patterns(self, server: str, tool: str) -> bool:
        """Whether a `pattern` constraint applies to this tool's arguments."""
        rules = self.constraints_for(server, tool).values()
        return any("pattern" in rule for by_argument in rules for rule in by_argument)


@dataclass(frozen=True)
class GrantRequest:
    """What an exchange asks for (RFC 9396 authorization details of type `ztai_task`); None: inherit."""

    tools: tuple[str, ...] | None = None
    constraints: dict[str, dict[str, list[Constraint]]] = field(default_factory=dict)
    egress: tuple[str, ...] | None = None
    budget: dict[str, int] | None = None
    ttl_seconds: int | None = None

    @classmethod
    def parse(cls, details: Any) -> GrantRequest:
        """Validate `authorization_details` (one object, or a list holding one `ztai_task` object)."""
        if isinstance(details, list):
            tasks = [d for d in details if isinstance(d, dict) and d.get("type") == "ztai_task"]
            if len(tasks) != 1 or len(details) != 1:
                raise GrantError("authorization_details must hold exactly one object of type ztai_task")
            details = tasks[0]
        if not isinstance(details, dict):
            raise GrantError("authorization_details must be a JSON object or a list with one object")
        unknown = set(details) - {"type", "tools", "constraints", "egress", "budget", "ttl_seconds"}
        if unknown:
            raise GrantError(f"unknown authorization_details fields: {', '.join(sorted(unknown))}")
        return cls(
            tools=_tool_names(details["tools"]) if "tools" in details else None,
            constraints=_constraints(details.get("constraints") or {}),
            egress=_egress_entries(details["egress"]) if "egress" in details else None,
            budget=_budget(details["budget"]) if "budget" in details else None,
            ttl_seconds=_positive_int(details["ttl_seconds"], "ttl_seconds")
            if "ttl_seconds" in details
            else None,
        )


def attenuate(parent: TaskGrant | None, request: GrantRequest) -> TaskGrant:
    """The grant for a new (sub-)task: the request intersected with `parent` (None: a root task, whose
    bounds are the subject token's, checked by policy). Raises GrantError naming anything broader."""
    if parent is None:
        return TaskGrant(
            tools=request.tools or (),
            constraints=request.constraints,
            egress=request.egress or (),
            budget=request.budget or {},
        )
    tools = parent.tools if request.tools is None else request.tools
    wider_tools = [t for t in tools if not _tool_covered(t, parent.tools)]
    if wider_tools:
        raise GrantError(f"requested tools exceed the parent task's grant: {', '.join(sorted(wider_tools))}")
    egress = parent.egress if request.egress is None else request.egress
    wider_hosts = [entry for entry in egress if not entry_covered(entry, parent.egress)]
    if wider_hosts:
        raise GrantError(
            f"requested egress exceeds the parent task's grant: {', '.join(sorted(wider_hosts))}"
        )
    budget = dict(parent.budget)
    for kind, amount in (request.budget or {}).items():
        if kind in parent.budget and amount > parent.budget[kind]:
            raise GrantError(
                f"requested {kind} budget {amount} exceeds the parent task's {parent.budget[kind]}"
            )
        budget[kind] = amount
    constraints: dict[str, dict[str, list[Constraint]]] = {
        key: {argument: list(rules) for argument, rules in by_argument.items()}
        for key, by_argument in parent.constraints.items()
    }
    for key, by_argument in request.constraints.items():  # constraints only add up: always narrower
        for argument, rules in by_argument.items():
            constraints.setdefault(key, {}).setdefault(argument, []).extend(rules)
    return TaskGrant(tools=tuple(tools), constraints=constraints, egress=tuple(egress), budget=budget)


def unlisted_tools(requested: Iterable[str], listed: Iterable[str]) -> list[str]:
    """Requested tools that a subject token's `tools` claim does not cover (`*` covers all)."""
    allowed = tuple(listed)
    if "*" in allowed:
        return []
    return sorted(t for t in requested if not _tool_covered(t, allowed))


# Argument constraints -------------------------------------------------------------------------------
def check_arguments(constraints: Mapping[str, list[Constraint]], arguments: Mapping[str, Any]) -> list[str]:
    """The constraint violations of `arguments`, one line each (an argument absent from the call is not
    constrained: required arguments are the tool's business). List values are checked item by item."""
    problems: list[str] = []
    work = MAX_PATTERN_WORK
    for argument, rules in constraints.items():
        if argument not in arguments:
            continue
        value = arguments[argument]
        items = value if isinstance(value, list) else [value]
        for rule in rules:
            kind = next(iter(rule))
            if kind == "pattern":
                work -= _pattern_work(rule[kind], items)
                if work < 0:
                    problems.append(
                        f"argument {argument!r}: pattern constraints need more matching than allowed"
                    )
                    return problems
            if not all(_satisfies(item, kind, rule[kind]) for item in items):
                problems.append(f"argument {argument!r} violates constraint {kind}")
    return problems


def _pattern_work(pattern: str, items: list[Any]) -> int:
    """What matching `pattern` against `items` may cost at worst: RE2 program size times value length
    (RE2's slowest path, when its DFA gives up, is linear in both)."""
    try:
        size = int(compiled_pattern(pattern).programsize)
    except re2.error:
        return 0  # fails every value (see _satisfies), at no cost
    lengths = (len(item if isinstance(item, str) else str(item)) for item in items)
    return size * sum(n for n in lengths if n <= MAX_PATTERN_INPUT)


def _satisfies(value: Any, kind: str, bound: Any) -> bool:
    if kind == "enum":
        return bool(value in bound)
    if kind in ("min", "max"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        return bool(value >= bound if kind == "min" else value <= bound)
    text = value if isinstance(value, str) else str(value)
    if kind == "pattern":  # fail closed on a value too long to match: never truncated
        if len(text) > MAX_PATTERN_INPUT:
            return False
        try:
            return compiled_pattern(bound).fullmatch(text) is not None
        except re2.error:  # a token issued before patterns were checked at exchange
            return False
    if kind == "prefix":
        return text.startswith(str(bound))
    if kind == "max_length":
        return len(text) <= int(bound)
    if kind == "hosts":
        hosts = _hosts_of(text)
        return bool(hosts) and all(any(host_covered(h, pattern) for pattern in bound) for h in hosts)
    return False  # unknown kinds never pass (they cannot be created: parse() refuses them)


@lru_cache(maxsize=1024)
def compiled_pattern(pattern: str) -> Any:
    """A `pattern` constraint compiled by RE2 (linear time in the input, whatever the pattern: no
    backtracking). Raises re2.error for what RE2 cannot compile or what exceeds the bounds."""
    options = re2.Options()
    options.max_mem = PATTERN_MAX_MEM
    options.never_capture = True  # a yes/no answer needs no groups: RE2 answers it with its DFA
    options.log_errors = False
    regex = re2.compile(pattern, options)
    if regex.programsize > MAX_PATTERN_PROGRAM:
        raise re2.error(f"compiles to {regex.programsize} RE2 instructions (at most {MAX_PATTERN_PROGRAM})")
    return regex


def _hosts_of(text: str) -> set[str]:
    """The hosts a value meant as one URL or host reaches (empty: none, or unreadable)."""
    hosts: set[str] = set()
    for mention in find_urls(text, whole=True):
        if mention.refused:
            return set()
        hosts.update(mention.hosts)
    return hosts


# Hosts ------------------------------------------------------------------------------------------------
def url_hosts(arguments: Any) -> set[str]:
    """Hosts named by URLs and host names anywhere in the arguments (nested values and free text)."""
    return call_egress(arguments).hosts


# Validation of requests -------------------------------------------------------------------------------
def _tool_covered(tool: str, allowed: Iterable[str]) -> bool:
    server = tool.split("/", 1)[0]
    return any(entry in (tool, f"{server}/*", "*") for entry in allowed)


def _tool_names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_TOOLS:
        raise GrantError(f"tools must be a list of at most {MAX_TOOLS} '<server>/<tool>' names")
    for name in value:
        if not isinstance(name, str) or not _NAME.match(name):
            raise GrantError(f"tool name {str(name)[:80]!r} must look like '<server>/<tool>' or '<server>/*'")
    return tuple(dict.fromkeys(value))


def _egress_entries(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_HOSTS:
        raise GrantError(f"egress must be a list of at most {MAX_HOSTS} entries")
    entries = []
    for entry in value:
        if not isinstance(entry, str):
            raise GrantError("egress entries must be strings")
        try:
            entries.append(parse_entry(entry))
        except ValueError as exc:
            raise GrantError(str(exc)) from None
    return tuple(dict.fromkeys(entries))


def _host_patterns(value: Any, where: str) -> list[str]:
    entries = _egress_entries(value)
    if any(":" in entry for entry in entries):
        raise GrantError(f"hosts on {where} must be host names, '*.domain' or '*' (no scheme)")
    return list(entries)


def _budget(value: Any) -> dict[str, int]:
    if not isinstance(value, dict) or set(value) - set(BUDGET_KINDS):
        raise GrantError(f"budget must be an object with {' and/or '.join(BUDGET_KINDS)}")
    return {kind: _positive_int(amount, f"budget.{kind}") for kind, amount in value.items()}


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise GrantError(f"{name} must be a positive integer")
    return value


def _constraints(value: Any) -> dict[str, dict[str, list[Constraint]]]:
    if not isinstance(value, dict):
        raise GrantError("constraints must map '<server>/<tool>' to {argument: [constraint, ...]}")
    result: dict[str, dict[str, list[Constraint]]] = {}
    count = 0
    for tool, by_argument in value.items():
        _tool_names([tool])
        if not isinstance(by_argument, dict):
            raise GrantError(f"constraints for {tool} must map argument names to constraint lists")
        for argument, rules in by_argument.items():
            rules = rules if isinstance(rules, list) else [rules]
            checked = [_constraint(rule, f"{tool}.{argument}") for rule in rules]
            count += len(checked)
            result.setdefault(tool, {})[str(argument)[:128]] = checked
    if count > MAX_CONSTRAINTS:
        raise GrantError(f"at most {MAX_CONSTRAINTS} constraints")
    return result


def _constraint(rule: Any, where: str) -> Constraint:
    if not isinstance(rule, dict) or len(rule) != 1 or next(iter(rule)) not in CONSTRAINT_KINDS:
        raise GrantError(f"constraint on {where} must be one of {{{', '.join(CONSTRAINT_KINDS)}: ...}}")
    kind, bound = next(iter(rule.items()))
    if kind == "enum":
        if not isinstance(bound, list) or len(bound) > MAX_ENUM:
            raise GrantError(f"enum on {where} must be a list of at most {MAX_ENUM} values")
    elif kind in ("min", "max"):
        if isinstance(bound, bool) or not isinstance(bound, int | float):
            raise GrantError(f"{kind} on {where} must be a number")
    elif kind == "max_length":
        _positive_int(bound, f"max_length on {where}")
    elif kind == "hosts":
        bound = _host_patterns(bound, where)
    else:  # pattern, prefix
        if not isinstance(bound, str) or len(bound) > MAX_PATTERN_LENGTH:
            raise GrantError(f"{kind} on {where} must be a string of at most {MAX_PATTERN_LENGTH} characters")
        if kind == "pattern":
            _check_pattern(bound, where)
    return {kind: bound}


def _check_pattern(pattern: str, where: str) -> None:
    try:
        compiled_pattern(pattern)
    except re2.error as exc:
        detail = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise GrantError(
            f"pattern on {where} is refused: {detail[:120]}. Patterns use RE2 syntax (linear-time "
            "matching: no backreferences, no lookaround), must compile within the size limits, and match "
            "the whole value"
        ) from None


__all__ = [
    "GrantError",
    "GrantRequest",
    "TaskGrant",
    "attenuate",
    "check_arguments",
    "compiled_pattern",
    "host_covered",
    "unlisted_tools",
    "url_hosts",
]
