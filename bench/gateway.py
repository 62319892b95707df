#!/usr/bin/env python3
"""End-to-end gateway benchmark on loopback: mock upstream direct vs. through ztai vs. through LiteLLM.

What it does (everything on 127.0.0.1, in a throw-away temp directory):

1. `ztai init` a fresh home, start `ztai mock-upstream`, start `ztai serve` in front of it (`--workers`,
   1 by default) and issue a token allowed to call model `mock`.
2. Unless `--skip-litellm`: install `litellm[proxy]==1.100.5` into `bench/.litellm-venv` (once) and run
   the LiteLLM proxy in front of the same mock (config from shared/peers.md: no database, no telemetry).
3. Drive each target with `wrk` (a Lua script POSTs a small chat completion and prints exact latency
   percentiles in microseconds from `done()`): a warm-up run, then concurrency 1 (-t1 -c1) and
   concurrency 32 (-t2 -c32). Any non-2xx response or socket error fails the run.
4. Print a table, the ratios and targets (ztai >= 10x LiteLLM throughput; ztai's added latency at
   concurrency 1: p50 <= 1.5 ms, p99 <= 5 ms) and ztai's per-stage latency from its Prometheus histogram
   `ztai_stage_seconds`; write the JSON summary to bench/results/gateway-<timestamp>.json.
5. Always stop every child process (own process groups; try/finally, also on Ctrl-C and SIGTERM).

Run from the repository root with the project's virtualenv active:

    python bench/gateway.py --duration 10

Caveat: wrk, the gateway, the mock upstream and LiteLLM share the machine's cores (2 on the reference
machine); absolute numbers are noisy, compare the ratios measured in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
LITELLM_VENV = BENCH_DIR / ".litellm-venv"
LITELLM_REQUIREMENT = "litellm[proxy]==1.100.5"
RESULTS_DIR = BENCH_DIR / "results"

MODEL = "mock"
# Every request carries a different prompt (the Lua script numbers them), so nothing that remembers a
# text it has already seen can flatter a target; BODY is the first one (smoke test, summary).
BODY_PREFIX = '{"model":"mock","messages":[{"role":"user","content":"hello benchmark, request '
BODY_SUFFIX = '"}]}'
BODY = BODY_PREFIX + "0" + BODY_SUFFIX
JSON_MARKER = "ZTAI_BENCH_RESULT "
STAGES = ("read", "authenticate", "decide", "audit", "upstream", "total")

# Targets (see README of the task / docs/benchmarks.md).
MIN_THROUGHPUT_RATIO = 10.0
MAX_ADDED_P50_MS = 1.5
MAX_ADDED_P99_MS = 5.0

# `ztai` is the shipped default configuration (what `ztai init` writes: content detectors on);
# `ztai-nodetect` (detectors off) and `ztai-normal` (SQLite synchronous=NORMAL) are extra rows.
TARGETS = ("direct", "ztai", "ztai-nodetect", "ztai-normal", "litellm")
DEFAULT_TARGETS = ("direct", "ztai", "ztai-nodetect", "litellm")  # ztai-normal: --only ... --only ztai-normal

# (label, wrk threads, wrk connections)
LEVELS: tuple[tuple[str, int, int], ...] = (("c1", 1, 1), ("c32", 2, 32))

LUA_TEMPLATE = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {token}"
local counter = 0

request = function()
  counter = counter + 1
  return wrk.format(nil, nil, nil, [==[{prefix}]==] .. counter .. [==[{suffix}]==])
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{marker}{{"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}},' ..
    '"latency_us":{{"min":%d,"mean":%.3f,"stdev":%.3f,"max":%d,' ..
    '"p50":%d,"p75":%d,"p90":%d,"p99":%d,"p99_9":%d}}}}\\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(75), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
"""

LITELLM_CONFIG_TEMPLATE = """\
model_list:
  - model_name: mock
    litellm_params: {{model: openai/mock, api_base: "{api_base}", api_key: sk-mock}}
litellm_settings: {{telemetry: false, callbacks: [], num_retries: 0}}
general_settings: {{master_key: "{master_key}"}}
"""


