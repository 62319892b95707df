"""Evaluate the prompt-injection detector with every source held apart from training (needs sklearn).

    nice python scripts/eval_injection.py --data ../shared/data [--json out.json] [--latency-only]

Leave-one-source-out (LOSO): for each folder of the shared data, the head is re-trained (the functions of
`scripts/train_injection.py`: same features, rows, weights and code path) on all the other folders and
scores that folder's texts. The table gives, per folder and role (benign prompt, benign document / tool
output, attack, harmful request reported apart), the share that reaches the flag threshold and the
refuse threshold (for attacks: recall). The thresholds are the ones `train_injection.py` derives from the
grouped 5-fold out-of-fold scores (and ships). Targets: benign prompts <= 1% flagged, benign documents <= 2%,
attacks >= 0.90 recall.

The grouped 5-fold figures (rows of one context or template together) are the in-distribution
comparison, and where the thresholds are chosen. Latency: p50/p95 of `InjectionDetector.score` with the
shipped model for texts of 64, 512 and 2,048 tokens, pinned to one core (run under `taskset -c 0` to be sure).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_injection as ti
from ztai.detect.encoder import StaticEncoder
from ztai.detect.injection import MODEL_DIR, InjectionDetector, InjectionModel

ROLE_NAMES = {
    "benign_prompt": "benign prompt",
    "benign_doc": "benign doc",
    "attack": "attack",
    "harmful": "harmful (apart)",
}
TARGETS = {"benign_prompt": ("<=", 0.01), "benign_doc": ("<=", 0.02), "attack": (">=", 0.90)}


def _meets(role: str, value: float) -> str:
    if role not in TARGETS:
        return ""
    sign, target = TARGETS[role]
    ok = value <= target if sign == "<=" else value >= target
    return "" if ok else " (miss)"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| folder | role | n | flagged / recall at threshold | at refuse threshold |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for row in rows:
        flag = f"{100 * row['flag']:.1f}%{_meets(row['role'], row['flag'])}"
        role = ROLE_NAMES[row["role"]]
        lines.append(f"| {row['folder']} | {role} | {row['n']} | {flag} | {100 * row['refuse']:.1f}% |")
    return "\n".join(lines)


WORDS = [
    "the",
    "committee",
    "reviewed",
    "proposal",
    "budget",
    "asked",
    "for",
    "cost",
    "estimates",
    "scheduled",
    "follow-up",
    "meeting",
    "next",
    "week",
    "customer",
    "order",
    "shipped",
    "warehouse",
    "delivery",
    "tracking",
    "invoice",
    "paid",
    "team",
    "roadmap",
    "quarterly",
    "results",
    "please",
    "summarise",
    "this",
    "report",
    "and",
    "list",
    "open",
    "questions",
    "about",
    "the",
    "release",
    "notes",
    "of",
    "version",
    "two",
]


def text_of_tokens(encoder: StaticEncoder, tokens: int, seed: int) -> str:
    rng = random.Random(seed)
    words: list[str] = []
    while len(encoder.tokenize(" ".join(words)).ids) < tokens:
        words.extend(rng.choice(WORDS) for _ in range(8))
    while len(encoder.tokenize(" ".join(words)).ids) > tokens:
        words.pop()
    return " ".join(words) + "."


def latency(
    model: InjectionModel, sizes: Sequence[int] = (64, 512, 2048), repeats: int = 200
) -> dict[str, Any]:
    with_affinity = hasattr(os, "sched_setaffinity")
    if with_affinity:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    detector = InjectionDetector(model)
    out: dict[str, Any] = {"one_core": with_affinity}
    for size in sizes:
        texts = [text_of_tokens(model.encoder, size, seed) for seed in range(20)]
        detector.score(texts[0] + " ", "tool_output")  # warm-up
        timings = []
        for i in range(repeats):
            text = texts[i % len(texts)] + f" {i}"
            started = time.perf_counter()
            detector.score(text, "tool_output")
            timings.append(time.perf_counter() - started)
        timings.sort()
        out[f"{size}_tokens"] = {
            "chars": round(statistics.mean(len(t) for t in texts)),
            "p50_ms": round(1e3 * timings[len(timings) // 2], 3),
            "p95_ms": round(1e3 * timings[int(len(timings) * 0.95)], 3),
        }
    started = time.perf_counter()
    InjectionModel.load(MODEL_DIR, encoder=StaticEncoder.load(MODEL_DIR))
    out["load_ms"] = round(1e3 * (time.perf_counter() - started), 1)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=ti.DEFAULT_DATA)
    parser.add_argument("--cache", type=Path, default=ti.DEFAULT_CACHE)
    parser.add_argument("--json", type=Path, help="write the full report here")
    parser.add_argument("--hidden", type=int, default=ti.HeadConfig.hidden)
    parser.add_argument("--c", type=float, default=ti.HeadConfig.c)
    parser.add_argument("--alpha", type=float, default=ti.HeadConfig.alpha)
    parser.add_argument("--epochs", type=int, default=ti.HeadConfig.epochs)
    parser.add_argument("--latency-only", action="store_true")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {}
    model = InjectionModel.load()
    if not args.latency_only:
        config = ti.HeadConfig(hidden=args.hidden, c=args.c, alpha=args.alpha, epochs=args.epochs)
        docs = ti.load_corpus(args.data)
        prepared = ti.prepare(docs, model.encoder, args.cache)
        calibration = ti.calibrate(ti.out_of_fold(prepared, config, args.cache), prepared)
        logits = ti.leave_one_source_out(prepared, config, args.cache)
        rows = ti.table(logits, prepared, calibration)
        report["thresholds"] = {
            "threshold": calibration.threshold,
            "refuse_threshold": calibration.refuse_threshold,
            "shipped": {"threshold": model.threshold, "refuse_threshold": model.refuse_threshold},
        }
        report["leave_one_source_out"] = {"per_folder": rows, "pooled": ti.pooled(rows)}
        print("## Leave-one-source-out (each folder scored by the model trained without it)\n")
        print(markdown_table(rows))
        print("\npooled:", json.dumps(report["leave_one_source_out"]["pooled"]))
        print("thresholds:", json.dumps(report["thresholds"]))
        kfold = ti.out_of_fold(prepared, config, args.cache)
        report["grouped_5fold"] = ti.pooled(ti.table(kfold, prepared, calibration))
        print(
            "grouped 5-fold (in distribution; thresholds chosen here):", json.dumps(report["grouped_5fold"])
        )
    report["latency"] = latency(model)
    report["stages"] = {"encoder": 1.0, "note": "single stage: every text goes through the encoder head"}
    print("latency:", json.dumps(report["latency"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
