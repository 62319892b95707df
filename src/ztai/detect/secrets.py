"""Secrets detector: credentials, keys and tokens in prompts, documents, tool results and model output.

Provider formats come first from the rules vendored from kingfisher (`ztai.detect.secret_rules`,
~900 rules run by RE2; the finding's span is the rule's capture group). ztai's own layers below add what
a rule table cannot: private key blocks up to their END line (`open_private_key` for streams), JWTs
whose parts decode, URL passwords and Authorization headers cut to the secret, ztai's earlier provider
formats where kingfisher has none, and the generic context and entropy checks. Where findings overlap,
the stronger wins (keys, JWTs, URL/header credentials; then vendored rules; then ztai's formats; then
assignments; then entropy):

1. **Structured tokens** — the vendored rules (AWS, GitHub, GitLab, Slack, Stripe, OpenAI, Anthropic,
   Google, Azure… ~900 formats; score 1.0, 0.7 for upstream "low" confidence) and ztai's own: PEM/
   OpenSSH/SSH2/PuTTY private keys, JWTs whose header and payload decode to JSON, passwords in URLs,
   `Authorization: Basic|Bearer` headers, Azure SAS signatures, Slack webhooks, and the formats
   kingfisher lacks (GitHub fine-grained PATs, GitLab's newer prefixes, OpenAI project keys, Twilio,
   Mailchimp, npm/.npmrc, Discord, Artifactory, IBM COS, SoftLayer, GCP key ids, Stripe test keys, AWS
   `ABIA`/`ACCA` key ids, TestPyPI tokens, bare Telegram bot tokens).
   A token whose body looks like a placeholder (`AKIAXXXXXXXXXXXXXXXX`, `…EXAMPLE…`, `user:password@`,
   a lone `BEGIN … PRIVATE KEY` line, a plain word) is still reported, at score 0.4, so a policy can
   tell documentation examples from live keys (`SecretsDetector(min_score=0.5)` drops them); a vendored
   rule's capture that is a template or a snake_case identifier is dropped.
2. **Credential assignments** — a credential-named key (`password`, `db_pass`, `client_secret`,
   `api_key`, `authToken`, `--softlayer-api-key`, `пароль`…) bound to a literal in code, config or prose:
   `k = "v"`, `k: v`, `k := v`, `k => "v"`, `"k": "v"`, `k: str = "v"`, `k("v")`, `k == "v"`,
   `"v" != k`, `<k>v</k>`, `?k=v&…`, `K=v;` (connection strings), `k is v`. Key names that describe a
   secret rather than hold one (`password_file`, `token_url`, `max_tokens`, `public_key`, `eos_token`)
   do not count. The value must not be a reference or a placeholder: variables and templates (`${VAR}`,
   `{{x}}`, `<your-key>`, `%s`, `$VAR`, `:name`, `os.environ[...]`, `getenv()`, `x = y;`), dummy words
   (`example`, `changeme`, `fake`, `xxxx`, `None`…), identifier-like words (`real_key`), values without
   a letter or digit. Score 0.55 to 0.8.
3. **High-entropy strings with context** — a base64/hex run shortly after a token or password keyword
   whose Shannon entropy is high for its length and alphabet (hashes, UUIDs and `data:` URIs are not
   secrets). Score 0.5.

`source` does not change the rules. Work is linear in the text: vendored rules run under RE2, ztai's
regexes have bounded repetition, the
keyword layer reads a bounded window per key name and never re-reads text an earlier key consumed, and
values are capped at `_MAX_VALUE` characters. Evidence holds the rule name and a masked preview (at most
a fifth of the value, 4 characters each end) — never the value.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from ztai.detect.base import Finding, Source
from ztai.detect.secret_rules import load_rules, read_rule_file

__all__ = ["SECRET_TYPES", "SecretsDetector"]

_MAX_VALUE = 512  # longest value (characters) analysed by the keyword and entropy layers
_MAX_IDENT = 64  # longest key name considered on each side of a keyword hit
_ENTROPY_REACH = 64  # how far after a keyword a high-entropy string may start
_PLACEHOLDER_SCORE = 0.4

_A = re.ASCII
_AI = re.ASCII | re.IGNORECASE

# ---------------------------------------------------------------------------------------------------
# Value heuristics
# ---------------------------------------------------------------------------------------------------

_DUMMY_RE = re.compile(
    r"example|sample|dummy|fake|placeholder|change[_\-. ]?(?:me|it|this)|redacted|replace[_\-. ]?me"
    r"|insert|your[_\-. ]|^your|xxxx|\*\*\*|\.\.\.|…|lorem|foo[_\-]?bar|(?<![a-z])here(?![a-z])"
    r"|not[_\-. ]?a[_\-. ]?(?:real|valid)",
    _AI,
)
_DUMMY_EXACT = frozenset(
    {
        "none", "null", "nil", "undefined", "true", "false", "yes", "no", "on", "off", "empty",
        "password", "passwd", "pass", "pwd", "secret", "token", "key", "apikey", "api_key", "string", "str",
        "value",
        "test", "testing", "admin", "root", "user", "username", "default", "required", "optional",
        "hidden", "masked", "unknown", "todo", "tbd", "n/a", "na",
    }
)  # fmt: skip
_TEMPLATE_RE = re.compile(
    r"\$\{[^}]*\}|\{\{.*\}\}|\{%.*%\}|<%.*%>|#\{[^}]*\}|\$\([^)]*\)|\[\[.*\]\]|<[^<>]*>"
    r"|%\(?[A-Za-z_]*\)?[sdr]|%[A-Za-z_][A-Za-z0-9_]*%|\$[A-Za-z_][A-Za-z0-9_]*|\{[A-Za-z_][A-Za-z0-9_.]*\}"
    r"|@[A-Za-z_][A-Za-z0-9_]*@|__[A-Z0-9_]+__|:[A-Za-z_][A-Za-z0-9_]*|![a-z][a-z_/.\-]*",
    _A,
)
_CODE_REF_RE = re.compile(
    r"[A-Za-z_$][A-Za-z0-9_$]*(?:(?:\.|::|->)[A-Za-z_$][A-Za-z0-9_$]*)+(?:\(.*|\[.*)?"  # a.b.c, a.b()
    r"|[A-Za-z_$][A-Za-z0-9_$.]*\s*[(\[].*",  # call or index: getenv("X"), env["X"]
    _A,
)
_PATH_RE = re.compile(
    r"(?:[a-z][a-z0-9+.\-]*://|/|\./|\.\./|~/|[A-Za-z]:\\).*"
    r"|.*\.(?:json|pem|key|crt|cer|p12|pfx|txt|ya?ml|env|ini|cfg|conf|toml|xml|gpg|asc|der|jks)",
    _AI,
)
_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", _AI)
_HEX_RE = re.compile(r"[0-9a-f]+|[0-9A-F]+", _A)
_WORDLIKE_RE = re.compile(r"[A-Za-z][A-Za-z _.\-]*", _A)
_CAMEL_WORD_RE = re.compile(r"[A-Z]?[a-z]{2,}|[A-Z]{2,}", _A)
_SAME_RUN_RE = re.compile(r"(.)\1{5,}", re.DOTALL)


def _entropy(value: str) -> float:
    """Shannon entropy in bits per character."""
    n = len(value)
    if n == 0:
        return 0.0
    return -sum(c / n * math.log2(c / n) for c in Counter(value).values())


def _char_classes(value: str) -> int:
    lower = upper = digit = other = 0
    for ch in value:
        if "a" <= ch <= "z":
            lower = 1
        elif "A" <= ch <= "Z":
            upper = 1
        elif "0" <= ch <= "9":
            digit = 1
        elif not ch.isspace():
            other = 1
    return lower + upper + digit + other


def _has_alnum(value: str) -> bool:
    return any(ch.isalnum() for ch in value)


def _is_dummy(value: str) -> bool:
    """A documentation or test stand-in rather than a real credential."""
    low = value.lower().strip()
    if low in _DUMMY_EXACT or len(set(low)) <= 2:
        return True
    return _DUMMY_RE.search(value) is not None or _SAME_RUN_RE.search(value) is not None


def _is_template(value: str) -> bool:
    """The whole value is a variable, template expression or format placeholder."""
    return _TEMPLATE_RE.fullmatch(value.strip()) is not None


def _is_wordlike(value: str) -> bool:
    """Words and identifiers (`real_key`, `insert key here`, `notapassword`), not a random string.

    Letters and separators only; several words up to 20 characters (longer is a passphrase), or a single
    word shorter than 16 characters (longer is not a dictionary word).
    """
    if _WORDLIKE_RE.fullmatch(value) is None:
        return False
    parts = [p for p in re.split(r"[ _.\-]+", value) if p]
    words: list[str] = []
    for part in parts:
        camel = _CAMEL_WORD_RE.findall(part)
        if "".join(camel) != part:
            return False  # single letters between capitals: xKqPzRtW
        words.extend(camel)
    if len(words) >= 2:
        return len(value) < 20
    return len(value) < 16


def _is_placeholder_token(value: str) -> bool:
    """Placeholder body in an otherwise well-formed token (used to lower, not drop, structured hits)."""
    if value.lower() in _DUMMY_EXACT:  # `user:password@host`
        return True
    return _SAME_RUN_RE.search(value) is not None or _DUMMY_RE.search(value) is not None


def _mask(value: str) -> str:
    """`AKIA…WXYZ (20 chars)`: at most a fifth of the value, never more than 4 characters each end."""
    n = len(value)
    k = min(4, n // 5)
    if k == 0:
        return f"… ({n} chars)"
    return f"{value[:k]}…{value[-k:]} ({n} chars)"


# ---------------------------------------------------------------------------------------------------
# Layer 1: structured tokens
# ---------------------------------------------------------------------------------------------------

Check = Callable[[re.Match[str]], bool]


@dataclass(frozen=True, slots=True)
class _TokenRule:
    rule: str  # rule name, reported in evidence
    type: str  # finding type
    pattern: re.Pattern[str]  # group "v" (if any) is the secret value, else the whole match
    hints: tuple[str, ...]  # substrings, one of which every match contains (lower-case if IGNORECASE)
    score: float
    check: Check | None = None


def _b64url_json(part: str) -> object:
    raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    return json.loads(raw.decode("utf-8"))


def _valid_jwt(m: re.Match[str]) -> bool:
    parts = m.group(0).split(".")
    try:
        header = _b64url_json(parts[0])
        payload = _b64url_json(parts[1])
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return False
    return isinstance(header, dict) and ("alg" in header or "typ" in header) and isinstance(payload, dict)


def _has_lower_or_digit(m: re.Match[str]) -> bool:
    body = m.group("v")[3:]
    return any(ch.islower() or ch.isdigit() for ch in body)


_SCHEME_RE = re.compile(r"(?<![A-Za-z0-9+.\-])[A-Za-z][A-Za-z0-9+.\-]{0,19}\Z", _A)


def _url_password(m: re.Match[str]) -> bool:
    """`scheme://user:password@host`, not `host:port@…` (a port) or a template."""
    text = m.string
    if _SCHEME_RE.search(text, max(0, m.start() - 21), m.start()) is None:
        return False
    value = m.group("v")
    return not (value.isdigit() and len(value) <= 5) and _has_alnum(value) and not _is_template(value)


def _not_template(m: re.Match[str]) -> bool:
    value = m.group("v")
    return _has_alnum(value) and not _is_template(value)


def _basic_auth_header(m: re.Match[str]) -> bool:
    try:
        decoded = base64.b64decode(m.group("v"), validate=True).decode("utf-8")
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return False
    return ":" in decoded and len(decoded) > 2


def _bearer(m: re.Match[str]) -> bool:
    value = m.group("v")
    return _char_classes(value) >= 2 and not _is_wordlike(value) and not _is_template(value)


_B = r"(?<![A-Za-z0-9_\-])"  # left boundary for tokens made of [A-Za-z0-9_-]
_E = r"(?![A-Za-z0-9_\-])"  # right boundary
_TOK = r"[A-Za-z0-9_\-]"


def _rule(
    rule: str,
    kind: str,
    pattern: str,
    hints: tuple[str, ...],
    score: float,
    check: Check | None = None,
    flags: re.RegexFlag = _A,
) -> _TokenRule:
    return _TokenRule(rule, kind, re.compile(pattern, flags), hints, score, check)


_TOKEN_RULES: tuple[_TokenRule, ...] = (
    _rule(
        "pem-private-key",
        "PRIVATE_KEY",
        r"(?:-{4,5} ?)?BEGIN[ A-Z0-9]{0,30} PRIVATE KEY(?: BLOCK)?(?: ?-{4,5})?",
        ("PRIVATE KEY",),
        1.0,
    ),
    _rule("putty-private-key", "PRIVATE_KEY", r"PuTTY-User-Key-File-\d: ?[^\s]{1,64}", ("PuTTY-",), 1.0),
    _rule(
        "gcp-service-account-key-id",
        "GCP_SERVICE_ACCOUNT",
        r"[\"']private_key_id[\"']\s{0,4}:\s{0,4}[\"'](?P<v>[0-9a-f]{40})[\"']",
        ("private_key_id",),
        0.9,
    ),
    _rule(
        "azure-sas-signature",
        "AZURE_SAS_TOKEN",
        r"[?&]sv=\d{4}-\d\d-\d\d&[^\s\"'<>]{0,400}?[?&]sig=(?P<v>[A-Za-z0-9%+/]{30,100}(?:%3D|=){0,2})",
        ("sig=",),
        0.9,
        flags=_AI,
    ),
    _rule(
        "github-fine-grained-pat",
        "GITHUB_TOKEN",
        _B + r"(?P<v>github_pat_[A-Za-z0-9]{22}_[A-Za-z0-9]{59})" + _E,
        ("github_pat_",),
        1.0,
    ),
    _rule(
        "gitlab-token",
        "GITLAB_TOKEN",
        _B
        + rf"(?P<v>(?:glpat|gldt|glsoat|glrt|glft|glffct|glcbt)-(?:[0-9a-fA-F]{{1,5}}_)?{_TOK}{{20,50}}"
        + rf"|glimt-{_TOK}{{25}}|glptt-{_TOK}{{40}}|glagent-{_TOK}{{50,1024}}|gloas-{_TOK}{{64}}"
        + rf"|GR1348941{_TOK}{{20,50}})"
        + _E,
        ("gl", "GR1348941"),
        1.0,
    ),
    _rule(
        "slack-webhook",
        "SLACK_WEBHOOK",
        r"hooks\.slack\.com/(?P<v>(?:services|workflows|triggers)/[A-Za-z0-9_/+\-]{20,150})",
        ("hooks.slack.com",),
        1.0,
        flags=_AI,
    ),
    _rule(
        "stripe-test-key",
        "STRIPE_KEY",
        r"(?<![A-Za-z0-9])(?P<v>(?:sk|rk)_test_[A-Za-z0-9]{16,247})(?![A-Za-z0-9])",
        ("_test_",),
        0.6,
    ),
    _rule(
        "openai-api-key",
        "OPENAI_API_KEY",
        _B + rf"(?P<v>sk-(?:(?:proj|svcacct|admin|None)-)?{_TOK}{{10,200}}T3BlbkFJ{_TOK}{{10,200}})" + _E,
        ("T3BlbkFJ",),
        1.0,
    ),
    _rule(
        "twilio-key",
        "TWILIO_KEY",
        r"(?<![A-Za-z0-9])(?P<v>(?:AC|SK)[a-z0-9]{32})(?![A-Za-z0-9])",
        ("AC", "SK"),
        0.8,
    ),
    _rule(
        "mailchimp-api-key",
        "MAILCHIMP_KEY",
        r"(?<![A-Za-z0-9])(?P<v>[0-9a-f]{32}-us[0-9]{1,2})(?![A-Za-z0-9])",
        ("-us",),
        0.9,
    ),
    _rule("npm-token", "NPM_TOKEN", _B + r"(?P<v>npm_[A-Za-z0-9]{36})" + _E, ("npm_",), 1.0),
    _rule(
        "npmrc-auth-token",
        "NPM_TOKEN",
        r"(?<![A-Za-z0-9_/:])//[A-Za-z0-9][^\s/:]{0,100}(?:/[^\s:]{0,100})?/:_authToken="
        r"\s{0,4}(?P<v>[^\s\"']{8,256})",
        ("_authToken",),
        0.9,
        _not_template,
    ),
    _rule(
        "discord-bot-token",
        "DISCORD_TOKEN",
        _B + rf"(?P<v>[MNO]{_TOK}{{23,25}}\.{_TOK}{{6}}\.(?:{_TOK}{{38}}|{_TOK}{{27}}))" + _E,
        (".",),
        0.9,
    ),
    _rule(
        "artifactory-token",
        "ARTIFACTORY_TOKEN",
        r"(?<![A-Za-z0-9+/])(?P<v>AKC[A-Za-z0-9]{10,200}|AP[0-9A-F][A-Za-z0-9]{8,200})(?![A-Za-z0-9+/=])",
        ("AKC", "AP"),
        0.8,
        _has_lower_or_digit,
    ),
    _rule(
        "ibm-cos-hmac-secret",
        "IBM_COS_HMAC_KEY",
        r"secret[_\-]?(?:access[_\-]?)?key[\"'`]?\s{0,4}(?::=|=|:)\s{0,4}[\"'`]?"
        r"(?P<v>[0-9a-f]{48})(?![A-Za-z0-9_\-])",
        ("secret",),
        0.9,
        flags=_AI,
    ),
    _rule(
        "softlayer-api-key",
        "SOFTLAYER_API_KEY",
        r"(?<![A-Za-z0-9])(?:softlayer|sl)[_\-]?(?:api)?[_\-]?(?:key|pwd|password|pass)[\"'`]?\s{0,4}"
        r"(?::=|=|:|\s)\s{0,4}[\"'`]?(?P<v>[a-z0-9]{64})(?![A-Za-z0-9])"
        r"|api\.softlayer\.com/(?:soap|rest)/v3(?:\.1)?/(?P<u>[a-z0-9]{64})(?![A-Za-z0-9])",
        ("softlayer", "sl_", "sl-", "slapi", "slkey", "slpwd", "slpass"),
        0.9,
        flags=_AI,
    ),
    _rule(
        "aws-access-key-id",
        "AWS_ACCESS_KEY",
        r"(?<![A-Za-z0-9])(?P<v>(?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z0-9]{16})(?![A-Za-z0-9])",
        ("AKIA", "ASIA", "ABIA", "ACCA", "A3T"),
        1.0,
    ),
    _rule(
        "pypi-token",
        "PYPI_TOKEN",
        _B + rf"(?P<v>pypi-(?:AgEIcHlwaS5vcmc|AgENdGVzdC5weXBpLm9yZw){_TOK}{{70,1000}})" + _E,
        ("pypi-",),
        1.0,
    ),
    _rule(
        "telegram-bot-token",
        "TELEGRAM_TOKEN",
        r"(?:(?<=/bot)|(?<![A-Za-z0-9_:]))(?P<v>[0-9]{8,10}:AA[0-9A-Za-z_\-]{33})" + _E,
        (":AA",),
        0.9,
    ),
    _rule(
        "password-in-url",
        "BASIC_AUTH_URL",
        r"(?<=[A-Za-z0-9])://[^\s:@/?#\"'<>`]{0,128}:"  # scheme checked by _url_password
        r"(?P<v>[^\s:@/?#\"'<>`]{1,256})@[A-Za-z0-9\[\-][^\s/?#\"'<>`]{0,256}",
        ("://",),
        0.9,
        _url_password,
    ),
    _rule(
        "authorization-basic",
        "AUTHORIZATION_HEADER",
        r"Authorization[\"']?\s{0,4}[:=]\s{0,4}[\"']?Basic\s{1,4}"
        r"(?P<v>[A-Za-z0-9+/]{8,512}={0,2})(?![A-Za-z0-9+/=])",
        ("basic",),
        0.9,
        _basic_auth_header,
        flags=_AI,
    ),
    _rule(
        "authorization-bearer",
        "AUTHORIZATION_HEADER",
        r"(?<![A-Za-z0-9])Bearer\s{1,4}(?P<v>[A-Za-z0-9\-._~+/]{16,2048}={0,2})(?![A-Za-z0-9\-._~+/=])",
        ("bearer",),
        0.8,
        _bearer,
        flags=_AI,
    ),
    _rule(
        "jwt",
        "JWT",
        rf"(?<![A-Za-z0-9_\-])eyJ{_TOK}{{8,4096}}\.{_TOK}{{4,8192}}(?:\.{_TOK}{{8,1024}})?(?![A-Za-z0-9_\-.])",
        ("eyJ",),
        0.9,
        _valid_jwt,
    ),
)

_PEM_END = re.compile(
    r"-{4,5} ?END[ A-Z0-9]{0,30} PRIVATE KEY(?: BLOCK)? ?-{4,5}|Private-MAC: ?[0-9a-f]{16,128}", _A
)
_PEM_BODY = re.compile(r"(?:[A-Za-z0-9+/=\s]|\\[nr]|[A-Za-z\-]+:[^\n]{0,200}\n)*+", _A)
_PEM_MAX = 20_000


_PEM_BEGIN = re.compile(r"-{4,5} ?BEGIN[ A-Z0-9]{0,30} PRIVATE KEY(?: BLOCK)? ?-{4,5}", _A)


def open_private_key(text: str) -> int | None:
    """Where a private key block begins in `text` whose END line has not come yet (None if there is
    none, or it is longer than any key). A stream filter holds text back from there: the key's body
    arrives in pieces that are each harmless-looking base64 until the whole block is seen."""
    last = None
    for found in _PEM_BEGIN.finditer(text, max(0, len(text) - _PEM_MAX)):
        last = found
    if last is None or _PEM_END.search(text, last.end()) is not None:
        return None
    return last.start()


def _pem_span(text: str, m: re.Match[str], ends: list[int]) -> tuple[int, int, float]:
    """Span and score of a PEM private key starting at the BEGIN line; `ends`: sorted END positions."""
    i = bisect_left(ends, m.end())
    if i < len(ends) and ends[i] - m.end() <= _PEM_MAX:
        end_m = _PEM_END.match(text, ends[i])
        if end_m is not None:
            body = text[m.end() : end_m.start()]
            b64 = sum(ch.isalnum() or ch in "+/=" for ch in body.replace("\\n", "").replace("\\r", ""))
            score = 1.0 if b64 >= 32 else _PLACEHOLDER_SCORE
            return m.start(), end_m.end(), score
    body_m = _PEM_BODY.match(text, m.end(), min(len(text), m.end() + _PEM_MAX))
    body_end = body_m.end() if body_m is not None else m.end()
    body = text[m.end() : body_end]
    b64 = sum(ch.isalnum() or ch in "+/=" for ch in body.replace("\\n", "").replace("\\r", ""))
    if b64 >= 64:
        return m.start(), body_end, 0.9
    return m.start(), m.end(), _PLACEHOLDER_SCORE  # a header alone: truncated, or code naming the format


# ---------------------------------------------------------------------------------------------------
# Layer 2: credential assignments
# ---------------------------------------------------------------------------------------------------

# credential keywords, searched in the lower-cased text; the key name around a hit is then expanded
_KEYWORD_RE = re.compile(r"pass|pw|secret|token|key|cred|bearer|auth|contrase|senha|kennwort|пароль")
_KEYWORD_RE_I = re.compile(_KEYWORD_RE.pattern, re.IGNORECASE)  # when lower() changes the length
_IDENT_RUN = re.compile(r"[\w.\-]*")
_SEG_SPLIT = re.compile(r"[_.\-]+", _A)
_CAMEL_SPLIT = re.compile(r"(?<=[a-z0-9])(?=[A-Z])", _A)

_STRONG_SEGMENTS = frozenset(
    {"password", "passwd", "passwort", "passphrase", "pwd", "pw", "pass", "pword", "secret", "secrets",
     "privatekey", "privkey", "passe", "motdepasse", "credentials", "credential", "creds"}
)  # fmt: skip
_STRONG_AFFIXES = ("password", "passwd", "secret", "contrase", "senha", "kennwort", "пароль")
_NOT_STRONG = frozenset({"secretary", "secretaries", "secretariat", "secretion", "passwordless"})
# X_key / X-token qualifiers that make a secret key (class 2) or a non-secret one (class 0)
_SECRET_KEY_QUALIFIERS = frozenset(
    {"api", "auth", "access", "secret", "private", "priv", "signing", "sign", "encryption", "encrypt",
     "master", "client", "service", "account", "app", "consumer", "license", "licence", "session",
     "shared", "hmac", "webhook", "deploy", "admin", "root", "bearer", "oauth", "refresh", "cookie",
     "crypt", "cipher", "aes", "jwt", "ssh", "gpg", "pgp", "storage", "bot", "personal", "integration"}
)  # fmt: skip
_PUBLIC_QUALIFIERS = frozenset(
    {"public", "pub", "publishable", "sort", "primary", "foreign", "partition", "range", "hash", "cache",
     "row", "lookup", "dict", "map", "index", "unique", "composite", "idempotency", "translation", "i18n",
     "label", "hot", "short", "shortcut", "route", "group", "order", "next", "page", "pagination",
     "continuation", "cancellation", "sync", "cursor", "start", "end", "eos", "bos", "pad", "unk", "sep",
     "cls", "mask", "special", "additional", "max", "min", "num", "total", "input", "output", "prompt",
     "completion", "stop", "bad", "chat", "default", "decoder", "encoder", "image", "audio", "eot", "fim",
     "role", "system", "new", "added", "valid", "invalid", "csrf", "xsrf", "dedup", "lock", "object",
     "config", "setting", "settings", "registry", "state", "event", "message", "field", "column"}
)  # fmt: skip
_META_SUFFIXES = frozenset(
    {"id", "ids", "name", "names", "path", "file", "filename", "dir", "url", "uri", "endpoint", "type",
     "types", "length", "len", "size", "count", "min", "max", "policy", "prompt", "label", "field", "hint",
     "format", "regex", "pattern", "env", "var", "ref", "arn", "version", "expiry", "expires", "expiration",
     "ttl", "lifetime", "timeout", "header", "param", "enabled", "required", "hash", "salt", "strength",
     "rotation", "provider", "manager", "store", "vault", "location", "source", "template", "mode",
     "scheme", "algorithm", "alg", "limit", "usage", "used", "placeholder", "reset", "changed",
     "prefix", "suffix", "kind", "class", "digest", "fingerprint", "checksum", "bits", "index"}
)  # fmt: skip
_TOKEN_NOT_SECRET = frozenset({"tokens", "tokenizer", "tokenize", "tokenized", "tokenization", "tokenizers"})

_OPS = (":=", "=>", "===", "!==", "==", "!=", "?=", "=", ":")
_COMPARE_OPS = frozenset({"==", "!=", "===", "!=="})
_QUOTES = "\"'`"
# an unquoted value: up to a blank, or to the `&`/`;` starting the next `name=` (query or connection string)
_BARE_VALUE = re.compile(rf"(?:[^\s&;]|[&;](?![A-Za-z_][A-Za-z0-9_. \-]{{0,40}}=)){{1,{_MAX_VALUE}}}")
_CLOSERS = {")": "(", "]": "[", "}": "{", ">": "<"}

_PASSWORD_CLASS = 3
_TOKEN_CLASS = 2
_WEAK_CLASS = 1


def _segments(ident: str) -> list[str]:
    out: list[str] = []
    for part in _SEG_SPLIT.split(ident):
        out.extend(s.lower() for s in _CAMEL_SPLIT.split(part) if s)
    return out


def _key_class(segs: list[str]) -> int:
    """0: not a credential name; 1: some service's `X_key`; 2: token or API key; 3: password or secret."""
    if not segs or segs[-1] in _META_SUFFIXES:
        return 0
    best = 0
    for i, seg in enumerate(segs):
        prev = segs[i - 1] if i else ""
        if seg in _NOT_STRONG:
            continue
        if seg in _STRONG_SEGMENTS or seg.startswith(_STRONG_AFFIXES) or seg.endswith(_STRONG_AFFIXES):
            if prev in _PUBLIC_QUALIFIERS:
                continue
            if seg.startswith("cred"):
                best = max(best, _TOKEN_CLASS)
                continue
            return _PASSWORD_CLASS
        if seg == "token" or (seg.endswith("token") and seg not in _TOKEN_NOT_SECRET):
            if prev not in _PUBLIC_QUALIFIERS and seg[:-5] not in _PUBLIC_QUALIFIERS:
                best = max(best, _TOKEN_CLASS)
        elif seg in ("apikey", "bearer", "auth", "authorization") or seg.endswith("apikey"):
            best = max(best, _TOKEN_CLASS)
        elif seg == "key" or (seg.endswith("key") and seg[:-3] in _SECRET_KEY_QUALIFIERS):
            qualifier = prev if seg == "key" else seg[:-3]
            if qualifier in _SECRET_KEY_QUALIFIERS:
                best = max(best, _TOKEN_CLASS)
            elif qualifier and qualifier not in _PUBLIC_QUALIFIERS:
                best = max(best, _WEAK_CLASS)
    return best


