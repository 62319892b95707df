"""What a tool does, from its MCP annotations, ztai's extension, operator overrides, or inference.

MCP tools may declare `readOnlyHint`, `destructiveHint`, `idempotentHint` and `openWorldHint`. ztai adds
`_meta["io.ztai/sensitiveArguments"]`: the arguments whose values say who or where data goes (recipients,
accounts, URLs, paths). Operators can override any of it per tool in config. What nobody declared is
inferred conservatively from the name, the description and the input schema: a tool is read-only only when
its name starts with a reading verb and nothing in its description says it changes or sends anything;
unknown means side-effecting. Every inferred property is named in `inferred`, so decisions can say so.

A definition a caller sends along (`/v1/agents/authorize`'s `definition`) is not a declaration: it can
only add restrictions to what the server or config declared, or to what was inferred (`stricter`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SENSITIVE_META_KEY = "io.ztai/sensitiveArguments"

_READ_VERBS = frozenset(
    [
        "get",
        "list",
        "search",
        "read",
        "find",
        "query",
        "lookup",
        "look",
        "view",
        "show",
        "describe",
        "count",
        "check",
        "fetch",
        "retrieve",
        "browse",
        "inspect",
        "summarize",
        "summarise",
        "download",
        "print",
        "peek",
        "scan",
        "explore",
        "see",
        "stat",
        "head",
        "cat",
        "ls",
        "grep",
    ]
)
_WRITE_WORDS = re.compile(
    r"\b(send|sends|sent|delete|deletes|remove|removes|create|creates|update|updates|write|writes|post|posts|"
    r"publish|modify|modifies|change|changes|cancel|cancels|transfer|pay|pays|invite|invites|share|shares|"
    r"upload|execute|executes|run|runs|move|rename|append|appends|schedule|reschedule|add|adds|set|sets|"
    r"drop|purge|kill|forward|reply|book|order|buy)\b",
    re.IGNORECASE,
)
_DESTRUCTIVE_WORDS = re.compile(
    r"^(delete|remove|drop|purge|destroy|erase|wipe|kill|cancel|revoke|reset|truncate|overwrite|uninstall)",
    re.IGNORECASE,
)
# Argument names whose values decide who or where data goes; matched on name parts.
_SENSITIVE_NAME = re.compile(
    r"(^|_)(recipients?|to|cc|bcc|email|emails|e_?mail|address|addresses|account|accounts|iban|"
    r"url|urls|uri|link|links|host|domain|endpoint|webhook|path|paths|file_?id|filename|file|dest|"
    r"destination|target|user|users|username|user_?email|recipient_?email|channel|channels|phone|number|"
    r"participants?|attendees?|member|members|owner|id|ids)($|_)",
    re.IGNORECASE,
)
# Arguments that carry free text a tool writes (a subject, a body): their words are the agent's to choose,
# so value provenance checks only the entities in them (e-mails, URLs, IBANs), never the text as a value.
_FREE_TEXT_NAME = re.compile(
    r"(^|_)(subject|body|content|contents|text|message|description|title|note|notes|comment|comments|"
    r"summary|caption|reason|details)($|_)",
    re.IGNORECASE,
)
_SENSITIVE_FORMATS = frozenset({"email", "uri", "url", "hostname", "idn-email", "iri", "uri-reference"})


@dataclass(frozen=True, slots=True)
class ToolProfile:
    """Effective properties of one tool (what policy sees as context.tool)."""

    server: str
    name: str
    read_only: bool
    destructive: bool
    open_world: bool
    idempotent: bool
    sensitive_arguments: tuple[str, ...]
    inferred: tuple[str, ...]  # the properties that were inferred rather than declared

    def reasons(self) -> list[str]:
        if not self.inferred:
            return []
        return [f"annotations inferred for {self.server}/{self.name}: {', '.join(self.inferred)}"]


def tool_profile(
    server: str, tool: Mapping[str, Any] | None, name: str, overrides: Any = None
) -> ToolProfile:
    """The profile of tool `name` on `server` from its MCP definition (None: unknown tool) and the
    operator's `ToolSettings` overrides (None: none)."""
    definition: Mapping[str, Any] = tool or {}
    annotations = definition.get("annotations")
    annotations = annotations if isinstance(annotations, Mapping) else {}
    description = str(definition.get("description") or "")[:4000]
    schema = definition.get("inputSchema")
    properties = schema.get("properties") if isinstance(schema, Mapping) else None
    properties = properties if isinstance(properties, Mapping) else {}
    inferred: list[str] = []

    def declared(key: str, override: str) -> bool | None:
        value = getattr(overrides, override, None) if overrides is not None else None
        if isinstance(value, bool):
            return value
        hint = annotations.get(key)
        return hint if isinstance(hint, bool) else None

    read_only = declared("readOnlyHint", "read_only")
    if read_only is None:
        read_only = _looks_read_only(name, description)
        inferred.append("read_only")
    destructive = declared("destructiveHint", "destructive")
    if destructive is None:
        # MCP's default is destructive=true for non-read-only tools; we keep it unless the name says less.
        destructive = not read_only and (
            bool(_DESTRUCTIVE_WORDS.match(name)) or not _WRITE_WORDS.search(name.replace("_", " "))
        )
        inferred.append("destructive")
    open_world = declared("openWorldHint", "open_world")
    if open_world is None:
        open_world = True  # MCP's default: the tool touches an open world (its output is untrusted)
        inferred.append("open_world")
    idempotent = declared("idempotentHint", "idempotent")
    if idempotent is None:
        idempotent = read_only
        inferred.append("idempotent")
    sensitive = _sensitive_arguments(definition, properties, overrides)
    if sensitive is None:
        sensitive = tuple(sorted(a for a, spec in properties.items() if _looks_sensitive(str(a), spec)))
        inferred.append("sensitive_arguments")
    return ToolProfile(
        server=server,
        name=name,
        read_only=read_only,
        destructive=destructive and not read_only,
        open_world=open_world,
        idempotent=idempotent,
        sensitive_arguments=sensitive,
        inferred=tuple(inferred),
    )


