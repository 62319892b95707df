"""Instruction-like spans: the sentences of a text that tell its reader to do something.

A prompt injection has to ask the agent to act ("send the file to ...", "TODO: delete ...", "you must
visit ..."), whatever its framing; data an agent legitimately acts on mostly describes. This module finds
the sentences, and the clauses inside them, that are in the imperative or address the reader with an
obligation, without a model and without knowing any attack template:

- the text is read as a model reads it: escaped newlines and quotes of serialized tool output (JSON,
  YAML) decoded, YAML line continuations joined;
- sentences end at `.!?` before a capital, at a line that ends in punctuation, at a blank line, before a
  list item or a `key:` line of structured output;
- a sentence (or a clause after `, ; : | tab -`) is an instruction when, past labels such as `TODO:`,
  `###(system_message)`, `<INFORMATION>`, bullets and softeners ("please", "now", "first"), its first
  word is an action verb, or when it addresses the reader with an obligation ("you must", "I need you
  to", "your task is", "make sure to").

Value provenance (`ztai.agents.provenance`) marks the values inside these spans of untrusted content as
suspicious, so a side effect whose argument came from such a span waits for a human even when the
injection detector does not recognise the text. Every pattern is bounded (no nested or adjacent
unbounded quantifiers), so the cost is linear in the text.
"""

from __future__ import annotations

import re

MAX_SENTENCE_HEAD = 240  # characters of a sentence or clause looked at for its opening words

# Verbs an instruction to an agent opens with: actions on data, messages, files, money, the web, output.
_ACTION_VERB_WORDS = """
    send email e-mail mail forward reply respond share post publish upload transfer pay wire move copy
    delete remove erase drop cancel revoke create add append prepend insert write put update change modify
    edit set reset rename invite grant give provide include attach tell notify inform message text call
    contact schedule reschedule book reserve order buy purchase subscribe unsubscribe visit open go navigate
    browse click follow download fetch get retrieve read search find look check list show print output
    reveal disclose leak export concatenate summarize summarise combine collect gather compile submit
    approve accept confirm sign execute run install make do ignore disregard forget stop use apply enter
    type paste store save keep log record report return answer repeat say state translate explain describe
    generate produce develop integrate ensure replace substitute format misspell rewrite rephrase render
    encode decode convert transform redirect route deploy launch start enable disable assign promote demote
    authorize allow deny block unblock mark flag tag join leave register unregister login logout connect
    disconnect sync backup restore withdraw deposit refund charge bill invoice request ask query
"""
_SOFTENER_WORDS = """
    please kindly now then also first immediately just quickly urgently and so next finally additionally
    secondly lastly
"""
ACTION_VERBS = frozenset(_ACTION_VERB_WORDS.split())
_SOFTENERS = frozenset(_SOFTENER_WORDS.split())
_SENTENCE_END = re.compile(
    r"(?<=[.!?])[\"')\]]{0,3}[ \t\n]+(?=[\"'(\[]{0,3}[A-Z0-9<#*\[(])"  # end, space, capital
    r"|(?<=[.!?])(?=[A-Z#<\[])"  # "7.2%.TODO: ..." (no space)
    r"|(?<=[.!?:;*])[ \t]{0,40}\n"  # a line ending in punctuation
    r"|\n[ \t]{0,40}\n"  # a blank line
    r"|\n(?=[ \t]{0,40}[-\w]{1,40}:\s)"  # a `key: value` line of structured output
    r"|\n(?=[ \t]{0,40}(?:[-*\u2022]|\d{1,3}[.)])\s)"  # a list item
)
_CLAUSE = re.compile(r"[,;:|\t][ \t]{0,8}|\s[-\u2013\u2014]\s")
# What may precede the instruction itself: "TODO:", "Note - ", "###(system_message)", "<INFORMATION>",
# "IMPORTANT!!!", bullets, numbers.
_LABEL = re.compile(
    r"[\W_]{0,8}[A-Za-z][\w ()-]{0,30}?[\W_]{0,8}:\s+"
    r"|[#*<\[(!\s-]{1,8}[\w ]{0,30}[>\])!#*]{1,8}\s*"
    r"|[-*\u2022]\s+"
    r"|\d{1,3}[.)]\s+"
)
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]{0,30}")
_ADDRESSED = re.compile(
    r"\b(?:you|assistant|agent|model|ai)\b[^.!?\n]{0,20}\b(?:must|should|shall|need to|needs to|have to|"
    r"has to|are required to|is required to|will now)\b"
    r"|\b(?:i|we)\s(?:want|need|would like|ask|require)\s(?:you|the assistant|the agent)\sto\b"
    r"|\byour\s(?:task|job|goal|instructions?)\s(?:is|are)\b"
    r"|\b(?:can|could|would|will) you (?:please )?[a-z]{2,20}\b"
    r"|\bmake sure (?:to|you)\b|\bdon'?t forget to\b|\bbe sure to\b",
    re.IGNORECASE,
)
_ESCAPE = re.compile(r"\\\n[ \t]{0,80}|\\[nrt\"'\\/ ]|\\u([0-9a-fA-F]{4})")
_ESCAPED = {
    "\\n": "\n",
    "\\r": "\n",
    "\\t": " ",
    '\\"': '"',
    "\\'": "'",
    "\\\\": "\\",
    "\\/": "/",
    "\\ ": " ",
}
_WRAPPED = re.compile(r"\n[ \t]+(?=\S)")


