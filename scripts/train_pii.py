"""Train the PII token tagger shipped as `src/ztai/detect/data/pii_tagger.npz`.

Two stacked multinomial logistic regressions (scikit-learn, training only) over the sparse features of
`ztai.detect.pii.token_features`; the second stage also sees the first stage's labels of neighbouring
tokens (cross-fitted: out-of-fold first-stage predictions, folds by template). Training data:

* the TRAIN part of the presidio-research synthetic set only (`--split template`: 70/30 by template id,
  seed 13 — the held-out templates never reach training; `--split sentence`: 70/30 by sentence);
* `--synthetic` sentences of our own (hand-written templates below, filled from the shipped gazetteer),
  which cover contexts the benchmark's templates do not.

At run time the detector needs only numpy. Deterministic for given arguments.

    python scripts/build_pii_gazetteers.py        # optional: rebuild the gazetteer (see its docstring)
    python scripts/train_pii.py                   # needs scikit-learn (pip install -e '.[train]')
    python scripts/eval_pii.py                    # held-out numbers

Only feature names (single words, word pairs, shapes, affixes, gazetteer flags) and weights are stored; no
sentence of the data set is copied into the artifact.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

from eval_pii import DATASET, load_dataset, split_dataset  # noqa: E402
from ztai.detect import pii  # noqa: E402

OUT = ROOT / "src" / "ztai" / "detect" / "data" / "pii_tagger.npz"
GOLD_TO_TAGGER = {
    "PERSON": "PERSON",
    "GPE": "LOCATION",
    "LOCATION": "LOCATION",
    "STREET_ADDRESS": "STREET_ADDRESS",
    "ORGANIZATION": "ORGANIZATION",
    "NRP": "NRP",
    "TITLE": "TITLE",
    "ZIP_CODE": "ZIP_CODE",
}


def sentence_examples(text: str, spans: list[dict[str, object]]) -> tuple[list[list[str]], list[str]]:
    hits = pii._resolve(pii._pattern_hits(text))
    toks = pii.tokenize(text)
    feats = pii.token_features(text, toks, pii.pattern_types_per_token(toks, hits))
    labels = []
    for t in toks:
        lab = "O"
        for s in spans:
            a, b = int(s["start_position"]), int(s["end_position"])  # type: ignore[call-overload]
            if a <= t.start < b:
                lab = GOLD_TO_TAGGER.get(str(s["entity_type"]), "O")
                break
        labels.append(lab)
    return feats, labels


# ---------------------------------------------------------------------------------------------------------
# Our own synthetic sentences (hand-written templates filled from the shipped gazetteers). They teach the
# tagger contexts that the benchmark's templates do not cover, so that it leans on general cues (name
# lists, capitalisation, common-word frequency) rather than on one data set's phrasing.
# ---------------------------------------------------------------------------------------------------------

_TEMPLATES = [
    "{PERSON} called yesterday about the invoice.",
    "Please forward this to {PERSON} before Friday.",
    "Thanks, {FIRST}! See you soon.",
    "Dear {HON} {LAST},\nthank you for your letter.",
    "Regards,\n{PERSON}\n{JOB}\n{ORG}",
    "{PERSON} and {PERSON} met in {CITY} last year.",
    "We invited {FIRST}, {FIRST}, {FIRST} and {FIRST} to the party.",
    "The winners are {FIRST}, {FIRST} and {FIRST}.",
    "My kids are called {FIRST} and {FIRST}",
    "Present: {PERSON}, {PERSON}, {FIRST} and {FIRST}",
    "{FIRST}, {FIRST}, {FIRST}, and {FIRST} signed the letter.",
    "The report was written by {PERSON} ({JOB} at {ORG}).",
    "According to {LAST}, the results were good.",
    "{FIRST}'s brother moved to {COUNTRY}.",
    "I spoke with {HON} {PERSON} this morning.",
    "Contact person: {PERSON}",
    "Name: {PERSON}\nCity: {CITY}\nCountry: {COUNTRY}",
    "Ship to:\n{PERSON}\n{STREET}\n{CITY}\n{COUNTRY}",
    "Send the parcel to {STREET}, {CITY}.",
    "Our office is located at {STREET} in {CITY}, {COUNTRY}.",
    "She lives at {STREET}.",
    "The meeting will take place in {CITY}.",
    "He was born in {CITY}, {COUNTRY}.",
    "Flights from {CITY} to {CITY} are delayed.",
    "We are expanding to {COUNTRY} and {COUNTRY}.",
    "{ORG} announced a partnership with {ORG}.",
    "I have worked at {ORG} for three years.",
    "{PERSON}, {JOB} at {ORG}, said the deal was done.",
    "The contract between {ORG} and {PERSON} ends soon.",
    "{ORG} opened a new office in {CITY}.",
    "My {NRP} friend {FIRST} cooks very well.",
    "The {NRP} delegation arrived on time.",
    "Is {FIRST} coming with us?",
    "Ask {FIRST} or {FIRST} about it.",
    "{FIRST} {LAST} was elected chair of the board.",
    "Our {JOB}, {PERSON}, starts on Monday.",
    "Invoice for {PERSON}, {STREET}, {CITY}",
    "Can you check the account of {PERSON}?",
    "Please update my address to {STREET}, {CITY}.",
    "{PERSON} visited {ORG} headquarters in {CITY}.",
    "Best wishes from {CITY}!",
    "I grew up near {CITY} but now I live in {COUNTRY}.",
    "A message for {HON} {LAST} from {ORG}.",
    "{LAST} and {LAST} wrote the paper together.",
    "The painting was sold to {PERSON} for a fortune.",
    "Customer: {PERSON}\nAddress: {STREET}\n{CITY}",
    "It was {FIRST} who found the keys.",
    "Yesterday {FIRST} told me about {ORG}.",
    "{CITY} is a lovely town in {COUNTRY}.",
    "The team from {ORG} will visit {CITY} next month.",
    "Why did {FIRST} leave {ORG}?",
    "We thank {PERSON} and {PERSON} for their help.",
    "{HON} {PERSON} works as a {JOB}.",
    "Signed, {PERSON}",
    # no entity: capitalised common words, titles of works, ordinary nouns where names could be
    "{Word}! That is what we need.",
    "{Word} and {Word} are both on the agenda.",
    "The new {word} arrives on Monday.",
    "She bought a {word} and a {word} yesterday.",
    "{Word} {Word} is the title of the second chapter.",
    "Oh, {word}. I did not expect that.",
    "We discussed the {Word} {Word} Act in class.",
    "Our {word} team met the {word} group.",
    "Cool, thanks! {Word} sounds good.",
    "As a {word}, I liked the {word} part best.",
]
_JOBS = [
    "accountant",
    "nurse",
    "software engineer",
    "project manager",
    "teacher",
    "sales representative",
    "data analyst",
    "chief executive officer",
    "office clerk",
    "pharmacist",
    "electrician",
    "architect",
    "lawyer",
    "dentist",
    "marketing manager",
    "receptionist",
    "civil engineer",
    "graphic designer",
    "librarian",
    "bus driver",
]
_HONS = ["Mr.", "Mrs.", "Ms.", "Dr.", "Prof.", "Miss"]
_ORG_SUFFIX = ["Inc", "Inc.", "LLC", "Ltd", "Group", "Partners", "Associates", "Corporation", "GmbH", "Labs"]
_STREET_KINDS = ["Street", "Road", "Avenue", "Lane", "Drive", "Way", "Boulevard", "Court", "Place"]
_STREET_SUFFIX = ["straße", "weg", "vej", "gatan", "katu", "laan", "gade", "tie", "strasse", "vägen"]


def _synthetic(n: int, seed: int) -> list[dict[str, Any]]:
    gaz = pii._gazetteer()
    rng = random.Random(seed)
    first = sorted(k for k, v in gaz.first.items() if v in ("F1", "F2") and k.isalpha())
    last = sorted(k for k, v in gaz.last.items() if v in ("L1", "L2") and k.isalpha())
    rare_first = sorted(k for k, v in gaz.first.items() if v == "F3" and k.isalpha())
    cities = sorted(k for k, v in gaz.place.items() if v == "P" and " " not in k)
    countries = sorted(k for k, v in gaz.place.items() if v == "C")
    words = sorted(
        k for k, v in gaz.word.items() if v in ("W2C", "W3C", "W2M") and k.isalpha() and len(k) > 3
    )
    nrps = sorted(w for w in pii._NRP_WORDS if w[0].isalpha())
    common = sorted(k for k, v in gaz.word.items() if v[2] == "C" and k.isalpha() and len(k) > 2)

    def cap(w: str) -> str:
        return w[:1].upper() + w[1:]

    def person() -> str:
        f = cap(rng.choice(rare_first if rng.random() < 0.3 else first))
        la = cap(rng.choice(last))
        r = rng.random()
        return f"{f} {la}" if r < 0.7 else f"{f} {rng.choice('ABCDEFGHJKLMNPRST')}. {la}" if r < 0.85 else la

    def org() -> str:
        r = rng.random()
        la = [cap(rng.choice(last)) for _ in range(3)]
        if r < 0.3:
            return f"{la[0]} {rng.choice(_ORG_SUFFIX)}"
        if r < 0.45:
            return f"{la[0]}, {la[1]} and {la[2]}"
        if r < 0.6:
            return f"{la[0]}-{la[1]}"
        if r < 0.8:
            return (
                " ".join(cap(rng.choice(words)) for _ in range(rng.randint(1, 2)))
                + " "
                + rng.choice(
                    ["Solutions", "Systems", "Technologies", "Capital", "Consulting", "Software", "Group"]
                )
            )
        return cap(rng.choice(words)) + rng.choice(words)[:4] + rng.choice(["", " Inc", " Ltd"])

    def street() -> str:
        num = str(rng.randint(1, 9999))
        r = rng.random()
        if r < 0.4:
            return f"{num} {cap(rng.choice(words))} {rng.choice(_STREET_KINDS)}"
        if r < 0.7:
            return f"{cap(rng.choice(last))}{rng.choice(_STREET_SUFFIX)} {num}"
        if r < 0.85:
            return f"{num} {cap(rng.choice(last))} {rng.choice(_STREET_KINDS)}, Apt. {rng.randint(1, 999)}"
        return f"P.O. Box {num}"

    fill: dict[str, tuple[str, Any]] = {
        "PERSON": ("PERSON", person),
        "FIRST": ("PERSON", lambda: cap(rng.choice(first))),
        "LAST": ("PERSON", lambda: cap(rng.choice(last))),
        "CITY": ("LOCATION", lambda: " ".join(cap(p) for p in rng.choice(cities).split())),
        "COUNTRY": ("LOCATION", lambda: " ".join(cap(p) for p in rng.choice(countries).split())),
        "ORG": ("ORGANIZATION", org),
        "STREET": ("STREET_ADDRESS", street),
        "JOB": ("TITLE", lambda: rng.choice(_JOBS)),
        "HON": ("TITLE", lambda: rng.choice(_HONS)),
        "NRP": ("NRP", lambda: cap(rng.choice(nrps))),
        "Word": ("O", lambda: cap(rng.choice(common))),
        "word": ("O", lambda: rng.choice(common)),
    }
    out: list[dict[str, Any]] = []
    for _ in range(n):
        tpl = rng.choice(_TEMPLATES)
        text, spans, pos = "", [], 0
        for m in re.finditer(r"\{(\w+)\}", tpl):
            text += tpl[pos : m.start()]
            typ, gen = fill[m.group(1)]
            val = gen()
            if rng.random() < 0.1 and typ == "LOCATION":
                val = val.upper()
            if typ != "O":
                spans.append(
                    {"entity_type": typ, "start_position": len(text), "end_position": len(text) + len(val)}
                )
            text += val
            pos = m.end()
        text += tpl[pos:]
        if rng.random() < 0.08:
            text = text.lower()
        out.append({"full_text": text, "spans": spans, "template_id": -1 - _TEMPLATES.index(tpl)})
    return out


def _matrix(feats: list[list[str]], index: dict[str, int]) -> Any:
    from scipy.sparse import csr_matrix

    rows, cols = [], []
    for r, f in enumerate(feats):
        for j in {index[s] for s in f if s in index}:
            rows.append(r)
            cols.append(j)
    return csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(feats), len(index)))


def _fit(
    x: Any, y: np.ndarray, n_labels: int, c: float, entity_weight: float
) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.linear_model import LogisticRegression

    weights = {k: (1.0 if k == 0 else entity_weight) for k in range(n_labels)}
    clf = LogisticRegression(C=c, max_iter=3000, class_weight=weights, tol=1e-4)
    clf.fit(x, y)
    coef = np.zeros((x.shape[1], n_labels), dtype=np.float32)
    bias = np.full(n_labels, -20.0, dtype=np.float32)
    for ci, k in enumerate(clf.classes_):
        coef[:, k] = clf.coef_[ci]
        bias[k] = clf.intercept_[ci]
    return coef, bias


def _probs(coef: np.ndarray, bias: np.ndarray, x: Any) -> np.ndarray:
    z = np.asarray(x @ coef) + bias
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATASET)
    ap.add_argument("--split", choices=["template", "sentence", "none"], default="template")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--C", type=float, default=0.5)
    ap.add_argument("--min-count", type=int, default=2)
    ap.add_argument("--folds", type=int, default=5, help="cross-fitting folds for the stacked stage")
    ap.add_argument("--entity-weight", type=float, default=1.5, help="class weight of non-O labels (recall)")
    ap.add_argument("--synthetic", type=int, default=3000, help="our own template sentences to add")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    data = load_dataset(args.data)
    train = data if args.split == "none" else split_dataset(data, args.split, args.seed)[0]
    train = train + _synthetic(args.synthetic, args.seed)
    t0 = time.time()
    sent_feats: list[list[list[str]]] = []
    sent_labels: list[list[str]] = []
    groups: list[int] = []
    for ex in train:
        f, y = sentence_examples(ex["full_text"], ex["spans"])
        sent_feats.append(f)
        sent_labels.append(y)
        groups.append(int(ex["template_id"]))
    labels = ["O", *pii.TAGGER_TYPES]
    all_feats = [f for sf in sent_feats for f in sf]
    y = np.array([labels.index(lab) for sl in sent_labels for lab in sl])
    counts = Counter(s for f in all_feats for s in set(f))
    base_vocab = sorted(s for s, c in counts.items() if c >= args.min_count)
    index = {s: i for i, s in enumerate(base_vocab)}
    x1 = _matrix(all_feats, index)
    print(
        f"{len(train)} sentences, {x1.shape[0]} tokens, {len(base_vocab)} base features "
        f"({time.time() - t0:.1f}s)"
    )
    print(
        "label counts:", {labels[k]: int(v) for k, v in zip(*np.unique(y, return_counts=True), strict=True)}
    )

    # stage 1 on everything; out-of-fold stage-1 labels (folds by template) feed stage 2
    w1, b1 = _fit(x1, y, len(labels), args.C, args.entity_weight)
    sent_of_token = np.repeat(np.arange(len(sent_feats)), [len(sf) for sf in sent_feats])
    tmpl = sorted(set(groups))
    fold_of_tmpl = {t: i % args.folds for i, t in enumerate(random.Random(args.seed).sample(tmpl, len(tmpl)))}
    token_fold = np.array([fold_of_tmpl[groups[s]] for s in sent_of_token])
    oof = np.zeros((len(y), len(labels)), dtype=np.float32)
    for k in range(args.folds):
        tr, te = token_fold != k, token_fold == k
        wk, bk = _fit(x1[tr], y[tr], len(labels), args.C, args.entity_weight)
        oof[te] = _probs(wk, bk, x1[te])
    print(
        f"stage 1 done ({time.time() - t0:.1f}s); "
        f"out-of-fold token accuracy {(oof.argmax(1) == y).mean():.4f}"
    )
    stacked: list[list[str]] = []
    pos = 0
    for sf in sent_feats:
        stacked += pii.stack_features(oof[pos : pos + len(sf)], labels)
        pos += len(sf)
    extra_counts = Counter(s for f in stacked for s in set(f))
    extra_vocab = sorted(s for s, c in extra_counts.items() if c >= args.min_count and s not in index)
    vocab = base_vocab + extra_vocab
    index2 = {s: i for i, s in enumerate(vocab)}
    x2 = _matrix([a + b for a, b in zip(all_feats, stacked, strict=True)], index2)
    w2, b2 = _fit(x2, y, len(labels), args.C, args.entity_weight)
    print(
        f"stage 2 done ({time.time() - t0:.1f}s); "
        f"train token accuracy {(_probs(w2, b2, x2).argmax(1) == y).mean():.4f}"
    )

    w1_full = np.zeros_like(w2)
    w1_full[: len(base_vocab)] = w1
    keep = np.maximum(np.abs(w1_full).max(axis=1), np.abs(w2).max(axis=1)) >= 1e-3
    vocab_kept = [s for s, k in zip(vocab, keep, strict=True) if k]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        vocab=np.frombuffer("\n".join(vocab_kept).encode("utf-8"), dtype=np.uint8),
        labels=np.frombuffer("\n".join(labels).encode("utf-8"), dtype=np.uint8),
        w1=w1_full[keep].astype(np.float16),
        b1=b1,
        w2=w2[keep].astype(np.float16),
        b2=b2,
        meta=np.frombuffer(f"split={args.split} seed={args.seed} C={args.C}".encode(), dtype=np.uint8),
    )
    print(f"wrote {args.out}: {len(vocab_kept)} features ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
