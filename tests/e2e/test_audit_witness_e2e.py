"""End to end, on SQLite and PostgreSQL: an audit log that cannot go quiet.

The real server (two workers where readiness is at stake) and a witness file; the database is tampered
with behind its back (the newest checkpoint's stored frontier overwritten, a tenant column edited, the
newest checkpoints and events deleted), and `/readyz`, `/metrics`, the server log and
`ztai audit verify [--witness]` must each say so."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import text

from tests.conftest import store_url_for
from tests.e2e.conftest import Gateway, start_gateway
from ztai.store import Database, open_database

HELLO = {"model": "mock", "messages": [{"role": "user", "content": "hello"}]}


def _setup(kind: str, tmp_path: Path, workers: int) -> Iterator[tuple[Gateway, Database, Path]]:
    store_url = store_url_for(kind, tmp_path)
    witness = tmp_path / "witness" / "checkpoints.jsonl"
    gateway = start_gateway(
        tmp_path,
        store_url,
        extra_env={"ZTAI_AUDIT__WITNESS__FILE": str(witness), "ZTAI_AUDIT__MAX_UNCOVERED_SECONDS": "3"},
        serve_args=("--workers", str(workers)),
    )
    database = open_database(store_url)
    try:
        yield gateway, database, witness
    finally:
        database.close()
        gateway.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def setup(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Gateway, Database, Path]]:
    yield from _setup(str(request.param), tmp_path, workers=1)


@pytest.fixture(params=["sqlite", "postgresql"])
def two_workers(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Gateway, Database, Path]]:
    yield from _setup(str(request.param), tmp_path, workers=2)


def _sql(database: Database, statement: str, **params: Any) -> Any:
    with database.engine.begin() as connection:
        return connection.execute(text(statement), params)


def _traffic(gateway: Gateway, calls: int = 3) -> None:
    token = gateway.token("alice", "models=mock")
    for _ in range(calls):
        answer = httpx.post(
            f"{gateway.base_url}/chat/completions", json=HELLO, headers={"authorization": f"Bearer {token}"}
        )
        assert answer.status_code == 200, answer.text


def _until(condition: Any, what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {what}")


def _readyz(gateway: Gateway) -> httpx.Response:
    return httpx.get(f"{gateway.root_url}/readyz", timeout=5)


def _covered(database: Database) -> bool:
    events = _sql(database, "SELECT COUNT(*) FROM audit_events").scalar_one()
    newest = _sql(database, "SELECT MAX(tree_size) FROM audit_checkpoints").scalar_one()
    return bool(events) and newest == events


def _failures(gateway: Gateway, reason: str) -> float:
    metrics = httpx.get(f"{gateway.root_url}/metrics").text
    prefix = f'ztai_audit_checkpoint_failures_total{{reason="{reason}"}} '
    return sum(float(line.removeprefix(prefix)) for line in metrics.splitlines() if line.startswith(prefix))


def test_a_tampered_frontier_is_loud_and_recovers_without_restart(
    two_workers: tuple[Gateway, Database, Path],
) -> None:
    gateway, database, _witness = two_workers
    _traffic(gateway)
    _until(lambda: _covered(database), "every event covered")
    assert _readyz(gateway).json()["checks"]["audit"] == "ok"
    newest = _sql(database, "SELECT MAX(tree_size) FROM audit_checkpoints").scalar_one()
    good = _sql(
        database, "SELECT frontier FROM audit_checkpoints WHERE tree_size = :n", n=newest
    ).scalar_one()
    _sql(
        database,
        "UPDATE audit_checkpoints SET frontier = :zero WHERE tree_size = :n",
        zero=bytes(32),
        n=newest,
    )

    _traffic(gateway, calls=1)  # new events: the next checkpoint must extend the tampered frontier
    # Every worker refuses readiness, whichever of them tried the checkpoint (read from the store).
    _until(lambda: all(_readyz(gateway).status_code == 503 for _ in range(6)), "readyz 503 on every worker")
    reason = _readyz(gateway).json()["checks"]["audit"]
    assert "frontier" in reason or "not covered by a signed checkpoint" in reason, reason
    assert _failures(gateway, "frontier_mismatch") > 0
    kinds = [
        orjson.loads(line)["kind"]
        for line in gateway.cli("audit", "tail", "-n", "50", "--json").stdout.splitlines()
    ]
    assert "audit.checkpoint_failed" in kinds
    assert "audit checkpoint failed (frontier_mismatch)" in (gateway.home / "serve.log").read_text()
    failed = gateway.cli("audit", "verify", check=False)
    assert failed.returncode == 1 and "stored frontier of the checkpoint" in failed.stderr, failed.stderr

    repaired = gateway.cli("audit", "repair-frontier")  # the cause is gone: the frontier is derived data
    assert f"tree sizes {newest}" in repaired.stderr, repaired.stderr
    assert (
        _sql(database, "SELECT frontier FROM audit_checkpoints WHERE tree_size = :n", n=newest).scalar_one()
        == good
    )
    _until(lambda: all(_readyz(gateway).status_code == 200 for _ in range(6)), "readyz 200 again")
    _until(lambda: _covered(database), "every event covered again")
    kinds = [
        orjson.loads(line)["kind"]
        for line in gateway.cli("audit", "tail", "-n", "50", "--json").stdout.splitlines()
    ]
    assert "audit.checkpoint_recovered" in kinds
    assert gateway.cli("audit", "verify", "--witness", str(_witness)).returncode == 0


def test_edits_and_deletions_behind_the_servers_back_fail_verify(
    setup: tuple[Gateway, Database, Path],
) -> None:
    gateway, database, witness = setup
    _traffic(gateway, calls=4)
    _until(lambda: _covered(database), "every event covered")
    _traffic(gateway, calls=4)
    gateway.stop_server()  # a final checkpoint, witnessed
    assert _covered(database)
    ok = gateway.cli("audit", "verify", "--witness", str(witness))
    assert "audit log intact" in ok.stderr and "witness:" in ok.stderr

    # Another tenant's name on a stored event: the column is outside the body, but not outside the check.
    _sql(database, "UPDATE audit_events SET tenant = 'other.org' WHERE seq = 1")
    edited = gateway.cli("audit", "verify", check=False)
    assert edited.returncode == 1 and "event 1 was altered (its stored tenant" in edited.stderr, edited.stderr
    _sql(database, "UPDATE audit_events SET tenant = 'example.org' WHERE seq = 1")

    # Delete the two newest checkpoints and every event after the one that is left.
    sizes = [row[0] for row in _sql(database, "SELECT tree_size FROM audit_checkpoints ORDER BY tree_size")]
    assert len(sizes) >= 3, sizes
    kept = sizes[-3]
    _sql(database, "DELETE FROM audit_checkpoints WHERE tree_size > :kept", kept=kept)
    _sql(database, "DELETE FROM audit_events WHERE seq >= :kept", kept=kept)
    assert gateway.cli("audit", "verify").returncode == 0  # the database alone cannot tell
    caught = gateway.cli("audit", "verify", "--witness", str(witness), check=False)
    assert caught.returncode == 1, caught.stderr
    assert f"the witness holds a checkpoint of tree size {sizes[-1]}" in caught.stderr
    assert f"the log has only {kept} events" in caught.stderr

    # A witness file cut in the middle of a line: reported, and the rest still checked.
    content = witness.read_bytes()
    witness.write_bytes(content[: len(content) - 40])
    cut = gateway.cli("audit", "verify", "--witness", str(witness), check=False)
    assert cut.returncode == 1 and "not JSON (truncated or corrupt), skipped" in cut.stderr, cut.stderr
    assert "Traceback" not in cut.stderr
    witness.write_bytes(b"")
    empty = gateway.cli("audit", "verify", "--witness", str(witness), check=False)
    assert empty.returncode == 1 and "holds no checkpoints" in empty.stderr
    missing = gateway.cli("audit", "verify", "--witness", str(witness.with_name("nope")), check=False)
    assert missing.returncode != 0 and "cannot read the witness file" in missing.stderr


def test_verify_fails_when_events_stay_uncovered_too_long(setup: tuple[Gateway, Database, Path]) -> None:
    gateway, database, _witness = setup
    _traffic(gateway)
    gateway.stop_server()
    newest = _sql(database, "SELECT MAX(tree_size) FROM audit_checkpoints").scalar_one()
    _sql(database, "DELETE FROM audit_checkpoints WHERE tree_size = :n", n=newest)  # its events: unsigned
    time.sleep(0.05)
    patient = gateway.cli("audit", "verify", "--max-uncovered-seconds", "3600")
    assert "not yet covered by a signed checkpoint" in patient.stderr
    strict = gateway.cli("audit", "verify", "--max-uncovered-seconds", "0.01", check=False)
    assert strict.returncode == 1 and "audit log NOT covered" in strict.stderr, strict.stderr