@lru_cache(maxsize=4096)
def _name_class(name: str) -> int:
    return _key_class(_segments(name))


def _closing_quote(text: str, q: str, start: int, limit: int) -> int:
    """Index of the quote `q` closing a string whose content starts at `start` (-1: none on this line)."""
    newline = text.find("\n", start, limit)
    if newline >= 0:
        limit = newline
    i = text.find(q, start, limit)
    while i >= 0:
        back = i - 1
        while back >= start and text[back] == "\\":
            back -= 1
        if (i - 1 - back) % 2 == 0:
            return i
        i = text.find(q, i + 1, limit)
    return -1


@dataclass(frozen=True, slots=True)
class _Candidate:
    start: int
    end: int
    type: str
    rule: str
    score: float
    priority: int  # 0 keys/JWT, 1 vendored rule, 2 ztai's formats, 3 assignment, 4 entropy; lower wins


def _line_bounds(text: str, pos: int) -> tuple[int, int]:
    """The line around `pos`, clipped to the window the keyword layer looks at."""
    lo = max(0, pos - _MAX_VALUE - _MAX_IDENT)
    start = text.rfind("\n", lo, pos) + 1 or lo
    hi = min(len(text), pos + 2 * _MAX_VALUE + _MAX_IDENT)
    end = text.find("\n", pos, hi)
    return start, (hi if end < 0 else end)


