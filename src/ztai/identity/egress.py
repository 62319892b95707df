"""Egress: where the strings of a tool call would send a client, and the grant entries that allow it.

A string is read the way URL clients read it. The host of a URL is parsed by Ada, the WHATWG URL parser
of Node.js (backslashes count as slashes in http(s), ws(s), ftp and file URLs, `http:evil.ru` and
`//evil.ru` have hosts, percent-encoded and IDNA hosts are decoded and mapped, IPv4 in any notation is
`127.0.0.1`); where RFC 3986 libraries read it differently (a backslash before the first `/`, `?` or
`#`: `http://evil.com\\@example.org/`), the call reaches both hosts. Bare hosts count too (`evil.ru/x`
in an e-mail body), by the rule in `_bare_counts`: a name whose last label is a top-level domain of the
public suffix list, or an IP address. E-mail addresses and `mailto:`/`tel:` URLs name people, not hosts.

Grant entries (`egress` of a task grant):

| entry | allows |
| --- | --- |
| `example.org`, `*.example.org`, `*` | http and https to that host, its subdomains, any host |
| `<scheme>://<host>` (same host forms) | that scheme to those hosts: `ftp://files.example.org`, `wss://*` |
| `<scheme>:` | URLs of that scheme that name no host: `data:`, `file:` (`file:///...`), `javascript:` |

A bare host or `//host` names no scheme, so it needs an entry that allows both http and https.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import ada_url
import tldextract

MAX_HOSTPORT = 2048  # characters of one URL's host and port that are parsed; longer: refused
MAX_TARGETS = 256  # distinct (scheme, host) targets one call may name
MAX_PARSES = 4096  # distinct hosts one call (or one content text) may make ztai parse
MAX_CANDIDATES = 10_000  # places where a URL or host may start, in one call (or one content text)
MAX_DEPTH = 32  # nesting of argument values
MAX_URL_TEXT = 2048  # characters of a URL kept as its provenance value

SPECIAL_SCHEMES = frozenset({"http", "https", "ws", "wss", "ftp", "file"})  # WHATWG "special"
WEB_SCHEMES = ("http", "https")
# Schemes recognised in text without `//` after them (`note:` is a word, `gopher:` a URL); any other
# `<scheme>://` is recognised too.
KNOWN_SCHEMES = SPECIAL_SCHEMES | {
    "blob", "data", "dict", "ftps", "git", "gopher", "irc", "jar", "javascript", "ldap", "ldaps",
    "nfs", "rsync", "sftp", "smb", "ssh", "telnet", "tftp", "vbscript",
}  # fmt: skip
NOT_EGRESS_SCHEMES = frozenset({"mailto", "tel"})  # they address a person, like an e-mail address
# Top-level domains that are also common file-name extensions: `notes.md` alone is a file name; it
# counts as a host only with a path, a port, a password, a `www.` or a scheme (`notes.md/x`).
FILE_EXTENSION_TLDS = frozenset({
    "ac", "ai", "am", "app", "bz", "cab", "cc", "cl", "cu", "gd", "in", "info", "la", "ly", "ma",
    "md", "mk", "ml", "mm", "mo", "mobi", "mov", "ms", "pl", "pm", "pro", "ps", "pub", "py", "rs",
    "sc", "sh", "so", "st", "sv", "tf", "zip",
})  # fmt: skip
# An argument whose name ends in one of these words holds a URL or a host as a whole: its value counts
# as a host even where free text would not (`url="evil.ai"`, `host="intranet"`, `url="127.1"`).
URL_ARGUMENT_WORDS = frozenset({
    "url", "urls", "uri", "uris", "href", "link", "links", "host", "hosts", "hostname", "domain",
    "domains", "endpoint", "endpoints", "website",
})  # fmt: skip

# Signs that a word (text between spaces and quotes) may hold a URL or a host: `//`, a colon (schemes,
# ports, IPv6), a dot before a letter pair or in an IPv4 address, hex (`0x7f.1`), a percent-escape.
# Each starts with a rare character, so one regex pass finds them quickly.
_SIGN = re.compile(
    r"[/\\]{2}|:|[.\u3002\uff0e\uff61](?:[^\W\d_]{2}|\d+\.\d+\.\d)|0[xX][0-9A-Fa-f]|%[0-9A-Fa-f]{2}"
)
_SEPARATOR = re.compile(r"[\s\"'<>`]")
_UP_TO_LAST_SEPARATOR = re.compile(r".*[\s\"'<>`]", re.DOTALL)
_PLAIN_NAME = re.compile(r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.([A-Za-z0-9-]+)[.,;:!?]*")
_SCHEME = re.compile(r"(?<![A-Za-z0-9+.-])([A-Za-z][A-Za-z0-9+.-]*):")
_SEGMENT_BREAK = re.compile(r"[=(){},;|]")
_FORBIDDEN = re.compile(r"[\x00-\x20<>^|\x7f]")  # never in a host: such a string names none
_SEARCHES = {
    "whatwg": re.compile(r"[/\\?#]"),  # where a special scheme's authority ends
    "rfc": re.compile(r"[/?#]"),  # ...for RFC 3986 and for other schemes
    "forbidden": _FORBIDDEN,
}
_DOUBLE_SLASHES = ("//", "\\\\", "/\\", "\\/")
_SLASHES = re.compile(r"[/\\]*")
_PLAIN_HOST = re.compile(r"[a-z0-9-]+(?:\.[a-z0-9-]+)+\.?")
_DOTTED_QUAD = re.compile(r"\d+(?:\.\d+){3}\.?")
_ENTRY_HOST = re.compile(r"(\*|(\*\.)?[a-z0-9-]+(\.[a-z0-9-]+)*)")
_NOT_IN_ENTRY = re.compile(r"[/\\:@?#*\s\[\]]")
_ENTRY = re.compile(r"([a-z][a-z0-9+.-]{0,31}):(?://(.*))?")
_TOO_MANY_URLS = f"the arguments hold more than {MAX_CANDIDATES} URLs or host names"
_CLOSERS = {")": "(", "]": "[", "}": "{"}
_OPENERS = {"(": ")", "[": "]", "{": "}"}
_TRAILING = ".,;:!?*_"
_C0_AND_SPACE = "".join(map(chr, range(0x21)))
_TAB_NEWLINE = str.maketrans("", "", "\t\n\r")


# Targets and grant entries -------------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class Target:
    """Where a URL sends a client: a scheme ("" for a bare host or `//host`: http or https) and a host
    (canonical: lower case, IDNA, IPv4 dotted, IPv6 in brackets; None: a URL with no host)."""

    scheme: str
    host: str | None

    def describe(self) -> str:
        if self.host is None:
            return f"{self.scheme}: URLs"
        if self.scheme in ("", *WEB_SCHEMES):
            return f"host {self.host}"
        return f"{self.scheme}://{self.host}"


@dataclass(frozen=True)
class EgressRule:
    """One grant entry: the schemes it allows, to hosts matching `host` (None: URLs with no host)."""

    schemes: frozenset[str]
    host: str | None

    def allows(self, scheme: str, host: str | None) -> bool:
        if scheme not in self.schemes:
            return False
        if host is None or self.host is None:
            return host is None and self.host is None
        return host_covered(host, self.host)


def host_covered(host: str, pattern: str) -> bool:
    """`*` covers every host; `*.example.com` covers its subdomains (and narrower wildcards of them)."""
    host, pattern = host.lower(), pattern.lower()
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        suffix = pattern[1:]
        return host.endswith(suffix) and len(host) > len(suffix)
    return host == pattern


def parse_entry(entry: str) -> str:
    """The canonical form of a grant's egress entry; ValueError (a message for the caller) if malformed."""
    text = entry.strip().lower()
    match = _ENTRY.fullmatch(text)
    if match is not None and match.group(2) is None:
        return f"{match.group(1)}:"
    host = _entry_host(text if match is None else match.group(2))
    if host is None:
        raise ValueError(
            f"egress entry {entry[:80]!r} must be a host, '*.domain' or '*', optionally after "
            "'<scheme>://', or '<scheme>:' alone"
        )
    return host if match is None else f"{match.group(1)}://{host}"


