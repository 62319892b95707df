"""Text normalisation before injection scoring, and the obfuscation it finds.

`normalize(text)` undoes the usual ways of hiding an instruction from a filter while keeping it readable
to a model, and reports each one it undid as a `Signal` (kind, span in the ORIGINAL text, detail):

- invisible characters: zero-width and other format characters, bidi controls, C0/C1 controls;
  Unicode tag characters (U+E0020..E007E, "ASCII smuggling") and runs of variation selectors
  ("emoji smuggling") are decoded back to the text they carry;
- Unicode compatibility forms (NFKC: fullwidth and mathematical letters, ligatures), stacked
  combining marks on Latin letters, and homoglyphs (Cyrillic/Greek look-alikes inside Latin words);
- markup: HTML/Markdown comments (their content is kept, the hiding is reported), HTML tags (attribute
  values are kept), hidden-HTML styles, chat-template role tokens (`<|im_start|>`, `[INST]`, ...);
- encodings, where the decoded segment is mostly printable text: base64 (standard and URL-safe),
  base32, hex, binary, ascii85, base85, Morse, HTML entities, `\\uXXXX` escapes, URL percent-encoding;
- rewritten text: rot13, reversed text, leetspeak and letters spaced out (`i g n o r e`).

The decoded form replaces the encoded one in `NormalizedText.text`, so the model scores what the target
model would read. `NormalizedText.span_to_original` maps a span of the normalised text back to the
original. Work is linear in the input: every pass is a regular-expression scan or a bounded decode, and the
total decoded volume and the number of rounds are capped.
"""

from __future__ import annotations

import base64
import binascii
import html
import re
import unicodedata
import urllib.parse
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]

MAX_SIGNALS_PER_KIND = 16  # occurrences kept per kind (the count goes on)
MAX_CANDIDATE_CHARS = 65_536  # longest encoded segment we try to decode
MAX_DECODED_CHARS = 262_144  # total decoded text per call
MAX_DECODE_ROUNDS = 2  # nested encodings (base64 of hex, ...)
DETAIL_CHARS = 60

# How suspicious each kind is on its own (the score of an "obfuscation" finding). Hiding text from a
# human reader is worse than encoding it; encodings have common benign uses (URLs, data URIs, hashes).
SIGNAL_SCORES: dict[str, float] = {
    "tag_characters": 0.9,
    "variation_selector_smuggling": 0.9,
    "bidi_control": 0.6,
    "invisible_characters": 0.5,
    "control_characters": 0.3,
    "homoglyph": 0.7,
    "unicode_compat": 0.4,
    "combining_marks": 0.4,
    "html_comment": 0.4,
    "markdown_comment": 0.5,
    "hidden_html": 0.5,
    "chat_template_tokens": 0.7,
    "html_entities": 0.3,
    "unicode_escape": 0.4,
    "url_encoding": 0.2,
    "base64": 0.4,
    "base32": 0.5,
    "hex": 0.4,
    "binary": 0.5,
    "ascii85": 0.6,
    "base85": 0.6,
    "morse": 0.6,
    "rot13": 0.6,
    "reversed_text": 0.6,
    "leetspeak": 0.4,
    "spaced_letters": 0.4,
}


@dataclass(frozen=True, slots=True)
class Signal:
    """One obfuscation found: `text[start:end]` of the original text; `detail` is a short preview."""

    kind: str
    start: int
    end: int
    detail: str = ""


class NormalizedText:
    """The normalised text, the signals, and the map back to the original offsets."""

    __slots__ = ("_ends", "_starts", "counts", "original_length", "signals", "text")

    def __init__(
        self,
        text: str,
        signals: list[Signal],
        counts: dict[str, int],
        starts: IntArray | None,
        ends: IntArray | None,
        original_length: int,
    ) -> None:
        self.text = text
        self.signals = signals
        self.counts = counts  # occurrences per kind (signals keeps at most MAX_SIGNALS_PER_KIND each)
        self._starts = starts
        self._ends = ends
        self.original_length = original_length

    @property
    def kinds(self) -> list[str]:
        return sorted(self.counts)

    def span_to_original(self, start: int, end: int) -> tuple[int, int]:
        """The original span that `text[start:end]` came from."""
        n = len(self.text)
        start = min(max(start, 0), n)
        end = min(max(end, start), n)
        if self._starts is None or self._ends is None:
            return start, end
        if start >= n:
            return self.original_length, self.original_length
        orig_start = int(self._starts[start])
        orig_end = int(self._ends[end - 1]) if end > start else orig_start
        return orig_start, max(orig_end, orig_start)

    def to_normalized(self, position: int) -> int:
        """The first position of the normalised text that comes from original `position` or later."""
        if self._starts is None:
            return min(max(position, 0), len(self.text))
        return int(np.searchsorted(self._starts, position, side="left"))


