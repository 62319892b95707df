"""A scripted aiohttp server on a free loopback port, for tests that need a real HTTP peer; the gateway app
in process for tests that talk to it without a server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from aiohttp import web
from starlette.applications import Starlette

from ztai.config import Settings
from ztai.gateway.app import create_app
from ztai.store import open_database


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """Serve `app` on 127.0.0.1 (a free port); yields its base URL, e.g. http://127.0.0.1:43121."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def in_process(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, Starlette]]:
    """The whole gateway app in this process (store migrated as `ztai init` does, lifespan run), with an
    httpx client talking to it over `httpx.ASGITransport`: no socket, no server process."""
    database = open_database(settings.store_url)
    database.migrate()
    database.close()
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ztai.test") as http,
    ):
        yield http, app
