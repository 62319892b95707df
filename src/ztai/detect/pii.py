"""PII detector: validated patterns for structured identifiers plus a small linear token tagger for names,
places, addresses and organisations. CPU only, no model download, linear work in the input length.

Entity names follow Presidio's (`PERSON`, `EMAIL_ADDRESS`, `PHONE_NUMBER`, `LOCATION`, `DATE_TIME`,
`CREDIT_CARD`, `IBAN_CODE`, `US_SSN`, `IP_ADDRESS`, `URL`, `NRP`, `US_DRIVER_LICENSE`, `ORGANIZATION`),
plus `STREET_ADDRESS`, `ZIP_CODE`, `AGE` and `TITLE` where Presidio has no name of its own (the names the
presidio-research data sets use; Presidio's evaluator maps STREET_ADDRESS and ZIP_CODE onto LOCATION).

Two stages:

1. **Patterns** (`_pattern_hits`): e-mail, URL, IPv4/IPv6 (parsed), credit card (Luhn), IBAN (per-country
   length + ISO 7064 mod-97), US SSN (area/group/serial rules), phone numbers, dates and times, ages, ZIP
   codes and driver's licences (the last three only with a context cue). Every regular expression uses
   bounded quantifiers and no nested unbounded repetition, so matching stays linear.
2. **Tagger** (`_TokenTagger`): two stacked multinomial logistic regressions over sparse binary features
   (token shape, affixes, neighbouring words, line layout, gazetteer membership — first/last names from
   names-dataset, places from GeoNames, English word frequencies from spaCy's lookups — and which pattern
   matched nearby); the second stage also sees the first stage's labels of neighbouring tokens. IO labels,
   decoded per token into spans. Vocabulary and weights ship in `data/pii_tagger.npz` (made by
   `scripts/train_pii.py`), the gazetteer in `data/pii_gazetteers.txt.gz` (made by
   `scripts/build_pii_gazetteers.py`); inference is a numpy gather-and-sum per stage.

Weak pattern hits (a bare year, a digit group without phone context, a nationality word) give way to a
tagger entity that contains them (a house number inside a street address, "Greek" in "Cyprus (Greek)").
Texts longer than 20,000 characters are scanned in overlapping windows; the tagger covers the first
`tagger_max_chars` characters (default 100,000), the patterns always cover everything.

Findings never carry the matched value: `evidence` is the rule or model name.
"""

from __future__ import annotations

import bisect
import gzip
import ipaddress
import re
import threading
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib import resources
from itertools import chain, pairwise
from typing import Any

import numpy as np

from ztai.detect.base import IDENTIFYING_TYPES, PERSON_MIN_SCORE, Finding, Source, disjoint_by_rank

DETECTOR = "pii"

# Types the tagger predicts (IO scheme: one label per type plus O).
TAGGER_TYPES: tuple[str, ...] = (
    "PERSON",
    "LOCATION",
    "STREET_ADDRESS",
    "ORGANIZATION",
    "NRP",
    "TITLE",
    "ZIP_CODE",
)
PATTERN_TYPES: tuple[str, ...] = (
    "EMAIL_ADDRESS",
    "URL",
    "IP_ADDRESS",
    "CREDIT_CARD",
    "IBAN_CODE",
    "US_SSN",
    "PHONE_NUMBER",
    "DATE_TIME",
    "AGE",
    "US_DRIVER_LICENSE",
    "ZIP_CODE",
)
ALL_TYPES: tuple[str, ...] = tuple(dict.fromkeys(PATTERN_TYPES + TAGGER_TYPES))

# Texts longer than this are scanned in overlapping windows so that work and memory per call stay bounded
# per character (the tagger allocates per token).
_WINDOW = 20_000
_OVERLAP = 200

# ---------------------------------------------------------------------------------------------------------
# Validators
# ---------------------------------------------------------------------------------------------------------


