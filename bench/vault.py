"""What a session tokenization vault costs per chat request, against a vault of the request's own.

Starts `ztai serve` with the mock upstream (on SQLite, or PostgreSQL with --store postgresql) and sends
`--requests` sequential chat completions over one keep-alive connection (after 20 warm-up requests), each
with the same three personal values (an e-mail, a phone number, a person's name) that the shipped
policy tokenizes, in four ways:

- `no PII`: a prompt with nothing to tokenize (the floor);
- `request vault`: no session, the placeholders live for the request (nothing stored);
- `session, known values`: `x-ztai-session`, the values already in the vault (a conversation resending
  its history: one read-mostly transaction);
- `session, new values`: `x-ztai-session`, a new e-mail each request (an insert per request).

Every answer is checked: the caller gets the values back and no placeholder is left. Prints p50 / p95
and the ratio of p50 to `request vault`.

    python bench/vault.py [--requests 300] [--store sqlite|postgresql]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import store_url_for
from tests.e2e.conftest import start_gateway

PROMPT = "Please write to {email} and call Maria Lopez on +1 415 555 0132 about the invoice."


def timed(
    base_url: str, token: str, count: int, *, session: str | None, fresh: bool, pii: bool
) -> list[float]:
    headers = {"authorization": f"Bearer {token}"}
    if session:
        headers["x-ztai-session"] = session
    seconds: list[float] = []
    with httpx.Client(timeout=20) as client:
        for index in range(20 + count):
            email = f"user{index}@example.com" if fresh else "ana.perez@example.com"
            text = PROMPT.format(email=email) if pii else "Please summarise the quarterly report."
            body = {"model": "mock", "messages": [{"role": "user", "content": text}]}
            started = time.perf_counter()
            response = client.post(f"{base_url}/chat/completions", json=body, headers=headers)
            elapsed = time.perf_counter() - started
            answer = (
                response.json()["choices"][0]["message"]["content"] if response.status_code == 200 else ""
            )
            if response.status_code != 200 or (pii and (email not in answer or "<" in answer)):
                sys.exit(f"request failed or not restored: {response.status_code} {response.text[:300]}")
            if index >= 20:
                seconds.append(elapsed)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--store", choices=["sqlite", "postgresql"], default="sqlite")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        url = store_url_for(args.store, Path(home)) if args.store == "postgresql" else ""
        gateway = start_gateway(Path(home), store_url=url)
        try:
            token = gateway.token("alice", "models=mock", ttl=3600)
            cases: list[tuple[str, str | None, bool, bool]] = [  # name, session, fresh values, PII
                ("no PII", None, False, False),
                ("request vault", None, False, True),
                ("session, known values", "bench-known", False, True),
                ("session, new values", "bench-new", True, True),
            ]
            results = {
                name: timed(gateway.base_url, token, args.requests, session=session, fresh=fresh, pii=pii)
                for name, session, fresh, pii in cases
            }
        finally:
            gateway.close()
    base = statistics.median(results["request vault"])
    print(f"store: {args.store}; {args.requests} sequential requests per case (loopback, mock upstream)")
    print(f"{'case':<24}{'p50 ms':>9}{'p95 ms':>9}{'p50 / request vault':>22}")
    for name, seconds in results.items():
        p50 = statistics.median(seconds)
        p95 = statistics.quantiles(seconds, n=20)[18]
        print(f"{name:<24}{p50 * 1000:>9.2f}{p95 * 1000:>9.2f}{p50 / base:>22.2f}")


if __name__ == "__main__":
    main()
