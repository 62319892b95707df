"""Where content scans run, so one large request never stalls the event loop for everyone else.

A short text (under `OFF_LOOP_CHARS` in all) is scanned inline: the hop would cost more than the scan.
A longer one goes to a worker process when its detectors are the shipped, stateless ones (`pii`,
`secrets`, `injection`, loaded there by name): a thread would share the interpreter lock with the event
loop and still slow every other request while it runs. Detectors a process cannot rebuild (the canary
detector, which knows the canaries this process issued; detectors handed in by tests) scan on a thread.
Other CPU work on large texts (redaction, restoring, audit hashes) uses a thread pool through `off_loop`.
The worker runs at a lower CPU priority, and a serving process hands the interpreter lock back to the
loop sooner (`prefer_event_loop`), so short requests keep their latency while a large one is worked on.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import BrokenExecutor, Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import TypeVar

import orjson

from ztai.detect.base import Detector, Finding, Source
from ztai.detect.inspector import DETECTORS, Inspector, detector_options, load_detector

# Texts (all of a request's, or one stream window) at least this long leave the event loop. Measured
# (injection + pii + secrets): 1,000 characters cost ~2 ms inline, ~0.9 ms more through the worker; so
# the loop is never held more than ~2 ms by one scan, and short prompts skip the hop.
OFF_LOOP_CHARS = 1024
PROCESS_WORKERS = 1
WORKER_NICENESS = 10
PARENT_CHECK_SECONDS = 1.0  # how soon an orphaned worker notices that its server is gone
# How long a thread (redacting a large text, the audit writer) may hold the interpreter lock while the
# event loop waits for it: Python's default 5 ms, several times per request, is what the tail latency of
# short requests was made of under a large one (bench/inspection_load.py: p99 207 -> 68 ms at 1 MB).
LOOP_SWITCH_INTERVAL = 0.0005

ScanTask = tuple[str, Source, Sequence[str]]  # (text, source, detectors to skip)
_T = TypeVar("_T")

_threads = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ztai-inspect")
_processes: ProcessPoolExecutor | None = None
_processes_lock = threading.Lock()
_processes_failed = False  # a worker could not start or died: threads from then on (logged once)
log = logging.getLogger("ztai.gateway")


async def off_loop(size: int, work: Callable[[], _T]) -> _T:
    """`work()` on `size` characters: inline when small, else on a thread. The caller awaits it, so
    nothing else of its request touches the same objects meanwhile."""
    if size < OFF_LOOP_CHARS:
        return work()
    return await asyncio.get_running_loop().run_in_executor(_threads, work)


async def scan_texts(inspector: Inspector, tasks: list[ScanTask]) -> list[list[Finding]]:
    """The findings for each text, in order (each text's findings in detector order)."""
    if sum(len(text) for text, _, _ in tasks) < OFF_LOOP_CHARS:
        return [inspector.scan(text, source, exclude) for text, source, exclude in tasks]
    portable = [d for d in inspector.detectors if _rebuildable(d) and not _processes_failed]
    local = [d for d in inspector.detectors if d not in portable]
    remote = asyncio.ensure_future(_in_worker(portable, tasks)) if portable else None
    loop = asyncio.get_running_loop()
    here = await loop.run_in_executor(_threads, _scan_with, local, tasks) if local else None
    there = await remote if remote is not None else None
    by_detector = {d.name: i for i, d in enumerate(inspector.detectors)}
    results: list[list[Finding]] = []
    for index in range(len(tasks)):
        found = [*(there[index] if there else []), *(here[index] if here else [])]
        # The order an inline scan gives: detector by detector.
        found.sort(key=lambda f: by_detector.get(f.detector, len(by_detector)))
        results.append(found)
    return results


async def _in_worker(detectors: list[Detector], tasks: list[ScanTask]) -> list[list[Finding]]:
    specs = tuple(_spec(d) for d in detectors)
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(_process_pool(), _scan_in_worker, specs, tasks)
    except BrokenExecutor:  # the worker could not start (no main guard) or died (killed, out of memory)
        _discard_pool()
        return await loop.run_in_executor(_threads, _scan_with, detectors, tasks)


def _rebuildable(detector: Detector) -> bool:
    registered = DETECTORS.get(detector.name)
    cls = type(detector)
    return detector.name != "canary" and registered == (cls.__module__, cls.__name__)


def _scan_with(detectors: Sequence[Detector], tasks: list[ScanTask]) -> list[list[Finding]]:
    found: list[list[Finding]] = []
    for text, source, exclude in tasks:
        found.append([f for d in detectors if d.name not in exclude for f in d.scan(text, source)])
    return found


# (name, options as JSON) -> the detector built from them, once per worker process.
DetectorSpec = tuple[str, str]
_worker_detectors: dict[DetectorSpec, Detector] = {}


def _spec(detector: Detector) -> DetectorSpec:
    """What the worker needs to build the same detector: its name and the options it was loaded with
    (e.g. `detect.pii.identifying_types`), so both sides find exactly the same."""
    return detector.name, orjson.dumps(detector_options(detector), option=orjson.OPT_SORT_KEYS).decode()


def _start_worker() -> None:
    """In the worker: bulk scanning yields the CPU to the event loop's short requests when cores are
    busy (a large request takes longer, the others keep their latency), and the worker ends with its
    server, however the server ended (a server killed by SIGTERM never shuts its pool down)."""
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICENESS)
    parent = os.getppid()

    def exit_with_parent() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_SECONDS)
        os._exit(0)

    threading.Thread(target=exit_with_parent, name="ztai-exit-with-parent", daemon=True).start()


def _scan_in_worker(specs: tuple[DetectorSpec, ...], tasks: list[ScanTask]) -> list[list[Finding]]:
    """In the worker process: the detectors of `specs`, built once, over the texts."""
    for spec in specs:
        if spec not in _worker_detectors:
            name, options = spec
            _worker_detectors[spec] = load_detector(name, orjson.loads(options))
    return _scan_with([_worker_detectors[spec] for spec in specs], tasks)


def _process_pool() -> ProcessPoolExecutor:
    global _processes
    with _processes_lock:
        if _processes is None:
            # spawn: a fork of a process with running threads (the audit writer, the loop) is unsafe.
            context = multiprocessing.get_context("spawn")
            _processes = ProcessPoolExecutor(
                max_workers=PROCESS_WORKERS, mp_context=context, initializer=_start_worker
            )
        return _processes


def _discard_pool() -> None:
    global _processes, _processes_failed
    with _processes_lock:
        broken, _processes = _processes, None
        if not _processes_failed:
            log.warning("the scanning worker process failed; large texts are scanned on threads from now on")
        _processes_failed = True
    _shutdown(broken)


def prefer_event_loop() -> None:
    """For a serving process: hand the interpreter lock back to the event loop sooner (process-wide)."""
    sys.setswitchinterval(min(sys.getswitchinterval(), LOOP_SWITCH_INTERVAL))


def warm(detectors: Sequence[Detector]) -> None:
    """Start the worker process and build `detectors` in it now, rather than on the first large request."""
    portable = tuple(dict.fromkeys(_spec(d) for d in detectors if _rebuildable(d)))
    if portable and not _processes_failed:
        _process_pool().submit(_scan_in_worker, portable, [])


def _shutdown(executor: Executor | None) -> None:
    if executor is not None:
        executor.shutdown(wait=False, cancel_futures=True)


atexit.register(lambda: _shutdown(_processes))
