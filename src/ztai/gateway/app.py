"""The ASGI application: routes, error mapping and lifespan. Build with `create_app(settings)`."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

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
from ztai.gateway.openai_routes import chat_completions, embeddings, list_models
from ztai.gateway.responses import (
    JSONResponse,
    handle_method_not_allowed,
    handle_not_found,
    handle_unexpected,
    handle_ztai_error,
)
from ztai.gateway.runtime import Runtime
from ztai.store import shared

CONFIG_ENV = "ZTAI_CONFIG"
UPSTREAMS_ENV = "ZTAI_SERVE_UPSTREAMS"  # JSON of `--upstream` additions, handed to worker processes


async def healthz(_request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Each dependency and its state ("ok" or why not): store (the database), redis (when configured),
    keys, audit (the writer), revocations; 503 while any is not ok."""
    runtime: Runtime = request.app.state.runtime
    checks: dict[str, str] = {}
    try:
        await asyncio.to_thread(runtime.database.ping)
        checks["store"] = "ok"
    except StoreError as exc:
        checks["store"] = exc.message
    if runtime.redis is not None:
        try:
            await shared.ping(runtime.redis)
            checks["redis"] = "ok"
        except StoreError as exc:
            checks["redis"] = exc.message
    checks["keys"] = "ok" if runtime.keys.signing and runtime.keys.audit else "missing"
    checks["audit"] = "ok" if runtime.audit.healthy else "audit writer failing"
    try:
        runtime.revocations.is_revoked("", "")
        checks["revocations"] = "ok"
    except StoreError as exc:
        checks["revocations"] = exc.message
    checks["policy"] = runtime.policy.revision
    ready = all(value == "ok" for key, value in checks.items() if key != "policy")
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks}, status_code=200 if ready else 503
    )


async def metrics_endpoint(_request: Request) -> Response:
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


async def jwks(request: Request) -> Response:
    runtime: Runtime = request.app.state.runtime
    runtime.keys.reload_if_changed()
    lifetime = runtime.settings.identity.max_ttl_seconds + runtime.settings.identity.leeway_seconds
    return JSONResponse(runtime.keys.jwks(lifetime), headers={"cache-control": "public, max-age=60"})


class RequestMetrics:
    """Counts requests by route and status; times the whole request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_count(message: dict[str, object]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])  # type: ignore[call-overload]
            await send(message)

        try:
            await self.app(scope, receive, send_and_count)  # type: ignore[arg-type]
        finally:
            # The route's template, not the raw path: ids in paths must not grow the label set.
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            metrics.REQUESTS.labels(label, str(status)).inc()
            metrics.STAGE["total"].observe(time.perf_counter() - started)


def create_app(settings: Settings) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        runtime = await asyncio.to_thread(Runtime.build, settings)
        app.state.runtime = runtime
        app.state.mcp = mcp_routes.McpGateway.build(runtime)  # ConfigError: an MCP credential is unset
        await runtime.start()
        try:
            yield
        finally:
            await app.state.mcp.close()
            await runtime.close()

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
        *oauth_routes.ROUTES,
        *policy_routes.ROUTES,
        *task_routes.ROUTES,
        *mcp_routes.ROUTES,
        *vault_routes.ROUTES,
    ]
    handlers: dict[int | type[Exception], Callable[[Request, Exception], Awaitable[Response]]] = {
        ZtaiError: handle_ztai_error,
        404: handle_not_found,
        405: handle_method_not_allowed,
        Exception: handle_unexpected,
    }
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    app.add_middleware(RequestMetrics)
    return app


def app_from_environment() -> Starlette:
    """Factory for `uvicorn --factory` and multi-worker serving: reads the config named by $ZTAI_CONFIG."""
    settings = load_settings(os.environ.get(CONFIG_ENV) or None)
    connection.use_limits(settings.server)  # this worker's connections
    extra = orjson.loads(os.environ.get(UPSTREAMS_ENV) or "{}")
    return create_app(with_upstreams(settings, extra))


__all__ = ["app_from_environment", "create_app"]
