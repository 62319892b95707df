#!/usr/bin/env python3
"""Hostile clients against `ztai serve` with its default settings: what they cost the server.

What it does (everything on 127.0.0.1, in a throw-away temp directory, one `ztai serve` worker after a
fresh `ztai init`, so the shipped `server.*` defaults apply):

1. Latency of a normal request (`GET /healthz`, a new connection each time from a raw socket, and on
   one keep-alive httpx connection): p50 / p99 over `--requests`, before any attack.
2. Big heads: `--big` connections at once each send a request line and one header that never ends,
   `--big-mb` MB of it in 64 KiB writes. Reports the server's resident memory (VmRSS of its process,
   sampled every 20 ms) before and at its peak, and what each connection was answered (a 431, or a
   reset when the server closed with the client's bytes unread, which discards the 431 on the way).
3. Slowloris: `--slow` connections each send a partial head and then one more header line every
   `--drip` seconds, never finishing. Reports how long the server kept them open (p50 / max; any still
   open after `--observe` seconds count as open), and the latency of normal requests sent meanwhile.

Run from the repository root with the project's virtualenv active (about a minute):

    python bench/hostile_clients.py

Not part of the test suite (tests/e2e/test_connections_e2e.py checks the same with short timeouts).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.conftest import Gateway, start_gateway

CHUNK = b"a" * 65536


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


class PeakRss(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.running = pid, rss_mb(pid), True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(0.02)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def one_request(port: int) -> None:
    """`GET /healthz` on a new connection (a raw socket: no client library cost in the timing)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:100]


def latency_ms(gateway: Gateway, requests: int) -> dict[str, float]:
    fresh, reused = [], []
    for _ in range(requests):
        started = time.perf_counter()
        one_request(gateway.port)
        fresh.append((time.perf_counter() - started) * 1000)
    with httpx.Client(timeout=5) as client:
        for _ in range(requests):
            started = time.perf_counter()
            assert client.get(f"{gateway.root_url}/healthz").status_code == 200
            reused.append((time.perf_counter() - started) * 1000)
    return {
        "new_p50": statistics.median(fresh),
        "new_p99": percentile(fresh, 0.99),
        "keepalive_p50": statistics.median(reused),
        "keepalive_p99": percentile(reused, 0.99),
    }


async def big_head(port: int, megabytes: int) -> tuple[str, int]:
    """One connection sending an unterminated header: (what it was answered, bytes written, kernel
    buffers included)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
    sent = 0
    try:
        while sent < megabytes * 1_048_576 and not reader.at_eof():
            writer.write(CHUNK)
            await writer.drain()
            sent += len(CHUNK)
    except OSError:
        pass
    try:
        answer = (await asyncio.wait_for(reader.read(200), 10)).split(b"\r\n")[0].decode()
    except TimeoutError:
        answer = "no answer within 10 s, still open"
    except OSError:
        answer = "reset"  # the server closed with our bytes unread: the reset can discard its 431
    writer.close()
    return answer or "closed", sent


async def slowloris(port: int, drip: float, observe: float) -> float:
    """One slowloris connection: seconds until the server closed it (`observe` if it never did)."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    try:
        while time.monotonic() - started < observe:
            try:
                await asyncio.wait_for(reader.read(4096), drip)
            except TimeoutError:
                writer.write(b"X-Keep: alive\r\n")
                continue
            if reader.at_eof():
                return time.monotonic() - started
    except OSError:
        return time.monotonic() - started
    finally:
        writer.close()
    return observe


async def normal_requests_meanwhile(url: str, until: float) -> list[float]:
    timings = []
    async with httpx.AsyncClient(timeout=10) as client:
        while time.monotonic() < until:
            started = time.perf_counter()
            response = await client.get(url, headers={"connection": "close"})
            assert response.status_code == 200, response.status_code
            timings.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0.2)
    return timings


async def run_big_heads(gateway: Gateway, count: int, megabytes: int) -> None:
    assert gateway.server is not None
    pid = gateway.server.pid
    before = rss_mb(pid)
    sampler = PeakRss(pid)
    sampler.start()
    results = await asyncio.gather(*(big_head(gateway.port, megabytes) for _ in range(count)))
    await asyncio.sleep(0.5)
    sampler.running = False
    sampler.join()
    answers = sorted({answer for answer, _sent in results})
    print(f"big heads: {count} x {megabytes} MB unterminated header")
    print(
        f"  server RSS before {before:.0f} MB, peak {sampler.peak:.0f} MB (+{sampler.peak - before:.0f} MB)"
    )
    print(f"  answers: {answers}")


async def run_slowloris(gateway: Gateway, count: int, drip: float, observe: float) -> None:
    url = f"{gateway.root_url}/healthz"
    started = time.monotonic()
    loris = asyncio.gather(*(slowloris(gateway.port, drip, observe) for _ in range(count)))
    await asyncio.sleep(1)  # let them connect
    normal = await normal_requests_meanwhile(url, started + 20)
    held = await loris
    still_open = sum(1 for seconds in held if seconds >= observe)
    print(f"slowloris: {count} connections, a header line every {drip:.0f} s, observed {observe:.0f} s")
    print(
        f"  held open p50 {statistics.median(held):.1f} s, max {max(held):.1f} s; "
        f"still open at the end: {still_open}"
    )
    print(
        f"  normal requests meanwhile ({len(normal)}, new connection each): "
        f"p50 {statistics.median(normal):.1f} ms, max {max(normal):.1f} ms, all 200"
    )


def rounded(values: dict[str, float]) -> dict[str, float]:
    return {key: round(value, 2) for key, value in values.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=300, help="normal requests per latency sample")
    parser.add_argument("--big", type=int, default=40, help="connections sending a big head")
    parser.add_argument("--big-mb", type=int, default=10, help="MB each of them sends")
    parser.add_argument("--slow", type=int, default=1000, help="slowloris connections")
    parser.add_argument("--drip", type=float, default=5.0, help="seconds between their header lines")
    parser.add_argument("--observe", type=float, default=90.0, help="seconds to watch them at most")
    parser.add_argument("--latency-only", action="store_true", help="only step 1")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ztai-hostile-") as home:
        gateway = start_gateway(Path(home))
        try:
            latency_ms(gateway, 50)  # warm up
            print("normal requests (ms):", rounded(latency_ms(gateway, args.requests)))
            if not args.latency_only:
                asyncio.run(run_big_heads(gateway, args.big, args.big_mb))
                asyncio.run(run_slowloris(gateway, args.slow, args.drip, args.observe))
                print("normal requests after (ms):", rounded(latency_ms(gateway, args.requests)))
        finally:
            gateway.close()


if __name__ == "__main__":
    main()
