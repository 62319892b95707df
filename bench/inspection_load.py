"""Does one large request stall everyone else? Small-request latency while large inputs are inspected.

Starts `ztai serve` (SQLite) with the mock upstream, then:

1. `baseline`: `--clients` concurrent clients send small chat requests (one short sentence with one
   e-mail address) for `--seconds`; p50 / p99 of their latency;
2. for each large size (10 KB, 100 KB, 1 MB of e-mail addresses, all tokenized by the shipped policy):
   one client sends large requests back to back while the small clients run as in 1; reports the small
   requests' p50 / p99 under that load and the large requests' own median time (linear growth means
   the time per KB stays flat).

Every answer is checked (200, the small request's e-mail restored). The gateway's own inspection bound
(`detect.chat.max_input_chars`, default 500,000) would refuse the 1 MB input with 413; the bench raises it
so the cost can be measured.

    python bench/inspection_load.py [--clients 4] [--seconds 8] [--sizes 10000,100000,1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.conftest import start_gateway

SMALL = "Please write to ana.perez@example.com about the invoice."


def addresses(size: int) -> str:
    """About `size` characters of distinct e-mail addresses."""
    words: list[str] = []
    length = 0
    while length < size:
        words.append(f"user{len(words)}@example.com")
        length += len(words[-1]) + 1
    return " ".join(words)[:size].rsplit(" ", 1)[0]


def chat(text: str) -> dict[str, object]:
    return {"model": "mock", "messages": [{"role": "user", "content": text}]}


async def small_client(
    client: httpx.AsyncClient, headers: dict[str, str], until: float, seconds: list[float]
) -> None:
    while time.perf_counter() < until:
        started = time.perf_counter()
        response = await client.post("/chat/completions", json=chat(SMALL), headers=headers)
        elapsed = time.perf_counter() - started
        if response.status_code != 200 or "ana.perez@example.com" not in response.text:
            sys.exit(f"small request failed: {response.status_code} {response.text[:300]}")
        seconds.append(elapsed)


async def large_client(
    client: httpx.AsyncClient, headers: dict[str, str], text: str, until: float, seconds: list[float]
) -> None:
    while time.perf_counter() < until or not seconds:
        started = time.perf_counter()
        response = await client.post("/chat/completions", json=chat(text), headers=headers, timeout=300)
        elapsed = time.perf_counter() - started
        if response.status_code != 200:
            sys.exit(f"large request failed: {response.status_code} {response.text[:300]}")
        seconds.append(elapsed)


async def phase(
    base_url: str, token: str, clients: int, duration: float, size: int | None
) -> tuple[list[float], list[float]]:
    headers = {"authorization": f"Bearer {token}"}
    small: list[float] = []
    large: list[float] = []
    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
        for _ in range(20):  # warm-up
            await client.post("/chat/completions", json=chat(SMALL), headers=headers)
        until = time.perf_counter() + duration
        tasks = [small_client(client, headers, until, small) for _ in range(clients)]
        if size is not None:
            tasks.append(large_client(client, headers, addresses(size), until, large))
        await asyncio.gather(*tasks)
    return small, large


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    env = {
        "ZTAI_DETECT__CHAT__MAX_INPUT_CHARS": str(2 * max(sizes)),
        "ZTAI_SERVER__MAX_BODY_BYTES": str(4 * max(sizes)),
    }
    with tempfile.TemporaryDirectory() as home:
        gateway = start_gateway(Path(home), extra_env=env)
        try:
            token = gateway.token("alice", "models=mock", ttl=3600)
            rows = [
                ("baseline", *asyncio.run(phase(gateway.base_url, token, args.clients, args.seconds, None)))
            ]
            for size in sizes:
                result = asyncio.run(phase(gateway.base_url, token, args.clients, args.seconds, size))
                rows.append((f"with {size // 1000} KB", *result))
        finally:
            gateway.close()
    print(f"{args.clients} small-request clients for {args.seconds:.0f} s per row (loopback, mock upstream)")
    print(f"{'load':<14}{'small n':>9}{'p50 ms':>9}{'p99 ms':>9}{'large n':>9}{'large s':>9}{'ms / KB':>9}")
    for (name, small, large), size in zip(rows, [None, *sizes], strict=True):
        line = f"{name:<14}{len(small):>9}{statistics.median(small) * 1000:>9.1f}"
        line += f"{percentile(small, 0.99) * 1000:>9.1f}"
        if size is not None:
            took = statistics.median(large)
            line += f"{len(large):>9}{took:>9.2f}{took * 1000 / (size / 1000):>9.2f}"
        print(line)


if __name__ == "__main__":
    main()
