"""Several uvicorn workers under one supervisor, with SIGHUP meaning "reload the policies".

uvicorn's supervisor answers SIGHUP by replacing every worker (new processes, in-memory state lost).
ztai's reload is in place instead (ztai.policy.reloads): the supervisor validates the policies and
records a reload request; each worker applies it without restarting.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import uvicorn
from uvicorn.supervisors import Multiprocess

log = logging.getLogger("ztai.cli")


class PolicyReloadingSupervisor(Multiprocess):
    def __init__(self, config: uvicorn.Config, sockets: list[Any], on_hup: Callable[[], None]) -> None:
        super().__init__(config, sockets)
        self._on_hup = on_hup

    def handle_hup(self) -> None:
        try:
            self._on_hup()
        except BaseException as exc:  # the supervisor must survive whatever the reload runs into
            log.error("SIGHUP: policy reload failed: %s", type(exc).__name__)


def run_workers(app: str, workers: int, options: dict[str, Any], *, on_hup: Callable[[], None]) -> None:
    """`uvicorn.run(app, factory=True, workers=workers, **options)`, with `on_hup` for SIGHUP."""
    config = uvicorn.Config(app, factory=True, workers=workers, **options)
    socket = config.bind_socket()
    try:
        PolicyReloadingSupervisor(config, [socket], on_hup).run()
    finally:
        socket.close()
