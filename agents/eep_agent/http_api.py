"""The agent's HTTP endpoint: health and what its workers are doing."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from eep_agent import __version__


def build_app(daemon: Any) -> FastAPI:
    """The agent's FastAPI app; ``daemon`` is the running :class:`AgentDaemon`."""
    app = FastAPI(title="eep agent", version=__version__)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "node_id": daemon.settings.node_id, "registered": daemon.registered}

    return app
