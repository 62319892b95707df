"""Train the prompt-injection model shipped in `src/ztai/detect/models/` (needs the `train` extra: sklearn).

    python scripts/train_injection.py --data ../shared/data --out src/ztai/detect/models

Data (read in place from the shared folder, never copied): AgentDojo tool outputs (clean and injected),
BIPIA contexts with attacks inserted at the start, middle or end, in-the-wild jailbreaks and DAN prompts,
Tensor Trust hijacking attacks and access codes, bastioncorpus rows, presidio sentences (benign). Every
document is normalised exactly as at run time and cut into training windows of the run-time window size
(for an injected document, a window that contains the injection). Features are the run-time hashed
features (`ztai.detect.injection.featurize`), the classifier a weighted L2 logistic regression. The
probability is calibrated by Platt scaling on out-of-fold document scores (group k-fold, scored through
the run-time code path, window maximum included) and the threshold is the lowest one that keeps the
out-of-fold false-positive rate on benign documents at or below the target (1 %).

`scripts/eval_injection.py` imports the functions here to re-train with sources held apart.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression

from ztai.detect.injection import (
    FeatureConfig,
    InjectionModel,
    analyze,
    featurize,
    source_group,
    with_group,
)
from ztai.detect.normalize import NormalizedText, normalize

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data"
DEFAULT_OUT = ROOT / "src" / "ztai" / "detect" / "models"
FOLDERS = ("agentdojo", "bipia", "jailbreaks", "tensor_trust", "bastioncorpus", "presidio")


@dataclass
class Doc:
    text: str
    source: str  # user | document | tool_output
    label: int
    folder: str
    group: str  # documents of one group stay on one side of every split
    template: str  # attack template / category, or "benign:<kind>"
    span: tuple[int, int] | None = None  # where the injection is, when known (original offsets)
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------- loading


def _seed(*parts: object) -> int:
    return zlib.crc32("\x1f".join(map(str, parts)).encode())


def load_agentdojo(data: Path, source_pairs: bool = True) -> list[Doc]:
    folder = data / "agentdojo"
    rows = [json.loads(line) for line in (folder / "agentdojo_v1_tool_outputs.jsonl").open()]
    clean = {(r["suite"], r["user_task"], r["step"]): r["text"] for r in rows if r["label"] == 0}
    docs: list[Doc] = []
    for r in rows:
        text = r["text"]
        span = None
        if r["label"] == 1:
            base = clean.get((r["suite"], r["user_task"], r["step"]))
            if base is not None:
                p = 0
                limit = min(len(base), len(text))
                while p < limit and base[p] == text[p]:
                    p += 1
                s = 0
                while s < limit - p and base[-1 - s] == text[-1 - s]:
                    s += 1
                span = (p, len(text) - s)
        docs.append(
            Doc(
                text=text,
                source="tool_output",
                label=int(r["label"]),
                folder="agentdojo",
                group=f"agentdojo:{r['suite']}:{r['user_task']}",
                template=r["attack"] or "benign:tool_output",
                span=span,
                extra={"suite": r["suite"], "injection_task": r["injection_task"]},
            )
        )
    tasks = json.loads((folder / "agentdojo_v1_tasks.json").read_text())
    for suite, content in tasks["suites"].items():
        for task in content["user_tasks"]:
            group = f"agentdojo:{suite}:{task['id']}"
            docs.append(
                Doc(
                    task["prompt"],
                    "user",
                    0,
                    "agentdojo",
                    group,
                    "benign:user_prompt",
                    extra={"suite": suite},
                )
            )
        if source_pairs:
            # The attacker's goal is a plain request when the user makes it: the same words are benign
            # from `user` and an injection inside a tool result. This teaches the model the source.
            for task in content["injection_tasks"]:
                group = f"agentdojo:{suite}:{task['id']}"
                template = "benign:goal_as_user_prompt"
                extra = {"suite": suite, "augmentation": True}
                docs.append(Doc(task["goal"], "user", 0, "agentdojo", group, template, extra=extra))
    return docs


def _insert(context: str, attack: str, where: str, line_based: bool) -> tuple[str, tuple[int, int]]:
    if where == "start":
        return attack + "\n" + context, (0, len(attack))
    if where == "end":
        return context + "\n" + attack, (len(context) + 1, len(context) + 1 + len(attack))
    if line_based:
        cut = context.find("\n", len(context) // 2)
    else:
        cut = context.find(". ", len(context) // 2)
        cut = cut + 1 if cut >= 0 else -1
    if cut < 0:
        cut = len(context) // 2
    head, tail = context[:cut], context[cut:]
    joiner = "\n" if line_based else " "
    start = len(head) + len(joiner)
    return head + joiner + attack + joiner + tail.lstrip(" "), (start, start + len(attack))


def load_bipia(data: Path, source_pairs: bool = True, seed: int = 13) -> list[Doc]:
    folder = data / "bipia"
    text_attacks = json.loads((folder / "text_attack_train.json").read_text())
    code_attacks = json.loads((folder / "code_attack_train.json").read_text())
    docs: list[Doc] = []
    per_context = {"email": 6, "table": 1, "code": 6}
    for kind in ("email", "table", "code"):
        attacks = code_attacks if kind == "code" else text_attacks
        pool = [(category, attack) for category, items in attacks.items() for attack in items]
        for index, line in enumerate((folder / kind / "train.jsonl").open()):
            row = json.loads(line)
            context = row["context"] if isinstance(row["context"], str) else "\n".join(row["context"])
            group = f"bipia:{kind}:{index}"
            docs.append(
                Doc(context, "document", 0, "bipia", group, f"benign:{kind}_context", extra={"kind": kind})
            )
            question = row.get("question")
            if isinstance(question, str) and question.strip():
                docs.append(Doc(question, "user", 0, "bipia", group, "benign:question", extra={"kind": kind}))
            rng = random.Random(_seed(seed, kind, index))
            for _ in range(per_context[kind]):
                category, attack = rng.choice(pool)
                where = rng.choice(("start", "middle", "end"))
                text, span = _insert(context, attack, where, line_based=kind != "email")
                extra = {"kind": kind, "position": where, "attack": attack}
                docs.append(Doc(text, "document", 1, "bipia", group, category, span, extra=extra))
        if source_pairs:
            # As a user's own request, a BIPIA attack string is benign (a question, a code snippet).
            for category, items in attacks.items():
                for number, attack in enumerate(items):
                    attack_group = f"bipia:attack:{kind}:{category}:{number}"
                    extra = {"kind": kind, "category": category, "augmentation": True}
                    template = "benign:attack_as_user_prompt"
                    docs.append(Doc(attack, "user", 0, "bipia", attack_group, template, extra=extra))
    # the text attacks were added twice (email and table); keep one copy
    seen: set[tuple[str, str]] = set()
    unique: list[Doc] = []
    for doc in docs:
        key = (doc.text, doc.template) if doc.template == "benign:attack_as_user_prompt" else None
        if key is not None:
            if key in seen:
                continue
            seen.add(key)
        unique.append(doc)
    return unique


def load_jailbreaks(data: Path) -> list[Doc]:
    folder = data / "jailbreaks"
    docs: list[Doc] = []
    for index, prompt in enumerate(json.loads((folder / "inthewild_jailbreak_llms_dev.json").read_text())):
        docs.append(Doc(prompt, "user", 1, "jailbreaks", f"jailbreaks:wild:{index}", "in_the_wild"))
    for path in sorted((folder / "dan_family").glob("*.json")):
        for index, prompt in enumerate(json.loads(path.read_text())):
            text = prompt.replace("{generator.name}", "ChatGPT")
            docs.append(
                Doc(text, "user", 1, "jailbreaks", f"jailbreaks:dan:{path.stem}:{index}", "dan_family")
            )
    return docs


def load_tensor_trust(data: Path) -> list[Doc]:
    rows = [
        json.loads(line) for line in (data / "tensor_trust" / "hijacking_robustness_dataset.jsonl").open()
    ]
    docs: list[Doc] = []
    attacks = sorted({r["attack"] for r in rows})
    codes = sorted({r["access_code"] for r in rows} - set(attacks))
    for attack in attacks:
        docs.append(Doc(attack, "user", 1, "tensor_trust", f"tt:attack:{_seed(attack)}", "hijacking"))
    for code in codes:
        docs.append(Doc(code, "user", 0, "tensor_trust", f"tt:code:{_seed(code)}", "benign:access_code"))
    return docs


def load_bastion(data: Path) -> list[Doc]:
    docs: list[Doc] = []
    channel = {"user_input": "user", "tool_output": "tool_output", "memory": "document"}
    for line in (data / "bastioncorpus" / "injections.jsonl").open():
        r = json.loads(line)
        rng = random.Random(_seed("canary", r["id"]))
        token = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(10))
        text = r["text"].replace("{canary}", f"ZT-{token}")
        label = 1 if r["label"] == "malicious" else 0
        template = r["category"] if label else f"benign:{r['category']}"
        source = channel.get(r["channel"], "document")
        extra = {"lang": r["lang"], "channel": r["channel"]}
        docs.append(Doc(text, source, label, "bastioncorpus", f"bastion:{r['id']}", template, extra=extra))
    return docs


def load_presidio(data: Path) -> list[Doc]:
    rows = json.loads((data / "presidio" / "synth_dataset_v2.json").read_text())
    return [
        Doc(
            r["full_text"],
            "user" if i % 2 == 0 else "document",
            0,
            "presidio",
            f"presidio:{i}",
            "benign:pii_sentence",
        )
        for i, r in enumerate(rows)
    ]


def load_corpus(data: Path, source_pairs: bool = True) -> list[Doc]:
    docs = [
        *load_agentdojo(data, source_pairs),
        *load_bipia(data, source_pairs),
        *load_jailbreaks(data),
        *load_tensor_trust(data),
        *load_bastion(data),
        *load_presidio(data),
    ]
    return [doc for doc in docs if doc.text.strip()]


# ---------------------------------------------------------------------------------------- features


@dataclass
class Prepared:
    """A document normalised once, with its training windows' feature ids (shared + group copies)."""

    doc: Doc
    normalized: NormalizedText
    rows: list[np.ndarray]


