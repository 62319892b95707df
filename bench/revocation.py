#!/usr/bin/env python3
"""How long until a revoked task token is refused by another replica: with Redis pub/sub and without.

What it does (everything on 127.0.0.1, in a throw-away temp directory):

1. For each mode, `ztai init` a fresh home whose store is shared (`--store-url`: the PostgreSQL
   database `ztai_bench` by default, created if missing and emptied first; or a SQLite file with
   `--store-url sqlite`) and start two `ztai serve` replicas A and B on it. Modes: `redis`
   (`store.redis_url` set: revocations are published) and `poll` (no Redis: replicas learn from the
   store, polled every `identity.revocation_refresh_seconds`, 1 s by default).
2. Per trial: exchange a user's and an agent's token for a task token on A (`POST /oauth/token`), check
   that B accepts it (`GET /v1/models`, 200; B now has it cached), start polling B with it in a tight
   loop, revoke the task through A's admin API (`POST /admin/tasks/<id>/revoke`), and record the time
   from sending the revocation until B's first 401. Trials start at random moments (relative to B's poll
   timer) so the polling mode is sampled over its whole interval.
3. Print p50 / p90 / max over `--trials` per mode, measured from the revocation request being sent, with
   A's own answer time (the revocation and its audit record durable) and the resolution (B's mean poll
   round trip).

Run from the repository root with the project's virtualenv active:

    python bench/revocation.py --trials 30

Caveat: both replicas, the store and this driver share the machine's cores; the polling loop costs B
CPU (each poll is a policy decision and an audit record), which is part of what is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis
from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.conftest import exchange_form

ZTAI = [sys.executable, "-m", "ztai.cli.main"]
# A database of its own (created on demand, emptied before each mode): the tests reset `test` at will.
POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/ztai_bench"
REDIS_URL = "redis://127.0.0.1:6379/0"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Replica:
    url: str
    process: subprocess.Popen[bytes]


@dataclass
class Trial:
    from_request_ms: float  # revocation request sent -> B's first 401
    answer_ms: float  # revocation request sent -> A's answer (revocation and its audit record durable)
    polls: int
    poll_ms: float


@dataclass
class Cluster:
    home: Path
    env: dict[str, str]
    replicas: list[Replica] = field(default_factory=list)

    @property
    def config(self) -> str:
        return str(self.home / "ztai.yaml")

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            [*ZTAI, *args, "--config", self.config], capture_output=True, text=True, env=self.env, timeout=60
        )
        if result.returncode != 0:
            raise RuntimeError(f"ztai {args[0]} {args[1] if len(args) > 1 else ''} failed: {result.stderr}")
        return result.stdout.strip()

    def start(self) -> Replica:
        port = free_port()
        log = (self.home / f"serve-{port}.log").open("ab")
        process = subprocess.Popen(
            [*ZTAI, "serve", "--config", self.config, "--port", str(port)],
            env=self.env,
            stdout=log,
            stderr=log,
            start_new_session=True,  # its own process group: stopped as a whole
        )
        replica = Replica(f"http://127.0.0.1:{port}", process)
        self.replicas.append(replica)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if process.poll() is not None:
                log.close()
                tail = Path(log.name).read_text(errors="replace")[-2000:]
                raise RuntimeError(f"replica exited ({process.returncode}):\n{tail}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{replica.url}/readyz", timeout=1).status_code == 200:
                    return replica
            time.sleep(0.1)
        raise RuntimeError("replica not ready after 60 s")

    def stop(self) -> None:
        for replica in self.replicas:
            if replica.process.poll() is None:
                os.killpg(replica.process.pid, signal.SIGTERM)
                try:
                    replica.process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(replica.process.pid, signal.SIGKILL)
                    replica.process.wait()


@contextlib.contextmanager
def cluster(store_url: str, redis_url: str, refresh: float) -> Iterator[Cluster]:
    with tempfile.TemporaryDirectory(prefix="ztai-revocation-") as tmp:
        home = Path(tmp)
        store = store_url if store_url != "sqlite" else f"sqlite:///{home / 'shared.db'}"
        env = {
            **os.environ,
            "ZTAI_STORE__URL": store,
            "ZTAI_STORE__REDIS_URL": redis_url,
            "ZTAI_IDENTITY__REVOCATION_REFRESH_SECONDS": str(refresh),
            "NO_COLOR": "1",
        }
        prepare_store(store_url)
        instance = Cluster(home, env)
        try:
            instance.cli("init", "--trust-domain", "example.org")
            instance.start()
            instance.start()
            yield instance
        finally:
            instance.stop()


def task_token(client: httpx.Client, replica: Replica, subject: str, actor: str) -> tuple[str, str]:
    form = exchange_form(subject, actor, {"tools": ["files/read_file"]})
    response = client.post(f"{replica.url}/oauth/token", data=form)
    response.raise_for_status()
    body = response.json()
    return body["access_token"], body["task"]


def trial(client: httpx.Client, first: Replica, second: Replica, admin: str, token: str, task: str) -> Trial:
    auth = {"authorization": f"Bearer {token}"}
    if client.get(f"{second.url}/v1/models", headers=auth).status_code != 200:
        raise RuntimeError("the second replica does not accept the fresh task token")
    refused_at: list[float] = []
    unexpected: list[int] = []
    polls = 0
    started = threading.Event()

    def poll() -> None:
        nonlocal polls
        with httpx.Client(timeout=10) as poller:
            deadline = time.perf_counter() + 30
            while time.perf_counter() < deadline:
                status = poller.get(f"{second.url}/v1/models", headers=auth).status_code
                polls += 1
                started.set()
                if status == 401:
                    refused_at.append(time.perf_counter())
                    return
                if status != 200 and len(unexpected) < 5:
                    unexpected.append(status)

    thread = threading.Thread(target=poll)
    thread.start()
    started.wait(10)
    poll_began = time.perf_counter()
    polls_before = polls
    sent = time.perf_counter()
    answer = client.post(
        f"{first.url}/admin/tasks/{task}/revoke",
        json={"reason": "bench"},
        headers={"authorization": f"Bearer {admin}"},
    )
    answered = time.perf_counter()
    answer.raise_for_status()
    thread.join(35)
    if not refused_at:
        raise RuntimeError(
            f"the second replica never refused the revoked token (other answers: {unexpected})"
        )
    poll_ms = (refused_at[0] - poll_began) * 1000 / max(1, polls - polls_before)
    return Trial((refused_at[0] - sent) * 1000, (answered - sent) * 1000, polls - polls_before, poll_ms)


def run_mode(
    name: str, store_url: str, redis_url: str, refresh: float, trials: int, rng: random.Random
) -> list[Trial]:
    with cluster(store_url, redis_url, refresh) as instance:
        first, second = instance.replicas
        alice = instance.cli(
            "token",
            "issue",
            "--sub",
            "spiffe://example.org/user/alice",
            "--ttl",
            "3600",
            "--claim",
            "tools=files/*",
            "--claim",
            "models=mock",
        )
        agent = instance.cli("token", "issue", "--sub", "spiffe://example.org/agent/planner", "--ttl", "3600")
        admin = instance.cli(
            "token",
            "issue",
            "--sub",
            "spiffe://example.org/user/ops",
            "--ttl",
            "3600",
            "--claim",
            "roles=admin",
        )
        results: list[Trial] = []
        with httpx.Client(timeout=10) as client:
            time.sleep(1.0)  # let B's Redis subscription come up
            for index in range(trials):
                token, task = task_token(client, first, alice, agent)
                time.sleep(rng.uniform(0, refresh))  # a random phase of B's poll timer
                results.append(trial(client, first, second, admin, token, task))
                print(
                    f"  {name} trial {index + 1}/{trials}: {results[-1].from_request_ms:.1f} ms",
                    file=sys.stderr,
                )
        return results


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def report(name: str, results: list[Trial]) -> dict[str, float]:
    sent = [r.from_request_ms for r in results]
    summary = {
        "p50_ms": statistics.median(sent),
        "p90_ms": percentile(sent, 0.9),
        "max_ms": max(sent),
        "revoke_answer_p50_ms": statistics.median(r.answer_ms for r in results),
        "poll_round_trip_ms": statistics.mean(r.poll_ms for r in results),
    }
    print(
        f"{name:<6} n={len(results):<4} p50 {summary['p50_ms']:8.1f} ms   p90 {summary['p90_ms']:8.1f} ms   "
        f"max {summary['max_ms']:8.1f} ms   (A answered the revocation in {summary['revoke_answer_p50_ms']:.1f} ms "
        f"p50; B polled every {summary['poll_round_trip_ms']:.1f} ms)"
    )
    return summary


def prepare_store(store_url: str) -> None:
    """Create the PostgreSQL database if it is missing and empty it (the bench owns it)."""
    if store_url == "sqlite":
        return
    server, _, name = store_url.rpartition("/")
    admin = create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        exists = connection.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first()
        if exists is None:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    engine = create_engine(store_url)
    with engine.begin() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE"))
        connection.execute(text("CREATE SCHEMA public"))
    engine.dispose()


def check_redis(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=2)
    client.ping()
    client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument(
        "--store-url",
        default=POSTGRES_URL,
        help="shared PostgreSQL store (created if missing, EMPTIED first), or 'sqlite' for a shared file",
    )
    parser.add_argument("--redis-url", default=REDIS_URL)
    parser.add_argument("--refresh", type=float, default=1.0, help="identity.revocation_refresh_seconds")
    parser.add_argument("--only", choices=("redis", "poll"), help="run one mode")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    check_redis(args.redis_url)
    rng = random.Random(args.seed)
    collected: dict[str, list[Trial]] = {}
    for name, url in (("redis", args.redis_url), ("poll", "")):
        if args.only in (None, name):
            print(
                f"mode {name}: store {args.store_url.split('@')[-1]}, refresh {args.refresh}s",
                file=sys.stderr,
            )
            collected[name] = run_mode(name, args.store_url, url, args.refresh, args.trials, rng)
    print(f"\nrevoked task token refused by the other replica ({args.trials} trials per mode):")
    summaries = {name: report(name, trials) for name, trials in collected.items()}
    print(json.dumps(summaries, indent=2))


if __name__ == "__main__":
    main()