def _entry_host(host: str) -> str | None:
    if host == "*":
        return host
    wildcard = host.startswith("*.")
    name = host[2:] if wildcard else host
    if _NOT_IN_ENTRY.search(name):
        return None  # a path, a port, user info: an entry names hosts only
    canonical = canonical_host(name)
    if canonical is None:
        return None
    result = f"*.{canonical}" if wildcard else canonical
    return result if _ENTRY_HOST.fullmatch(result) else None


@lru_cache(maxsize=4096)
def rule_of(entry: str) -> EgressRule:
    """The rule of a canonical entry (as stored in a task token's claims)."""
    match = _ENTRY.fullmatch(entry)
    if match is None:
        return EgressRule(frozenset(WEB_SCHEMES), entry)
    return EgressRule(frozenset({match.group(1)}), match.group(2))


def target_allowed(target: Target, entries: tuple[str, ...]) -> bool:
    rules = [rule_of(entry) for entry in entries]
    schemes = WEB_SCHEMES if target.scheme == "" else (target.scheme,)
    return all(any(rule.allows(scheme, target.host) for rule in rules) for scheme in schemes)


def entry_covered(entry: str, parents: tuple[str, ...]) -> bool:
    """Whether every scheme and host that `entry` allows is allowed by some entry of `parents`."""
    rule = rule_of(entry)
    parent_rules = [rule_of(p) for p in parents]
    return all(any(p.allows(scheme, rule.host) for p in parent_rules) for scheme in rule.schemes)