# a value: (start, end, quoted) or None, and how far the text was read
_Value = tuple[tuple[int, int, bool] | None, int]


def _read_value(text: str, i: int, limit: int, op: str) -> _Value:
    """The literal starting at `i` (after blanks)."""
    spaced = i < limit and text[i] in " \t"
    while i < limit and text[i] in " \t":
        i += 1
    if i >= limit:
        return None, i
    if text[i] in "@bBrRuUfF" and i + 1 < limit and text[i + 1] in _QUOTES:
        i += 1  # C# @"…", Python b"…"/r"…"/f"…"
    if text[i] in _QUOTES:
        close = _closing_quote(text, text[i], i + 1, min(limit, i + 1 + _MAX_VALUE))
        if close < 0:
            return None, i + 1
        return (i + 1, close, True), close + 1
    if op in ("", "(", "=>") or op in _COMPARE_OPS:
        return None, i  # unquoted after these is code (a variable), not a literal
    if text[i] in "{[(":
        return None, i + 1  # a structure (JSON object, list, tuple), not a literal
    m = _BARE_VALUE.match(text, i, limit)
    if m is None:
        return None, i
    j = m.end()
    if j - i >= _MAX_VALUE and j < limit and not text[j].isspace():
        return None, j  # longer than we analyse
    end = j
    while end > i:
        last = text[end - 1]
        unbalanced = last in _CLOSERS and text.count(last, i, end) > text.count(_CLOSERS[last], i, end)
        if last in ",." or unbalanced:
            end -= 1  # trailing comma, full stop, or an unbalanced closer: `f(password=abc1234)`
        else:
            break
    if end > i and text[end - 1] == ";":
        if spaced:
            return None, j  # `x = y;` assigns an expression
        end -= 1  # `Password=v;` ends a connection-string field
    while end > i and text[end - 1] in _QUOTES:
        end -= 1
    if end <= i:
        return None, j
    return (i, end, False), j