def stricter(base: ToolProfile, claimed: ToolProfile) -> ToolProfile:
    """`base` (what the server or config declared, or inference) with only the restrictions that
    `claimed` (a caller's definition) declares: read-only and idempotent only where both say so,
    destructive and open-world where either does; the sensitive arguments of both. What `base` inferred
    stays marked inferred: a caller's claim is no declaration."""

    def declared(name: str) -> bool:
        return name not in claimed.inferred

    read_only = base.read_only and (claimed.read_only or not declared("read_only"))
    destructive = base.destructive or (declared("destructive") and claimed.destructive)
    return ToolProfile(
        server=base.server,
        name=base.name,
        read_only=read_only,
        destructive=destructive and not read_only,
        open_world=base.open_world or (declared("open_world") and claimed.open_world),
        idempotent=base.idempotent and (claimed.idempotent or not declared("idempotent")),
        sensitive_arguments=tuple(sorted({*base.sensitive_arguments, *claimed.sensitive_arguments})),
        inferred=base.inferred,
    )


def descriptive(definition: Mapping[str, Any]) -> dict[str, Any]:
    """A caller's definition without its claims (annotations, `_meta`): what inference may read. Its
    description and input schema can only make inference stricter (write verbs, sensitive arguments)."""
    return {k: definition[k] for k in ("description", "inputSchema") if k in definition}


def _looks_read_only(name: str, description: str) -> bool:
    words = re.split(r"[_\-.\s]+|(?<=[a-z])(?=[A-Z])", name.strip())
    verb = words[0].lower() if words else ""
    if verb not in _READ_VERBS:
        return False
    # "get_and_send..." or a description that says it changes something: not read-only.
    rest = " ".join(words[1:])
    first_sentence = description.split(".")[0]
    return not _WRITE_WORDS.search(rest) and not _WRITE_WORDS.search(first_sentence)


def _sensitive_arguments(
    definition: Mapping[str, Any], properties: Mapping[str, Any], overrides: Any
) -> tuple[str, ...] | None:
    configured = getattr(overrides, "sensitive_arguments", None) if overrides is not None else None
    if isinstance(configured, list):
        return tuple(sorted(str(a) for a in configured))
    meta = definition.get("_meta")
    declared = meta.get(SENSITIVE_META_KEY) if isinstance(meta, Mapping) else None
    if isinstance(declared, list):
        return tuple(sorted(str(a) for a in declared if isinstance(a, str)))
    return None


def is_free_text_argument(argument: str) -> bool:
    """Whether an argument's value is free text (by its name): a subject, a body, a description."""
    return bool(_FREE_TEXT_NAME.search(argument))


def _looks_sensitive(argument: str, spec: Any) -> bool:
    if _SENSITIVE_NAME.search(argument):
        return True
    if isinstance(spec, Mapping):
        formats = {spec.get("format")}
        items = spec.get("items")
        if isinstance(items, Mapping):
            formats.add(items.get("format"))
        return bool(formats & _SENSITIVE_FORMATS)
    return False
