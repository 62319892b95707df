"""The error tree (ztai.errors) and its one mapping per protocol (ztai.gateway.responses), in process."""

from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

import ztai
from ztai import errors
from ztai.errors import (
    ApprovalRequired,
    AuditUnavailable,
    ExchangeError,
    PayloadTooLarge,
    RpcProblem,
    SharedStateUnavailable,
    Unavailable,
    UpstreamTimeout,
    ZtaiError,
)
from ztai.gateway.mcp_messages import INTERNAL_ERROR, REQUEST_TIMEOUT, problem_of
from ztai.gateway.responses import (
    ErrorBoundary,
    error_response,
    oauth_error_body,
    protocol_handlers,
    sse_error_event,
)

# Exceptions that are not errors of the tree: control flow inside the HTTP protocol, and the Merkle
# proof checker's ValueError (a pure function's input check, caught where proofs are verified).
NOT_IN_THE_TREE = {"ztai.gateway.connection._Refused", "ztai.audit.merkle.ProofError"}


def test_every_error_class_lives_in_ztai_errors_and_in_its_docstring() -> None:
    outside = []
    for module_info in pkgutil.walk_packages(ztai.__path__, "ztai."):
        module = importlib.import_module(module_info.name)
        for name, value in vars(module).items():
            defined_here = inspect.isclass(value) and value.__module__ == module.__name__
            qualified = f"{module.__name__}.{name}"
            if defined_here and issubclass(value, BaseException) and qualified not in NOT_IN_THE_TREE:
                outside.append(qualified)
    outside = [name for name in outside if not name.startswith("ztai.errors.")]
    assert outside == []
    drawn = errors.__doc__ or ""
    for name, value in vars(errors).items():
        if inspect.isclass(value) and issubclass(value, ZtaiError):
            assert f" {name} " in drawn, f"{name} is missing from the tree in ztai.errors' docstring"


def test_dependencies_that_are_down_are_503_in_every_protocol() -> None:
    for error in (AuditUnavailable("x"), SharedStateUnavailable("redis down")):
        assert isinstance(error, Unavailable) and error.status == 503
        assert error_response(error).status_code == 503
        assert oauth_error_body(error)["error"] == "temporarily_unavailable"
        problem = problem_of(error)
        assert problem.rpc_code == INTERNAL_ERROR and problem.status == 503


def test_each_protocol_maps_the_same_error_its_way() -> None:
    too_large = PayloadTooLarge("request body exceeds 10 bytes")
    assert oauth_error_body(too_large) == {"error": "invalid_request", "error_description": too_large.message}
    refused = ExchangeError("invalid_target", "no", decision_id="dec_1")
    assert oauth_error_body(refused) == {
        "error": "invalid_target",
        "error_description": "no",
        "decision_id": "dec_1",
    }
    assert problem_of(UpstreamTimeout("MCP server x timed out")).rpc_code == REQUEST_TIMEOUT
    problem = RpcProblem(-32602, "params must be an object", status=400)
    assert problem_of(problem) is problem


def test_the_stream_error_event_is_the_openai_error_body() -> None:
    held = ApprovalRequired("held", decision_id="dec_9", approval_id="apr_1")
    event = sse_error_event(held)
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert orjson.loads(event[6:]) == orjson.loads(error_response(held).body)


async def _boom(_request: Request) -> Response:
    raise RuntimeError("secret-looking detail")


async def _gone(_request: Request) -> Response:
    raise ClientDisconnect()


async def _typed(_request: Request) -> Response:
    raise SharedStateUnavailable("redis down")


def _app() -> Starlette:
    from ztai.gateway.responses import handle_ztai_error

    routes = [Route("/boom", _boom), Route("/gone", _gone), Route("/typed", _typed)]
    return Starlette(
        routes=routes,
        middleware=[Middleware(ErrorBoundary)],
        exception_handlers=protocol_handlers(handle_ztai_error),
    )


async def test_the_boundary_logs_an_unexpected_error_once_and_answers_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # raise_app_exceptions: an exception re-raised past the boundary would fail this request
    transport = httpx.ASGITransport(app=_app(), raise_app_exceptions=True)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        with caplog.at_level(logging.DEBUG, logger="ztai.gateway"):
            boom = await client.get("/boom")
            gone = await client.get("/gone")
            typed = await client.get("/typed")
    assert boom.status_code == 500 and boom.json()["error"]["code"] == "internal_error"
    assert "secret-looking" not in boom.text
    errors_logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors_logged) == 1 and "RuntimeError" in errors_logged[0].getMessage()
    assert gone.status_code == 499 and not any(
        r.exc_info for r in caplog.records if "disconnect" in r.getMessage()
    )
    assert typed.status_code == 503 and typed.json()["error"]["code"] == "shared_state_unavailable"