def luhn_ok(digits: str) -> bool:
    """Luhn checksum over a string of ASCII digits."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


# ISO 13616 IBAN lengths per country (SWIFT IBAN registry).
_IBAN_LEN: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27,
    "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25,
    "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18,
    "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33,
    "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}  # fmt: skip


def iban_ok(iban: str) -> bool:
    """Country length and ISO 7064 mod-97-10 check of an IBAN without spaces (any case)."""
    s = iban.upper()
    if len(s) < 15 or _IBAN_LEN.get(s[:2]) != len(s) or not s[2:4].isdigit() or not s.isalnum():
        return False
    rearranged = s[4:] + s[:4]
    rem = 0
    for ch in rearranged:
        if not ch.isascii():
            return False
        rem = (rem * (10 if ch.isdigit() else 100) + int(ch, 36)) % 97
    return rem == 1


def ssn_ok(area: str, group: str, serial: str) -> bool:
    """SSA rules: area not 000, 666 or 900-999; group not 00; serial not 0000; no well-known samples."""
    if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
        return False
    whole = area + group + serial
    return whole not in ("123456789", "078051120", "219099999") and len(set(whole)) > 1


# ---------------------------------------------------------------------------------------------------------
# Patterns (all quantifiers bounded)
# ---------------------------------------------------------------------------------------------------------

_I = re.IGNORECASE
_EMAIL_RE = re.compile(
    r"(?<![\w.%+\-\u0300-\u036f])[^\W_][\w.%+\-\u0300-\u036f]{0,63}"
    r"@(?:[^\W_][\w\-]{0,62}\.){1,8}[^\W\d_]{2,24}(?![\w-])"
)
_URL_RE = re.compile(r"(?<![\w@])(?:(?:https?|ftp)://|www\.)[^\s<>\"'`{}|\\^\[\]]{1,2048}", _I)
_TLDS = (
    "com|org|net|edu|gov|mil|int|info|biz|io|ai|co|app|dev|me|tv|us|uk|de|fr|es|it|nl|be|ch|at|se|no|dk|fi"
    "|pl|cz|sk|hu|pt|gr|ie|ru|ua|ro|bg|hr|si|rs|ee|lv|lt|is|cy|lu|ca|au|nz|jp|cn|in|br|mx|ar|za|il|tr|kr"
)
_DOMAIN_RE = re.compile(
    r"(?<![\w@.-])(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.){1,6}(?:" + _TLDS + r")"
    r"(?:/[^\s<>\"'`]{0,2048})?(?![\w@-])",
    _I,
)
_IPV4_RE = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)")
_IPV6_RE = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{1,4}:){1,7}(?::|(?::[0-9A-Fa-f]{1,4}){1,7}|[0-9A-Fa-f]{1,4})"
    r"(?:\.\d{1,3}\.\d{1,3}\.\d{1,3})?(?![\w:])|(?<![\w:])::(?:[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){0,6})?"
    r"(?![\w:])"
)
_CC_RE = re.compile(r"(?<![\d+\-.])\d(?:[ -]?\d){11,18}(?![\d])")
_CC_GROUPED = re.compile(r"\d{4}([ -])\d{4}\1\d{4}(?:\1\d{4}(?:\1?\d{1,3})?)?|\d{4}([ -])\d{6}\2\d{4,5}")
_CC_CONTEXT = re.compile(r"(?:card|credit|debit|visa|master|amex|\bcc\b|cvv|expir|\bpan\b)", _I)
_IBAN_RE = re.compile(r"(?<![A-Za-z0-9])[A-Za-z]{2}\d{2}(?: ?[A-Za-z0-9]){11,32}", _I)
_SSN_RE = re.compile(r"(?<![\d-])(\d{3})([- ]?)(\d{2})\2(\d{4})(?![\d-])")
_SSN_CONTEXT = re.compile(r"(?:\bssn|social\s+security|\bss\s*#|\bss\s+no|\bsocial\b)", _I)
_PHONE_RE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[\s.-]{0,2})?(?:\(0\)\s?)?(?:\(\d{1,5}\)\s?)?\d{1,5}(?:[\s.-]{1,2}\(?\d{1,5}\)?){0,6}"
    r"(?:\s?(?:x|ext\.?|#)\s?\d{1,6})?(?!\w)",
    _I,
)
_PHONE_CONTEXT_BEFORE = re.compile(
    r"(?:phone|tel\b|tel\.|telephone|mobile|cell|call|fax|desk|office|contact|reach|whatsapp|sms|text\s+me"
    r"|messages?\s+to|number|answering|registered|dial|ring|landline|hotline|☎)[^\n\d]{0,25}$",
    _I,
)
_PHONE_CONTEXT_AFTER = re.compile(r"^\s?[-(]?\s?(?:office|fax|mobile|cell|home|work|desk|phone|tel)", _I)
_CAPWORD_AFTER = re.compile(r" {1,2}([^\W\d_]{2,})")
_PHONE_WORDS_AFTER = frozenset(
    ["x", "ext", "office", "fax", "mobile", "cell", "home", "work", "desk", "phone", "tel"]
)
_NANP = re.compile(r"(?:\+?1[\s.-]?)?(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}")

_MONTHS = (
    r"jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?"
    r"|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?"
)
_WEEKDAYS = r"monday|tuesday|wednesday|thursday|friday|saturday|sunday"
_TIME = r"(?:[01]?\d|2[0-3])(?::[0-5]\d){1,2}(?:\s?[ap]\.?m\.?)?|(?:1[0-2]|0?[1-9])\s?[ap]\.?m\.?(?!\w)"
_DATE_RE = re.compile(
    r"(?<![\w/.-])(?:"
    r"\d{4}-(?:0?[1-9]|1[0-2])-(?:0?[1-9]|[12]\d|3[01])"
    r"(?:[T ](?:[01]\d|2[0-3]):[0-5]\d(?::[0-5]\d(?:\.\d{1,6})?)?"
    r"(?:Z|[+-]\d{2}:?\d{2})?)?"
    r"|(?:0?[1-9]|[12]\d|3[01])[/.-](?:0?[1-9]|[12]\d|3[01])[/.-](?:\d{4}|\d{2})(?:,?\s(?:" + _TIME + r"))?"
    r"|\d{4}/(?:0?[1-9]|1[0-2])/(?:0?[1-9]|[12]\d|3[01])"
    r"|(?:" + _MONTHS + r")\.?\s(?:0?[1-9]|[12]\d|3[01])(?:st|nd|rd|th)?(?:,?\s\d{4})?(?!\d)"
    r"|(?:0?[1-9]|[12]\d|3[01])(?:st|nd|rd|th)?\s(?:of\s)?(?:" + _MONTHS + r")\.?(?:,?\s\d{4})?(?!\d)"
    r"|(?:" + _MONTHS + r")\.?\s\d{4}"
    r"|(?:" + _WEEKDAYS + r")(?:,?\s(?:the\s)?\d{1,2}(?:st|nd|rd|th)?(?:\s(?:of\s)?(?:" + _MONTHS + r"))?)?"
    r"|" + _TIME + r""
    r")(?![\w/])",
    _I,
)
# A bare year needs a cue: a preposition before it or a sentence-like position.
_YEAR_RE = re.compile(r"(?<![\w/.,:-])(1[6-9]\d\d|20\d\d)(?![\w/-]|[.,]\d)")
_YEAR_CUE_BEFORE = re.compile(
    r"(?:\b(?:in|since|during|by|until|till|from|of|year|circa|c\.|early|late|mid|before|after|around|a|an"
    r"|the|to|between|and|on|born|founded|established|since|at|for)\s*|[(\[])$",
    _I,
)
_AGE_RE = re.compile(
    r"(?:\b(?:turned|turn|turning|aged?|age\s+of|ages?\s*:)\s+(?P<a>\d{1,3})(?!\d|[.,]\d|\s?(?:%|percent|am|pm|[ap]\.m)))"
    r"|(?:(?<![\d.,])(?P<b>\d{1,3})\s?-?\s?(?:years?|yrs?)(?:\s?-?\s?old|\s+of\s+age|\s+young))"
    r"|(?:(?<![\d.,])(?P<c>\d{1,3})\s?(?:y/o|y\.o\.|yo\b|yrs?\.?\s?old))",
    _I,
)
_ZIP_RE = re.compile(
    r"(?:\b(?:zip|postal|post)\s*(?:code)?\s*(?:is|:|#|no\.?|number)?\s*)"
    r"(?P<z>\d{3,5}(?:[ -]\d{2,4})?(?:\s?[A-Z]{2}(?![a-z]))?|[A-Z]\d[A-Z]\s?\d[A-Z]\d"
    r"|[A-Z]{1,2}\d[A-Z\d]?\s?\d[A-Z]{2})(?![\w-])",
    _I,
)
_DL_RE = re.compile(
    r"(?:driver'?s?\s*licen[cs]e|driving\s+licen[cs]e|\bDL)\s*(?:number|no\.?|#|num)?\s*(?:is|:)?\s*"
    r"(?P<d>(?=[A-Z0-9-]*\d)[A-Z0-9][A-Z0-9-]{3,18}[A-Z0-9])(?![\w-])",
    _I,
)
_WORD_RE = re.compile(r"[^\W\d_]{3,}")
_LANG_CUE = re.compile(
    r"(?:speaks?|spoke|speaking|study|studying|studied|learn|learning|learned|learnt|fluent|into|native)\s+$"
    r"|\b(?:in|from)\s+$",
    _I,
)
_HONORIFIC_RE = re.compile(
    r"(?<![\w.])(?:(?:Mr|Mrs|Ms|Mx|Dr|Prof|Rev|MR|MRS|MS|DR|PROF|mr|mrs|ms|dr|prof)\."
    r"|(?:Mr|Mrs|Ms|Mx|Dr|Miss|Sir|Dame|Madam|Mister|Professor|Doctor|MR|MRS|MS|DR|MISS)(?=\s))"
    r"(?=\s{1,3}[^\W\d_])"
)
WEAK = 0.7  # pattern hits scored below this give way to a tagger entity that contains them


@dataclass(slots=True)
class _Hit:
    type: str
    start: int
    end: int
    score: float
    evidence: str
    prio: int  # higher wins overlaps among patterns


_PRIO = {
    "EMAIL_ADDRESS": 90,
    "URL": 80,
    "IBAN_CODE": 85,
    "IP_ADDRESS": 75,
    "CREDIT_CARD": 70,
    "US_SSN": 65,
    "DATE_TIME": 60,
    "US_DRIVER_LICENSE": 55,
    "PHONE_NUMBER": 50,
    "AGE": 45,
    "ZIP_CODE": 40,
    "TITLE": 35,
    "NRP": 30,
}


def _strip_trailing(text: str, start: int, end: int, chars: str = ".,;:!?)]}'\"") -> int:
    while end > start and text[end - 1] in chars:
        # keep a closing parenthesis that has its opening partner inside the match
        if text[end - 1] == ")" and "(" in text[start : end - 1]:
            break
        end -= 1
    return end


def _pattern_hits(text: str) -> list[_Hit]:
    hits: list[_Hit] = []
    add = hits.append
    has_digit = any(map(str.isdigit, text)) if len(text) < 4096 else re.search(r"\d", text) is not None

    if "@" in text:
        for m in _EMAIL_RE.finditer(text):
            add(_Hit("EMAIL_ADDRESS", m.start(), m.end(), 0.95, "pattern:email", _PRIO["EMAIL_ADDRESS"]))
    if "://" in text or "www." in text.lower():
        for m in _URL_RE.finditer(text):
            end = _strip_trailing(text, m.start(), m.end())
            add(_Hit("URL", m.start(), end, 0.9, "pattern:url", _PRIO["URL"]))
    if "." in text:
        for m in _DOMAIN_RE.finditer(text):
            end = _strip_trailing(text, m.start(), m.end())
            if end - m.start() >= 6:
                add(_Hit("URL", m.start(), end, 0.6, "pattern:domain", _PRIO["URL"] - 1))
    if has_digit:
        for m in _IPV4_RE.finditer(text):
            if all(int(p) <= 255 and (p == "0" or not p.startswith("0")) for p in m.group().split(".")):
                add(_Hit("IP_ADDRESS", m.start(), m.end(), 0.9, "pattern:ipv4", _PRIO["IP_ADDRESS"]))
    if text.count(":") >= 2:
        for m in _IPV6_RE.finditer(text):
            cand = m.group()
            if cand.count(":") < 2 or (":" in cand and not any(c.isalnum() for c in cand)):
                continue
            try:
                ipaddress.IPv6Address(cand)
            except ValueError:
                continue
            add(_Hit("IP_ADDRESS", m.start(), m.end(), 0.9, "pattern:ipv6", _PRIO["IP_ADDRESS"]))
    _word_hits(text, add)
    if not has_digit:
        _date_hits(text, add)
        return hits

    for m in _IBAN_RE.finditer(text):
        _iban_hit(text, m.start(), m.end(), add)
    for m in _CC_RE.finditer(text):
        raw = m.group()
        digits = raw.replace(" ", "").replace("-", "")
        if not (12 <= len(digits) <= 19) or not luhn_ok(digits) or len(set(digits)) < 2:
            continue
        ctx = _CC_CONTEXT.search(text, max(0, m.start() - 48), m.start()) is not None
        grouped = raw.isdigit() or _CC_GROUPED.fullmatch(raw) is not None
        if not grouped or (len(digits) < 13 and not ctx):
            continue
        add(_Hit("CREDIT_CARD", m.start(), m.end(), 0.95 if ctx else 0.75, "luhn", _PRIO["CREDIT_CARD"]))
    for m in _SSN_RE.finditer(text):
        if not ssn_ok(m.group(1), m.group(3), m.group(4)):
            continue
        ctx = _SSN_CONTEXT.search(text, max(0, m.start() - 48), m.start()) is not None
        if m.group(2) != "-" and not ctx:
            continue
        add(_Hit("US_SSN", m.start(), m.end(), 0.9 if ctx else 0.6, "ssn-rules", _PRIO["US_SSN"]))
    for m in _DL_RE.finditer(text):
        add(
            _Hit(
                "US_DRIVER_LICENSE",
                m.start("d"),
                m.end("d"),
                0.7,
                "context:driver-license",
                _PRIO["US_DRIVER_LICENSE"],
            )
        )
    _date_hits(text, add)
    _phone_hits(text, add)
    for m in _AGE_RE.finditer(text):
        g = "a" if m.group("a") else "b" if m.group("b") else "c"
        v = int(m.group(g))
        if 0 < v < 125:
            add(_Hit("AGE", m.start(g), m.end(g), 0.7, "context:age", _PRIO["AGE"]))
    for m in _ZIP_RE.finditer(text):
        add(_Hit("ZIP_CODE", m.start("z"), m.end("z"), 0.7, "context:zip", _PRIO["ZIP_CODE"]))
    return hits


def _word_hits(text: str, add: Any) -> None:
    """Honorifics (TITLE) and nationality / religious / political group words (NRP)."""
    for m in _HONORIFIC_RE.finditer(text):
        add(_Hit("TITLE", m.start(), m.end(), 0.8, "lexicon:honorific", _PRIO["TITLE"]))
    lower_text: bool | None = None
    for m in _WORD_RE.finditer(text):
        w = m.group()
        if not _nrp(w.lower()):
            continue
        if not w[0].isupper():
            if lower_text is None:
                lower_text = not any(c.isupper() for c in text)
            if not lower_text:
                continue
        if _LANG_CUE.search(text, max(0, m.start() - 20), m.start()):
            continue
        add(_Hit("NRP", m.start(), m.end(), 0.6, "lexicon:nrp", _PRIO["NRP"]))


def _iban_hit(text: str, start: int, end: int, add: Any) -> None:
    cc = text[start : start + 2].upper()
    n = _IBAN_LEN.get(cc)
    if n is None:
        return
    chars: list[str] = []
    i = start
    while i < end and len(chars) < n:
        ch = text[i]
        if ch != " ":
            chars.append(ch)
        i += 1
    if len(chars) != n or (i < len(text) and text[i].isalnum()):
        return
    if iban_ok("".join(chars)):
        add(_Hit("IBAN_CODE", start, i, 0.95, "iban-mod97", _PRIO["IBAN_CODE"]))


def _date_hits(text: str, add: Any) -> None:
    for m in _DATE_RE.finditer(text):
        val = m.group()
        # a lone time like "3 pm" is fine; a bare number with dots is not a date
        if val.isdigit():
            continue
        add(_Hit("DATE_TIME", m.start(), m.end(), 0.8, "pattern:date", _PRIO["DATE_TIME"]))
    for m in _YEAR_RE.finditer(text):
        before = text[max(0, m.start() - 24) : m.start()]
        if _YEAR_CUE_BEFORE.search(before):
            add(_Hit("DATE_TIME", m.start(), m.end(), 0.55, "pattern:year", _PRIO["DATE_TIME"] - 20))


def _phone_hits(text: str, add: Any) -> None:
    for m in _PHONE_RE.finditer(text):
        s, e = m.start(), m.end()
        raw = text[s:e]
        # trim trailing separators / unmatched parentheses
        while e > s and not text[e - 1].isalnum():
            e -= 1
        raw = text[s:e]
        nd = sum(c.isdigit() for c in raw)
        if nd < 7 or nd > 16:
            continue
        if "\n" in raw:  # phone numbers do not span lines
            continue
        strong = raw.startswith("+") or raw.startswith("(") or _NANP.fullmatch(raw) is not None
        ctx = (
            _PHONE_CONTEXT_BEFORE.search(text, max(0, s - 40), s) is not None
            or _PHONE_CONTEXT_AFTER.match(text, e, min(len(text), e + 12)) is not None
        )
        groups = len(re.findall(r"\d+", raw))
        if not (strong or ctx or (groups >= 3 and nd >= 8 and raw.replace(" ", "") != raw)):
            continue
        if not strong:
            cw = _CAPWORD_AFTER.match(text, e, min(len(text), e + 40))
            if cw and cw.group(1)[0].isupper() and cw.group(1).lower() not in _PHONE_WORDS_AFTER:
                continue
        score = 0.85 if ctx else 0.6 if strong else 0.45
        add(
            _Hit(
                "PHONE_NUMBER",
                s,
                e,
                score,
                "pattern:phone" + ("+context" if ctx else ""),
                _PRIO["PHONE_NUMBER"],
            )
        )


def _resolve(hits: list[_Hit]) -> list[_Hit]:
    """Keep non-overlapping hits, preferring priority, then length (linear: `disjoint_by_rank`)."""
    return disjoint_by_rank(((-h.prio, h.start - h.end, h.start), h) for h in hits)


def _overlaps_any(start: int, end: int, sorted_starts: list[int], items: list[Any]) -> bool:
    """Whether [start, end) overlaps one of `items` (disjoint intervals with .start/.end, sorted)."""
    k = bisect.bisect_left(sorted_starts, end)  # items[k:] start at or after `end`
    return k > 0 and items[k - 1].end > start


# ---------------------------------------------------------------------------------------------------------
# Tokens and features
# ---------------------------------------------------------------------------------------------------------

# words (letters/digits), runs of one repeated symbol ("...", "----", "😀😀"), single symbols
_TOKEN_RE = re.compile(r"[^\W_]+|([^\w\s])\1{0,31}|_", re.UNICODE)


@dataclass(slots=True)
class Token:
    text: str
    start: int
    end: int
    nl_before: bool  # a line break between the previous token and this one


def tokenize(text: str) -> list[Token]:
    toks: list[Token] = []
    prev_end = 0
    for m in _TOKEN_RE.finditer(text):
        s = m.start()
        nl = "\n" in text[prev_end:s] if s > prev_end else False
        toks.append(Token(m.group(), s, m.end(), nl or not toks))
        prev_end = m.end()
    return toks


def _shape(w: str) -> str:
    out: list[str] = []
    last = ""
    for ch in w[:12]:
        if ch.isupper():
            c = "X"
        elif ch.islower():
            c = "x"
        elif ch.isdigit():
            c = "d"
        else:
            c = ch
        if c != last:
            out.append(c)
            last = c
    return "".join(out)


def _fold(s: str) -> str:
    if s.isascii():
        return s
    return "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c))


def _words(s: str) -> list[str]:
    return s.split()


# Hand-written cue lists (not learned from any data set).
_STREET_WORDS = frozenset(
    _words(
        """
        street st str strasse straße road rd avenue ave av avda avenida lane ln drive dr boulevard blvd
        bd way court ct place pl plaza square sq terrace crescent cres highway hwy parkway pkwy path
        alley close row gardens grove hill mews walk view trail turnpike bypass circle cir loop pike
        expressway freeway rue via viale piazza corso calle camino carrer rua travessa largo praça vej
        gade gata gatan vägen väg katu tie kuja polku weg laan straat plein dreef kade ul ulica aleja al
        út utca tér körút krt rkp sokak cad caddesi apt apartment suite ste unit floor fl box po p.o psc
        cmr dpo apo fpo bldg building
        """
    )
)
_ORG_WORDS = frozenset(
    _words(
        """
        inc incorporated llc ltd limited corp corporation company co group associates agency partners
        holdings gmbh ag sa bv nv plc llp lp foundation institute university college bank capital
        consulting solutions technologies technology systems software labs laboratories research
        services industries international enterprises ventures networks media studios pharmaceuticals
        insurance trust
        """
    )
)
_TITLE_WORDS = frozenset(
    _words(
        """
        mr mrs ms miss mx dr prof sir madam dame lord lady rev fr sr jr
        """
    )
)
_NRP_WORDS = frozenset(
    _words(
        """
        afghan albanian algerian american andorran angolan argentine argentinian armenian australian
        austrian azerbaijani bahamian bahraini bangladeshi barbadian belarusian belgian belizean
        beninese bhutanese bolivian bosnian botswanan brazilian british bruneian bulgarian burkinabe
        burmese burundian cambodian cameroonian canadian chadian chilean chinese colombian congolese
        croatian cuban cypriot czech danish djiboutian dominican dutch ecuadorian egyptian emirati
        english eritrean estonian ethiopian fijian filipino finnish french gabonese gambian georgian
        german ghanaian greek grenadian guatemalan guinean guyanese haitian honduran hungarian icelandic
        indian indonesian iranian iraqi irish israeli italian ivorian jamaican japanese jordanian kazakh
        kenyan korean kosovar kuwaiti kyrgyz lao laotian latvian lebanese liberian libyan lithuanian
        luxembourgish macedonian malagasy malawian malaysian maldivian malian maltese mauritanian
        mauritian mexican moldovan monegasque mongolian montenegrin moroccan mozambican namibian
        nepalese nepali nicaraguan nigerian nigerien norwegian omani pakistani palestinian panamanian
        paraguayan peruvian polish portuguese qatari romanian russian rwandan salvadoran samoan saudi
        scottish senegalese serbian singaporean slovak slovakian slovenian somali spanish sudanese
        surinamese swazi swedish swiss syrian taiwanese tajik tanzanian thai togolese tongan trinidadian
        tunisian turkish turkmen ugandan ukrainian uruguayan uzbek venezuelan vietnamese welsh yemeni
        zambian zimbabwean greenlandic faroese basque catalan flemish walloon kurdish chechen tatar roma
        romani arab arabic asian african european latino latina hispanic caucasian slavic nordic
        scandinavian balkan persian berber bedouin inuit maori aboriginal jewish muslim christian
        catholic protestant orthodox buddhist hindu sikh jain mormon evangelical lutheran anglican
        baptist methodist atheist agnostic sunni shia shiite democrat democratic republican liberal
        conservative socialist communist libertarian labour tory green englishman englishwoman frenchman
        frenchwoman dutchman irishman scotsman welshman
        """
    )
)


def _nrp(low: str) -> bool:
    if low in _NRP_WORDS:
        return True
    if low.endswith("es") and low[:-2] in _NRP_WORDS:
        return True
    return low.endswith("s") and low[:-1] in _NRP_WORDS


class _Gazetteer:
    def __init__(self, lines: Iterable[str]) -> None:
        self.first: dict[str, str] = {}
        self.last: dict[str, str] = {}
        self.place: dict[str, str] = {}  # lowercase (possibly multi-word) -> C / S / P
        self.word: dict[str, str] = {}  # common English word -> frequency tier and case habit
        self.max_words = 1
        self.multi_first: set[str] = set()  # first words of multi-word places
        for line in lines:
            kind, _, name = line.rstrip("\n").partition("\t")
            if not name:
                continue
            if kind[0] == "F":
                self.first[name] = kind
            elif kind[0] == "L":
                self.last[name] = kind
            elif kind[0] == "W":
                self.word[name] = kind
            else:
                prev = self.place.get(name)
                if prev is None or kind < prev:  # C < P < S: country beats city
                    self.place[name] = kind
                self.max_words = max(self.max_words, min(4, name.count(" ") + 1))
                first_word = re.split(r"[\s\-'\u2019.]", name, maxsplit=1)[0]
                if first_word != name:
                    self.multi_first.add(first_word)


@lru_cache(maxsize=1)
def _gazetteer() -> _Gazetteer:
    ref = resources.files("ztai.detect").joinpath("data/pii_gazetteers.txt.gz")
    try:
        raw = ref.read_bytes()
    except (FileNotFoundError, OSError):
        return _Gazetteer([])
    return _Gazetteer(gzip.decompress(raw).decode("utf-8").splitlines())


def _own_features(w: str, gaz: _Gazetteer) -> tuple[list[str], list[str]]:
    """Features that depend only on the token's text: (for the token itself, for it as a neighbour)."""
    low = w.lower()
    shape = _shape(w)
    flags: list[str] = []
    if w[0].isalpha():
        fl = _fold(low)
        f = gaz.first.get(low) or gaz.first.get(fl)
        if f:
            flags.append(f)
        la = gaz.last.get(low) or gaz.last.get(fl)
        if la:
            flags.append(la)
        cw = gaz.word.get(low)
        if cw:
            flags += (cw, cw[:2], "W" + cw[2])
        if low in _STREET_WORDS:
            flags.append("ST")
        if low in _ORG_WORDS:
            flags.append("ORG")
        if low in _TITLE_WORDS:
            flags.append("TTL")
        if _nrp(low):
            flags.append("NRP")
        if not w.isascii():
            flags.append("NA")
    own = ["b", "w=" + low, "sh=" + shape, "len=" + _len_bucket(len(w)), "s2=" + low[-2:], "s3=" + low[-3:],
           "s4=" + low[-4:], "p2=" + low[:2]]  # fmt: skip
    own += ["g=" + x for x in flags]
    if w[0].isupper():
        own.append("cap")
    if w.isupper() and len(w) > 1:
        own.append("allcaps")
    if w.isdigit():
        own.append("dlen=" + _len_bucket(len(w)))
    return own, ["w=" + low, "sh=" + shape, *("g=" + x for x in flags)]


