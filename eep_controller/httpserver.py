"""Running a uvicorn server inside our own event loop, with our own signal handling."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Generator
from typing import Any

import uvicorn


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves SIGINT/SIGTERM to the daemon that runs it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def start_in_background(self) -> asyncio.Task[None]:
        """Start serving; returns once the socket is bound (raises if start-up failed)."""
        task = asyncio.create_task(self.serve(), name="http-server")
        while not self.started:
            if task.done():
                task.result()
                raise RuntimeError("HTTP server stopped during start-up")
            await asyncio.sleep(0.02)
        return task

    @property
    def bound_port(self) -> int:
        for srv in getattr(self, "servers", []):
            for sock in srv.sockets:
                return int(sock.getsockname()[1])
        raise RuntimeError("HTTP server has no bound socket")


def make_server(app: Any, host: str, port: int) -> EmbeddedServer:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        # uvicorn's records go through the process's own handlers (text or JSON lines, see
        # eep_controller.logs) rather than through handlers of uvicorn's own
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,  # open streams (SSE) must not hold a shutdown forever
    )
    return EmbeddedServer(config)
