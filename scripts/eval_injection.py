"""Evaluate the prompt-injection detector with sources held apart from training (needs sklearn).

    python scripts/eval_injection.py --data ../shared/data [--json out.json] [--quick]

Re-trains with the functions of `scripts/train_injection.py` (same features, weights and code path) on
some data and scores other data, through the run-time code path (normalisation, windows, maximum):

1. leave-one-source-out: for each folder of the shared data, train on all the other folders and test
   on it. Attack-only folders (jailbreaks) are measured against the benign documents of the user source
   that are themselves held out (each scored by the model that did not see its folder).
2. AgentDojo, per attack template: train without that template and without the test suite
   (workspace <-> slack), test on the held-out suite: that template's injected outputs vs its clean ones.
3. BIPIA, per attack category: categories in 5 groups; train without the group's categories and without
   half of the contexts, test on those held-out contexts (poisoned with held-out categories vs clean).
4. grouped 5-fold over everything (sources mixed, documents of one group together): in-distribution.

Metrics: ROC AUC, recall at 1 % FPR (the threshold is the 99th percentile of the benign scores of the
same test set; ties count as misses), and the shipped threshold's recall/FPR (the shipped calibration and
threshold applied to the fold model's logits). Latency: p50/p95 of `InjectionDetector.score` for 512-token
texts (2,000 to 2,500 characters) on one core, with the shipped model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_injection as ti
from ztai.detect.injection import FeatureConfig, InjectionDetector, InjectionModel

Prepared = ti.Prepared
USER_BENIGN_FOLDERS = ("agentdojo", "bipia", "tensor_trust", "bastioncorpus", "presidio")


def recall_at_fpr(pos: np.ndarray, neg: np.ndarray, fpr: float = 0.01) -> float:
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    ordered = np.sort(neg)[::-1]
    allowed = math.floor(fpr * len(ordered))
    threshold = ordered[allowed] if allowed < len(ordered) else -np.inf
    return float((pos > threshold).mean())


def metrics(pos: np.ndarray, neg: np.ndarray, shipped_logit_threshold: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {"attacks": len(pos), "benign": len(neg)}
    if len(pos) and len(neg):
        labels = np.concatenate((np.ones(len(pos)), np.zeros(len(neg))))
        out["auc"] = round(float(roc_auc_score(labels, np.concatenate((pos, neg)))), 4)
        out["recall_at_1pct_fpr"] = round(recall_at_fpr(pos, neg), 4)
    if shipped_logit_threshold is not None:
        if len(pos):
            out["recall_at_threshold"] = round(float((pos >= shipped_logit_threshold).mean()), 4)
        if len(neg):
            out["fpr_at_threshold"] = round(float((neg >= shipped_logit_threshold).mean()), 4)
    return out


def train_and_score(
    prepared: Sequence[Prepared], train: np.ndarray, test: np.ndarray, config: FeatureConfig, c: float
) -> np.ndarray:
    model = ti.fit([prepared[i] for i in train], config, c)
    return ti.doc_logits(model, [prepared[i] for i in test])


def select(prepared: Sequence[Prepared], predicate: Callable[[ti.Doc], bool]) -> np.ndarray:
    return np.asarray([i for i, p in enumerate(prepared) if predicate(p.doc)], dtype=np.int64)


def leave_one_source_out(
    prepared: Sequence[Prepared], config: FeatureConfig, c: float, shipped: float | None
) -> dict[str, Any]:
    logits = np.full(len(prepared), np.nan)
    for folder in ti.FOLDERS:
        test = select(prepared, lambda d, f=folder: d.folder == f)
        train = select(prepared, lambda d, f=folder: d.folder != f)
        started = time.perf_counter()
        logits[test] = train_and_score(prepared, train, test, config, c)
        print(f"  LOSO {folder}: {time.perf_counter() - started:.0f}s", file=sys.stderr)
    docs = [p.doc for p in prepared]
    real = np.asarray([not d.extra.get("augmentation") for d in docs])  # source pairs: training only
    labels = np.where(real, np.asarray([d.label for d in docs]), -1)
    folders = np.asarray([d.folder for d in docs])
    user_benign = np.asarray([d.label == 0 and d.source == "user" for d in docs]) & real
    report: dict[str, Any] = {"per_source": {}, "per_template": {}}
    for folder in ti.FOLDERS:
        in_folder = folders == folder
        pos = logits[in_folder & (labels == 1)]
        neg = logits[in_folder & (labels == 0)]
        entry = metrics(pos, neg, shipped)
        if len(neg) == 0:
            # Attack-only folder: against held-out benign user prompts of the other folders.
            entry = metrics(pos, logits[user_benign & ~in_folder], shipped)
            entry["benign_reference"] = "held-out benign user-source documents of the other folders"
        report["per_source"][folder] = entry
    for folder in ("agentdojo", "bipia", "bastioncorpus", "jailbreaks", "tensor_trust"):
        in_folder = folders == folder
        neg = logits[in_folder & (labels == 0)]
        if len(neg) == 0:
            neg = logits[user_benign & ~in_folder]
        templates = sorted({d.template for d in docs if d.folder == folder and d.label == 1})
        for template in templates:
            mask = in_folder & (labels == 1) & np.asarray([d.template == template for d in docs])
            report["per_template"][f"{folder}/{template}"] = metrics(logits[mask], neg, shipped)
    report["pooled"] = metrics(logits[labels == 1], logits[labels == 0], shipped)
    report["benign_fpr_at_threshold"] = {
        folder: round(float((logits[(folders == folder) & (labels == 0)] >= shipped).mean()), 4)
        for folder in ti.FOLDERS
        if ((folders == folder) & (labels == 0)).any()
    }
    return report


def agentdojo_templates(
    prepared: Sequence[Prepared], config: FeatureConfig, c: float, shipped: float | None
) -> dict[str, Any]:
    docs = [p.doc for p in prepared]
    templates = sorted({d.template for d in docs if d.folder == "agentdojo" and d.label == 1})
    suites = sorted({d.extra.get("suite", "") for d in docs if d.folder == "agentdojo"})
    results: dict[str, Any] = {}
    for template in templates:
        pos_all: list[float] = []
        neg_all: list[float] = []
        for suite in suites:

            def is_test(d: ti.Doc, s: str = suite) -> bool:
                return d.folder == "agentdojo" and d.extra.get("suite") == s

            def is_train(d: ti.Doc, s: str = suite, t: str = template) -> bool:
                return not is_test(d, s) and not (d.folder == "agentdojo" and d.template == t)

            def in_test(d: ti.Doc, s: str = suite, t: str = template) -> bool:
                return is_test(d, s) and d.source == "tool_output" and (d.template == t or d.label == 0)

            test = select(prepared, in_test)
            train = select(prepared, is_train)
            logits = train_and_score(prepared, train, test, config, c)
            labels = np.asarray([prepared[i].doc.label for i in test])
            pos_all.extend(logits[labels == 1])
            neg_all.extend(logits[labels == 0])
            results[f"{template}@{suite}"] = metrics(logits[labels == 1], logits[labels == 0], shipped)
        results[template] = metrics(np.asarray(pos_all), np.asarray(neg_all), shipped)
        print(f"  AgentDojo template {template}: {results[template]}", file=sys.stderr)
    return results


def bipia_categories(
    prepared: Sequence[Prepared], config: FeatureConfig, c: float, shipped: float | None, groups: int = 5
) -> dict[str, Any]:
    docs = [p.doc for p in prepared]
    categories = sorted({d.template for d in docs if d.folder == "bipia" and d.label == 1})
    rng = random.Random(3)
    rng.shuffle(categories)
    results: dict[str, Any] = {}
    for index in range(groups):
        held = frozenset(categories[index::groups])

        def context_held(d: ti.Doc, parity: int = index % 2) -> bool:
            return d.group.startswith("bipia:") and ti._seed("ctx", d.group) % 2 == parity

        def is_train(d: ti.Doc, held: frozenset[str] = held) -> bool:
            if d.folder != "bipia":
                return True
            if d.template in held or d.extra.get("category") in held:
                return False
            return not context_held(d)

        def is_test(d: ti.Doc, held: frozenset[str] = held) -> bool:
            return (
                d.folder == "bipia"
                and d.source == "document"
                and context_held(d)
                and (d.label == 0 or d.template in held)
            )

        train = select(prepared, is_train)
        test = select(prepared, is_test)
        logits = train_and_score(prepared, train, test, config, c)
        labels = np.asarray([prepared[i].doc.label for i in test])
        neg = logits[labels == 0]
        for category in sorted(held):
            mask = np.asarray([prepared[i].doc.template == category for i in test])
            results[category] = metrics(logits[mask & (labels == 1)], neg, shipped)
        print(f"  BIPIA group {index + 1}/{groups} ({', '.join(sorted(held))})", file=sys.stderr)
    return results


def grouped_kfold(
    prepared: Sequence[Prepared], config: FeatureConfig, c: float, shipped: float | None
) -> dict[str, Any]:
    logits = ti.out_of_fold_logits(prepared, config, c, k=5)
    docs = [p.doc for p in prepared]
    real = np.asarray([not d.extra.get("augmentation") for d in docs])  # source pairs: training only
    labels = np.where(real, np.asarray([d.label for d in docs]), -1)
    folders = np.asarray([d.folder for d in docs])
    report: dict[str, Any] = {}
    user_benign = np.asarray([d.label == 0 and d.source == "user" for d in docs]) & real
    for folder in ti.FOLDERS:
        in_folder = folders == folder
        neg = logits[in_folder & (labels == 0)]
        if len(neg) == 0:
            neg = logits[user_benign]
        report[folder] = metrics(logits[in_folder & (labels == 1)], neg, shipped)
    report["pooled"] = metrics(logits[labels == 1], logits[labels == 0], shipped)
    return report


def latency_texts(prepared: Sequence[Prepared], count: int, seed: int = 5) -> list[tuple[str, str]]:
    """512-token inputs: 2,000 to 2,500 characters cut from (or made of) real documents of every folder."""
    rng = random.Random(seed)
    texts: list[tuple[str, str]] = []
    pool = list(prepared)
    while len(texts) < count:
        size = rng.randint(2000, 2500)
        first = rng.choice(pool).doc
        text = first.text
        while len(text) < size:
            text += "\n" + rng.choice(pool).doc.text
        start = rng.randint(0, len(text) - size)
        texts.append((text[start : start + size], first.source))
    return texts


def latency(model: InjectionModel, texts: Sequence[tuple[str, str]], repeats: int = 3) -> dict[str, float]:
    detector = InjectionDetector(model)
    for text, source in texts[:20]:
        detector.score(text + " ", source)  # warm-up (caches, power tables)
    timings: list[float] = []
    for _ in range(repeats):
        for text, source in texts:
            text = text + " "  # a new string object: no cache hit
            started = time.perf_counter()
            detector.score(text, source)
            timings.append((time.perf_counter() - started) * 1000)
    timings.sort()
    return {
        "n": len(timings),
        "p50_ms": round(statistics.median(timings), 3),
        "p95_ms": round(timings[int(0.95 * len(timings)) - 1], 3),
        "p99_ms": round(timings[int(0.99 * len(timings)) - 1], 3),
        "max_ms": round(timings[-1], 3),
        "chars": f"{min(len(t) for t, _ in texts)}-{max(len(t) for t, _ in texts)}",
    }


def _table(title: str, rows: dict[str, Any]) -> str:
    lines = [
        f"\n### {title}",
        "| test set | attacks | benign | AUC | recall@1%FPR | recall@thr | FPR@thr |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in rows.items():
        if not isinstance(m, dict) or "attacks" not in m:
            continue
        keys = ("attacks", "benign", "auc", "recall_at_1pct_fpr", "recall_at_threshold", "fpr_at_threshold")
        lines.append(f"| {name} | " + " | ".join(str(m.get(key, "")) for key in keys) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=ti.DEFAULT_DATA)
    parser.add_argument(
        "--model", type=Path, default=ti.DEFAULT_OUT, help="shipped model (latency, threshold)"
    )
    parser.add_argument("--json", type=Path, help="write the full report here")
    parser.add_argument("--c", type=float)
    parser.add_argument("--window", type=int)
    parser.add_argument("--bits", type=int)
    parser.add_argument("--small-window", type=int, help="second window scale (0: none)")
    parser.add_argument("--no-source-features", action="store_true")
    parser.add_argument("--no-source-pairs", action="store_true")
    parser.add_argument(
        "--only", default="loso,agentdojo,bipia,kfold,latency", help="comma-separated parts to run"
    )
    args = parser.parse_args(argv)
    parts = set(args.only.split(","))
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, as the target says

    shipped_model = InjectionModel.load(args.model)
    base = shipped_model.config
    config = FeatureConfig(
        bits=args.bits or base.bits,
        char_ngrams=base.char_ngrams,
        word_ngrams=base.word_ngrams,
        window=args.window or base.window,
        stride=(args.window or base.window) // 2,
        source_features=base.source_features and not args.no_source_features,
        small_window=base.small_window if args.small_window is None else args.small_window,
    )
    c = args.c or float(shipped_model.metadata.get("c", 8.0))
    a, b = shipped_model.calibration
    t = shipped_model.threshold
    shipped = (math.log(t / (1 - t)) - b) / a  # the shipped threshold in logit space
    print(f"config {config}, C={c}, shipped threshold {t} (logit {shipped:.3f})", file=sys.stderr)

    docs = ti.load_corpus(args.data, source_pairs=not args.no_source_pairs)
    prepared = ti.prepare(docs, config)
    report: dict[str, Any] = {"config": config.to_json(), "c": c, "shipped_threshold": t}
    output: list[str] = []
    if "loso" in parts:
        loso = leave_one_source_out(prepared, config, c, shipped)
        report["leave_one_source_out"] = loso
        output.append(_table("Leave one source out: per source", loso["per_source"]))
        output.append(_table("Leave one source out: per template", loso["per_template"]))
        output.append(_table("Leave one source out: pooled", {"all": loso["pooled"]}))
        fprs = loso["benign_fpr_at_threshold"]
        output.append(f"\nFPR at the shipped threshold, per held-out benign folder: {fprs}")
    if "agentdojo" in parts:
        agentdojo = agentdojo_templates(prepared, config, c, shipped)
        report["agentdojo_template_holdout"] = agentdojo
        output.append(_table("AgentDojo: template and suite held out", agentdojo))
    if "bipia" in parts:
        bipia = bipia_categories(prepared, config, c, shipped)
        report["bipia_category_holdout"] = bipia
        output.append(_table("BIPIA: attack category and contexts held out", bipia))
    if "kfold" in parts:
        kfold = grouped_kfold(prepared, config, c, shipped)
        report["grouped_5fold"] = kfold
        output.append(_table("Grouped 5-fold, all sources (in-distribution)", kfold))
    if "latency" in parts:
        texts = latency_texts(prepared, 300)
        report["latency_512_tokens"] = latency(shipped_model, texts)
        output.append(f"\nLatency, 512-token inputs, one core: {report['latency_512_tokens']}")
    print("\n".join(output))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