# Hosts ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _public_suffixes() -> tldextract.TLDExtract:
    # The snapshot bundled with tldextract: never fetched, never cached on disk.
    return tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None, fallback_to_snapshot=True)


@lru_cache(maxsize=8192)
def is_top_level_domain(label: str) -> bool:
    """Whether `label` (lower case, IDNA) is a top-level domain of the public suffix list."""
    suffix = _public_suffixes()(f"x.{label}").suffix
    return bool(suffix) and suffix.rsplit(".", 1)[-1] == label


def canonical_host(text: str) -> str | None:
    """`text` (a host, maybe with a port) as WHATWG parses it in an http URL; None: not a host."""
    return _parse_host("http", text)[0]


@lru_cache(maxsize=4096)
def _parse_host(scheme: str, hostport: str) -> tuple[str | None, str]:
    """(canonical host or None, host type: "ipv4", "ipv6", "name") of `scheme://hostport`."""
    plain = _PLAIN_HOST.fullmatch(hostport) and "xn--" not in hostport and not _looks_numeric(hostport)
    if plain and scheme in SPECIAL_SCHEMES:  # already canonical: no need for the parser
        return hostport.rstrip("."), "name"
    try:
        parsed = ada_url.parse_url(f"{scheme}://{hostport}", attributes=("hostname", "host_type"))
    except ValueError:
        return None, ""
    host = str(parsed["hostname"]).lower().rstrip(".")
    kind = {ada_url.HostType.IPV4: "ipv4", ada_url.HostType.IPV6: "ipv6"}.get(parsed["host_type"], "name")
    return (host or None), kind


def _looks_numeric(host: str) -> bool:
    last = host.rstrip(".").rsplit(".", 1)[-1]
    return last.isdigit() or last.startswith("0x")


# Finding URLs and hosts in text -----------------------------------------------------------------------
@dataclass(frozen=True)
class Mention:
    """A URL or host in a text: where it is written, its scheme ("" when none is written) and the hosts
    it reaches (none: a URL without a host). `refused`: why reading stopped here (fail closed)."""

    source: str
    start: int
    end: int
    scheme: str
    hosts: tuple[str, ...] = ()
    refused: str = ""

    @property
    def url(self) -> str:
        """The URL's text (its first MAX_URL_TEXT characters)."""
        return self.source[self.start : min(self.end, self.start + MAX_URL_TEXT)]


@dataclass(frozen=True)
class _Refused:
    reason: str


@dataclass
class _Budget:
    """What one call (or one content text) may make ztai read: places where a URL may start, and
    distinct hosts parsed. A word read before adds nothing new and is skipped."""

    parses: int = MAX_PARSES
    candidates: int = MAX_CANDIDATES
    seen: set[tuple[str, str]] = field(default_factory=set)
    words: set[str] = field(default_factory=set)

    def parse(self, scheme: str, hostport: str) -> bool:
        key = (scheme, hostport)
        if key not in self.seen:
            if len(self.seen) >= self.parses:
                return False
            self.seen.add(key)
        return True

    def word(self, word: str) -> Iterator[Mention]:
        if word in self.words:
            return iter(())
        self.words.add(word)
        if _plain_name_without_host(word):
            return iter(())
        return _Reader(word, self).mentions()


def _plain_name_without_host(word: str) -> bool:
    """A quick answer for the commonest words with a dot: `self.name`, `notes.md`, `1.5`, `file.txt`."""
    match = _PLAIN_NAME.fullmatch(word)
    if match is None:
        return False
    last = match.group(1).lower()
    if last.isdigit():  # a number, unless an IPv4 address the bare rule counts
        return not _DOTTED_QUAD.fullmatch(word.rstrip(_TRAILING)) and "0x" not in word.lower()
    if last.startswith("0x"):
        return False
    if last in FILE_EXTENSION_TLDS:
        return not word.lower().startswith("www.")  # as in `_bare_counts`
    return not is_top_level_domain(last)