_OFFSETS = (-2, -1, 1, 2)
_OFF_PL = {o: str(o) + "pl=" for o in _OFFSETS}
_OFF_PT = {o: str(o) + "pt=" for o in _OFFSETS}
_SENTINEL_NB = {-1: ["w=<s>", "sh=<s>"], 1: ["w=</s>", "sh=</s>"]}


def _place_spans(toks: list[Token], lows: list[str], text: str, gaz: _Gazetteer) -> list[str]:
    """Per token: "" or "B<kind>"/"I<kind>" for the longest gazetteer place starting at each token."""
    n = len(toks)
    out = [""] * n
    if not gaz.place:
        return out
    i = 0
    while i < n:
        if not toks[i].text[0].isalpha():
            i += 1
            continue
        if lows[i] not in gaz.multi_first:  # one token: the loop below with top == 1, made short
            kd = gaz.place.get(lows[i])
            if kd is None and not lows[i].isascii():
                kd = gaz.place.get(_fold(lows[i]))
            if kd is not None:
                out[i] = "B" + kd
            i += 1
            continue
        matched = 0
        kind = ""
        top = min(gaz.max_words + 2, n - i)
        for k in range(top, 0, -1):
            j = i + k - 1
            if not toks[j].text[0].isalnum():
                continue
            seg = text[toks[i].start : toks[j].end]
            if "\n" in seg:
                continue
            key = " ".join(seg.lower().split()) if k > 1 else lows[i]
            kd = gaz.place.get(key)
            if kd is None and not key.isascii():
                kd = gaz.place.get(_fold(key))
            if kd is not None:
                matched, kind = k, kd
                break
        if matched:
            out[i] = "B" + kind
            for j in range(i + 1, i + matched):
                out[j] = "I" + kind
            i += matched
        else:
            i += 1
    return out