def training_windows(
    doc: Doc, normalized: NormalizedText, config: FeatureConfig, max_windows: int = 4
) -> list[tuple[int, int]]:
    """Crops at the run-time window size(s): the run-time score is the maximum over such windows."""
    spans = _training_windows(doc, normalized, config.window, max_windows)
    if config.small_window and len(normalized.text) > config.small_window:
        spans += _training_windows(doc, normalized, config.small_window, max_windows)
    return spans


def _training_windows(
    doc: Doc, normalized: NormalizedText, window: int, max_windows: int
) -> list[tuple[int, int]]:
    n = len(normalized.text)
    if n <= window:
        return [(0, n)]
    rng = random.Random(_seed("windows", doc.group, doc.template, len(doc.text), window))
    if doc.label == 1 and doc.span is not None:
        s = normalized.to_normalized(doc.span[0])
        e = max(s + 1, normalized.to_normalized(doc.span[1]))
        low = max(0, min(e, s + window) - window)
        high = min(s, n - window)
        start = rng.randint(min(low, high), max(low, high))
        return [(start, start + window)]
    starts = list(range(0, n - window + 1, window))
    if doc.label == 1:
        # Whole-text attacks: the opening window, and one more at random.
        chosen = [0, *rng.sample(starts[1:], k=min(1, len(starts) - 1))]
    else:
        chosen = sorted(rng.sample(starts, k=min(max_windows, len(starts))))
    return [(start, min(n, start + window)) for start in chosen]