def _assignment(text: str, s: int, e: int, line_start: int, line_end: int) -> _Value:
    """The literal bound to the key `text[s:e]`, looking right (`k = v`) then left (`"v" == k`)."""
    i = e
    if i < line_end and text[i] in "\"'" and s > 0 and text[s - 1] == text[i]:
        i += 1  # "key": …
    if i < line_end and text[i] == "[":  # key[] = …, char key[25] = …
        close = text.find("]", i, min(line_end, i + 12))
        if close > 0:
            i = close + 1
    j = i
    while j < line_end and text[j] in " \t":
        j += 1
    op = ""
    for candidate in _OPS:
        if text.startswith(candidate, j, line_end):
            op = candidate
            break
    found: tuple[int, int, bool] | None = None
    read = e
    if op:
        found, read = _read_value(text, j + len(op), line_end, op)
        if op == ":" and found is not None and not found[2]:  # typed: `password: str = "v"`
            k = read
            while k < line_end and text[k] in " \t":
                k += 1
            if text.startswith("=", k, line_end) and not text.startswith("==", k, line_end):
                typed, typed_read = _read_value(text, k + 1, line_end, "=")
                if typed is not None:
                    found, read = typed, typed_read
    elif j < line_end and text[j] == "(":
        found, read = _read_value(text, j + 1, line_end, "(")
    elif j < line_end and text[j] == ">" and s > 0 and text[s - 1] == "<":  # <password>v</password>
        close = text.find("<", j + 1, min(line_end, j + 1 + _MAX_VALUE))
        if close > j + 1:
            found, read = (j + 1, close, True), close
    elif i < j < line_end:  # key "value" (no operator), --flag value, "password is v"
        rest = text[j : j + 4].lower()
        if rest.startswith(("is ", "was ")):
            found, read = _read_value(text, j + rest.index(" "), line_end, "=")
        elif text[j] in _QUOTES:
            found, read = _read_value(text, j, line_end, "")
        elif text.startswith("--", s):
            found, read = _read_value(text, j, line_end, "=")
    if found is not None:
        return found, read
    # "value" == key
    k = s
    if k > line_start and text[k - 1] in "\"'":
        k -= 1
    while k > line_start and text[k - 1] in " \t":
        k -= 1
    op_end = k
    while k > line_start and text[k - 1] in "=!" and op_end - k < 3:
        k -= 1
    if text[k:op_end] in _COMPARE_OPS:
        while k > line_start and text[k - 1] in " \t":
            k -= 1
        if k > line_start and text[k - 1] in _QUOTES:
            q = text[k - 1]
            open_ = text.rfind(q, max(line_start, k - 1 - _MAX_VALUE), k - 1)
            if open_ >= 0:
                return (open_ + 1, k - 1, True), max(read, e)
    return None, max(read, e)