def _len_bucket(n: int) -> str:
    return str(n) if n < 6 else "6-9" if n < 10 else "10+"


def _line_layout(toks: list[Token]) -> tuple[list[int], dict[int, int]]:
    """Each token's line number, and the number of tokens per line when the text has several lines
    (empty for a one-line text, where line-length features do not apply)."""
    line_id: list[int] = []
    cur = -1
    for t in toks:
        if t.nl_before:
            cur += 1
        line_id.append(cur)
    per_line: dict[int, int] = {}
    if cur > 0:
        for li in line_id:
            per_line[li] = per_line.get(li, 0) + 1
    return line_id, per_line


def _context_features(
    text: str, toks: list[Token], lows: list[str], pattern_types: list[str]
) -> list[list[str]]:
    """Features that depend on the token's position: layout, gazetteer phrases, patterns, bigrams."""
    gaz = _gazetteer()
    places = _place_spans(toks, lows, text, gaz)
    n = len(toks)
    line_id, per_line = _line_layout(toks)
    multi = bool(per_line)
    out: list[list[str]] = []
    for i, t in enumerate(toks):
        w = t.text
        low = lows[i]
        f: list[str] = []
        if pattern_types[i]:
            f.append("pt=" + pattern_types[i])
        if places[i]:
            f.append("pl=" + places[i])
        if w[0].isupper() and i > 0 and not t.nl_before and toks[i - 1].text not in ".!?:\"'":
            f.append("cap-mid")
        if len(w) == 1 and w.isupper() and 0 < i < n - 1:
            nxt = toks[i + 2] if toks[i + 1].text == "." and i + 2 < n else toks[i + 1]
            if toks[i - 1].text[0].isupper() and nxt.text[0].isupper() and not nxt.nl_before:
                f.append("initial")
        if t.nl_before:
            f.append("bol")
        if i + 1 >= n or toks[i + 1].nl_before:
            f.append("eol")
        if multi:
            f.append("lt=" + _len_bucket(per_line[line_id[i]]))
            f.append("ml")
        if i == 0:
            f.append("first")
        for off in _OFFSETS:
            j = i + off
            if 0 <= j < n:
                o = str(off)
                if places[j]:
                    f.append(o + "pl=" + places[j])
                if pattern_types[j]:
                    f.append(o + "pt=" + pattern_types[j])
        prev = lows[i - 1] if i > 0 else "<s>"
        f.append("bg=" + prev + "|" + low)
        f.append("bg+=" + low + "|" + (lows[i + 1] if i + 1 < n else "</s>"))
        f.append("w-1-2=" + (lows[i - 2] if i > 1 else "<s>") + "|" + prev)
        if i > 0 and toks[i - 1].end == t.start:
            f.append("glued-l")
        if i + 1 < n and toks[i + 1].start == t.end:
            f.append("glued-r")
        out.append(f)
    return out


