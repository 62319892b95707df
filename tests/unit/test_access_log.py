"""The access log: one JSON line per request with who, what and how long; never content."""

from __future__ import annotations

from pathlib import Path

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ztai.config import load_settings
from ztai.gateway.access_log import AccessLog
from ztai.gateway.app import RequestMetrics
from ztai.gateway.pipeline import PRINCIPAL_SCOPE_KEY


async def decided(request: Request) -> Response:
    await request.body()
    request.scope[PRINCIPAL_SCOPE_KEY] = "spiffe://example.org/user/alice"
    return Response(b"answer", headers={"x-ztai-decision-id": "dec_1"})


def test_lines_are_appended_as_json(tmp_path: Path) -> None:
    log = AccessLog(tmp_path / "logs" / "access.jsonl")
    log.start()
    for index in range(300):
        log.write({"n": index})
    log.close()
    again = AccessLog(tmp_path / "logs" / "access.jsonl")
    again.start()
    again.write({"n": 300})
    again.close()
    lines = (tmp_path / "logs" / "access.jsonl").read_bytes().splitlines()
    assert [orjson.loads(line)["n"] for line in lines] == list(range(301))
    assert (tmp_path / "logs" / "access.jsonl").stat().st_mode & 0o777 == 0o600


async def test_the_middleware_writes_one_line_per_request(tmp_path: Path) -> None:
    log = AccessLog(tmp_path / "access.jsonl")
    log.start()
    app = Starlette(routes=[Route("/v1/things/{id}", decided, methods=["POST"])])
    app.add_middleware(RequestMetrics, access_log=log)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        response = await http.post(
            "/v1/things/42?token=secret", content=b"the body", headers={"authorization": "Bearer tok"}
        )
    assert response.status_code == 200
    log.close()
    [entry] = [orjson.loads(line) for line in (tmp_path / "access.jsonl").read_bytes().splitlines()]
    assert entry["route"] == "/v1/things/{id}" and entry["path"] == "/v1/things/42"
    assert entry["method"] == "POST" and entry["status"] == 200 and entry["decision_id"] == "dec_1"
    assert entry["principal"] == "spiffe://example.org/user/alice"
    assert entry["bytes_in"] == len(b"the body") and entry["bytes_out"] == len(b"answer")
    text = (tmp_path / "access.jsonl").read_text()
    assert "secret" not in text and "Bearer" not in text and "the body" not in text


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("false", False),
        ("", False),
        ("true", True),
        ("stderr", True),
        ("logs/access.jsonl", "logs/access.jsonl"),
    ],
)
def test_the_setting_reads_off_stderr_or_a_path(
    value: str, expected: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "ztai.yaml").write_text("trust_domain: example.org\n")
    monkeypatch.setenv("ZTAI_SERVER__ACCESS_LOG", value)
    assert load_settings(tmp_path / "ztai.yaml").server.access_log == expected
