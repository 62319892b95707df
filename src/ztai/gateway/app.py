"""The ASGI application: routes, error mapping and lifespan. Build with `create_app(settings)`."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import orjson
from starlette.applications import Starlette
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ztai.config import Settings, load_settings, with_upstreams
from ztai.errors import StoreError, ZtaiError
from ztai.gateway import (
    agent_routes,
    approval_routes,
    connection,
    mcp_routes,
    metrics,
    oauth_routes,
    policy_routes,
    task_routes,
    vault_routes,
)
from ztai.gateway.access_log import AccessLog
from ztai.gateway.openai_routes import chat_completions, embeddings, list_models
from ztai.gateway.pipeline import PRINCIPAL_SCOPE_KEY
from ztai.gateway.responses import (
    ErrorBoundary,
    Handler,
    JSONResponse,
    handle_client_disconnect,
    handle_mcp_error,
    handle_method_not_allowed,
    handle_not_found,
    handle_oauth_error,
    handle_ztai_error,
    protocol_handlers,
)
from ztai.gateway.runtime import Runtime
from ztai.store import shared

CONFIG_ENV = "ZTAI_CONFIG"
UPSTREAMS_ENV = "ZTAI_SERVE_UPSTREAMS"  # JSON of `--upstream` additions, handed to worker processes


_INFORMATIONAL = ("policy", "policy_reload")  # readyz entries that do not decide readiness


async def healthz(_request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Each dependency and its state ("ok" or why not): store (the database), redis (when configured),
    keys, audit (the writer, and checkpoints being written: derived from the store, so the same on
    every worker), revocations; 503 while any is not ok."""
    runtime: Runtime = request.app.state.runtime
    checks: dict[str, str] = {}
    try:
        await asyncio.to_thread(runtime.stores.database.ping)
        checks["store"] = "ok"
    except StoreError as exc:
        checks["store"] = exc.message
    if runtime.stores.redis is not None:
        try:
            await shared.ping(runtime.stores.redis)
            checks["redis"] = "ok"
        except StoreError as exc:
            checks["redis"] = exc.message
    checks["keys"] = "ok" if runtime.identity.keys.signing and runtime.identity.keys.audit else "missing"
    checks["audit"] = await asyncio.to_thread(runtime.audit.writer.status)
    try:
        runtime.identity.revocations.is_revoked("", "")
        checks["revocations"] = "ok"
    except StoreError as exc:
        checks["revocations"] = exc.message
    checks["policy"] = runtime.policy.revision
    watch = runtime.policy_watch
    if watch is not None:  # a refused reload leaves the previous set active: a warning, still ready
        checks["policy_reload"] = f"refused: {watch.last_problem}" if watch.last_problem else "ok"
    ready = all(value == "ok" for key, value in checks.items() if key not in _INFORMATIONAL)
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks}, status_code=200 if ready else 503
    )


async def metrics_endpoint(_request: Request) -> Response:
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


async def jwks(request: Request) -> Response:
    runtime: Runtime = request.app.state.runtime
    runtime.identity.keys.reload_if_changed()
    lifetime = runtime.settings.identity.max_ttl_seconds + runtime.settings.identity.leeway_seconds
    return JSONResponse(runtime.identity.keys.jwks(lifetime), headers={"cache-control": "public, max-age=60"})


class RequestMetrics:
    """Counts requests by route and status; times the whole request; writes the access log line."""

    def __init__(self, app: ASGIApp, access_log: AccessLog | None = None) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        sent = received = 0
        decision_id = ""

        async def receive_and_count() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            return message

        async def send_and_count(message: Message) -> None:
            nonlocal status, sent, decision_id
            if message["type"] == "http.response.start":
                status = int(message["status"])
                for name, value in message.get("headers", ()):
                    if name == b"x-ztai-decision-id":
                        decision_id = value.decode("latin-1")
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive_and_count if self.access_log else receive, send_and_count)
        finally:
            label = metrics.route_label(scope) or "unmatched"
            elapsed = time.perf_counter() - started
            metrics.REQUESTS.labels(label, str(status)).inc()
            metrics.STAGE["total"].observe(elapsed)
            if self.access_log is not None:
                client = scope.get("client")
                self.access_log.write(
                    {
                        "time": datetime.fromtimestamp(time.time() - elapsed, UTC).isoformat(),
                        "method": scope.get("method", ""),
                        "route": label,
                        "path": scope.get("path", ""),
                        "status": status,
                        "latency_ms": round(elapsed * 1000, 3),
                        "bytes_in": received,
                        "bytes_out": sent,
                        "decision_id": decision_id,
                        "principal": scope.get(PRINCIPAL_SCOPE_KEY, ""),
                        "ip": client[0] if client else "",
                        "pid": os.getpid(),
                    }
                )


def create_app(settings: Settings) -> Starlette:
    access_log = _access_log(settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if access_log is not None:
            access_log.start()
        try:
            async with _running(app, settings):
                yield
        finally:
            if access_log is not None:
                await asyncio.to_thread(access_log.close)

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/.well-known/jwks.json", jwks, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        *approval_routes.ROUTES,
        *agent_routes.ROUTES,
        *policy_routes.ROUTES,
        *task_routes.ROUTES,
        *vault_routes.ROUTES,
        # Each protocol's routes answer errors in its own form (ztai.gateway.responses).
        _protocol("/oauth", oauth_routes.ROUTES, handle_oauth_error),
        _protocol("/mcp", mcp_routes.ROUTES, handle_mcp_error),
    ]
    handlers: dict[int | type[Exception], Handler] = {
        ZtaiError: handle_ztai_error,
        ClientDisconnect: handle_client_disconnect,
        404: handle_not_found,
        405: handle_method_not_allowed,
    }
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    app.add_middleware(ErrorBoundary)
    app.add_middleware(RequestMetrics, access_log=access_log)
    return app


def _protocol(prefix: str, routes: list[BaseRoute], handler: Handler) -> Mount:
    """`routes` under `prefix`, their typed errors answered by `handler`."""
    return Mount(prefix, app=ExceptionMiddleware(Router(routes), handlers=protocol_handlers(handler)))


@asynccontextmanager
async def _running(app: Starlette, settings: Settings) -> AsyncIterator[None]:
    runtime = await asyncio.to_thread(Runtime.build, settings)
    app.state.runtime = runtime
    app.state.mcp = mcp_routes.McpGateway.build(runtime)  # ConfigError: an MCP credential is unset
    await runtime.start()
    try:
        yield
    finally:
        await app.state.mcp.close()
        await runtime.close()


def _access_log(settings: Settings) -> AccessLog | None:
    """The access log `server.access_log` asks for: None (off), stderr (true) or a file."""
    target = settings.server.access_log
    if target is False:
        return None
    return AccessLog(None if target is True else settings.path(target))


def app_from_environment() -> Starlette:
    """Factory for `uvicorn --factory` and multi-worker serving: reads the config named by $ZTAI_CONFIG."""
    settings = load_settings(os.environ.get(CONFIG_ENV) or None)
    connection.use_limits(settings.server)  # this worker's connections
    extra = orjson.loads(os.environ.get(UPSTREAMS_ENV) or "{}")
    return create_app(with_upstreams(settings, extra))


__all__ = ["app_from_environment", "create_app"]