def instruction_texts(text: str) -> list[str]:
    """The instruction-like sentences of `text`, as the model reads them (escapes decoded)."""
    plain = unescape(text)
    found: list[str] = []
    start = 0
    for boundary in _SENTENCE_END.finditer(plain):
        _keep_if_instruction(plain[start : boundary.start()], found)
        start = boundary.end()
    _keep_if_instruction(plain[start:], found)
    return found


def instruction_start(sentence: str) -> int | None:
    """Where the instruction in `sentence` starts (the sentence, or the clause of it that tells the
    reader to do something), or None when it tells nothing."""
    sentence = _WRAPPED.sub(" ", sentence)
    if _opens_with_instruction(sentence) or _ADDRESSED.search(sentence):
        return 0
    for clause in _CLAUSE.finditer(sentence):
        if _opens_with_instruction(sentence[clause.end() : clause.end() + MAX_SENTENCE_HEAD]):
            return clause.end()
    return None


def unescape(text: str) -> str:
    """Serialized tool output (JSON, YAML) as the text a model sees: escaped newlines, tabs and quotes
    decoded, YAML line continuations joined, `\\uXXXX` decoded."""

    def decoded(match: re.Match[str]) -> str:
        if match.group(1):
            return chr(int(match.group(1), 16))
        return _ESCAPED.get(match.group(0), "")

    return _ESCAPE.sub(decoded, text) if "\\" in text else text


def _keep_if_instruction(sentence: str, found: list[str]) -> None:
    if sentence.strip():
        start = instruction_start(sentence)
        if start is not None:
            found.append(_WRAPPED.sub(" ", sentence)[start:])


def _opens_with_instruction(text: str) -> bool:
    head = text[:MAX_SENTENCE_HEAD].strip().strip("\"'`")
    for _ in range(5):  # labels may stack: "IMPORTANT!!! TODO: ..."
        if _starts_with_verb(head):
            return True
        label = _LABEL.match(head)
        if label is None or label.end() == 0:
            return False
        head = head[label.end() :].lstrip("\"'` ")
    return False


def _starts_with_verb(head: str) -> bool:
    """The opening words, past softeners, are an action verb used as one: followed by a space and more
    (not a field name `email: ...`, a value `mark.davies@...`, `start_time`, or a list `email,rating`)."""
    for word in _WORD.finditer(head[:120]):
        lowered = word.group(0).lower()
        if lowered in _SOFTENERS:
            continue
        after = head[word.end() : word.end() + 2]
        return lowered in ACTION_VERBS and after[:1] in (" ", "\t", "\n") and not after[1:].startswith(":")
    return False
