"""What the provider sees: how often the shipped PII defaults alter ordinary prompts, and how precise the
tokenized types are.

1. **Alteration of benign prompts.** Every benign prompt of the folders below goes through the chat
   route's shipped input pipeline: the `pii` and `secrets` detectors with the default settings
   (`DetectSettings()`: `detect.pii.identifying_types`, `detect.pii.person_min_score`), then the
   selection the gateway's redaction uses (`ztai.detect.redact.select_spans`: secrets and identifying
   personal data). The shipped policies fire `tokenize` exactly when `pii_identifying_types` is not empty
   and `redact` when `secret_types` is not empty, so a prompt is altered iff that selection is not empty.
   Reported per folder: the share altered by personal data, by secrets, by either, and (for comparison)
   the share the previous default altered (every personal-data finding tokenized), plus which types
   caused the alterations.
2. **Precision and recall of the tokenized types** on presidio-research's synthetic sentences, scored as
   `scripts/eval_pii.py` does (`--mapping fine`: STREET_ADDRESS kept apart from LOCATION), counting only
   the identifying findings as predictions. Templates are held apart: the tagger is trained on 70% of the
   templates (`scripts/train_pii.py`, seed 13); the remaining 30% are split again by template (seed 29)
   into a calibration half, on which `--calibrate` sweeps the PERSON score threshold, and a report half,
   on which the headline numbers are given. P and R need a character IoU >= 0.9 with a gold span (as in
   eval_pii.py); P-ovl is the share of tokenized findings that overlap a gold span of their type (a
   multi-line address found in two pieces is two correct tokenizations, but no IoU match).

    python scripts/eval_pii_alteration.py                 # both parts
    python scripts/eval_pii_alteration.py --calibrate     # + PERSON threshold sweep on the calibration half
    python scripts/eval_pii_alteration.py --examples 5    # + a few altered prompts per folder
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

import eval_pii  # noqa: E402
from ztai.config import DetectSettings  # noqa: E402
from ztai.detect.base import Finding  # noqa: E402
from ztai.detect.inspector import load_detector  # noqa: E402
from ztai.detect.pii import PiiDetector  # noqa: E402
from ztai.detect.redact import select_spans  # noqa: E402


def data_root() -> Path:
    """`shared/data` next to the checkout (a worktree may sit one level deeper)."""
    for base in (ROOT.parent, ROOT.parent.parent):
        if (base / "shared" / "data").is_dir():
            return base / "shared" / "data"
    return ROOT.parent / "shared" / "data"


FOLDERS = (
    "awesome_chatgpt_prompts",
    "gpteacher",
    "ifeval",
    "self_instruct",
    "fastchat_bench",
    "chatgpt_prompts_zh",
    "xstest",
    "jailbreakbench_benign",
    "cyberseceval",
)


def benign_prompts(root: Path) -> Iterator[tuple[str, str]]:
    """(folder, text) for the benign rows (label 0) of each folder, and AgentDojo's user prompts."""
    for folder in FOLDERS:
        with (root / folder / "data.jsonl").open(encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                if int(row.get("label", 0)) == 0 and row.get("text"):
                    yield folder, str(row["text"])
    tasks = json.loads((root / "agentdojo" / "agentdojo_v1_tasks.json").read_text("utf-8"))
    for suite in tasks["suites"].values():
        for task in suite["user_tasks"]:
            yield "agentdojo_user_tasks", str(task["prompt"])


def alteration(root: Path, examples: int) -> dict[str, Any]:
    settings = DetectSettings()
    pii = load_detector("pii", settings.pii.model_dump())
    secrets = load_detector("secrets")
    rows: dict[str, Counter[str]] = {}
    causes: dict[str, Counter[str]] = {}
    shown: dict[str, list[str]] = {}
    for folder, text in benign_prompts(root):
        count = rows.setdefault(folder, Counter())
        cause = causes.setdefault(folder, Counter())
        found: list[Finding] = pii.scan(text, "user") + secrets.scan(text, "user")
        chosen = select_spans(found)
        count["prompts"] += 1
        by_pii = any(f.detector == "pii" for f in chosen)
        by_secrets = any(f.detector != "pii" for f in chosen)
        count["pii"] += by_pii
        count["secrets"] += by_secrets
        count["any"] += by_pii or by_secrets
        count["before"] += any(f.detector == "pii" for f in found)
        cause.update({f.type for f in chosen})
        if chosen and len(shown.setdefault(folder, [])) < examples:
            shown[folder].append(f"{text[:160]!r} -> {[(f.type, text[f.start : f.end]) for f in chosen][:6]}")
    print("\nBenign prompts altered by the shipped defaults (chat input: pii + secrets)")
    print(
        f"  {'folder':<26} {'prompts':>7} {'pii':>7} {'secrets':>7} {'any':>7} {'before':>7}  types (prompts)"
    )
    total: Counter[str] = Counter()
    all_causes: Counter[str] = Counter()
    out: dict[str, Any] = {}
    for folder, count in rows.items():
        total.update(count)
        all_causes.update(causes[folder])
        n = count["prompts"]
        share = {k: count[k] / n for k in ("pii", "secrets", "any", "before")}
        kinds = ", ".join(f"{t} {c}" for t, c in causes[folder].most_common(5))
        print(
            f"  {folder:<26} {n:>7} {share['pii']:>7.2%} {share['secrets']:>7.2%} {share['any']:>7.2%} "
            f"{share['before']:>7.2%}  {kinds}"
        )
        out[folder] = {"prompts": n, **share, "types": dict(causes[folder])}
        for line in shown.get(folder, []):
            print("      " + line)
    n = total["prompts"]
    kinds = ", ".join(f"{t} {c}" for t, c in all_causes.most_common(6))
    print(
        f"  {'all':<26} {n:>7} {total['pii'] / n:>7.2%} {total['secrets'] / n:>7.2%} "
        f"{total['any'] / n:>7.2%} {total['before'] / n:>7.2%}  {kinds}"
    )
    out["all"] = {"prompts": n, **{k: total[k] / n for k in ("pii", "secrets", "any", "before")}}
    return out


def presidio_parts(seed: int = 29) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The held-out 30% of templates (as eval_pii.py), split by template into calibration / report."""
    data = eval_pii.load_dataset(data_root() / "presidio" / "synth_dataset_v2.json")
    _, test = eval_pii.split_dataset(data, "template", 13)
    ids = sorted({int(x["template_id"]) for x in test})
    random.Random(seed).shuffle(ids)
    calibration = set(ids[: len(ids) // 2])
    return (
        [x for x in test if int(x["template_id"]) in calibration],
        [x for x in test if int(x["template_id"]) not in calibration],
    )


def tokenized_scores(part: list[dict[str, Any]], detector: PiiDetector) -> dict[str, dict[str, float]]:
    """Per identifying type: precision and recall of the identifying findings against the gold spans."""
    mapping = eval_pii.MAPPINGS["fine"]
    samples = []
    found: Counter[str] = Counter()
    on_gold: Counter[str] = Counter()  # identifying findings that overlap a gold span of their type
    for ex in part:
        pred = [(f.type, f.start, f.end) for f in detector.scan(ex["full_text"], "user") if f.identifying]
        gold = eval_pii.map_spans(eval_pii.gold_spans(ex), mapping)
        samples.append((ex["full_text"], gold, pred))
        for t, s, e in pred:
            found[t] += 1
            on_gold[t] += any(g == t and gs < e and s < ge for g, gs, ge in gold)
    per, _ = eval_pii.evaluate(samples)
    out: dict[str, dict[str, float]] = {}
    for t in sorted(detector.identifying_types):
        p, r, _f = per.prf(t)
        overlap = on_gold[t] / found[t] if found[t] else math.nan
        out[t] = {"precision": p, "recall": r, "overlap_precision": overlap, "gold": per.ann[t],
                  "predicted": per.pred[t], "tp": per.tp[t]}  # fmt: skip
    return out


def print_scores(title: str, scores: dict[str, dict[str, float]]) -> None:
    print(f"\n{title}")
    print(f"  {'type':<20} {'P':>6} {'R':>6} {'P-ovl':>6} {'gold':>5} {'pred':>5} {'TP':>5}")
    for t, s in scores.items():
        print(
            f"  {t:<20} {eval_pii._fmt(s['precision']):>6} {eval_pii._fmt(s['recall']):>6} "
            f"{eval_pii._fmt(s['overlap_precision']):>6} {s['gold']:>5} {s['predicted']:>5} {s['tp']:>5}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="shared/data folder")
    ap.add_argument("--calibrate", action="store_true", help="sweep the PERSON threshold (calibration half)")
    ap.add_argument("--examples", type=int, default=0, help="print up to N altered prompts per folder")
    ap.add_argument("--skip-benign", action="store_true")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    root = args.data or data_root()
    results: dict[str, Any] = {}
    if not args.skip_benign:
        results["alteration"] = alteration(root, args.examples)
    settings = DetectSettings().pii
    calibration, report = presidio_parts()
    if args.calibrate:
        print(f"\nPERSON threshold sweep, calibration half ({len(calibration)} sentences)")
        print(f"  {'min score':>9} {'P':>6} {'R':>6} {'pred':>5}")
        for threshold in (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99):
            det = PiiDetector(**{**settings.model_dump(), "person_min_score": threshold})
            s = tokenized_scores(calibration, det)["PERSON"]
            print(f"  {threshold:>9} {eval_pii._fmt(s['precision']):>6} {eval_pii._fmt(s['recall']):>6} "
                  f"{s['predicted']:>5}")  # fmt: skip
    det = PiiDetector(**settings.model_dump())
    scores = tokenized_scores(report, det)
    print_scores(
        f"Tokenized types on presidio, report half of the held-out templates ({len(report)} sentences; "
        f"person_min_score={settings.person_min_score})",
        scores,
    )
    results["presidio_report_half"] = scores
    both = tokenized_scores(calibration + report, det)
    print_scores(f"... all held-out templates ({len(calibration) + len(report)} sentences)", both)
    results["presidio_held_out"] = both
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
