"""Evaluate ztai's secrets detector against detect-secrets 1.5.0 on detect-secrets' own plugin cases.

Data: `../shared/data/secrets/detect_secrets_plugin_cases.jsonl` (one labelled line per row: label 1 =
must be flagged, 0 = must not; `plugin_test` names the detect-secrets plugin the case tests). Scoring is
line-level: a label-1 line needs at least one finding, a label-0 line none. Reported overall and per
plugin (token family), with throughput on one core and the scan latency of a ~2,000-character
(~512-token) text. detect-secrets runs in its own virtualenv (`bench/.detect-secrets-venv`, created on
first use with pip; it ignores itself in git) with its default plugins and filters, the same way its
published numbers (precision 0.66, recall 1.0 on this set) were taken.

    python scripts/eval_secrets.py [--data PATH] [--min-score 0.0] [--runs 2000] [--no-baseline]
                                   [--show-errors] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import venv
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "secrets" / "detect_secrets_plugin_cases.jsonl"
)
BASELINE_VENV = REPO / "bench" / ".detect-secrets-venv"
BASELINE_VERSION = "1.5.0"

sys.path.insert(0, str(REPO / "src"))

from ztai.detect.secrets import SecretsDetector  # noqa: E402

# A ~2,000-character text (about 512 tokens): chat prose, a config snippet and code, two secrets in it.
_LATENCY_PARTS = [
    "Hi! I'm migrating our billing service from the old VM to Kubernetes and the deploy keeps failing. ",
    "Below is the config we use in staging, plus the helper that loads it. Can you tell me why the ",
    "health check times out after the pod starts? We also see intermittent 502s from the ingress.\n\n",
    "```yaml\nservice:\n  name: billing\n  replicas: 3\n  port: 8080\n  timeout_seconds: 30\n",
    "database:\n  host: db.internal.example\n  user: billing_app\n  pool_size: 20\n",
    "  pass" + "word: 'Qz7#mV2!pL9x'\n",
    "cache:\n  url: redis://cache.internal:6379/0\n  ttl: 300\n```\n\n",
    "```python\nimport os\nfrom dataclasses import dataclass\n\n@dataclass\nclass Settings:\n",
    "    host: str\n    port: int\n    token: str = os.environ['BILLING_TOKEN']\n\n",
    "def load(path: str) -> Settings:\n    with open(path) as fh:\n        raw = yaml.safe_load(fh)\n",
    "    return Settings(raw['service']['name'], raw['service']['port'])\n```\n\n",
    "The ingress annotations are the defaults from the chart; we only changed the body size limit. ",
    "Our CI exports AWS_ACCESS_KEY_ID=AKIA" + "Q3EGTZ7LMN4PRXWB before running the migration job, which ",
    "talks to S3 for the invoices bucket. Memory limits are 512Mi for the app container and 128Mi for ",
    "the sidecar. The readiness probe hits /healthz every 10 seconds with a 1 second timeout, and the ",
    "liveness probe uses the same path with a 30 second initial delay. Logs show the app binding to ",
    "127.0.0.1 instead of 0.0.0.0, which may be related. What else should I check before we roll this ",
    "out to production next week? Thanks a lot for any pointers on debugging this setup.\n\n",
    "For context, the previous deployment ran on a single VM behind nginx with systemd restarting the ",
    "process on failure; we never had readiness checks there, so this may be the first time the probe ",
    "config is actually exercised. The Dockerfile uses python:3.11-slim, installs the wheel built in CI ",
    "and starts gunicorn with four workers and a 60 second graceful timeout. Rollout strategy is the ",
    "default RollingUpdate with maxUnavailable 25% and maxSurge 25%, and there is an HPA on CPU at 70%.\n",
]
LATENCY_TEXT = "".join(_LATENCY_PARTS)

_BASELINE_RUNNER = r"""
import json, statistics, sys, time
from detect_secrets.core.scan import scan_line
from detect_secrets.settings import default_settings
texts = json.loads(sys.stdin.read())
rows, latency_text, runs = texts["rows"], texts["latency_text"], texts["runs"]
with default_settings():
    list(scan_line("warm up"))
    t0 = time.perf_counter()
    flags = [bool(list(scan_line(t))) for t in rows]
    elapsed = time.perf_counter() - t0
    lines = latency_text.split("\n")
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        for line in lines:
            list(scan_line(line))
        samples.append((time.perf_counter() - t) * 1000)