# --------------------------------------------------------------------------------------------- state


class _State:
    """The text being normalised, with per-character original spans once anything was replaced."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.original_length = len(text)
        self.starts: IntArray | None = None
        self.ends: IntArray | None = None
        self.signals: list[Signal] = []
        self.counts: dict[str, int] = {}
        self.decoded_budget = MAX_DECODED_CHARS

    def original(self, start: int, end: int) -> tuple[int, int]:
        if self.starts is None or self.ends is None:
            return start, end
        n = len(self.text)
        orig_start = int(self.starts[start]) if start < n else self.original_length
        orig_end = int(self.ends[end - 1]) if end > start else orig_start
        return orig_start, orig_end

    def signal(self, kind: str, start: int, end: int, detail: str = "") -> None:
        count = self.counts.get(kind, 0)
        self.counts[kind] = count + 1
        if count < MAX_SIGNALS_PER_KIND:
            orig_start, orig_end = self.original(start, end)
            self.signals.append(Signal(kind, orig_start, orig_end, _preview(detail)))

    def _maps(self) -> tuple[IntArray, IntArray]:
        if self.starts is None or self.ends is None:
            starts = np.arange(len(self.text), dtype=np.int64)
            return starts, starts + 1
        return self.starts, self.ends

    def apply(self, edits: list[tuple[int, int, str]]) -> None:
        """Replace `text[s:e]` by `r` for each (s, e, r); edits sorted and not overlapping."""
        if not edits:
            return
        text, n = self.text, len(self.text)
        starts, ends = self._maps()
        parts: list[str] = []
        start_parts: list[IntArray] = []
        end_parts: list[IntArray] = []
        position = 0
        for s, e, replacement in edits:
            if s > position:
                parts.append(text[position:s])
                start_parts.append(starts[position:s])
                end_parts.append(ends[position:s])
            if replacement:
                orig_start = int(starts[s]) if s < n else self.original_length
                orig_end = int(ends[e - 1]) if e > s else orig_start
                parts.append(replacement)
                start_parts.append(np.full(len(replacement), orig_start, dtype=np.int64))
                end_parts.append(np.full(len(replacement), orig_end, dtype=np.int64))
            position = e
        if position < n:
            parts.append(text[position:])
            start_parts.append(starts[position:])
            end_parts.append(ends[position:])
        self.text = "".join(parts)
        empty = np.zeros(0, dtype=np.int64)
        self.starts = np.concatenate(start_parts) if start_parts else empty
        self.ends = np.concatenate(end_parts) if end_parts else empty

    def remove(self, spans: list[tuple[int, int]]) -> None:
        """Delete the spans (sorted, not overlapping); cheaper than `apply` for many small deletions."""
        if not spans:
            return
        starts, ends = self._maps()
        keep = np.ones(len(self.text), dtype=bool)
        parts: list[str] = []
        position = 0
        for s, e in spans:
            parts.append(self.text[position:s])
            keep[s:e] = False
            position = e
        parts.append(self.text[position:])
        self.text = "".join(parts)
        self.starts = starts[keep]
        self.ends = ends[keep]

    def take_budget(self, size: int) -> bool:
        if size > self.decoded_budget:
            return False
        self.decoded_budget -= size
        return True

    def result(self) -> NormalizedText:
        signals = sorted(self.signals, key=lambda signal: (signal.start, signal.end, signal.kind))
        return NormalizedText(
            self.text, signals, dict(self.counts), self.starts, self.ends, self.original_length
        )


def _preview(detail: str) -> str:
    detail = " ".join(detail.split())
    return detail if len(detail) <= DETAIL_CHARS else detail[: DETAIL_CHARS - 1] + "…"


# ---------------------------------------------------------------------------------------- validation


def _texty(decoded: str, min_letters: int = 3) -> bool:
    """Mostly printable text with letters: what a model would read as words."""
    n = len(decoded)
    if n < 2:
        return False
    printable = letters = 0
    for char in decoded:
        if char.isprintable() or char in "\n\r\t":
            printable += 1
            if char.isalpha() or char == " ":
                letters += 1
    alphas = sum(1 for char in decoded if char.isalpha())
    return printable >= 0.95 * n and letters >= 0.6 * n and alphas >= min_letters


def _bytes_to_text(raw: bytes) -> str | None:
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return decoded if _texty(decoded) else None


# --------------------------------------------------------------------------------------------- passes

_SMUGGLE_TAGS = re.compile("[\U000e0000-\U000e007f]+")
_VARIATION_SELECTORS = re.compile("[\ufe00-\ufe0f\U000e0100-\U000e01ef]+")
_BIDI = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_INVISIBLE = (
    "\u00ad\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200d\u2060-\u2065\u206a-\u206f"
    "\u3164\ufeff\uffa0\ufff9-\ufffb\U0001d173-\U0001d17a"
)
_CONTROLS = "\x00-\x08\x0e-\x1f\x7f-\x9f"
_HIDDEN = re.compile(f"[{_BIDI}{_INVISIBLE}{_CONTROLS}]+")
_BIDI_SET = frozenset(
    chr(c) for c in [0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
)
_JOINERS = frozenset("\u200c\u200d")


def _pass_smuggling(state: _State) -> None:
    text = state.text
    edits: list[tuple[int, int, str]] = []
    for match in _SMUGGLE_TAGS.finditer(text):
        payload = "".join(chr(ord(c) - 0xE0000) for c in match.group() if 0xE0020 <= ord(c) <= 0xE007E)
        if payload.strip():
            state.signal("tag_characters", match.start(), match.end(), payload)
            edits.append((match.start(), match.end(), f" {payload} "))
        else:
            edits.append((match.start(), match.end(), ""))
    for match in _VARIATION_SELECTORS.finditer(text):
        run = match.group()
        replacement = ""
        if len(run) >= 4:
            data = bytes(
                (ord(c) - 0xFE00) if ord(c) <= 0xFE0F else (ord(c) - 0xE0100 + 16)
                for c in run[:MAX_CANDIDATE_CHARS]
            )
            decoded = _bytes_to_text(data)
            if decoded is not None:
                state.signal("variation_selector_smuggling", match.start(), match.end(), decoded)
                replacement = f" {decoded} "
        edits.append((match.start(), match.end(), replacement))
    edits.sort()
    state.apply(edits)


def _is_latin_letter(char: str) -> bool:
    return char.isascii() and char.isalpha()


def _pass_hidden(state: _State) -> None:
    """Remove zero-width, format, bidi and control characters (controls become a space)."""
    text = state.text
    removals: list[tuple[int, int]] = []
    spaces: list[tuple[int, int, str]] = []
    for match in _HIDDEN.finditer(text):
        start, end = match.start(), match.end()
        run = match.group()
        if any(c in _BIDI_SET for c in run):
            state.signal("bidi_control", start, end, f"{len(run)} bidi control character(s)")
        if any("\x00" <= c <= "\x1f" or "\x7f" <= c <= "\x9f" for c in run):
            state.signal("control_characters", start, end, f"{len(run)} control character(s)")
            spaces.append((start, end, " "))
            continue
        invisible = [c for c in run if c not in _BIDI_SET]
        if invisible:
            before = text[start - 1] if start > 0 else " "
            after = text[end] if end < len(text) else " "
            joiner_only = all(c in _JOINERS for c in invisible)
            benign_position = (joiner_only and not (_is_latin_letter(before) or _is_latin_letter(after))) or (
                start == 0 and run == "\ufeff"
            )
            if not benign_position:
                state.signal("invisible_characters", start, end, f"{len(invisible)} invisible character(s)")
        removals.append((start, end))
    if spaces:
        # Controls become spaces, the rest is deleted: both as edits, in order.
        edits = sorted([*spaces, *((s, e, "") for s, e in removals)])
        state.apply(edits)
    else:
        state.remove(removals)


_NON_ASCII_RUN = re.compile(r"[\x00-\x7f]?[^\x00-\x7f]+")

# Look-alike letters of other scripts folded to Latin (a compact subset of Unicode's confusables;
# fullwidth and mathematical letters are folded by NFKC before this runs).
_CONFUSABLES: dict[int, str] = {
    # Cyrillic
    0x0430: "a", 0x0432: "b", 0x0435: "e", 0x0451: "e", 0x043A: "k", 0x043C: "m", 0x043D: "h",
    0x043E: "o", 0x0440: "p", 0x0441: "c", 0x0442: "t", 0x0443: "y", 0x0445: "x", 0x0455: "s",
    0x0456: "i", 0x0457: "i", 0x0458: "j", 0x0501: "d", 0x051B: "q", 0x051D: "w", 0x04BB: "h",
    0x04CF: "l", 0x044C: "b", 0x0410: "A", 0x0412: "B", 0x0415: "E", 0x0401: "E", 0x041A: "K",
    0x041C: "M", 0x041D: "H", 0x041E: "O", 0x0420: "P", 0x0421: "C", 0x0422: "T", 0x0423: "Y",
    0x0425: "X", 0x0405: "S", 0x0406: "I", 0x0407: "I", 0x0408: "J", 0x051A: "Q", 0x051C: "W",
    0x04BA: "H", 0x04C0: "I",
    # Greek
    0x03B1: "a", 0x03B2: "b", 0x03B3: "y", 0x03B5: "e", 0x03B9: "i", 0x03BA: "k", 0x03BD: "v",
    0x03BF: "o", 0x03C1: "p", 0x03C4: "t", 0x03C5: "u", 0x03C7: "x", 0x03C9: "w", 0x03F2: "c",
    0x03F3: "j", 0x0391: "A", 0x0392: "B", 0x0395: "E", 0x0396: "Z", 0x0397: "H", 0x0399: "I",
    0x039A: "K", 0x039C: "M", 0x039D: "N", 0x039F: "O", 0x03A1: "P", 0x03A4: "T", 0x03A5: "Y",
    0x03A7: "X", 0x03F9: "C",
    # Latin variants (dotless i, alpha, iota...), Armenian
    0x0261: "g", 0x0131: "i", 0x0237: "j", 0x0251: "a", 0x0269: "i", 0x028F: "y", 0x0585: "o",
    0x057D: "u", 0x0578: "n", 0x0570: "h",
}  # fmt: skip
_CONFUSABLE_TABLE = str.maketrans(_CONFUSABLES)
_CONFUSABLE_CHAR = re.compile("[" + "".join(map(chr, _CONFUSABLES)) + "]")
_LETTER_RUN = re.compile(r"[^\W\d_]+")
_ASCII_LETTER = re.compile("[A-Za-z]")
_LETTER = re.compile(r"[^\W\d_]")


def _pass_unicode(state: _State) -> None:
    """NFKC on the non-ASCII runs; stacked combining marks on Latin letters dropped."""
    text = state.text
    edits: list[tuple[int, int, str]] = []
    compat = marks = 0
    first: tuple[int, int] | None = None
    for match in _NON_ASCII_RUN.finditer(text):
        run = match.group()
        folded = unicodedata.normalize("NFKC", run)
        run_compat = sum(1 for c in run if not c.isascii() and unicodedata.normalize("NFKC", c).isascii())
        if run_compat:
            run_compat = sum(
                1
                for c in run
                if not c.isascii() and unicodedata.normalize("NFKC", c).isascii() and c.isalnum()
            )
        # Combining marks left on Latin letters after composition (zalgo text).
        stripped: list[str] = []
        previous_latin = False
        run_marks = 0
        for char in folded:
            if unicodedata.combining(char) and previous_latin:
                run_marks += 1
                continue
            stripped.append(char)
            previous_latin = _is_latin_letter(char) or (previous_latin and bool(unicodedata.combining(char)))
        if run_marks:
            folded = "".join(stripped)
        if folded != run:
            edits.append((match.start(), match.end(), folded))
            if run_compat or run_marks:
                compat += run_compat
                marks += run_marks
                first = first or (match.start(), match.end())
    if first is not None:
        if compat >= 3:
            state.signal("unicode_compat", first[0], first[1], f"{compat} compatibility letter(s)")
        if marks >= 3:
            state.signal("combining_marks", first[0], first[1], f"{marks} combining mark(s) on Latin letters")
    state.apply(edits)


def _pass_homoglyphs(state: _State) -> None:
    text = state.text
    if not _CONFUSABLE_CHAR.search(text):
        return
    letters = len(_LETTER.findall(text))
    mostly_latin = letters > 0 and len(_ASCII_LETTER.findall(text)) >= 0.8 * letters
    edits: list[tuple[int, int, str]] = []
    covered = 0
    for match in _CONFUSABLE_CHAR.finditer(text):
        if match.start() < covered:
            continue
        # The word around the look-alike (each word is visited once: linear).
        start = match.start()
        while start > covered and text[start - 1].isalpha():
            start -= 1
        run = _LETTER_RUN.match(text, match.start())
        end = run.end() if run else match.end()
        covered = end
        word = text[start:end]
        if not (_ASCII_LETTER.search(word) or mostly_latin):
            continue
        folded = word.translate(_CONFUSABLE_TABLE)
        if not folded.isascii():
            continue  # a word of another script that merely contains look-alikes
        state.signal("homoglyph", start, end, folded)
        edits.append((start, end, folded))
    state.apply(edits)


_MD_COMMENT = re.compile(
    r"^[ \t]*\[(?://|comment|_|#)\]:[ \t]*(?:#|<>)[ \t]*\((.{0,5000})\)[ \t]*$", re.MULTILINE
)
_CHAT_TOKEN = re.compile(
    r"<\|(?:im_start|im_end|im_sep|system|user|assistant|endoftext|begin_of_text|end_of_text|start_header_id|"
    r"end_header_id|eot_id|eom_id)\|>|\[/?INST\]|<</?SYS>>|<(?:start|end)_of_turn>|<\|?(?:endoftext|eos|bos)\|?>",
    re.IGNORECASE,
)
_HIDDEN_STYLE = re.compile(
    r"(?:display\s*:\s*none|visibility\s*:\s*hidden|font-size\s*:\s*0(?:px|pt|em)?\s*[;\"']|opacity\s*:\s*0\s*[;\"'])",
    re.IGNORECASE,
)
_HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9:-]{0,30}(?:\s[^<>]{0,1000})?/?>")
_ATTRIBUTE_TEXT = re.compile(
    r"\b(?:alt|title|aria-label|content|value|placeholder)\s*=\s*(?:\"([^\"]*)\"|'([^']*)')"
)


def _pass_markup(state: _State) -> None:
    text = state.text
    if "<" not in text and "[" not in text and ":" not in text:
        return
    for match in _CHAT_TOKEN.finditer(text):
        state.signal("chat_template_tokens", match.start(), match.end(), match.group())
    for match in _HIDDEN_STYLE.finditer(text):
        state.signal("hidden_html", match.start(), match.end(), match.group())
    edits: list[tuple[int, int, str]] = []
    taken_until = -1
    position = text.find("<!--")
    while position >= 0:  # str.find, not a lazy regex: unterminated comments cost no rescans
        close = text.find("-->", position + 4)
        end = len(text) if close < 0 else close + 3
        inner = text[position + 4 : close if close >= 0 else len(text)]
        if inner.strip():
            state.signal("html_comment", position, end, inner)
        edits.append((position, end, f" {inner} "))
        taken_until = end
        position = text.find("<!--", end) if close >= 0 else -1
    for match in _MD_COMMENT.finditer(text):
        if match.start() < taken_until:
            continue
        state.signal("markdown_comment", match.start(), match.end(), match.group(1))
        edits.append((match.start(), match.end(), f" {match.group(1)} "))
    edits.sort()
    # Tags outside comments: replaced by their human-readable attribute values.
    comment_spans = [(s, e) for s, e, _ in edits]
    tag_edits: list[tuple[int, int, str]] = []
    span_index = 0
    for match in _HTML_TAG.finditer(text):
        while span_index < len(comment_spans) and comment_spans[span_index][1] <= match.start():
            span_index += 1
        if span_index < len(comment_spans) and comment_spans[span_index][0] < match.end():
            continue
        values = [a or b for a, b in _ATTRIBUTE_TEXT.findall(match.group())]
        tag_edits.append((match.start(), match.end(), " " + " ".join(values) + " " if values else " "))
    state.apply(sorted([*edits, *tag_edits]))


# Encodings -----------------------------------------------------------------------------------------

_ENTITY_RUN = re.compile(r"(?:&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});)+")
_ESCAPE_RUN = re.compile(r"(?:\\u[0-9a-fA-F]{4}|\\U[0-9a-fA-F]{8}|\\x[0-9a-fA-F]{2}){3,}")
_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})|\\U([0-9a-fA-F]{8})|\\x([0-9a-fA-F]{2})")
_PERCENT_TOKEN = re.compile(r"(?<!\S)\S*%[0-9A-Fa-f]{2}\S*")
_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")
_TOKEN = re.compile(r"(?<![A-Za-z0-9+/=_-])[A-Za-z0-9+/_-]{16,}={0,6}(?![A-Za-z0-9+/=_-])")
_SPACED_HEX = re.compile(r"(?<![0-9A-Fa-f])(?:[0-9A-Fa-f]{2}[ :,]){7,}[0-9A-Fa-f]{2}(?![0-9A-Fa-f])")
_BINARY = re.compile(r"(?<![01])(?:[01]{8}[ ,]?){4,}(?![01])")
_ASCII85 = re.compile(r"<~[!-uz\s]{8,}?~>")
_BASE85 = re.compile(r"(?<!\S)[0-9A-Za-z!#$%&()*+\-;<=>?@^_`{|}~]{20,}(?!\S)")
_MORSE = re.compile(r"(?<![\w.\-])(?:[.\-]{1,6}(?: / | {1,3}|/)){7,}[.\-]{1,6}(?![\w.\-])")
_HEX_CHARS = frozenset("0123456789abcdefABCDEF")
_BASE32_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567=")
_BASE64_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=_-")

_MORSE_TABLE = {
    ".-": "a", "-...": "b", "-.-.": "c", "-..": "d", ".": "e", "..-.": "f", "--.": "g", "....": "h",
    "..": "i", ".---": "j", "-.-": "k", ".-..": "l", "--": "m", "-.": "n", "---": "o", ".--.": "p",
    "--.-": "q", ".-.": "r", "...": "s", "-": "t", "..-": "u", "...-": "v", ".--": "w", "-..-": "x",
    "-.--": "y", "--..": "z", "-----": "0", ".----": "1", "..---": "2", "...--": "3", "....-": "4",
    ".....": "5", "-....": "6", "--...": "7", "---..": "8", "----.": "9", ".-.-.-": ".", "--..--": ",",
    "..--..": "?", "-.-.--": "!", "-..-.": "/", ".--.-.": "@", "-....-": "-",
}  # fmt: skip


def _decode_token(token: str) -> tuple[str, str] | None:
    """(kind, decoded) for a long alphanumeric token that is hex, binary, base32 or base64 text."""
    body = token.rstrip("=")
    chars = set(token)
    if chars <= {"0", "1"} and len(token) % 8 == 0:
        decoded = _bytes_to_text(int(token, 2).to_bytes(len(token) // 8, "big"))
        if decoded is not None:
            return "binary", decoded
    if chars <= _HEX_CHARS:
        hex_body = token[2:] if token[:2] in ("0x", "0X") else token
        if len(hex_body) % 2 == 0:
            decoded = _bytes_to_text(bytes.fromhex(hex_body))
            if decoded is not None:
                return "hex", decoded
        return None
    if body.isalpha() and (body.islower() or body.isupper()) and not chars <= _BASE32_CHARS:
        return None  # one long word
    if chars <= _BASE32_CHARS:
        try:
            raw = base64.b32decode(body + "=" * (-len(body) % 8))
        except (binascii.Error, ValueError):
            raw = b""
        decoded = _bytes_to_text(raw) if raw else None
        if decoded is not None:
            return "base32", decoded
    if chars <= _BASE64_CHARS:
        padded = body + "=" * (-len(body) % 4)
        for altchars in (b"+/", b"-_"):
            try:
                raw = base64.b64decode(padded, altchars=altchars, validate=True)
            except (binascii.Error, ValueError):
                continue
            decoded = _bytes_to_text(raw)
            if decoded is not None:
                return "base64", decoded
    return None


def _decode_escapes(run: str) -> str:
    pieces: list[str] = []
    pending = bytearray()

    def flush() -> None:
        if pending:
            try:
                pieces.append(pending.decode("utf-8"))
            except UnicodeDecodeError:
                pieces.append(pending.decode("latin-1"))
            pending.clear()

    for match in _ESCAPE.finditer(run):
        short, long, byte = match.groups()
        if byte is not None:
            pending.append(int(byte, 16))
            continue
        flush()
        code = int(short or long, 16)
        pieces.append(chr(code) if code <= 0x10FFFF and not 0xD800 <= code <= 0xDFFF else " ")
    flush()
    return "".join(pieces)


def _decode_morse(run: str) -> str:
    words = re.split(r" / |/| {2,}", run.strip())
    return " ".join("".join(_MORSE_TABLE.get(letter, "") for letter in word.split()) for word in words)


def _candidates(text: str) -> list[tuple[int, int, str, str]]:
    """(start, end, kind, decoded) for every decodable segment, overlaps not yet resolved."""
    found: list[tuple[int, int, str, str]] = []
    if "&" in text:
        for match in _ENTITY_RUN.finditer(text):
            run = match.group()
            decoded = html.unescape(run)
            if decoded != run:
                numeric = run.count("&#")
                found.append((match.start(), match.end(), "html_entities" if numeric >= 3 else "", decoded))
    if "\\" in text:
        for match in _ESCAPE_RUN.finditer(text):
            decoded = _decode_escapes(match.group())
            if _texty(decoded, min_letters=1):
                found.append((match.start(), match.end(), "unicode_escape", decoded))
    if "%" in text:
        for match in _PERCENT_TOKEN.finditer(text):
            token = match.group()
            decoded = urllib.parse.unquote_plus(token, errors="replace")
            escapes = _PERCENT.findall(token)
            if len(escapes) < 3:
                continue
            letters = sum(1 for escape in escapes if chr(int(escape[1:], 16)).isalpha())
            if decoded != token:
                in_url = any(c in token for c in "/?=&")
                hiding = letters >= 3 or len(escapes) >= 6 or (not in_url and len(escapes) >= 3)
                found.append((match.start(), match.end(), "url_encoding" if hiding else "", decoded))
    for match in _TOKEN.finditer(text):
        token = match.group()
        if len(token) > MAX_CANDIDATE_CHARS:
            continue
        result = _decode_token(token)
        if result is not None:
            found.append((match.start(), match.end(), result[0], result[1]))
    for match in _SPACED_HEX.finditer(text):
        hex_text = re.sub(r"[ :,]", "", match.group())
        decoded_hex = _bytes_to_text(bytes.fromhex(hex_text))
        if decoded_hex is not None:
            found.append((match.start(), match.end(), "hex", decoded_hex))
    if "0" in text and "1" in text:
        for match in _BINARY.finditer(text):
            bits = re.sub(r"[ ,]", "", match.group())
            if len(bits) % 8 == 0 and len(bits) <= MAX_CANDIDATE_CHARS:
                decoded_bin = _bytes_to_text(int(bits, 2).to_bytes(len(bits) // 8, "big"))
                if decoded_bin is not None:
                    found.append((match.start(), match.end(), "binary", decoded_bin))
    if "<~" in text:
        for match in _ASCII85.finditer(text):
            try:
                raw = base64.a85decode(match.group(), adobe=True, ignorechars=b" \t\n\r\v")
            except (ValueError, binascii.Error):
                continue
            decoded_a85 = _bytes_to_text(raw)
            if decoded_a85 is not None:
                found.append((match.start(), match.end(), "ascii85", decoded_a85))
    for match in _BASE85.finditer(text):
        token = match.group()
        if set(token) <= _BASE64_CHARS or len(token) > MAX_CANDIDATE_CHARS:
            continue  # plain base64-alphabet tokens were tried above
        try:
            raw = base64.b85decode(token)
        except (ValueError, binascii.Error):
            continue
        decoded_b85 = _bytes_to_text(raw)
        if decoded_b85 is not None:
            found.append((match.start(), match.end(), "base85", decoded_b85))
    if ".-" in text or "-." in text:
        for match in _MORSE.finditer(text):
            decoded_morse = _decode_morse(match.group())
            if sum(c.isalpha() for c in decoded_morse) >= 6:
                found.append((match.start(), match.end(), "morse", decoded_morse))
    return found


def _pass_encodings(state: _State) -> bool:
    """Decode embedded encodings in place; True when something was decoded."""
    found = _candidates(state.text)
    if not found:
        return False
    found.sort(key=lambda item: (item[0], -(item[1] - item[0])))
    edits: list[tuple[int, int, str]] = []
    end_of_last = -1
    for start, end, kind, decoded in found:
        if start < end_of_last:
            continue
        if not state.take_budget(len(decoded)):
            break
        if kind:
            state.signal(kind, start, end, decoded)
        edits.append((start, end, f" {decoded} " if kind else decoded))
        end_of_last = end
    state.apply(edits)
    return bool(edits)


# Rewritten text --------------------------------------------------------------------------------------

_COMMON_WORDS = frozenset(
    [
        "the",
        "be",
        "to",
        "of",
        "and",
        "in",
        "that",
        "have",
        "it",
        "for",
        "not",
        "on",
        "with",
        "he",
        "as",
        "you",
        "do",
        "at",
        "this",
        "but",
        "his",
        "by",
        "from",
        "they",
        "we",
        "say",
        "her",
        "she",
        "or",
        "an",
        "will",
        "my",
        "one",
        "all",
        "would",
        "there",
        "their",
        "what",
        "so",
        "up",
        "out",
        "if",
        "about",
        "who",
        "get",
        "which",
        "go",
        "me",
        "when",
        "make",
        "can",
        "like",
        "time",
        "no",
        "just",
        "him",
        "know",
        "take",
        "people",
        "into",
        "year",
        "your",
        "good",
        "some",
        "could",
        "them",
        "see",
        "other",
        "than",
        "then",
        "now",
        "look",
        "only",
        "come",
        "its",
        "over",
        "think",
        "also",
        "back",
        "after",
        "use",
        "two",
        "how",
        "our",
        "work",
        "first",
        "well",
        "way",
        "even",
        "new",
        "want",
        "because",
        "any",
        "these",
        "give",
        "day",
        "most",
        "us",
        "is",
        "are",
        "was",
        "were",
        "been",
        "has",
        "had",
        "did",
        "does",
        "should",
        "must",
        "please",
        "ignore",
        "previous",
        "instructions",
        "instruction",
        "tell",
        "show",
        "send",
        "secret",
        "password",
        "system",
        "prompt",
        "reveal",
        "follow",
        "rules",
        "said",
        "here",
        "private",
        "admin",
        "page",
        "pages",
        "site",
        "data",
        "email",
        "user",
        "forget",
        "above",
        "below",
        "answer",
        "respond",
        "say",
        "print",
        "output",
        "everything",
        "every",
        "nothing",
        "anything",
    ]
)
_WORD = re.compile(r"[A-Za-z]+")
_SEGMENT = re.compile(r"[^\n]{8,600}")
_LEET_TOKEN = re.compile(r"(?<![A-Za-z0-9@$])[A-Za-z0-9@$]+")
_LEET_TABLE = str.maketrans(
    {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "9": "g", "@": "a", "$": "s"}
)
_ROT13_TABLE = str.maketrans(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
    "NOPQRSTUVWXYZABCDEFGHIJKLMnopqrstuvwxyzabcdefghijklm",
)
_SPACED = re.compile(r"(?<![A-Za-z])[A-Za-z]([ .\-_*])[A-Za-z](?:\1[A-Za-z]){2,}(?![A-Za-z])")


def _common_rate(segment: str) -> tuple[float, int]:
    words = [word for word in _WORD.findall(segment.lower()) if len(word) > 1]
    if not words:
        return 0.0, 0
    return sum(1 for word in words if word in _COMMON_WORDS) / len(words), len(words)


def _leet(segment: str) -> str:
    def fold(match: re.Match[str]) -> str:
        token = match.group()
        if token.isalpha() or not any(c.isalpha() for c in token):
            return token
        return token.translate(_LEET_TABLE)

    return _LEET_TOKEN.sub(fold, segment)


def _pass_spaced(state: _State) -> None:
    edits: list[tuple[int, int, str]] = []
    for match in _SPACED.finditer(state.text):
        joined = match.group().replace(match.group(1), "")
        state.signal("spaced_letters", match.start(), match.end(), joined)
        edits.append((match.start(), match.end(), joined))
    state.apply(edits)


def _pass_rewritten(state: _State) -> None:
    """rot13, reversed and leetspeak lines, recognised by how many common English words they turn into."""
    edits: list[tuple[int, int, str]] = []
    for match in _SEGMENT.finditer(state.text):
        segment = match.group()
        rate, words = _common_rate(segment)
        if words < 4 or rate >= 0.2:
            continue
        options = [("rot13", segment.translate(_ROT13_TABLE)), ("reversed_text", segment[::-1])]
        if any(c.isdigit() or c in "@$" for c in segment):
            options.append(("leetspeak", _leet(segment)))
        best_kind, best_text, best_rate = "", segment, rate
        for kind, candidate in options:
            candidate_rate, _ = _common_rate(candidate)
            if candidate_rate > best_rate:
                best_kind, best_text, best_rate = kind, candidate, candidate_rate
        if best_kind and best_rate >= 0.35 and best_rate - rate >= 0.2:
            state.signal(best_kind, match.start(), match.end(), best_text)
            edits.append((match.start(), match.end(), best_text))
    state.apply(edits)


def normalize(text: str) -> NormalizedText:
    """The text as a model would read it, with the obfuscation signals. Never raises on content."""
    state = _State(text)
    if not text.isascii():
        _pass_smuggling(state)
    if _HIDDEN.search(state.text):
        _pass_hidden(state)
    if not state.text.isascii():
        _pass_unicode(state)
        _pass_homoglyphs(state)
    _pass_markup(state)
    for _ in range(MAX_DECODE_ROUNDS):
        if not _pass_encodings(state):
            break
    _pass_spaced(state)
    _pass_rewritten(state)
    return state.result()


__all__ = ["SIGNAL_SCORES", "NormalizedText", "Signal", "normalize"]