def token_features(text: str, toks: list[Token], pattern_types: list[str]) -> list[list[str]]:
    """Feature strings per token (training and tests; inference uses `_TokenTagger.indices_for`, which
    produces the same features through a per-token-text cache). `pattern_types[i]` is the pattern type
    covering token i ("" if none)."""
    gaz = _gazetteer()
    owns = [_own_features(t.text, gaz) for t in toks]
    ctx = _context_features(text, toks, [t.text.lower() for t in toks], pattern_types)
    n = len(toks)
    feats: list[list[str]] = []
    for i in range(n):
        f = owns[i][0] + ctx[i]
        for off in _OFFSETS:
            j = i + off
            o = str(off)
            nb = owns[j][1] if 0 <= j < n else _SENTINEL_NB[-1 if j < 0 else 1]
            f += [o + x for x in nb]
        feats.append(f)
    return feats


# ---------------------------------------------------------------------------------------------------------
# Tagger
# ---------------------------------------------------------------------------------------------------------


def stack_features(probs: np.ndarray, labels: list[str]) -> list[list[str]]:
    """Second-stage features: the first stage's labels of the token and its neighbours."""
    best = probs.argmax(axis=1)
    conf = probs.max(axis=1)
    n = len(best)
    labs = [labels[k] if conf[i] >= 0.5 else labels[k] + "?" for i, k in enumerate(best)]
    out: list[list[str]] = []
    for i in range(n):
        prev = labs[i - 1] if i > 0 else "<s>"
        nxt = labs[i + 1] if i + 1 < n else "</s>"
        out.append(
            [
                "s0=" + labs[i],
                "s-1=" + prev,
                "s1=" + nxt,
                "s-2=" + (labs[i - 2] if i > 1 else "<s>"),
                "s2=" + (labs[i + 2] if i + 2 < n else "</s>"),
                "s-1+1=" + prev + "|" + nxt,
                "s-1,0=" + prev + "|" + labs[i],
                "s0,1=" + labs[i] + "|" + nxt,
            ]
        )
    return out