class BenchError(Exception):
    """A failure that ends the benchmark with a message (and a non-zero exit status)."""


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# Processes --------------------------------------------------------------------------------------------
@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Children:
    """Starts children in their own process groups and stops every one of them, whatever happens."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("wb") as out:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # own process group: killpg reaches uvicorn/LiteLLM workers too
            )
        child = Child(name, process, log_path)
        self.children.append(child)
        return child

    def stop(self, child: Child) -> None:
        """Stop one child (its whole process group) and forget it."""
        _signal_group(child.process, signal.SIGTERM)
        try:
            child.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log(f"{child.name} did not stop in time: killing it")
        _signal_group(child.process, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.process.wait(timeout=5)
        self.children.remove(child)

    def stop_all(self) -> None:
        # A second Ctrl-C must not cut the clean-up short.
        held = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._stop_all()
        finally:
            for sig, handler in held.items():
                signal.signal(sig, handler)

    def _stop_all(self) -> None:
        for child in reversed(self.children):
            _signal_group(child.process, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for child in reversed(self.children):
            remaining = max(0.1, deadline - time.monotonic())
            try:
                child.process.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                log(f"{child.name} did not stop in time: killing it")
            # Workers may outlive their parent: always finish the whole group.
            _signal_group(child.process, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(timeout=5)
        self.children.clear()


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)  # pgid == pid because of start_new_session


def _raise_keyboard_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_checked(
    argv: list[str], *, what: str, env: dict[str, str] | None = None, timeout: float = 600
) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    if result.returncode != 0:
        raise BenchError(f"{what} failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout


# HTTP helpers (stdlib only) ----------------------------------------------------------------------------
def http_call(
    port: int,
    method: str,
    path: str,
    *,
    body: str | None = None,
    token: str | None = None,
    timeout: float = 5,
) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"content-type": "application/json"} if body is not None else {}
    if token:
        headers["authorization"] = f"Bearer {token}"
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def wait_ready(child: Child, port: int, path: str, *, timeout: float, token: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if child.process.poll() is not None:
            raise BenchError(f"{child.name} exited with {child.process.returncode}:\n{child.tail()}")
        try:
            status, payload = http_call(port, "GET", path, token=token, timeout=2)
            if status == 200:
                return
            last = f"HTTP {status}: {payload[:200]!r}"
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.2)
    raise BenchError(
        f"{child.name} not ready on :{port}{path} after {timeout:.0f}s ({last}):\n{child.tail()}"
    )


def smoke_test(name: str, port: int, token: str) -> None:
    """One real request before loading a target: a wrong setup fails here with the response body."""
    status, payload = http_call(port, "POST", "/v1/chat/completions", body=BODY, token=token, timeout=30)
    if not 200 <= status < 300:
        raise BenchError(f"{name}: smoke request answered HTTP {status}: {payload[:500]!r}")
    reply = json.loads(payload)
    if not reply.get("choices"):
        raise BenchError(f"{name}: smoke request returned no choices: {payload[:500]!r}")


# Setup ------------------------------------------------------------------------------------------------
def ztai_command() -> list[str]:
    if importlib.util.find_spec("ztai") is None:
        raise BenchError("package ztai is not importable: activate the project venv (. .venv/bin/activate)")
    return [sys.executable, "-m", "ztai.cli.main"]


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    if shutil.which("apt-get") is None:
        raise BenchError("wrk is not installed (and no apt-get to install it)")
    log("wrk missing: apt-get install -y wrk")
    install = ["apt-get", "install", "-y", "-q", "wrk"]
    if subprocess.run(install, capture_output=True, check=False).returncode != 0:
        run_checked(["apt-get", "update", "-q"], what="apt-get update")
        run_checked(install, what="apt-get install wrk")
    found = shutil.which("wrk")
    if not found:
        raise BenchError("wrk still not found after apt-get install")
    return found


def ensure_litellm() -> Path:
    executable = LITELLM_VENV / "bin" / "litellm"
    if executable.exists():
        return executable
    log(f"installing {LITELLM_REQUIREMENT} into {LITELLM_VENV} (once; takes a few minutes)")
    if not (LITELLM_VENV / "bin" / "python").exists():
        run_checked([sys.executable, "-m", "venv", str(LITELLM_VENV)], what="creating the LiteLLM venv")
    pip = [str(LITELLM_VENV / "bin" / "python"), "-m", "pip", "install", "-q", LITELLM_REQUIREMENT]
    run_checked(pip, what=f"pip install {LITELLM_REQUIREMENT}", timeout=1800)
    if not executable.exists():
        raise BenchError(f"{executable} missing after installing {LITELLM_REQUIREMENT}")
    return executable


def litellm_version() -> str:
    python = LITELLM_VENV / "bin" / "python"
    code = "import importlib.metadata as m; print(m.version('litellm'))"
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False)
    return result.stdout.strip() or "unknown"


@dataclass
class Target:
    name: str
    port: int
    token: str
    note: str = ""


# Load generation --------------------------------------------------------------------------------------
@dataclass
class WrkResult:
    target: str
    level: str
    threads: int
    connections: int
    duration_s: float
    requests: int
    rps: float
    p50_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    p99_9_ms: float
    mean_ms: float
    max_ms: float
    non_2xx: int
    socket_errors: dict[str, int]
    round: int = 0


def write_lua(directory: Path, target: Target) -> Path:
    path = directory / f"{target.name}.lua"
    path.write_text(
        LUA_TEMPLATE.format(prefix=BODY_PREFIX, suffix=BODY_SUFFIX, token=target.token, marker=JSON_MARKER)
    )
    return path


def run_wrk(
    wrk: str, target: Target, script: Path, *, level: str, threads: int, connections: int, seconds: float
) -> WrkResult:
    url = f"http://127.0.0.1:{target.port}/v1/chat/completions"
    argv = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "30s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120, check=False)
    if result.returncode != 0:
        raise BenchError(f"wrk against {target.name} failed ({result.returncode}):\n{result.stderr}")
    data = None
    for line in result.stdout.splitlines():
        if line.startswith(JSON_MARKER):
            data = json.loads(line[len(JSON_MARKER) :])
    if data is None:
        raise BenchError(f"wrk printed no result line for {target.name}:\n{result.stdout}\n{result.stderr}")
    non_2xx = int(data["errors"]["status"])
    match = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", result.stdout)
    if match:  # the text report and done() must agree; take the larger to be safe
        non_2xx = max(non_2xx, int(match.group(1)))
    latency = data["latency_us"]
    duration_s = data["duration_us"] / 1e6
    requests = int(data["requests"])
    return WrkResult(
        target=target.name,
        level=level,
        threads=threads,
        connections=connections,
        duration_s=round(duration_s, 3),
        requests=requests,
        rps=round(requests / duration_s, 1) if duration_s > 0 else 0.0,
        p50_ms=latency["p50"] / 1000,
        p75_ms=latency["p75"] / 1000,
        p90_ms=latency["p90"] / 1000,
        p99_ms=latency["p99"] / 1000,
        p99_9_ms=latency["p99_9"] / 1000,
        mean_ms=round(latency["mean"] / 1000, 4),
        max_ms=latency["max"] / 1000,
        non_2xx=non_2xx,
        socket_errors={k: int(v) for k, v in data["errors"].items() if k != "status"},
    )


# ztai's per-stage histogram -----------------------------------------------------------------------------
_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

# stage -> {"count": n, "sum": seconds, "buckets": [(le, cumulative count), ...]}
StageSnapshot = dict[str, dict[str, Any]]


def scrape_stages(port: int) -> StageSnapshot:
    status, payload = http_call(port, "GET", "/metrics")
    if status != 200:
        raise BenchError(f"ztai /metrics answered HTTP {status}")
    stages: StageSnapshot = {}
    for line in payload.decode().splitlines():
        if not line.startswith("ztai_stage_seconds"):
            continue
        match = _SAMPLE.match(line)
        if not match:
            continue
        labels = dict(_LABEL.findall(match["labels"] or ""))
        stage = labels.get("stage")
        if stage is None:
            continue
        entry = stages.setdefault(stage, {"count": 0.0, "sum": 0.0, "buckets": {}})
        value = float(match["value"])
        name = match["name"]
        if name.endswith("_bucket"):
            entry["buckets"][float(labels["le"])] = value
        elif name.endswith("_count"):
            entry["count"] = value
        elif name.endswith("_sum"):
            entry["sum"] = value
    return stages


def settled_stages(port: int, *, timeout: float = 10) -> StageSnapshot:
    """Scrape once requests still in flight from the previous run have finished (counts stop moving)."""
    deadline = time.monotonic() + timeout
    previous = scrape_stages(port)
    while time.monotonic() < deadline:
        time.sleep(0.3)
        current = scrape_stages(port)
        if current.get("upstream", {}).get("count") == previous.get("upstream", {}).get("count"):
            return current
        previous = current
    return previous


def _quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Linear interpolation inside the Prometheus bucket holding the q-quantile (like histogram_quantile)."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            width = count - lower_count
            fraction = (rank - lower_count) / width if width > 0 else 1.0
            return lower_bound + (bound - lower_bound) * fraction
        lower_bound, lower_count = bound, count
    return buckets[-1][0]


def stage_delta(before: StageSnapshot, after: StageSnapshot) -> dict[str, dict[str, float | None]]:
    """Per-stage mean and bucket-interpolated p50/p99 (ms) of the requests between two scrapes."""
    summary: dict[str, dict[str, float | None]] = {}
    for stage in STAGES:
        now = after.get(stage)
        if now is None:
            continue
        then = before.get(stage, {"count": 0.0, "sum": 0.0, "buckets": {}})
        count = now["count"] - then["count"]
        if count <= 0:
            continue
        buckets = sorted(
            (bound, cumulative - then["buckets"].get(bound, 0.0))
            for bound, cumulative in now["buckets"].items()
        )
        p50, p99 = _quantile(buckets, 0.5), _quantile(buckets, 0.99)
        summary[stage] = {
            "count": count,
            "mean_ms": round((now["sum"] - then["sum"]) / count * 1000, 4),
            "p50_ms": None if p50 is None else round(p50 * 1000, 4),
            "p99_ms": None if p99 is None else round(p99 * 1000, 4),
        }
    return summary


# Report -----------------------------------------------------------------------------------------------
@dataclass
class Check:
    name: str
    value: float | None
    limit: float
    unit: str
    status: str  # PASS | MISS | SKIP


@dataclass
class Summary:
    timestamp: str
    command: str
    machine: dict[str, Any]
    settings: dict[str, Any]
    results: list[WrkResult] = field(default_factory=list)  # per target and level: the median round
    rounds: list[WrkResult] = field(default_factory=list)  # every measured run
    ratios: dict[str, dict[str, float | None]] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    ztai_stages_ms: dict[str, dict[str, dict[str, float | None]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def find(results: list[WrkResult], target: str, level: str) -> WrkResult | None:
    return next((r for r in results if r.target == target and r.level == level), None)


def compute_ratios(summary: Summary) -> None:
    for level, _, _ in LEVELS:
        direct = find(summary.results, "direct", level)
        litellm = find(summary.results, "litellm", level)
        entry: dict[str, float | None] = {}
        for name in ("ztai", "ztai-nodetect", "ztai-normal"):
            gateway = find(summary.results, name, level)
            if gateway and litellm and litellm.rps > 0:
                entry[f"{name}_over_litellm_rps"] = round(gateway.rps / litellm.rps, 2)
        for name in ("ztai", "ztai-nodetect", "ztai-normal", "litellm"):
            gateway = find(summary.results, name, level)
            if gateway is None or direct is None:
                continue
            entry[f"{name}_added_p50_ms"] = round(gateway.p50_ms - direct.p50_ms, 3)
            entry[f"{name}_added_p99_ms"] = round(gateway.p99_ms - direct.p99_ms, 3)
            entry[f"{name}_over_direct_rps"] = round(gateway.rps / direct.rps, 3) if direct.rps else None
        summary.ratios[level] = entry


def evaluate(summary: Summary) -> None:
    def check(name: str, value: float | None, limit: float, unit: str, *, at_least: bool) -> None:
        if value is None:
            status = "SKIP"
        elif at_least:
            status = "PASS" if value >= limit else "MISS"
        else:
            status = "PASS" if value <= limit else "MISS"
        summary.checks.append(Check(name, value, limit, unit, status))

    for level, _, _ in LEVELS:
        ratio = summary.ratios.get(level, {}).get("ztai_over_litellm_rps")
        check(
            f"ztai/LiteLLM throughput at {level} >= {MIN_THROUGHPUT_RATIO:g}x",
            ratio,
            MIN_THROUGHPUT_RATIO,
            "x",
            at_least=True,
        )
    c1 = summary.ratios.get("c1", {})
    check(
        f"ztai added p50 at c1 <= {MAX_ADDED_P50_MS} ms",
        c1.get("ztai_added_p50_ms"),
        MAX_ADDED_P50_MS,
        "ms",
        at_least=False,
    )
    check(
        f"ztai added p99 at c1 <= {MAX_ADDED_P99_MS} ms",
        c1.get("ztai_added_p99_ms"),
        MAX_ADDED_P99_MS,
        "ms",
        at_least=False,
    )


def render(summary: Summary) -> str:
    lines: list[str] = []
    lines.append(
        f"Gateway benchmark {summary.timestamp}  ({summary.machine['cpus']} CPUs: {summary.machine['cpu']})"
    )
    lines.append("")
    header = f"{'target':<8} {'conc':>4} {'req/s':>10} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} {'requests':>9} {'non-2xx':>7}"
    lines.append(header)
    lines.append("-" * len(header))
    for r in summary.results:
        lines.append(
            f"{r.target:<8} {r.connections:>4} {r.rps:>10,.1f} {r.p50_ms:>8.3f} {r.p90_ms:>8.3f} "
            f"{r.p99_ms:>8.3f} {r.max_ms:>8.2f} {r.requests:>9,} {r.non_2xx:>7}"
        )
    lines.append("")
    for level, ratios in summary.ratios.items():
        parts = [f"{key}={value}" for key, value in ratios.items()]
        lines.append(f"{level}: " + ", ".join(parts))
    if summary.ztai_stages_ms:
        lines.append("")
        lines.append(
            "ztai per-stage latency (Prometheus ztai_stage_seconds; mean exact, p50/p99 from buckets):"
        )
        lines.append(f"  {'level':<5} {'stage':<13} {'mean ms':>8} {'~p50 ms':>8} {'~p99 ms':>8}")
        for level, stages in summary.ztai_stages_ms.items():
            for stage, values in stages.items():
                lines.append(
                    f"  {level:<5} {stage:<13} {_fmt(values['mean_ms']):>8} {_fmt(values['p50_ms']):>8} "
                    f"{_fmt(values['p99_ms']):>8}"
                )
    lines.append("")
    for c in summary.checks:
        value = "n/a" if c.value is None else f"{c.value:g} {c.unit}"
        lines.append(f"{c.status:<4}  {c.name}: {value}")
    for note in summary.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def machine_info(wrk: str) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        first = Path("/proc/meminfo").read_text().splitlines()[0]
        memory = round(int(first.split()[1]) / 1024 / 1024, 1)
    wrk_version = subprocess.run([wrk, "--version"], capture_output=True, text=True, check=False).stdout
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gib": memory,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "ztai": _version("ztai"),
        "wrk": wrk_version.splitlines()[0] if wrk_version else "unknown",
    }


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# Main -------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=10, help="seconds per measured run (default 10)")
    parser.add_argument("--warmup", type=float, default=3, help="seconds of warm-up per target (default 3)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="measure every target this many times, interleaved (default 3)"
    )
    parser.add_argument("--workers", type=int, default=1, help="ztai worker processes (default 1)")
    parser.add_argument("--skip-litellm", action="store_true", help="do not install or measure LiteLLM")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/gateway-*.json")
    parser.add_argument("--output", type=Path, help="write the JSON summary here instead")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp directory (logs, config)")
    parser.add_argument("--fail-on-miss", action="store_true", help="exit 2 when a target is missed")
    parser.add_argument("--only", choices=TARGETS, action="append", help="measure only these targets")
    return parser.parse_args(argv)


@contextlib.contextmanager
def temp_home(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ztai-bench-"))
    try:
        yield path
    finally:
        if keep:
            log(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def benchmark(args: argparse.Namespace, home: Path, children: Children) -> Summary:
    wrk = ensure_wrk()
    ztai = ztai_command()
    selected = set(args.only or DEFAULT_TARGETS)
    if args.skip_litellm:
        selected.discard("litellm")
    summary = Summary(
        timestamp=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        command="python bench/gateway.py " + " ".join(sys.argv[1:]),
        machine=machine_info(wrk),
        settings={
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "ztai_workers": args.workers,
            "levels": [{"label": label, "threads": t, "connections": c} for label, t, c in LEVELS],
            "body": BODY,
        },
    )
    cpus = os.cpu_count() or 1
    summary.notes.append(
        f"wrk, the gateways and the mock upstream share {cpus} CPU core(s) on loopback; the load generator "
        "competes with the servers, so absolute numbers understate them: compare ratios from one run."
    )

    config = home / "ztai.yaml"
    run_checked([*ztai, "init", "--config", str(config)], what="ztai init")
    token = run_checked(
        [
            *ztai,
            "token",
            "issue",
            "--config",
            str(config),
            "--sub",
            "spiffe://example.org/user/bench",
            "--ttl",
            "3600",
            "--claim",
            f"models={MODEL}",
        ],
        what="ztai token issue",
    ).strip()
    if token.count(".") != 2:
        raise BenchError(f"ztai token issue printed something that is not a JWT: {token[:80]!r}")

    mock_port = free_port()
    mock = children.start("mock-upstream", [*ztai, "mock-upstream", "--port", str(mock_port)])
    wait_ready(mock, mock_port, "/v1/models", timeout=30)
    upstream_url = f"http://127.0.0.1:{mock_port}/v1"

    # Each gateway runs alone while it is measured: an idle gateway in the background still takes CPU
    # (timers, background tasks) from the one under load on this small machine. Rounds interleave the
    # targets, so a slow spell of the (shared, noisy) machine hits all of them alike; the medians count.
    for round_number in range(1, args.rounds + 1):
        for name in TARGETS:
            if name not in selected:
                continue
            log(f"round {round_number}/{args.rounds}: {name}")
            if name == "direct":
                target, child = Target("direct", mock_port, "sk-mock", "mock upstream, no gateway"), None
            elif name.startswith("ztai"):
                target, child = start_ztai(children, ztai, config, token, upstream_url, args.workers, name)
            else:
                target, child = start_litellm(children, home, upstream_url, summary)
            try:
                smoke_test(target.name, target.port, target.token)
                measure(summary, wrk, home, target, args, round_number)
            finally:
                if child is not None:
                    children.stop(child)
    summary.results = medians(summary.rounds)

    compute_ratios(summary)
    evaluate(summary)
    return summary


def start_ztai(
    children: Children, ztai: list[str], config: Path, token: str, upstream_url: str, workers: int, name: str
) -> tuple[Target, Child]:
    """`ztai`: the configuration `ztai init` writes, as shipped (content detectors on: prompt and answer
    scanned); `ztai-nodetect`: the same with the content detectors off; `ztai-normal`: the default with
    SQLite synchronous=NORMAL (commits survive a crash of ztai, not a power loss)."""
    port = free_port()
    env = {**os.environ}
    if name == "ztai-nodetect":
        env["ZTAI_DETECT__CHAT__INPUT"] = "[]"
        env["ZTAI_DETECT__CHAT__OUTPUT"] = "[]"
    if name == "ztai-normal":
        env["ZTAI_STORE__SQLITE_SYNCHRONOUS"] = "NORMAL"
    server = children.start(
        name,
        [
            *ztai,
            "serve",
            "--config",
            str(config),
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--upstream",
            f"{MODEL}={upstream_url}",
        ],
        env=env,
    )
    wait_ready(server, port, "/readyz", timeout=60)
    return Target(name, port, token, f"ztai serve, {workers} worker(s)"), server


def start_litellm(
    children: Children, home: Path, upstream_url: str, summary: Summary
) -> tuple[Target, Child]:
    executable = ensure_litellm()
    summary.machine["litellm"] = litellm_version()
    master_key = "sk-" + secrets.token_urlsafe(32)
    litellm_config = home / "litellm.yaml"
    litellm_config.write_text(LITELLM_CONFIG_TEMPLATE.format(api_base=upstream_url, master_key=master_key))
    port = free_port()
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
    env.pop("VIRTUAL_ENV", None)
    proxy = children.start(
        "litellm",
        [
            str(executable),
            "--config",
            str(litellm_config),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            "1",
        ],
        env=env,
    )
    wait_ready(proxy, port, "/health/readiness", timeout=180)
    return Target("litellm", port, master_key, "LiteLLM proxy, 1 worker"), proxy


def measure(
    summary: Summary, wrk: str, home: Path, target: Target, args: argparse.Namespace, round_number: int
) -> None:
    """Warm up at each concurrency level, then measure it."""
    script = write_lua(home, target)
    for level, threads, connections in LEVELS:
        if args.warmup > 0:
            log(f"{target.name}: warm-up {args.warmup:g}s at -t{threads} -c{connections}")
            warm = run_wrk(
                wrk,
                target,
                script,
                level="warmup",
                threads=threads,
                connections=connections,
                seconds=args.warmup,
            )
            _check_errors(warm)
        before = settled_stages(target.port) if target.name == "ztai" else {}
        log(f"{target.name}: {args.duration:g}s at -t{threads} -c{connections}")
        result = run_wrk(
            wrk, target, script, level=level, threads=threads, connections=connections, seconds=args.duration
        )
        _check_errors(result)
        result.round = round_number
        summary.rounds.append(result)
        if target.name == "ztai":  # the stage breakdown of the last round
            summary.ztai_stages_ms[level] = stage_delta(before, settled_stages(target.port))
        log(f"  {result.rps:,.1f} req/s, p50 {result.p50_ms:.3f} ms, p99 {result.p99_ms:.3f} ms")


def medians(rounds: list[WrkResult]) -> list[WrkResult]:
    """One result per (target, level): the median of every figure over the rounds."""
    grouped: dict[tuple[str, str], list[WrkResult]] = {}
    for result in rounds:
        grouped.setdefault((result.target, result.level), []).append(result)
    combined = []
    for runs in grouped.values():
        first = runs[0]
        figures = {
            name: statistics.median(getattr(run, name) for run in runs)
            for name in ("rps", "p50_ms", "p75_ms", "p90_ms", "p99_ms", "p99_9_ms", "mean_ms", "max_ms")
        }
        combined.append(
            WrkResult(
                target=first.target,
                level=first.level,
                threads=first.threads,
                connections=first.connections,
                duration_s=sum(run.duration_s for run in runs),
                requests=sum(run.requests for run in runs),
                non_2xx=sum(run.non_2xx for run in runs),
                socket_errors={
                    k: sum(run.socket_errors.get(k, 0) for run in runs) for k in first.socket_errors
                },
                round=0,
                **figures,
            )
        )
    return combined


def _check_errors(result: WrkResult) -> None:
    problems = []
    if result.non_2xx:
        problems.append(f"{result.non_2xx} non-2xx responses")
    problems.extend(f"{count} socket {kind} errors" for kind, count in result.socket_errors.items() if count)
    if problems:
        raise BenchError(f"{result.target} at {result.level}: " + ", ".join(problems))
    if result.requests == 0:
        raise BenchError(f"{result.target} at {result.level}: no request completed")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Ctrl-C and SIGTERM both end in the clean-up below (SIGINT explicitly: a shell may have ignored it).
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with temp_home(args.keep_tmp) as home:
            children = Children(home)
            try:
                summary = benchmark(args, home, children)
            except BenchError as exc:
                log(f"FAILED: {exc}")
                for child in children.children:
                    log(f"--- last lines of {child.name} ({child.log_path}) ---\n{child.tail()}")
                return 1
            finally:
                children.stop_all()
    except KeyboardInterrupt:
        log("interrupted: child processes stopped")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)

    print(render(summary))
    document = asdict(summary)
    print(json.dumps(document, indent=2))
    if not args.no_save or args.output:
        path = args.output or RESULTS_DIR / f"gateway-{summary.timestamp.replace(':', '')}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=2) + "\n")
        log(f"wrote {path}")
    missed = any(c.status == "MISS" for c in summary.checks)
    return 2 if missed and args.fail_on_miss else 0


if __name__ == "__main__":
    sys.exit(main())