samples.sort()
print(json.dumps({"flags": flags, "elapsed": elapsed,
                  "p50_ms": statistics.median(samples), "p95_ms": samples[int(0.95 * (len(samples) - 1))]}))
"""


@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def add(self, label: int, flagged: bool) -> None:
        if label and flagged:
            self.tp += 1
        elif label:
            self.fn += 1
        elif flagged:
            self.fp += 1
        else:
            self.tn += 1

    def metrics(self) -> dict[str, float | int]:
        p = self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0
        r = self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        return {
            **{"tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn},
            **{"precision": round(p, 4), "recall": round(r, 4), "f1": round(f1, 4)},
        }


@dataclass
class Result:
    name: str
    overall: Counts = field(default_factory=Counts)
    per_family: dict[str, Counts] = field(default_factory=lambda: defaultdict(Counts))
    lines_per_s: float = 0.0
    latency_p50_ms: float = 0.0
    latency_p95_ms: float = 0.0
    cpu_p50_ms: float | None = None
    cpu_p95_ms: float | None = None


def family(row: dict[str, Any]) -> str:
    return str(row["plugin_test"]).removesuffix("_test.py")


def load_rows(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def percentile(sorted_samples: list[float], q: float) -> float:
    return sorted_samples[int(q * (len(sorted_samples) - 1))]


def eval_ztai(rows: list[dict[str, Any]], min_score: float, runs: int, show_errors: bool) -> Result:
    detector = SecretsDetector(min_score=min_score)
    result = Result(f"ztai score>={min_score:g}" if min_score > 0 else "ztai")
    errors: list[str] = []
    for row in rows:
        findings = detector.scan(row["text"], "document")
        flagged = bool(findings)
        result.overall.add(row["label"], flagged)
        result.per_family[family(row)].add(row["label"], flagged)
        if show_errors and flagged != bool(row["label"]):
            kind = "FN" if row["label"] else "FP"
            types = ",".join(f"{f.type}:{f.score}" for f in findings)
            errors.append(f"  {kind} {family(row):18} {types:32} {row['text'][:90]!r}")
    texts = [row["text"] for row in rows]
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        for text in texts:
            detector.scan(text, "document")
    result.lines_per_s = reps * len(texts) / (time.perf_counter() - t0)
    samples = []
    cpu_samples = []  # CPU time of this thread: robust when other processes share the core
    for _ in range(runs):
        t, c = time.perf_counter(), time.thread_time()
        detector.scan(LATENCY_TEXT, "user")
        cpu_samples.append((time.thread_time() - c) * 1000)
        samples.append((time.perf_counter() - t) * 1000)
    samples.sort()
    cpu_samples.sort()
    result.latency_p50_ms = statistics.median(samples)
    result.latency_p95_ms = percentile(samples, 0.95)
    result.cpu_p50_ms = statistics.median(cpu_samples)
    result.cpu_p95_ms = percentile(cpu_samples, 0.95)
    if errors:
        print(f"{result.name} errors:")
        print("\n".join(errors))
    return result


def ensure_baseline_venv() -> Path:
    python = BASELINE_VENV / "bin" / "python"
    check = [
        str(python),
        "-c",
        f"from importlib.metadata import version; assert version('detect-secrets') == '{BASELINE_VERSION}'",
    ]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    print(
        f"creating {BASELINE_VENV.relative_to(REPO)} with detect-secrets {BASELINE_VERSION} ...",
        file=sys.stderr,
    )
    venv.create(BASELINE_VENV, with_pip=True, clear=True)
    (BASELINE_VENV / ".gitignore").write_text("*\n")  # keep the virtualenv out of git
    pip = [str(python), "-m", "pip", "install", "--quiet", f"detect-secrets=={BASELINE_VERSION}"]
    subprocess.run(pip, check=True)
    return python


def eval_baseline(rows: list[dict[str, Any]], runs: int) -> Result:
    python = ensure_baseline_venv()
    payload = json.dumps({"rows": [row["text"] for row in rows], "latency_text": LATENCY_TEXT, "runs": runs})
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.run(
        [str(python), "-c", _BASELINE_RUNNER],
        input=payload,
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    out = json.loads(proc.stdout)
    result = Result(f"detect-secrets {BASELINE_VERSION}")
    for row, flagged in zip(rows, out["flags"], strict=True):
        result.overall.add(row["label"], flagged)
        result.per_family[family(row)].add(row["label"], flagged)
    result.lines_per_s = len(rows) / out["elapsed"]
    result.latency_p50_ms = out["p50_ms"]
    result.latency_p95_ms = out["p95_ms"]
    return result


def print_table(results: list[Result], rows: list[dict[str, Any]]) -> None:
    families = sorted({family(row) for row in rows})
    pos: dict[str, int] = defaultdict(int)
    neg: dict[str, int] = defaultdict(int)
    for row in rows:
        (pos if row["label"] else neg)[family(row)] += 1
    head = f"{'family':20} {'pos':>4} {'neg':>4}"
    for r in results:
        head += f" | {r.name[:22]:<22}   P     R     F1  "
    print(head)
    print("-" * len(head))
    for fam in [*families, "OVERALL"]:
        if fam == "OVERALL":
            line = f"{fam:20} {sum(pos.values()):4} {sum(neg.values()):4}"
        else:
            line = f"{fam:20} {pos[fam]:4} {neg[fam]:4}"
        for r in results:
            m = (r.overall if fam == "OVERALL" else r.per_family[fam]).metrics()
            line += f" | fp={m['fp']:<3} fn={m['fn']:<3} {m['precision']:.3f} {m['recall']:.3f} {m['f1']:.3f}"
        print(line)
    print()
    for r in results:
        cpu = ""
        if r.cpu_p50_ms is not None and r.cpu_p95_ms is not None:
            cpu = f" (CPU time p50 {r.cpu_p50_ms:.3f} ms, p95 {r.cpu_p95_ms:.3f} ms)"
        print(
            f"{r.name:22} throughput {r.lines_per_s:7.0f} lines/s (1 core)   ~2,000-char text: "
            f"p50 {r.latency_p50_ms:.3f} ms, p95 {r.latency_p95_ms:.3f} ms{cpu}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--min-score", type=float, default=0.0, help="ztai findings below this are ignored")
    parser.add_argument("--runs", type=int, default=2000, help="latency samples for the ~2,000-char text")
    parser.add_argument("--no-baseline", action="store_true", help="skip detect-secrets")
    parser.add_argument(
        "--show-errors", action="store_true", help="list ztai's false positives and negatives"
    )
    parser.add_argument("--json-out", type=Path, help="also write the JSON summary here")
    args = parser.parse_args(argv)

    rows = load_rows(args.data)
    print(f"data: {args.data} ({len(rows)} lines, {sum(r['label'] for r in rows)} positive)")
    print(f"latency text: {len(LATENCY_TEXT)} characters\n")
    results = [eval_ztai(rows, args.min_score, args.runs, args.show_errors)]
    if args.min_score < 0.5:
        results.append(eval_ztai(rows, 0.5, max(10, args.runs // 10), False))
    if not args.no_baseline:
        results.append(eval_baseline(rows, max(10, args.runs // 10)))
    print_table(results, rows)
    summary: dict[str, Any] = {
        "data": str(args.data),
        "rows": len(rows),
        "latency_text_chars": len(LATENCY_TEXT),
        "results": {
            r.name: {
                "overall": r.overall.metrics(),
                "per_family": {fam: c.metrics() for fam, c in sorted(r.per_family.items())},
                "lines_per_s": round(r.lines_per_s),
                "latency_ms": {"p50": round(r.latency_p50_ms, 4), "p95": round(r.latency_p95_ms, 4)},
                **(
                    {"cpu_ms": {"p50": round(r.cpu_p50_ms, 4), "p95": round(r.cpu_p95_ms or 0.0, 4)}}
                    if r.cpu_p50_ms is not None
                    else {}
                ),
            }
            for r in results
        },
    }
    compact = {
        **{k: v for k, v in summary.items() if k != "results"},
        "results": {
            name: {k: v for k, v in r.items() if k != "per_family"} for name, r in summary["results"].items()
        },
    }
    print("\nJSON summary (per-family numbers with --json-out):")
    print(json.dumps(compact, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"full summary (per family) written to {args.json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
