"""The inspector's scan cache: hits and misses, bounds, one entry per source, canaries never cached."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from ztai.detect.base import Finding, Source
from ztai.detect.canary import CanaryDetector
from ztai.detect.inspector import Inspector, ScanCache, cacheable
from ztai.detect.pii import PiiDetector


@dataclass
class Counting:
    """A pure detector that counts its scans (one finding per text: the whole text)."""

    name: str = "counting"
    cacheable: bool = True
    calls: list[tuple[str, Source]] = field(default_factory=list)

    def scan(self, text: str, source: Source) -> list[Finding]:
        self.calls.append((text, source))
        return [Finding(self.name, "X", 0, len(text), 1.0, source)]


def test_repeated_texts_are_scanned_once_per_source() -> None:
    det = Counting()
    inspector = Inspector([], detectors=[det])
    first = inspector.scan("system prompt", "user")
    again = inspector.scan("system prompt", "user")
    assert first == again and len(det.calls) == 1
    assert inspector.cache is not None and inspector.cache.hits == 1 and inspector.cache.misses == 1
    # another source is another entry (findings may depend on the source)
    other = inspector.scan("system prompt", "tool_output")
    assert len(det.calls) == 2 and other[0].evidence == "tool_output"
    assert inspector.scan("system prompt", "tool_output") == other and len(det.calls) == 2
    # a different text misses
    inspector.scan("system prompt!", "user")
    assert len(det.calls) == 3


def test_callers_cannot_change_cached_findings() -> None:
    inspector = Inspector([], detectors=[Counting()])
    found = inspector.scan("abc", "user")
    found.clear()
    assert len(inspector.scan("abc", "user")) == 1


def test_long_texts_are_keyed_by_digest() -> None:
    det = Counting()
    inspector = Inspector([], detectors=[det])
    long_a = "a" * 5000
    long_b = "a" * 4999 + "b"
    inspector.scan(long_a, "user")
    inspector.scan(long_b, "user")
    inspector.scan(long_a, "user")
    assert len(det.calls) == 2
    cache = inspector.cache
    assert cache is not None
    key, charge = cache.key("0:counting", "user", long_a)
    assert isinstance(key[2], bytes) and charge < 100  # the text itself is not held
    assert cache.key("0:counting", "user", "short")[0][2] == "short"
    # lone surrogates hash too
    inspector.scan("\ud800" * 300, "user")


def test_bounded_by_entries_and_characters() -> None:
    cache = ScanCache(max_entries=3, max_chars=10_000)
    for i in range(10):
        key, chars = cache.key("d", "user", f"text {i}")
        cache.put(key, chars, [])
    assert len(cache) == 3
    assert cache.get(cache.key("d", "user", "text 9")[0]) == []
    assert cache.get(cache.key("d", "user", "text 0")[0]) is None  # least recently used went first

    small = ScanCache(max_entries=1000, max_chars=1000)
    for i in range(100):
        text = f"{i:03d}" + "x" * 197  # 200 characters each
        key, chars = small.key("d", "user", text)
        small.put(key, chars, [])
        assert small.chars <= 1000
    assert len(small) < 10
    # a result that alone exceeds the bound is not kept
    key, chars = small.key("d", "user", "y" * 200)
    small.put(key, chars, [Finding("d", "X", 0, 1, 1.0)] * 20)
    assert small.get(key) is None


def test_lru_order_is_refreshed_by_hits() -> None:
    cache = ScanCache(max_entries=2, max_chars=10_000)
    ka, ca = cache.key("d", "user", "a")
    kb, cb = cache.key("d", "user", "b")
    kc, cc = cache.key("d", "user", "c")
    cache.put(ka, ca, [])
    cache.put(kb, cb, [])
    assert cache.get(ka) == []  # a is now the most recent
    cache.put(kc, cc, [])
    assert cache.get(kb) is None and cache.get(ka) == [] and cache.get(kc) == []


def test_zero_entries_means_no_cache() -> None:
    det = Counting()
    inspector = Inspector([], detectors=[det], cache_entries=0)
    assert inspector.cache is None
    inspector.scan("abc", "user")
    inspector.scan("abc", "user")
    assert len(det.calls) == 2


def test_canary_findings_are_never_cached() -> None:
    canaries = CanaryDetector()
    assert not cacheable(canaries)
    inspector = Inspector([], detectors=[PiiDetector(), canaries])
    token = canaries.issue("s1")
    leaked = f"the reference was {token}"

    def canary_types() -> list[str]:
        return [f.type for f in inspector.scan(leaked, "model_output") if f.detector == "canary"]

    assert canary_types() == ["prompt_leak"]
    key, canaries.key = canaries.key, b"another key" * 3  # another key: the same text has no canary
    assert canary_types() == []
    canaries.key = key  # and the key back: found again
    assert canary_types() == ["prompt_leak"]
    assert inspector.cache is not None and inspector.cache.hits == 2  # the PII scans were cached


def test_registry_detectors_are_cacheable_and_unknown_ones_are_not() -> None:
    assert cacheable(PiiDetector())

    class Unknown:
        name = "pii"  # a registry name, but not the registry's class

        def scan(self, text: str, source: Source) -> list[Finding]:
            return []

    assert not cacheable(Unknown())
    inspector = Inspector([], detectors=[Unknown()])
    assert inspector.cache is None


def test_the_inspection_is_the_same_with_and_without_the_cache() -> None:
    texts: list[tuple[Source, str]] = [
        ("user", "You are a helpful assistant."),
        ("user", "My name is Maria Lopez, mail maria.lopez@example.com"),
        ("model_output", "Sure, Maria. I wrote to maria.lopez@example.com."),
    ]
    cached = Inspector([], detectors=[PiiDetector()])
    plain = Inspector([], detectors=[PiiDetector()], cache_entries=0)
    for _ in range(3):
        assert cached.inspect(texts).context() == plain.inspect(texts).context()
        assert cached.inspect(texts).findings == plain.inspect(texts).findings
    assert cached.cache is not None and cached.cache.hits >= 6


def test_thread_safe() -> None:
    det = Counting()
    inspector = Inspector([], detectors=[det], cache_entries=50)
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for i in range(500):
                text = f"text {(i * 7 + seed) % 120}"
                assert inspector.scan(text, "user")[0].end == len(text)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert inspector.cache is not None and len(inspector.cache) <= 50
