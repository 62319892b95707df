"""Large scans leave the event loop: the shipped detectors in a worker process, others on a thread, with
the same findings as an inline scan."""

from __future__ import annotations

import asyncio
import gc
import time

from ztai.detect.canary import CanaryDetector
from ztai.detect.inspector import Inspector, load_detector
from ztai.gateway import scanning

SECRET = "ghp_" + "Zk3v9QmT2xWb7LpR4nYc8HsD1fGj6KuE5aVo"


async def test_a_large_scan_in_the_worker_finds_what_an_inline_scan_finds() -> None:
    canaries = CanaryDetector()
    token = canaries.issue("s1")  # only this process knows it: the canary detector stays here
    inspector = Inspector([], detectors=[load_detector("pii"), load_detector("secrets"), canaries])
    text = " ".join(f"user{i}@example.com" for i in range(300)) + f" key {SECRET} and {token}"
    assert len(text) > scanning.OFF_LOOP_CHARS
    tasks: list[scanning.ScanTask] = [(text, "model_output", ()), ("short, no findings", "user", ())]
    [found, nothing] = await scanning.scan_texts(inspector, tasks)
    assert found == inspector.scan(text, "model_output") and nothing == []
    assert {"EMAIL_ADDRESS", "GITHUB_TOKEN", "prompt_leak"} <= {f.type for f in found}


async def test_the_worker_builds_detectors_with_the_configured_options() -> None:
    """A deployment that narrows `detect.pii.identifying_types` gets the same narrowing off the loop."""
    inspector = Inspector([], detectors=[load_detector("pii", {"identifying_types": ["PHONE_NUMBER"]})])
    text = "x " * scanning.OFF_LOOP_CHARS + " mail ana.lopez@example.com or call +1 415 555 0100"
    [found] = await scanning.scan_texts(inspector, [(text, "user", ())])
    assert found == inspector.scan(text, "user")
    identifying = {f.type for f in found if f.identifying}
    assert identifying == {"PHONE_NUMBER"} and "EMAIL_ADDRESS" in {f.type for f in found}


async def test_the_event_loop_keeps_ticking_during_a_large_scan() -> None:
    inspector = Inspector([], detectors=[load_detector("pii"), load_detector("secrets")])
    text = " ".join(f"user{i}@example.com" for i in range(5000))  # ~100 KB
    await scanning.scan_texts(inspector, [("x" * scanning.OFF_LOOP_CHARS, "user", ())])  # worker warm
    gaps: list[float] = []

    async def ticks() -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(0.005)
            gaps.append(time.perf_counter() - started)

    # A full collection of this whole test session's heap pauses the loop too, but it is not the scan's.
    gc.disable()
    try:
        ticker = asyncio.ensure_future(ticks())
        started = time.perf_counter()
        await scanning.scan_texts(inspector, [(text, "user", ())])
        took = time.perf_counter() - started
        ticker.cancel()
    finally:
        gc.enable()
    # Inline, the loop would not tick at all for the whole scan; here it ticks all along (one stall of a
    # busy CI machine is allowed, never one as long as the scan).
    assert len(gaps) >= took / 0.05 and max(gaps) < max(0.5, took * 0.75), (took, max(gaps))