class _TokenTagger:
    """Two stacked multinomial logistic regressions over sparse binary features (IO labels): the second
    sees the first one's labels of neighbouring tokens, which makes multi-token entities consistent."""

    def __init__(
        self,
        vocab: dict[str, int],
        labels: list[str],
        w1: np.ndarray,
        b1: np.ndarray,
        w2: np.ndarray | None = None,
        b2: np.ndarray | None = None,
    ) -> None:
        self.vocab = vocab
        self.labels = labels
        self.w1, self.b1 = w1.astype(np.float32), b1.astype(np.float32)
        self.w2 = None if w2 is None else w2.astype(np.float32)
        self.b2 = None if b2 is None else b2.astype(np.float32)
        self._own_cache: dict[str, tuple[list[int], tuple[list[int], ...]]] = {}
        self._stack_cache: dict[tuple[str, ...], list[int]] = {}
        self._w12 = (
            None if self.w2 is None else np.ascontiguousarray(np.concatenate([self.w1, self.w2], axis=1))
        )
        get = vocab.get
        self._sentinel = tuple(
            [j for j in (get(str(o) + x, -1) for x in _SENTINEL_NB[-1 if o < 0 else 1]) if j >= 0]
            for o in _OFFSETS
        )
        # indices of the context features that take no value (-1: not in the vocabulary)
        self._flag = {
            f: get(f, -1) for f in ("cap-mid", "initial", "bol", "eol", "ml", "first", "glued-l", "glued-r")
        }
        self._lt = {b: get("lt=" + b, -1) for b in ("1", "2", "3", "4", "5", "6-9", "10+")}
        self._valued: dict[str, int] = {}  # "pt=X", "-1pl=BC", ... -> index, filled on first use
        # words that occur at a given place of some bigram feature: a bigram without one is not looked up
        self._bg_second = _bigram_words(vocab, "bg=", second=True)
        self._bgp_first = _bigram_words(vocab, "bg+=", second=False)
        self._w12_second = _bigram_words(vocab, "w-1-2=", second=True)

    @classmethod
    def load(cls, path: str | None = None) -> _TokenTagger | None:
        ref: Any = (
            path if path is not None else resources.files("ztai.detect").joinpath("data/pii_tagger.npz")
        )
        try:
            with (
                open(ref, "rb") if path is not None else ref.open("rb") as fh,
                np.load(fh, allow_pickle=False) as z,
            ):
                vocab_blob = bytes(z["vocab"].tobytes()).decode("utf-8")
                labels = bytes(z["labels"].tobytes()).decode("utf-8").split("\n")
                w1, b1 = np.asarray(z["w1"]), np.asarray(z["b1"])
                w2 = np.asarray(z["w2"]) if "w2" in z else None
                b2 = np.asarray(z["b2"]) if "b2" in z else None
        except (FileNotFoundError, OSError, KeyError, ValueError):
            return None
        vocab = {f: i for i, f in enumerate(vocab_blob.split("\n"))}
        return cls(vocab, labels, w1, b1, w2, b2)

    def indices(self, feats: list[list[str]]) -> list[list[int]]:
        get = self.vocab.get
        return [[j for s in f if (j := get(s, -1)) >= 0] for f in feats]

    def _stack_indices(self, p1: np.ndarray) -> list[list[int]]:
        """`indices(stack_features(p1, labels))`, cached per 5-label window."""
        best = p1.argmax(axis=1).tolist()
        conf = p1.max(axis=1).tolist()
        labels = self.labels
        labs = ["<s>", "<s>"] + [labels[k] if conf[i] >= 0.5 else labels[k] + "?" for i, k in enumerate(best)]
        labs += ["</s>", "</s>"]
        cache = self._stack_cache
        out: list[list[int]] = []
        for i in range(len(best)):
            key = (labs[i], labs[i + 1], labs[i + 2], labs[i + 3], labs[i + 4])
            hit = cache.get(key)
            if hit is None:
                l2, l1, l0, r1, r2 = key
                feats = [f"s0={l0}", f"s-1={l1}", f"s1={r1}", f"s-2={l2}", f"s2={r2}", f"s-1+1={l1}|{r1}",
                         f"s-1,0={l1}|{l0}", f"s0,1={l0}|{r1}"]  # fmt: skip
                hit = self.indices([feats])[0]
                cache[key] = hit
            out.append(hit)
        return out

    def _own_indices(self, w: str) -> tuple[list[int], tuple[list[int], ...]]:
        hit = self._own_cache.get(w)
        if hit is None:
            own, nb = _own_features(w, _gazetteer())
            get = self.vocab.get
            own_idx = [j for j in (get(x, -1) for x in own) if j >= 0]
            nb_idx = tuple([j for j in (get(str(o) + x, -1) for x in nb) if j >= 0] for o in _OFFSETS)
            hit = (own_idx, nb_idx)
            if len(self._own_cache) > 100_000:
                self._own_cache.clear()
            self._own_cache[w] = hit
        return hit

    def indices_for(self, text: str, toks: list[Token], pattern_types: list[str]) -> list[list[int]]:
        """Same features as `token_features`, as vocabulary indices, with the text-only part cached."""
        flat, counts = self.flat_indices_for(text, toks, pattern_types)
        out: list[list[int]] = []
        pos = 0
        for c in counts:
            out.append(flat[pos : pos + c])
            pos += c
        return out

    def _valued_index(self, feature: str) -> int:
        j = self._valued.get(feature)
        if j is None:
            j = self.vocab.get(feature, -1)
            if len(self._valued) < 10_000:
                self._valued[feature] = j
        return j

    def flat_indices_for(
        self, text: str, toks: list[Token], pattern_types: list[str]
    ) -> tuple[list[int], list[int]]:
        """`indices_for` as one flat list plus the count per token, built without the feature strings
        where it can: the same indices in the same order as `token_features` (row = own features, then
        `_context_features`' in its order, then the neighbours' at -2, -1, 1, 2), so sums are bitwise
        the same."""
        n = len(toks)
        get = self.vocab.get
        valued = self._valued_index
        owns = [self._own_indices(t.text) for t in toks]
        lows = [t.text.lower() for t in toks]
        places = _place_spans(toks, lows, text, _gazetteer())
        flag = self._flag
        f_capmid, f_initial, f_bol, f_eol = flag["cap-mid"], flag["initial"], flag["bol"], flag["eol"]
        f_ml, f_first, f_gl, f_gr = flag["ml"], flag["first"], flag["glued-l"], flag["glued-r"]
        line_id, per_line = _line_layout(toks)
        multi = bool(per_line)
        any_pt = any(pattern_types)
        any_pl = any(places)
        sentinel = self._sentinel
        bg_second, bgp_first, w12_second = self._bg_second, self._bgp_first, self._w12_second
        flat: list[int] = []
        add = flat.append
        extend = flat.extend
        counts: list[int] = []
        before = 0
        for i in range(n):
            t = toks[i]
            w = t.text
            low = lows[i]
            extend(owns[i][0])
            if any_pt and pattern_types[i] and (j := valued("pt=" + pattern_types[i])) >= 0:
                add(j)
            if any_pl and places[i] and (j := valued("pl=" + places[i])) >= 0:
                add(j)
            c0 = w[0]
            if (
                f_capmid >= 0
                and c0.isupper()
                and i > 0
                and not t.nl_before
                and toks[i - 1].text not in ".!?:\"'"
            ):
                add(f_capmid)
            if f_initial >= 0 and len(w) == 1 and w.isupper() and 0 < i < n - 1:
                nxt = toks[i + 2] if toks[i + 1].text == "." and i + 2 < n else toks[i + 1]
                if toks[i - 1].text[0].isupper() and nxt.text[0].isupper() and not nxt.nl_before:
                    add(f_initial)
            if t.nl_before and f_bol >= 0:
                add(f_bol)
            if f_eol >= 0 and (i + 1 >= n or toks[i + 1].nl_before):
                add(f_eol)
            if multi:
                if (j := self._lt[_len_bucket(per_line[line_id[i]])]) >= 0:
                    add(j)
                if f_ml >= 0:
                    add(f_ml)
            if i == 0 and f_first >= 0:
                add(f_first)
            if any_pt or any_pl:
                for off in _OFFSETS:
                    k = i + off
                    if 0 <= k < n:
                        if places[k] and (j := valued(_OFF_PL[off] + places[k])) >= 0:
                            add(j)
                        if pattern_types[k] and (j := valued(_OFF_PT[off] + pattern_types[k])) >= 0:
                            add(j)
            prev = lows[i - 1] if i > 0 else "<s>"
            if low in bg_second and (j := get("bg=" + prev + "|" + low, -1)) >= 0:
                add(j)
            if (
                low in bgp_first
                and (j := get("bg+=" + low + "|" + (lows[i + 1] if i + 1 < n else "</s>"), -1)) >= 0
            ):
                add(j)
            if (
                prev in w12_second
                and (j := get("w-1-2=" + (lows[i - 2] if i > 1 else "<s>") + "|" + prev, -1)) >= 0
            ):
                add(j)
            if f_gl >= 0 and i > 0 and toks[i - 1].end == t.start:
                add(f_gl)
            if f_gr >= 0 and i + 1 < n and toks[i + 1].start == t.end:
                add(f_gr)
            extend(owns[i - 2][1][0] if i >= 2 else sentinel[0])
            extend(owns[i - 1][1][1] if i >= 1 else sentinel[1])
            extend(owns[i + 1][1][2] if i + 1 < n else sentinel[2])
            extend(owns[i + 2][1][3] if i + 2 < n else sentinel[3])
            counts.append(len(flat) - before)
            before = len(flat)
        return flat, counts

    @staticmethod
    def _probs(w: np.ndarray, b: np.ndarray, idx: list[list[int]]) -> np.ndarray:
        n = len(idx)
        counts = np.fromiter(map(len, idx), dtype=np.int64, count=n)
        logits = np.zeros((n, w.shape[1]), dtype=np.float32)
        total = int(counts.sum())
        if total:
            flat = np.fromiter(chain.from_iterable(idx), dtype=np.int64, count=total)
            rows = w[flat]
            nz = counts > 0
            starts = (np.cumsum(counts) - counts)[nz]
            logits[nz] = np.add.reduceat(rows, starts, axis=0)
        logits += b
        logits -= logits.max(axis=1, keepdims=True)
        np.exp(logits, out=logits)
        logits /= logits.sum(axis=1, keepdims=True)
        return logits

    def _stage2(self, idx: list[list[int]], p1: np.ndarray) -> np.ndarray:
        if self.w2 is None or self.b2 is None:
            return p1
        extra = self.indices(stack_features(p1, self.labels))
        return self._probs(self.w2, self.b2, [a + b for a, b in zip(idx, extra, strict=True)])

    def predict_proba(self, feats: list[list[str]], stages: int = 2) -> np.ndarray:
        idx = self.indices(feats)
        p1 = self._probs(self.w1, self.b1, idx)
        return p1 if stages < 2 else self._stage2(idx, p1)

    def predict_tokens(self, text: str, toks: list[Token], pattern_types: list[str]) -> np.ndarray:
        """`predict_proba(token_features(...))`, faster: cached per-token-text features, one gather of
        both stages' weights for the shared features, cached stacking features."""
        if self.w2 is None or self.b2 is None or self._w12 is None:
            return self._probs(self.w1, self.b1, self.indices_for(text, toks, pattern_types))
        n_lab = len(self.labels)
        both = self._flat_sums(self._w12, *self.flat_indices_for(text, toks, pattern_types))
        p1 = _softmax(both[:, :n_lab] + self.b1)
        logits2 = both[:, n_lab:] + self._sums(self.w2, self._stack_indices(p1)) + self.b2
        return _softmax(logits2)

    @staticmethod
    def _flat_sums(w: np.ndarray, flat: list[int], counts: list[int]) -> np.ndarray:
        """`_sums` of rows given flat (the same additions in the same order)."""
        n = len(counts)
        out = np.zeros((n, w.shape[1]), dtype=np.float32)
        if flat:
            cnt = np.array(counts, dtype=np.int64)
            nz = cnt > 0
            out[nz] = np.add.reduceat(w[np.array(flat, dtype=np.int64)], (np.cumsum(cnt) - cnt)[nz], axis=0)
        return out

    @staticmethod
    def _sums(w: np.ndarray, idx: list[list[int]]) -> np.ndarray:
        n = len(idx)
        counts = np.fromiter(map(len, idx), dtype=np.int64, count=n)
        out = np.zeros((n, w.shape[1]), dtype=np.float32)
        total = int(counts.sum())
        if total:
            flat = np.fromiter(chain.from_iterable(idx), dtype=np.int64, count=total)
            nz = counts > 0
            out[nz] = np.add.reduceat(w[flat], (np.cumsum(counts) - counts)[nz], axis=0)
        return out


def _bigram_words(vocab: dict[str, int], prefix: str, second: bool) -> frozenset[str]:
    """The words that are the second (or first) part of some `prefix + a + "|" + b` feature; every split
    at a "|" counts, since a token may itself be or contain "|"."""
    words: set[str] = set()
    for feature in vocab:
        if feature.startswith(prefix):
            body = feature[len(prefix) :]
            for m in re.finditer(r"\|", body):
                words.add(body[m.end() :] if second else body[: m.start()])
    return frozenset(words)


_tagger_lock = threading.Lock()
_tagger_cache: list[_TokenTagger | None] = []


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def use_tagger_file(path: str | None) -> None:
    """Load the tagger from `path` instead of the packaged artifact (evaluation of retrained models)."""
    with _tagger_lock:
        _tagger_cache[:] = [_TokenTagger.load(path)]


def _tagger() -> _TokenTagger | None:
    if not _tagger_cache:
        with _tagger_lock:
            if not _tagger_cache:
                _tagger_cache.append(_TokenTagger.load())
    return _tagger_cache[0]


def pattern_types_per_token(toks: list[Token], hits: list[_Hit]) -> list[str]:
    out = [""] * len(toks)
    if not hits:
        return out
    j = 0
    for i, t in enumerate(toks):
        while j < len(hits) and hits[j].end <= t.start:
            j += 1
        if j < len(hits) and hits[j].start < t.end:
            out[i] = hits[j].type + ("?" if hits[j].score < WEAK else "")
    return out


