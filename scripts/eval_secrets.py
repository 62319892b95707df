"""Evaluate ztai's secrets detector per data folder, on benign text, and for throughput.

Folders (under `--data`, default `../shared/data`), one labelled text per row:

- `secrets/` (detect-secrets plugin cases), `ripsecrets_tests/`, `whispers_fixtures/`: label 1 = the text
  holds a secret and must be flagged, 0 = it must not be flagged at all. Scored on any finding.
- `kingfisher_rules/`, `noseyparker_rules/`: the rules' own examples. Label 1 = that rule must fire,
  0 = that rule must not (a rule's negative example, often a near-miss of *that* format; another rule
  may rightly fire on it, e.g. a generic password rule on `password = "…"`). So a positive counts as
  found when any finding is reported on it, and a negative counts as flagged when a finding *of the
  row's rule* is reported: same vendored rule id (kingfisher rows), or the same finding type (the row's
  upstream name in UPPER_SNAKE, or ztai's type for that rule id; noseyparker rows). The "any" column
  gives negatives with any finding at all, for reference.

Benign text (`awesome_chatgpt_prompts`, `gpteacher`, `instructional_docs`, BIPIA contexts): findings per
1,000 texts. Throughput: MB/s of text on the current core (run under `taskset -c 0`), on documents
made by joining the benign texts (~3 KB each) with one secret in every 20th document; CPU time of this
thread. The detect-secrets side-by-side of earlier rounds is dropped (it needed its own virtualenv and
only covered the `secrets/` folder).

    taskset -c 0 python scripts/eval_secrets.py [--data PATH] [--min-score 0.0] [--show-errors]
                                                [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parents[1] / "shared" / "data"
if not DEFAULT_DATA.is_dir():
    DEFAULT_DATA = Path("/work/shared/data")

sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "scripts"))

from refresh_secret_rules import type_name  # noqa: E402
from ztai.detect.base import Finding  # noqa: E402
from ztai.detect.secrets import SecretsDetector  # noqa: E402

FOLDERS = {
    "secrets": "secrets/detect_secrets_plugin_cases.jsonl",
    "noseyparker_rules": "noseyparker_rules/data.jsonl",
    "kingfisher_rules": "kingfisher_rules/data.jsonl",
    "ripsecrets_tests": "ripsecrets_tests/data.jsonl",
    "whispers_fixtures": "whispers_fixtures/data.jsonl",
}
RULE_FOLDERS = frozenset({"noseyparker_rules", "kingfisher_rules"})
BENIGN = ("awesome_chatgpt_prompts", "gpteacher", "instructional_docs")
BIPIA = ("email", "table", "code")
# a few secrets for the throughput documents (made-up values in real formats)
_THROUGHPUT_SECRETS = (
    "export AWS_ACCESS_KEY_ID=AKIA" + "Q3EGTZ7LMN4PRXWB",
    "token: ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8",
    'db_password = "Qz7#mV2!pL9x"',
    "curl -H 'Authorization: Bearer " + "sk-proj-Zx81mQ2aT3BlbkFJ4sd9Gk2LmPq7Rt5Vw'",
)


@dataclass
class Score:
    pos: int = 0
    found: int = 0
    neg: int = 0
    flagged: int = 0  # negatives flagged (by the row's rule for rule folders)
    flagged_any: int = 0
    findings_on_pos: int = 0

    def row(self, name: str) -> str:
        recall = self.found / self.pos if self.pos else 1.0
        neg_rate = self.flagged / self.neg if self.neg else 0.0
        any_rate = self.flagged_any / self.neg if self.neg else 0.0
        precision = self.found / (self.found + self.flagged) if self.found + self.flagged else 1.0
        return (
            f"| `{name}` | {self.pos} | {self.neg} | {precision:.3f} | {recall:.3f} | "
            f"{neg_rate:.3f} ({self.flagged}) | {any_rate:.3f} |"
        )

    def summary(self) -> dict[str, float | int]:
        return {
            "positives": self.pos,
            "negatives": self.neg,
            "recall": round(self.found / self.pos, 4) if self.pos else 1.0,
            "negatives_flagged": round(self.flagged / self.neg, 4) if self.neg else 0.0,
            "negatives_any_finding": round(self.flagged_any / self.neg, 4) if self.neg else 0.0,
        }


def load_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def rule_fired(row: dict[str, Any], findings: list[Finding]) -> bool:
    """Whether the row's own rule (not just any rule) produced a finding."""
    rule_id = str(row.get("rule_id", ""))
    kinds = {type_name(rule_id, str(row.get("type", ""))), type_name("", str(row.get("type", "")))}
    return any(f.evidence.split(":", 1)[0] == rule_id or f.type in kinds for f in findings)


