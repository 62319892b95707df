"""Value provenance: which values a task session saw, and where.

Content entering a session (the user's request, tool results, retrieved documents) is reduced to *value
keys*: e-mail addresses, URLs and hosts (found and parsed as the egress check reads them), IBANs, phone
numbers, numbers and short word sequences, normalised and hashed with a per-deployment key (the session
keeps no raw text). Each key is recorded as seen in trusted content, in untrusted content, and — when the
window of untrusted text around it reads like instructions to the model — in *suspicious* content.

When an agent proposes a tool call, the values in its arguments are reduced the same way and looked up, so
policy can ask: did the recipient of this e-mail come only from a web page? Only from a part of it that
looked like an injection? (`context.tool.args_from_untrusted`, `args_from_suspicious`, `args_unseen`).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ztai.detect.injection import Analysis, InjectionModel, window_scores
from ztai.detect.instructions import instruction_texts, unescape
from ztai.identity.egress import mentions_for_values

MAX_TEXT = 200_000  # characters of one content item that are indexed
MAX_NGRAM = 4  # word sequences up to this long are remembered as values
MAX_VALUE_WORDS = MAX_NGRAM
MAX_SHORT_VALUE = 80  # an argument string up to this long is also a value as a whole

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")
_PHONE = re.compile(r"(?<!\w)\+?\d[\d ().-]{6,18}\d(?!\w)")
_WORD = re.compile(r"[^\W_]+(?:[-'][^\W_]+)*", re.UNICODE)


def _fold(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


def _url_key(url: str) -> str:
    url = url.lower().rstrip(".,;:!?")
    url = re.sub(r"^(?:https?:)?[/\\]*", "", url)
    return url.rstrip("/")


def entity_values(text: str) -> Iterator[str]:
    """Normalised entity values in `text`: e-mails, URLs (and their hosts), IBANs, phone numbers."""
    for match in _EMAIL.finditer(text):
        yield "e:" + match.group(0).lower()
    for mention in mentions_for_values(text):  # the hosts that the egress check reads, too
        yield "u:" + _url_key(mention.url)
        for host in mention.hosts:
            yield "h:" + host.removeprefix("www.")
    for match in _IBAN.finditer(text):
        yield "i:" + match.group(0).replace(" ", "")
    for match in _PHONE.finditer(text):
        digits = re.sub(r"\D", "", match.group(0))
        if 7 <= len(digits) <= 15:
            yield "p:" + digits


def text_values(text: str) -> Iterator[str]:
    """Every value key of a content text: its entities, and its words and word sequences."""
    text = text[:MAX_TEXT]
    yield from entity_values(text)
    words = [_fold(m.group(0)) for m in _WORD.finditer(text)]
    for n in range(1, MAX_NGRAM + 1):
        for i in range(len(words) - n + 1):
            yield "w:" + " ".join(words[i : i + n])


def argument_values(arguments: Mapping[str, Any]) -> dict[str, list[set[str]]]:
    """The values of each top-level argument (nested values included), each as its set of keys: every
    entity is a value (an URL is known by its full key and its host), and so is a short string or a
    number as a whole. Long free text contributes its entities only."""
    result: dict[str, list[set[str]]] = {}
    for name, value in arguments.items():
        groups: list[set[str]] = []
        for scalar in _scalars(value):
            if isinstance(scalar, bool):
                continue
            if isinstance(scalar, int | float):
                groups.append({"w:" + _fold(str(scalar))})
                continue
            entities = _entity_groups(scalar[:MAX_TEXT])
            groups.extend(entities)
            words = [_fold(m.group(0)) for m in _WORD.finditer(scalar[: MAX_SHORT_VALUE + 1])]
            whole_entity = len(entities) == 1 and len(scalar.split()) == 1
            if (
                words
                and len(scalar) <= MAX_SHORT_VALUE
                and len(words) <= MAX_VALUE_WORDS
                and not whole_entity
            ):
                groups.append({"w:" + " ".join(words)})
        if groups:
            result[str(name)] = groups
    return result


def _entity_groups(text: str) -> list[set[str]]:
    """One key set per entity: a URL's full key and host key belong together."""
    groups: list[set[str]] = []
    pending: set[str] = set()
    for key in entity_values(text):
        if key.startswith("h:") and pending:
            pending.add(key)
            groups.append(pending)
            pending = set()
            continue
        if pending:
            groups.append(pending)
        pending = {key}
        if not key.startswith("u:"):
            groups.append(pending)
            pending = set()
    if pending:
        groups.append(pending)
    return groups


def _scalars(value: Any, depth: int = 0) -> Iterator[Any]:
    if depth > 16:
        return
    if isinstance(value, Mapping):
        for item in value.values():
            yield from _scalars(item, depth + 1)
    elif isinstance(value, list | tuple):
        for item in value[:1000]:
            yield from _scalars(item, depth + 1)
    elif isinstance(value, str | int | float):
        yield value


@dataclass
class Digest:
    """Hashes value keys with a deployment secret (8-byte keys: compact, and no raw value is stored)."""

    key: bytes

    def __call__(self, values: Iterable[str]) -> set[bytes]:
        return {hashlib.blake2b(v.encode(), key=self.key[:64], digest_size=8).digest() for v in values}


@dataclass
class Observed:
    """What one content item adds to a session."""

    values: set[bytes] = field(default_factory=set)
    suspicious: set[bytes] = field(default_factory=set)
    max_probability: float = 0.0


def observe_text(
    text: str,
    *,
    trusted: bool,
    digest: Digest,
    model: InjectionModel | None,
    suspicion: float,
    analysis: Analysis | None = None,
    instructions: bool = True,
) -> Observed:
    """Reduce a content item to hashed value keys; for untrusted content also mark as suspicious the keys
    that occur in instruction-like sentences (`instructions`; `ztai.detect.instructions`, no model) and
    in windows whose injection probability reaches `suspicion`. `analysis`: the injection detector's
    analysis of `text` when it already ran (its window scores are reused, not computed again)."""
    observed = Observed(values=digest(text_values(text)))
    plain = unescape(text[:MAX_TEXT])
    if plain != text[:MAX_TEXT]:  # serialized output: also the values as the model reads them
        observed.values |= digest(text_values(plain))
    if trusted or not text.strip():
        return observed
    if instructions:
        for sentence in instruction_texts(text[:MAX_TEXT]):
            observed.suspicious |= digest(text_values(sentence))
    if model is None:
        return observed
    if analysis is not None:
        scores = analysis.window_probabilities(model)
    else:
        scores = window_scores(text[:MAX_TEXT], "tool_output", model)
    observed.max_probability = max((p for _, _, p in scores), default=0.0)
    for start, end, probability in scores:
        if probability >= suspicion:
            observed.suspicious |= digest(text_values(text[start:end]))
    return observed
