"""Regenerate `src/ztai/detect/data/secret_rules.json` from kingfisher's or noseyparker's rules.

The secrets detector's provider rules (one regex per credential format, with the rule's examples) are
vendored from upstream rule sets (both Apache-2.0, see NOTICE):

- kingfisher (mongodb/kingfisher): a checkout (its `data/rules/` is read), that rules directory itself, or
  the JSON that `kingfisher rules list --format json` prints (kingfisher 1.x binaries embed the rules;
  e.g. the `kingfisher-bin` wheel on PyPI: `pip download --no-deps kingfisher-bin==1.112.0`);
- noseyparker (praetorian-inc/noseyparker): a checkout (`crates/noseyparker/data/default/builtin/rules/`)
  or that directory.

Several sources may be given; the first to define a rule id wins. Upstream patterns are Rust regex /
Hyperscan syntax; they are translated for RE2 here (extended mode `(?x)` folded: blanks, `# comments`
and `(?# comments)` removed; `(?<name>` written `(?P<name>`; counts over RE2's 1,000 capped, open
counts `{n,}` bounded at 256), then compiled. A rule RE2 rejects is left out and listed under `skipped`
with the reason. Output is deterministic (rules
sorted by id, stable JSON), so a refresh from the same sources gives the same file.

    python scripts/refresh_secret_rules.py SOURCE [SOURCE ...] [--upstream "mongodb/kingfisher@v1.112.0"]
                                           [--out src/ztai/detect/data/secret_rules.json]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "src" / "ztai" / "detect" / "data" / "secret_rules.json"
RULE_DIRS = ("data/rules", "crates/noseyparker/data/default/builtin/rules")
MAX_EXAMPLE = 2_000  # longer examples are dropped from the vendored file (kept small)

# ztai's established finding types for well-known formats (policies and tests use these names);
# every other rule's type is its upstream name in UPPER_SNAKE.
TYPE_BY_PREFIX: tuple[tuple[str, str], ...] = (
    ("aws.1", "AWS_ACCESS_KEY"),
    ("aws.2", "AWS_SECRET_KEY"),
    ("aws.", "AWS_CREDENTIAL"),
    ("github.7", "GITHUB_CLIENT_ID"),
    ("github.", "GITHUB_TOKEN"),
    ("gitlab.", "GITLAB_TOKEN"),
    ("slack.4", "SLACK_WEBHOOK"),
    ("slack.", "SLACK_TOKEN"),
    ("stripe.", "STRIPE_KEY"),
    ("openai.", "OPENAI_API_KEY"),
    ("anthropic.", "ANTHROPIC_API_KEY"),
    ("pem.", "PRIVATE_KEY"),
    ("privkey.", "PRIVATE_KEY"),
    ("jwt.", "JWT"),
    ("npm.", "NPM_TOKEN"),
    ("pypi.", "PYPI_TOKEN"),
    ("sendgrid.", "SENDGRID_KEY"),
    ("huggingface.", "HUGGINGFACE_TOKEN"),
    ("azure.6", "AZURE_CLIENT_SECRET"),
    ("google.7", "GCP_API_KEY"),
    ("gcp.1", "GCP_API_KEY"),
    ("google.2", "GCP_OAUTH_SECRET"),
    ("google.3", "GCP_OAUTH_SECRET"),
    ("azurestorage.", "AZURE_STORAGE_KEY"),
    ("azure.1", "AZURE_CONNECTION_STRING"),
    ("azure.notificationhub.4", "AZURE_CONNECTION_STRING"),
    ("azuresastoken.", "AZURE_SAS_TOKEN"),
    ("twilio.2", "TWILIO_KEY"),
    ("telegram.", "TELEGRAM_TOKEN"),
    ("artifactory.", "ARTIFACTORY_TOKEN"),
    ("ibm.1", "IBM_CLOUD_IAM_KEY"),
    ("square.", "SQUARE_KEY"),
    ("http.", "AUTHORIZATION_HEADER"),
)


def type_name(rule_id: str, name: str) -> str:
    """`kingfisher.github.2` -> GITHUB_TOKEN; otherwise `Adafruit IO Key` -> ADAFRUIT_IO_KEY."""
    local = rule_id.split(".", 1)[1] if "." in rule_id else rule_id
    for prefix, kind in TYPE_BY_PREFIX:
        if local == prefix or (prefix.endswith(".") and local.startswith(prefix)):
            return kind
    words = re.findall(r"[A-Za-z0-9]+", re.sub(r"\(.*?\)", "", name)) or re.findall(r"[A-Za-z0-9]+", name)
    return "_".join(w.upper() for w in words)[:64] or "SECRET"


# ---------------------------------------------------------------------------------------------------
# Pattern translation
# ---------------------------------------------------------------------------------------------------

_FLAG_GROUP = re.compile(r"\(\?([a-zA-Z]*)(?:-([a-zA-Z]*))?([:)])")


def translate(pattern: str) -> str:
    """Rust/Hyperscan regex -> the same pattern in RE2 syntax (no extended mode)."""
    out: list[str] = []
    i, n = 0, len(pattern)
    extended = False
    in_class = 0  # depth of [...] (POSIX classes nest one level)
    while i < n:
        ch = pattern[i]
        if ch == "\\" and i + 1 < n:
            nxt = pattern[i + 1]
            if nxt == " ":
                out.append(" " if not in_class else r"\x20")
            elif nxt == "#":
                out.append("#")
            else:
                out.append(pattern[i : i + 2])
            i += 2
            continue
        if in_class:
            if pattern.startswith("[:", i):
                close = pattern.find(":]", i + 2)
                if close > 0:
                    out.append(pattern[i : close + 2])
                    i = close + 2
                    continue
            if ch == "]":
                in_class = 0
            elif extended and ch in " \t\r\n":
                i += 1
                continue
            out.append(ch)
            i += 1
            continue
        if ch == "[":
            in_class = 1
            if pattern.startswith("[^", i):
                out.append("[^")
                i += 2
            else:
                out.append("[")
                i += 1
            if i < n and pattern[i] == "]":  # a leading `]` is literal
                out.append(r"\]")
                i += 1
            continue
        if extended and ch in " \t\r\n\f\v":
            i += 1
            continue
        if extended and ch == "#":
            end = pattern.find("\n", i)
            i = n if end < 0 else end + 1
            continue
        if pattern.startswith("(?#", i):  # inline comment
            end = pattern.find(")", i)
            i = n if end < 0 else end + 1
            continue
        if ch == "(" and pattern.startswith("(?", i):
            m = _FLAG_GROUP.match(pattern, i)
            if m is not None:
                on, off, close = m.group(1), m.group(2) or "", m.group(3)
                if "x" in on:
                    extended = True
                if "x" in off:
                    extended = False
                on, off = on.replace("x", ""), off.replace("x", "")
                if on or off or close == ":":
                    out.append(f"(?{on}{'-' + off if off else ''}{close}")
                i = m.end()
                continue
            if pattern.startswith("(?<", i) and not pattern.startswith(("(?<=", "(?<!"), i):
                out.append("(?P<")
                i += 3
                continue
        out.append(ch)
        i += 1
    return _OPEN_REPEAT.sub(_bound_repeat, _REPEAT.sub(_clamp_repeat, "".join(out)))


_REPEAT = re.compile(r"(?<!\\)\{(\d+),(\d+)\}")
_OPEN_REPEAT = re.compile(r"(?<!\\)\{(\d+),\}")
RE2_MAX_REPEAT = 1000
OPEN_REPEAT_MAX = 256  # `x{10,}` becomes `x{10,256}`: a match cannot span a megabyte of `x`


def _bound_repeat(m: re.Match[str]) -> str:
    low = int(m.group(1))
    return f"{{{low},{max(low, OPEN_REPEAT_MAX)}}}"


def _clamp_repeat(m: re.Match[str]) -> str:
    """RE2 allows counts up to 1000: `{16,2048}` becomes `{16,1000}` (a longer value is cut, not missed)."""
    low, high = int(m.group(1)), int(m.group(2))
    if high <= RE2_MAX_REPEAT or low > RE2_MAX_REPEAT:
        return m.group(0)
    return f"{{{low},{RE2_MAX_REPEAT}}}"


def check_engine(pattern: str) -> str | None:
    """Why RE2 cannot use the pattern (None: it compiles)."""
    import re2

    try:
        re2.compile(pattern)
    except Exception as exc:  # re2.error, ValueError
        return f"re2: {str(exc).splitlines()[0][:160]}"
    return None


# ---------------------------------------------------------------------------------------------------
# Reading upstream rules
# ---------------------------------------------------------------------------------------------------


def _git_head(path: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def read_source(path: Path) -> tuple[list[dict[str, Any]], str]:
    """Rules (upstream fields) and a description of where they came from."""
    if path.is_file() and path.suffix == ".json":
        rules = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(rules, dict):
            rules = rules.get("rules", [])
        return [dict(r, _file=path.name) for r in rules], f"{path.name} (kingfisher rules list --format json)"
    rules_dir = path
    for sub in RULE_DIRS:
        if (path / sub).is_dir():
            rules_dir = path / sub
            break
    head = _git_head(path)
    found: list[dict[str, Any]] = []
    for file in sorted(rules_dir.rglob("*.y*ml")):
        doc = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        for rule in doc.get("rules", []) if isinstance(doc, dict) else []:
            if isinstance(rule, dict) and "id" in rule and "pattern" in rule:
                found.append(dict(rule, _file=str(file.relative_to(rules_dir))))
    where = f"{rules_dir}" + (f" @ {head}" if head else "")
    return found, where


def _examples(values: object) -> list[str]:
    if not isinstance(values, list):
        return []
    return [v for v in values if isinstance(v, str) and len(v) <= MAX_EXAMPLE]


def build(sources: list[Path], upstream: str) -> dict[str, Any]:
    rules: dict[str, dict[str, Any]] = {}
    skipped: list[dict[str, str]] = []
    origins: list[str] = []
    for source in sources:
        found, where = read_source(source)
        origins.append(where)
        for raw in found:
            rule_id = str(raw["id"])
            if rule_id in rules or any(s["id"] == rule_id for s in skipped):
                continue
            pattern = translate(str(raw["pattern"]))
            reason = check_engine(pattern)
            if reason is not None:
                skipped.append({"id": rule_id, "name": str(raw.get("name", "")), "reason": reason})
                continue
            entry: dict[str, Any] = {
                "id": rule_id,
                "name": str(raw.get("name", rule_id)),
                "type": type_name(rule_id, str(raw.get("name", rule_id))),
                "pattern": pattern,
                "confidence": str(raw.get("confidence", "medium")),
                "visible": bool(raw.get("visible", True)),
            }
            if raw.get("min_entropy") is not None:
                entry["min_entropy"] = float(raw["min_entropy"])
            examples = _examples(raw.get("examples"))
            negatives = _examples(raw.get("negative_examples"))
            if examples:
                entry["examples"] = examples
            if negatives:
                entry["negative_examples"] = negatives
            rules[rule_id] = entry
    return {
        "upstream": upstream,
        "license": "Apache-2.0 (see NOTICE)",
        "generated_by": "scripts/refresh_secret_rules.py",
        "sources": origins,
        "rules": [rules[k] for k in sorted(rules)],
        "skipped": sorted(skipped, key=lambda s: s["id"]),
    }


def write(doc: dict[str, Any], out: Path) -> None:
    """One rule per line: small diffs on refresh."""
    lines = ["{"]
    for key in ("upstream", "license", "generated_by", "sources"):
        lines.append(f"  {json.dumps(key)}: {json.dumps(doc[key], ensure_ascii=False)},")
    for key in ("rules", "skipped"):
        items = doc[key]
        lines.append(f'  "{key}": [')
        for j, item in enumerate(items):
            sep = "," if j < len(items) - 1 else ""
            lines.append("    " + json.dumps(item, ensure_ascii=False, sort_keys=True) + sep)
        lines.append("  ]" + ("," if key == "rules" else ""))
    lines.append("}")
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sources", nargs="+", type=Path, help="checkout, rules directory or rules JSON")
    parser.add_argument("--upstream", default="", help="upstream name and commit/version to record")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    doc = build(args.sources, args.upstream or ", ".join(str(s) for s in args.sources))
    doc["sources"] = [Path(s).name if Path(s).is_absolute() else s for s in doc["sources"]]
    write(doc, args.out)
    print(f"{len(doc['rules'])} rules written to {args.out}; {len(doc['skipped'])} skipped", file=sys.stderr)
    for s in doc["skipped"]:
        print(f"  skipped {s['id']}: {s['reason']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
