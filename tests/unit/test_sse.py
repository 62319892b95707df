"""The gateway's one SSE decoder: every line ending, any chunking, comments, fields, bounded events."""

from __future__ import annotations

import pytest

from ztai.errors import UpstreamResponseTooLarge
from ztai.gateway.sse import SseDecoder, SseEvent, encode_sse

STREAM = (
    b': keep-alive\r\nevent: message\r\nid: 7\r\ndata: {"a":\r\ndata: 1}\r\n\r\n'
    b"retry: 500\n\n"
    b"data: cr\rdata: only\r\r"
    b"data:no-space\n:comment\ndata:  two spaces\n\n"
    b"id: bad\0id\ndata: x\n\n"
)
EVENTS = [
    SseEvent('{"a":\n1}', "message", "7"),
    SseEvent("", retry=500),
    SseEvent("cr\nonly"),
    SseEvent("no-space\n two spaces"),
    SseEvent("x"),
]


def decode(chunks: list[bytes], max_event_bytes: int = 1024) -> list[SseEvent]:
    decoder = SseDecoder(max_event_bytes)
    events = [event for chunk in chunks for event in decoder.feed(chunk)]
    return events + decoder.close()


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"])
def test_every_line_ending_delimits_lines_and_events(ending: bytes) -> None:
    stream = ending.join([b"event: a", b"data: one", b"data: two", b"", b"data: three", b"", b""])
    assert decode([stream]) == [SseEvent("one\ntwo", "a"), SseEvent("three")]


def test_mixed_endings_comments_fields_and_multiline_data() -> None:
    assert decode([STREAM]) == EVENTS


def test_any_chunking_gives_the_same_events_including_a_crlf_split_across_chunks() -> None:
    for split in range(1, len(STREAM)):  # every split point, including between \r and \n
        assert decode([STREAM[:split], STREAM[split:]]) == EVENTS, split
    assert decode([bytes([byte]) for byte in STREAM]) == EVENTS  # one byte at a time


def test_a_cr_then_a_crlf_are_two_line_ends() -> None:
    # "data: a" CR (line end) then CRLF (a second line end: the blank line dispatching the event).
    assert decode([b"data: a\r", b"\r\n", b"data: b\r\n\r\n"]) == [SseEvent("a"), SseEvent("b")]


def test_an_unterminated_last_event_is_dispatched_at_close() -> None:
    decoder = SseDecoder()
    assert decoder.feed(b"data: last") == []
    assert decoder.close() == [SseEvent("last")]
    assert decoder.close() == []


def test_an_oversize_event_is_refused_before_it_is_held_whole() -> None:
    with pytest.raises(UpstreamResponseTooLarge, match="larger than 64 bytes") as refused:
        decode([b"data: " + b"x" * 40 + b"\n", b"data: " + b"y" * 40 + b"\n\n"], max_event_bytes=64)
    assert refused.value.status == 502 and refused.value.code == "upstream_event_too_large"
    decoder = SseDecoder(64)
    with pytest.raises(UpstreamResponseTooLarge):  # a line that never ends, fed in small pieces
        for _ in range(100):
            decoder.feed(b"data: xxxxxxxx")
    # Many events, each under the bound, are fine however long the stream.
    assert len(decode([b"data: " + b"z" * 50 + b"\n\n"] * 100, max_event_bytes=64)) == 100


def test_encoding_round_trips() -> None:
    for event in EVENTS:
        assert decode([encode_sse(event)]) == [event]