def eval_folder(
    detector: SecretsDetector, name: str, rows: list[dict[str, Any]], errors: list[str] | None
) -> Score:
    score = Score()
    for row in rows:
        findings = detector.scan(row["text"], "document")
        if row["label"]:
            score.pos += 1
            score.found += bool(findings)
            if errors is not None and not findings:
                errors.append(
                    f"  FN {name:18} {row.get('rule_id', row.get('type', ''))!s:28} {row['text'][:90]!r}"
                )
            continue
        score.neg += 1
        score.flagged_any += bool(findings)
        flagged = rule_fired(row, findings) if name in RULE_FOLDERS else bool(findings)
        score.flagged += flagged
        if errors is not None and flagged:
            kinds = ",".join(f"{f.type}:{f.score}" for f in findings)
            errors.append(f"  FP {name:18} {kinds:34} {row['text'][:90]!r}")
    return score


def benign_texts(data: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for folder in BENIGN:
        out[folder] = [str(r["text"]) for r in load_jsonl(data / folder / "data.jsonl")]
    contexts: list[str] = []
    for part in BIPIA:
        for row in load_jsonl(data / "bipia" / part / "train.jsonl"):
            context = row.get("context")
            if isinstance(context, list):
                context = "\n".join(map(str, context))
            if context:
                contexts.append(str(context))
    out["bipia_contexts"] = contexts
    return out


def throughput(detector: SecretsDetector, texts: list[str], doc_chars: int = 3_000) -> tuple[float, int]:
    """MB/s (CPU time of this thread) over ~3 KB documents joined from `texts`, one secret in 20."""
    docs: list[str] = []
    current: list[str] = []
    size = 0
    for text in texts:
        current.append(text)
        size += len(text)
        if size >= doc_chars:
            if len(docs) % 20 == 0:
                current.insert(
                    len(current) // 2, _THROUGHPUT_SECRETS[len(docs) // 20 % len(_THROUGHPUT_SECRETS)]
                )
            docs.append("\n\n".join(current))
            current, size = [], 0
    total = sum(len(d.encode("utf-8")) for d in docs)
    detector.scan(docs[0], "document")  # warm up (rules compiled)
    start = time.thread_time()
    for doc in docs:
        detector.scan(doc, "document")
    elapsed = time.thread_time() - start
    return total / elapsed / 1e6, total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--min-score", type=float, default=0.0, help="findings below this are ignored")
    parser.add_argument("--show-errors", action="store_true", help="list misses and flagged negatives")
    parser.add_argument("--json-out", type=Path, help="also write the JSON summary here")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    detector = SecretsDetector(min_score=args.min_score)
    detector.scan("warm up", "user")
    load_s = time.perf_counter() - t0
    errors: list[str] | None = [] if args.show_errors else None
    summary: dict[str, Any] = {"min_score": args.min_score, "rules_load_s": round(load_s, 3), "folders": {}}
    print(f"min_score {args.min_score:g}; rules loaded and compiled in {load_s:.2f} s\n")
    print("| folder | pos | neg | precision | recall | negatives flagged | neg. with any finding |")
    print("|---|---|---|---|---|---|---|")
    for name, rel in FOLDERS.items():
        score = eval_folder(detector, name, load_jsonl(args.data / rel), errors)
        print(score.row(name))
        summary["folders"][name] = score.summary()
    if errors:
        print("\nerrors:\n" + "\n".join(errors))

    print("\nbenign text (findings per 1,000 texts; texts with any finding):")
    benign = benign_texts(args.data)
    summary["benign"] = {}
    for name, texts in benign.items():
        findings = [detector.scan(t, "document") for t in texts]
        n_findings = sum(len(f) for f in findings)
        with_any = sum(bool(f) for f in findings)
        per_k = 1000 * n_findings / len(texts)
        types = sorted({f.type for fs in findings for f in fs})
        print(f"  {name:24} {len(texts):5} texts  {per_k:6.2f} findings/1k  {with_any} texts  {types[:8]}")
        summary["benign"][name] = {"texts": len(texts), "findings_per_1k": round(per_k, 2)}
    mixed = [t for texts in benign.values() for t in texts]
    mbps, total = throughput(detector, mixed)
    print(f"\nthroughput: {mbps:.2f} MB/s of text on one core ({total / 1e6:.1f} MB, ~3 KB documents)")
    summary["throughput_mb_s"] = round(mbps, 2)
    if args.json_out:
        args.json_out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