# Tagger spans that may run across line breaks (address blocks); others are cut at line breaks.
_MULTILINE = frozenset({"STREET_ADDRESS", "ORGANIZATION", "TITLE"})
_CONTAINERS = frozenset({"STREET_ADDRESS", "LOCATION", "ORGANIZATION", "PERSON"})
_NRP_CONTAINERS = frozenset({"STREET_ADDRESS", "ORGANIZATION"})  # "Cyprus (Greek)", "Swiss Re Group"
_JOINERS = frozenset({",", "-", "'", "\u2019", ".", "&", "/", "(", ")"})
_COMMA_OK = frozenset({"STREET_ADDRESS", "ORGANIZATION", "TITLE"})


def _tagger_spans(
    text: str, toks: list[Token], probs: np.ndarray, labels: list[str], threshold: float
) -> Iterator[tuple[str, int, int, float]]:
    """Runs of tokens with one label -> (type, start, end, mean probability).

    A token is part of an entity when P(not O) >= threshold; its type is the most probable entity label
    (so a token split between PERSON 0.4 / LOCATION 0.3 / O 0.3 is PII, typed PERSON)."""
    o = labels.index("O")
    ent = probs.copy()
    ent[:, o] = -1.0
    best = ent.argmax(axis=1).tolist()
    conf = (1.0 - probs[:, o]).tolist()
    lab_of = [labels[k] if conf[i] >= threshold else "O" for i, k in enumerate(best)]
    n = len(toks)
    i = 0
    while i < n:
        lab = lab_of[i]
        if lab == "O" or not toks[i].text[0].isalnum():
            i += 1
            continue
        j = i
        scores = [conf[i]]
        k = i + 1
        while k < n:
            if toks[k].nl_before and lab not in _MULTILINE:
                break
            if lab_of[k] == lab:
                if toks[k].text[0].isalnum():
                    j = k
                scores.append(conf[k])
                k += 1
                continue
            # one joiner token inside an entity ("O'Neil", "Smith-Jones", "Owens, Duran and Oneal")
            tk = toks[k].text
            if (
                tk in _JOINERS
                and (tk != "," or lab in _COMMA_OK)
                and k + 1 < n
                and lab_of[k + 1] == lab
                and not (toks[k + 1].nl_before and lab not in _MULTILINE)
            ):
                k += 1
                continue
            break
        end = toks[j].end
        # keep the period of an abbreviation ("Mr.", "Jr.", "Inc.", "St.") inside the span
        if (
            j + 1 < n
            and toks[j + 1].text == "."
            and toks[j + 1].start == end
            and len(toks[j].text) <= 4
            and lab in ("TITLE", "PERSON", "ORGANIZATION", "STREET_ADDRESS")
            and toks[j].text[0].isalpha()
        ):
            end = toks[j + 1].end
        # a lone short number ("1", "42") is not an address or a name on its own
        if i != j or not toks[i].text.isdigit() or len(toks[i].text) >= 3:
            yield lab, toks[i].start, end, sum(scores) / len(scores)
        i = k if k > j else j + 1


_WORD_TOKEN_RE = re.compile(r"[^\W_]+")
_NAMED = frozenset({"PERSON", "LOCATION", "ORGANIZATION"})
_TITLE_BEFORE_RE = re.compile(
    r"(?:\b(?:Mr|Mrs|Ms|Mx|Dr|Prof|Rev|Sir|Dame|Miss|Madam|Mister|Professor|Doctor|Lord|Lady)\.?)\s{1,3}$", _I
)


def _random_looking(word: str) -> bool:
    """A token that is no name: letters mixed with digits ("hunter2", a key), case flipping more than a
    name does ("abcDEF", "McDonald" is fine), or a long all-capitals run (an access key id)."""
    if any(c.isdigit() for c in word):
        return True
    flips = sum(1 for a, b in pairwise(word) if a.islower() and b.isupper())
    return flips >= 2 or (word.isupper() and len(word) > 12)


def _plausible_entity(text: str, label: str, start: int, end: int, cased: bool) -> bool:
    """Whether a tagger PERSON / LOCATION / ORGANIZATION span looks like a name at all: no digits or
    random-looking tokens (identifiers, passwords, API keys) and, in a text that uses capitals, at least
    one capitalised word ("aws", "hunter" in running text are not names). A PERSON is no short acronym
    ("AWS"); in a text without capitals, its words must be common first or last names, and a place must
    be a gazetteer place ("login: aws / hunter2")."""
    words = _WORD_TOKEN_RE.findall(text, start, end)
    if not words or any(_random_looking(w) for w in words):
        return False
    if cased:
        if label == "PERSON" and all(w.isupper() and len(w) <= 4 for w in words):
            return False
        return any(w[0].isupper() for w in words)
    gaz = _gazetteer()
    if label == "PERSON":
        return all(gaz.first.get(w, "F3") == "F1" or gaz.last.get(w, "L3") == "L1" for w in words)
    if label == "LOCATION":
        return " ".join(words) in gaz.place or any(w in gaz.place for w in words)
    return True


def _name_like(text: str, start: int, end: int, cased: bool) -> bool:
    """A PERSON span shaped like a person's name: every word capitalised (in a cased text), a first or last
    name from the gazetteer among them, and either two name words or an honorific before a single one
    ("Mr. Brown"). A lone capitalised word ("Apple", "Jordan") names too little."""
    words = [w for w in _WORD_TOKEN_RE.findall(text, start, end) if len(w) > 1]
    if not words or (cased and not all(w[0].isupper() for w in words)):
        return False
    gaz = _gazetteer()
    if not any(w.lower() in gaz.first or w.lower() in gaz.last for w in words):
        return False
    return len(words) >= 2 or _TITLE_BEFORE_RE.search(text, max(0, start - 16), start) is not None


# Words just before a name that make it someone's personal data rather than a name the text talks about
# ("my name is Maria Lopez", "Dear Mr. Brown", "contact Ana Ruiz", "Patient: John Doe"); a name in a text
# that also carries an e-mail address, a phone number, an address or an id counts too. A name without
# either ("Write a dialogue between Julius Caesar and ...", "How did Brad Pitt ...") is public
# knowledge the model needs, and is left in place.
_PERSON_CUE_RE = re.compile(
    r"(?:\bname[sd]?\b[^.!?\n]{0,24}?|\b(?:i\s+am|i'm|this\s+is|dear|hi|hello|hey|regards|sincerely|thanks"
    r"|cheers|signed|contact|call|email|e-mail|mail|text|message|ask|invite|meet|remind|cc|attn|attention"
    r"|patient|customer|client|employee|applicant|tenant|user|member|candidate|holder|recipient|sender"
    r"|mr|mrs|ms|mx|miss|dr)\b)"
    r"[\s,.:;\-\u2013\u2014'\"]{0,4}(?:(?:mr|mrs|ms|mx|miss|dr|prof|sir|madam)\.?\s{1,3})?$",
    _I,
)
_STREET_SUFFIXES = (
    "katu", "gata", "gatan", "gade", "vej", "weg", "straße", "strasse", "väg", "vägen", "polku", "laan",
    "straat", "utca", "ulica", "sokak", "caddesi", "allee", "gasse", "platz", "damm", "ufer",
    "veien", "vegen", "stræde", "torget", "gränd", "stig", "stieg", "steig", "markt",
    "vænget", "vangen", "bakken", "stien", "gaten", "vegur", "gård", "kuja", "brücke", "intie", "ntie",
)  # fmt: skip
# Street words that also run through ordinary text next to a number ("Row 2", "1 square", "6 box", "del 1
# al 90", "7. Building ...", "via 1890"): they still help the tagger, but do not make an address alone.
_COMMON_STREET_WORDS = frozenset(
    _words(
        """
        row square sq via al ul cad building bldg path loop view unit box close floor fl walk hill circle
        cir trail gardens grove plaza bypass pike apt apartment suite ste po p.o psc cmr dpo apo fpo way
        place pl court ct
        """
    )
)
_ADDRESS_STREET_WORDS = _STREET_WORDS - _COMMON_STREET_WORDS
_UNIT_WORDS = frozenset(_words("apt apartment suite ste unit box po psc cmr dpo apo fpo bldg floor fl"))
# "my address is", "lives at", "ship to": a numbered span after these is an address even without a
# known street word ("450 Præstevænget 15").
_ADDRESS_CUE_RE = re.compile(
    r"\b(?:address(?:es)?|addr|(?:live[sd]?|living|located|resid\w*|ship(?:ped)?|deliver(?:ed)?|send|sent|moved"
    r"|visit)\s+(?:\w+\s+)?(?:at|on|to|in))\b[^.!?\n]{0,16}$",
    _I,
)
_HOUSE_NUMBER_RE = re.compile(r"(?<![\w.,+\-*/=^])\d{1,5}[A-Za-z]?(?![\w]|[.,:]\d|\s?[+\-*/=^%])")