def prepare(docs: Sequence[Doc], config: FeatureConfig, log: bool = True) -> list[Prepared]:
    prepared: list[Prepared] = []
    started = time.perf_counter()
    for index, doc in enumerate(docs):
        normalized = normalize(doc.text)
        group = source_group(doc.source)
        rows = []
        for start, end in training_windows(doc, normalized, config):
            ids = featurize(normalized.text[start:end], config).ids
            rows.append(with_group(ids, group, config))
        prepared.append(Prepared(doc, normalized, rows))
        if log and index and index % 5000 == 0:
            print(f"  prepared {index}/{len(docs)} ({time.perf_counter() - started:.0f}s)", file=sys.stderr)
    return prepared


def doc_weights(docs: Sequence[Doc]) -> np.ndarray:
    """Per-document weights: the classes weigh the same in total; within a class each folder weighs in
    proportion to the square root of its size (AgentDojo's 2,315 near-duplicate outputs must not drown
    the 348 jailbreaks)."""
    sizes = Counter((doc.folder, doc.label) for doc in docs)
    weights = np.zeros(len(docs))
    for label in (0, 1):
        folder_sizes = {folder: n for (folder, lab), n in sizes.items() if lab == label}
        if not folder_sizes:
            continue
        total_root = sum(math.sqrt(n) for n in folder_sizes.values())
        class_total = len(docs) / 2
        for i, doc in enumerate(docs):
            if doc.label == label:
                n = folder_sizes[doc.folder]
                weights[i] = class_total * (math.sqrt(n) / total_root) / n
    return weights