_AUTH_SCHEME = re.compile(r"^(?:bearer|basic|token)\s+(?=\S)", _AI)
_OPERATOR = re.compile(r"[=:(<>]")


def _accept_value(value: str, quoted: bool, cls: int) -> float:
    """Score for `value` bound to a key of class `cls` (0.0: not a secret)."""
    stripped = _AUTH_SCHEME.sub("", value.strip())  # `Bearer {API_KEY}`: the scheme word is not the value
    if len(stripped) < 4 or not _has_alnum(stripped):
        return 0.0
    if _is_template(stripped) or _is_dummy(stripped) or _is_wordlike(stripped):
        return 0.0
    if not quoted and _CODE_REF_RE.fullmatch(stripped) is not None:
        return 0.0
    if _PATH_RE.fullmatch(stripped) is not None:
        return 0.0
    classes = _char_classes(stripped)
    entropy = _entropy(stripped)
    if cls == _PASSWORD_CLASS:
        if len(stripped) < 6 and classes < 3:
            return 0.0
        return 0.8 if classes >= 3 or entropy >= 3.5 else 0.65
    if cls == _TOKEN_CLASS:
        if len(stripped) < 8 or classes < 2 or " " in stripped:
            return 0.0
        return 0.75 if entropy >= 3.5 else 0.6
    # a service's `X_key`: must look like generated key material
    if len(stripped) < 16 or " " in stripped or entropy < 3.0 or _UUID_RE.fullmatch(stripped):
        return 0.0
    return 0.55