def _street_address_with_number(text: str, start: int, end: int) -> bool:
    """A STREET_ADDRESS span that locates a home or an office: a house number and a street word ("221B
    Baker Street", "Kiannonkatu 9", "Rúa do Paseo 46") or an address cue before it, not a number next
    to any word ("10 rows", "Row 2, Col 2", "2020 U.", "12,7,2")."""
    span = text[start:end]
    if _HOUSE_NUMBER_RE.search(span) is None:
        return False
    tokens = _WORD_TOKEN_RE.findall(span)
    for k, word in enumerate(tokens):
        low = word.lower()
        if low in _ADDRESS_STREET_WORDS or (len(low) > 5 and low.endswith(_STREET_SUFFIXES)):
            return True
        # a common street word after a capitalised name ("Chestnut Way", "Elm Place"), not "Row 2"
        if low in _COMMON_STREET_WORDS and k > 0 and tokens[k - 1].isalpha() and tokens[k - 1][0].isupper():
            return True
        # a unit or box with its number ("Apt. 342", "Suite 828", "PSC 5420, Box 2708"), not "6 box"
        if low in _UNIT_WORDS and k + 1 < len(tokens) and tokens[k + 1][:1].isdigit():
            return True
    words = [w for w in tokens if w.isalpha()]
    return bool(words) and _ADDRESS_CUE_RE.search(text, max(0, start - 40), start) is not None


# ---------------------------------------------------------------------------------------------------------
# Detector
# ---------------------------------------------------------------------------------------------------------


class PiiDetector:
    """Personal data in text, with Presidio's entity names. Stateless and thread-safe.

    `threshold`: minimum tagger probability that a token belongs to some entity (1 - P(O)) for it to count
    as part of a name / place / address / organisation. `entities`: report only these types.
    `tagger_max_chars`: the tagger (about 15 us per token in CPython) looks at the first
    `tagger_max_chars` characters only; the pattern recognizers
    (about 1-2 s per MB in the worst case) always see the whole text. None = no limit.
    `identifying_types` / `person_min_score`: which findings are marked `identifying` (the values the
    shipped policy tokenizes; see `IDENTIFYING_TYPES`); every type is reported either way.
    """

    name = "pii"
    cacheable = True  # findings depend on (text, options) only: the Inspector may cache them

    def __init__(
        self,
        threshold: float = 0.5,
        use_tagger: bool = True,
        entities: Iterable[str] | None = None,
        tagger_max_chars: int | None = 100_000,
        identifying_types: Iterable[str] = IDENTIFYING_TYPES,
        person_min_score: float = PERSON_MIN_SCORE,
    ):
        self.threshold = threshold
        self.use_tagger = use_tagger
        self.entities = frozenset(entities) if entities is not None else None
        self.tagger_max_chars = tagger_max_chars
        self.identifying_types = frozenset(identifying_types)
        self.person_min_score = person_min_score

    def warm(self) -> None:
        """Load the tagger and the gazetteer now (a gateway calls this at start, so that the first
        request does not pay for it)."""
        _gazetteer()
        if self.use_tagger:
            _tagger()
        self.scan("Warm-up: Maria Lopez <maria@example.com>, +1 415 555 0100, 221B Baker Street, London.")

    def _identifying(self, text: str, type_: str, start: int, end: int, score: float, cased: bool) -> bool:
        if type_ not in self.identifying_types:
            return False
        if type_ == "STREET_ADDRESS":
            return _street_address_with_number(text, start, end)
        if type_ == "PERSON":  # and a personal cue, or other identifying data in the text (_with_people)
            return (
                score >= self.person_min_score
                and _name_like(text, start, end, cased)
                and _PERSON_CUE_RE.search(text, max(0, start - 40), start) is not None
            )
        return True

    def _with_people(self, text: str, offset: int, found: list[Finding], cased: bool) -> list[Finding]:
        """Names in a text that also carries identifying data (an e-mail, a phone number, an address) are
        that person's: the name-shaped PERSON findings become identifying too."""
        if "PERSON" not in self.identifying_types or not any(
            f.identifying and f.type != "PERSON" for f in found
        ):
            return found
        return [
            replace(f, identifying=True)
            if f.type == "PERSON"
            and not f.identifying
            and f.score >= self.person_min_score
            and _name_like(text, f.start - offset, f.end - offset, cased)
            else f
            for f in found
        ]

    def scan(self, text: str, source: Source = "user") -> list[Finding]:
        del source  # the same rules for every source
        if not text:
            return []
        limit = len(text) if self.tagger_max_chars is None else self.tagger_max_chars
        if len(text) <= _WINDOW:
            found = self._scan_window(text, 0, self.use_tagger and limit > 0)
        else:
            found = []
            seen: set[tuple[str, int, int]] = set()
            pos = 0
            while pos < len(text):
                end = min(len(text), pos + _WINDOW)
                # cut at a whitespace near the window end so tokens are not split
                if end < len(text):
                    cut = text.rfind(" ", pos + _WINDOW - _OVERLAP, end)
                    end = cut if cut > pos else end
                for f in self._scan_window(text[pos:end], pos, self.use_tagger and pos < limit):
                    key = (f.type, f.start, f.end)
                    if key not in seen:
                        seen.add(key)
                        found.append(f)
                if end >= len(text):
                    break
                pos = max(pos + 1, end - _OVERLAP)
            found = _dedupe_overlaps(found)
        if self.entities is not None:
            found = [f for f in found if f.type in self.entities]
        return found

    def _scan_window(self, text: str, offset: int, use_tagger: bool) -> list[Finding]:
        hits = _resolve(_pattern_hits(text))
        tagger = _tagger() if use_tagger else None
        toks = tokenize(text) if tagger is not None else []
        if tagger is None or not toks:
            cased = _has_upper(text)
            return [
                self._finding(text, offset, h.type, h.start, h.end, h.score, h.evidence, cased) for h in hits
            ]
        ptypes = pattern_types_per_token(toks, hits)
        probs = tagger.predict_tokens(text, toks, ptypes)
        spans = list(_tagger_spans(text, toks, probs, tagger.labels, self.threshold))  # disjoint, sorted
        if spans and any(h.score < WEAK for h in hits):
            # a weak pattern hit (a bare year, an unlabelled digit group, a nationality word) inside a
            # name, address or organisation the tagger found is part of that entity
            span_starts = [sp[1] for sp in spans]

            def inside(h: _Hit) -> bool:
                k = bisect.bisect_right(span_starts, h.start) - 1
                if k < 0 or h.end > spans[k][2]:
                    return False
                lab, s, e, _ = spans[k]
                if h.type == "NRP":  # "Cyprus (Greek) 25572" yes; "a new Croatian place" no
                    return lab in _NRP_CONTAINERS and any(c.isdigit() for c in text[s:e])
                return lab in _CONTAINERS

            hits = [h for h in hits if h.score >= WEAK or not inside(h)]
        cased = _has_upper(text)
        out = [self._finding(text, offset, h.type, h.start, h.end, h.score, h.evidence, cased) for h in hits]
        hit_starts = [h.start for h in hits]
        for lab, s, e, sc in spans:
            if hits and _overlaps_any(s, e, hit_starts, hits):
                continue
            if lab in _NAMED and not _plausible_entity(text, lab, s, e, cased):
                continue
            out.append(self._finding(text, offset, lab, s, e, round(sc, 4), "model:" + lab.lower(), cased))
        out.sort(key=lambda f: (f.start, f.end))
        return self._with_people(text, offset, out, cased)

    def _finding(
        self,
        text: str,
        offset: int,
        type_: str,
        start: int,
        end: int,
        score: float,
        evidence: str,
        cased: bool,
    ) -> Finding:
        identifying = self._identifying(text, type_, start, end, score, cased)
        return Finding(DETECTOR, type_, start + offset, end + offset, score, evidence, identifying)


def _has_upper(text: str) -> bool:
    return re.search(r"[A-Z]", text) is not None or (not text.isascii() and any(c.isupper() for c in text))


def _dedupe_overlaps(found: list[Finding]) -> list[Finding]:
    found.sort(key=lambda f: (f.start, -(f.end - f.start)))
    out: list[Finding] = []
    for f in found:
        if out and f.start < out[-1].end and f.type == out[-1].type:
            continue
        out.append(f)
    return out