def find_urls(
    text: str, *, whole: bool = False, words_only: bool = False, budget: _Budget | None = None
) -> Iterator[Mention]:
    """The URLs and hosts in `text`: in its words, and — unless `words_only` — in the text read as one
    URL when it starts like one (a client given `http://example.org x@evil.ru` goes to evil.ru).
    `whole`: the text is meant as one URL or host (a URL-named argument). A mention with `refused` set
    ends the search."""
    first_sign = _SIGN.search(text)
    if first_sign is None and not whole:
        return  # the common case: no word here can hold a URL or host
    budget = budget or _Budget()
    cleaned = "" if words_only else text.strip(_C0_AND_SPACE).translate(_TAB_NEWLINE)  # as URL parsers do
    if cleaned and (whole or _starts_url(cleaned)):
        for mention in _Reader(cleaned, budget, whole=True, as_host=whole).mentions():
            yield mention
            if mention.refused:
                return
    for word in _words_with_signs(text):
        for mention in budget.word(word):
            yield mention
            if mention.refused:
                return


def _words_with_signs(text: str) -> Iterator[str]:
    """The words of `text` that hold a sign of a URL or host, in one left-to-right pass."""
    pos = 0
    while (sign := _SIGN.search(text, pos)) is not None:
        head = _UP_TO_LAST_SEPARATOR.match(text, pos, sign.start())
        start = head.end() if head else pos
        separator = _SEPARATOR.search(text, sign.end())
        end = separator.start() if separator else len(text)
        yield text[start:end]
        pos = end


def _starts_url(text: str) -> bool:
    match = _SCHEME.match(text)
    if match is not None and _is_url_scheme(text, match):
        return True
    return text[:2] in _DOUBLE_SLASHES


def _is_url_scheme(text: str, match: re.Match[str]) -> bool:
    scheme = match.group(1).lower()
    if scheme in NOT_EGRESS_SCHEMES:
        return False
    return scheme in KNOWN_SCHEMES or text.startswith("//", match.end())