# ---------------------------------------------------------------------------------------------------
# Layer 3: high-entropy strings near a credential keyword
# ---------------------------------------------------------------------------------------------------

_ENTROPY_HEAD = re.compile(r"(?<![A-Za-z0-9+/=_\-])[A-Za-z0-9+/_\-]{20}", _A)
_ENTROPY_TOKEN = re.compile(r"(?<![A-Za-z0-9+/=_\-])[A-Za-z0-9+/_\-]{20,512}={0,2}(?![A-Za-z0-9+/=_\-])", _A)
_NOT_SECRET_CONTEXT = re.compile(
    r"sha|md5|hash|checksum|digest|integrity|commit|fingerprint|etag|nonce|uuid|guid|request.?id|trace", _AI
)


def _high_entropy(value: str) -> bool:
    n = len(value)
    if _UUID_RE.fullmatch(value) or _is_dummy(value) or _is_wordlike(value):
        return False
    if _HEX_RE.fullmatch(value):
        return n >= 32 and _entropy(value) >= 3.0
    core = value.rstrip("=")
    if _char_classes(core.replace("-", "").replace("_", "").replace("/", "").replace("+", "")) < 2:
        return False
    return _entropy(core) >= min(4.0, 0.85 * math.log2(len(core)))


# ---------------------------------------------------------------------------------------------------
# The detector
# ---------------------------------------------------------------------------------------------------