def design(
    prepared: Sequence[Prepared], config: FeatureConfig
) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Sparse rows (one per training window) with two source-group columns, labels, sample weights."""
    dim = 1 << config.bits
    weights = doc_weights([p.doc for p in prepared])
    indptr = [0]
    indices: list[np.ndarray] = []
    values: list[np.ndarray] = []
    labels: list[int] = []
    sample_weight: list[float] = []
    for item, weight in zip(prepared, weights, strict=True):
        group = source_group(item.doc.source)
        for ids in item.rows:
            count = max(1, len(ids))
            indices.append(np.concatenate((ids, [dim + group])))
            values.append(np.concatenate((np.full(len(ids), 1.0 / math.sqrt(count)), [1.0])))
            indptr.append(indptr[-1] + len(ids) + 1)
            labels.append(item.doc.label)
            sample_weight.append(weight / len(item.rows))
    matrix = sp.csr_matrix(
        (np.concatenate(values), np.concatenate(indices), np.asarray(indptr)), shape=(len(labels), dim + 2)
    )
    matrix.sum_duplicates()
    return matrix, np.asarray(labels), np.asarray(sample_weight)


def fit(prepared: Sequence[Prepared], config: FeatureConfig, c: float = 8.0) -> InjectionModel:
    """A model (uncalibrated: a=1, b=0; threshold 0.5) from prepared documents."""
    matrix, labels, sample_weight = design(prepared, config)
    classifier = LogisticRegression(C=c, solver="lbfgs", max_iter=2000, tol=1e-5)
    classifier.fit(matrix, labels, sample_weight=sample_weight)
    coef = classifier.coef_[0]
    dim = 1 << config.bits
    return InjectionModel(
        config=config,
        weights=coef[:dim].astype(np.float32),
        bias=float(classifier.intercept_[0]),
        group_bias=(float(coef[dim]), float(coef[dim + 1])),
        calibration=(1.0, 0.0),
        threshold=0.5,
    )


def doc_logits(model: InjectionModel, prepared: Iterable[Prepared]) -> np.ndarray:
    """Document scores (raw maximum window logit) through the run-time code path."""
    return np.asarray([analyze(p.doc.text, p.doc.source, model).logit for p in prepared])


def group_folds(prepared: Sequence[Prepared], k: int, seed: int = 7) -> list[np.ndarray]:
    groups = sorted({p.doc.group for p in prepared})
    rng = random.Random(seed)
    rng.shuffle(groups)
    fold_of = {group: i % k for i, group in enumerate(groups)}
    assignment = np.asarray([fold_of[p.doc.group] for p in prepared])
    return [np.flatnonzero(assignment == i) for i in range(k)]


def out_of_fold_logits(
    prepared: Sequence[Prepared], config: FeatureConfig, c: float, k: int = 5
) -> np.ndarray:
    logits = np.zeros(len(prepared))
    for index, test in enumerate(group_folds(prepared, k)):
        train_mask = np.ones(len(prepared), dtype=bool)
        train_mask[test] = False
        model = fit([p for p, keep in zip(prepared, train_mask, strict=True) if keep], config, c)
        logits[test] = doc_logits(model, [prepared[i] for i in test])
        print(f"  fold {index + 1}/{k} done", file=sys.stderr)
    return logits


def platt(logits: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    finite = np.clip(logits, -50, 50).reshape(-1, 1)
    calibrator = LogisticRegression(C=1e6, solver="lbfgs", max_iter=1000)
    calibrator.fit(finite, labels, sample_weight=weights)
    return float(calibrator.coef_[0][0]), float(calibrator.intercept_[0])


def threshold_for_fpr(benign_scores: np.ndarray, target: float) -> float:
    """The lowest threshold t with fraction(benign >= t) <= target."""
    ordered = np.sort(benign_scores)[::-1]
    allowed = math.floor(target * len(ordered))
    if allowed >= len(ordered):
        return float(ordered[-1])
    return float(np.nextafter(ordered[allowed], np.inf))


def sigmoid(values: np.ndarray, a: float, b: float) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-np.clip(a * values + b, -60, 60))))


def calibrate_and_threshold(
    logits: np.ndarray, prepared: Sequence[Prepared], target_fpr: float
) -> tuple[tuple[float, float], float, dict[str, Any]]:
    # Source-pair augmentation documents train the model but are no sample of any benign source.
    real = np.asarray([not p.doc.extra.get("augmentation") for p in prepared])
    prepared = [p for p, keep in zip(prepared, real, strict=True) if keep]
    logits = logits[real]
    labels = np.asarray([p.doc.label for p in prepared])
    weights = doc_weights([p.doc for p in prepared])
    a, b = platt(logits, labels, weights)
    probs = sigmoid(logits, a, b)
    benign = labels == 0
    threshold = threshold_for_fpr(probs[benign], target_fpr)
    per_folder: dict[str, Any] = {}
    for folder in FOLDERS:
        mask = np.asarray([p.doc.folder == folder for p in prepared])
        neg = mask & benign
        pos = mask & ~benign
        per_folder[folder] = {
            "benign": int(neg.sum()),
            "fpr": round(float((probs[neg] >= threshold).mean()), 4) if neg.any() else None,
            "attacks": int(pos.sum()),
            "recall": round(float((probs[pos] >= threshold).mean()), 4) if pos.any() else None,
        }
    report = {
        "out_of_fold": {
            "fpr": round(float((probs[benign] >= threshold).mean()), 4),
            "recall": round(float((probs[~benign] >= threshold).mean()), 4),
            "per_folder": per_folder,
        }
    }
    return (a, b), threshold, report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--bits", type=int, default=18)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--c", type=float, default=8.0)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--target-fpr", type=float, default=0.01)
    parser.add_argument("--small-window", type=int, default=0, help="second window scale (0: none)")
    parser.add_argument("--no-source-features", action="store_true")
    parser.add_argument("--no-source-pairs", action="store_true")
    parser.add_argument(
        "--exclude-folder",
        action="append",
        default=[],
        choices=FOLDERS,
        help="leave a data folder out (held-apart evaluations, e.g. bench/agentdojo_replay.py)",
    )
    args = parser.parse_args(argv)

    config = FeatureConfig(
        bits=args.bits,
        window=args.window,
        stride=args.window // 2,
        source_features=not args.no_source_features,
        small_window=args.small_window,
    )
    started = time.perf_counter()
    docs = load_corpus(args.data, source_pairs=not args.no_source_pairs)
    docs = [doc for doc in docs if doc.folder not in args.exclude_folder]
    print(f"{len(docs)} documents: {dict(Counter((d.folder, d.label) for d in docs))}", file=sys.stderr)
    prepared = prepare(docs, config)
    print(f"prepared in {time.perf_counter() - started:.0f}s; out-of-fold scores ...", file=sys.stderr)
    logits = out_of_fold_logits(prepared, config, args.c, args.folds)
    calibration, threshold, report = calibrate_and_threshold(logits, prepared, args.target_fpr)
    print(json.dumps(report, indent=1), file=sys.stderr)
    model = fit(prepared, config, args.c)
    model.calibration = calibration
    model.threshold = round(threshold, 6)
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    for (folder, label), n in sorted(Counter((d.folder, d.label) for d in docs).items()):
        counts[folder]["attack" if label else "benign"] = n
    model.metadata = {
        "trained_on": dict(counts),
        "c": args.c,
        "target_fpr": args.target_fpr,
        "source_pairs": not args.no_source_pairs,
        "calibrated_for": "equal class priors (balanced weights)",
        **report,
    }
    npz_path, json_path = model.save(args.out)
    print(
        f"wrote {npz_path} ({npz_path.stat().st_size / 1e6:.2f} MB) and {json_path}; "
        f"threshold {threshold:.4f}; {time.perf_counter() - started:.0f}s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
