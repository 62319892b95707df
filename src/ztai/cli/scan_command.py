"""`ztai scan`: run the content detectors over JSON lines (a stable contract, see docs/detect.md)."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ztai.detect.base import SOURCES
from ztai.detect.inspector import Inspector
from ztai.errors import ZtaiError

err = Console(stderr=True)
MAX_LINE_BYTES = 4 * 1024 * 1024


def scan(
    detectors: Annotated[
        str, typer.Option(help="comma-separated detectors: injection, pii, secrets")
    ] = "injection,pii,secrets",
) -> None:
    """Scan JSON lines {"id", "text", "source"} from stdin; write one result line per input to stdout.

    Example: ztai scan --detectors injection,pii,secrets < in.jsonl > out.jsonl
    """
    names = [name.strip() for name in detectors.split(",") if name.strip()]
    try:
        inspector = Inspector(names)
    except ZtaiError as exc:
        err.print(f"[red]error:[/red] {exc.message}")
        raise typer.Exit(2) from None
    injection = next((d for d in inspector.detectors if d.name == "injection"), None)
    out = sys.stdout.buffer
    failures = 0
    with Progress(
        TextColumn("scanning"),
        BarColumn(),
        TextColumn("{task.completed} texts"),
        TimeElapsedColumn(),
        console=err,
        disable=not err.is_terminal,
        transient=True,
    ) as progress:
        task = progress.add_task("scan", total=None)
        for number, line in enumerate(sys.stdin.buffer, 1):
            if not line.strip():
                continue
            result = _scan_line(inspector, injection, line, number)
            failures += "error" in result
            out.write(orjson.dumps(result) + b"\n")
            progress.advance(task)
    out.flush()
    if failures:
        err.print(f'{failures} line(s) could not be scanned (see their "error" field)')


def _scan_line(inspector: Inspector, injection: Any, line: bytes, number: int) -> dict[str, Any]:
    try:
        if len(line) > MAX_LINE_BYTES:
            raise ValueError(f"line longer than {MAX_LINE_BYTES} bytes")
        item = orjson.loads(line)
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise ValueError('expected an object with a string "text"')
        source = item.get("source") or "user"
        if source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}")
    except (ValueError, orjson.JSONDecodeError) as exc:
        return {"id": _id_of(line, number), "error": str(exc)}
    text: str = item["text"]
    findings = inspector.scan(text, source)
    result: dict[str, Any] = {"id": item.get("id", number)}
    if injection is not None:
        flagged = any(f.detector == "injection" for f in findings)
        result["injection"] = {"score": round(float(injection.score(text, source)), 6), "flagged": flagged}
    if "pii" in inspector.names:
        result["pii"] = [
            {"type": f.type, "start": f.start, "end": f.end, "score": round(f.score, 4)}
            for f in findings
            if f.detector == "pii"
        ]
    if "secrets" in inspector.names:
        result["secrets"] = [
            {"type": f.type, "start": f.start, "end": f.end} for f in findings if f.detector == "secrets"
        ]
    obfuscation = [
        {"type": f.type, "start": f.start, "end": f.end} for f in findings if f.detector == "obfuscation"
    ]
    if obfuscation:
        result["obfuscation"] = obfuscation
    return result


def _id_of(line: bytes, number: int) -> Any:
    try:
        item = orjson.loads(line)
        return item.get("id", number) if isinstance(item, dict) else number
    except orjson.JSONDecodeError:
        return number