class _Reader:
    """Reads the URLs of one word, or of one whole string (`whole`), left to right. Searches remember
    where they ended, so reading costs time linear in the text's length."""

    def __init__(self, text: str, budget: _Budget, *, whole: bool = False, as_host: bool = False) -> None:
        self.text = _trimmed(text)
        self.budget = budget
        self.whole = whole
        self.as_host = as_host
        self._found: dict[str, tuple[int, int]] = {}
        self._at: dict[int, tuple[int, int]] = {}

    def mentions(self) -> Iterator[Mention]:
        candidates = self._whole() if self.whole else self._word()
        for start, after, scheme, end, bare in candidates:
            self.budget.candidates -= 1
            if self.budget.candidates < 0:
                yield Mention(self.text, start, end, scheme, refused=_TOO_MANY_URLS)
                return
            mention = self._url(start, after, scheme, end, bare=bare)
            if mention is not None:
                yield mention

    def _whole(self) -> Iterator[tuple[int, int, str, int, bool]]:
        text, end = self.text, len(self.text)
        match = _SCHEME.match(text)
        if match is not None and _is_url_scheme(text, match):
            yield 0, match.end(), match.group(1).lower(), end, False
        elif text[:2] in _DOUBLE_SLASHES:
            yield 0, 0, "", end, False
        elif self.as_host:
            yield 0, 0, "", end, True

    def _word(self) -> Iterator[tuple[int, int, str, int, bool]]:
        """Scheme URLs anywhere in the word; `//host` and bare hosts where a segment starts (the word's
        start, or after `=`, `(`, `,`, ...: `url=evil.ru/x`, `[a](evil.ru/x)`)."""
        text = self.text
        taken: set[int] = set()
        for match in _SCHEME.finditer(text):
            if match.group(1).lower() in NOT_EGRESS_SCHEMES:
                taken.add(match.start())  # mailto:bob@example.org is an address, not a host
            elif _is_url_scheme(text, match):
                taken.add(match.start())
                yield match.start(), match.end(), match.group(1).lower(), self._url_end(match.start()), False
        starts = [0, *(m.end() for m in _SEGMENT_BREAK.finditer(text))]
        ends = [*(s - 1 for s in starts[1:]), len(text)]
        for start, end in zip(starts, ends, strict=True):
            if start < end and start not in taken:
                yield start, start, "", end, text[start : start + 2] not in _DOUBLE_SLASHES

    def _url_end(self, start: int) -> int:
        """Where a URL that starts at `start` ends: at the word's end, or where a bracket opened just
        before it closes (`[a](https://example.org)`)."""
        closer = _OPENERS.get(self.text[start - 1]) if start else None
        if closer is None:
            return len(self.text)
        end = self.text.find(closer, start)
        return len(self.text) if end < 0 else end

    def _url(self, start: int, after: int, scheme: str, end: int, *, bare: bool) -> Mention | None:
        """The URL written at `start` whose authority (after the scheme) begins at `after`."""
        special = scheme == "" or scheme in SPECIAL_SCHEMES
        if not special:
            if not self.text.startswith("//", after):
                return Mention(self.text, start, end, scheme)  # data:, javascript:, gopher:x — no host
            after += 2
        elif not bare:
            slashes = _SLASHES.match(self.text, after, end)
            count = slashes.end() - after if slashes else 0
            after += count
            if scheme == "file" and count != 2:
                return Mention(self.text, start, end, scheme)  # file:/x, file:///x — a path, no host
        readings = ["whatwg"]
        term = self._term(after, "whatwg", end)
        if special and term < end and self.text[term] == "\\":  # `http://evil.com\\@example.org/`
            readings.append("rfc")
        hosts: list[str] = []
        for reading in readings:
            host = self._host(after, end, scheme, reading, bare=bare and not self.as_host)
            if isinstance(host, _Refused):
                return Mention(self.text, start, end, scheme, refused=host.reason)
            if host is not None and host not in hosts:
                hosts.append(host)
        if not hosts:
            return Mention(self.text, start, end, scheme) if scheme == "file" else None
        return Mention(self.text, start, end, scheme, tuple(hosts))

    def _host(self, after: int, end: int, scheme: str, reading: str, *, bare: bool) -> str | _Refused | None:
        """The host of the authority at `after` in one reading: WHATWG (a backslash ends it in special
        schemes) or RFC 3986 (only `/`, `?`, `#` do). None: no host."""
        term = self._term(after, reading if scheme == "" or scheme in SPECIAL_SCHEMES else "rfc", end)
        at = self._last_at(after, term)
        host_start = at + 1 if at >= 0 else after
        if term - host_start > MAX_HOSTPORT:
            if self._next("forbidden", host_start) < term:
                return None  # no parser reads a host there
            return _Refused(f"a URL in the arguments has a host longer than {MAX_HOSTPORT} characters")
        hostport = self.text[host_start:term]
        if bare and not _bare_candidate(hostport):
            return None
        if not self.budget.parse(scheme, hostport):
            return _Refused(f"the arguments hold more than {MAX_PARSES} distinct URL hosts")
        host, kind = _rfc_host(hostport) if reading == "rfc" else _parse_host(scheme or "http", hostport)
        if host is not None and bare:
            userinfo = None if at < 0 else self.text.find(":", after, at) >= 0
            if not _bare_counts(host, kind, hostport, userinfo, path=term < end):
                return None
        return host

    def _term(self, after: int, reading: str, end: int) -> int:
        """The first authority terminator at or after `after` (`end` if none comes before it)."""
        return min(self._next(reading, after), end)

    def _next(self, what: str, pos: int) -> int:
        """The first match of `_SEARCHES[what]` at or after `pos` (the text's length if none)."""
        searched, found = self._found.get(what, (-1, -1))
        if not (searched <= pos <= found):
            match = _SEARCHES[what].search(self.text, pos)
            found = match.start() if match else len(self.text)
            self._found[what] = (pos, found)
        return found

    def _last_at(self, after: int, term: int) -> int:
        """The last `@` in [after, term) (-1 if none): the host follows it. Remembered per terminator."""
        cached = self._at.get(term)
        if cached is None or after < cached[0]:
            cached = (after, self.text.rfind("@", after, term))
            self._at[term] = cached
        return cached[1] if cached[1] >= after else -1


def _trimmed(word: str) -> str:
    """The word without trailing punctuation, nor closing brackets that close nothing: `(see evil.ru).`"""
    if not word or (word[-1] not in _TRAILING and word[-1] not in _CLOSERS):
        return word
    counts = {c: word.count(c) for c in (*_CLOSERS, *_CLOSERS.values())}
    end = len(word)
    while end:
        last = word[end - 1]
        if last in _TRAILING:
            end -= 1
        elif last in _CLOSERS and counts[last] > counts[_CLOSERS[last]]:
            counts[last] -= 1
            end -= 1
        else:
            break
    return word[:end]


