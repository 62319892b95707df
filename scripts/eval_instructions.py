"""How often the instruction-span rules (`ztai.detect.instructions`) fire, per data folder and role.

The rules were written against AgentDojo's workspace and slack suites; every other folder is data they
never saw. For attacks (injected documents, tool outputs and prompts) the share with at least one
instruction-like sentence, and where the injected span is known, the share whose span holds one; for
benign documents the share with at least one (a value from such a sentence can hold a side effect for
approval, so this is the ceiling of the utility cost on content of that kind).

    python scripts/eval_instructions.py [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_injection import load_corpus
from ztai.detect.instructions import instruction_texts

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()
    docs = load_corpus(args.data, source_pairs=False)
    counts: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0, 0, 0])
    started, chars = time.perf_counter(), 0
    for doc in docs:
        if doc.role == "harmful" or doc.role == "benign_prompt":
            continue  # plain requests and the user's own prompts: not content an agent reads
        chars += len(doc.text)
        row = counts[(doc.folder, doc.role)]
        row[0] += 1
        row[1] += bool(instruction_texts(doc.text))
        if doc.span is not None:
            row[2] += 1
            row[3] += bool(instruction_texts(doc.text[doc.span[0] : doc.span[1]]))
    elapsed = time.perf_counter() - started
    print(f"{'folder':26s} {'role':12s} {'n':>6s} {'with span':>10s} {'injected span':>14s}")
    for (folder, role), (n, hit, known, inside) in sorted(counts.items()):
        inner = f"{100 * inside / known:.1f}%" if known else "-"
        print(f"{folder:26s} {role:12s} {n:6d} {100 * hit / n:9.1f}% {inner:>14s}")
    print(f"{chars / 1e6:.1f} M characters in {elapsed:.1f} s ({chars / 1e6 / elapsed:.1f} MB/s)")


if __name__ == "__main__":
    main()