_CONFIDENCE_SCORE = {"high": 1.0, "medium": 1.0, "low": 0.7}
# ztai's own rules that win over an overlapping vendored rule: they validate the value (JWT, PEM) or
# cut the span to the secret itself (the password of a URL, the credential of an Authorization header)
_OWN_FIRST = frozenset({"JWT", "BASIC_AUTH_URL", "AUTHORIZATION_HEADER", "AZURE_SAS_TOKEN", "SLACK_WEBHOOK"})

# every finding type this detector reports
SECRET_TYPES: tuple[str, ...] = tuple(
    sorted(
        {rule.type for rule in _TOKEN_RULES}
        | {str(entry["type"]) for entry in read_rule_file()["rules"]}
        | {"PASSWORD_ASSIGNMENT", "HIGH_ENTROPY_STRING"}
    )
)


class SecretsDetector:
    """Finds credentials in text; see the module docstring for the rules and scores.

    Every source (`user`, `document`, `tool_output`, `model_output`) is scanned the same way: a secret is
    a secret wherever it appears, and policy decides what each source's findings mean.
    """

    name = "secrets"

    def __init__(self, min_score: float = 0.0) -> None:
        """`min_score` drops findings below it (0.5 drops placeholder-looking tokens). The vendored rules
        are compiled here (once per process, ~1 s), not on the first request."""
        self.min_score = min_score
        load_rules()

    def scan(self, text: str, source: Source) -> list[Finding]:
        if not text:
            return []
        lowered = text.lower()
        candidates: list[_Candidate] = []
        self._structured(text, lowered, candidates)
        self._vendored(text, candidates)
        self._keywords(text, lowered, candidates)
        return self._resolve(text, candidates)

    # -- layer 1 ----------------------------------------------------------------------------------

    @staticmethod
    def _structured(text: str, lowered: str, out: list[_Candidate]) -> None:
        for rule in _TOKEN_RULES:
            haystack = lowered if rule.pattern.flags & re.IGNORECASE else text
            if not any(h in haystack for h in rule.hints):
                continue
            pem_ends = [e.start() for e in _PEM_END.finditer(text)] if rule.type == "PRIVATE_KEY" else []
            consumed = -1
            for m in rule.pattern.finditer(text):
                if rule.check is not None and not rule.check(m):
                    continue
                if rule.type == "PRIVATE_KEY":
                    if m.start() < consumed:
                        continue
                    start, end, score = _pem_span(text, m, pem_ends)
                    consumed = end
                    out.append(_Candidate(start, end, rule.type, rule.rule, score, 0))
                    continue
                group = "v" if "v" in rule.pattern.groupindex else 0
                if rule.rule == "softlayer-api-key" and m.group("v") is None:
                    group = "u"
                start, end = m.span(group)
                value = text[start:end]
                score = rule.score
                if _is_placeholder_token(value):
                    score = min(score, _PLACEHOLDER_SCORE)
                priority = 0 if rule.type in _OWN_FIRST else 2  # else vendored rules win over ztai's
                out.append(_Candidate(start, end, rule.type, rule.rule, score, priority))

    # -- vendored provider rules -----------------------------------------------------------------

    @staticmethod
    def _vendored(text: str, out: list[_Candidate]) -> None:
        data = text.encode("utf-8", "surrogatepass")
        ascii_text = len(data) == len(text)
        for match in load_rules().matches(data):
            start, end = match.start, match.end
            if not ascii_text:  # byte offsets -> str offsets
                start = len(data[:start].decode("utf-8", "ignore"))
                end = start + len(data[match.start : match.end].decode("utf-8", "ignore"))
            value = text[start:end]
            wordlike = _is_wordlike(value)
            if _is_template(value) or (wordlike and "_" in value):
                continue  # `${key_improvements}`, `key_competencies`: a template or identifier, not a secret
            score = _CONFIDENCE_SCORE.get(match.rule.confidence, 0.9)
            if wordlike or _is_placeholder_token(value):  # `Password=myPassword`: reported, low
                score = min(score, _PLACEHOLDER_SCORE)
            out.append(_Candidate(start, end, match.rule.type, match.rule.id, score, 1))

    # -- layers 2 and 3 ---------------------------------------------------------------------------

    @staticmethod
    def _keywords(text: str, lowered: str, out: list[_Candidate]) -> None:
        n = len(text)
        hits = _KEYWORD_RE.finditer(lowered) if len(lowered) == n else _KEYWORD_RE_I.finditer(text)
        done_until = -1  # text before this was read by an earlier key's analysis
        for hit in hits:
            if hit.start() < done_until:
                continue
            s = hit.start()
            lo = max(0, s - _MAX_IDENT)
            while s > lo and (text[s - 1].isalnum() or text[s - 1] in "_.-"):
                s -= 1
            if s == lo and lo > 0 and (text[s - 1].isalnum() or text[s - 1] in "_.-"):
                run = _IDENT_RUN.match(text, hit.end())
                done_until = run.end() if run is not None else hit.end()
                continue  # inside a longer run of word characters than any key name
            e = hit.end()
            hi = min(n, e + _MAX_IDENT)
            while e < hi and (text[e].isalnum() or text[e] in "_.-"):
                e += 1
            done_until = e
            while e > s and text[e - 1] in ".-":
                e -= 1
            name = text[s:e]
            if s >= 2 and text[s - 1] == " " and name.lower() in ("key", "token"):
                # prose: "API key: …", "access token is …"
                p = s - 1
                while p > 0 and text[p - 1].isalpha() and s - p < 16:
                    p -= 1
                name = f"{text[p : s - 1]}_{name}"
            cls = _name_class(name)
            if cls == 0:
                continue
            line_start, line_end = _line_bounds(text, s)
            found, read = _assignment(text, s, e, line_start, line_end)
            done_until = read
            if found is not None:
                vs, ve, quoted = found
                if name.lower() == "pass" and _OPERATOR.search(text, e, vs) is None:
                    continue  # the verb: "pass `--flag value`", "pass "x" to f"
                score = _accept_value(text[vs:ve], quoted, cls)
                if score > 0.0:
                    kind = "HIGH_ENTROPY_STRING" if cls == _WEAK_CLASS else "PASSWORD_ASSIGNMENT"
                    rule = "keyword-entropy" if cls == _WEAK_CLASS else "keyword-assignment"
                    out.append(_Candidate(vs, ve, kind, rule, score, 3))
                    continue
            # no literal bound to the key: a high-entropy string shortly after a token or password name
            if cls == _WEAK_CLASS or _NOT_SECRET_CONTEXT.search(text, s, e):
                continue
            head = _ENTROPY_HEAD.search(text, e, min(line_end, e + _ENTROPY_REACH + 20))
            if head is None:
                continue
            m = _ENTROPY_TOKEN.match(text, head.start(), min(line_end, head.start() + _MAX_VALUE + 2))
            if m is None:
                continue
            done_until = max(done_until, m.end())
            if _NOT_SECRET_CONTEXT.search(text, e, m.start()):
                continue
            if text.endswith("base64,", max(0, m.start() - 8), m.start()) or text.startswith("://", m.end()):
                continue
            if _high_entropy(m.group(0)):
                out.append(_Candidate(m.start(), m.end(), "HIGH_ENTROPY_STRING", "keyword-entropy", 0.5, 4))

    # -- overlaps and output ------------------------------------------------------------------------

    def _resolve(self, text: str, candidates: list[_Candidate]) -> list[Finding]:
        candidates.sort(key=lambda c: (c.priority, -c.score, c.start, -(c.end - c.start)))
        starts: list[int] = []
        ends: list[int] = []
        kept: list[_Candidate] = []
        for c in candidates:
            if c.score < self.min_score or c.end <= c.start:
                continue
            i = bisect_left(starts, c.start)
            if (i > 0 and ends[i - 1] > c.start) or (i < len(starts) and starts[i] < c.end):
                continue  # overlaps a stronger finding
            starts.insert(i, c.start)
            ends.insert(i, c.end)
            kept.append(c)
        kept.sort(key=lambda c: c.start)
        findings: list[Finding] = []
        for c in kept:
            value = text[c.start : c.end]
            note = ", placeholder-like" if c.score <= _PLACEHOLDER_SCORE else ""
            evidence = f"{c.rule}: {_mask(value)}{note}"
            findings.append(Finding("secrets", c.type, c.start, c.end, round(c.score, 2), evidence))
        return findings