def _rfc_host(hostport: str) -> tuple[str | None, str]:
    """The host (and its type) as RFC 3986 libraries read it where WHATWG ends the authority earlier,
    at a backslash: `http://evil.com\\@example.org/` is example.org to them."""
    host = hostport if hostport.endswith("]") else hostport.rsplit(":", 1)[0]
    host = host.lower().rstrip(".")
    if not host or _FORBIDDEN.search(host):
        return None, ""
    if "\\" in host:
        return host, "name"  # no DNS name, but the client may try it: never granted short of `*`
    parsed, kind = _parse_host("http", host)
    return parsed or host, kind or "name"


def _bare_candidate(hostport: str) -> bool:
    """A cheap first look: could this name a host at all (a dot, an IP, an encoded name)?"""
    return (
        "." in hostport
        or hostport.startswith("[")
        or "%" in hostport
        or not hostport.isascii()
        or hostport.lower().startswith("localhost:")
    )


def _bare_counts(host: str, kind: str, hostport: str, userinfo: bool | None, *, path: bool) -> bool:
    """Whether a host written without a scheme or `//` counts as one (free text: `see evil.ru/x`).
    `userinfo`: None, or whether the user part before `@` has a password; `path`: a path follows."""
    raw = hostport if hostport.endswith("]") or ":" not in hostport else hostport.rsplit(":", 1)[0]
    port = raw != hostport
    if userinfo is False and not (path or port):
        return False  # an e-mail address
    if kind == "ipv6":
        return True
    if kind == "ipv4":  # `1.2` or `3.50/kg` are numbers to a reader, not addresses
        return bool(_DOTTED_QUAD.fullmatch(raw)) or "0x" in raw.lower() or port
    labels = host.split(".")
    if len(labels) < 2:
        return host == "localhost" and (port or path)
    tld = labels[-1]
    if not is_top_level_domain(tld):
        return False
    if tld in FILE_EXTENSION_TLDS:
        return path or port or bool(userinfo) or host.startswith("www.")
    return True


# Egress of a call -------------------------------------------------------------------------------------
@dataclass
class Egress:
    """The targets the arguments of one call name, and why they could not all be read (fail closed)."""

    targets: set[Target] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)

    @property
    def hosts(self) -> set[str]:
        return {t.host for t in self.targets if t.host is not None}


def call_egress(arguments: Any) -> Egress:
    """Every target named anywhere in `arguments` (nested values, keys and free text)."""
    egress = Egress()
    budget = _Budget(MAX_PARSES)
    for text, whole in _texts(arguments, "", 0):
        if text is None:
            egress.problems.append(f"the arguments nest deeper than {MAX_DEPTH} levels")
            return egress
        for mention in find_urls(text, whole=whole, budget=budget):
            if mention.refused:
                egress.problems.append(mention.refused)
                return egress
            egress.targets.update(Target(mention.scheme, h) for h in mention.hosts or (None,))
            if len(egress.targets) > MAX_TARGETS:
                egress.problems.append(f"the arguments name more than {MAX_TARGETS} distinct URL targets")
                return egress
    return egress


def _texts(value: Any, key: str, depth: int) -> Iterator[tuple[str | None, bool]]:
    """(text, is a whole URL) for each string in `value`; (None, False) where nesting goes too deep."""
    if depth > MAX_DEPTH:
        yield None, False
        return
    if isinstance(value, str):
        yield value, _names_url(key)
    elif isinstance(value, int | float) and not isinstance(value, bool) and _names_url(key):
        yield str(value), True  # url=2130706433
    elif isinstance(value, Mapping):
        for name, item in value.items():
            yield str(name), False
            yield from _texts(item, str(name), depth + 1)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _texts(item, key, depth + 1)


@lru_cache(maxsize=4096)
def _names_url(key: str) -> bool:
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", key).lower().replace("-", "_").split("_")
    return words[-1] in URL_ARGUMENT_WORDS


def mentions_for_values(text: str) -> Iterator[Mention]:
    """The URLs with hosts in a content text, for value provenance (bounds as for a call's arguments;
    past them the rest of the text adds no URL values)."""
    for mention in find_urls(text, words_only=True):
        if mention.refused:
            return
        if mention.hosts:
            yield mention


is_top_level_domain("org")  # loads the suffix list now, at import, rather than during a request
