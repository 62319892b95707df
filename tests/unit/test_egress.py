"""Egress (ztai.identity.egress and the grant check): URLs and hosts read as clients read them.

Every string a bypass attempt could hide a host in is denied with egress ["example.org"]; the controls
(granted hosts, file names, e-mail addresses, plain prose) stay allowed.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from ztai.errors import GrantError
from ztai.identity.egress import (
    MAX_HOSTPORT,
    MAX_TARGETS,
    Target,
    call_egress,
    entry_covered,
    find_urls,
    parse_entry,
    target_allowed,
)
from ztai.identity.grants import GrantRequest, TaskGrant, attenuate, check_arguments

GRANT = TaskGrant(tools=("web/*",), egress=("example.org",))


def problems(arguments: dict[str, Any], grant: TaskGrant = GRANT) -> list[str]:
    return grant.check_call("web", "fetch", arguments)


# Bypasses: each one must be denied ------------------------------------------------------------------
BYPASSES = [
    # the measured ones
    ("backslash-userinfo", "http://evil.com\\@example.org/", "evil.com"),
    ("bare-ru", "evil.ru/x", "evil.ru"),
    ("bare-ip", "127.0.0.1/x", "127.0.0.1"),
    ("scheme-relative", "//evil.ru/x", "evil.ru"),
    ("file", "file:///etc/passwd", "file: URLs"),
    ("past-100k", "x" * 100_001 + " https://evil.ru/", "evil.ru"),
    # schemes and slashes as WHATWG reads them
    ("mixed-case-scheme", "HtTp://evil.ru/", "evil.ru"),
    ("no-slashes", "http:evil.ru", "evil.ru"),
    ("slash-backslash", "http:/\\evil.ru", "evil.ru"),
    ("backslashes", "https:\\\\evil.ru\\x", "evil.ru"),
    ("unc", "\\\\evil.ru\\share", "evil.ru"),
    ("many-slashes", "http:///evil.ru/", "evil.ru"),
    # confusing authorities
    ("suffix-trick", "https://example.org.evil.ru/", "example.org.evil.ru"),
    ("userinfo", "https://example.org@evil.ru/", "evil.ru"),
    ("userinfo-password", "https://example.org:pw@evil.ru/", "evil.ru"),
    ("fragment-at", "https://evil.ru#@example.org", "evil.ru"),
    ("query-at", "https://evil.ru?x=@example.org", "evil.ru"),
    ("rfc-reading", "https://example.org\\@evil.ru/", "evil.ru"),
    ("space-in-userinfo", "http://example.org x@evil.ru", "evil.ru"),
    # encodings of the host
    ("idna-lookalike", "https://ex\u0430mple.org/", "xn--exmple-4nf.org"),
    ("percent-encoded", "http://%65vil.ru/", "evil.ru"),
    ("percent-dot", "http://evil%2Eru/", "evil.ru"),
    ("fullwidth", "\uff45\uff56\uff49\uff4c\uff0e\uff52\uff55/x", "evil.ru"),
    ("ideographic-dot", "evil\u3002ru/x", "evil.ru"),
    ("soft-hyphens", "http://e\u00ad\u00advil.ru/", "evil.ru"),
    ("trailing-dot", "https://evil.ru./", "evil.ru"),
    ("tab-inside", "http://ev\til.ru/", "evil.ru"),
    ("newline-inside", "https://exa\nmple.org.evil.ru/", "example.org.evil.ru"),
    ("leading-controls", "\x01\x02 https://evil.ru/", "evil.ru"),
    ("punycode-bare", "xn--80ak6aa92e.xn--p1ai/x", "xn--80ak6aa92e.xn--p1ai"),
    # IP literals in any notation
    ("ip-hex", "http://0x7f.1/", "127.0.0.1"),
    ("ip-decimal", "http://2130706433/", "127.0.0.1"),
    ("ip-octal", "0177.0.0.1/x", "127.0.0.1"),
    ("ip-hex-bare", "see 0x7f.1", "127.0.0.1"),
    ("ipv6", "http://[::1]/", "[::1]"),
    ("ipv6-mapped-bare", "[::ffff:127.0.0.1]/x", "[::ffff:7f00:1]"),
    ("localhost-port", "localhost:8080/admin", "localhost"),
    # other schemes
    ("ftp", "ftp://example.org/x", "ftp://example.org"),
    ("gopher", "gopher://example.org/", "gopher://example.org"),
    ("ws", "ws://example.org/socket", "ws://example.org"),
    ("data", "data:text/html,<script>x</script>", "data: URLs"),
    ("javascript", "javascript:alert(1)", "javascript: URLs"),
    ("unknown-scheme", "foo://evil.ru/x", "foo://evil.ru"),
    # free text and any TLD
    ("prose", "please see evil.ru/x for details", "evil.ru"),
    ("zip-tld-with-path", "evil.zip/payload", "evil.zip"),
    ("md-tld-www", "www.notes.md", "www.notes.md"),
    ("markdown-link", "[docs](https://evil.ru)", "evil.ru"),
    ("after-equals", "url=evil.ru/x", "evil.ru"),
    ("user-password", "user:pw@evil.ru", "evil.ru"),
    ("open-redirect", "https://example.org/go?to=https://evil.ru/", "evil.ru"),
    ("json-in-text", '{"u": "https://evil.ru/x"}', "evil.ru"),
    ("host-at-the-end", "a " * 200_000 + "evil.ru/x", "evil.ru"),
]


@pytest.mark.parametrize(("text", "named"), [(t, n) for _, t, n in BYPASSES], ids=[i for i, _, _ in BYPASSES])
def test_bypass_is_denied(text: str, named: str) -> None:
    found = problems({"body": text})
    assert any(named in p for p in found), found


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        pytest.param({"url": "evil.ai"}, "evil.ai", id="url-argument-file-extension-tld"),
        pytest.param({"url": "127.1"}, "127.0.0.1", id="url-argument-short-ip"),
        pytest.param({"imageUrl": 2130706433}, "127.0.0.1", id="url-argument-number"),
        pytest.param({"host": "intranet"}, "intranet", id="host-argument-single-label"),
        pytest.param({"options": {"links": ["ok", "evil.ru"]}}, "evil.ru", id="nested-list"),
        pytest.param({"https://evil.ru/": "x"}, "evil.ru", id="in-a-key"),
    ],
)
def test_values_meant_as_urls_and_nested_values_are_read(arguments: dict[str, Any], named: str) -> None:
    found = problems(arguments)
    assert any(named in p for p in found), found


# Controls: each one stays allowed ---------------------------------------------------------------------
CONTROLS = [
    "https://example.org/x",
    "http://EXAMPLE.org./",
    "HTTPS://example.org:443/a?b=c#d",
    "https://example.org/a\\b",  # a backslash in the path of a granted host
    "see the attached notes.md",
    "report.zip, main.py and setup.sh are attached",
    "docs/notes.md and ./src/main.rs",
    "C:\\Users\\emma\\notes.md",
    "mail bob@evil.ru about it",  # e-mail addresses are recipients, checked by constraints/provenance
    "mailto:bob@evil.ru",
    "tel:+4930123456",
    "version 1.2.3 costs 3.50 (about 1.5%)",
    "e.g. this, i.e. that. Note: a key:value pair.",
    "(see https://example.org).",
    "[docs](https://example.org/docs)",
    "plain text without a single address in it",
    "\u043f\u0440\u0438\u0432\u0435\u0442, \u0442.\u0435. \u043c\u0438\u0440",  # Cyrillic prose with an abbreviation (t.e.)
]


@pytest.mark.parametrize("text", CONTROLS)
def test_control_is_allowed(text: str) -> None:
    assert problems({"body": text}) == []


def test_subdomains_only_with_a_wildcard_entry() -> None:
    assert problems({"url": "https://sub.example.org/"}) == [
        "egress to host sub.example.org is not granted to this task"
    ]
    wildcard = TaskGrant(tools=("web/*",), egress=("*.example.org",))
    assert problems({"url": "https://sub.example.org/"}, wildcard) == []
    assert problems({"url": "https://example.org/"}, wildcard) != []  # *.domain: subdomains only


def test_egress_context_hosts() -> None:
    egress = call_egress({"a": "https://Example.org./x", "b": "see evil.ru/x and ftp://f.example.org"})
    assert egress.hosts == {"example.org", "evil.ru", "f.example.org"}
    assert Target("ftp", "f.example.org") in egress.targets and not egress.problems


# Schemes in grant entries ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("entry", "canonical"),
    [
        ("Example.org.", "example.org"),
        ("*.Bücher.de", "*.xn--bcher-kva.de"),
        ("*", "*"),
        ("FTP://files.example.org", "ftp://files.example.org"),
        ("wss://*", "wss://*"),
        ("data:", "data:"),
        ("0x7f.1", "127.0.0.1"),
    ],
)
def test_egress_entries_are_canonical(entry: str, canonical: str) -> None:
    assert parse_entry(entry) == canonical


@pytest.mark.parametrize(
    "entry",
    ["example.org/x", "example.org:8080", "http://", "a b", "*.*.example.org", "user@example.org", ""],
)
def test_malformed_egress_entries_are_refused(entry: str) -> None:
    with pytest.raises(ValueError, match="egress entry"):
        parse_entry(entry)
    with pytest.raises(GrantError, match="egress entry"):
        GrantRequest.parse({"type": "ztai_task", "egress": [entry]})


def test_scheme_entries_allow_only_their_scheme() -> None:
    grant = TaskGrant(
        tools=("web/*",), egress=("ftp://files.example.org", "data:", "https://api.example.org")
    )
    assert problems({"u": "ftp://files.example.org/a", "d": "data:text/plain,hi"}, grant) == []
    assert problems({"u": "https://files.example.org/a"}, grant) != []  # ftp only
    assert problems({"u": "https://api.example.org/v1"}, grant) == []
    assert problems({"u": "http://api.example.org/v1"}, grant) != []  # https only
    assert problems({"u": "see api.example.org/v1"}, grant) != []  # no scheme written: http or https
    assert problems({"u": "javascript:alert(1)"}, grant) == [
        "egress to javascript: URLs is not granted to this task"
    ]


def test_plain_entries_mean_http_and_https() -> None:
    assert target_allowed(Target("", "example.org"), ("example.org",))
    assert target_allowed(Target("https", "example.org"), ("example.org",))
    assert not target_allowed(Target("ws", "example.org"), ("example.org",))
    assert not target_allowed(Target("", "example.org"), ("https://example.org",))
    assert target_allowed(Target("", "example.org"), ("https://example.org", "http://example.org"))


def test_delegated_egress_never_widens() -> None:
    parent = TaskGrant(tools=("web/*",), egress=("*.example.org", "ftp://files.example.org"))
    assert entry_covered("https://api.example.org", parent.egress)
    assert entry_covered("ftp://files.example.org", parent.egress)
    assert not entry_covered("ftp://other.example.org", parent.egress)
    assert not entry_covered("data:", parent.egress)
    assert not entry_covered("ws://api.example.org", parent.egress)
    child = attenuate(parent, GrantRequest.parse({"type": "ztai_task", "egress": ["https://a.example.org"]}))
    assert child.egress == ("https://a.example.org",)
    with pytest.raises(GrantError, match="egress exceeds"):
        attenuate(parent, GrantRequest.parse({"type": "ztai_task", "egress": ["gopher://a.example.org"]}))


# The hosts constraint reads values with the same parser -------------------------------------------------
@pytest.mark.parametrize(
    ("value", "allowed"),
    [
        ("https://api.example.org/v1", True),
        ("api.example.org", True),
        ("http://evil.com\\@api.example.org/", False),
        ("https://api.example.org@evil.ru/", False),
        ("//evil.ru/x", False),
        ("https://api.example.org/ and evil.ru/x", False),
        ("not a url", False),
    ],
)
def test_hosts_constraint(value: str, allowed: bool) -> None:
    request = GrantRequest.parse(
        {"type": "ztai_task", "constraints": {"web/fetch": {"url": [{"hosts": ["*.example.org"]}]}}}
    )
    violations = check_arguments(request.constraints["web/fetch"], {"url": value})
    assert (violations == []) is allowed


def test_hosts_constraint_takes_no_schemes() -> None:
    with pytest.raises(GrantError, match="no scheme"):
        GrantRequest.parse(
            {"type": "ztai_task", "constraints": {"web/fetch": {"url": [{"hosts": ["ftp://x.org"]}]}}}
        )


# Bounds: fail closed, never truncated ------------------------------------------------------------------------
def test_a_huge_host_is_refused_not_skipped() -> None:
    padded = "http://e" + "\u00ad" * (MAX_HOSTPORT + 10) + "vil.ru/"  # soft hyphens vanish in IDNA
    assert any("longer than" in p for p in problems({"url": padded}))


def test_too_many_targets_is_refused() -> None:
    text = " ".join(f"https://h{i}.example.org/" for i in range(MAX_TARGETS + 5))
    wildcard = TaskGrant(tools=("web/*",), egress=("*",))
    assert any("distinct URL targets" in p for p in problems({"body": text}, wildcard))


def test_too_deep_nesting_is_refused() -> None:
    value: Any = "https://evil.ru/"
    for _ in range(40):
        value = [value]
    assert any("nest deeper" in p for p in problems({"body": value}))


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("http:" * 200_000, id="schemes-without-end"),
        pytest.param("http:/" * 160_000, id="many-urls-in-one-word"),
        pytest.param("=a.de" * 200_000, id="many-segments"),
        pytest.param("a.bb " * 200_000, id="repeated-hosts"),
        pytest.param(" ".join(f"%61{i}.md" for i in range(90_000)), id="distinct-encoded-hosts"),
        pytest.param("(" * 1_000_000, id="open-brackets"),
        pytest.param("a." * 500_000, id="one-long-dotted-word"),
    ],
)
def test_adversarial_megabyte_is_read_in_bounded_time(text: str) -> None:
    started = time.perf_counter()
    call_egress({"body": text})
    assert time.perf_counter() - started < 5.0  # linear: a quadratic reading would take minutes


def test_find_urls_yields_urls_for_provenance() -> None:
    mentions = list(find_urls("go to www.evil.com now, or https://x.org/p.", words_only=True))
    assert [(m.url, m.hosts) for m in mentions] == [
        ("www.evil.com", ("www.evil.com",)),
        ("https://x.org/p", ("x.org",)),
    ]
